"""One name per step for linen and NNX (issue 25): the dispatching names give what the
module-specific ones give, and the names kept for compatibility still agree."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgmq_jax import cost, rules
from cgmq_jax import nn as qnn
from cgmq_jax import nnx as cnnx


class _NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = cnnx.QuantConv(1, 4, (3, 3), input_signed=False, rngs=rngs)
        self.head = cnnx.QuantLinear(4 * 6 * 6, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv(x))
        return self.head(x.reshape(x.shape[0], -1))


class _LinenNet(qnn.nn.Module):
    quantized: bool = True

    @qnn.nn.compact
    def __call__(self, x):
        x = qnn.nn.relu(
            qnn.QuantConv(4, (3, 3), quantize=self.quantized, input_signed=False, name="conv")(x)
        )
        return qnn.QuantDense(3, quantize=self.quantized, name="head")(x.reshape(x.shape[0], -1))


def _image(shape=(2, 6, 6, 1)):
    return jax.random.uniform(jax.random.key(1), shape, jnp.float32)


def test_layer_specs_dispatches_to_the_nnx_implementation():
    model, x = _NnxNet(nnx.Rngs(0)), _image()
    cnnx.calibrate(model, x)
    one_name = cost.layer_specs(model, x)
    assert one_name == cnnx.layer_specs(model, x)
    assert [s.name for s in one_name] == ["conv", "head"]
    with pytest.raises(TypeError, match="takes no params"):
        cost.layer_specs(model, x, params={})


def test_layer_specs_linen_and_nnx_agree_on_the_same_network():
    x = _image()
    nnx_model = _NnxNet(nnx.Rngs(0))
    cnnx.calibrate(nnx_model, x)
    linen_model = _LinenNet()
    params = linen_model.init(jax.random.key(0), x)["params"]
    linen = cost.layer_specs(linen_model, x, params=params)
    nnx_specs = cost.layer_specs(nnx_model, x)
    fields = ("macs", "weights", "biases", "input_elements", "input_signed")
    for a, b in zip(linen, nnx_specs, strict=True):
        assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]


def test_init_quantizers_on_nnx_is_calibrate():
    x = _image()
    by_name, by_calibrate = _NnxNet(nnx.Rngs(0)), _NnxNet(nnx.Rngs(0))
    assert qnn.init_quantizers(by_name, x, input_bits=4, weight_bits=3) is None
    cnnx.calibrate(by_calibrate, x, input_bits=4, weight_bits=3)
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.state(by_name, nnx.Not(nnx.RngKey)),
        nnx.state(by_calibrate, nnx.Not(nnx.RngKey)),
    )


def test_init_quantizers_on_linen_is_unchanged():
    x = _image()
    model = _LinenNet()
    float_params = model.clone(quantized=False).init(jax.random.key(0), x)["params"]
    params = qnn.init_quantizers(model, float_params, x)
    assert sorted(params["conv"]) == ["bias", "input_quantizer", "kernel", "weight_quantizer"]


def test_quantize_model_takes_an_nnx_model_and_leaves_it_unmodified():
    class Plain(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.head = nnx.Linear(4 * 6 * 6, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))

    plain, x = Plain(nnx.Rngs(0)), _image()
    rule = rules.QuantRule(module_path="conv", input_signed=False, input_bits=8)
    model = rules.quantize_model(plain, [rule, rules.QuantRule(module_path="head", quantize=False)])
    assert (type(plain.conv), type(model.conv)) == (nnx.Conv, cnnx.QuantConv)
    np.testing.assert_array_equal(model.conv.kernel[...], plain.conv.kernel[...])
    qnn.init_quantizers(model, x)
    specs = cost.layer_specs(model, x)
    assert [(s.name, s.quantized, s.input_bits) for s in specs] == [
        ("conv", True, 8),
        ("head", False, None),  # kept in float by its rule: counted at 32 x 32 bits
    ]
    assert not hasattr(model.head, "weight_quantizer")
    with pytest.raises(TypeError, match="QuantRule instances"):
        rules.quantize_model(plain, ["conv"])


def test_min_cost_is_min_costs_bops():
    x = _image()
    model = _LinenNet()
    specs = cost.layer_specs(model, x, params=model.init(jax.random.key(0), x)["params"])
    assert cost.min_cost(specs) == cost.min_costs(specs)["bops"]
    # 2-bit weights x 1-bit unsigned inputs (the head's decided by the ReLU's output)
    assert cost.min_cost(specs) == (4 * 36 * 9 + 3 * 144) * 2 * 1


def test_the_quantizer_options_are_declared_once():
    names = [f.name for f in dataclasses.fields(qnn.QuantOptions)]
    for layer in (qnn.QuantDense, qnn.QuantConv):
        fields = {f.name: f for f in dataclasses.fields(layer)}
        assert all(fields[n].kw_only for n in names)
        assert [f for f in fields if f in names] == names
    rule_fields = [f.name for f in dataclasses.fields(rules.QuantRule)]
    assert rule_fields[: len(names)] == names
    rule = rules.QuantRule(module_path="x", input_bits=8, per_channel=True)
    assert rule.options == qnn.QuantOptions(input_bits=8, per_channel=True)
    layer = qnn.QuantDense(3, weight_bits=4)
    assert qnn.options_of(layer) == qnn.QuantOptions(weight_bits=4)


def test_the_calibration_functions_keep_their_old_homes():
    """:mod:`cgmq_jax.calibration` holds them; ``cgmq_jax.nn`` and the package still give
    the very same functions (nothing is copied), and an unknown name is still an error."""
    import cgmq_jax
    from cgmq_jax import calibration
    from cgmq_jax.nn import refit_ranges  # a from-import goes through nn's __getattr__

    for name in ("init_quantizers", "layer_inputs", "refit_ranges", "strip_quantizers"):
        assert getattr(qnn, name) is getattr(calibration, name)
    assert refit_ranges is calibration.refit_ranges
    assert cgmq_jax.init_quantizers is calibration.init_quantizers
    assert "refit_ranges" in dir(qnn)
    with pytest.raises(AttributeError, match="no attribute 'refit'"):
        qnn.refit  # noqa: B018
