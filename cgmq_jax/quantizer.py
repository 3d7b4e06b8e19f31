"""Pure quantizer functions: DQ's [d, q_max] parametrization with straight-through gradients.

A quantizer has two positive latent floats: the step ``d`` and the range ``q_max``. In the
forward pass the step is rounded to a power of two, ``d_q = 2 ** round(log2(d))``, the number
of positive levels is ``n = max(round(q_max / d_q), 1)``, and

    code = clip(round(x / d_q), lo, n)        lo = -n (signed) or 0 (unsigned)
    fake_quant(x) = d_q * code                == dequantize(*quantize(x))

so the fake-quant forward pass is integer arithmetic exactly. Rounding convention: every
``round`` here is ``jnp.round``, which rounds halves to even (``round(2.5) == 2``).

Gradients (``jax.custom_vjp``, docs/method.md section 1, after Uhlich et al. 2020):

* w.r.t. ``x``: 1 inside ``[lo * d_q, n * d_q]``, 0 outside;
* w.r.t. ``d``: ``(fake_quant(x) - x) / d_q`` inside the range, and for the clipped value
  outside it (``(n * d_q - q_max) / d_q`` above, its mirror below for signed tensors,
  0 below for unsigned ones); the power-of-two rounding of ``d`` is straight-through;
* w.r.t. ``q_max``: ``sign(x)`` outside the range, 0 inside (0 below an unsigned range).

The bit-width is an integer derived from ``n``: ``bit_length(n)`` (+1 and at least 2 when
signed), computed exactly from the exponent of ``frexp(n)``. :func:`bitwidth` returns it
as a float with a straight-through gradient from the relaxation ``log2(q_max / d + 1)``,
which is zero for a quantizer already at its floor (``n == 1``), as the constraint must not
push a quantizer that can save nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

# Bounds of the power-of-two step, in log2. Wide enough for any tensor met in practice.
LOG2_D_MIN = -24.0
LOG2_D_MAX = 24.0


def _straight_through(surrogate: jax.Array, value: jax.Array) -> jax.Array:
    """``value`` in the forward pass, the gradient of ``surrogate`` in the backward pass.

    Written so that the forward value is ``value`` bit for bit (``surrogate - surrogate`` is
    exactly 0 for finite surrogates), whatever their magnitudes.
    """
    return jax.lax.stop_gradient(value) + (surrogate - jax.lax.stop_gradient(surrogate))


def _exact_power_of_two(exponent: jax.Array) -> jax.Array:
    """``2.0 ** exponent`` for integer-valued float exponents, exactly (``exp2`` is not)."""
    return jnp.ldexp(jnp.float32(1.0), exponent.astype(jnp.int32))


def _over_step(x: jax.Array, step: jax.Array) -> jax.Array:
    """``x / step`` for a power-of-two ``step`` in ``[2**LOG2_D_MIN, 2**LOG2_D_MAX]``, as
    ``x * (1 / step)``: the reciprocal is exact, so the product is the quotient bit for bit
    (both are the one real value, rounded once). XLA:CPU multiplies tensors several times
    faster than it divides them: the DS-CNN's cgmq step 1.05x as fast (docs/performance.md).
    """
    return x * (1.0 / step)


def power_of_two_step(d: ArrayLike) -> jax.Array:
    """``d_q = 2 ** round(log2(clip(d)))`` with a straight-through gradient (``dd_q/dd = 1``)."""
    d = jnp.asarray(d, jnp.float32)
    tiny = jnp.float32(2.0**LOG2_D_MIN)
    exponent = jnp.clip(jnp.round(jnp.log2(jnp.maximum(d, tiny))), LOG2_D_MIN, LOG2_D_MAX)
    return _straight_through(d, _exact_power_of_two(exponent))


def levels(d: ArrayLike, q_max: ArrayLike, *, prune: bool = False) -> jax.Array:
    """Number of positive levels ``n = max(round(q_max / d_q), 1)`` (float, no gradient).

    With ``prune`` (a per-channel weight quantizer that may remove channels, docs/method.md
    section 12) the floor is 0 instead of 1: ``n = round(q_max / d_q)``, and a channel with
    ``n == 0`` is removed (0 bits, all its codes 0). One channel always stays: where every
    entry of ``d`` / ``q_max`` (the channels of one layer) has ``n == 0``, the first one with
    the largest ``q_max / d_q`` keeps ``n = 1``.
    """
    d_q = jax.lax.stop_gradient(power_of_two_step(d))
    ratio = jnp.asarray(q_max, jnp.float32) / d_q
    if not prune:
        return jnp.maximum(jnp.round(ratio), 1.0)
    n = jnp.round(ratio)
    flat = jnp.reshape(n, (-1,))
    kept = jnp.arange(flat.size) == jnp.argmax(jnp.reshape(ratio, (-1,)))
    flat = jnp.where(jnp.all(flat == 0.0) & kept, 1.0, flat)
    return jnp.reshape(flat, jnp.shape(n))


def _raw_levels(d: ArrayLike, q_max: ArrayLike) -> jax.Array:
    """``round(q_max / d_q)`` with no floor and no channel kept (0 where a channel is pruned
    or is the one kept by :func:`levels`' rule)."""
    d_q = jax.lax.stop_gradient(power_of_two_step(d))
    return jnp.round(jnp.asarray(q_max, jnp.float32) / d_q)


def _lowest_code(n: jax.Array, signed: bool) -> jax.Array:
    return -n if signed else jnp.zeros_like(n)


def quantize(
    x: ArrayLike, d: ArrayLike, q_max: ArrayLike, *, signed: bool, prune: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Float tensor to integer codes and their power-of-two scale.

    Args:
      x: the tensor.
      d: the latent step (positive scalar).
      q_max: the latent range (positive scalar).
      signed: codes in ``[-n, n]`` if true, ``[0, n]`` otherwise.
      prune: the level count may be 0 (:func:`levels`).

    Returns:
      ``(codes, scale)``: int32 codes of ``x``'s shape and the float32 scale ``d_q``.
    """
    d_q = jax.lax.stop_gradient(power_of_two_step(d))
    n = levels(d, q_max, prune=prune)
    codes = jnp.round(_over_step(jnp.asarray(x, jnp.float32), d_q))
    codes = jnp.clip(codes, _lowest_code(n, signed), n)
    return codes.astype(jnp.int32), d_q


def dequantize(codes: ArrayLike, scale: ArrayLike) -> jax.Array:
    """Integer codes back to floats: ``codes * scale``."""
    return jnp.asarray(codes).astype(jnp.float32) * jnp.asarray(scale, jnp.float32)


def _fake_quant_forward(x, d, q_max, signed, prune=False):
    d_q = jax.lax.stop_gradient(power_of_two_step(d))
    n = levels(d, q_max, prune=prune)
    lo = _lowest_code(n, signed)
    x_q = d_q * jnp.clip(jnp.round(_over_step(x, d_q)), lo, n)
    return x_q, (x, x_q, d_q, n, lo, jnp.asarray(q_max, jnp.float32))


def _fake_quant_fwd(x, d, q_max, signed, prune):
    x_q, residuals = _fake_quant_forward(x, d, q_max, signed, prune)
    return x_q, (residuals, jnp.shape(d), jnp.shape(q_max))


def _sum_to_shape(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum ``t`` over the axes that broadcasting added or stretched to reach its shape."""
    t = jnp.sum(t, axis=tuple(range(t.ndim - len(shape))))
    stretched = tuple(i for i, size in enumerate(shape) if size == 1 and t.shape[i] != 1)
    return jnp.reshape(jnp.sum(t, axis=stretched, keepdims=True), shape)


def _fake_quant_bwd(signed, prune, saved, g):
    (x, x_q, d_q, n, lo, q_max), d_shape, q_max_shape = saved
    below = x < lo * d_q
    above = x > n * d_q
    inside = ~(below | above)
    grad_x = jnp.where(inside, g, 0.0)
    # Outside the range the output is the clipped value: DQ clips x at +-q_max, then rounds.
    # There d's partial is +-(n * d_q - q_max) / d_q and q_max's is +-1 (+ above, - below),
    # so both gradients take the one sum of g over the clipped values, signs applied: two
    # tensor-sized sums in all, not three (XLA:CPU writes each summand out before its sum;
    # the DS-CNN's and lenet5_bb's QAT steps 1.15x as fast, docs/performance.md).
    outside = jnp.where(above, g, 0.0)
    if signed:
        outside = outside - jnp.where(below, g, 0.0)
    clipped_d = (n * d_q - q_max) / d_q
    clipped_sum = _sum_to_shape(outside, jnp.shape(clipped_d))
    grad_d = _sum_to_shape(g * jnp.where(inside, _over_step(x_q - x, d_q), 0.0), d_shape)
    grad_d = grad_d + _sum_to_shape(clipped_d * clipped_sum, d_shape)
    return grad_x, grad_d, _sum_to_shape(clipped_sum, q_max_shape)


_fake_quant = jax.custom_vjp(
    lambda x, d, q_max, signed, prune: _fake_quant_forward(x, d, q_max, signed, prune)[0],
    nondiff_argnums=(3, 4),
)
_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(
    x: ArrayLike, d: ArrayLike, q_max: ArrayLike, *, signed: bool, prune: bool = False
) -> jax.Array:
    """``dequantize(*quantize(x, d, q_max))`` with DQ's straight-through gradients.

    With ``prune`` a channel may have 0 levels (:func:`levels`): its values are all 0 in the
    forward pass, while the gradient w.r.t. ``q_max`` (``sign(x)`` of the clipped values)
    still tells whether the loss wants it back.

    Examples:
      >>> import jax.numpy as jnp
      >>> from cgmq_jax import quantizer
      >>> x = jnp.array([-1.0, 0.1, 0.3, 2.0])
      >>> quantizer.fake_quant(x, 0.25, 1.0, signed=True)
      Array([-1.  ,  0.  ,  0.25,  1.  ], dtype=float32)
      >>> int(quantizer.bitwidth(0.25, 1.0, signed=True))
      4
    """
    x = jnp.asarray(x, jnp.float32)
    d = jnp.asarray(d, jnp.float32)
    q_max = jnp.asarray(q_max, jnp.float32)
    return _fake_quant(x, d, q_max, signed, prune)


def exact_bitwidth(
    d: ArrayLike, q_max: ArrayLike, *, signed: bool, prune: bool = False
) -> jax.Array:
    """The integer bit-width (int32): ``bit_length(n)``, +1 (at least 2) when signed; 0 for
    a pruned channel (``n == 0``, only with ``prune``)."""
    n = levels(d, q_max, prune=prune)
    _, exponent = jnp.frexp(n)  # n = m * 2**e with m in [0.5, 1): e = bit_length
    bits = exponent.astype(jnp.int32) + (1 if signed else 0)
    return jnp.where(n == 0.0, 0, bits) if prune else bits


def bitwidth(d: ArrayLike, q_max: ArrayLike, *, signed: bool, prune: bool = False) -> jax.Array:
    """The bit-width as a float: exact value, straight-through gradient, floor-aware.

    The value is :func:`exact_bitwidth`. The gradient is that of ``log2(q_max / d + 1)``,
    except at the minimum bit-width (``n == 1``), where it is zero. With ``prune`` the
    minimum is a removed channel (``round(q_max / d_q) == 0``, the kept channel included),
    so the gradient still flows at ``n == 1``.
    """
    d = jnp.asarray(d, jnp.float32)
    q_max = jnp.asarray(q_max, jnp.float32)
    exact = exact_bitwidth(d, q_max, signed=signed, prune=prune).astype(jnp.float32)
    # The floor sits below the step clip, so the gradient still flows at d = 2**LOG2_D_MIN.
    relaxed = jnp.log2(q_max / jnp.maximum(d, 2.0 ** (LOG2_D_MIN - 8)) + 1.0)
    at_floor = _raw_levels(d, q_max) <= 0.0 if prune else levels(d, q_max) <= 1.0
    relaxed = jnp.where(at_floor, jax.lax.stop_gradient(relaxed), relaxed)
    return _straight_through(relaxed, exact)


def min_bitwidth(*, signed: bool) -> int:
    """The smallest bit-width a quantizer can have: 2 signed, 1 unsigned."""
    return 2 if signed else 1


def init_at_bits(q_max: ArrayLike, bits: int, *, signed: bool) -> tuple[jax.Array, jax.Array]:
    """Latent ``(d, q_max)`` that give exactly ``bits`` bits after power-of-two rounding.

    ``d = 2 ** ceil(log2(q_max / (2**(bits-1) - 1)))`` when signed, ``2**bits - 1`` levels
    when unsigned (docs/method.md section 1). Then ``n = round(q_max / d)`` lies in
    ``[top / 2, top]``, which rounds (halves to even) to a ``bits``-bit count. A
    non-positive ``q_max`` (an all-zero tensor) is replaced by the smallest step. The
    returned range is ``n * d``, the given one rounded to the centre of its level.
    """
    if bits < min_bitwidth(signed=signed):
        raise ValueError(f"bits must be >= {min_bitwidth(signed=signed)}, got {bits}")
    top = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    q_max = jnp.maximum(jnp.asarray(q_max, jnp.float32), 2.0**LOG2_D_MIN * top)
    # log2 is inexact in float32: start from its ceil, then step to the smallest exponent
    # whose level count fits (the formula's exponent, computed exactly).
    exponent = jnp.ceil(jnp.log2(q_max / top))
    fits = lambda e: jnp.round(q_max / _exact_power_of_two(e)) <= top  # noqa: E731
    exponent = jnp.where(fits(exponent - 1), exponent - 1, exponent)
    exponent = jnp.where(fits(exponent), exponent, exponent + 1)
    d = _exact_power_of_two(exponent)
    # Store the range at the centre of its rounding interval, n * d, so that a few ulps
    # (e.g. through the stored log2) never move n across a half-integer.
    q_max = jnp.maximum(jnp.round(q_max / d), 1.0) * d
    return d, q_max


#: How many power-of-two steps :func:`least_squares_latents` tries, the coarsest first: from
#: the one whose top level covers ``max|x|`` down to 2**-(N - 1) of it.
LEAST_SQUARES_STEPS = 12


def least_squares_latents(
    x: ArrayLike, bits: ArrayLike, *, signed: bool, per_channel: bool = False
) -> jax.Array:
    """The leaf at exactly ``bits`` bits whose range has the least squared error on ``x``.

    The level count is the top of ``bits`` bits (``2**(bits-1) - 1`` signed, ``2**bits - 1``
    unsigned), so the bit-width is exactly ``bits``; the power-of-two step is the one of
    :data:`LEAST_SQUARES_STEPS` candidates (from the step whose top level covers ``max|x|``
    down, halving) with the least ``sum((fake_quant(x) - x)**2)``, ties to the coarsest.
    At ``max|x|`` a 2-bit weight quantizer (levels ``-max|W|, 0, max|W|``) rounds most
    weights to zero; the least-squares step keeps them (docs/method.md section 10).

    Args:
      x: the tensor (a kernel, or a batch of a layer's inputs).
      bits: the bit-width to keep, an int or (per channel) an int array over ``x``'s last
        axis; at least :func:`min_bitwidth`.
      signed: the quantizer's signedness (unsigned: codes ``[0, top]``).
      per_channel: one step per channel of ``x``'s last axis: a ``(channels, 2)`` leaf.

    Returns:
      ``[log2 d, log2 q_max]`` with ``q_max = top * d``: shape ``(2,)``, or
      ``(channels, 2)`` when ``per_channel``.
    """
    x = jnp.asarray(x, jnp.float32)
    axes = tuple(range(x.ndim - 1)) if per_channel else tuple(range(x.ndim))
    # Everything below keeps x's rank (one entry per channel on its last axis, or one in
    # all), so that it broadcasts against x without rank promotion.
    shape = (1,) * (x.ndim - 1) + (-1,) if per_channel else (1,) * x.ndim
    bits = jnp.reshape(jnp.asarray(bits, jnp.int32), shape)
    top = jnp.where(
        signed,
        _exact_power_of_two(bits - 1) - 1.0,
        _exact_power_of_two(bits) - 1.0,
    )
    top = jnp.maximum(top, 1.0)
    largest = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    largest = jnp.maximum(largest, 2.0**LOG2_D_MIN * top)
    # One step above the covering one too: float log2 may be one off.
    coarsest = jnp.ceil(jnp.log2(largest / top)) + 1.0
    lowest = -top if signed else jnp.zeros_like(top)

    def candidate(k):
        exponent = jnp.clip(coarsest - k, LOG2_D_MIN, LOG2_D_MAX)
        d = _exact_power_of_two(exponent)
        quantized = d * jnp.clip(jnp.round(_over_step(x, d)), lowest, top)
        return jnp.sum(jnp.square(quantized - x), axis=axes, keepdims=True), exponent

    def keep_better(k, best):
        error, exponent = candidate(k)
        better = error < best[0]
        return jnp.where(better, error, best[0]), jnp.where(better, exponent, best[1])

    # A loop, not unrolled: the step's compile time stays that of one candidate.
    _, best_exponent = jax.lax.fori_loop(1, LEAST_SQUARES_STEPS + 1, keep_better, candidate(0))
    d = _exact_power_of_two(best_exponent)
    leaf = latents(d, top * d)  # x's rank, then the (2,) axis
    return jnp.reshape(leaf, (-1, 2) if per_channel else (2,))


# A quantizer lives in a parameter tree as one leaf of shape (2,): [log2 d, log2 q_max]
# (a per-channel weight quantizer: shape (channels, 2), one row per output channel).
# Storing logarithms keeps both positive and makes one learning rate mean the same relative
# step for every quantizer (an image input has d = 2**-8, a weight range may be 12).
QUANTIZER_SUFFIX = "_quantizer"
# A layer whose input signedness is decided by its data stores the decision as a float32
# scalar leaf under this name (+1.0 signed, -1.0 unsigned, read by its sign); it is not a
# quantizer leaf. Nothing differentiates it, and multiplicative weight decay never changes
# a sign, so an optimizer that gets it with the weights cannot flip the decision.
INPUT_SIGNED = "input_signed"
# Sign of a cost-raising update of each latent: decreasing d, or increasing q_max, can add
# bits; the opposite never can.
COST_RAISING_SIGN = (-1.0, 1.0)


def signedness_leaf(signed: ArrayLike) -> jax.Array:
    """The stored :data:`INPUT_SIGNED` leaf of a decision: +1.0 signed, -1.0 unsigned."""
    return jnp.where(jnp.asarray(signed, bool), 1.0, -1.0).astype(jnp.float32)


def is_signed_leaf(leaf: ArrayLike) -> jax.Array:
    """The decision stored in an :data:`INPUT_SIGNED` leaf (a traced boolean)."""
    return jax.lax.stop_gradient(jnp.asarray(leaf, jnp.float32)) > 0


def latents(d: ArrayLike, q_max: ArrayLike) -> jax.Array:
    """The stored leaf ``[log2 d, log2 q_max]``."""
    return jnp.stack(
        [jnp.log2(jnp.asarray(d, jnp.float32)), jnp.log2(jnp.asarray(q_max, jnp.float32))],
        axis=-1,
    )


def from_latents(theta: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """``(d, q_max)`` from a stored leaf ``[log2 d, log2 q_max]``."""
    theta = jnp.asarray(theta, jnp.float32)
    return jnp.exp2(theta[..., 0]), jnp.exp2(theta[..., 1])


def top_level(bits: int, *, signed) -> jax.Array:
    """The largest level count ``n`` with ``bits`` bits (``signed`` may be traced)."""
    return jnp.where(signed, 2 ** (bits - 1) - 1, 2**bits - 1).astype(jnp.float32)


def pin_bits(theta: ArrayLike, bits: int, *, signed) -> jax.Array:
    """The leaf pinned at ``bits`` bits: ``q_max = n * d_q`` with ``n`` that bit-width's top.

    The step still learns, with the total (LSQ) derivative of a fixed-``n`` quantizer, as
    in :func:`tie_range`; the gradient w.r.t. ``log2 q_max`` is zero, and so is that of the
    bit-width: a pinned quantizer costs exactly ``bits`` and the constraint cannot move it.
    """
    theta = jnp.asarray(theta, jnp.float32)
    d_q = power_of_two_step(jnp.exp2(theta[..., 0]))
    return theta.at[..., 1].set(jnp.log2(top_level(bits, signed=signed) * d_q))


def is_quantizer_path(path) -> bool:
    """Whether a ``jax.tree_util`` key path names a quantizer leaf (``*_quantizer``)."""
    last = path[-1] if path else None
    name = getattr(last, "key", getattr(last, "name", last))
    return isinstance(name, str) and name.endswith(QUANTIZER_SUFFIX)


def tie_range(theta: ArrayLike) -> jax.Array:
    """The leaf with its range tied to its step: ``q_max = n * d_q``, ``n`` held fixed.

    The forward value is that of ``theta`` when its range already sits at ``n * d_q`` (as
    :func:`cgmq_jax.optimizers.fixed_bitwidths` keeps it); the gradient differs. Through
    the tie, the gradient w.r.t. ``log2 d`` is the *total* derivative of a fixed-``n``
    quantizer (LSQ's): ``round(x / d) - x / d`` inside the range and ``n`` (``-n``)
    above (below) it, instead of DQ's partial derivative with ``q_max`` held, which is
    about zero outside the range once ``q_max == n * d_q``. The gradient w.r.t.
    ``log2 q_max`` is zero. Fixed-bit QAT evaluates its loss at the tied leaves.
    """
    theta = jnp.asarray(theta, jnp.float32)
    d, q_max = from_latents(theta)
    n = levels(d, q_max)  # no gradient: the bit-width is fixed
    return theta.at[..., 1].set(jnp.log2(n * power_of_two_step(d)))


def tie_ranges(params):
    """:func:`tie_range` applied to every quantizer leaf of a parameter tree."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: tie_range(leaf) if is_quantizer_path(path) else leaf, params
    )


def param_labels(params):
    """``"quantizer"`` or ``"weight"`` for every leaf: a label function for ``optax.partition``.

    Works on linen parameter dicts and on ``flax.nnx.State`` (pure, or holding
    ``nnx.Variable`` s: a variable is labelled by its own name, and its label keeps the
    variable's structure, so the labels tree matches the state's).
    """
    return _map_variables_with_path(
        lambda path, _: "quantizer" if is_quantizer_path(path) else "weight", params
    )


def is_quantizer(params):
    """Tree of bools, ``True`` at quantizer leaves: :func:`param_labels` ``== "quantizer"``.

    The same structure as ``params`` (a linen parameter dict or a ``flax.nnx.State``); the
    default ``is_quantizer`` of :func:`cgmq_jax.constraint.constrained_update`.
    """
    return jax.tree.map(lambda label: label == "quantizer", param_labels(params))


def _map_variables_with_path(fn, tree):
    """``tree_map_with_path(fn, tree)`` that sees an ``nnx.Variable`` as one leaf.

    A variable's array sits one key below it (``.value``), so ``fn`` gets the path to the
    variable itself; its result is put back inside a copy of the variable, keeping the
    structure of ``tree``.
    """
    from flax import nnx  # here, not at the top: most users of this module never need it

    def visit(path, leaf):
        if isinstance(leaf, nnx.Variable):
            return jax.tree.map(lambda value: fn(path, value), leaf)
        return fn(path, leaf)

    is_variable = lambda node: isinstance(node, nnx.Variable)  # noqa: E731
    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_variable)


#: Where a pruned channel's range sits, in log2 units below its step: ``q_max = d_q / 4``,
#: so ``round(q_max / d_q) == 0``, half a level away from coming back (``q_max >= d_q / 2``).
PRUNED_RANGE_LOG2 = -2.0


def at_min_bitwidth(theta: ArrayLike, *, prune: bool = False) -> jax.Array:
    """The leaf at its minimum bit-width, same step: ``q_max = d_q``, so ``n = 1``.

    A leaf ``[log2 d, log2 q_max]`` of shape ``(2,)``, or ``(..., 2)`` (one row per channel).
    The bit-width is then :func:`min_bitwidth` whatever the step, so a network's cost at
    these leaves is its minimum cost. With ``prune`` every channel is removed
    (``q_max = d_q / 4``) but the first, which :func:`levels` keeps at ``n = 1``.
    """
    theta = jnp.asarray(theta, jnp.float32)
    d_q = jax.lax.stop_gradient(power_of_two_step(jnp.exp2(theta[..., 0])))
    return theta.at[..., 1].set(jnp.log2(d_q) + (PRUNED_RANGE_LOG2 if prune else 0.0))


def at_min_bitwidths(params):
    """:func:`at_min_bitwidth` applied to every quantizer leaf of a parameter tree."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: at_min_bitwidth(leaf) if is_quantizer_path(path) else leaf, params
    )


def step_rise_to_lose_a_bit(theta: ArrayLike) -> jax.Array:
    """How far ``log2 d`` must rise, ``q_max`` held, before the bit-width loses a bit.

    The bit-width changes only where ``d_q = 2 ** round(log2 d)`` does, at half-integers of
    ``log2 d``. Past the next one ``d_q`` doubles and ``n`` about halves, which loses a bit
    unless ``n`` rounds up (3 -> 2, 7 -> 4); past the one after, ``n`` falls to a quarter,
    which always does. The distance is to that boundary (the value there still rounds
    halves to even, so the bit is lost only *past* it); ``inf`` at the minimum bit-width
    (``n == 1``) or where the step cannot grow (:data:`LOG2_D_MAX`). Elementwise over
    leaves of shape ``(..., 2)``.
    """
    theta = jnp.asarray(theta, jnp.float32)
    d, q_max = from_latents(theta)
    # d_q is a power of two: frexp gives its exponent exactly (log2 need not).
    _, exponent = jnp.frexp(jax.lax.stop_gradient(power_of_two_step(d)))
    exponent = exponent.astype(jnp.float32) - 1.0
    # The sign does not matter here: a signed bit-width is the unsigned one plus 1.
    bits = exact_bitwidth(d, q_max, signed=False)
    distance = jnp.full(jnp.shape(exponent), jnp.inf, jnp.float32)
    for doublings in (2.0, 1.0):  # the nearer boundary wins where it loses a bit
        grown = exponent + doublings
        fewer = exact_bitwidth(_exact_power_of_two(grown), q_max, signed=False) < bits
        fewer &= grown <= LOG2_D_MAX
        distance = jnp.where(fewer, grown - 0.5 - theta[..., 0], distance)
    return distance
