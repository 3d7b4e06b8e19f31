"""Quantized Flax (linen) layers: thin shells over :mod:`cgmq_jax.quantizer`.

Each layer quantizes its own input and its own kernel, then multiplies; the bias is added
at full precision and the output is not quantized (the next layer quantizes its input).
With ``quantize=False`` the same layer is a plain float layer without quantizer
parameters, so float and quantized models share one definition.

The layers take ``flax.linen.Dense`` / ``flax.linen.Conv``'s fields (they subclass them),
then the quantizer options as keyword-only fields.

Parameters of a quantized layer: ``kernel``, ``bias`` and two quantizer leaves,
``input_quantizer`` and ``weight_quantizer``, each ``[log2 d, log2 q_max]``
(:func:`cgmq_jax.quantizer.latents`). :func:`cgmq_jax.quantizer.param_labels` separates
them from the weights for ``optax.partition``. A layer whose input signedness is decided
by the data (``input_signed=None``) also has the leaf ``input_signed`` (+1.0 signed, -1.0
unsigned): a data-dependent decision cannot be a static Python value under ``jax.jit``, so
it travels with the parameters (checkpoints, export, :func:`cgmq_jax.cost.layer_specs`).
Nothing differentiates it (it only selects), so optimizers leave it as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding
from jax.ad_checkpoint import checkpoint_name

from cgmq_jax import quantizer

CALIBRATION = "calibration"
DEFAULT_PERCENTILE = 99.99


def _initial_quantizer(q_max: jax.Array, *, signed, bits: int = 8) -> jax.Array:
    """A quantizer leaf at exactly ``bits`` bits; ``signed`` may be a traced boolean."""
    if isinstance(signed, bool):
        return quantizer.latents(*quantizer.init_at_bits(q_max, bits, signed=signed))
    return jnp.where(
        signed,
        _initial_quantizer(q_max, signed=True, bits=bits),
        _initial_quantizer(q_max, signed=False, bits=bits),
    )


def quantize_tensor(theta: jax.Array, x: jax.Array, *, signed) -> jax.Array:
    """Fake-quantize ``x`` with the leaf ``theta = [log2 d, log2 q_max]``.

    ``signed`` is a Python bool, or a traced boolean (a data-decided input signedness):
    then both fake-quants are computed and the decided one is kept. A per-channel leaf
    ``(C, 2)`` quantizes the last axis of ``x`` channel by channel.
    """
    d, q_max = quantizer.from_latents(theta)
    if jnp.ndim(d):  # per channel: align with the last axis explicitly
        shape = (1,) * (jnp.ndim(x) - 1) + (-1,)
        d, q_max = jnp.reshape(d, shape), jnp.reshape(q_max, shape)
    if isinstance(signed, bool):
        return quantizer.fake_quant(x, d, q_max, signed=signed)
    return jnp.where(
        signed,
        quantizer.fake_quant(x, d, q_max, signed=True),
        quantizer.fake_quant(x, d, q_max, signed=False),
    )


def _input_range(x: jax.Array, *, signed, percentile: float) -> jax.Array:
    values = jnp.where(signed, jnp.abs(x), jnp.maximum(x, 0.0))
    return jnp.percentile(values, percentile)


def _unsigned_error(path: str) -> ValueError:
    return ValueError(
        f"layer {path!r} has input_signed=False but its calibration inputs have negative "
        "values, which an unsigned quantizer would clip to 0; set input_signed=None (decided "
        "by the data) or input_signed=True on that layer"
    )


def _check_unsigned(x: jax.Array, path: str) -> None:
    """Raise :func:`_unsigned_error` if ``x`` has a negative value (at run time under jit)."""
    negative = jnp.any(x < 0)
    try:
        if bool(negative):
            raise _unsigned_error(path)
        return
    except jax.errors.ConcretizationTypeError:  # traced: check when the computation runs
        pass

    def check(negative):
        if negative:
            raise _unsigned_error(path)

    jax.debug.callback(check, negative)


def decided_signedness(x: jax.Array) -> jax.Array:
    """The data's decision for ``input_signed=None``: signed iff any value is negative."""
    return jnp.any(x < 0)


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """How one layer is quantized (the keyword-only fields of :class:`QuantDense`).

    Attributes:
      quantize: quantize the input and the kernel (``False``: a float layer, no quantizer
        leaves).
      input_signed: ``True`` / ``False`` for a signed / unsigned input quantizer; ``None``
        decides from the data at initialisation and calibration: signed iff an input value
        is negative (the decision is stored in the leaf ``input_signed``). ``False`` with
        negative calibration inputs raises a ``ValueError`` naming the layer.
      calibration_percentile: the percentile of ``|x|`` (signed) or ``max(x, 0)``
        (unsigned) that sets the input quantizer's initial range.
      per_channel: one weight quantizer (step and range) per output channel: the
        ``weight_quantizer`` leaf has shape ``(features, 2)`` and the cost counts each
        channel's MACs at its own bit-width.
      input_bits: pin the input quantizer at this many bits (its step still learns, its
        range follows the step; the cost counts it at exactly this); ``None`` learns it.
      weight_bits: the same for the weight quantizer(s).
    """

    quantize: bool = True
    input_signed: bool | None = None
    calibration_percentile: float = DEFAULT_PERCENTILE
    per_channel: bool = False
    input_bits: int | None = None
    weight_bits: int | None = None

    def __post_init__(self):
        for name, signed in (("input_bits", self.input_signed), ("weight_bits", True)):
            bits = getattr(self, name)
            if bits is None:
                continue
            floor = quantizer.min_bitwidth(signed=bool(signed))
            if isinstance(bits, bool) or not isinstance(bits, int) or not floor <= bits <= 16:
                raise ValueError(f"{name} must be an int in [{floor}, 16] or None, got {bits!r}")
        if self.input_signed not in (None, True, False):
            raise ValueError(f"input_signed must be True, False or None, got {self.input_signed!r}")


def options_of(module) -> QuantOptions:
    """The :class:`QuantOptions` of a :class:`QuantDense` / :class:`QuantConv`."""
    return QuantOptions(
        **{f.name: getattr(module, f.name) for f in dataclasses.fields(QuantOptions)}
    )


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """What one quantized-or-float layer call reports to :func:`record_layers`."""

    path: tuple[str, ...]
    options: QuantOptions
    input_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    module: nn.Module
    batched: bool = False  # computed inside jax.vmap / nn.vmap: the shapes lack an axis
    quantized_input: jax.Array | None = None  # Q(x) as computed (the export compares codes)


_RECORDERS: list[list[LayerRecord]] = []
_MARKING: list[list[LayerRecord]] = []


@contextlib.contextmanager
def record_layers(*, mark: bool = False):
    """Collect a :class:`LayerRecord` for every layer computed by :func:`dense_forward` /
    :func:`conv_forward` while the context is open (used by :func:`cgmq_jax.graph.trace`).

    With ``mark``, each layer also marks its input and output with the identities
    ``checkpoint_name(x, "cgmq:in:<i>")`` / ``"cgmq:out:<i>"`` (``i`` its record's index),
    so that the layer can be found in a jaxpr traced while the context is open.
    """
    found: list[LayerRecord] = []
    _RECORDERS.append(found)
    if mark:
        _MARKING.append(found)
    try:
        yield found
    finally:
        _RECORDERS.remove(found)
        if mark:
            _MARKING.remove(found)


def _mark(x: jax.Array, end: str) -> jax.Array:
    """``x``, named for :func:`cgmq_jax.graph.trace` when a marking record is open."""
    if not _MARKING:
        return x
    return checkpoint_name(x, f"cgmq:{end}:{len(_MARKING[-1])}")


def _report(module, options, x, kernel, y, quantized_input=None) -> None:
    for found in _RECORDERS:
        found.append(
            LayerRecord(
                tuple(module.path),
                options,
                tuple(jnp.shape(x)),
                tuple(jnp.shape(kernel)),
                tuple(jnp.shape(y)),
                module,
                _is_batched(y),
                quantized_input if options.quantize else None,
            )
        )


def _is_batched(x) -> bool:
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
    decide = (lambda _: True) if _is_batched(x) else decided_signedness
    stored = module.param(quantizer.INPUT_SIGNED, lambda _: quantizer.signedness_leaf(decide(x)))
    return quantizer.is_signed_leaf(stored)


def _weight_range(kernel: jax.Array, per_channel: bool) -> jax.Array:
    """``max|W|``, per output channel (the last axis) when ``per_channel``."""
    axes = tuple(range(kernel.ndim - 1)) if per_channel else None
    return jnp.max(jnp.abs(jnp.asarray(kernel, jnp.float32)), axis=axes)


def _observe_inputs(module, options: QuantOptions, x: jax.Array) -> None:
    """Checks and calibration facts of the layer's input, when parameters are being made.

    The facts are sown into the ``calibration`` collection by :func:`init_quantizers`'s
    float pass (``apply(..., mutable=["calibration"])``), not by ``init``.
    """
    observing = module.is_mutable_collection(CALIBRATION) and not module.is_initializing()
    if options.input_signed is False and (observing or module.is_initializing()):
        _check_unsigned(x, "/".join(module.path))
    if observing:
        signed = options.input_signed
        signed = decided_signedness(x) if signed is None else bool(signed)
        observed = _input_range(x, signed=signed, percentile=options.calibration_percentile)
        keep_last = lambda _, new: new  # noqa: E731
        module.sow(CALIBRATION, "input_range", observed, reduce_fn=keep_last)
        module.sow(CALIBRATION, "input_signed", signed, reduce_fn=keep_last)


def effective_quantizer(theta: jax.Array, bits: int | None, *, signed) -> jax.Array:
    """The leaf the forward pass and the cost use: ``theta``, or pinned at ``bits``."""
    return theta if bits is None else quantizer.pin_bits(theta, bits, signed=signed)


def _quantized_operands(module, options: QuantOptions, inputs: jax.Array, kernel: jax.Array):
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
        if _is_batched(x):  # per-example data under vmap: a unit range until calibrated
            return jnp.float32(1.0)
        return _input_range(x, signed=signed, percentile=options.calibration_percentile)

    input_theta = module.param(
        "input_quantizer",
        lambda _: _initial_quantizer(
            initial_input_range(), signed=signed, bits=options.input_bits or 8
        ),
    )
    weight_theta = module.param(
        "weight_quantizer",
        lambda _: _initial_quantizer(
            _weight_range(kernel, options.per_channel), signed=True, bits=options.weight_bits or 8
        ),
    )
    input_theta = effective_quantizer(input_theta, options.input_bits, signed=signed)
    weight_theta = effective_quantizer(weight_theta, options.weight_bits, signed=True)
    return (
        quantize_tensor(input_theta, x, signed=signed),
        quantize_tensor(weight_theta, kernel, signed=True),
    )


def dense_forward(module: nn.Dense, options: QuantOptions, inputs: jax.Array) -> jax.Array:
    """``flax.linen.Dense.__call__`` with the operands quantized as ``options`` say.

    ``module`` is any bound ``nn.Dense`` (a :class:`QuantDense`, or a plain one intercepted
    by :func:`cgmq_jax.rules.quantize_model`): its fields and its scope are used, so the
    parameter names and initial values are those of ``flax.linen.Dense``.
    """
    inputs = _mark(inputs, "in")
    kernel = module.param(
        "kernel", module.kernel_init, (jnp.shape(inputs)[-1], module.features), module.param_dtype
    )
    x, kernel = _quantized_operands(module, options, inputs, kernel)
    quantized_input = x
    bias = (
        module.param("bias", module.bias_init, (module.features,), module.param_dtype)
        if module.use_bias
        else None
    )
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    dot_general = (
        module.dot_general_cls()
        if module.dot_general_cls is not None
        else module.dot_general or jax.lax.dot_general
    )
    y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    y = _mark(y, "out")
    _report(module, options, inputs, kernel, y, quantized_input)
    return y


def conv_forward(module: nn.Conv, options: QuantOptions, inputs: jax.Array) -> jax.Array:
    """``flax.linen.Conv.__call__`` with the operands quantized as ``options`` say.

    As :func:`dense_forward`, for any bound ``nn.Conv``. The input is quantized before any
    padding (padded zeros are the code 0).
    """
    inputs = _mark(inputs, "in")
    geometry = conv_geometry(module)
    kernel_size = geometry["kernel_size"]
    # Flax's batch handling: any number of leading batch axes, or none.
    batch_shape = inputs.shape[: inputs.ndim - (len(kernel_size) + 1)]
    if len(batch_shape) != 1:
        inputs = jnp.reshape(inputs, (-1, *inputs.shape[len(batch_shape) :]))
    in_features = jnp.shape(inputs)[-1]
    if in_features % module.feature_group_count:
        raise ValueError(
            f"{in_features} input channels are not divisible by "
            f"feature_group_count={module.feature_group_count}"
        )
    kernel_shape = (*kernel_size, in_features // module.feature_group_count, module.features)
    if module.mask is not None and module.mask.shape != kernel_shape:
        raise ValueError(
            "Mask needs to have the same shape as weights. "
            f"Shapes are: {module.mask.shape}, {kernel_shape}"
        )
    kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
    if module.mask is not None:
        kernel = kernel * module.mask
    x, kernel = _quantized_operands(module, options, inputs, kernel)
    quantized_input = x
    bias = (
        module.param("bias", module.bias_init, (module.features,), module.param_dtype)
        if module.use_bias
        else None
    )
    if geometry["pre_padding"] is not None:
        pads = [(0, 0), *geometry["pre_padding"], (0, 0)]
        x = jnp.pad(x, pads, mode=geometry["pad_mode"])
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    if module.conv_general_dilated_cls is not None:
        conv = module.conv_general_dilated_cls()
    else:
        conv = module.conv_general_dilated or jax.lax.conv_general_dilated
    if options.quantize and conv is jax.lax.conv_general_dilated and _patches_pay(module, x):
        conv = patch_conv
    y = conv(
        x,
        kernel,
        geometry["strides"],
        geometry["padding"],
        lhs_dilation=geometry["input_dilation"],
        rhs_dilation=geometry["kernel_dilation"],
        dimension_numbers=_conv_dimension_numbers(x.shape),
        feature_group_count=module.feature_group_count,
        precision=module.precision,
    )
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    computed = y  # the record's shapes have the one batch axis the convolution used
    if len(batch_shape) != 1:
        y = jnp.reshape(y, (*batch_shape, *y.shape[1:]))
    y = _mark(y, "out")
    _report(module, options, inputs, kernel, computed, quantized_input)
    return y


class QuantDense(nn.Dense):
    """Dense layer ``y = Q(x) @ Q(W) + b``: :class:`flax.linen.Dense` with quantizers.

    The fields are those of ``flax.linen.Dense``, in its order and with its defaults, then
    the quantizer options as keyword-only fields. With ``quantize=False`` it computes
    exactly ``flax.linen.Dense`` with the same parameters.

    Attributes:
      features: the number of output features.
      quantize, input_signed, calibration_percentile, per_channel, input_bits,
        weight_bits: the quantizer options, keyword-only (:class:`QuantOptions`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from cgmq_jax.nn import QuantDense
      >>> layer = QuantDense(10)
      >>> x = jnp.linspace(-1.0, 1.0, 8)[None]
      >>> params = layer.init(jax.random.key(0), x)["params"]
      >>> sorted(params), params["kernel"].shape, bool(params["input_signed"])
      (['bias', 'input_quantizer', 'input_signed', 'kernel', 'weight_quantizer'], (8, 10), True)
      >>> layer.apply({"params": params}, x).shape
      (1, 10)
    """

    _: dataclasses.KW_ONLY
    quantize: bool = True
    input_signed: bool | None = None
    calibration_percentile: float = DEFAULT_PERCENTILE
    per_channel: bool = False
    input_bits: int | None = None
    weight_bits: int | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return dense_forward(self, options_of(self), inputs)


def _as_tuple(value: int | Sequence[int] | None, rank: int) -> tuple[int, ...]:
    """Flax's broadcast of an int (or ``None``, meaning 1) to one entry per spatial axis."""
    if value is None:
        value = 1
    return (value,) * rank if isinstance(value, int) else tuple(value)


def conv_geometry(module: nn.Conv) -> dict:
    """The static geometry of a convolution, by ``flax.linen.Conv``'s own rules.

    Returns ``kernel_size``, ``strides``, ``input_dilation``, ``kernel_dilation``, the
    ``pre_padding`` that ``jnp.pad`` applies first (``'CIRCULAR'``, ``'REFLECT'``,
    ``'CAUSAL'``; else ``None``) with its ``pad_mode``, and the ``padding`` passed to
    ``lax.conv_general_dilated`` (a string or ``(low, high)`` pairs).
    """
    kernel_size = _as_tuple(module.kernel_size, 1)
    rank = len(kernel_size)
    kernel_dilation = _as_tuple(module.kernel_dilation, rank)
    padding = canonicalize_padding(module.padding, rank)
    pre_padding, pad_mode = None, "constant"
    if padding in ("CIRCULAR", "REFLECT"):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
        pre_padding = [((k - 1) // 2, k // 2) for k in dilated]
        pad_mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
        padding = "VALID"
    elif padding == "CAUSAL":
        if rank != 1:
            raise ValueError("Causal padding is only implemented for 1D convolutions.")
        pre_padding = [(kernel_dilation[0] * (kernel_size[0] - 1), 0)]
        padding = "VALID"
    return {
        "kernel_size": kernel_size,
        "strides": _as_tuple(module.strides, rank),
        "input_dilation": _as_tuple(module.input_dilation, rank),
        "kernel_dilation": kernel_dilation,
        "pre_padding": pre_padding,
        "pad_mode": pad_mode,
        "padding": padding,
    }


#: A quantized convolution with at most this many input channels per group (no groups, or
#: depthwise ones; no input dilation) runs over its patches (:func:`patch_conv`). XLA:CPU's
#: direct convolution is slow for so few channels, and slower still for the input gradient
#: that learning the image quantizer needs (``benchmarks/train_step.py``: LeNet-5's QAT
#: step 1.59x faster; the DS-CNN's QAT step with depthwise patches 180 samples/s against
#: its float step's 98, where both had been about 230, in one loaded 2-round run).
#: Quantized operands are codes times powers of two, so both compute the same exact sums:
#: the forward pass does not change by a bit.
PATCH_CONV_MAX_CHANNELS = 1


def _patches_pay(module: nn.Conv, x: jax.Array) -> bool:
    groups, channels = module.feature_group_count, x.shape[-1]
    depthwise = groups == channels == module.features and groups > 1
    return (
        channels // groups <= PATCH_CONV_MAX_CHANNELS
        and (groups == 1 or depthwise)
        and all(d == 1 for d in _as_tuple(module.input_dilation, x.ndim - 2))
    )


def patch_conv(
    x,
    kernel,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
):
    """``jax.lax.conv_general_dilated`` for channels-last inputs and ``(*spatial, in, out)``
    kernels, computed as patches (one strided slice per kernel offset) times the kernel.

    Any strides, padding and kernel dilation; no input dilation. Groups only as a
    depthwise convolution with one output channel per input channel
    (``feature_group_count`` equal to both, a ``(*spatial, 1, C)`` kernel): then each
    patch is multiplied by its channel's kernel and summed over the window.
    (``dimension_numbers`` is assumed to be Flax's channels-last one.)

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.arange(2 * 6 * 6 * 1.0).reshape(2, 6, 6, 1)
      >>> k = jnp.ones((3, 3, 1, 4))
      >>> dn = ("NHWC", "HWIO", "NHWC")
      >>> ref = jax.lax.conv_general_dilated(x, k, (2, 1), "SAME", dimension_numbers=dn)
      >>> bool(jnp.all(patch_conv(x, k, (2, 1), "SAME") == ref))
      True
    """
    del dimension_numbers
    spatial = x.ndim - 2
    depthwise = feature_group_count != 1
    if depthwise and not (
        feature_group_count == x.shape[-1] == kernel.shape[-1] and kernel.shape[-2] == 1
    ):
        raise ValueError("patch_conv's only groups are depthwise, one output per channel")
    if any(d != 1 for d in _as_tuple(lhs_dilation, spatial)):
        raise ValueError("patch_conv has no input dilation")
    kernel_size = kernel.shape[:spatial]
    dilation = _as_tuple(rhs_dilation, spatial)
    strides = _as_tuple(window_strides, spatial)
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation, strict=True)]
        padding = jax.lax.padtype_to_pads(x.shape[1:-1], dilated, strides, padding)
    lows = [max(-low, 0) for low, _ in padding]  # negative padding crops
    highs = [max(-high, 0) for _, high in padding]
    x = jnp.pad(x, [(0, 0), *((max(lo, 0), max(hi, 0)) for lo, hi in padding), (0, 0)])
    crop = zip(lows, highs, x.shape[1:-1], strict=True)
    x = x[(slice(None), *(slice(lo, size - hi) for lo, hi, size in crop))]
    out = [
        (size - (k - 1) * d - 1) // s + 1
        for size, k, d, s in zip(x.shape[1:-1], kernel_size, dilation, strides, strict=True)
    ]
    columns = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(
            slice(o * d, o * d + (n - 1) * s + 1, s)
            for o, d, n, s in zip(offset, dilation, out, strides, strict=True)
        )
        columns.append(x[(slice(None), *window, slice(None))])
    if depthwise:  # (..., window, C) * (window, C), summed over the window
        taps = jnp.reshape(kernel, (*(1,) * (x.ndim - 1), -1, kernel.shape[-1]))
        return jnp.sum(jnp.stack(columns, axis=-2) * taps, axis=-2)
    patches = jnp.concatenate(columns, axis=-1)
    return jnp.dot(patches, jnp.reshape(kernel, (-1, kernel.shape[-1])), precision=precision)


def max_pool(x: jax.Array, window_shape: Sequence[int], strides=None, padding="VALID"):
    """``flax.linen.max_pool`` (channels last, one batch axis), with a cheaper gradient
    when the windows tile the input (``strides == window_shape``, ``'VALID'``).

    The forward pass is ``flax.linen.max_pool`` itself (the same ``reduce_window_max``, so
    the export reads it as before). Its gradient routes each output's gradient to the first
    maximum of its window, as JAX's ``select_and_scatter_add`` does, but by an argmax over
    the reshaped tiles: XLA:CPU computes that several times faster (``benchmarks/``).

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
      >>> bool(jnp.all(max_pool(x, (2, 2), (2, 2)) == nn.max_pool(x, (2, 2), (2, 2))))
      True
    """
    window = tuple(window_shape)
    strides = window if strides is None else tuple(strides)
    if strides != window or padding != "VALID" or x.ndim != len(window) + 2:
        return nn.max_pool(x, window, strides=strides, padding=padding)
    return _tiled_max_pool(x, window)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max_pool(x, window):
    return nn.max_pool(x, window, strides=window, padding="VALID")


def _tiled_max_pool_fwd(x, window):
    return _tiled_max_pool(x, window), x


def _tiled_max_pool_bwd(window, x, g):
    rank = len(window)
    out = [size // w for size, w in zip(x.shape[1:-1], window, strict=True)]
    cropped = x[(slice(None), *(slice(0, o * w) for o, w in zip(out, window, strict=True)))]
    split = [d for pair in zip(out, window, strict=True) for d in pair]
    tiles = jnp.reshape(cropped, (x.shape[0], *split, x.shape[-1]))
    # (batch, out..., channels, window...): each window's elements last, in row-major order
    order = (0, *range(1, 2 * rank, 2), 2 * rank + 1, *range(2, 2 * rank + 1, 2))
    tiles = jnp.transpose(tiles, order).reshape((x.shape[0], *out, x.shape[-1], -1))
    first = jax.nn.one_hot(jnp.argmax(tiles, axis=-1), tiles.shape[-1], dtype=g.dtype)
    routed = (first * g[..., None]).reshape((x.shape[0], *out, x.shape[-1], *window))
    inverse = tuple(int(i) for i in np.argsort(order))
    grad = jnp.transpose(routed, inverse).reshape(cropped.shape)
    pads = [
        (0, 0),
        *((0, size - o * w) for size, o, w in zip(x.shape[1:-1], out, window, strict=True)),
        (0, 0),
    ]
    return (jnp.pad(grad, pads),)


_tiled_max_pool.defvjp(_tiled_max_pool_fwd, _tiled_max_pool_bwd)


class QuantConv(nn.Conv):
    """Convolution ``y = conv(Q(x), Q(W)) + b``: :class:`flax.linen.Conv` with quantizers.

    The fields are those of ``flax.linen.Conv``, in its order and with its defaults (any
    number of spatial axes, channels last; int or sequence ``kernel_size`` and
    ``strides``; every padding form Flax accepts; ``input_dilation``, ``kernel_dilation``,
    ``feature_group_count``, ``mask``, ``dtype``, ``param_dtype``, ...), then the quantizer
    options as keyword-only fields, as in :class:`QuantDense`. With ``quantize=False`` it
    computes exactly ``flax.linen.Conv`` with the same parameters. The input is quantized
    before any padding (padded zeros are the code 0).

    Attributes:
      features: the number of output channels.
      kernel_size: the window, an int (1-D) or one int per spatial axis.
      quantize, ...: the quantizer options, keyword-only (:class:`QuantOptions`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from cgmq_jax.nn import QuantConv
      >>> layer = QuantConv(8, (3, 3), strides=2, padding=1)
      >>> x = jnp.ones((1, 28, 28, 1))
      >>> params = layer.init(jax.random.key(0), x)["params"]
      >>> params["kernel"].shape, layer.apply({"params": params}, x).shape
      ((3, 3, 1, 8), (1, 14, 14, 8))
    """

    _: dataclasses.KW_ONLY
    quantize: bool = True
    input_signed: bool | None = None
    calibration_percentile: float = DEFAULT_PERCENTILE
    per_channel: bool = False
    input_bits: int | None = None
    weight_bits: int | None = None

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return conv_forward(self, options_of(self), inputs)


def _conv_dimension_numbers(input_shape: Sequence[int]) -> jax.lax.ConvDimensionNumbers:
    """Channels last, kernel ``(*spatial, in, out)``: Flax's convention for any rank."""
    ndim = len(input_shape)
    lhs = (0, ndim - 1, *range(1, ndim - 1))
    rhs = (ndim - 1, ndim - 2, *range(ndim - 2))
    return jax.lax.ConvDimensionNumbers(lhs, rhs, lhs)


def init_quantizers(
    model: nn.Module,
    params,
    *args,
    input_bits: int = 8,
    weight_bits: int = 8,
    **kwargs,
):
    """Quantized parameters from float ones: every quantizer at an exact bit-width.

    Weight quantizers take their range from ``max|W|`` (per output channel where the layer
    is ``per_channel``); input quantizers from a high percentile of the layer's inputs in
    the float network on the calibration inputs. A layer with ``input_signed=None`` gets a
    signed input quantizer iff its calibration inputs have a negative value (stored in its
    ``input_signed`` leaf); one with ``input_signed=False`` and negative inputs raises a
    ``ValueError`` naming it (inside ``jax.jit``, when the compiled function runs). A
    quantizer pinned by the layer (``input_bits`` / ``weight_bits`` options) starts at its
    pinned bit-width.

    Args:
      model: a model with a ``quantized`` field (as in :mod:`cgmq_jax.models`, or made by
        :func:`cgmq_jax.rules.quantize_model`).
      params: its float parameters (``model.clone(quantized=False)``'s tree); any quantizer
        leaves already present are replaced.
      *args: the calibration inputs (a batch), as the model takes them.
      input_bits: the initial bit-width of every learned input quantizer.
      weight_bits: the initial bit-width of every learned weight quantizer.
      **kwargs: further call arguments of the model (e.g. ``train=False``).

    Returns:
      The parameter tree of ``model.clone(quantized=True)``.
    """
    float_model = model.clone(quantized=False)
    weights = strip_quantizers(params)
    _, state = float_model.apply({"params": weights}, *args, mutable=[CALIBRATION], **kwargs)
    observed = flax.traverse_util.flatten_dict(flax.core.unfreeze(state[CALIBRATION]))
    quantized = model.clone(quantized=True)
    with record_layers() as records:
        template = jax.eval_shape(lambda: quantized.init(jax.random.key(0), *args, **kwargs))[
            "params"
        ]
    options = {record.path: record.options for record in records}
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(template))
    weights_flat = flax.traverse_util.flatten_dict(weights)
    result = {}
    for path in flat:
        layer, name = path[:-1], path[-1]
        if name == "input_quantizer":
            input_range = observed[(*layer, "input_range")]
            signed = observed[(*layer, "input_signed")]  # a bool, or the data's decision
            bits = options[layer].input_bits or input_bits
            result[path] = _initial_quantizer(input_range, signed=signed, bits=bits)
        elif name == quantizer.INPUT_SIGNED:
            result[path] = quantizer.signedness_leaf(observed[(*layer, "input_signed")])
        elif name == "weight_quantizer":
            kernel = weights_flat[(*layer, "kernel")]
            result[path] = _initial_quantizer(
                _weight_range(kernel, options[layer].per_channel),
                signed=True,
                bits=options[layer].weight_bits or weight_bits,
            )
        else:
            result[path] = weights_flat[path]
    return flax.traverse_util.unflatten_dict(result)


def strip_quantizers(params):
    """The parameter tree without its quantizer leaves and signedness (the float model's)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    kept = {
        k: v
        for k, v in flat.items()
        if not (k[-1].endswith(quantizer.QUANTIZER_SUFFIX) or k[-1] == quantizer.INPUT_SIGNED)
    }
    return flax.traverse_util.unflatten_dict(kept)
