"""Bits moved by measured loss (cgmq_jax.trades, --trades): within every limit after every
move, the loss never rises, bits go from an insensitive quantizer to a sensitive one, and
a run with trades records them while a run without is unchanged."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import FINISHED_RUN, load_cli
from test_ptq import LIMITS, TwoBranch, _bits, _distillation_loss

from cgmq_jax import certify, cost, quantizer, repair, trades
from cgmq_jax import nn as qnn


@pytest.fixture(scope="module")
def even():
    """``(params, specs, loss)``: the two-branch network (the quiet branch's weights 1000
    times smaller, so its bits barely matter) with every quantizer at 4 bits: a budget
    full at that cost splits it evenly, as a cost-only rule would."""
    model = TwoBranch()
    float_model = model.clone(quantized=False)
    images = jax.random.uniform(jax.random.key(0), (32, 4, 4, 1))
    float_params = dict(float_model.init(jax.random.key(1), images)["params"])
    float_params["quiet"] = jax.tree.map(lambda leaf: leaf * 1e-3, float_params["quiet"])
    params = jax.device_get(qnn.init_quantizers(model, float_params, images))
    specs = cost.layer_specs(model, images[:1], params=params)
    for spec in specs:
        for kind, signed in (("weight", spec.weight_signed), ("input", spec.input_signed)):
            leaf = params[spec.name][f"{kind}_quantizer"]
            _, q_max = quantizer.from_latents(leaf)
            params[spec.name][f"{kind}_quantizer"] = np.asarray(
                quantizer.latents(*quantizer.init_at_bits(q_max, 4, signed=signed))
            )
    loss = jax.jit(_distillation_loss(model, float_model, float_params, images))
    return params, specs, loss


def test_bits_move_to_the_quantizer_where_they_pay(even):
    params, specs, loss = even
    budget = cost.exact_bops(params, specs)  # full: no bit fits without a trade
    before = _bits(params, specs)
    assert before["loud/weight"] == before["quiet/weight"] == 4
    losses, moved = [float(loss(params))], params
    for _ in range(4):
        moved, record = trades.trade_bits(moved, specs, budget, loss)
        assert cost.exact_bops(moved, specs) <= budget  # after every call
        assert record["loss_after"] <= record["loss_before"]
        losses.append(float(loss(moved)))
    bits = _bits(moved, specs)
    assert bits["loud/weight"] > 4 and bits["quiet/weight"] < 4
    assert losses[-1] < losses[0] / 4  # the measured loss fell, never rose
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    # Only quantizer leaves moved.
    for path, leaf in jax.tree_util.tree_flatten_with_path(moved)[0]:
        if "quantizer" not in str(path[-1]):
            np.testing.assert_array_equal(
                leaf, dict(jax.tree_util.tree_flatten_with_path(params)[0])[path]
            )


@pytest.mark.parametrize("budget", LIMITS.values(), ids=LIMITS.keys())
def test_within_every_limit(even, budget):
    params, specs, loss = even
    repaired, _ = repair.greedy_repair(params, specs, budget)  # cost-driven bits
    moved = repaired
    for _ in range(3):
        moved, record = trades.trade_bits(moved, specs, budget, loss)
        assert certify.certify(moved, specs, budget)["within_budget"]  # refuses any excess
    assert float(loss(moved)) <= float(loss(repaired))


def test_neighbours_move_every_channel_one_bit():
    q_max = np.array([1.0, 0.1, 4.0], np.float32)  # per channel: 4, 4 and 4 bits
    leaf = np.asarray(quantizer.latents(*quantizer.init_at_bits(q_max, 4, signed=True)))
    for direction in (+1, -1):
        found = trades.neighbours(leaf, True, direction)
        assert len(found) >= 1
        for candidate in found:
            d, q = quantizer.from_latents(candidate)
            assert set(np.asarray(quantizer.exact_bitwidth(d, q, signed=True))) == {4 + direction}
    floor = np.asarray(quantizer.latents(*quantizer.init_at_bits(q_max, 2, signed=True)))
    assert trades.neighbours(floor, True, -1) == []


@pytest.mark.slow
@FINISHED_RUN
def test_a_run_with_trades_records_them_within_budget(
    tmp_path, tiny_mnist, monkeypatch, standard_promotion_fixture, finished_run
):
    from cgmq_jax import data

    monkeypatch.setattr(data, "load", lambda *a, **k: tiny_mnist)
    flags = ["--epochs", "5", "--pretrain_epochs", "2", "--batch_size", "32", "--lr", "3e-3"]
    flags += ["--budget_bops", "2e6", "--fill_epochs", "0"]
    cli = load_cli("mnist")
    assert cli.main([*flags, "--trades", "--out", str(tmp_path / "t")]) == 0
    import json

    with_trades = json.loads((tmp_path / "t" / "results.json").read_text())
    # A run without --trades (conftest's shared run) records none.
    without = json.loads((finished_run / "results.json").read_text())
    qat = [row for row in with_trades["history"] if row["phase"] == "qat"]
    traded = [i for i, row in enumerate(qat) if "trades" in row]  # every feasible epoch end
    assert traded and traded == [i for i, row in enumerate(qat[:-1]) if row["within_budget"]]
    assert all(row["within_budget"] for row in qat[traded[0] :])  # and every one after
    assert not any("trades" in row for row in without["history"])


def test_within_bits_gains_no_bit_and_moves_both_ways(lenet):
    """On a guarded step ``admission="within_bits"`` lets no quantizer (channel) gain a bit,
    so the exact cost cannot rise; a quantizer whose finer step stays within its bit moves,
    where the all-or-nothing guard would have refused it."""
    import cgmq_jax
    from cgmq_jax import admission

    params = lenet["params8"]
    cost_fn = functools.partial(cost.bops, specs=lenet["specs"])
    budget = float(cost.exact_bops(params, lenet["specs"]))  # full: the guard fires
    # Every step finer in log2: by 0.6 in the weight quantizers (past a rounding boundary:
    # a bit more) and by 0.3 in the input quantizers (within their bit).
    finer = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jnp.zeros_like(x).at[..., 0].set(-0.6 if "weight" in str(path) else -0.3)
            if quantizer.is_quantizer_path(path)
            else jnp.zeros_like(x)
        ),
        params,
    )
    outs = {}
    for rule in ("within_bits", "all_or_nothing"):
        tx = cgmq_jax.constrained_update(cost_fn, budget, admission=rule)
        state = tx.init(params)
        outs[rule], state = tx.update(finer, state, params)
        assert int(state.guard_steps) == 1
    moved = optax.apply_updates(params, outs["within_bits"])
    assert cost.exact_bops(moved, lenet["specs"]) <= budget
    before, after = _lengths(params), _lengths(moved)
    assert all(np.all(after[k] <= before[k]) for k in before)
    steps = [np.asarray(leaf)[..., 0] for leaf in _quantizer_leaves(outs["within_bits"])]
    assert any(np.any(s < 0) for s in steps)  # some step moved finer, within its bit
    assert all(
        np.all(np.asarray(leaf)[..., 0] >= 0) for leaf in _quantizer_leaves(outs["all_or_nothing"])
    )
    assert "within_bits" in admission.ADMISSIONS


def _quantizer_leaves(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [leaf for path, leaf in flat if quantizer.is_quantizer_path(path)]


def _lengths(params):
    from cgmq_jax import admission

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        jax.tree_util.keystr(path): np.asarray(admission._bit_length(leaf))
        for path, leaf in flat
        if quantizer.is_quantizer_path(path)
    }


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_costs_from_integers_equal_the_exact_costs(lenet, even, reduce):
    for params, specs in ((lenet["params8"], lenet["specs"]), even[:2]):
        table = cost.layer_table(params, specs)
        bits = [
            [tuple(r["weight_bits"]) if isinstance(r["weight_bits"], list) else r["weight_bits"]]
            + [r["input_bits"]]
            for r in table
        ]
        exact = cost.exact_costs(params, specs, activation_reduce=reduce)
        assert trades._costs(specs, bits, reduce) == exact


@pytest.mark.parametrize("flag", ["trades", "prune"])
def test_cgmq_only_options_name_the_method(flag):
    from cgmq_jax.runs.config import TrainConfig

    with pytest.raises(ValueError, match=f"--{flag} .* applies to --method cgmq only, not 'dq'"):
        TrainConfig(method="dq", **{flag: True}).validate()
    TrainConfig(method="cgmq", **{flag: True}).validate()
