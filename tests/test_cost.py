"""Tests of cgmq_jax.cost against docs/method.md section 2 (BOPs of LeNet-5 and the MLP)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cgmq_jax
from cgmq_jax import cost, quantizer

LENET_MACS = [86400, 153600, 30720, 10080, 840]  # 24*24*6*25, 8*8*16*25*6, 256*120, 120*84, 84*10
LENET_NAMES = ["conv1", "conv2", "fc1", "fc2", "fc3"]
MLP_MACS = [235200, 30000, 1000]  # 784*300, 300*100, 100*10
MLP_NAMES = ["fc1", "fc2", "fc3"]


def _leaf(params, spec, name):
    node = params
    for key in spec.path:
        node = node[key]
    return node[name]


def test_layer_specs_count_macs_by_hand(lenet, mlp):
    assert [s.macs for s in lenet["specs"]] == LENET_MACS
    assert [s.name for s in lenet["specs"]] == LENET_NAMES
    assert [s.macs for s in mlp["specs"]] == MLP_MACS
    assert [s.name for s in mlp["specs"]] == MLP_NAMES
    for spec in lenet["specs"] + mlp["specs"]:
        assert isinstance(spec.macs, int)
        assert spec.weight_signed and not spec.input_signed  # images and ReLU outputs
    assert cost.total_macs(lenet["specs"]) == sum(LENET_MACS) == 281640
    assert cost.total_macs(mlp["specs"]) == sum(MLP_MACS) == 266200


def test_layer_specs_do_not_depend_on_the_batch_size(lenet):
    specs = cost.layer_specs(lenet["model"], jax.ShapeDtypeStruct((7, 28, 28, 1), jnp.float32))
    assert specs == lenet["specs"]


def test_layer_specs_reject_a_float_model(lenet, sample_input):
    with pytest.raises(ValueError, match="no quantized layers"):
        cost.layer_specs(lenet["float_model"], sample_input)


def test_float_bops_and_relative_bops(lenet, mlp):
    assert cost.float_bops(lenet["specs"]) == 281640 * 1024
    assert cost.float_bops(mlp["specs"]) == 266200 * 1024
    assert cost.relative_bops(cost.float_bops(lenet["specs"]), lenet["specs"]) == 100.0
    assert cost.relative_bops(281640 * 4, lenet["specs"]) == pytest.approx(100 * 4 / 1024)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("name, total", [("lenet", 281640), ("mlp", 266200)])
@pytest.mark.slow  # compiles whole training steps or many programs
def test_uniform_bitwidth_cost(name, total, bits, request, set_bits):
    bundle = request.getfixturevalue(name)
    specs = bundle["specs"]
    params = set_bits(bundle["params8"], specs, bits, bits)
    exact = cost.exact_bops(params, specs)
    assert isinstance(exact, int)
    assert exact == total * bits * bits
    assert float(cost.bops(params, specs)) == exact
    assert float(jax.jit(functools.partial(cost.bops, specs=specs))(params)) == exact
    rows = cost.layer_table(params, specs)
    assert [r["layer"] for r in rows] == [s.name for s in specs]
    assert all(r["weight_bits"] == bits and r["input_bits"] == bits for r in rows)
    assert sum(r["bops"] for r in rows) == exact


def test_mixed_bitwidths_and_layer_table(lenet, set_bits):
    specs = lenet["specs"]
    weight_bits = {"conv1": 3, "conv2": 3, "fc1": 3, "fc2": 3, "fc3": 4}
    input_bits = {"conv1": 2, "conv2": 2, "fc1": 3, "fc2": 3, "fc3": 3}
    params = set_bits(lenet["params8"], specs, weight_bits, input_bits)
    # docs/method.md section 6's hand-picked allocation: 1,817,280 BOPs.
    expected = 86400 * 3 * 2 + 153600 * 3 * 2 + 30720 * 3 * 3 + 10080 * 3 * 3 + 840 * 4 * 3
    assert expected == 1817280
    assert cost.exact_bops(params, specs) == expected
    assert float(cost.bops(params, specs)) == expected
    rows = cost.layer_table(params, specs)
    assert sum(r["bops"] for r in rows) == expected
    for row, macs in zip(rows, LENET_MACS, strict=True):
        assert row["macs"] == macs
        assert row["weight_bits"] == weight_bits[row["layer"]]
        assert row["input_bits"] == input_bits[row["layer"]]
        assert row["bops"] == macs * row["weight_bits"] * row["input_bits"]


@pytest.mark.slow  # compiles whole training steps or many programs
def test_layer_table_rows_sum_to_the_exact_cost_after_calibration(lenet, mlp):
    for bundle in (lenet, mlp):
        rows = cost.layer_table(bundle["params8"], bundle["specs"])
        assert sum(r["bops"] for r in rows) == cost.exact_bops(bundle["params8"], bundle["specs"])
        assert all(r["weight_bits"] == 8 and r["input_bits"] == 8 for r in rows)


def test_min_cost(lenet, mlp, set_bits):
    # Signed weights at 2 bits, unsigned inputs at 1 bit.
    assert cost.min_cost(lenet["specs"]) == 281640 * 2 * 1
    assert cost.min_cost(mlp["specs"]) == 266200 * 2 * 1
    for bundle in (lenet, mlp):
        specs = bundle["specs"]
        params = set_bits(bundle["params8"], specs, 2, 1)
        assert cost.exact_bops(params, specs) == cost.min_cost(specs)
        assert float(cost.bops(params, specs)) == cost.min_cost(specs)
        with pytest.raises(ValueError):  # below the floor does not exist
            set_bits(bundle["params8"], specs, 1, 1)


def test_cost_gradient_is_finite_and_nonzero_above_the_floor(lenet):
    specs = lenet["specs"]
    params = lenet["params8"]
    grads = jax.jit(jax.grad(functools.partial(cost.bops, specs=specs)))(params)
    chex.assert_tree_all_finite(grads)
    for spec in specs:
        for name in ("weight_quantizer", "input_quantizer"):
            g = np.asarray(_leaf(grads, spec, name))
            assert g[0] < 0, (spec.name, name, g)  # a larger step removes bits
            assert g[1] > 0, (spec.name, name, g)  # a larger range adds bits
        # The cost does not depend on the weights.
        assert np.all(np.asarray(_leaf(grads, spec, "kernel")) == 0)
        assert np.all(np.asarray(_leaf(grads, spec, "bias")) == 0)


def test_cost_gradient_is_zero_at_the_floor(lenet, set_bits):
    specs = lenet["specs"]
    weight_bits = {"conv1": 2, "conv2": 5, "fc1": 2, "fc2": 4, "fc3": 8}
    input_bits = {"conv1": 4, "conv2": 1, "fc1": 1, "fc2": 3, "fc3": 8}
    params = set_bits(lenet["params8"], specs, weight_bits, input_bits)
    grads = jax.grad(cost.bops)(params, specs)
    chex.assert_tree_all_finite(grads)
    for spec in specs:
        for name, bits, floor in (
            ("weight_quantizer", weight_bits[spec.name], 2),
            ("input_quantizer", input_bits[spec.name], 1),
        ):
            g = np.asarray(_leaf(grads, spec, name))
            if bits == floor:
                np.testing.assert_array_equal(g, [0.0, 0.0])
            else:
                assert g[0] < 0 and g[1] > 0, (spec.name, name, g)


def test_changing_bitwidths_does_not_retrace_the_cost(lenet, set_bits):
    specs = lenet["specs"]
    chex.clear_trace_counter()
    cost_fn = jax.jit(chex.assert_max_traces(lambda p: cost.bops(p, specs), n=1))
    params3 = set_bits(lenet["params8"], specs, 3, 3)
    assert float(cost_fn(lenet["params8"])) == 281640 * 64
    assert float(cost_fn(params3)) == 281640 * 9
    assert float(cost_fn(set_bits(lenet["params8"], specs, 2, 1))) == 281640 * 2


@pytest.mark.slow  # compiles whole training steps or many programs
def test_changing_bitwidths_does_not_retrace_a_train_step(lenet, set_bits, calibration_batch):
    model, specs = lenet["model"], lenet["specs"]
    batch = calibration_batch[:8]
    labels = jnp.arange(8, dtype=jnp.int32) % 10
    tx = optax.chain(
        optax.adam(1e-3),
        cgmq_jax.constrained_update(functools.partial(cost.bops, specs=specs), 1e6),
    )

    def loss_fn(params):
        logits = model.apply({"params": params}, batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    chex.clear_trace_counter()
    jitted = jax.jit(chex.assert_max_traces(step, n=1))
    params8 = lenet["params8"]
    params3 = set_bits(params8, specs, 3, 3)
    with jax.numpy_dtype_promotion("standard"):  # optax.adam, see conftest.py
        state = tx.init(params8)
        new8, state, loss8 = jitted(params8, state)
        new3, state, loss3 = jitted(params3, state)
    chex.assert_tree_all_finite((new8, new3, loss8, loss3))
    assert state[-1].infeasible_steps == 2  # 18.0M and 2.5M BOPs: both over 1e6
    assert float(state[-1].cost) == 281640 * 9
    assert cost.exact_bops(new3, specs) <= 281640 * 9


def test_exact_bitwidths_read_from_the_tree(lenet, set_bits):
    specs = lenet["specs"]
    params = set_bits(lenet["params8"], specs, 5, 3)
    for spec in specs:
        w, i = cost.layer_bitwidths(params, spec, exact=True)
        assert (int(w), int(i)) == (5, 3)
        assert w.dtype == jnp.int32
        d, q_max = quantizer.from_latents(_leaf(params, spec, "weight_quantizer"))
        assert int(quantizer.exact_bitwidth(d, q_max, signed=True)) == 5


@pytest.mark.slow  # calibrates four networks
@pytest.mark.parametrize(
    "flags",
    [
        {"model": "lenet5", "init_bits": 6},
        {"model": "lenet5_bb", "input_bits": 8},
        {"model": "dscnn"},  # BatchNorm folded first
        {"model": "dscnn", "prune": True},
    ],
)
def test_costs_at_the_initial_bits_are_the_calibrated_networks(flags, tiny_mnist):
    # The budget warm-up starts from costs_at (a resumed run has no values to count): it
    # must be the exact cost of the network that init_quantizers calibrates.
    from cgmq_jax.runs import train

    config = train.TrainConfig(budget_bops=1e9, epochs=1, pretrain_epochs=0, **flags)
    setup = train._make_setup(config, tiny_mnist, pretrained=False)
    calibration = jnp.asarray(tiny_mnist.train[0][:16])
    variables = setup.float_model.init(jax.random.key(0), calibration)
    with jax.numpy_dtype_promotion("standard"):  # optax.adam, see conftest.py
        params = train._qat_state(setup, variables, calibration).params
    at = cost.costs_at(setup.specs, config.init_bits, config.init_bits)
    assert at == cost.exact_costs(params, setup.specs)
    assert at["bops"] > cost.min_cost(setup.specs)
