"""Post-training quantization (cgmq_jax.ptq, --method ptq): within every limit, certified,
bits where the loss needs them, the infeasible message; end to end through the CLI."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_cli, standard_promotion

from cgmq_jax import certify, cost, ptq
from cgmq_jax import nn as qnn
from cgmq_jax.limits import InfeasibleBudgetError, limits_of


class TwoBranch(nn.Module):
    """Two dense layers side by side on the same input, their outputs summed: the same
    MACs each, so a bit costs the same in either. ``pinned``: the loud layer's weights per
    channel, the quiet layer's input pinned at 4 bits."""

    quantized: bool = True
    pinned: bool = False

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        options = {"quantize": self.quantized, "input_signed": False}
        loud = {"per_channel": True} if self.pinned else {}
        quiet = {"input_bits": 4} if self.pinned else {}
        return qnn.QuantDense(4, name="loud", **options, **loud)(x) + qnn.QuantDense(
            4, name="quiet", **options, **quiet
        )(x)


def _distillation_loss(model, float_model, float_params, images):
    """The squared distance of the quantized network's outputs to the float network's."""
    target = float_model.apply({"params": float_params}, images)

    def loss(params):
        return jnp.mean(jnp.square(model.apply({"params": params}, images) - target))

    return loss


@pytest.fixture(scope="module")
def two_branch():
    """``(model, params at 8 bits, specs, loss, float params, images)``; the quiet branch's
    weights 1000 times smaller than the loud one's, so its quantization barely moves the
    output."""
    model = TwoBranch()
    float_model = model.clone(quantized=False)
    images = jax.random.uniform(jax.random.key(0), (32, 4, 4, 1))
    float_params = float_model.init(jax.random.key(1), images)["params"]
    float_params = dict(float_params)
    float_params["quiet"] = jax.tree.map(lambda leaf: leaf * 1e-3, float_params["quiet"])
    params = jax.device_get(qnn.init_quantizers(model, float_params, images))
    specs = cost.layer_specs(model, images[:1], params=params)
    loss = _distillation_loss(model, float_model, float_params, images)
    return model, params, specs, loss, float_params, images


def test_pinned_quantizers_stay_and_per_channel_ones_move_together(two_branch):
    float_params, images = two_branch[4:]
    model = TwoBranch(pinned=True)
    params = jax.device_get(qnn.init_quantizers(model, float_params, images))
    specs = cost.layer_specs(model, images[:1], params=params)
    loss = _distillation_loss(model, model.clone(quantized=False), float_params, images)
    allocated, record = ptq.allocate(params, specs, 3_000, loss)
    assert certify.certify(allocated, specs, 3_000)["within_budget"]
    assert "quiet/input_quantizer" not in record["quantizers"]
    loud, quiet = cost.layer_table(allocated, specs)
    assert quiet["input_bits"] == 4 and len(set(loud["weight_bits"])) == 1
    assert loud["weight_bits"][0] == record["quantizers"]["loud/weight_quantizer"]["bits"]


def _bits(params, specs):
    return {
        f"{row['layer']}/{kind}": row[f"{kind}_bits"]
        for row in cost.layer_table(params, specs)
        for kind in ("weight", "input")
    }


def test_a_more_sensitive_quantizer_keeps_more_bits(two_branch):
    _, params, specs, loss = two_branch[:4]
    minimum, start = cost.min_cost(specs), cost.exact_bops(params, specs)
    budget = (minimum + start) // 2  # half way: a cost-only rule would split the bits evenly
    allocated, record = ptq.allocate(params, specs, budget, loss)
    bits = _bits(allocated, specs)
    assert bits["loud/weight"] > bits["quiet/weight"] == 2  # quiet at its floor
    assert bits["loud/input"] > bits["quiet/input"] == 1
    assert record["bits_removed"] >= 1 and record["loss_evaluations"] > record["bits_removed"]


LIMITS = {  # the network: 8,192 BOPs, 1,280 weight bits, 128 activation bits at 8 bits
    "bops low": 600,
    "bops high": 6_000,
    "weight memory": {"weight_memory_bits": 800},
    "all three": {"bops": 3_000, "weight_memory_bits": 900, "activation_bits": 64},
}


@pytest.mark.parametrize("budget", LIMITS.values(), ids=LIMITS.keys())
def test_within_every_limit_and_certified(two_branch, budget):
    _, params, specs, loss = two_branch[:4]
    allocated, record = ptq.allocate(params, specs, budget, loss)
    report = certify.certify(allocated, specs, budget)  # refuses anything over a limit
    limits = limits_of(budget)
    assert report["within_budget"]
    assert all(report["limits"][name]["cost"] <= limit for name, limit in limits.items())
    # Weights and biases are the calibrated network's; only quantizer leaves moved.
    flat = jax.tree_util.tree_flatten_with_path(allocated)[0]
    before = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in flat:
        if "quantizer" not in str(path[-1]):
            np.testing.assert_array_equal(leaf, before[path])
    assert set(record["quantizers"]) == {
        f"{layer}/{kind}_quantizer" for layer in ("loud", "quiet") for kind in ("weight", "input")
    }


def test_an_infeasible_budget_states_the_minimum_before_any_loss(two_branch):
    _, params, specs, _ = two_branch[:4]

    def never(_):
        raise AssertionError("no loss is computed for an infeasible budget")

    minimum = cost.min_cost(specs)
    with pytest.raises(
        InfeasibleBudgetError, match=f"minimum achievable cost.*{minimum:,}"
    ):
        ptq.allocate(params, specs, minimum - 1, never)
    with pytest.raises(InfeasibleBudgetError, match="weight_memory_bits limit"):
        ptq.allocate(params, specs, {"weight_memory_bits": 10}, never)


def test_the_config_takes_ptq_with_a_limit():
    from cgmq_jax.runs import train

    assert "ptq" in train.METHODS
    config = train.TrainConfig(method="ptq", budget_bops=4e6)
    config.validate()
    assert config.guarded_limits == {"bops": 4e6}
    with pytest.raises(ValueError, match="needs a limit"):
        train.TrainConfig(method="ptq", budget_bops=None).validate()
    with pytest.raises(InfeasibleBudgetError, match="563,280 BOPs"):
        train.check_config(train.TrainConfig(method="ptq", budget_bops=5e5))


@pytest.mark.slow
def test_the_cli_runs_ptq_from_a_float_checkpoint_certified_and_exportable(
    tiny_mnist, tmp_path, monkeypatch
):
    from cgmq_jax import data

    monkeypatch.setattr(data, "load", lambda *a, **k: tiny_mnist)
    mnist = load_cli("mnist")
    common = ["--model", "mlp", "--batch_size", "32", "--lr", "3e-3"]
    with standard_promotion():
        floated = tmp_path / "float"
        assert (
            mnist.main(["--method", "float", "--epochs", "2", *common, "--out", str(floated)]) == 0
        )
        out = tmp_path / "ptq"
        argv = ["--method", "ptq", "--budget_bops", "1e6", "--float_checkpoint", str(floated)]
        assert mnist.main([*argv, *common, "--out", str(out)]) == 0
        # A run that is not a float run is refused (exit 2), before any training.
        bad = ["--method", "ptq", "--float_checkpoint", str(out), "--out", str(tmp_path / "x")]
        assert mnist.main(bad) == 2
    results = json.loads((out / "results.json").read_text())
    certificate = results["certificate"]
    assert certificate["within_budget"] and certificate["bops"] <= 1e6
    assert results["history"] == []  # no float epoch trained: the checkpoint's network
    record = certificate["ptq"]
    assert record["bits_removed"] > 0 and set(record["timings"]) == {
        "calibrate",
        "allocate",
        "tune",
    }
    assert results["float_val_accuracy"] is not None and "collapsed" in results
    export = load_cli("export")
    assert export.main([str(out), "--check"]) == 0


def test_the_sweep_runs_ptq_beside_cgmq_from_the_shared_float_network(tiny_mnist, tmp_path):
    from cgmq_jax.runs import sweep, train

    calls = []

    def fake_fit(config, dataset, *, log=print, float_params=None):
        calls.append((config.method, float_params is not None))
        certificate = {"bops": 100, "relative_bops_percent": 1.0, "within_budget": True}
        return train.FitResult(
            config=config,
            params={"kernel": 1.0},
            history=[],
            test_accuracy=0.9,
            certificate={**certificate, "layers": []},
            wall_seconds=1.0,
            data_source="synthetic",
        )

    assert "ptq" not in sweep.DEFAULT_METHODS  # on request: the default grid is unchanged
    runs = sweep.grid(budgets=[2e6], seeds=[0], lams=[], fixed_bits=[], methods=["cgmq", "ptq"])
    rows = sweep.run_grid(
        runs, tiny_mnist, tmp_path / "runs.csv", epochs=2, pretrain_epochs=1, fit=fake_fit,
        log=lambda _: None,
    )  # fmt: skip
    assert calls == [("float", False), ("cgmq", True), ("ptq", True)]
    assert [(r["method"], r["epochs"]) for r in rows] == [("cgmq", "2"), ("ptq", "0")]
    assert "| ptq | 2e+06 |  | 1 | 90.00" in sweep.summarize(rows)


def test_the_weight_training_after_ptq_does_not_depend_on_the_qat_epochs(tiny_mnist):
    from cgmq_jax.runs import ptq as run_ptq
    from cgmq_jax.runs import train
    from cgmq_jax.runs.setup import _make_setup

    tuned = []
    for epochs in (2, 25):
        config = train.TrainConfig(method="ptq", model="mlp", epochs=epochs, batch_size=32)
        setup = _make_setup(config, tiny_mnist, pretrained=True)
        images, labels = run_ptq.tune_split(setup, tiny_mnist.train)
        tuned.append((run_ptq._tune_setup(setup, images), images, labels))
    (first, images, labels), (second, *other) = tuned
    assert first.qat_epochs == second.qat_epochs == range(5, 5)  # epoch 5's batch order
    assert first.steps_per_epoch == second.steps_per_epoch == len(labels) // 32
    np.testing.assert_array_equal(images, other[0])
    assert len(labels) == min(run_ptq.TUNE_IMAGES, len(tiny_mnist.train[1]))


def test_a_loss_compiled_by_the_caller_gives_the_same_allocation(two_branch):
    _, params, specs, loss = two_branch[:4]
    calls = []
    jitted = jax.jit(loss)

    def compiled(params):  # called on each candidate's parameter tree, not traced
        calls.append(1)
        return jitted(params)

    allocated, record = ptq.allocate(params, specs, 6_000, compiled, compiled=True)
    expected, expected_record = ptq.allocate(params, specs, 6_000, loss)
    assert len(calls) == record["loss_evaluations"] == expected_record["loss_evaluations"]
    assert record["quantizers"] == expected_record["quantizers"]
    assert _bits(allocated, specs) == _bits(expected, specs)
