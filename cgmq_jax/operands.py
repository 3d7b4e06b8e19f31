"""What a quantized layer does to its operands, shared by the linen and NNX layers.

A layer quantizes its input and its kernel with one quantizer leaf each,
``[log2 d, log2 q_max]`` (:func:`cgmq_jax.quantizer.latents`): :func:`quantize_tensor`
fake-quantizes a tensor with a leaf, :func:`initial_quantizer` makes a leaf at an exact
bit-width from a range, :func:`input_range` / :func:`weight_range` give those ranges, and
:func:`decided_signedness` is the data's decision for ``input_signed=None``.
:func:`quantized_operands` is the whole step for a linen layer (observe the input, make
the leaves on first use, quantize); :mod:`cgmq_jax.nn` re-exports the public names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from cgmq_jax import quantizer

if TYPE_CHECKING:
    from cgmq_jax.nn import QuantOptions

#: The linen collection :func:`cgmq_jax.calibration.init_quantizers`'s float pass sows facts into.
CALIBRATION = "calibration"


def initial_quantizer(q_max: jax.Array, *, signed, bits: int = 8) -> jax.Array:
    """A quantizer leaf at exactly ``bits`` bits; ``signed`` may be a traced boolean."""
    if isinstance(signed, bool):
        return quantizer.latents(*quantizer.init_at_bits(q_max, bits, signed=signed))
    return jnp.where(
        signed,
        initial_quantizer(q_max, signed=True, bits=bits),
        initial_quantizer(q_max, signed=False, bits=bits),
    )


def quantize_tensor(theta: jax.Array, x: jax.Array, *, signed, prune: bool = False) -> jax.Array:
    """Fake-quantize ``x`` with the leaf ``theta = [log2 d, log2 q_max]``.

    ``signed`` is a Python bool, or a traced boolean (a data-decided input signedness):
    then both fake-quants are computed and the decided one is kept. A per-channel leaf
    ``(C, 2)`` quantizes the last axis of ``x`` channel by channel; with ``prune`` a channel
    may be removed (0 levels: all its values 0, :func:`cgmq_jax.quantizer.levels`).
    """
    d, q_max = quantizer.from_latents(theta)
    if jnp.ndim(d):  # per channel: align with the last axis explicitly
        shape = (1,) * (jnp.ndim(x) - 1) + (-1,)
        d, q_max = jnp.reshape(d, shape), jnp.reshape(q_max, shape)
    if isinstance(signed, bool):
        return quantizer.fake_quant(x, d, q_max, signed=signed, prune=prune)
    return jnp.where(
        signed,
        quantizer.fake_quant(x, d, q_max, signed=True),
        quantizer.fake_quant(x, d, q_max, signed=False),
    )


def input_range(x: jax.Array, *, signed, percentile: float) -> jax.Array:
    """The input quantizer's initial range: the ``percentile`` of ``|x|`` (signed) or of
    ``max(x, 0)`` (unsigned); ``signed`` may be a traced boolean."""
    values = jnp.where(signed, jnp.abs(x), jnp.maximum(x, 0.0))
    return jnp.percentile(values, percentile)


def unsigned_error(path: str) -> ValueError:
    """The error for a layer declared unsigned whose calibration inputs are negative."""
    return ValueError(
        f"layer {path!r} has input_signed=False but its calibration inputs have negative "
        "values, which an unsigned quantizer would clip to 0; set input_signed=None (decided "
        "by the data) or input_signed=True on that layer"
    )


def _check_unsigned(x: jax.Array, path: str) -> None:
    """Raise :func:`unsigned_error` if ``x`` has a negative value (at run time under jit)."""
    negative = jnp.any(x < 0)
    try:
        if bool(negative):
            raise unsigned_error(path)
        return
    except jax.errors.ConcretizationTypeError:  # traced: check when the computation runs
        pass

    def check(negative):
        if negative:
            raise unsigned_error(path)

    jax.debug.callback(check, negative)


def decided_signedness(x: jax.Array) -> jax.Array:
    """The data's decision for ``input_signed=None``: signed iff any value is negative."""
    return jnp.any(x < 0)


def is_batched(x) -> bool:
    """Whether ``x`` is traced by ``jax.vmap`` (so a per-example value, not the batch)."""
    return any(cls.__name__ == "BatchTracer" for cls in type(x).__mro__)


def _input_signedness(module, options: QuantOptions, x: jax.Array):
    """The signedness of the layer's input quantizer: a Python bool, or a traced one.

    An explicit ``input_signed`` is static. With ``None`` the decision is made by the data
    the layer sees when its parameters are created (or calibrated) and stored in the
    parameter leaf ``input_signed`` (+1.0 signed, -1.0 unsigned), because a decision that
    depends on data values cannot be a static Python value under ``jax.jit``.
    """
    if options.input_signed is not None:
        return bool(options.input_signed)
    # Under vmap (nn.vmap with shared parameters) a decision from per-example data would be
    # batched: decide signed (never clips) and let init_quantizers decide from a batch.
    decide = (lambda _: True) if is_batched(x) else decided_signedness
    stored = module.param(quantizer.INPUT_SIGNED, lambda _: quantizer.signedness_leaf(decide(x)))
    return quantizer.is_signed_leaf(stored)


def weight_range(kernel: jax.Array, per_channel: bool) -> jax.Array:
    """``max|W|``, per output channel (the last axis) when ``per_channel``."""
    axes = tuple(range(kernel.ndim - 1)) if per_channel else None
    return jnp.max(jnp.abs(jnp.asarray(kernel, jnp.float32)), axis=axes)


def _observe_inputs(module, options: QuantOptions, x: jax.Array) -> None:
    """Checks and calibration facts of the layer's input, when parameters are being made.

    The facts are sown into the ``calibration`` collection by
    :func:`cgmq_jax.calibration.init_quantizers`'s float pass
    (``apply(..., mutable=["calibration"])``), not by ``init``.
    """
    observing = module.is_mutable_collection(CALIBRATION) and not module.is_initializing()
    if options.input_signed is False and (observing or module.is_initializing()):
        _check_unsigned(x, "/".join(module.path))
    if observing:
        signed = options.input_signed
        signed = decided_signedness(x) if signed is None else bool(signed)
        observed = input_range(x, signed=signed, percentile=options.calibration_percentile)
        keep_last = lambda _, new: new  # noqa: E731
        module.sow(CALIBRATION, "input_range", observed, reduce_fn=keep_last)
        module.sow(CALIBRATION, "input_signed", signed, reduce_fn=keep_last)


def live_channels(theta: jax.Array) -> jax.Array:
    """1.0 for each output channel a prunable weight leaf ``(C, 2)`` keeps, 0.0 for each it
    removes (no gradient): a removed channel's bias is masked with it, so that the channel's
    output is exactly 0 (docs/method.md section 12)."""
    n = quantizer.levels(*quantizer.from_latents(theta), prune=True)
    return jax.lax.stop_gradient((n > 0).astype(jnp.float32))


def masked_bias(module, options: QuantOptions, bias: jax.Array | None) -> jax.Array | None:
    """``bias`` with the removed channels' entries 0 (a pruning layer), else as it is."""
    if bias is None or not (options.quantize and options.prune):
        return bias
    return bias * live_channels(module.get_variable("params", "weight_quantizer"))


def effective_quantizer(theta: jax.Array, bits: int | None, *, signed) -> jax.Array:
    """The leaf the forward pass and the cost use: ``theta``, or pinned at ``bits``."""
    return theta if bits is None else quantizer.pin_bits(theta, bits, signed=signed)


def quantized_operands(module, options: QuantOptions, inputs: jax.Array, kernel: jax.Array):
    """The layer's operands ``(Q(x), Q(kernel))``; ``(x, kernel)`` as given if not quantized.

    Observes the input first (checks, calibration facts); the quantizer leaves are made on
    first use, in float32, after the kernel (so that they do not shift its random init).
    """
    x = jnp.asarray(inputs, jnp.float32)
    _observe_inputs(module, options, x)
    if not options.quantize:
        return inputs, kernel
    signed = _input_signedness(module, options, x)
    kernel = jnp.asarray(kernel, jnp.float32)

    def initial_input_range():
        if is_batched(x):  # per-example data under vmap: a unit range until calibrated
            return jnp.float32(1.0)
        return input_range(x, signed=signed, percentile=options.calibration_percentile)

    input_theta = module.param(
        "input_quantizer",
        lambda _: initial_quantizer(
            initial_input_range(), signed=signed, bits=options.input_bits or 8
        ),
    )
    weight_theta = module.param(
        "weight_quantizer",
        lambda _: initial_quantizer(
            weight_range(kernel, options.per_channel), signed=True, bits=options.weight_bits or 8
        ),
    )
    input_theta = effective_quantizer(input_theta, options.input_bits, signed=signed)
    weight_theta = effective_quantizer(weight_theta, options.weight_bits, signed=True)
    return (
        quantize_tensor(input_theta, x, signed=signed),
        quantize_tensor(weight_theta, kernel, signed=True, prune=options.prune),
    )
