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

import dataclasses
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

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
    then both fake-quants are computed and the decided one is kept.
    """
    d, q_max = quantizer.from_latents(theta)
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


def _input_signedness(module, x: jax.Array):
    """The signedness of ``module``'s input quantizer: a Python bool, or a traced one.

    An explicit ``input_signed`` is static. With ``None`` the decision is made by the data
    the layer sees when its parameters are created (or calibrated) and stored in the
    parameter leaf ``input_signed`` (+1.0 signed, -1.0 unsigned), because a decision that
    depends on data values cannot be a static Python value under ``jax.jit``.
    """
    if module.input_signed is not None:
        return bool(module.input_signed)
    stored = module.param(
        quantizer.INPUT_SIGNED, lambda _: quantizer.signedness_leaf(decided_signedness(x))
    )
    return quantizer.is_signed_leaf(stored)


def _observe_inputs(module, x: jax.Array) -> None:
    """Checks and calibration facts of the layer's input, when parameters are being made."""
    observing = module.is_mutable_collection(CALIBRATION)
    if module.input_signed is False and (observing or module.is_initializing()):
        _check_unsigned(x, "/".join(module.path))
    if observing:
        signed = module.input_signed
        signed = decided_signedness(x) if signed is None else bool(signed)
        observed = _input_range(x, signed=signed, percentile=module.calibration_percentile)
        keep_last = lambda _, new: new  # noqa: E731
        module.sow(CALIBRATION, "input_range", observed, reduce_fn=keep_last)
        module.sow(CALIBRATION, "input_signed", signed, reduce_fn=keep_last)


def _quantized_operands(module, inputs: jax.Array, kernel: jax.Array):
    """The layer's operands ``(Q(x), Q(kernel))``; ``(x, kernel)`` as given if not quantized.

    Observes the input first (checks, calibration facts); the quantizer leaves are made on
    first use, in float32, after the kernel (so that they do not shift its random init).
    """
    x = jnp.asarray(inputs, jnp.float32)
    _observe_inputs(module, x)
    if not module.quantize:
        return inputs, kernel
    signed = _input_signedness(module, x)
    kernel = jnp.asarray(kernel, jnp.float32)
    input_theta = module.param(
        "input_quantizer",
        lambda _: _initial_quantizer(
            _input_range(x, signed=signed, percentile=module.calibration_percentile),
            signed=signed,
        ),
    )
    weight_theta = module.param(
        "weight_quantizer",
        lambda _: _initial_quantizer(jnp.max(jnp.abs(kernel)), signed=True),
    )
    return (
        quantize_tensor(input_theta, x, signed=signed),
        quantize_tensor(weight_theta, kernel, signed=True),
    )


class QuantDense(nn.Dense):
    """Dense layer ``y = Q(x) @ Q(W) + b``: :class:`flax.linen.Dense` with quantizers.

    The fields are those of ``flax.linen.Dense``, in its order and with its defaults, then
    the quantizer options as keyword-only fields. With ``quantize=False`` it computes
    exactly ``flax.linen.Dense`` with the same parameters.

    Attributes:
      features: the number of output features.
      quantize: quantize the input and the kernel (``False``: a float layer, no quantizer
        leaves).
      input_signed: ``True`` / ``False`` for a signed / unsigned input quantizer; ``None``
        (default) decides from the data at initialisation and calibration: signed iff an
        input value is negative (the decision is stored in the leaf ``input_signed``).
        ``False`` with negative calibration inputs raises a ``ValueError``.
      calibration_percentile: the percentile of ``|x|`` (signed) or ``max(x, 0)``
        (unsigned) that sets the input quantizer's initial range.

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

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype
        )
        x, kernel = _quantized_operands(self, inputs, kernel)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = self.promote_dtype(x, kernel, bias, dtype=self.dtype)
        dot_general = (
            self.dot_general_cls()
            if self.dot_general_cls is not None
            else self.dot_general or jax.lax.dot_general
        )
        y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


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
      quantize: as in :class:`QuantDense`.
      input_signed: as in :class:`QuantDense`.
      calibration_percentile: as in :class:`QuantDense`.

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

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        geometry = conv_geometry(self)
        kernel_size = geometry["kernel_size"]
        # Flax's batch handling: any number of leading batch axes, or none.
        batch_shape = inputs.shape[: inputs.ndim - (len(kernel_size) + 1)]
        if len(batch_shape) != 1:
            inputs = jnp.reshape(inputs, (-1, *inputs.shape[len(batch_shape) :]))
        in_features = jnp.shape(inputs)[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"{in_features} input channels are not divisible by "
                f"feature_group_count={self.feature_group_count}"
            )
        kernel_shape = (*kernel_size, in_features // self.feature_group_count, self.features)
        if self.mask is not None and self.mask.shape != kernel_shape:
            raise ValueError(
                "Mask needs to have the same shape as weights. "
                f"Shapes are: {self.mask.shape}, {kernel_shape}"
            )
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        if self.mask is not None:
            kernel = kernel * self.mask
        x, kernel = _quantized_operands(self, inputs, kernel)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        if geometry["pre_padding"] is not None:
            pads = [(0, 0), *geometry["pre_padding"], (0, 0)]
            x = jnp.pad(x, pads, mode=geometry["pad_mode"])
        x, kernel, bias = self.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.conv_general_dilated_cls is not None:
            conv = self.conv_general_dilated_cls()
        else:
            conv = self.conv_general_dilated or jax.lax.conv_general_dilated
        y = conv(
            x,
            kernel,
            geometry["strides"],
            geometry["padding"],
            lhs_dilation=geometry["input_dilation"],
            rhs_dilation=geometry["kernel_dilation"],
            dimension_numbers=_conv_dimension_numbers(x.shape),
            feature_group_count=self.feature_group_count,
            precision=self.precision,
        )
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        if len(batch_shape) != 1:
            y = jnp.reshape(y, (*batch_shape, *y.shape[1:]))
        return y


def _conv_dimension_numbers(input_shape: Sequence[int]) -> jax.lax.ConvDimensionNumbers:
    """Channels last, kernel ``(*spatial, in, out)``: Flax's convention for any rank."""
    ndim = len(input_shape)
    lhs = (0, ndim - 1, *range(1, ndim - 1))
    rhs = (ndim - 1, ndim - 2, *range(ndim - 2))
    return jax.lax.ConvDimensionNumbers(lhs, rhs, lhs)


def init_quantizers(
    model: nn.Module, params, batch: jax.Array, *, input_bits: int = 8, weight_bits: int = 8
):
    """Quantized parameters from float ones: every quantizer at an exact bit-width.

    Weight quantizers take their range from ``max|W|``; input quantizers from a high
    percentile of the layer's inputs in the float network on ``batch``. A layer with
    ``input_signed=None`` gets a signed input quantizer iff its inputs on ``batch`` have a
    negative value (stored in its ``input_signed`` leaf); one with ``input_signed=False``
    and negative inputs raises a ``ValueError`` naming it (inside ``jax.jit``, when the
    compiled function runs).

    Args:
      model: a model with a ``quantized`` field (as in :mod:`cgmq_jax.models`).
      params: its float parameters (``model.clone(quantized=False)``'s tree); any quantizer
        leaves already present are replaced.
      batch: a calibration batch of inputs.
      input_bits: the initial bit-width of every input quantizer.
      weight_bits: the initial bit-width of every weight quantizer.

    Returns:
      The parameter tree of ``model.clone(quantized=True)``.
    """
    float_model = model.clone(quantized=False)
    weights = strip_quantizers(params)
    _, state = float_model.apply({"params": weights}, batch, mutable=[CALIBRATION])
    observed = flax.traverse_util.flatten_dict(flax.core.unfreeze(state[CALIBRATION]))
    quantized = model.clone(quantized=True)
    template = jax.eval_shape(lambda: quantized.init(jax.random.key(0), batch))["params"]
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(template))
    weights_flat = flax.traverse_util.flatten_dict(weights)
    result = {}
    for path in flat:
        layer, name = path[:-1], path[-1]
        if name == "input_quantizer":
            input_range = observed[(*layer, "input_range")]
            signed = observed[(*layer, "input_signed")]  # a bool, or the data's decision
            result[path] = _initial_quantizer(input_range, signed=signed, bits=input_bits)
        elif name == quantizer.INPUT_SIGNED:
            result[path] = quantizer.signedness_leaf(observed[(*layer, "input_signed")])
        elif name == "weight_quantizer":
            kernel = weights_flat[(*layer, "kernel")]
            result[path] = _initial_quantizer(
                jnp.max(jnp.abs(kernel)), signed=True, bits=weight_bits
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
