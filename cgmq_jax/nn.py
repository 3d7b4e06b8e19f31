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

Where the pieces live: the operand quantization the linen and NNX layers share is in
:mod:`cgmq_jax.operands`, the convolution geometry, patch convolution and pooling in
:mod:`cgmq_jax.conv`, the quantizers' calibration (``init_quantizers``, ``refit_ranges``,
``layer_inputs``, ``strip_quantizers``) in :mod:`cgmq_jax.calibration`; this module
re-exports their public names, so ``cgmq_jax.nn`` is still the one place to import the
layers' API from. The six quantizer options are declared once, as :class:`QuantOptions`'
fields: the layers' keyword-only fields and :class:`cgmq_jax.rules.QuantRule` derive
from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cgmq_jax import _deprecated, quantizer
from cgmq_jax.conv import (  # noqa: F401  (re-exported: cgmq_jax.nn is their public home)
    conv_dimension_numbers,
    conv_geometry,
    depthwise_conv,
    image_conv,
    max_pool,
    patch_conv,
)
from cgmq_jax.operands import (  # noqa: F401  (re-exported)
    CALIBRATION,
    decided_signedness,
    effective_quantizer,
    initial_quantizer,
    is_batched,
    masked_bias,
    quantize_tensor,
    quantized_operands,
    weight_range,
)

DEFAULT_PERCENTILE = 99.99


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
      prune: a per-channel weight quantizer may go to 0 bits, which removes that output
        channel (its kernel codes and its bias are 0, so its output is exactly 0, and the
        cost drops its MACs here and in the layers it feeds; docs/method.md section 12).
        Needs ``per_channel=True``, a learned ``weight_bits`` and no feature groups.
    """

    quantize: bool = True
    input_signed: bool | None = None
    calibration_percentile: float = DEFAULT_PERCENTILE
    per_channel: bool = False
    input_bits: int | None = None
    weight_bits: int | None = None
    prune: bool = False

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
        if self.prune and not (self.quantize and self.per_channel and self.weight_bits is None):
            raise ValueError(
                "prune=True removes output channels one by one, so it needs quantize=True, "
                "per_channel=True and a learned weight bit-width (weight_bits=None), got "
                f"quantize={self.quantize}, per_channel={self.per_channel}, "
                f"weight_bits={self.weight_bits}"
            )


def options_of(module) -> QuantOptions:
    """The :class:`QuantOptions` of a :class:`QuantDense` / :class:`QuantConv`."""
    return QuantOptions(
        **{f.name: getattr(module, f.name) for f in dataclasses.fields(QuantOptions)}
    )


def _option_fields() -> dict:
    """A class namespace declaring :class:`QuantOptions`' fields as keyword-only fields."""
    fields = dataclasses.fields(QuantOptions)
    namespace = {f.name: f.default for f in fields}
    namespace["__annotations__"] = {"_": dataclasses.KW_ONLY, **{f.name: f.type for f in fields}}
    return namespace


#: The quantizer options as keyword-only linen fields, made from :class:`QuantOptions`'
#: fields (so they are written once). A base put *before* ``nn.Dense`` / ``nn.Conv``: the
#: layers' fields are then Flax's, in its order, followed by the options.
LinenOptions = type(
    "LinenOptions",
    (nn.Module,),
    {
        "__module__": __name__,
        "__doc__": (
            "The keyword-only quantizer option fields of :class:`QuantDense` / "
            ":class:`QuantConv`, one per :class:`QuantOptions` field."
        ),
        **_option_fields(),
    },
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


def _report(module, options, x, kernel, y, quantized_input=None, path=None) -> None:
    """Append the layer's :class:`LayerRecord` to every open :func:`record_layers`.

    ``path`` is the layer's path where the module does not know it (an NNX layer).
    """
    for found in _RECORDERS:
        found.append(
            LayerRecord(
                tuple(module.path) if path is None else tuple(path),
                options,
                tuple(jnp.shape(x)),
                tuple(jnp.shape(kernel)),
                tuple(jnp.shape(y)),
                module,
                is_batched(y),
                quantized_input if options.quantize else None,
            )
        )


def dense_forward(
    module: nn.Dense, options: QuantOptions, inputs: jax.Array, *, use_bias: bool | None = None
) -> jax.Array:
    """``flax.linen.Dense.__call__`` with the operands quantized as ``options`` say.

    ``module`` is any bound ``nn.Dense`` (a :class:`QuantDense`, or a plain one intercepted
    by :func:`cgmq_jax.rules.quantize_model`): its fields and its scope are used, so the
    parameter names and initial values are those of ``flax.linen.Dense``. ``use_bias``
    overrides the module's (``True``: a layer a BatchNorm was folded into has a bias).
    """
    use_bias = module.use_bias if use_bias is None else use_bias
    inputs = _mark(inputs, "in")
    kernel = module.param(
        "kernel", module.kernel_init, (jnp.shape(inputs)[-1], module.features), module.param_dtype
    )
    x, kernel = quantized_operands(module, options, inputs, kernel)
    quantized_input = x
    bias = (
        module.param("bias", module.bias_init, (module.features,), module.param_dtype)
        if use_bias
        else None
    )
    bias = masked_bias(module, options, bias)
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


def conv_forward(
    module: nn.Conv, options: QuantOptions, inputs: jax.Array, *, use_bias: bool | None = None
) -> jax.Array:
    """``flax.linen.Conv.__call__`` with the operands quantized as ``options`` say.

    As :func:`dense_forward` (``use_bias`` too), for any bound ``nn.Conv``. The input is
    quantized before any padding (padded zeros are the code 0).
    """
    use_bias = module.use_bias if use_bias is None else use_bias
    inputs = _mark(inputs, "in")
    geometry = conv_geometry(module)
    kernel_size = geometry["kernel_size"]
    # Flax's batch handling: any number of leading batch axes, or none.
    batch_shape = inputs.shape[: inputs.ndim - (len(kernel_size) + 1)]
    if len(batch_shape) != 1:
        inputs = jnp.reshape(inputs, (-1, *inputs.shape[len(batch_shape) :]))
    kernel = _conv_kernel(module, kernel_size, jnp.shape(inputs)[-1])
    x, kernel = quantized_operands(module, options, inputs, kernel)
    quantized_input = x
    bias = (
        module.param("bias", module.bias_init, (module.features,), module.param_dtype)
        if use_bias
        else None
    )
    bias = masked_bias(module, options, bias)
    if options.prune and module.feature_group_count != 1:
        raise ValueError(
            f"layer {'/'.join(module.path)!r}: prune=True needs feature_group_count=1 (a "
            "grouped or depthwise convolution's channels follow its input's; prune the "
            "layer before it)"
        )
    if geometry["pre_padding"] is not None:
        pads = [(0, 0), *geometry["pre_padding"], (0, 0)]
        x = jnp.pad(x, pads, mode=geometry["pad_mode"])
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    y = convolution(module, options, x, geometry)(
        x,
        kernel,
        geometry["strides"],
        geometry["padding"],
        lhs_dilation=geometry["input_dilation"],
        rhs_dilation=geometry["kernel_dilation"],
        dimension_numbers=conv_dimension_numbers(x.shape),
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


def _conv_kernel(module: nn.Conv, kernel_size, in_features: int) -> jax.Array:
    """The layer's kernel parameter ``(*window, in / groups, out)``, masked, as Flax makes it."""
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
    return kernel if module.mask is None else kernel * module.mask


def convolution(module, options: QuantOptions, x: jax.Array, geometry: dict):
    """The layer's ``conv_general_dilated``: its own, else :func:`patch_conv` where it pays
    (quantized layers), or :func:`depthwise_conv` (a float32 depthwise layer: the same
    forward pass, a faster gradient).

    One rule for the linen and the NNX convolutions (``module`` is either), so that both
    compute, and differentiate, the same program.
    """
    # linen's fields; an NNX Conv has only ``conv_general_dilated`` (the same rule applies).
    if getattr(module, "conv_general_dilated_cls", None) is not None:
        return module.conv_general_dilated_cls()
    conv = getattr(module, "conv_general_dilated", None) or jax.lax.conv_general_dilated
    if conv is jax.lax.conv_general_dilated:
        if options.quantize and _patches_pay(module, x, geometry):
            return patch_conv
        if not options.quantize and _float_depthwise(module, x, geometry):
            return depthwise_conv
    return conv


#: A quantized convolution with at most this many input channels per group (no groups, or
#: depthwise ones; no input dilation) runs over its patches (:func:`patch_conv`). XLA:CPU's
#: direct convolution is slow for so few channels, and slower still for the input gradient
#: that learning the image quantizer needs (``benchmarks/train_step.py``: LeNet-5's QAT
#: step 1.59x faster; with the depthwise running sum of :func:`patch_conv` the DS-CNN's
#: QAT step ran at 600 samples/s against its float step's 323, which keeps XLA's
#: convolution, in one loaded 5-round run: docs/performance.md). One input channel into
#: few filters takes a banded matrix product there (``conv.BANDED_MAX_FILTERS``: LeNet-5's
#: cgmq step 1.36x as fast again).
#: Quantized operands are codes times powers of two, so both compute the same exact sums:
#: the forward pass does not change by a bit.
PATCH_CONV_MAX_CHANNELS = 1
#: A quantized 1x1 convolution without groups (a pointwise one, any number of channels) runs
#: as one matrix product, its only patch being the input (:func:`patch_conv`): XLA:CPU's
#: convolution took 2-4x as long forward and backward (the DS-CNN's pointwise layers;
#: docs/performance.md). Exact for the same reason as above.
PATCH_CONV_POINTWISE = True


def _depthwise(module: nn.Conv, x: jax.Array) -> bool:
    """Whether the convolution is a depthwise one: one output channel per input channel."""
    groups, channels = module.feature_group_count, x.shape[-1]
    features = getattr(module, "features", None) or module.out_features  # linen / NNX
    return groups == channels == features and groups > 1


def _patches_pay(module: nn.Conv, x: jax.Array, geometry: dict) -> bool:
    """Whether :func:`patch_conv` computes this convolution (see the constants above)."""
    groups, channels = module.feature_group_count, x.shape[-1]
    pointwise = groups == 1 and all(k == 1 for k in geometry["kernel_size"])
    few_channels = channels // groups <= PATCH_CONV_MAX_CHANNELS and (
        groups == 1 or _depthwise(module, x)
    )
    return (few_channels or (pointwise and PATCH_CONV_POINTWISE)) and all(
        d == 1 for d in geometry["input_dilation"]
    )


def _float_depthwise(module: nn.Conv, x: jax.Array, geometry: dict) -> bool:
    """Whether a float convolution is a float32 depthwise one without input dilation,
    which :func:`cgmq_jax.conv.depthwise_conv` computes: XLA's forward pass, bit for bit,
    and the running sum's backward pass (the float DS-CNN's train step 1.95x as fast,
    docs/performance.md). Other float layers keep the module's own convolution."""
    return (
        _depthwise(module, x)
        and x.dtype == jnp.float32
        and all(d == 1 for d in geometry["input_dilation"])
    )


class QuantDense(LinenOptions, nn.Dense):
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

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return dense_forward(self, options_of(self), inputs)


class QuantConv(LinenOptions, nn.Conv):
    """Convolution ``y = conv(Q(x), Q(W)) + b``: :class:`flax.linen.Conv` with quantizers.

    The fields are those of ``flax.linen.Conv``, in its order and with its defaults (any
    number of spatial axes, channels last; int or sequence ``kernel_size`` and
    ``strides``; every padding form Flax accepts; ``input_dilation``, ``kernel_dilation``,
    ``feature_group_count``, ``mask``, ``dtype``, ``param_dtype``, ...), then the quantizer
    options as keyword-only fields, as in :class:`QuantDense`. With ``quantize=False`` it
    computes exactly ``flax.linen.Conv`` with the same parameters (a float32 depthwise one
    differentiates with :func:`depthwise_conv`: the same gradients, summed in another
    order). The input is quantized before any padding (padded zeros are the code 0).

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

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return conv_forward(self, options_of(self), inputs)


def is_nnx_module(model) -> bool:
    """Whether ``model`` is a Flax NNX module (checked without importing ``flax.nnx``)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Module)


def is_conv(module) -> bool:
    """Whether ``module`` is a linen ``nn.Conv`` or an NNX ``nnx.Conv`` (or a subclass)."""
    nnx = sys.modules.get("flax.nnx")
    return isinstance(module, nn.Conv) or (nnx is not None and isinstance(module, nnx.Conv))


#: The calibration functions, moved to :mod:`cgmq_jax.calibration` and still importable from
#: here (lazily: that module imports this one).
_CALIBRATION = ("init_quantizers", "layer_inputs", "refit_ranges", "strip_quantizers")


__getattr__ = _deprecated.moved(
    __name__, dict.fromkeys(_CALIBRATION, "cgmq_jax.calibration"), warn=False
)


def __dir__():
    return sorted((*globals(), *_CALIBRATION))
