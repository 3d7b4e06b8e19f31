"""ONNX export of Flax models (slow: JAX traces and lowers each): a ``quantize_model`` user
model, and grouped / depthwise convolutions with an average pool and a global mean (the
DS-CNN's structure). Residual and concat graphs, and every op alone, are covered by the
synthetic files of ``tests/test_onnx.py``.

Each model is exported to the integer file (``cgmq_jax.lowering.export``), then to ONNX;
ONNX Runtime's every layer input codes must equal the integer engine's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from cgmq_jax import lowering  # noqa: E402
from cgmq_jax.export import engine, format  # noqa: E402
from cgmq_jax.export import onnx as ox  # noqa: E402
from cgmq_jax.nn import QuantConv, QuantDense  # noqa: E402
from cgmq_jax.rules import QuantRule, quantize_model  # noqa: E402


class PlainNet(nn.Module):
    """A plain linen model (nn.Conv / nn.Dense only), quantized by ``quantize_model``."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME", name="conv")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(6, name="hidden")(jnp.reshape(x, (x.shape[0], -1))))
        return nn.Dense(3, name="head")(x)


class GroupedPooled(nn.Module):
    """groups=2 conv -> ReLU -> depthwise conv -> ReLU -> avg pool -> global mean -> dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QuantConv(4, (3, 3), padding="SAME", feature_group_count=2, name="grouped")(x))
        x = nn.relu(QuantConv(4, (3, 3), padding="VALID", feature_group_count=4, name="dw")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return QuantDense(3, name="fc")(x)


MODELS = {
    "quantize_model": (
        quantize_model(
            PlainNet(), [QuantRule(module_path="hidden", per_channel=True), QuantRule()]
        ),
        (12, 12, 3),
    ),
    "grouped_depthwise_pooled": (GroupedPooled(), (8, 8, 2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_flax_model_in_onnx_runtime_equals_the_engine(name, tmp_path):
    model, shape = MODELS[name]
    x = np.random.default_rng(0).integers(0, 256, (32, *shape))
    real = (x / 256).astype(np.float32)
    with jax.numpy_dtype_promotion("standard"):
        params = model.init(jax.random.key(1), jnp.asarray(real))["params"]
        params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(37 * p + 1), params)  # non-zero biases
        lowering.export(params, model, tmp_path / "m.npz", input_shape=shape)
    integer = format.load(tmp_path / "m.npz")
    path = tmp_path / "m.onnx"
    ox.to_onnx(integer, path)
    expected, _, codes = engine.run_integer(integer, x, return_codes=True)
    ours = ox.layer_codes(path, real)
    for layer, theirs in codes.items():
        np.testing.assert_array_equal(ours[layer], theirs, err_msg=layer)
    logits = ox.run_onnx(path, real)
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))
    assert ox.recount_onnx(path)["bops"] == format.count_bops(integer)["bops"]
