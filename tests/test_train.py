"""End-to-end: fit on a tiny synthetic MNIST, the CLI's errors and exit codes, the outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import load_cli

from cgmq_jax import certify, cost, data, models, report, train

ROOT = Path(__file__).resolve().parents[1]
LENET_MACS = 281640


pytestmark = pytest.mark.usefixtures("standard_promotion_fixture")  # optax.adam


def test_fit_returns_a_certified_model_within_budget(tiny_mnist):
    config = train.TrainConfig(budget_bops=2e6, epochs=1, pretrain_epochs=1, batch_size=64)
    result = train.fit(config, tiny_mnist, log=lambda _: None)
    certificate = result.certificate
    specs = cost.layer_specs(models.LeNet5(), tiny_mnist.train[0][:1])
    assert certificate["within_budget"]
    assert certificate["bops"] == cost.exact_bops(result.params, specs) <= 2e6
    assert sum(row["bops"] for row in certificate["layers"]) == certificate["bops"]
    assert 0.0 <= result.test_accuracy <= 1.0
    assert [row["phase"] for row in result.history] == ["float", "qat"]


def test_repair_makes_an_over_budget_model_feasible():
    model = models.LeNet5()
    x = np.zeros((1, 28, 28, 1), np.float32)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    specs = cost.layer_specs(model, x)
    assert cost.exact_bops(params, specs) == LENET_MACS * 64
    repaired, removed = certify.greedy_repair(params, specs, 1e6)
    assert cost.exact_bops(repaired, specs) <= 1e6
    assert 0 < removed <= 10 * 7  # at most the bits above the floors
    assert certify.certify(repaired, specs, 1e6)["within_budget"]
    with pytest.raises(AssertionError, match="certificate refused"):
        certify.certify(params, specs, 1e6)


@pytest.mark.parametrize("budget", ["1e5", "5e5"])
def test_infeasible_budget_exits_2_and_states_the_minimum(budget, capsys):
    status = load_cli("mnist").main(
        ["--budget_bops", budget, "--data", "idx", "--data_dir", "/nope"]
    )
    message = capsys.readouterr().err
    assert status == 2
    assert "infeasible" in message and f"{LENET_MACS * 2:,}" in message
    assert f"{float(budget):,.0f}" in message


@pytest.mark.parametrize("budget", ["-1", "0", "nan", "inf"])
def test_bad_budgets_are_rejected(budget, capsys):
    status = load_cli("mnist").main(["--budget_bops", budget])
    assert status == 2
    assert "positive finite" in capsys.readouterr().err


def test_missing_data_is_a_one_line_error(tmp_path, capsys):
    status = load_cli("mnist").main(["--data", "idx", "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("error:") and len(err.splitlines()) == 1


def test_cli_writes_results(tmp_path, tiny_mnist, monkeypatch):
    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: tiny_mnist)
    out = tmp_path / "run"
    argv = ["--budget_bops", "2e6", "--epochs", "1", "--pretrain_epochs", "0", "--out", str(out)]
    assert load_cli("mnist").main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["certificate"]["within_budget"] and results["bops"] <= 2e6
    assert results["flags"]["budget_bops"] == 2e6 and results["seed"] == 0
    assert results["versions"]["jax"]
    assert (out / "training.png").stat().st_size > 0
    params = report.load_params(out)
    specs = cost.layer_specs(models.LeNet5(), tiny_mnist.train[0][:1])
    assert cost.exact_bops(params, specs) == results["bops"]
    assert math.isfinite(results["test_accuracy"])
