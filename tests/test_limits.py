"""Tests of issue 11: weight and activation memory limits (docs/method.md section 8).

The traced costs against their exact versions and hand counts, ``constrained_update`` with
several constraints, feasibility / repair / certificate per limit, the CLI flags
``--budget_weight_kib`` / ``--budget_activation_kib``, and the memory numbers of the export.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import subprocess

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_cli

from cgmq_jax import certify, constrained_update, cost, data, export, quantizer, repair, report
from cgmq_jax import nn as cnn
from cgmq_jax.export import writer
from cgmq_jax.limits import InfeasibleBudgetError, check_budget

BIAS_BITS = 32
LENET_WEIGHTS = [150, 2400, 30720, 10080, 840]  # 5*5*1*6, 5*5*6*16, 256*120, 120*84, 84*10
LENET_BIASES = [6, 16, 120, 84, 10]
LENET_INPUTS = [784, 864, 256, 120, 84]  # 28*28*1, 12*12*6, 4*4*16, 120, 84
LENET_MACS = [86400, 153600, 30720, 10080, 840]
LENET_NAMES = ["conv1", "conv2", "fc1", "fc2", "fc3"]
# Mixed bit-widths (set_bits); fc1's weights are at the signed floor (2 bits).
MIXED_W = {"conv1": 3, "conv2": 5, "fc1": 2, "fc2": 4, "fc3": 8}
MIXED_IN = {"conv1": 6, "conv2": 2, "fc1": 7, "fc2": 3, "fc3": 5}


def _by_hand(weight_bits: dict, input_bits: dict) -> dict:
    w = [weight_bits[n] for n in LENET_NAMES]
    b = [input_bits[n] for n in LENET_NAMES]
    sizes = [e * bits for e, bits in zip(LENET_INPUTS, b, strict=True)]
    return {
        "bops": sum(m * x * y for m, x, y in zip(LENET_MACS, w, b, strict=True)),
        "weight_memory_bits": sum(n * x for n, x in zip(LENET_WEIGHTS, w, strict=True))
        + BIAS_BITS * sum(LENET_BIASES),
        "activation_bits": max(sizes),
        "activation_sum": sum(sizes),
    }


def _all(bits: int) -> dict:
    return dict.fromkeys(LENET_NAMES, bits)


def _layer_bits(params, specs) -> dict:
    """``{layer: (weight bits, input bits)}`` (exact)."""
    return {
        row["layer"]: (row["weight_bits"], row["input_bits"])
        for row in cost.layer_table(params, specs)
    }


@pytest.fixture(scope="module")
def mixed(lenet, set_bits):
    return set_bits(lenet["params8"], lenet["specs"], MIXED_W, MIXED_IN)


# 1. Costs ----------------------------------------------------------------------------------


def test_lenet_specs_count_weights_biases_and_inputs(lenet):
    specs = lenet["specs"]
    assert [s.weights for s in specs] == LENET_WEIGHTS
    assert [s.biases for s in specs] == LENET_BIASES
    assert [s.input_elements for s in specs] == LENET_INPUTS


@pytest.mark.parametrize("which", ["params8", "mixed"])
def test_traced_memory_costs_equal_exact_and_hand_counts(which, lenet, mixed):
    params = lenet["params8"] if which == "params8" else mixed
    specs = lenet["specs"]
    expected = _by_hand(_all(8), _all(8)) if which == "params8" else _by_hand(MIXED_W, MIXED_IN)
    assert cost.exact_weight_memory(params, specs) == expected["weight_memory_bits"]
    assert cost.exact_activation_memory(params, specs) == expected["activation_bits"]
    assert cost.exact_activation_memory(params, specs, reduce="sum") == expected["activation_sum"]
    exact = cost.exact_costs(params, specs)
    assert exact == {k: expected[k] for k in cost.COSTS}
    assert all(type(v) is int for v in exact.values())
    sums = cost.exact_costs(params, specs, activation_reduce="sum")
    assert sums["activation_bits"] == expected["activation_sum"]
    traced = {
        "weight_memory_bits": functools.partial(cost.weight_memory, specs=specs),
        "activation_bits": functools.partial(cost.activation_memory, specs=specs),
        "activation_sum": functools.partial(cost.activation_memory, specs=specs, reduce="sum"),
        "bops": functools.partial(cost.bops, specs=specs),
    }
    for name, fn in traced.items():
        for value in (fn(params), jax.jit(fn)(params)):
            assert value.dtype == jnp.float32 and value.shape == ()
            assert float(value) == expected[name], name
    functions = cost.cost_functions(specs)
    assert set(functions) == set(cost.COSTS)
    for name, fn in functions.items():
        assert float(jax.jit(fn)(params)) == expected[name], name
    rows = cost.layer_table(params, specs)
    assert [r["weight_memory_bits"] for r in rows] == [
        n * (8 if which == "params8" else MIXED_W[layer]) + BIAS_BITS * b
        for n, b, layer in zip(LENET_WEIGHTS, LENET_BIASES, LENET_NAMES, strict=True)
    ]
    assert [r["activation_bits"] for r in rows] == [
        e * (8 if which == "params8" else MIXED_IN[layer])
        for e, layer in zip(LENET_INPUTS, LENET_NAMES, strict=True)
    ]


def test_activation_memory_rejects_an_unknown_reduction(lenet):
    with pytest.raises(ValueError, match="reduce"):
        cost.activation_memory(lenet["params8"], lenet["specs"], reduce="mean")


class _Tiny(nn.Module):
    """One QuantDense(3) on 4 features: 12 weights, 3 biases, 4 input elements."""

    per_channel: bool = False

    @nn.compact
    def __call__(self, x):
        return cnn.QuantDense(3, input_signed=False, per_channel=self.per_channel, name="fc")(x)


def _tiny(per_channel: bool, weight_bits, input_bits: int):
    """The tiny model's params with its quantizers at the given bits (a list per channel)."""
    model = _Tiny(per_channel=per_channel)
    x = jnp.linspace(0.0, 1.0, 8, dtype=jnp.float32).reshape(2, 4)
    params = jax.tree.map(lambda v: v, model.init(jax.random.key(0), x)["params"])
    layer = params["fc"]
    _, w_qmax = quantizer.from_latents(layer["weight_quantizer"])
    if per_channel:
        assert layer["weight_quantizer"].shape == (3, 2)
        layer["weight_quantizer"] = jnp.stack(
            [
                quantizer.latents(*quantizer.init_at_bits(w_qmax[c], b, signed=True))
                for c, b in enumerate(weight_bits)
            ]
        )
    else:
        assert layer["weight_quantizer"].shape == (2,)
        layer["weight_quantizer"] = quantizer.latents(
            *quantizer.init_at_bits(w_qmax, weight_bits, signed=True)
        )
    _, in_qmax = quantizer.from_latents(layer["input_quantizer"])
    layer["input_quantizer"] = quantizer.latents(
        *quantizer.init_at_bits(in_qmax, input_bits, signed=False)
    )
    specs = cost.layer_specs(model, x)
    return params, specs


@pytest.mark.parametrize(
    "per_channel, weight_bits, expected",
    [
        # 12 weights at 6 bits + 3 biases at 32; input 4 elements at 3 bits; 12 MACs.
        (False, 6, {"weight_memory_bits": 12 * 6 + 96, "activation_bits": 12, "bops": 216}),
        # Per channel: each channel's 4 weights (and 4 MACs) at its own bits.
        (
            True,
            [2, 4, 8],
            {"weight_memory_bits": 4 * 14 + 96, "activation_bits": 12, "bops": 4 * 14 * 3},
        ),
    ],
)
@pytest.mark.slow  # compiles whole training steps or many programs
def test_tiny_dense_by_hand(per_channel, weight_bits, expected):
    params, specs = _tiny(per_channel, weight_bits, 3)
    (spec,) = specs
    assert (spec.weights, spec.biases, spec.input_elements, spec.macs) == (12, 3, 4, 12)
    assert spec.channels == (3 if per_channel else 1)
    assert cost.exact_costs(params, specs) == expected
    assert cost.exact_activation_memory(params, specs, reduce="sum") == 12
    for name, fn in cost.cost_functions(specs).items():
        assert float(fn(params)) == expected[name] == float(jax.jit(fn)(params)), name
    if per_channel:
        # The channel at the signed floor (2 bits) gets no gradient; the others do.
        grad = jax.grad(cost.weight_memory)(params, specs)["fc"]["weight_quantizer"]
        assert np.all(np.isfinite(grad))
        assert np.all(np.asarray(grad[0]) == 0)
        assert np.all(np.any(np.asarray(grad[1:]) != 0, axis=-1))


def _grad_pattern(fn, params) -> dict:
    """``{leaf key: nonzero?}`` of ``grad(fn)``, asserting every gradient is finite."""
    grads = jax.grad(fn)(params)
    pattern = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        leaf = np.asarray(leaf)
        key = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(leaf)), key
        pattern[key] = bool(np.any(leaf != 0))
    return pattern


def _key(layer: str, leaf: str) -> str:
    return f"['{layer}']['{leaf}']"


@pytest.mark.parametrize("which", ["params8", "mixed"])
@pytest.mark.slow  # compiles whole training steps or many programs
def test_memory_gradients_reach_only_the_quantizers_they_should(which, lenet, mixed):
    params = lenet["params8"] if which == "params8" else mixed
    specs = lenet["specs"]
    w_bits = _all(8) if which == "params8" else MIXED_W
    in_bits = _all(8) if which == "params8" else MIXED_IN
    # The largest input: conv2's at 8 bits (864 * 8), conv1's in the mixed net (784 * 6).
    largest = max(LENET_NAMES, key=lambda n: LENET_INPUTS[LENET_NAMES.index(n)] * in_bits[n])
    assert largest == ("conv2" if which == "params8" else "conv1")

    def expect(weight_layers=(), input_layers=()):
        pattern = {}
        for layer in LENET_NAMES:
            for leaf in ("bias", "kernel"):
                pattern[_key(layer, leaf)] = False
            pattern[_key(layer, "weight_quantizer")] = layer in weight_layers
            pattern[_key(layer, "input_quantizer")] = layer in input_layers
        return pattern

    above_floor_w = [n for n in LENET_NAMES if w_bits[n] > 2]  # signed floor: 2
    above_floor_in = [n for n in LENET_NAMES if in_bits[n] > 1]  # unsigned floor: 1
    assert _grad_pattern(functools.partial(cost.weight_memory, specs=specs), params) == expect(
        weight_layers=above_floor_w
    )
    assert _grad_pattern(functools.partial(cost.activation_memory, specs=specs), params) == expect(
        input_layers=[largest]
    )
    assert _grad_pattern(
        functools.partial(cost.activation_memory, specs=specs, reduce="sum"), params
    ) == expect(input_layers=above_floor_in)
    if which == "mixed":
        assert "fc1" not in above_floor_w  # the floor case is exercised


def test_min_costs_are_the_costs_at_minimum_bitwidths(lenet):
    params, specs = lenet["params8"], lenet["specs"]
    at_min = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            quantizer.at_min_bitwidth(leaf) if quantizer.is_quantizer_path(path) else leaf
        ),
        params,
    )
    for reduce in ("max", "sum"):
        assert cost.min_costs(specs, activation_reduce=reduce) == cost.exact_costs(
            at_min, specs, activation_reduce=reduce
        )
    for name, fn in cost.cost_functions(specs).items():
        assert float(fn(at_min)) == cost.min_costs(specs)[name], name
        # No gradient at the floor: nothing can lower the cost further.
        assert not any(_grad_pattern(fn, at_min).values()), name
    by_hand = _by_hand(_all(2), _all(1))  # signed weights: 2 bits, unsigned inputs: 1
    assert cost.min_costs(specs) == {name: by_hand[name] for name in cost.COSTS}
    assert cost.min_costs(specs, activation_reduce="sum")["activation_bits"] == sum(LENET_INPUTS)


# 2. constrained_update with several constraints ---------------------------------------------


def _run_constrained(tx, params, steps: int = 60):
    state = tx.init(params)
    zero = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(zero, state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), state

    history = []
    for _ in range(steps):
        history.append(params)
        params, state = step(params, state)
    return params, state, history


LIMITS_2 = {"bops": 4e6, "weight_memory_bits": 150_000}
LIMITS_3 = {**LIMITS_2, "activation_bits": 3000}  # names not in sorted order
STEPS = 60


@pytest.fixture(scope="module")
def constrained_runs(lenet):
    """``{"two" | "three": (limits, final params, state, history)}``: 8-bit LeNet-5 under
    zero loss updates, 60 jitted steps of ``constrained_update`` with one constraint per limit."""
    params, specs = lenet["params8"], lenet["specs"]
    functions = cost.cost_functions(specs)
    runs = {}
    for key, limits in (("two", LIMITS_2), ("three", LIMITS_3)):
        tx = constrained_update({name: (functions[name], limit) for name, limit in limits.items()})
        runs[key] = (limits, *_run_constrained(tx, params, STEPS))
    return runs


@pytest.mark.parametrize("key", ["two", "three"])
@pytest.mark.slow  # compiles whole training steps or many programs
def test_several_constraints_reach_every_limit(key, constrained_runs, lenet):
    specs = lenet["specs"]
    limits, final, state, history = constrained_runs[key]
    start = cost.exact_costs(lenet["params8"], specs)
    assert all(start[name] > limit for name, limit in limits.items())  # all violated at first
    exact = cost.exact_costs(final, specs)
    for name, limit in limits.items():
        assert exact[name] <= limit, (name, exact)
    assert set(state.cost) == set(limits) == set(state.infeasible_steps)
    # The state's costs are those of the params the last update was computed at.
    last = cost.exact_costs(history[-1], specs)
    for name in limits:
        assert state.cost[name].shape == () and state.cost[name].dtype == jnp.float32
        assert float(state.cost[name]) == last[name], name
        steps = state.infeasible_steps[name]
        assert steps.shape == () and steps.dtype == jnp.int32
        assert 0 < int(steps) < STEPS, name


# A dict that goes through jax.jit comes back with its keys sorted: the counts must be read
# by name, not in order (names given unsorted, "three", caught that bug).


@pytest.mark.parametrize(
    "key",
    [
        "two",  # names given in sorted order: the counts stay put
        "three",  # names not in sorted order
    ],
)
@pytest.mark.slow  # compiles whole training steps or many programs
def test_infeasible_steps_count_each_limit_under_jit(key, constrained_runs, lenet):
    """Each name's count is the number of steps its own cost was over its limit."""
    specs = lenet["specs"]
    limits, _, state, history = constrained_runs[key]
    over = {
        name: sum(cost.exact_costs(p, specs)[name] > limit for p in history)
        for name, limit in limits.items()
    }
    assert len(set(over.values())) == len(over)  # distinct counts: a mix-up is visible
    assert {name: int(n) for name, n in state.infeasible_steps.items()} == over


@pytest.mark.slow  # compiles whole training steps or many programs
def test_a_sequence_of_pairs_names_constraints_by_position(lenet):
    params, specs = lenet["params8"], lenet["specs"]
    functions = cost.cost_functions(specs)
    tx = constrained_update([(functions["bops"], 4e6), (functions["weight_memory_bits"], 150_000)])
    final, state, _ = _run_constrained(tx, params)
    assert set(state.cost) == {"0", "1"} == set(state.infeasible_steps)
    exact = cost.exact_costs(final, specs)
    assert exact["bops"] <= 4e6 and exact["weight_memory_bits"] <= 150_000
    assert int(state.infeasible_steps["0"]) > 0 and int(state.infeasible_steps["1"]) > 0


def test_one_constraint_keeps_scalar_state(lenet):
    params, specs = lenet["params8"], lenet["specs"]
    tx = constrained_update(cost.cost_functions(specs)["weight_memory_bits"], 150_000)
    state = tx.init(params)
    assert state.cost.shape == () and state.infeasible_steps.shape == ()
    assert state.infeasible_steps.dtype == jnp.int32
    zero = jax.tree.map(jnp.zeros_like, params)
    _, state = jax.jit(lambda p, s: tx.update(zero, s, p))(params, state)
    assert (
        state.cost.shape == ()
        and float(state.cost) == _by_hand(_all(8), _all(8))["weight_memory_bits"]
    )
    assert int(state.infeasible_steps) == 1


def test_an_infeasible_limit_fails_at_init_naming_it(lenet):
    params, specs = lenet["params8"], lenet["specs"]
    functions = cost.cost_functions(specs)
    tx = constrained_update(
        {
            "bops": (functions["bops"], 4e6),
            "weight_memory_bits": (functions["weight_memory_bits"], 50_000),
        }
    )
    with pytest.raises(InfeasibleBudgetError) as info:
        tx.init(params)
    message = str(info.value)
    assert "weight_memory_bits" in message and "95,932" in message  # the minimum, in bits
    assert "--budget_weight_kib 11.711" in message
    assert "bops" not in message.replace("weight_memory_bits", "")
    tx = constrained_update({"activation_bits": (functions["activation_bits"], 500)})
    with pytest.raises(InfeasibleBudgetError, match="activation_bits limit 500 .* 864"):
        tx.init(params)
    tx = constrained_update([(functions["bops"], 4e6), (functions["activation_bits"], 500)])
    with pytest.raises(InfeasibleBudgetError, match="constraint '1'.* 864"):
        tx.init(params)


def test_a_mapping_plus_a_budget_is_a_type_error(lenet):
    functions = cost.cost_functions(lenet["specs"])
    with pytest.raises(TypeError):
        constrained_update({"bops": (functions["bops"], 4e6)}, 4e6)
    with pytest.raises(TypeError):
        constrained_update([(functions["bops"], 4e6)], 4e6)


# 3. Feasibility, repair, certificate -----------------------------------------------------------


def test_repair_of_weight_memory_lowers_only_weight_quantizers(lenet):
    params, specs = lenet["params8"], lenet["specs"]
    limits = {"weight_memory_bits": 150_000, "activation_bits": 7_000}  # activation holds
    repaired, steps = repair.greedy_repair(params, specs, limits)
    before, after = _layer_bits(params, specs), _layer_bits(repaired, specs)
    assert [a[1] for a in after.values()] == [b[1] for b in before.values()]  # inputs kept
    assert all(a[0] <= b[0] for a, b in zip(after.values(), before.values(), strict=True))
    assert steps == sum(b[0] - a[0] for a, b in zip(after.values(), before.values(), strict=True))
    exact = cost.exact_costs(repaired, specs)
    assert exact["weight_memory_bits"] <= 150_000 and exact["activation_bits"] <= 7_000
    certificate = certify.certify(repaired, specs, limits)
    assert certificate["within_budget"] is True
    assert certificate["limits"]["weight_memory_bits"] == {
        "limit": 150_000,
        "cost": exact["weight_memory_bits"],
        "minimum": 95_932,
        "within": True,
    }


def test_repair_of_activation_memory_lowers_only_input_quantizers(lenet):
    params, specs = lenet["params8"], lenet["specs"]
    limits = {"activation_bits": 4_000, "weight_memory_bits": 400_000}  # weights hold
    repaired, steps = repair.greedy_repair(params, specs, limits)
    after = _layer_bits(repaired, specs)
    assert [a[0] for a in after.values()] == [8] * 5  # weights kept
    # Only the two inputs over 4,000 bits go down, each just far enough:
    # conv1 784 * 5 = 3,920; conv2 864 * 4 = 3,456.
    assert [a[1] for a in after.values()] == [5, 4, 8, 8, 8]
    assert steps == 3 + 4
    assert cost.exact_costs(repaired, specs)["activation_bits"] == 3_920


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_the_repair_scores_each_decrement_at_the_costs_of_its_table(reduce, mixed, lenet):
    """The repair's and the post-training search's shortcut (costs minus the moves' savings)
    against the exact costs of the network with the bits really lowered: every one-bit
    decrement of a mixed LeNet-5 alone, and two on different layers at once, both
    activation reductions."""
    specs = lenet["specs"]
    table = cost.layer_table(mixed, specs)
    costs = cost.table_costs(table, reduce)
    sizes = [row["activation_bits"] for row in table]
    decrements = list(repair._decrements(specs, table))
    assert {d.savings["activation_bits"] > 0 for d in decrements} == {True, False}

    def lowered(*moves):
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(mixed))
        for d in moves:
            flat[d.path] = repair._set_bits(
                flat[d.path], d.bits, signed=d.signed, channel=d.channel
            )
        params = flax.traverse_util.unflatten_dict(flat)
        return cost.exact_costs(params, specs, activation_reduce=reduce)

    for d in decrements:
        assert repair._costs_after(costs, sizes, [d], reduce) == lowered(d), d
    inputs = [d for d in decrements if d.savings["activation_bits"] > 0]
    pair = [inputs[0], next(d for d in decrements if d.index != inputs[0].index)]
    assert repair._costs_after(costs, sizes, pair, reduce) == lowered(*pair)


def test_certify_refuses_an_over_limit_model_naming_the_limit(lenet):
    params, specs = lenet["params8"], lenet["specs"]
    with pytest.raises(certify.CertificateRefused, match="weight_memory_bits 361,072 > 150,000"):
        certify.certify(params, specs, {"weight_memory_bits": 150_000, "bops": 1e9})
    with pytest.raises(certify.CertificateRefused, match="activation_bits 6,912 > 3,000"):
        certify.certify(params, specs, {"activation_bits": 3_000})
    with pytest.raises(InfeasibleBudgetError, match="--budget_activation_kib"):
        check_budget({"activation_bits": 800}, specs)
    check_budget({"activation_bits": 864, "weight_memory_bits": 95_932}, specs)


def test_a_bop_budget_certifies_as_before(lenet, set_bits):
    specs = lenet["specs"]
    params = set_bits(lenet["params8"], specs, MIXED_W, MIXED_IN)
    bops = _by_hand(MIXED_W, MIXED_IN)["bops"]
    budget = 4e6
    assert bops == 3_675_840 <= budget
    plain = certify.certify(params, specs, budget)
    named = certify.certify(params, specs, {"bops": budget})
    assert plain == named
    # The numbers the BOP-only certificate had before memory limits existed.
    assert plain["budget_bops"] == budget
    assert plain["bops"] == bops
    assert plain["within_budget"] is True
    assert plain["float_bops"] == sum(LENET_MACS) * 1024
    assert plain["min_cost_bops"] == sum(LENET_MACS) * 2 * 1
    assert plain["relative_bops_percent"] == 100.0 * bops / (sum(LENET_MACS) * 1024)
    assert [
        (r["layer"], r["macs"], r["weight_bits"], r["input_bits"], r["bops"])
        for r in plain["layers"]
    ] == [
        (n, m, MIXED_W[n], MIXED_IN[n], m * MIXED_W[n] * MIXED_IN[n])
        for n, m in zip(LENET_NAMES, LENET_MACS, strict=True)
    ]
    assert plain["limits"] == {
        "bops": {"limit": budget, "cost": bops, "minimum": 563_280, "within": True}
    }
    with pytest.raises(certify.CertificateRefused, match="exact cost .* > budget"):
        certify.certify(params, specs, bops - 1)


# 4. CLI ------------------------------------------------------------------------------------

TINY = ["--epochs", "1", "--pretrain_epochs", "1", "--batch_size", "64"]
LIMIT_FLAGS = ["--budget_weight_kib", "14", "--budget_activation_kib", "0.2"]


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory, tiny_mnist):
    """A LeNet-5 run on the tiny synthetic MNIST under a weight and an activation limit."""
    out = tmp_path_factory.mktemp("limits") / "run"
    with pytest.MonkeyPatch.context() as patch, jax.numpy_dtype_promotion("standard"):
        patch.setattr(data, "load", lambda *a, **k: tiny_mnist)
        status = load_cli("mnist").main([*TINY, *LIMIT_FLAGS, "--out", str(out)])
    assert status == 0
    return out


@pytest.mark.slow
def test_cli_memory_limits_are_certified(memory_run):
    results = json.loads((memory_run / "results.json").read_text())
    certificate = results["certificate"]
    limits = certificate["limits"]
    assert set(limits) == {"weight_memory_bits", "activation_bits"}  # no BOP limit
    assert limits["weight_memory_bits"]["limit"] == 14 * 8192
    assert limits["activation_bits"]["limit"] == pytest.approx(0.2 * 8192)
    assert all(v["within"] is True for v in limits.values())
    assert certificate["within_budget"] is True
    assert certificate["budget_bops"] is None
    params = report.load_params(memory_run)
    from cgmq_jax import models

    specs = cost.layer_specs(models.LeNet5(), jnp.zeros((1, 28, 28, 1), jnp.float32))
    exact = cost.exact_costs(params, specs)
    for name in ("weight_memory_bits", "activation_bits"):
        assert certificate[name] == limits[name]["cost"] == exact[name] <= limits[name]["limit"]
    assert certificate["bops"] == exact["bops"]


@pytest.fixture
def no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the bad limit was reported")

    monkeypatch.setattr(data, "load", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.split("\r")[-1].strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--budget_weight_kib", "1"], ["--budget_weight_kib 11.711", "infeasible"]),
        (["--budget_activation_kib", "0.1"], ["--budget_activation_kib 0.106", "infeasible"]),
        (["--budget_weight_kib", "0"], ["--budget_weight_kib"]),
        (["--budget_weight_kib", "-3"], ["--budget_weight_kib"]),
        (["--budget_activation_kib", "0"], ["--budget_activation_kib"]),
        (["--budget_weight_kib", "nan"], ["--budget_weight_kib"]),
    ],
)
def test_cli_bad_memory_limits_fail_before_data_loading(
    flags, fragments, tmp_path, no_data, capsys
):
    assert load_cli("mnist").main([*flags, "--out", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys)
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "run").exists()


# 5. Export -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_counts_the_certified_weight_memory(memory_run, tmp_path):
    certificate = json.loads((memory_run / "results.json").read_text())["certificate"]
    path = writer.export_run(memory_run, tmp_path / "model_int.npz")
    counted = export.count_bops(path)
    assert counted["weight_memory_bits"] == certificate["weight_memory_bits"]
    assert counted["activation_bits"] == certificate["activation_bits"]
    assert counted["matches_certificate"] is True
    assert counted["certificate_limits"] == certificate["limits"]
    _check_c(path, certificate, tmp_path / "c")


def test_export_of_mixed_lenet_with_a_weight_limit(lenet, mixed, tmp_path):
    specs = lenet["specs"]
    bits = _by_hand(MIXED_W, MIXED_IN)["weight_memory_bits"]
    certificate = certify.certify(mixed, specs, {"weight_memory_bits": bits})  # exactly at it
    assert certificate["weight_memory_bits"] == bits
    path = writer.export(mixed, lenet["model"], tmp_path / "m.npz", certificate=certificate)
    counted = export.count_bops(path)
    assert counted["weight_memory_bits"] == bits
    assert counted["matches_certificate"] is True
    header = export.load(path).header
    assert header["certificate"]["limits"]["weight_memory_bits"]["limit"] == bits
    _check_c(path, certificate, tmp_path / "c")
    # A certificate stating another weight memory does not match the file.
    lie = {**certificate, "weight_memory_bits": bits + 1}
    path = writer.export(mixed, lenet["model"], tmp_path / "lie.npz", certificate=lie)
    assert export.count_bops(path)["matches_certificate"] is False


def _check_c(path, certificate, out_dir):
    program = export.emit_c(path, out_dir)
    bits = certificate["weight_memory_bits"]
    assert program.weight_bits == bits
    assert program.weight_bytes == math.ceil(bits / 8)
    header = program.header.read_text()
    assert f"#define CGMQ_WEIGHT_BITS {bits}\n" in header
    assert f"#define CGMQ_WEIGHT_BYTES {math.ceil(bits / 8)}\n" in header
    if shutil.which("cc"):
        subprocess.run(
            ["cc", "-std=c99", "-c", str(program.source), "-o", str(out_dir / "model.o")],
            check=True,
            cwd=out_dir,
        )
