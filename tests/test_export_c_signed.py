"""The C input type follows the model's input quantizers (issue 24: signed inputs gave wrong C).

A model trained on signed int8 features used to compile to ``cgmq_logits(const uint8_t *)``:
every negative feature reached the network as a large positive one (35.4% against the
engine's 88.77%). Here a tiny Flax model with a signed 8-bit input quantizer is exported by
the writer, emitted as C, compiled with ``-Werror`` and run on inputs with negative codes:
its logits must equal the integer engine's bit for bit.
"""

from __future__ import annotations

import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgmq_jax import export as ex
from cgmq_jax import quantizer
from cgmq_jax.export import c as emit
from cgmq_jax.nn import QuantDense

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)")


class SignedDense(nn.Module):
    """dense 6 (signed input quantizer) -> relu -> dense 4, on 10 features."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QuantDense(features=6, input_signed=True, name="fc1")(x))
        return QuantDense(features=4, name="fc2")(x)


def _export(tmp_path, *, input_bits, input_range, exponent):
    """The writer's file of a ``SignedDense`` whose first input quantizer is signed."""
    model = SignedDense()
    params = model.init(jax.random.key(3), jnp.zeros((1, 10), jnp.float32))["params"]
    params = jax.tree.map(lambda v: v, params)
    for name, bits, signed, top in (("fc1", input_bits, True, input_range), ("fc2", 4, False, 2.0)):
        node = params[name]
        w_range = jnp.max(jnp.abs(node["kernel"]))
        node["weight_quantizer"] = quantizer.latents(
            *quantizer.init_at_bits(w_range, 4, signed=True)
        )
        node["input_quantizer"] = quantizer.latents(
            *quantizer.init_at_bits(jnp.float32(top), bits, signed=signed)
        )
    path = ex.export(params, model, tmp_path / "m.npz", input_shape=(10,), input_exponent=exponent)
    return ex.load(path)


def _signed_inputs(model, n=200, seed=0):
    kind = emit.input_type(model)
    rng = np.random.default_rng(seed)
    x = rng.integers(kind.lo, kind.hi + 1, (n, 10))
    return np.concatenate([x, np.full((1, 10), kind.lo), np.full((1, 10), kind.hi)])


@needs_cc
@pytest.mark.slow
def test_signed_int8_input_compiles_to_int8_and_is_bit_exact(tmp_path):
    model = _export(tmp_path, input_bits=8, input_range=127 / 128, exponent=-7)
    first = model.layers[0]
    assert first["input_signed"] and first["input_bits"] == 8 and first["input_exponent"] == -7
    kind = emit.input_type(model)
    assert (kind.ctype, kind.lo, kind.hi) == ("int8_t", -127, 127)
    program = emit.emit_c(model, tmp_path / "c")
    header = program.header.read_text()
    assert "void cgmq_logits(const int8_t *input, int64_t *logits);" in header
    assert "static cgmq_input_t example[CGMQ_INPUT_SIZE];" in program.harness.read_text()
    x = _signed_inputs(model)
    codes = ex.run_integer(model, x, return_codes=True)[2]["fc1"]
    assert (codes < 0).sum() > len(x)  # many negative codes reach the first layer
    expected = ex.run_integer(model, x)[0]
    np.testing.assert_array_equal(emit.compile_and_run(program, x), expected)
    np.testing.assert_array_equal(
        emit.compile_and_run(program, x, predict=True), np.argmax(expected, -1)
    )


@needs_cc
@pytest.mark.slow
def test_a_wider_signed_input_takes_a_wider_type(tmp_path):
    """A 12-bit signed quantizer at the input's exponent: ``int16_t``, negative values kept."""
    model = _export(tmp_path, input_bits=12, input_range=2047 / 2048, exponent=-11)
    kind = emit.input_type(model)
    assert kind.ctype == "int16_t" and kind.lo < -128
    program = emit.emit_c(model, tmp_path / "c")
    assert re.search(r"cgmq_logits\(const int16_t \*input", program.source.read_text())
    x = _signed_inputs(model, seed=1)
    np.testing.assert_array_equal(emit.compile_and_run(program, x), ex.run_integer(model, x)[0])


@needs_cc
@pytest.mark.slow
def test_values_beyond_the_bounds_are_saturated_exactly(tmp_path):
    """Inputs beyond the type's range give the output of the nearer bound, like the engine."""
    model = _export(tmp_path, input_bits=8, input_range=127 / 128, exponent=-7)
    program = emit.emit_c(model, tmp_path / "c")
    x = np.random.default_rng(2).integers(-1000, 1000, (50, 10))
    np.testing.assert_array_equal(emit.compile_and_run(program, x), ex.run_integer(model, x)[0])


class UnsignedDense(nn.Module):
    """``SignedDense`` with an unsigned first input quantizer (MNIST's pixels)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QuantDense(features=6, input_signed=False, name="fc1")(x))
        return QuantDense(features=4, name="fc2")(x)


def test_unsigned_pixels_stay_uint8(tmp_path):
    """MNIST's convention (unsigned 8-bit quantizer at 2**-8) keeps the ``uint8_t`` API."""
    model = UnsignedDense()
    params = model.init(jax.random.key(0), jnp.zeros((1, 10), jnp.float32))["params"]
    params = jax.tree.map(lambda v: v, params)
    for name in ("fc1", "fc2"):
        params[name]["input_quantizer"] = quantizer.latents(
            *quantizer.init_at_bits(jnp.float32(255 / 256), 8, signed=False)
        )
    path = ex.export(params, model, tmp_path / "u.npz", input_shape=(10,))
    kind = emit.input_type(ex.load(path))
    assert (kind.ctype, kind.lo, kind.hi) == ("uint8_t", 0, 255)


def test_the_input_range_ends_at_the_first_value_of_the_top_code():
    """MNIST's uint8 pixels at a quantizer whose top level is 1.0 keep a ``uint8_t`` input:
    the range ends where the top code is first reached (halves round to even), checked
    against brute force."""
    from cgmq_jax.export.c import _raw_range

    def code(value: int, shift: int, levels: int) -> int:
        """``round_half_even(value / 2**shift)`` clipped to ``levels``, in exact integers."""
        if shift <= 0:
            return min(value << -shift, levels)
        floor, rest = value >> shift, value & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        up = rest > half or (rest == half and floor % 2 == 1)
        return min(floor + up, levels)

    for shift in range(-3, 9):
        for levels in range(1, 40):
            layer = {"input_levels": levels, "input_exponent": shift, "input_signed": True}
            lo, hi = _raw_range(layer, 0)
            first = next(v for v in range(0, (levels + 2) << max(shift, 0)) if
                         code(v, shift, levels) == levels)  # fmt: skip
            assert (lo, hi) == (-first, first), (shift, levels)
    mnist = {"input_levels": 4, "input_exponent": -2, "input_signed": False}
    assert _raw_range(mnist, -8) == (0, 224)
