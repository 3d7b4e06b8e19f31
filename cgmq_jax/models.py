"""The models of the experiments: LeNet-5 and an MLP, float or quantized by one switch."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cgmq_jax.nn import QuantConv, QuantDense


class LeNet5(nn.Module):
    """Classic LeNet-5 for 28x28x1 inputs.

    conv 6@5x5 (valid) -> max-pool 2 -> conv 16@5x5 (valid) -> max-pool 2 -> dense 120 ->
    dense 84 -> dense 10, ReLU. Every layer's input is non-negative (pixels, ReLU outputs),
    so every input quantizer is unsigned, explicitly (``input_signed=False``: a static
    decision, no ``input_signed`` leaf, and a ``ValueError`` if calibration images are
    negative). 281,640 MACs per example.
    """

    num_classes: int = 10
    quantized: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        options = {"quantize": self.quantized, "input_signed": False}
        x = QuantConv(6, (5, 5), padding="VALID", name="conv1", **options)(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = QuantConv(16, (5, 5), padding="VALID", name="conv2", **options)(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(QuantDense(120, name="fc1", **options)(x))
        x = nn.relu(QuantDense(84, name="fc2", **options)(x))
        return QuantDense(self.num_classes, name="fc3", **options)(x)


class MLP(nn.Module):
    """784-300-100-10 ReLU MLP on flattened inputs, unsigned inputs as in
    :class:`LeNet5`. 266,200 MACs per example."""

    hidden: tuple[int, ...] = (300, 100)
    num_classes: int = 10
    quantized: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        options = {"quantize": self.quantized, "input_signed": False}
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(QuantDense(width, name=f"fc{i + 1}", **options)(x))
        name = f"fc{len(self.hidden) + 1}"
        return QuantDense(self.num_classes, name=name, **options)(x)


MODELS = {"lenet5": LeNet5, "mlp": MLP}


def get_model(name: str, *, quantized: bool = True) -> nn.Module:
    """A model by name (``lenet5`` or ``mlp``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](quantized=quantized)
