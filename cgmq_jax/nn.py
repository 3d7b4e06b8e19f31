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
:mod:`cgmq_jax.conv`; this module re-exports their public names, so ``cgmq_jax.nn`` is
still the one place to import the layers' API from. The six quantizer options are
declared once, as :class:`QuantOptions`' fields: the layers' keyword-only fields and
:class:`cgmq_jax.rules.QuantRule` derive from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cgmq_jax import quantizer
from cgmq_jax.conv import (  # noqa: F401  (re-exported: cgmq_jax.nn is their public home)
    conv_dimension_numbers,
    conv_geometry,
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
    """The layer's ``conv_general_dilated``: its own, else :func:`patch_conv` where it pays.

    One rule for the linen and the NNX convolutions (``module`` is either), so that both
    compute, and differentiate, the same program.
    """
    # linen's fields; an NNX Conv has only ``conv_general_dilated`` (the same rule applies).
    if getattr(module, "conv_general_dilated_cls", None) is not None:
        return module.conv_general_dilated_cls()
    conv = getattr(module, "conv_general_dilated", None) or jax.lax.conv_general_dilated
    if options.quantize and conv is jax.lax.conv_general_dilated:
        if _patches_pay(module, x, geometry):
            return patch_conv
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


def _patches_pay(module: nn.Conv, x: jax.Array, geometry: dict) -> bool:
    """Whether :func:`patch_conv` computes this convolution (see the constants above)."""
    groups, channels = module.feature_group_count, x.shape[-1]
    features = getattr(module, "features", None) or module.out_features  # linen / NNX
    depthwise = groups == channels == features and groups > 1
    pointwise = groups == 1 and all(k == 1 for k in geometry["kernel_size"])
    few_channels = channels // groups <= PATCH_CONV_MAX_CHANNELS and (groups == 1 or depthwise)
    return (few_channels or (pointwise and PATCH_CONV_POINTWISE)) and all(
        d == 1 for d in geometry["input_dilation"]
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

    For a Flax NNX module this is :func:`cgmq_jax.nnx.calibrate`: the module holds its own
    state, so every argument after ``model`` is a call argument (the calibration batch
    first), the quantizers are set in place, and ``None`` is returned.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from cgmq_jax import models, nn as qnn
      >>> model, x = models.MLP(), jnp.ones((2, 28, 28, 1))
      >>> float_params = model.clone(quantized=False).init(jax.random.key(0), x)["params"]
      >>> params = qnn.init_quantizers(model, float_params, x, weight_bits=4)
      >>> sorted(params["fc1"])
      ['bias', 'input_quantizer', 'kernel', 'weight_quantizer']
    """
    if is_nnx_module(model):
        from cgmq_jax import nnx as cnnx

        cnnx.calibrate(
            model, params, *args, input_bits=input_bits, weight_bits=weight_bits, **kwargs
        )
        return None
    return _init_linen_quantizers(model, params, args, kwargs, input_bits, weight_bits)


def _init_linen_quantizers(model, params, args, kwargs, input_bits, weight_bits):
    """:func:`init_quantizers` for a linen model."""
    model, weights = _float_weights(model, params, args, kwargs)
    observed = _observe_float(model, weights, args, kwargs)
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
        if name in ("input_quantizer", quantizer.INPUT_SIGNED):
            if (*layer, "input_range") not in observed:
                raise _not_observed_error(layer)
        if name == "input_quantizer":
            input_range = observed[(*layer, "input_range")]
            signed = observed[(*layer, "input_signed")]  # a bool, or the data's decision
            bits = options[layer].input_bits or input_bits
            result[path] = initial_quantizer(input_range, signed=signed, bits=bits)
        elif name == quantizer.INPUT_SIGNED:
            result[path] = quantizer.signedness_leaf(observed[(*layer, "input_signed")])
        elif name == "weight_quantizer":
            kernel = weights_flat[(*layer, "kernel")]
            result[path] = initial_quantizer(
                weight_range(kernel, options[layer].per_channel),
                signed=True,
                bits=options[layer].weight_bits or weight_bits,
            )
        else:
            result[path] = weights_flat[path]
    return flax.traverse_util.unflatten_dict(result)


def _is_float_variables(params) -> bool:
    """Whether ``params`` are a float network's variables with BatchNorm statistics."""
    return isinstance(params, Mapping) and "params" in params and "batch_stats" in params


def _float_weights(model, params, args: tuple, kwargs: dict):
    """``(model without BatchNorm, its float weights)``: float variables with
    ``batch_stats`` are folded first (:func:`cgmq_jax.models.fold_batchnorm`)."""
    if not _is_float_variables(params):
        return model, strip_quantizers(params)
    from cgmq_jax import models  # BatchNorm folding lives with the models (imported lazily)

    folded = models.fold_batchnorm(model.clone(quantized=False), params, *args, **kwargs)
    return models.folded(model), strip_quantizers(folded)


def _observe_float(model, weights, args: tuple, kwargs: dict) -> dict:
    """The calibration facts each layer sows in the float network's pass on ``args``."""
    float_model = model.clone(quantized=False)
    try:
        _, state = float_model.apply({"params": weights}, *args, mutable=[CALIBRATION], **kwargs)
    except flax.errors.ScopeCollectionNotFound as error:
        if "batch_stats" not in str(error):
            raise
        raise ValueError(
            f"{type(getattr(model, 'model', model)).__name__} has BatchNorm but "
            "init_quantizers got parameters "
            "without its statistics: pass the float network's variables "
            '{"params": ..., "batch_stats": ...} (what its init and float training give); '
            "each BatchNorm is then folded into the layer before it"
        ) from None
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(state.get(CALIBRATION, {})))


def _not_observed_error(layer: tuple) -> ValueError:
    """A layer whose input the float pass did not record: it runs inside a lifted transform."""
    return ValueError(
        f"layer {'/'.join(map(str, layer))!r} runs inside nn.scan (or another lifted "
        "transform, e.g. nn.vmap), whose repeated calls init_quantizers cannot calibrate: "
        "unroll nn.scan into a Python for loop over the blocks (one module per block)"
    )


def strip_quantizers(params):
    """The parameter tree without its quantizer leaves and signedness (the float model's)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    kept = {
        k: v
        for k, v in flat.items()
        if not (k[-1].endswith(quantizer.QUANTIZER_SUFFIX) or k[-1] == quantizer.INPUT_SIGNED)
    }
    return flax.traverse_util.unflatten_dict(kept)


def layer_inputs(model: nn.Module, params, *args, **kwargs) -> dict:
    """``{layer path: its input}``: what each quantized layer of ``model`` receives (before
    its input quantizer) when ``model`` is applied to ``args`` with ``params``."""
    found = {}

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, QuantDense | QuantConv):
            found[tuple(module.path)] = jnp.asarray(call_args[0], jnp.float32)
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        model.apply({"params": params}, *args, **kwargs)
    return found


def refit_ranges(
    model: nn.Module,
    params,
    *args,
    weights: bool = True,
    inputs: bool = True,
    layers=None,
    specs=None,
    **kwargs,
):
    """``params`` with every learned quantizer's range refitted at its present bit-width.

    Each learned quantizer (not pinned by ``input_bits`` / ``weight_bits``) of the layers
    ``layers`` (paths; ``None``: all) keeps its exact bit-width, so every cost is
    unchanged, and gets the power-of-two step, and the range ``top * d``, of least squared
    error (:func:`cgmq_jax.quantizer.least_squares_latents`): on its kernel (per channel
    for a per-channel layer), or on the layer's inputs in ``model`` applied to ``args``
    (a calibration batch; the inputs as the quantized network computes them).

    At ``max|W|`` or a high input percentile, a quantizer at 1-2 bits rounds most values
    to zero (docs/method.md section 10); its range learns only from clipped values, of
    which there are none there. A pure function of linen parameters, traceable (jit it);
    ``specs`` (``cost.layer_specs`` of ``model``) saves tracing the model for them.
    """
    from cgmq_jax import cost  # cost imports this module

    params = flax.core.unfreeze(params)
    if specs is None:
        specs = cost.layer_specs(model, *args, params=params, **kwargs)
    observed = layer_inputs(model, params, *args, **kwargs) if inputs else {}
    flat = flax.traverse_util.flatten_dict(params)
    wanted = None if layers is None else {tuple(p) for p in layers}
    for spec in specs:
        path = tuple(spec.path)
        if not spec.quantized or (wanted is not None and path not in wanted):
            continue
        weight_bits, input_bits = cost.layer_bitwidths(params, spec, exact=True)
        if weights and spec.weight_bits is None:
            leaf = flat[(*path, "weight_quantizer")]
            flat[(*path, "weight_quantizer")] = quantizer.least_squares_latents(
                flat[(*path, "kernel")],
                weight_bits,
                signed=True,
                per_channel=jnp.ndim(leaf) == 2,
            )
        if inputs and spec.input_bits is None:
            flat[(*path, "input_quantizer")] = quantizer.least_squares_latents(
                observed[path], input_bits, signed=spec.input_signed
            )
    return flax.traverse_util.unflatten_dict(flat)
