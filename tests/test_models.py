"""Tests of cgmq_jax.models and cgmq_jax.nn (float and quantized LeNet-5 and MLP)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgmq_jax import cost, models, quantizer
from cgmq_jax import nn as cnn

BUNDLES = ["lenet", "mlp"]


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def test_strict_promotion_is_on():
    # conftest.py: every test runs with strict dtype promotion and rank promotion errors.
    assert jax.config.jax_numpy_dtype_promotion == "strict"
    assert jax.config.jax_numpy_rank_promotion == "raise"
    with pytest.raises(Exception, match="implicit dtype promotion"):
        jnp.ones(2, jnp.float32) + jnp.ones(2, jnp.int32)
    with pytest.raises(ValueError, match="rank_promotion"):
        jnp.ones((2, 3), jnp.float32) + jnp.ones(3, jnp.float32)


@pytest.mark.parametrize("name", BUNDLES)
def test_float_model_has_the_same_weights_and_no_quantizers(name, request, sample_input):
    bundle = request.getfixturevalue(name)
    float_params = bundle["float_params"]
    labels = jax.tree.leaves(quantizer.param_labels(float_params))
    assert labels and set(labels) == {"weight"}
    quantized = jax.jit(bundle["model"].init)(jax.random.key(0), sample_input)["params"]
    q_labels = jax.tree.leaves(quantizer.param_labels(quantized))
    assert q_labels.count("quantizer") == 2 * len(bundle["specs"])
    stripped = cnn.strip_quantizers(quantized)
    assert jax.tree.structure(stripped) == jax.tree.structure(float_params)
    assert _shapes(stripped) == _shapes(float_params)
    for layer in float_params.values():
        assert set(layer) == {"kernel", "bias"}
    # Same seed, same weights: the quantizers do not shift the weight initialisation.
    chex.assert_trees_all_equal(stripped, float_params)


@pytest.mark.parametrize("name", BUNDLES)
def test_init_quantizers_gives_exactly_8_bits(name, request, calibration_batch):
    bundle = request.getfixturevalue(name)
    params, specs = bundle["params8"], bundle["specs"]
    for spec in specs:
        layer = params
        for key in spec.path:
            layer = layer[key]
        for leaf, signed in (
            ("weight_quantizer", spec.weight_signed),
            ("input_quantizer", spec.input_signed),
        ):
            d, q_max = quantizer.from_latents(layer[leaf])
            assert int(quantizer.exact_bitwidth(d, q_max, signed=signed)) == 8, (spec.name, leaf)
            assert float(d) > 0 and float(q_max) > 0
        # The weight range is max|W| of the float kernel (up to half a step: init_at_bits
        # may round it to its level, n * d_q).
        d, q_max = quantizer.from_latents(layer["weight_quantizer"])
        max_w = float(jnp.max(jnp.abs(layer["kernel"])))
        assert abs(float(q_max) - max_w) <= float(d) / 2 * (1 + 1e-5)
    assert cost.exact_bops(params, specs) == cost.total_macs(specs) * 64
    # The weights are the float model's, untouched.
    chex.assert_trees_all_equal(cnn.strip_quantizers(params), bundle["float_params"])
    # The first layer's input range is a high percentile of the calibration batch.
    d_in, q_in = quantizer.from_latents(params[specs[0].name]["input_quantizer"])
    expected = float(jnp.percentile(calibration_batch, cnn.DEFAULT_PERCENTILE))
    assert abs(float(q_in) - expected) <= float(d_in) / 2 * (1 + 1e-5)
    assert 0.9 < expected <= 1.0


def test_init_quantizers_other_widths(lenet, calibration_batch):
    init = jax.jit(
        functools.partial(cnn.init_quantizers, lenet["model"], input_bits=3, weight_bits=5)
    )
    params = init(lenet["float_params"], calibration_batch)
    rows = cost.layer_table(params, lenet["specs"])
    assert all(r["weight_bits"] == 5 and r["input_bits"] == 3 for r in rows)
    assert cost.exact_bops(params, lenet["specs"]) == 281640 * 15


@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("name", BUNDLES)
def test_output_shapes(name, batch_size, request):
    bundle = request.getfixturevalue(name)
    x = jax.random.uniform(jax.random.key(3), (batch_size, 28, 28, 1), jnp.float32)
    for model, params in (
        (bundle["float_model"], bundle["float_params"]),
        (bundle["model"], bundle["params8"]),
    ):
        logits = jax.jit(model.apply)({"params": params}, x)
        chex.assert_shape(logits, (batch_size, 10))
        chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("name", BUNDLES)
def test_float_and_8_bit_logits_are_close(name, request, set_bits):
    bundle = request.getfixturevalue(name)
    x = jax.random.uniform(jax.random.key(7), (32, 28, 28, 1), jnp.float32)
    float_logits = np.asarray(
        jax.jit(bundle["float_model"].apply)({"params": bundle["float_params"]}, x)
    )
    apply = jax.jit(bundle["model"].apply)
    logits8 = np.asarray(apply({"params": bundle["params8"]}, x))
    scale = np.max(np.abs(float_logits))
    error8 = np.max(np.abs(logits8 - float_logits))
    assert error8 <= 0.1 * scale, (error8, scale)  # measured: 0.039 (LeNet-5), 0.022 (MLP)
    # The quantization really happens: at the minimum widths the logits are far off.
    params_min = set_bits(bundle["params8"], bundle["specs"], 2, 1)
    error_min = np.max(np.abs(np.asarray(apply({"params": params_min}, x)) - float_logits))
    assert error_min > 3 * error8


def test_quantized_layer_is_fake_quant_then_multiply():
    layer = cnn.QuantDense(features=3)
    x = jnp.asarray([[0.1, 0.6, 0.35, 1.2]], jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    params = dict(params, bias=jnp.asarray([0.5, -0.5, 0.0], jnp.float32))
    params["input_quantizer"] = quantizer.latents(0.25, 1.0)  # unsigned, 0.25 steps up to 1
    params["weight_quantizer"] = quantizer.latents(0.5, 1.0)  # signed, {-1, -0.5, 0, 0.5, 1}
    y = layer.apply({"params": params}, x)
    x_q = np.asarray([[0.0, 0.5, 0.25, 1.0]], np.float32)  # 0.1 -> 0, 0.35 -> 0.25, 1.2 -> 1
    w_q = np.clip(np.round(np.asarray(params["kernel"]) / 0.5), -2, 2) * 0.5
    np.testing.assert_allclose(np.asarray(y), x_q @ w_q + [0.5, -0.5, 0.0], rtol=1e-6, atol=1e-6)


def test_get_model():
    assert isinstance(models.get_model("lenet5"), models.LeNet5)
    assert models.get_model("mlp", quantized=False).quantized is False
    with pytest.raises(ValueError, match="unknown model"):
        models.get_model("resnet")
