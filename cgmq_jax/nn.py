"""Quantized Flax (linen) layers: thin shells over :mod:`cgmq_jax.quantizer`.

Each layer quantizes its own input and its own kernel, then multiplies; the bias is added
at full precision and the output is not quantized (the next layer quantizes its input).
With ``quantize=False`` the same layer is a plain float layer without quantizer
parameters, so float and quantized models share one definition.

Parameters of a quantized layer: ``kernel``, ``bias`` and two quantizer leaves,
``input_quantizer`` and ``weight_quantizer``, each ``[log2 d, log2 q_max]``
(:func:`cgmq_jax.quantizer.latents`). :func:`cgmq_jax.quantizer.param_labels` separates
them from the weights for ``optax.partition``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from cgmq_jax import quantizer

CALIBRATION = "calibration"
DEFAULT_PERCENTILE = 99.99


def quantize_tensor(theta: jax.Array, x: jax.Array, *, signed: bool) -> jax.Array:
    """Fake-quantize ``x`` with the quantizer leaf ``theta = [log2 d, log2 q_max]``."""
    d, q_max = quantizer.from_latents(theta)
    return quantizer.fake_quant(x, d, q_max, signed=signed)


def _initial_quantizer(q_max: jax.Array, *, signed: bool, bits: int = 8) -> jax.Array:
    return quantizer.latents(*quantizer.init_at_bits(q_max, bits, signed=signed))


def _input_range(x: jax.Array, *, signed: bool, percentile: float) -> jax.Array:
    values = jnp.abs(x) if signed else jnp.maximum(x, 0.0)
    return jnp.percentile(values, percentile)


class _QuantizedLayer(nn.Module):
    """Shared shell: quantize input and kernel, then ``_multiply``."""

    quantize: bool = True
    input_signed: bool = False
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    calibration_percentile: float = DEFAULT_PERCENTILE

    def _kernel_shape(self, x: jax.Array) -> tuple[int, ...]:
        raise NotImplementedError

    def _multiply(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        kernel = self.param("kernel", self.kernel_init, self._kernel_shape(x))
        if self.is_mutable_collection(CALIBRATION):
            observed = _input_range(
                x, signed=self.input_signed, percentile=self.calibration_percentile
            )
            keep_last = lambda _, new: new  # noqa: E731
            self.sow(CALIBRATION, "input_range", observed, reduce_fn=keep_last)
            self.sow(CALIBRATION, "input_signed", self.input_signed, reduce_fn=keep_last)
        if self.quantize:
            input_theta = self.param(
                "input_quantizer",
                lambda _: _initial_quantizer(
                    _input_range(
                        x, signed=self.input_signed, percentile=self.calibration_percentile
                    ),
                    signed=self.input_signed,
                ),
            )
            weight_theta = self.param(
                "weight_quantizer",
                lambda _: _initial_quantizer(jnp.max(jnp.abs(kernel)), signed=True),
            )
            x = quantize_tensor(input_theta, x, signed=self.input_signed)
            kernel = quantize_tensor(weight_theta, kernel, signed=True)
        y = self._multiply(x, kernel)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (kernel.shape[-1],))
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class QuantDense(_QuantizedLayer):
    """Dense layer ``y = Q(x) @ Q(W) + b``."""

    features: int = 1

    def _kernel_shape(self, x):
        return (x.shape[-1], self.features)

    def _multiply(self, x, kernel):
        return jnp.dot(x, kernel)


class QuantConv(_QuantizedLayer):
    """2-D convolution (NHWC, kernel HWIO) ``y = conv(Q(x), Q(W)) + b``."""

    features: int = 1
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: str | Sequence[tuple[int, int]] = "VALID"
    feature_group_count: int = 1

    def _kernel_shape(self, x):
        in_features = x.shape[-1] // self.feature_group_count
        return (*self.kernel_size, in_features, self.features)

    def _multiply(self, x, kernel):
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=tuple(self.strides),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.feature_group_count,
        )


def init_quantizers(
    model: nn.Module, params, batch: jax.Array, *, input_bits: int = 8, weight_bits: int = 8
):
    """Quantized parameters from float ones: every quantizer at an exact bit-width.

    Weight quantizers take their range from ``max|W|``; input quantizers from a high
    percentile of the layer's inputs in the float network on ``batch``.

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
            signed = bool(observed[(*layer, "input_signed")])
            result[path] = _initial_quantizer(input_range, signed=signed, bits=input_bits)
        elif name == "weight_quantizer":
            kernel = weights_flat[(*layer, "kernel")]
            result[path] = _initial_quantizer(
                jnp.max(jnp.abs(kernel)), signed=True, bits=weight_bits
            )
        else:
            result[path] = weights_flat[path]
    return flax.traverse_util.unflatten_dict(result)


def strip_quantizers(params):
    """The parameter tree without its quantizer leaves (what the float model takes)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    kept = {k: v for k, v in flat.items() if not k[-1].endswith(quantizer.QUANTIZER_SUFFIX)}
    return flax.traverse_util.unflatten_dict(kept)
