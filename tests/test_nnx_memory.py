"""NNX memory limits are counted (issue 24): ``cgmq_jax.nnx.layer_specs`` fills ``weights``,
``biases`` and ``input_elements`` from shapes as ``cgmq_jax.cost.layer_specs`` does for linen,
so a weight or activation memory limit on an NNX model is never free."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import linen, nnx

from cgmq_jax import certify, cost
from cgmq_jax import nn as cnn
from cgmq_jax import nnx as cnnx


class LinenNet(linen.Module):
    quantized: bool = True

    @linen.compact
    def __call__(self, x):
        options = {"quantize": self.quantized}
        x = cnn.QuantConv(4, (3, 3), strides=2, name="conv", **options)(x)
        x = jnp.reshape(linen.relu(x), (x.shape[0], -1))
        return cnn.QuantDense(10, name="head", **options)(x)


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = cnnx.QuantConv(1, 4, (3, 3), strides=2, rngs=rngs)
        self.head = cnnx.QuantLinear(14 * 14 * 4, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x))
        return self.head(jnp.reshape(x, (x.shape[0], -1)))


@pytest.fixture(scope="module")
def both():
    batch = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1), jnp.float32)
    linen_model = LinenNet()
    float_params = LinenNet(quantized=False).init(jax.random.key(0), batch[:1])["params"]
    linen_params = cnn.init_quantizers(linen_model, float_params, batch)
    linen_specs = cost.layer_specs(linen_model, batch[:1], params=linen_params)
    model = NnxNet(nnx.Rngs(0))
    cnnx.calibrate(model, batch)
    nnx_specs = cnnx.layer_specs(model, batch[:1])
    return linen_params, linen_specs, nnx.state(model, nnx.Param), nnx_specs


def _sizes(spec):
    return spec.weights, spec.biases, spec.input_elements, spec.macs


def test_nnx_specs_count_memory_as_linen_does(both):
    linen_params, linen_specs, nnx_params, nnx_specs = both
    assert [_sizes(s) for s in nnx_specs] == [_sizes(s) for s in linen_specs]
    assert [_sizes(s) for s in nnx_specs] == [
        (3 * 3 * 1 * 4, 4, 28 * 28, 14 * 14 * 4 * 9),
        (784 * 10, 10, 784, 7840),
    ]
    for measure in (cost.exact_weight_memory, cost.exact_activation_memory, cost.exact_bops):
        assert measure(nnx_params, nnx_specs) == measure(linen_params, linen_specs) > 0


def test_a_one_bit_weight_memory_limit_is_not_certified_for_nnx(both):
    *_, nnx_params, nnx_specs = both
    with pytest.raises(certify.CertificateRefused):
        certify.certify(nnx_params, nnx_specs, {"weight_memory_bits": 1})
    with pytest.raises(certify.CertificateRefused):
        certify.certify(nnx_params, nnx_specs, {"activation_bits": 1})
