"""Pruning as the 0-bit choice (docs/method.md section 12): the quantizer, the layers, the
live-channel cost against physically smaller networks, the constraint, the config."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cgmq_jax
from cgmq_jax import certify, channels, cost, models, quantizer, repair
from cgmq_jax import nn as qnn
from cgmq_jax.limits import InfeasibleBudgetError, check_budget
from cgmq_jax.runs.config import TrainConfig

X = jnp.zeros((1, 28, 28, 1), jnp.float32)


def _params(model, key=0):
    # Jitted: one program per model, where an eager init compiles each of its many ops
    # afresh for every new layer shape (seconds per model in the tests' XLA:CPU).
    return jax.jit(model.init)(jax.random.key(key), X)["params"]


def _remove(params, layer: str, channels_to_remove) -> dict:
    """``params`` with the given output channels of ``layer`` removed (q_max = d_q / 4)."""
    leaf = params[layer]["weight_quantizer"]
    rows = jnp.asarray(list(channels_to_remove))
    leaf = leaf.at[rows].set(quantizer.at_min_bitwidth(leaf[rows], prune=True))
    return {**params, layer: {**params[layer], "weight_quantizer": leaf}}


# --------------------------------------------------------------------------- the quantizer


def test_levels_may_reach_zero_and_one_channel_always_stays():
    d = jnp.full((4,), 0.5)
    q_max = jnp.array([0.1, 1.0, 0.2, 0.3])  # ratios 0.2, 2, 0.4, 0.6
    np.testing.assert_array_equal(quantizer.levels(d, q_max, prune=True), [0, 2, 0, 1])
    np.testing.assert_array_equal(quantizer.levels(d, q_max), [1, 2, 1, 1])
    np.testing.assert_array_equal(
        quantizer.exact_bitwidth(d, q_max, signed=True, prune=True), [0, 3, 0, 2]
    )
    # All below half a level: the first with the largest ratio keeps one level (2 bits).
    low = jnp.array([0.1, 0.2, 0.2, 0.05])
    np.testing.assert_array_equal(quantizer.levels(d, low, prune=True), [0, 1, 0, 0])


def test_a_removed_channel_is_zero_yet_its_range_still_learns():
    x = jnp.array([[0.3, -0.2], [0.1, 0.4]])
    d, q_max = jnp.array([[0.25, 0.25]]), jnp.array([[0.05, 0.5]])  # per channel (last axis)
    out = quantizer.fake_quant(x, d, q_max, signed=True, prune=True)
    np.testing.assert_array_equal(out[:, 0], [0.0, 0.0])
    np.testing.assert_array_equal(out[:, 1], [-0.25, 0.5])
    grad = jax.grad(lambda q: quantizer.fake_quant(x, d, q, signed=True, prune=True).sum())(q_max)
    assert grad[0, 0] == 2.0  # both values above the (empty) range: the loss can bring it back


def test_the_bit_gradient_flows_at_one_level_and_stops_when_removed():
    d = jnp.full((3,), 0.25)
    q_max = jnp.array([0.05, 0.25, 1.0])  # removed, 1 level, 4 levels
    grad = jax.grad(lambda q: quantizer.bitwidth(d, q, signed=True, prune=True).sum())(q_max)
    assert grad[0] == 0.0 and grad[1] > 0.0 and grad[2] > 0.0
    grad = jax.grad(lambda q: quantizer.bitwidth(d, q, signed=True).sum())(q_max)
    assert grad[0] == 0.0 and grad[1] == 0.0  # without pruning 1 level is the floor


# --------------------------------------------------------------------------- the layers


def test_prune_needs_learned_per_channel_weights():
    with pytest.raises(ValueError, match="per_channel=True"):
        qnn.QuantOptions(prune=True)
    with pytest.raises(ValueError, match="weight_bits=None"):
        qnn.QuantOptions(prune=True, per_channel=True, weight_bits=4)


def test_a_removed_channel_outputs_exactly_zero_bias_included():
    layer = qnn.QuantDense(4, per_channel=True, prune=True, input_signed=True)
    x = jax.random.normal(jax.random.key(0), (8, 5))
    params = layer.init(jax.random.key(1), x)["params"]
    params["bias"] = jnp.array([0.5, -0.3, 0.2, 0.7])
    leaf = params["weight_quantizer"]
    params["weight_quantizer"] = leaf.at[2].set(quantizer.at_min_bitwidth(leaf[2], prune=True))
    y = layer.apply({"params": params}, x)
    np.testing.assert_array_equal(y[:, 2], np.zeros(8))
    assert np.all(np.asarray(y[:, 3]) != 0.0)


def test_a_grouped_convolution_may_not_prune():
    conv = qnn.QuantConv(4, (3, 3), feature_group_count=2, per_channel=True, prune=True)
    with pytest.raises(ValueError, match="feature_group_count=1"):
        conv.init(jax.random.key(0), jnp.ones((1, 6, 6, 4)))


# --------------------------------------------------------------------------- the cost


def _same_costs(pruned_params, pruned_specs, small_model):
    """The pruned network's exact and traced costs equal those of ``small_model`` (the
    network with only the live channels, counted from its own shapes) at 8 bits."""
    small_specs = cost.layer_specs(small_model, X)
    small_params = _params(small_model)
    small = cost.exact_costs(small_params, small_specs)
    assert cost.exact_costs(pruned_params, pruned_specs) == small
    traced_costs = (cost.bops, cost.weight_memory, cost.activation_memory)
    traced = jax.jit(lambda p: [f(p, pruned_specs) for f in traced_costs])(pruned_params)
    assert [float(c) for c in traced] == [
        small[k] for k in ("bops", "weight_memory_bits", "activation_bits")
    ]
    rows = cost.layer_table(pruned_params, pruned_specs)
    small_rows = cost.layer_table(small_params, small_specs)
    for row, small_row in zip(rows, small_rows, strict=True):
        assert (row["macs"], row["bops"]) == (small_row["macs"], small_row["bops"])
        assert row["weight_memory_bits"] == small_row["weight_memory_bits"]


def test_removed_channels_cost_what_a_smaller_network_costs():
    model = models.LeNet5(prune=True)
    specs = cost.layer_specs(model, X)
    params = _params(model)
    _same_costs(params, specs, models.LeNet5())  # nothing removed: today's cost
    # conv1 keeps 4 of 6, conv2 11 of 16 (fc1 sees 4*4*11 = 176 features), fc1 100, fc2 70.
    params = _remove(params, "conv1", [0, 3])
    params = _remove(params, "conv2", range(5))
    params = _remove(params, "fc1", range(20))
    params = _remove(params, "fc2", range(70, 84))
    _same_costs(params, specs, models.LeNet5(channels=(4, 11), hidden=(100, 70)))
    rows = {row["layer"]: row for row in cost.layer_table(params, specs)}
    assert (rows["conv2"]["live_channels"], rows["conv2"]["live_inputs"]) == (11, 4)
    assert (rows["fc1"]["live_inputs"], rows["fc1"]["inputs"]) == (176, 256)
    assert rows["conv1"]["weight_bits"] == [0, 8, 8, 0, 8, 8]


def test_the_minimum_keeps_one_channel_per_layer():
    specs = cost.layer_specs(models.LeNet5(prune=True), X)
    small_specs = cost.layer_specs(models.LeNet5(channels=(1, 1), hidden=(1, 1)), X)
    assert cost.min_costs(specs) == cost.min_costs(small_specs)
    assert cost.min_cost(specs) < cost.min_cost(cost.layer_specs(models.LeNet5(), X))


def test_the_cost_gradient_reaches_every_live_channel_only():
    model = models.LeNet5(prune=True)
    specs = cost.layer_specs(model, X)
    params = _remove(_params(model), "conv1", [1])
    grad = jax.jit(jax.grad(lambda p: cost.bops(p, specs)))(params)["conv1"]["weight_quantizer"]
    assert np.all(np.asarray(grad[1]) == 0.0)
    assert np.all(np.asarray(grad[[0, 2, 3, 4, 5], 0]) < 0.0)  # a finer step costs more


class _Residual(nn.Module):
    """conv a -> relu -> conv b, plus a's output -> relu -> pool -> flatten -> dense."""

    clip_low: float = 0.0

    @nn.compact
    def __call__(self, x):
        opts = {"per_channel": True, "prune": True, "input_signed": True}
        a = nn.relu(qnn.QuantConv(4, (3, 3), padding="SAME", name="a", **opts)(x))
        b = qnn.QuantConv(4, (1, 1), name="b", **opts)(a)
        y = jnp.clip(a + b, self.clip_low, 6.0)
        y = nn.max_pool(y, (2, 2), strides=(2, 2))
        return qnn.QuantDense(3, name="head", input_signed=True)(jnp.reshape(y, (y.shape[0], -1)))


def test_sources_follow_residual_adds_pools_and_flattens():
    specs = cost.layer_specs(_Residual(), jnp.zeros((1, 8, 8, 1)))
    a, b = 0, 4  # global channel numbers: a's outputs are 0-3, b's 4-7 (channels.offsets)
    assert specs[1].input_sources == tuple((a + c,) for c in range(4))
    head = specs[2].input_sources
    assert len(head) == 4 * 4 * 4
    assert head[:4] == tuple((a + c, b + c) for c in range(4))  # the add's union
    # A clip whose low bound is above 0 makes every channel nonzero: nothing is removable.
    specs = cost.layer_specs(_Residual(clip_low=0.5), jnp.zeros((1, 8, 8, 1)))
    assert set(specs[2].input_sources) == {(channels.ALWAYS,)}


def test_an_input_channel_dies_only_when_all_its_sources_do():
    model = _Residual()
    x = jnp.zeros((1, 8, 8, 1))
    specs = cost.layer_specs(model, x)
    params = model.init(jax.random.key(0), x)["params"]
    params = _remove(params, "b", [0, 1])
    live_in = cost.live_channels(params, specs)[2][0]
    assert live_in.sum() == 4 * 4 * 4  # a's channels still feed the sum
    params = _remove(params, "a", [0])
    live_in, _ = cost.live_channels(params, specs)[2]
    assert live_in.reshape(4, 4, 4)[..., 0].sum() == 0 and live_in.sum() == 4 * 4 * 3


# --------------------------------------------------------------------------- the constraint


def _lenet_setup(lenet_calibration):
    model = models.LeNet5(prune=True)
    specs = cost.layer_specs(model, X)
    float_params = models.LeNet5(quantized=False).init(jax.random.key(0), X)["params"]
    params = qnn.init_quantizers(model, float_params, lenet_calibration)
    return model, specs, params


@pytest.fixture(scope="module")
def lenet_calibration():
    return jax.random.uniform(jax.random.key(1), (16, 28, 28, 1), jnp.float32)


def test_a_budget_below_the_unpruned_minimum_is_feasible_only_by_pruning(lenet_calibration):
    _, specs, params = _lenet_setup(lenet_calibration)
    unpruned_minimum = cost.min_cost(cost.layer_specs(models.LeNet5(), X))
    budget = unpruned_minimum // 2
    cost_fn = lambda p: cost.bops(p, specs)  # noqa: E731
    cgmq_jax.constrained_update(cost_fn, budget, prunable=cost.prunable_quantizers(specs)).init(
        params
    )
    with pytest.raises(InfeasibleBudgetError):  # without the mask: the old floors
        cgmq_jax.constrained_update(cost_fn, budget).init(params)
    with pytest.raises(InfeasibleBudgetError, match=f"{cost.min_cost(specs):,}"):
        check_budget(cost.min_cost(specs) - 1, specs)


def _noise_scan(lenet_calibration, budget, **options):
    """150 steps of random updates through the pruning constraint: ``(params, specs,
    costs, guarded)``, the exact cost after every step and whether the guard fired on it."""
    _, specs, params = _lenet_setup(lenet_calibration)
    cost_fn = lambda p: cost.bops(p, specs)  # noqa: E731
    tx = cgmq_jax.constrained_update(
        cost_fn, budget, prunable=cost.prunable_quantizers(specs), **options
    )
    state = tx.init(params)

    def step(carry, key):
        params, state = carry
        noise = jax.tree.map(
            lambda x: 1e-2 * jax.random.normal(key, jnp.shape(x), jnp.float32), params
        )
        guards = state.guard_steps
        updates, state = tx.update(noise, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), (cost_fn(params), state.guard_steps > guards)

    (params, _), (costs, guarded) = jax.jit(
        lambda p, s: jax.lax.scan(step, (p, s), jax.random.split(jax.random.key(0), 150))
    )(params, state)
    assert cost.exact_bops(params, specs) == costs[-1]
    return params, specs, np.asarray(costs), np.asarray(guarded)


@pytest.mark.parametrize(
    "options",
    [{}, {"refit_weight_ranges": True}, {"refit_weight_ranges": True, "admission": "gain"}],
    ids=["", "refit_weight_ranges", "refit_weight_ranges-gain"],
)
@pytest.mark.slow  # compiles a 150-step scan
def test_the_constraint_prunes_to_the_budget_and_stays_within_it(lenet_calibration, options):
    budget = 300_000  # below the unpruned minimum, 563,280
    params, specs, costs, guarded = _noise_scan(lenet_calibration, budget, **options)
    first = int(np.argmax(costs <= budget))
    assert costs[first] <= budget and np.all(costs[first:] <= budget)
    rows = cost.layer_table(params, specs)
    assert any(row["live_channels"] < row["channels"] for row in rows)  # it pruned
    assert all(row["live_channels"] >= 1 for row in rows)
    # On a guarded step (the whole proposal would cross the budget) the all-or-nothing guard
    # refuses every cost-raising move; the gain admission lets through the ones that fit.
    raised = np.diff(costs) > 0
    raised_when_guarded = int(np.sum(raised & guarded[1:]))
    if options.get("admission") == "gain":
        assert raised_when_guarded > 0
    else:
        assert raised_when_guarded == 0


def test_the_fill_never_revives_a_removed_channel(lenet_calibration):
    _, specs, params = _lenet_setup(lenet_calibration)
    params = _remove(params, "conv2", range(8))
    budget = cost.exact_bops(params, specs) + 200_000
    filled, steps = repair.greedy_fill(params, specs, budget)
    assert steps > 0
    assert cost.exact_bops(filled, specs) <= budget
    rows = {row["layer"]: row for row in cost.layer_table(filled, specs)}
    assert rows["conv2"]["live_channels"] == 8


def test_the_fill_gives_a_per_channel_quantizer_its_bits_one_channel_at_a_time(
    lenet_calibration,
):
    # Room for one bit on one of conv2's live channels, not for one on all of them: a
    # fill that moved whole per-channel leaves would leave it unused.
    _, specs, params = _lenet_setup(lenet_calibration)
    params, _ = repair.greedy_repair(params, specs, cost.exact_bops(params, specs) // 4)
    rows = {row["layer"]: row for row in cost.layer_table(params, specs)}
    per_bit = rows["conv2"]["channel_macs"] * rows["conv2"]["input_bits"]
    budget = cost.exact_bops(params, specs) + per_bit
    filled, steps = repair.greedy_fill(params, specs, budget)
    report = certify.certify(filled, specs, budget)
    assert steps >= 1
    assert report["bops"] + report["one_more_bit_bops"] > budget  # no single bit fits now
    before = np.asarray(rows["conv2"]["weight_bits"])
    after = np.asarray({r["layer"]: r for r in report["layers"]}["conv2"]["weight_bits"])
    assert np.all(after >= before) and np.sum(after - before) <= steps
    assert np.all((after > 0) == (before > 0))  # no channel revived or removed


# --------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": "ptq"}, "--method cgmq only"),
        ({"trades": True}, "drop --trades and --admission within_bits"),
        ({"admission": "within_bits"}, "drop --trades and --admission within_bits"),
        ({"model": "dscnn", "admission": "within_bits"}, "all_or_nothing or gain only"),
    ],
)
def test_prune_refuses_what_it_does_not_support(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(prune=True, **fields).validate()


def test_prune_takes_the_gain_admission_when_asked():
    TrainConfig(model="dscnn", prune=True, admission="gain").validate()
    with pytest.raises(ValueError, match="not 'within_bits'"):
        cgmq_jax.constrained_update(
            lambda p: 0.0, 1.0, admission="within_bits", prunable=lambda p: p
        )


class _Plain(nn.Module):
    """A registered model without a ``prune`` field."""

    quantized: bool = True
    input_bits: int | None = None

    @nn.compact
    def __call__(self, x):
        return qnn.QuantDense(10)(jnp.reshape(x, (x.shape[0], -1)))


def test_a_model_without_a_pruning_option_is_named(monkeypatch):
    monkeypatch.setitem(models.MODELS, "plain", _Plain)
    with pytest.raises(ValueError, match="model 'plain' has no pruning option"):
        models.get_model("plain", prune=True)


def test_the_guard_under_prune_is_the_models_and_the_dscnn_refits():
    assert TrainConfig(model="dscnn", prune=True).admission == "gain"  # measured at 4e6
    assert TrainConfig(model="dscnn").admission == "gain"
    assert TrainConfig(prune=True).admission == "gain"  # LeNet-5, measured at 1e6
    assert TrainConfig().admission == "all_or_nothing"
    assert TrainConfig(model="lenet5_bb", prune=True).admission == "all_or_nothing"
    assert TrainConfig(prune=True, admission="all_or_nothing").admission == "all_or_nothing"
    assert TrainConfig(model="dscnn", prune=True).refits
    assert not TrainConfig(model="dscnn", prune=True, refit_ranges=False).refits


def test_ranges_are_refitted_by_default_and_with_prune_as_the_model_says():
    assert TrainConfig().refits and TrainConfig(prune=True).refits  # LeNet-5
    assert not TrainConfig(model="lenet5_bb", prune=True).refits
    assert TrainConfig(model="lenet5_bb", prune=True, refit_ranges=True).refits
    assert not TrainConfig(prune=True, refit_ranges=False).refits


def test_the_cli_stores_the_refit_under_prune():
    """With ``--prune``, ``--refit_ranges`` left out is stored as the model's, so a
    checkpoint written under the previous default (``None``: off) is refused by name."""
    from conftest import load_cli

    from cgmq_jax.runs import rundir

    cli = load_cli("mnist")
    assert cli.run_flags(cli.parse_args([]))["refit_ranges"] is None  # unpruned: unchanged
    lenet = cli.run_flags(cli.parse_args(["--prune"]))
    assert lenet["refit_ranges"] is True
    assert rundir.changed_flags({**lenet, "refit_ranges": None}, lenet) == ["refit_ranges"]
    bb = cli.run_flags(cli.parse_args(["--model", "lenet5_bb", "--prune"]))
    assert bb["refit_ranges"] is False
    assert not TrainConfig(refit_ranges=False).refits


def test_lenet5_bb_pruned_decays_the_quantizers_rate_and_the_cli_stores_it():
    """Pruned, ``lenet5_bb`` decays the quantizer learning rate by default (measured at
    0.36%); no other model or unpruned run changes. ``--quantizer_lr_decay`` left out is
    stored resolved, so its older pruned checkpoints (``False``) are refused by name."""
    from conftest import load_cli

    from cgmq_jax.runs import rundir

    assert TrainConfig(model="lenet5_bb", prune=True).quantizer_lr_decay is True
    chosen = TrainConfig(model="lenet5_bb", prune=True, quantizer_lr_decay=False)
    assert chosen.quantizer_lr_decay is False
    for model in ("lenet5", "dscnn", "mlp", "lenet5_bb"):
        assert TrainConfig(model=model).quantizer_lr_decay is False
    assert TrainConfig(model="dscnn", prune=True).quantizer_lr_decay is False
    cli = load_cli("mnist")
    assert cli.run_flags(cli.parse_args([]))["quantizer_lr_decay"] is False
    bb = cli.run_flags(cli.parse_args(["--model", "lenet5_bb", "--prune"]))
    assert bb["quantizer_lr_decay"] is True
    older = {**bb, "quantizer_lr_decay": False}
    assert rundir.changed_flags(older, bb) == ["quantizer_lr_decay"]
    chosen = ["--model", "lenet5_bb", "--prune", "--no-quantizer_lr_decay"]
    assert cli.run_flags(cli.parse_args(chosen))["quantizer_lr_decay"] is False


def test_without_prune_models_are_todays():
    assert models.get_model("lenet5") == models.LeNet5()
    specs = cost.layer_specs(models.get_model("lenet5"), X)
    assert all(spec.input_sources is None and not spec.prune for spec in specs)
    assert cost.prunable_quantizers(specs) is None


# --------------------------------------------------------------------------- quantize_model, NNX


class _PlainNet(nn.Module):
    """A user's own linen model: conv -> relu -> pool -> flatten -> dense -> dense."""

    channels: int = 6
    hidden: int = 20

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(nn.relu(nn.Conv(self.channels, (5, 5), name="conv")(x)), (2, 2), (2, 2))
        x = nn.relu(nn.Dense(self.hidden, name="fc")(jnp.reshape(x, (x.shape[0], -1))))
        return nn.Dense(10, name="head")(x)


def test_quantize_model_rules_prune_a_users_own_model():
    from cgmq_jax import rules

    prune = rules.QuantRule(module_path="conv|fc", input_signed=False, per_channel=True, prune=True)
    model = rules.quantize_model(_PlainNet(), [prune, rules.QuantRule(input_signed=False)])
    specs = cost.layer_specs(model, X)
    assert [spec.prune for spec in specs] == [True, True, False]
    params = _remove(model.init(jax.random.key(0), X)["params"], "conv", [0, 1])
    params = _remove(params, "fc", range(5))
    unsigned = rules.QuantRule(input_signed=False)
    small = rules.quantize_model(_PlainNet(channels=4, hidden=15), unsigned)
    _same_costs(params, specs, small)
    np.testing.assert_array_equal(  # the removed conv channels' outputs are 0 everywhere
        cost.live_channels(params, specs)[1][0].reshape(-1, 6)[0], [False] * 2 + [True] * 4
    )


def test_nnx_layers_prune_and_cost_what_a_smaller_network_costs():
    from flax import nnx

    from cgmq_jax import nnx as cnnx

    class Net(nnx.Module):
        def __init__(self, channels, hidden, prune, rngs):
            opts = {"input_signed": False, "per_channel": prune, "prune": prune}
            self.conv = cnnx.QuantConv(1, channels, (5, 5), strides=2, rngs=rngs, **opts)
            self.fc = cnnx.QuantLinear(14 * 14 * channels, hidden, rngs=rngs, **opts)
            self.head = cnnx.QuantLinear(hidden, 10, input_signed=False, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.conv(x))
            return self.head(nnx.relu(self.fc(jnp.reshape(x, (x.shape[0], -1)))))

    images = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
    model = Net(6, 20, True, nnx.Rngs(0))
    cnnx.calibrate(model, images)
    specs = cnnx.layer_specs(model, images[:1])
    state = nnx.state(model, nnx.Param)
    mask = cost.prunable_quantizers(specs)(state)
    flags = {
        "/".join(map(str, path)): bool(leaf.get_value())
        for path, leaf in nnx.to_flat_state(mask)
        if "quantizer" in str(path[-1])
    }
    assert flags == {
        "conv/weight_quantizer": True,
        "conv/input_quantizer": False,
        "fc/weight_quantizer": True,
        "fc/input_quantizer": False,
        "head/weight_quantizer": False,
        "head/input_quantizer": False,
    }
    leaf = model.conv.weight_quantizer[...]
    model.conv.weight_quantizer[...] = leaf.at[:2].set(
        quantizer.at_min_bitwidth(leaf[:2], prune=True)
    )
    out = model.conv(images)
    np.testing.assert_array_equal(out[..., :2], np.zeros_like(out[..., :2]))
    small = Net(4, 20, False, nnx.Rngs(0))
    cnnx.calibrate(small, images)
    small_specs = cnnx.layer_specs(small, images[:1])
    assert cost.exact_costs(nnx.state(model, nnx.Param), specs) == cost.exact_costs(
        nnx.state(small, nnx.Param), small_specs
    )


@pytest.mark.slow
def test_a_prune_run_below_the_unpruned_minimum_is_repaired_and_certified_over_live_channels(
    tmp_path, tiny_mnist, monkeypatch, standard_promotion_fixture
):
    import json

    from conftest import load_cli

    from cgmq_jax import data

    monkeypatch.setattr(data, "load", lambda *a, **k: tiny_mnist)
    budget = 450_000  # the unpruned LeNet-5's minimum is 563,280
    flags = ["--epochs", "4", "--pretrain_epochs", "2", "--batch_size", "32", "--lr", "3e-3"]
    flags += ["--budget_bops", str(budget), "--prune", "--out", str(tmp_path / "p")]
    # Not LeNet-5's defaults with --prune (the refit, the gain guard: tested above): each
    # adds to the train step's compile (the gain guard 47 -> 73 s for this test, loaded).
    flags += ["--no-refit_ranges", "--admission", "all_or_nothing"]
    assert load_cli("mnist").main(flags) == 0
    results = json.loads((tmp_path / "p" / "results.json").read_text())
    rows = results["certificate"]["layers"]
    assert results["bops"] == sum(row["bops"] for row in rows) <= budget
    assert results["flags"]["prune"] is True
    assert any(row["live_channels"] < row["channels"] for row in rows)
    for row in rows:  # a removed channel has 0 bits; the live ones carry the MACs
        bits = row["weight_bits"]
        if isinstance(bits, list):
            assert sum(b > 0 for b in bits) == row["live_channels"]
            assert row["bops"] == row["channel_macs"] * sum(bits) * row["input_bits"]
        else:
            assert row["bops"] == row["macs"] * bits * row["input_bits"]
    # 48 QAT steps do not reach the budget: the repair does, removing channels (the
    # repair's removals: tests above; the constraint's: the 150-step scan).
    assert not any(row["within_budget"] for row in results["history"] if row["phase"] == "qat")


@pytest.mark.slow  # about 1,400 repair steps
def test_the_repair_removes_channels_when_the_floors_are_over_the_budget(lenet_calibration):
    _, specs, params = _lenet_setup(lenet_calibration)
    params = repair.greedy_repair(params, specs, 10**9)[0]  # (nothing to do at 8 bits)
    low = jax.tree_util.tree_map_with_path(  # every quantizer at its floor, nothing removed
        lambda path, leaf: quantizer.at_min_bitwidth(leaf)
        if quantizer.is_quantizer_path(path)
        else leaf,
        params,
    )
    budget = 400_000  # below the unpruned minimum, 563,280
    repaired, steps = repair.greedy_repair(low, specs, budget)
    assert 0 < steps and cost.exact_bops(repaired, specs) <= budget
    rows = cost.layer_table(repaired, specs)
    assert any(row["live_channels"] < row["channels"] for row in rows)
    assert all(row["live_channels"] >= 1 for row in rows)


def test_an_infeasible_budget_names_prune_where_it_would_fit():
    from cgmq_jax.runs import setup

    with pytest.raises(InfeasibleBudgetError, match="or add --prune.*32,054"):
        setup.check_config(TrainConfig(budget_bops=3e5))
    with pytest.raises(InfeasibleBudgetError, match=r"5\.633e\+05 or more$"):
        setup.check_config(TrainConfig(budget_bops=3e4))  # below even the pruned minimum
    with pytest.raises(InfeasibleBudgetError, match="down to one channel"):
        setup.check_config(TrainConfig(budget_bops=3e4, prune=True))
