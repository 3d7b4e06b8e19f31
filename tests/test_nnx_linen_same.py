"""The same network in linen and in NNX (issue 28): from the same weights, a few steps of
``constrained_update`` give the same parameters, costs, certificate and integer file.

Both are plain Flax models quantized by ``quantize_model`` with the same rules (an input
pinned at 8 bits, a per-channel layer, explicit signedness), trained with the same optax
chain: the linen one with ``jax.grad`` over its parameter dict, the NNX one with
``nnx.Optimizer``. Both model classes are named ``Net``: the file's header records the
class name, so the files can then be identical byte for byte.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import standard_promotion
from flax import nnx

import cgmq_jax
from cgmq_jax import certify, cost, lowering, repair
from cgmq_jax import nnx as cnnx
from cgmq_jax.export import c as export_c
from cgmq_jax.export import format as export_format

pytestmark = pytest.mark.slow  # two short trainings, end to end

RULES = (
    cgmq_jax.QuantRule(module_path="stem", input_bits=8, input_signed=False),
    cgmq_jax.QuantRule(module_path="body", per_channel=True, input_signed=False),
    cgmq_jax.QuantRule(input_signed=False),
)
SHAPE = (8, 8, 1)
STEPS = 6


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, name="stem")(x))
        x = nn.relu(nn.Conv(6, (3, 3), name="body")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


LinenNet.__name__ = "Net"


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.stem = nnx.Conv(1, 4, (3, 3), strides=2, rngs=rngs)
        self.body = nnx.Conv(4, 6, (3, 3), rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 6, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem(x))
        x = nnx.relu(self.body(x))
        return self.head(x.reshape(x.shape[0], -1))


NnxNet.__name__ = "Net"


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _chain(specs, budget):
    """SGD, then the constraint (a small program: the compilation is most of the test)."""
    cost_fn = functools.partial(cost.bops, specs=specs)
    return optax.chain(optax.sgd(0.05), cgmq_jax.constrained_update(cost_fn, budget))


def _train_linen(images, labels, float_params, budget_fraction):
    model = cgmq_jax.quantize_model(LinenNet(), RULES)
    params = cgmq_jax.init_quantizers(model, float_params, images)
    specs = cgmq_jax.layer_specs(model, images[:1], params=params)
    budget = budget_fraction * cost.exact_bops(params, specs)
    tx = _chain(specs, budget)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: _loss(model.apply({"params": p}, images), labels))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(STEPS):
        params, state = step(params, state)
    return model, params, specs, budget


def _train_nnx(images, labels, float_params, budget_fraction):
    plain = NnxNet(nnx.Rngs(0))
    for name in ("stem", "body", "head"):  # the linen model's float weights
        getattr(plain, name).kernel[...] = float_params[name]["kernel"]
        getattr(plain, name).bias[...] = float_params[name]["bias"]
    model = cgmq_jax.quantize_model(plain, RULES)
    cgmq_jax.init_quantizers(model, images)
    specs = cgmq_jax.layer_specs(model, images[:1])
    budget = budget_fraction * cost.exact_bops(nnx.state(model, nnx.Param), specs)
    optimizer = nnx.Optimizer(model, _chain(specs, budget), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: _loss(m(images), labels))(model)
        optimizer.update(model, grads)

    for _ in range(STEPS):
        step(model, optimizer)
    return model, specs, budget


def _repaired(model, specs, budget):
    """``repair.greedy_repair`` of an NNX model's parameters (it takes a plain dict)."""
    state = nnx.state(model, nnx.Param)
    repaired, steps = repair.greedy_repair(nnx.to_pure_dict(state), specs, budget)
    nnx.replace_by_pure_dict(state, repaired)
    return state, steps


@pytest.fixture(scope="module")
def trained():
    images = jax.random.uniform(jax.random.key(1), (16, *SHAPE))
    images = jnp.round(images * 256) / 256  # exact multiples of 2**-8, as the file expects
    labels = jnp.arange(16) % 10
    float_params = LinenNet().init(jax.random.key(0), images)["params"]
    with standard_promotion():  # optax's Adam
        linen = _train_linen(images, labels, float_params, 0.6)
        nnx_model, nnx_specs, nnx_budget = _train_nnx(images, labels, float_params, 0.6)
    return linen, (nnx_model, nnx_specs, nnx_budget)


def test_the_same_parameters_costs_and_certificate(trained):
    (_, params, specs, budget), (nnx_model, nnx_specs, nnx_budget) = trained
    assert [s.name for s in specs] == [s.name for s in nnx_specs] == ["stem", "body", "head"]
    assert [s.macs for s in specs] == [s.macs for s in nnx_specs]
    assert budget == nnx_budget
    nnx_params = cnnx.linen_params(nnx_model)
    assert jax.tree.structure(nnx_params) == jax.tree.structure(dict(params))
    jax.tree.map(np.testing.assert_array_equal, nnx_params, dict(params))  # bit for bit
    nnx_state = nnx.state(nnx_model, nnx.Param)
    assert cost.exact_costs(params, specs) == cost.exact_costs(nnx_state, nnx_specs)
    assert cost.exact_bops(params, specs) < cost.exact_bops(
        cgmq_jax.init_quantizers(
            cgmq_jax.quantize_model(LinenNet(), RULES), params, jnp.ones((2, *SHAPE))
        ),
        specs,
    )  # training moved the bits (so the comparison is not of two untouched models)
    # Six steps are not enough to reach the budget: the repair lowers the same bits in both.
    params, linen_steps = repair.greedy_repair(params, specs, budget)
    nnx_state, nnx_steps = _repaired(nnx_model, nnx_specs, nnx_budget)
    assert linen_steps == nnx_steps > 0
    linen_certificate = certify.certify(params, specs, budget)
    assert linen_certificate == certify.certify(nnx_state, nnx_specs, nnx_budget)
    assert linen_certificate["within_budget"]


def test_the_same_integer_file_and_c(trained, tmp_path):
    (model, params, _, budget), (nnx_model, _, _) = trained
    specs = cgmq_jax.layer_specs(model, jnp.ones((1, *SHAPE)), params=params)
    params, _ = repair.greedy_repair(params, specs, budget)
    certificate = certify.certify(params, specs, budget)
    nnx.update(nnx_model, _repaired(nnx_model, specs, budget)[0])
    (tmp_path / "linen").mkdir(), (tmp_path / "nnx").mkdir()
    linen_file = lowering.export(
        params, model, tmp_path / "linen" / "m.npz", input_shape=SHAPE, certificate=certificate
    )
    nnx_file = lowering.export(
        None, nnx_model, tmp_path / "nnx" / "m.npz", input_shape=SHAPE, certificate=certificate
    )
    assert linen_file.read_bytes() == nnx_file.read_bytes()
    exported = export_format.load(nnx_file)
    assert [layer["name"] for layer in exported.layers] == ["stem", "body", "head"]
    assert exported.layers[1]["per_channel"] and exported.layers[0]["input_bits"] == 8
    images = np.asarray(jax.random.uniform(jax.random.key(2), (8, *SHAPE)) * 256) // 1 / 256
    checked = lowering.compare_with_model(nnx_file, None, nnx_model, images)
    assert checked["agree"] == 8 and all(row[0] == 0 for row in checked["code_mismatches"].values())
    assert checked["code_mismatches"].keys() == {"stem", "body", "head"}
    export_c.emit_c(nnx_file, tmp_path / "nnx" / "c")  # C from the NNX model's file
    export_c.emit_c(linen_file, tmp_path / "linen" / "c")
    for name in ("model.h", "model.c", "main.c"):  # the same, but for the file's name
        nnx_text = (tmp_path / "nnx" / "c" / name).read_text().replace(str(nnx_file), "F")
        linen_text = (tmp_path / "linen" / "c" / name).read_text()
        assert nnx_text == linen_text.replace(str(linen_file), "F")
