"""Errors in the user's words (issue 28): each names the user's module path and the fix,
never a bare ``KeyError`` or a JAX primitive alone. Each test reproduces the situation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cgmq_jax
from cgmq_jax import lowering


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(nn.Dense(8, name="d")(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="stem")(x)
        scan = nn.scan(
            _ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
        )
        x = scan(name="blocks")(x, None)[0]
        return nn.Dense(3, name="head")(x)


@pytest.mark.slow  # compiles whole training steps or many programs
def test_nn_scan_in_init_quantizers_names_the_layer_and_says_unroll():
    x = jax.random.normal(jax.random.key(0), (4, 8))
    float_params = Scanned().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError) as info:
        cgmq_jax.init_quantizers(cgmq_jax.quantize_model(Scanned()), float_params, x)
    message = str(info.value)
    assert "'blocks/d'" in message and "unroll nn.scan" in message, message


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(name="ln")(nn.Dense(8, name="fc")(x))


class Net(nn.Module):
    """A dense net with a LayerNorm (in ``encoder``), or a GELU, or neither."""

    kind: str = "plain"

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        if self.kind == "layer_norm":
            x = Encoder(name="encoder")(x)
        elif self.kind == "gelu":
            x = nn.gelu(nn.Dense(8, name="fc")(x))
        else:
            x = nn.relu(nn.Dense(8, name="fc")(x))
        return nn.Dense(3, name="head")(x)


SHAPE = (4, 4, 1)


def _quantized(kind: str):
    x = jax.random.uniform(jax.random.key(0), (4, *SHAPE))
    model = cgmq_jax.quantize_model(Net(kind))
    float_params = Net(kind).init(jax.random.key(0), x)["params"]
    return model, cgmq_jax.init_quantizers(model, float_params, x)


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("layer_norm", ["op 'square'", "module 'encoder/ln' (a LayerNorm)", "exclude it", "fold"]),
        ("gelu", ["op 'integer_pow'", "(a Net)", "use a supported activation", "nn.relu"]),
    ],
    ids=["layer_norm", "gelu"],
)
def test_unexportable_ops_name_the_module_and_the_fix(tmp_path, kind, fragments):
    model, params = _quantized(kind)
    with pytest.raises(ValueError) as info:
        lowering.export(params, model, tmp_path / "m.npz", input_shape=SHAPE)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert "model/" not in str(info.value)  # the user's path, not quantize_model's wrapper


@pytest.fixture(scope="module")
def plain():
    return _quantized("plain")


def test_a_forgotten_input_shape_says_pass_input_shape(tmp_path, plain):
    model, params = plain
    with pytest.raises(ValueError) as info:
        lowering.export(params, model, tmp_path / "m.npz")  # the default is MNIST's shape
    message = str(info.value)
    assert "layer 'fc'" in message and "input_shape=" in message, message
    assert "(16, 8)" in message and "(784, 8)" in message
    assert "ScopeParamShapeError" not in message


def test_a_nan_parameter_says_the_run_diverged_at_its_path(tmp_path, plain):
    model, params = plain
    params = jax.tree.map(lambda leaf: leaf, params)  # a copy: the fixture's stays finite
    params["head"]["weight_quantizer"] = jnp.full((2,), jnp.nan)
    with pytest.raises(ValueError) as info:
        lowering.export(params, model, tmp_path / "m.npz", input_shape=SHAPE)
    message = str(info.value)
    assert "the run diverged" in message and "'head/weight_quantizer'" in message, message
    assert "power of two" not in message
    assert not (tmp_path / "m.npz").exists()
    params["head"]["weight_quantizer"] = jnp.zeros(2)  # finite again: the file is written
    assert np.isfinite(np.asarray(params["head"]["weight_quantizer"])).all()
    assert lowering.export(params, model, tmp_path / "m.npz", input_shape=SHAPE).exists()
