"""The baselines (dq penalty, fixed bits) and the resumable sweep."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from cgmq_jax import cost, models, quantizer, sweep, train

LENET_MACS = 281640


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax.adam, see conftest.py
        yield


def _at_bits(params, bits):
    def set_bits(path, leaf):
        if not quantizer.is_quantizer_path(path):
            return leaf
        signed = path[-1].key == "weight_quantizer"  # LeNet-5's inputs are unsigned
        d, q_max = quantizer.init_at_bits(0.5, bits, signed=signed)
        return quantizer.latents(d, q_max)

    return jax.tree_util.tree_map_with_path(set_bits, params)


def test_dq_penalty_is_zero_when_feasible_and_grows_when_not(sample_input):
    model = models.LeNet5()
    params = jax.jit(model.init)(jax.random.key(0), sample_input)["params"]
    specs = cost.layer_specs(model, sample_input)
    penalties = []
    for bits in (2, 3, 4, 6, 8):  # cost 281640 * b * b
        penalties.append(float(train.dq_penalty(_at_bits(params, bits), specs, 5e6, lam=1.0)))
    assert penalties[:3] == [0.0, 0.0, 0.0]  # 1.1e6, 2.5e6, 4.5e6 <= 5e6
    assert 0 < penalties[3] < penalties[4]  # 10.1e6, 18.0e6 > 5e6
    expected = (LENET_MACS * 64 / 5e6 - 1) ** 2
    assert penalties[4] == pytest.approx(expected, rel=1e-5)
    grads = jax.grad(train.dq_penalty)(_at_bits(params, 8), specs, 5e6, 1.0)
    assert float(jnp.abs(grads["conv2"]["weight_quantizer"]).sum()) > 0


@pytest.mark.parametrize(("bits_w", "bits_a"), [(4, 4), (2, 3)])
def test_fixed_keeps_its_bitwidths_and_reports_their_exact_bops(tiny_mnist, bits_w, bits_a):
    config = train.TrainConfig(
        method="fixed", bits_w=bits_w, bits_a=bits_a, epochs=1, pretrain_epochs=0, batch_size=64
    )
    result = train.fit(config, tiny_mnist, log=lambda _: None)
    assert result.certificate["bops"] == LENET_MACS * bits_w * bits_a
    assert {(r["weight_bits"], r["input_bits"]) for r in result.certificate["layers"]} == {
        (bits_w, bits_a)
    }


def test_sweep_resumes_without_redoing_finished_rows(tiny_mnist, tmp_path):
    calls = []

    def counting_fit(config, dataset, **kwargs):
        calls.append(config.method)
        return train.fit(config, dataset, **kwargs)

    runs = sweep.grid(budgets=[2e6], seeds=[0], lams=[1.0], fixed_bits=[(4, 4)])
    base = dataclasses.replace(train.TrainConfig(), batch_size=64)
    path = tmp_path / "runs.csv"
    kwargs = {"epochs": 1, "pretrain_epochs": 1, "base": base, "fit": counting_fit}
    rows = sweep.run_grid(runs[:2], tiny_mnist, path, log=lambda _: None, **kwargs)
    assert [r["method"] for r in rows] == ["float", "fixed"]
    assert calls == ["float", "fixed"]
    calls.clear()
    rows = sweep.run_grid(runs, tiny_mnist, path, log=lambda _: None, **kwargs)
    # float and fixed are done: only the float checkpoint is rebuilt, then cgmq and dq run.
    assert calls == ["float", "cgmq", "dq"]
    assert [r["method"] for r in rows] == ["float", "fixed", "cgmq", "dq"]
    assert rows[2]["within_budget"] == "True"
    calls.clear()
    sweep.run_grid(runs, tiny_mnist, path, log=lambda _: None, **kwargs)
    assert calls == []
    summary = sweep.summarize(rows)
    assert "| cgmq | 2e+06 |" in summary and "1/1" in summary
    sweep.plot_pareto(rows, tmp_path / "pareto.png", [2e6])
    assert (tmp_path / "pareto.png").stat().st_size > 0
