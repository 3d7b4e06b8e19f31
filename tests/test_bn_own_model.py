"""BatchNorm in the user's own model (issue 28): an unmodified linen model with BatchNorm
after its convolutions goes through the public API, ``quantize_model`` ->
``init_quantizers(model, float_variables, batch)`` -> ``layer_specs`` -> ``export``, with
each BatchNorm folded into the layer before it; no helper, no second BatchNorm-free model.
An NNX model's BatchNorm is folded by ``quantize_model(model, rules, sample_input)``."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import nnx

import cgmq_jax
from cgmq_jax import lowering
from cgmq_jax import nn as qnn
from cgmq_jax.export import format as export_format

SHAPE = (6, 6, 1)


class KwsNet(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU, a residual Conv -> BatchNorm, a dense head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
        y = nn.Conv(4, (3, 3), name="body")(x)
        x = nn.relu(x + nn.BatchNorm(use_running_average=not train, name="body_bn")(y))
        return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


RULES = (cgmq_jax.QuantRule(input_signed=False),)


@pytest.fixture(scope="module")
def trained():
    """The float model's variables after one BatchNorm update (statistics not trivial)."""
    images = jax.random.uniform(jax.random.key(0), (8, *SHAPE))
    variables = KwsNet().init(jax.random.key(0), images)
    _, updated = KwsNet().apply(variables, images, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": updated["batch_stats"]}
    model = cgmq_jax.quantize_model(KwsNet(), RULES)
    params = cgmq_jax.init_quantizers(model, variables, images, input_bits=16, weight_bits=16)
    return images, variables, model, params


@pytest.mark.slow  # compiles whole training steps or many programs
def test_init_quantizers_folds_the_float_variables(trained):
    images, variables, model, params = trained
    assert sorted(params) == ["body", "head", "stem"]  # no BatchNorm left
    assert sorted(params["stem"]) == ["bias", "input_quantizer", "kernel", "weight_quantizer"]
    # The folded float network computes what the model with BatchNorm computes (eval mode).
    folded = model.clone(quantized=False, batch_norm=False)
    np.testing.assert_allclose(
        folded.apply({"params": qnn.strip_quantizers(params)}, images),
        KwsNet().apply(variables, images),
        rtol=1e-5,
        atol=1e-5,
    )
    # The quantized model runs without statistics, at 16 bits close to the float model.
    quantized = model.apply({"params": params}, images)
    np.testing.assert_allclose(quantized, KwsNet().apply(variables, images), atol=1e-2)
    # The float model (quantized=False) is the original, BatchNorm and all.
    float_out = model.clone(quantized=False).apply(variables, images)
    np.testing.assert_array_equal(float_out, KwsNet().apply(variables, images))


@pytest.mark.slow  # compiles whole training steps or many programs
def test_cost_and_export_see_the_folded_layers(trained, tmp_path):
    images, _, model, params = trained
    specs = cgmq_jax.layer_specs(model, images[:1], params=params)
    assert [(s.name, s.macs) for s in specs] == [
        ("stem", 36 * 4 * 9),
        ("body", 36 * 4 * 36),
        ("head", 144 * 3),
    ]
    exported = export_format.load(
        lowering.export(params, model, tmp_path / "m.npz", input_shape=SHAPE)
    )
    ops = [(op["op"], op["module"]) for op in exported.header["ops"]]
    assert ops[:4] == [
        ("conv", "stem"),
        ("relu", "<top level>"),
        ("conv", "body"),
        ("add", "<top level>"),
    ]
    assert exported.header["model"] == "KwsNet"
    assert exported.layers[0]["name"] == "stem" and exported.arrays["L0.bias"].any()


def test_missing_statistics_and_an_unfoldable_batchnorm_are_clear_errors(trained):
    images, variables, model, _ = trained
    with pytest.raises(ValueError, match=r"KwsNet has BatchNorm.*\"batch_stats\""):
        cgmq_jax.init_quantizers(model, variables["params"], images)

    class NormAfterAdd(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
            return nn.BatchNorm(use_running_average=True, name="post_bn")(x + x)

    unfoldable = NormAfterAdd()
    with pytest.raises(ValueError, match=r"BatchNorm 'post_bn' does not directly follow"):
        cgmq_jax.quantize_model(unfoldable).init(jax.random.key(0), images)


class NnxKwsNet(nnx.Module):
    """The same in NNX: Conv (no bias) -> BatchNorm -> ReLU -> Linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, 4, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4 * 36, 3, rngs=rngs)

    def __call__(self, x, train: bool = False):
        x = nnx.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        return self.head(x.reshape(x.shape[0], -1))


def test_nnx_batchnorm_is_folded_by_quantize_model(tmp_path):
    images = jax.random.uniform(jax.random.key(0), (8, *SHAPE))
    float_model = NnxKwsNet(nnx.Rngs(0))
    float_model(images, train=True)  # statistics not trivial
    expected = float_model(images)
    with pytest.raises(TypeError, match="has BatchNorm: pass a sample input"):
        cgmq_jax.quantize_model(float_model, RULES)
    model = cgmq_jax.quantize_model(float_model, RULES, images)
    assert isinstance(float_model.stem_bn, nnx.BatchNorm)  # the user's model is unchanged
    assert float_model.stem.bias is None and model.stem.bias is not None
    model.set_attributes(quantize=False)  # the folded float network: BatchNorm's function
    np.testing.assert_allclose(model(images), expected, rtol=1e-5, atol=1e-5)
    model.set_attributes(quantize=True)
    cgmq_jax.init_quantizers(model, images, input_bits=16, weight_bits=16)
    np.testing.assert_allclose(model(images), expected, atol=1e-2)
    exported = export_format.load(
        lowering.export(None, model, tmp_path / "m.npz", input_shape=SHAPE)
    )
    assert [op["op"] for op in exported.header["ops"]] == ["conv", "relu", "reshape", "dense"]
