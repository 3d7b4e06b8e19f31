"""The baselines (dq penalty, fixed bits) and the resumable sweep."""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import pytest
from conftest import load_cli

from cgmq_jax import cost, data, models, quantizer, sweep, train

LENET_MACS = 281640
ROOT = pathlib.Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("standard_promotion_fixture")  # optax.adam


def _at_bits(params, bits):
    def set_bits(path, leaf):
        if not quantizer.is_quantizer_path(path):
            return leaf
        signed = path[-1].key == "weight_quantizer"  # LeNet-5's inputs are unsigned
        d, q_max = quantizer.init_at_bits(0.5, bits, signed=signed)
        return quantizer.latents(d, q_max)

    return jax.tree_util.tree_map_with_path(set_bits, params)


def test_dq_penalty_is_zero_when_feasible_and_grows_when_not(sample_input, lenet_init_params):
    model = models.LeNet5()
    params = lenet_init_params  # jax.jit(model.init)(jax.random.key(0), sample_input)["params"]
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
@pytest.mark.slow
def test_fixed_keeps_its_bitwidths_and_reports_their_exact_bops(tiny_mnist, bits_w, bits_a):
    config = train.TrainConfig(
        method="fixed", bits_w=bits_w, bits_a=bits_a, epochs=1, pretrain_epochs=0, batch_size=64
    )
    result = train.fit(config, tiny_mnist, log=lambda _: None)
    assert result.certificate["bops"] == LENET_MACS * bits_w * bits_a
    assert {(r["weight_bits"], r["input_bits"]) for r in result.certificate["layers"]} == {
        (bits_w, bits_a)
    }


@pytest.mark.slow
def test_sweep_resumes_without_redoing_finished_rows(tiny_mnist, tmp_path):
    calls, configs = [], []

    def counting_fit(config, dataset, **kwargs):
        calls.append(config.method)
        configs.append(config)
        return train.fit(config, dataset, **kwargs)

    runs = sweep.grid(budgets=[2e6], seeds=[0], lams=[1.0], fixed_bits=[(4, 4)])
    base = dataclasses.replace(train.TrainConfig(), batch_size=64)
    path = tmp_path / "runs.csv"
    kwargs = {"epochs": 1, "pretrain_epochs": 1, "base": base, "fit": counting_fit}
    rows = sweep.run_grid(runs[:2], tiny_mnist, path, log=lambda _: None, **kwargs)
    assert [r["method"] for r in rows] == ["float", "fixed"]
    # the float row trains pretrain + QAT epochs on its own; fixed starts from a 1-epoch one.
    assert calls == ["float", "float", "fixed"]
    assert [c.epochs for c in configs] == [2, 1, 1]
    assert [r["epochs"] for r in rows] == ["2", "1"]
    for row in rows:
        losses = row["epoch_losses"].split()
        assert len(losses) == int(row["epochs"]) and losses[-1] == row["final_loss"]
        assert all(float(loss) > 0 for loss in losses)
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


# ------------------------------------------------------------------ fast checks (a fake fit)


class FakeFit:
    """Stands in for :func:`train.fit`: records each call, returns a made-up history.

    Epoch ``k`` (1-based) of a run has loss ``1 / k + seed / 100``; a quantized run that
    pretrains its own float network (no ``float_params``) also has those float epochs.
    """

    def __init__(self):
        self.calls = []  # (config, float_params, result)

    def __call__(self, config, dataset, *, log=print, float_params=None):
        def epochs(phase, n):
            return [
                {"epoch": k, "phase": phase, "loss": 1 / k + config.seed / 100, "val_accuracy": 0.5}
                for k in range(1, n + 1)
            ]

        quantized = config.method != "float"
        history = epochs("float", config.pretrain_epochs if quantized else config.epochs)
        if quantized:
            history = (history if float_params is None else []) + epochs("qat", config.epochs)
        bits = {"float": 32, "fixed": config.bits_w}.get(config.method, 4)
        within = None if config.method in ("float", "fixed") else config.method == "cgmq"
        certificate = {
            "bops": LENET_MACS * bits * bits,
            "relative_bops_percent": 100 * bits * bits / 1024,
            "within_budget": within,
            "layers": [{"layer": "conv1", "weight_bits": bits, "input_bits": bits}],
        }
        result = train.FitResult(
            config=config,
            params=object(),
            history=history,
            test_accuracy=0.9,
            certificate=certificate,
            wall_seconds=0.5,
            data_source="fake",
        )
        self.calls.append((config, float_params, result))
        return result


def _fake_sweep(tiny_mnist, tmp_path, *, epochs=3, pretrain_epochs=2):
    fake = FakeFit()
    runs = sweep.grid(budgets=[2e6], seeds=[0, 1], lams=[0.1, 1.0], fixed_bits=[(4, 4)])
    rows = sweep.run_grid(
        runs,
        tiny_mnist,
        tmp_path / "runs.csv",
        epochs=epochs,
        pretrain_epochs=pretrain_epochs,
        fit=fake,
        log=lambda _: None,
    )
    return fake, rows


def test_float_row_trains_as_long_as_the_quantized_runs(tiny_mnist, tmp_path):
    fake, rows = _fake_sweep(tiny_mnist, tmp_path, epochs=3, pretrain_epochs=2)
    floats = [(c, p) for c, p, _ in fake.calls if c.method == "float"]
    # per seed: the float row (5 epochs, from scratch), then the shared 2-epoch checkpoint.
    assert [(c.seed, c.epochs, p) for c, p in floats] == [
        (0, 5, None),
        (0, 2, None),
        (1, 5, None),
        (1, 2, None),
    ]
    checkpoints = {
        c.seed: r.params for c, _, r in fake.calls if c.method == "float" and c.epochs == 2
    }
    quantized = [(c, p) for c, p, _ in fake.calls if c.method != "float"]
    assert len(quantized) == 2 * 4  # fixed, cgmq, dq x2 per seed
    for config, float_params in quantized:
        assert config.epochs == 3 and config.pretrain_epochs == 2
        assert float_params is checkpoints[config.seed]  # the shared pretraining
    assert {r["method"]: r["epochs"] for r in rows} == {
        "float": "5",
        "fixed": "3",
        "cgmq": "3",
        "dq": "3",
    }


def test_rows_record_the_loss_of_every_epoch_of_the_run(tiny_mnist, tmp_path):
    fake, rows = _fake_sweep(tiny_mnist, tmp_path)
    with (tmp_path / "runs.csv").open(newline="") as f:
        assert tuple(next(csv.reader(f))) == sweep.COLUMNS
    assert {"final_loss", "epoch_losses"} <= set(sweep.COLUMNS)
    results = [r for c, _, r in fake.calls if not (c.method == "float" and c.epochs == 2)]
    assert len(results) == len(rows)
    for row, result in zip(rows, results, strict=True):
        phase = "float" if row["method"] == "float" else "qat"
        expected = [h["loss"] for h in result.history if h["phase"] == phase]
        assert row["epoch_losses"] == " ".join(f"{x:.4f}" for x in expected)
        assert row["final_loss"] == f"{expected[-1]:.4f}"
        assert len(expected) == int(row["epochs"])
    seed1_float = next(r for r in rows if r["method"] == "float" and r["seed"] == "1")
    assert seed1_float["epoch_losses"] == "1.0100 0.5100 0.3433 0.2600 0.2100"


def test_epoch_losses_leave_out_a_runs_own_float_pretraining():
    history = [
        {"phase": "float", "loss": 2.0},
        {"phase": "qat", "loss": 1.0},
        {"phase": "qat", "loss": 0.5},
    ]
    assert sweep.epoch_losses(history, "cgmq") == [1.0, 0.5]
    assert sweep.epoch_losses(history, "float") == [2.0]


def test_summary_has_the_final_loss_and_loss_png_is_written(tiny_mnist, tmp_path):
    _, rows = _fake_sweep(tiny_mnist, tmp_path)
    lines = sweep.summarize(rows).splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert "final loss median" in header
    column = header.index("final loss median")
    cells = {
        line.strip("|").split("|")[0].strip(): line.strip("|").split("|")[column].strip()
        for line in lines[2:]
    }
    # medians over seeds 0 and 1 of 1/5 + seed/100 (float) and 1/3 + seed/100 (quantized)
    assert cells["float"] == "0.2050"
    assert cells["cgmq"] == "0.3383"
    assert all(len(line.split("|")) == len(lines[0].split("|")) for line in lines)
    sweep.plot_losses(rows, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep.plot_losses([], tmp_path / "empty.png")  # nothing to draw is not an error
    assert (tmp_path / "empty.png").stat().st_size > 0


def test_run_grid_refuses_a_runs_csv_of_an_older_sweep(tiny_mnist, tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("method,budget_bops,lam,bits,seed,test_accuracy\n")

    def no_fit(*args, **kwargs):
        raise AssertionError("fit must not run")

    runs = sweep.grid(budgets=[2e6], seeds=[0], lams=[1.0], fixed_bits=[])
    with pytest.raises(ValueError, match="older sweep"):
        sweep.run_grid(runs, tiny_mnist, path, epochs=1, pretrain_epochs=1, fit=no_fit)


# ------------------------------------------------------------------ experiments/sweep.py


def test_cli_writes_runs_summary_and_both_plots(tiny_mnist, tmp_path, monkeypatch, capsys):
    fake = FakeFit()
    monkeypatch.setattr(data, "load", lambda *args, **kwargs: tiny_mnist)
    monkeypatch.setattr(train, "fit", fake)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--budgets", "2e6", "--lams", "1", "--seeds", "0"]
    assert load_cli("sweep").main(argv) == 0
    rows = sweep.read_rows(out / "runs.csv")
    assert [r["method"] for r in rows] == ["float", "fixed", "fixed", "fixed", "cgmq", "dq"]
    assert rows[0]["epochs"] == "4"  # quick preset: 2 float + 2 QAT epochs
    assert all(r["epochs"] == "2" for r in rows[1:])
    for name in ("pareto.png", "loss.png"):
        assert (out / name).stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert "float runs 4 float epochs" in summary and "final loss median" in summary
    assert "pareto.png, loss.png" in capsys.readouterr().out.splitlines()[-1]


def _existing_file(tmp_path):
    (tmp_path / "file").write_text("")
    return ["--out", str(tmp_path / "file")], "existing file"


def _under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    return ["--out", str(tmp_path / "file" / "out")], f"--out {tmp_path / 'file' / 'out'}:"


def _old_runs_csv(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "runs.csv").write_text("method,seed\n")
    return ["--out", str(tmp_path / "old")], "older sweep"


BAD_FLAGS = [
    (["--methods", "cgmq", "bogus"], "unknown method 'bogus' in --methods; choose from cgmq, dq"),
    (["--budgets", "2e6", "0"], "positive finite"),
    (["--budgets", "-1000000"], "positive finite"),
    (["--budgets", "nan"], "positive finite"),
    (["--budgets", "inf"], "positive finite"),
    (["--budgets", "1000"], "minimum achievable cost"),
    (["--lams", "0"], "--lams must be positive finite"),
    (["--lams", "1", "-1"], "--lams must be positive finite"),
    (["--lams", "inf"], "--lams must be positive finite"),
    (["--seeds", "0", "-1"], "--seeds must be non-negative"),
    (_existing_file, None),
    (_under_a_file, None),
    (_old_runs_csv, None),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS)
def test_cli_rejects_bad_flags_before_loading_data(tmp_path, monkeypatch, capsys, argv, message):
    def no_data(*args, **kwargs):
        raise AssertionError("data must not be loaded")

    monkeypatch.setattr(data, "load", no_data)
    monkeypatch.setattr(train, "fit", no_data)
    if callable(argv):
        argv, message = argv(tmp_path)
    else:
        argv = ["--out", str(tmp_path / "out"), *argv]
    assert load_cli("sweep").main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert message in err
    if "--out" in argv and argv[argv.index("--out") + 1] == str(tmp_path / "out"):
        assert not (tmp_path / "out").exists()  # flags are checked before --out is created


def test_cli_rejects_an_unwritable_out(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data, "load", refuse)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    out = tmp_path / "out"
    assert load_cli("sweep").main(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out {out}: cannot create or write the directory (Permission denied)\n"


def test_cli_probe_leaves_no_file_behind(tmp_path):
    cli = load_cli("sweep")
    args = cli.parse_args(["--out", str(tmp_path / "a" / "b")])
    assert cli.check_args(args) == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []


@pytest.mark.parametrize(
    ("shrink", "message"),
    [
        ({"train": 100}, "the train split has 100 examples, fewer than one batch"),
        ({"validation": 0}, "the validation split of synthetic is empty"),
        ({"test": 0}, "the test split of synthetic is empty"),
    ],
)
def test_cli_rejects_unusable_splits_before_training(
    tiny_mnist, tmp_path, monkeypatch, capsys, shrink, message
):
    ((name, n),) = shrink.items()
    dataset = dataclasses.replace(
        tiny_mnist, **{name: tuple(a[:n] for a in getattr(tiny_mnist, name))}
    )

    def no_fit(*args, **kwargs):
        raise AssertionError("fit must not run")

    monkeypatch.setattr(data, "load", lambda *args, **kwargs: dataset)
    monkeypatch.setattr(train, "fit", no_fit)
    assert load_cli("sweep").main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
