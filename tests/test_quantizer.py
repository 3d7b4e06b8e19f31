"""Tests of cgmq_jax.quantizer against docs/method.md section 1."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cgmq_jax import quantizer

SIZE = 16  # fixed length of the hypothesis tensors: one compilation per signedness

fake_quant = jax.jit(quantizer.fake_quant, static_argnames="signed")
quantize = jax.jit(quantizer.quantize, static_argnames="signed")
dequantize = jax.jit(quantizer.dequantize)
levels = jax.jit(quantizer.levels)
exact_bitwidth = jax.jit(quantizer.exact_bitwidth, static_argnames="signed")
bitwidth = jax.jit(quantizer.bitwidth, static_argnames="signed")
power_of_two_step = jax.jit(quantizer.power_of_two_step)


def _sum_fake_quant(x, d, q_max, signed):
    return jnp.sum(quantizer.fake_quant(x, d, q_max, signed=signed))


grad_fake_quant = jax.jit(jax.grad(_sum_fake_quant, argnums=(0, 1, 2)), static_argnums=3)
bitwidth_grad = jax.jit(
    jax.value_and_grad(lambda d, q, signed: quantizer.bitwidth(d, q, signed=signed), (0, 1)),
    static_argnums=2,
)


def f32(value) -> np.float32:
    return np.float32(value)


def bits_of(a) -> np.ndarray:
    """The bit patterns of a float32 array, with -0.0 normalised to +0.0."""
    return (np.asarray(a, np.float32) + np.float32(0.0)).view(np.uint32)


# --- strategies ------------------------------------------------------------------------------

# Step sizes over 40 octaves (log-uniform), with the tiny d of the spec's no-NaN list.
steps = st.one_of(
    st.floats(-40.0, 12.0).map(lambda e: float(f32(2.0**e))),
    st.sampled_from([1e-30, 2.0**-24, 0.25, 0.3, 1.0]),
)
# q_max relative to d: from far below d (q_max < d, n clamped to 1) to 2**14 levels.
range_ratios = st.floats(-12.0, 14.0).map(lambda e: 2.0**e)
# x relative to q_max: about half inside the range, some outside, some exact zeros.
unit_tensors = st.lists(
    st.one_of(st.floats(-2.5, 2.5, width=32), st.just(0.0)), min_size=SIZE, max_size=SIZE
).map(lambda v: np.asarray(v, np.float32))


def _case(d, ratio, unit):
    d = f32(d)
    q_max = f32(max(float(d) * ratio, 1e-37))
    x = (unit * q_max).astype(np.float32)
    return x, d, q_max


def _range(d, q_max, signed):
    """``(d_q, n, lo)`` as the quantizer uses them."""
    _, scale = quantize(np.zeros(SIZE, np.float32), d, q_max, signed=signed)
    n = float(levels(d, q_max))
    return f32(scale), n, (-n if signed else 0.0)


# --- forward pass ----------------------------------------------------------------------------


@given(d=steps, ratio=range_ratios, unit=unit_tensors, signed=st.booleans())
@example(d=1e-30, ratio=1.0, unit=np.zeros(SIZE, np.float32), signed=True)
@example(d=1e-30, ratio=2.0**-12, unit=np.ones(SIZE, np.float32), signed=False)
@example(d=1.0, ratio=0.25, unit=np.linspace(-2, 2, SIZE, dtype=np.float32), signed=True)
def test_codes_in_range_and_roundtrip_equals_fake_quant(d, ratio, unit, signed):
    x, d, q_max = _case(d, ratio, unit)
    codes, scale = quantize(x, d, q_max, signed=signed)
    n = float(levels(d, q_max))
    assert codes.dtype == jnp.int32
    assert n >= 1 and n == max(np.round(q_max / f32(scale)), 1.0)
    mantissa, _ = np.frexp(np.float32(scale))
    assert mantissa == 0.5  # d_q is an exact power of two
    codes = np.asarray(codes)
    assert codes.max() <= n
    assert codes.min() >= (-n if signed else 0)
    fq = np.asarray(fake_quant(x, d, q_max, signed=signed))
    assert np.all(np.isfinite(fq))
    roundtrip = np.asarray(dequantize(codes, scale))
    # Exactly equal; bit for bit up to the sign of zero (fake_quant gives -0.0 for a small
    # negative x, dequantize +0.0 for code 0).
    np.testing.assert_array_equal(roundtrip, fq)
    np.testing.assert_array_equal(bits_of(roundtrip), bits_of(fq))
    # And the same without jit.
    codes_e, scale_e = quantizer.quantize(x, d, q_max, signed=signed)
    np.testing.assert_array_equal(
        np.asarray(quantizer.dequantize(codes_e, scale_e)),
        np.asarray(quantizer.fake_quant(x, d, q_max, signed=signed)),
    )


@given(d=steps, ratio=range_ratios, unit=unit_tensors, signed=st.booleans())
def test_error_inside_range_is_at_most_half_a_step(d, ratio, unit, signed):
    x, d, q_max = _case(d, ratio, unit)
    scale, n, lo = _range(d, q_max, signed)
    fq = np.asarray(fake_quant(x, d, q_max, signed=signed))
    inside = (x >= f32(lo) * scale) & (x <= f32(n) * scale)
    err = np.abs(fq.astype(np.float64) - x.astype(np.float64))
    assert np.all(err[inside] <= float(scale) / 2)
    # Outside the range the value is clipped to the end of the range.
    above = x > f32(n) * scale
    np.testing.assert_array_equal(fq[above], np.float32(n) * scale)
    below = x < f32(lo) * scale
    np.testing.assert_array_equal(fq[below], np.float32(lo) * scale)


def test_rounding_halves_to_even():
    d, q_max = f32(0.25), f32(10.0)  # d_q = 0.25, n = 40
    x = np.asarray([0.5, 1.5, 2.5, 3.5, -2.5, -3.5, 4.5], np.float32) * d
    codes, scale = quantize(x, d, q_max, signed=True)
    np.testing.assert_array_equal(np.asarray(codes), [0, 2, 2, 4, -2, -4, 4])
    np.testing.assert_array_equal(
        np.asarray(fake_quant(x, d, q_max, signed=True)),
        np.asarray([0, 2, 2, 4, -2, -4, 4], np.float32) * d,
    )
    # The level count rounds halves to even as well: q_max / d_q = 2.5 -> 2, 3.5 -> 4.
    assert float(levels(d, 2.5 * d)) == 2.0
    assert float(levels(d, 3.5 * d)) == 4.0
    # And the step: log2(d) is rounded, 2**-1.4 -> 2**-1, 2**-1.6 -> 2**-2.
    assert float(power_of_two_step(2.0**-1.4)) == 0.5
    assert float(power_of_two_step(2.0**-1.6)) == 0.25


def test_docstring_example_values():
    x = jnp.asarray([-1.0, 0.1, 0.3, 2.0])
    np.testing.assert_array_equal(
        np.asarray(fake_quant(x, 0.25, 1.0, signed=True)), [-1.0, 0.0, 0.25, 1.0]
    )
    assert int(exact_bitwidth(0.25, 1.0, signed=True)) == 4  # n = 4: 9 levels


# --- bit-width -------------------------------------------------------------------------------


def _expected_bits(n: int, signed: bool) -> int:
    return math.ceil(math.log2(n + 1)) + (1 if signed else 0)


def _bits_for_levels(count: int) -> int:
    return math.ceil(math.log2(count))


def test_exact_bitwidth_matches_formula_and_level_count():
    ns = set(range(1, 2050))
    for k in range(11, 24):
        ns |= {2**k - 1, 2**k, 2**k + 1}
    ns = np.asarray(sorted(ns), np.float32)  # all exactly representable
    ones = np.ones_like(ns)
    for signed in (True, False):
        got_n = np.asarray(jax.jit(jax.vmap(quantizer.levels))(ones, ns))
        np.testing.assert_array_equal(got_n, ns)
        got = np.asarray(
            jax.jit(jax.vmap(lambda d, q, s=signed: quantizer.exact_bitwidth(d, q, signed=s)))(
                ones, ns
            )
        )
        expected = [_expected_bits(int(n), signed) for n in ns]
        np.testing.assert_array_equal(got, expected)
        # The count of distinct levels: 2n + 1 signed, n + 1 unsigned.
        counts = [(2 * int(n) + 1) if signed else (int(n) + 1) for n in ns]
        np.testing.assert_array_equal(got, [_bits_for_levels(c) for c in counts])
        assert got.min() == quantizer.min_bitwidth(signed=signed)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 9, 15, 16, 63, 64, 127, 128, 255, 256])
def test_distinct_codes_counted_on_a_grid(n, signed):
    d = f32(0.5)
    q_max = f32(n * 0.5)
    x = np.linspace(-(n + 3) * 0.5, (n + 3) * 0.5, 64 * (n + 3), dtype=np.float32)
    codes, _ = quantize(x, d, q_max, signed=signed)
    count = len(np.unique(np.asarray(codes)))
    assert count == (2 * n + 1 if signed else n + 1)
    assert int(exact_bitwidth(d, q_max, signed=signed)) == _bits_for_levels(count)


@given(d=steps, ratio=range_ratios, signed=st.booleans())
@example(d=1e-30, ratio=2.0**-12, signed=True)
@example(d=0.25, ratio=0.5, signed=False)  # q_max = d / 2 rounds to n = 0 -> 1
def test_bitwidth_value_and_floor_aware_gradient(d, ratio, signed):
    d = f32(d)
    q_max = f32(max(float(d) * ratio, 1e-37))
    value, (grad_d, grad_q) = bitwidth_grad(d, q_max, signed)
    exact = int(exact_bitwidth(d, q_max, signed=signed))
    assert float(value) == exact
    assert float(bitwidth(d, q_max, signed=signed)) == exact
    assert np.isfinite(float(grad_d)) and np.isfinite(float(grad_q))
    n = float(levels(d, q_max))
    if n > 1:
        # More range adds bits, a larger step removes them.
        assert float(grad_q) > 0
        if d >= 2.0**quantizer.LOG2_D_MIN:
            assert float(grad_d) < 0
        else:  # d below the clip floor: d_q, hence the bit-width, does not depend on it
            assert float(grad_d) <= 0
    else:
        assert exact == quantizer.min_bitwidth(signed=signed)
        assert float(grad_d) == 0.0 and float(grad_q) == 0.0


def test_bitwidth_gradient_at_and_just_above_the_floor():
    for signed in (True, False):
        _, grads = bitwidth_grad(f32(1.0), f32(1.0), signed)  # n == 1
        assert [float(g) for g in grads] == [0.0, 0.0]
        _, grads = bitwidth_grad(f32(1.0), f32(2.0), signed)  # n == 2
        assert all(float(g) != 0.0 for g in grads)


# --- init_at_bits ----------------------------------------------------------------------------


def _top(bits: int, signed: bool) -> int:
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


@st.composite
def init_cases(draw):
    signed = draw(st.booleans())
    bits = draw(st.integers(quantizer.min_bitwidth(signed=signed), 8))
    kind = draw(st.sampled_from(["random", "power", "power_up", "power_down"]))
    if kind == "random":
        q_max = f32(2.0 ** draw(st.floats(-20.0, 12.0)))
    else:
        # q_max / top an exact power of two (the boundary of ceil(log2(.))), or 1 ulp off.
        q_max = f32(_top(bits, signed) * 2.0 ** draw(st.integers(-20, 12)))
        if kind == "power_up":
            q_max = np.nextafter(q_max, np.float32(np.inf))
        elif kind == "power_down":
            q_max = np.nextafter(q_max, np.float32(0.0))
    return q_max, bits, signed


@given(init_cases())
@example((f32(1.0), 8, True))
@example((f32(127.0), 8, True))
@example((f32(255.0 * 2.0**-15), 8, False))
@example((f32(0.0), 8, True))  # an all-zero tensor
def test_init_at_bits_gives_exactly_that_many_bits(case):
    q_max, bits, signed = case
    d, q = quantizer.init_at_bits(q_max, bits, signed=signed)
    assert int(quantizer.exact_bitwidth(d, q, signed=signed)) == bits
    assert float(d) > 0 and float(q) > 0


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_bits_batched(qs_by_width, widths, signed):
    """Under jit, for each width: ``exact_bitwidth(*init_at_bits(q, bits))`` for each ``q``,
    directly and after the round trip through the stored leaf. One compilation per
    signedness (``bits`` must be static: a program per width would be 15 compilations)."""
    out = []
    for qs, bits in zip(qs_by_width, widths, strict=True):

        def one(q, bits=bits):
            d, q_max = quantizer.init_at_bits(q, bits, signed=signed)
            leaf = quantizer.from_latents(quantizer.latents(d, q_max))
            return (
                quantizer.exact_bitwidth(d, q_max, signed=signed),
                quantizer.exact_bitwidth(*leaf, signed=signed),
            )

        out.append(jax.vmap(one)(qs))
    return out


def _init_at_bits_widths(qs, bits, signed):
    """``exact_bitwidth(*init_at_bits(q, bits))`` for each ``q`` of ``qs``."""

    def width(q):
        return quantizer.exact_bitwidth(
            *quantizer.init_at_bits(q, bits, signed=signed), signed=signed
        )

    return jax.vmap(width)(qs)


@pytest.mark.slow  # compiles whole training steps or many programs
def test_init_at_bits_every_width_over_many_ranges():
    rng = np.random.default_rng(0)
    q_values = np.float32(2.0 ** rng.uniform(-16, 10, 200))
    for signed in (True, False):
        widths = tuple(range(quantizer.min_bitwidth(signed=signed), 9))
        by_width = []
        for bits in widths:
            top = _top(bits, signed)
            powers = np.float32(top * 2.0 ** np.arange(-16, 10))
            qs = np.concatenate(
                [
                    q_values,
                    powers,
                    np.nextafter(powers, np.float32(np.inf)),
                    np.nextafter(powers, np.float32(0)),
                ]
            )
            by_width.append(qs)
            # One vmapped call per width (not 304 scalar calls dispatched one by one).
            got = np.asarray(_init_at_bits_widths(qs, bits, signed))
            assert np.all(got == bits), (signed, bits, qs[got != bits])
        # The same vectorised under jit, and after the round trip through the stored leaf.
        batched = _init_bits_batched(by_width, widths, signed)
        for qs, bits, (direct, through_leaf) in zip(by_width, widths, batched, strict=True):
            for leaf, got in ((False, np.asarray(direct)), (True, np.asarray(through_leaf))):
                assert np.all(got == bits), (signed, bits, leaf, qs[got != bits])


def test_init_at_bits_rejects_too_few_bits():
    with pytest.raises(ValueError, match="bits must be >= 2"):
        quantizer.init_at_bits(1.0, 1, signed=True)
    with pytest.raises(ValueError, match="bits must be >= 1"):
        quantizer.init_at_bits(1.0, 0, signed=False)


# Regression (fixed in 8594e25): under jit log2(q_max/top) was inexact, so q_max =
# nextafter(255 * 2**-15, 0) got 7 of 8 unsigned bits; and exp2(log2(q_max)) through the
# stored leaf moved q_max = nextafter(31.75, inf) from n = 64 (8 signed bits) to n = 63.
def test_init_at_bits_exact_under_jit_and_through_latents():
    jitted = jax.jit(quantizer.init_at_bits, static_argnames=("bits", "signed"))
    q = np.nextafter(f32(255 * 2.0**-15), np.float32(0))
    assert int(exact_bitwidth(*jitted(q, bits=8, signed=False), signed=False)) == 8
    q = np.nextafter(f32(31.75), np.float32(np.inf))
    theta = quantizer.latents(*quantizer.init_at_bits(q, 8, signed=True))
    assert int(exact_bitwidth(*quantizer.from_latents(theta), signed=True)) == 8


# --- the power-of-two step -------------------------------------------------------------------


def test_step_rounds_log2_d_to_the_nearest_power_of_two():
    # Eager scalars; d within a factor sqrt(2) of 2**k rounds to 2**k.
    for k in range(-24, 25, 3):
        for factor in (0.75, 1.0, 1.3):
            assert float(power_of_two_step(f32(factor * 2.0**k))) == 2.0**k


# Regression (fixed in 8594e25): jnp.exp2 of an integer is not exact on XLA CPU (exponents
# -24..-15, -13, 13, 15, ..., 23), so d_q was not a power of two there.
def test_step_is_an_exact_power_of_two_everywhere():
    ks = np.arange(-24, 25)
    got = np.asarray(jax.vmap(quantizer.power_of_two_step)(np.float32(1.3 * 2.0**ks)))
    np.testing.assert_array_equal(got, 2.0**ks)


# The quantizer divides by its step as a product with the step's reciprocal (faster on
# XLA:CPU); that is exact only because the step is a power of two in range. Against the
# quotient itself, in float64 then rounded once, at every step and over magnitudes from
# subnormal to huge, under jit (where XLA could reassociate) and eagerly.
def test_codes_and_step_gradient_equal_true_division_at_every_step():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * 2.0 ** rng.integers(-40, 40, 4096)).astype(np.float32)
    x = np.concatenate([x, np.float32([0.0, -0.0, 1e-45, -3e-39, 3.4e38, 2.5, -2.5])])
    jitted = jax.jit(quantizer.quantize, static_argnames="signed")
    # One compiled gradient for every step: the values outside the range are replaced by 0,
    # which adds nothing to the step's gradient (a new shape per step compiled 49 programs).
    step_grad = jax.jit(
        jax.grad(lambda d, kept, q_max: jnp.sum(quantizer.fake_quant(kept, d, q_max, signed=True)))
    )
    for k in range(-24, 25):
        d = np.float32(2.0**k)
        with np.errstate(over="ignore"):  # a huge x over a tiny step: inf, as in float32
            quotient = (x.astype(np.float64) / float(d)).astype(np.float32)
        want = np.clip(np.round(quotient), -1000.0, 1000.0)
        for fn in (quantizer.quantize, jitted):
            codes, scale = fn(x, d, f32(1000.0 * d), signed=True)
            np.testing.assert_array_equal(np.asarray(codes), want.astype(np.int32))
            assert float(scale) == d
        # The step's gradient inside the range: the rounding errors in steps, summed.
        inside = np.abs(quotient) <= 1000.0
        kept = np.where(inside, x, f32(0.0))
        err = ((want[inside] * d).astype(np.float64) - x[inside]) / float(d)
        got = float(step_grad(d, kept, f32(1000.0 * d)))
        np.testing.assert_allclose(got, np.sum(err), rtol=1e-4, atol=1e-3)


# Regression (fixed in 8594e25): the straight-through form d + stop_gradient(2**e - d) was
# not 2**e outside the clip range: d = 1e-30 gave 5.9604641e-08, d = 1e30 gave 0 (NaN).
def test_step_is_clipped_exactly_outside_its_bounds():
    assert float(power_of_two_step(f32(1e-30))) == 2.0**quantizer.LOG2_D_MIN
    assert float(power_of_two_step(f32(1e30))) == 2.0**quantizer.LOG2_D_MAX
    assert np.isfinite(float(quantizer.fake_quant(1.0, 1e30, 1e30, signed=True)))


# --- gradients -------------------------------------------------------------------------------


def _grads(x, d, q_max, signed):
    gx, gd, gq = grad_fake_quant(np.asarray(x, np.float32), f32(d), f32(q_max), signed)
    return np.asarray(gx), float(gd), float(gq)


def test_gradients_hand_case_signed():
    # d_q = 0.25, n = 4, range [-1, 1]; x = -1 is on the boundary (inside), 2.0 above.
    # grad_d: inside (x_q - x)/d_q = 0, -0.1/0.25, -0.05/0.25; above (n*d_q - q_max)/d_q = 0.
    gx, gd, gq = _grads([-1.0, 0.1, 0.3, 2.0], 0.25, 1.0, True)
    np.testing.assert_array_equal(gx, [1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(gd, -0.6, rtol=1e-6)
    assert gq == 1.0


def test_gradients_hand_case_unsigned_with_negative_x():
    # Below an unsigned range the output is the constant 0: no gradient to anything.
    gx, gd, gq = _grads([-0.5, 0.1, 0.3, 2.0], 0.25, 1.0, False)
    np.testing.assert_array_equal(gx, [0.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(gd, -0.6, rtol=1e-6)
    assert gq == 1.0
    gx, gd, gq = _grads([-3.0, -0.1], 0.25, 1.1, False)
    np.testing.assert_array_equal(gx, [0.0, 0.0])
    assert (gd, gq) == (0.0, 0.0)


def test_gradients_hand_case_below_signed_range():
    # q_max = 1.1: n = round(4.4) = 4, range [-1, 1]. x = -3 is below: grad_q = sign(x) = -1,
    # grad_d = -(n*d_q - q_max)/d_q = -(1 - 1.1)/0.25 = 0.4. x = 0.5 is on a level: 0.
    gx, gd, gq = _grads([-3.0, 0.5], 0.25, 1.1, True)
    np.testing.assert_array_equal(gx, [0.0, 1.0])
    np.testing.assert_allclose(gd, 0.4, rtol=1e-5)
    assert gq == -1.0
    # Its mirror above the range.
    gx, gd, gq = _grads([3.0], 0.25, 1.1, True)
    np.testing.assert_array_equal(gx, [0.0])
    np.testing.assert_allclose(gd, -0.4, rtol=1e-5)
    assert gq == 1.0


def test_gradient_wrt_d_is_straight_through_the_power_of_two_rounding():
    # d = 0.3 rounds to d_q = 0.25: the same forward pass and the same gradient as d = 0.25.
    x = [-1.0, 0.1, 0.3, 2.0]
    assert _grads(x, 0.3, 1.0, True)[1] == _grads(x, 0.25, 1.0, True)[1]


@given(d=steps, ratio=range_ratios, unit=unit_tensors, signed=st.booleans())
@example(d=1e-30, ratio=1.0, unit=np.zeros(SIZE, np.float32), signed=True)
@example(d=1e-30, ratio=2.0**-12, unit=np.zeros(SIZE, np.float32), signed=False)
@example(d=4.0, ratio=2.0**-10, unit=np.linspace(-2, 2, SIZE, dtype=np.float32), signed=True)
def test_gradients_match_the_spec_on_random_inputs(d, ratio, unit, signed):
    x, d, q_max = _case(d, ratio, unit)
    gx, gd, gq = _grads(x, d, q_max, signed)
    assert np.all(np.isfinite(gx)) and np.isfinite(gd) and np.isfinite(gq)
    scale, n, lo = _range(d, q_max, signed)
    fq = np.asarray(fake_quant(x, d, q_max, signed=signed)).astype(np.float64)
    below = x < f32(lo) * scale
    above = x > f32(n) * scale
    inside = ~(below | above)
    np.testing.assert_array_equal(gx, inside.astype(np.float32))
    # d: (x_q - x)/d_q inside (|.| <= 1/2), the clipped value's derivative outside.
    inside_d = (fq - x) / float(scale)
    assert np.all(np.abs(inside_d[inside]) <= 0.5)
    clipped_d = (n * float(scale) - float(q_max)) / float(scale)
    expected_d = inside_d[inside].sum() + above.sum() * clipped_d
    expected_q = float(above.sum())
    if signed:
        expected_d -= below.sum() * clipped_d
        expected_q -= float(below.sum())
    # d_q is a power of two, so each term is exact in float32; only the sum rounds.
    np.testing.assert_allclose(gd, expected_d, rtol=1e-5, atol=1e-5 * SIZE)
    assert gq == expected_q


# --- transformations -------------------------------------------------------------------------


def test_jit_matches_eager():
    x = jnp.asarray([-1.0, 0.1, 0.3, 2.0, 0.0])
    for signed in (True, False):
        np.testing.assert_array_equal(
            np.asarray(fake_quant(x, 0.3, 0.9, signed=signed)),
            np.asarray(quantizer.fake_quant(x, 0.3, 0.9, signed=signed)),
        )
        eager = jax.grad(_sum_fake_quant, argnums=(0, 1, 2))(x, 0.3, 0.9, signed)
        jitted = grad_fake_quant(x, f32(0.3), f32(0.9), signed)
        for a, b in zip(eager, jitted, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # compiles whole training steps or many programs
def test_vmap_over_a_batch_of_quantizers():
    x = jnp.asarray([-1.0, -0.2, 0.0, 0.1, 0.3, 0.7, 2.0], jnp.float32)
    ds = np.asarray([0.25, 0.3, 0.1, 1.0, 2.0**-10, 1e-30], np.float32)
    qs = np.asarray([1.0, 0.7, 0.05, 3.0, 0.01, 1e-3], np.float32)
    for signed in (True, False):

        def one(d, q, signed=signed):
            return quantizer.fake_quant(x, d, q, signed=signed)

        def grads(d, q, signed=signed):
            return jax.grad(_sum_fake_quant, argnums=(0, 1, 2))(x, d, q, signed)

        batched = np.asarray(jax.jit(jax.vmap(one))(ds, qs))
        batched_grads = jax.jit(jax.vmap(grads))(ds, qs)
        assert batched.shape == (len(ds), len(x))
        assert batched_grads[0].shape == (len(ds), len(x))
        assert batched_grads[1].shape == (len(ds),)
        one_jit, grads_jit = jax.jit(one), jax.jit(grads)
        for i in range(len(ds)):
            np.testing.assert_array_equal(batched[i], np.asarray(one_jit(ds[i], qs[i])))
            np.testing.assert_array_equal(batched[i], np.asarray(one(ds[i], qs[i])))
            single = grads_jit(ds[i], qs[i])
            for a, b in zip(batched_grads, single, strict=True):
                np.testing.assert_allclose(np.asarray(a)[i], np.asarray(b), rtol=1e-6)
        assert np.all(np.isfinite(batched))
        bits = jax.vmap(lambda d, q, s=signed: quantizer.exact_bitwidth(d, q, signed=s))(ds, qs)
        assert bits.shape == (len(ds),)


# --- storage ---------------------------------------------------------------------------------


def test_latents_roundtrip_and_labels():
    theta = quantizer.latents(0.25, 3.0)
    assert theta.shape == (2,)
    np.testing.assert_array_equal(np.asarray(theta), np.log2(np.float32([0.25, 3.0])))
    d, q_max = quantizer.from_latents(theta)
    assert float(d) == 0.25
    np.testing.assert_allclose(float(q_max), 3.0, rtol=1e-6)
    params = {"layer": {"kernel": jnp.zeros(3), "input_quantizer": theta, "bias": jnp.zeros(1)}}
    assert quantizer.param_labels(params) == {
        "layer": {"kernel": "weight", "input_quantizer": "quantizer", "bias": "weight"}
    }
    assert quantizer.COST_RAISING_SIGN == (-1.0, 1.0)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.slow  # compiles whole training steps or many programs
def test_tie_range_gives_the_total_lsq_derivative_of_the_step(bits):
    """Through ``tie_range`` (``q_max = n * d_q``), d fake_quant / d log2 d is LSQ's total
    derivative times ``d ln 2``: ``round(x/d) - x/d`` inside, ``+-n`` outside; no q_max part."""
    theta = quantizer.latents(*quantizer.init_at_bits(1.0, bits, signed=True))
    d, q_max = quantizer.from_latents(theta)
    n = quantizer.levels(d, q_max)
    x = jnp.array([-3.0, -0.3, 0.1, 0.26, 0.9, 2.5], jnp.float32)

    def forward(theta):
        return quantizer.fake_quant(
            x, *quantizer.from_latents(quantizer.tie_range(theta)), signed=True
        )

    np.testing.assert_array_equal(forward(theta), quantizer.fake_quant(x, d, q_max, signed=True))
    jacobian = jax.jacobian(forward)(theta)
    expected = jnp.where(x > n * d, n, jnp.where(x < -n * d, -n, jnp.round(x / d) - x / d)) * (
        d * jnp.log(2.0)
    )
    np.testing.assert_allclose(jacobian[:, 0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jacobian[:, 1], jnp.zeros_like(x))
