"""A run you can trust: checks before compute, atomic run directories, locks, checkpoint and
resume (bit-identical after SIGKILL and after Ctrl-C), no certificate for a broken model."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FINISHED_RUN, load_cli

from cgmq_jax import certify, cost, data, files, models, report, rundir, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "3", "--pretrain_epochs", "1", "--batch_size", "64"]


pytestmark = pytest.mark.usefixtures("standard_promotion_fixture")  # optax.adam


@pytest.fixture
def no_data(monkeypatch):
    """Fails the test if data would be loaded (checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("data was loaded before the bad input was reported")

    monkeypatch.setattr(data, "load", refuse)


@pytest.fixture
def tiny_data(monkeypatch, tiny_mnist):
    monkeypatch.setattr(data, "load", lambda *a, **k: tiny_mnist)
    return tiny_mnist


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.split("\r")[-1].strip()  # after any progress bar
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


# 1. Everything is validated before any compute --------------------------------------------


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--quantizer_lr", "inf"], "--quantizer_lr must be a positive finite"),
        (["--lr", "inf"], "--lr must be a positive finite"),
        (["--lr", "-1"], "--lr must be a positive finite"),
        (["--rescale", "1"], "--rescale"),
        (["--rescale", "nan"], "--rescale"),
        (["--train_examples", "-5"], "--train_examples -5 is fewer than one batch"),
        (["--train_examples", "10"], "--train_examples 10 is fewer than one batch"),
        (["--batch_size", "0"], "--batch_size must be an integer in"),
        (["--epochs", "0"], "--epochs must be an integer in"),
        (["--pretrain_epochs", "-1"], "--pretrain_epochs"),
        (["--fill_epochs", "-1"], "--fill_epochs must be an integer in [0, 10000]"),
        (["--bits_w", "1", "--method", "fixed"], "--bits_w"),
        (["--lam", "nan", "--method", "dq"], "--lam"),
        (["--seed", "-1"], "--seed"),
        (["--budget_bops", "1e5"], "infeasible"),
    ],
)
def test_bad_flags_fail_before_data_loading(flags, fragment, tmp_path, no_data, capsys):
    assert load_cli("mnist").main([*flags, "--out", str(tmp_path / "run")]) == 2
    assert fragment in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_unusable_out_fails_before_data_loading(tmp_path, no_data, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert load_cli("mnist").main(["--out", str(a_file)]) == 2
    assert "is an existing file" in _one_line_error(capsys)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    try:
        if os.access(read_only, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: a read-only directory is writable")
        assert load_cli("mnist").main(["--out", str(read_only / "run")]) == 2
        assert "cannot be written" in _one_line_error(capsys)
    finally:
        read_only.chmod(0o700)


@pytest.mark.parametrize(
    "split, size, fragment",
    [("validation", 0, "validation split"), ("test", 0, "test split"), ("train", 10, "fewer")],
)
def test_empty_splits_fail_before_training(
    split, size, fragment, tmp_path, monkeypatch, tiny_mnist
):
    cut = (tiny_mnist.train[0][:size], tiny_mnist.train[1][:size])
    broken = tiny_mnist.__class__(**{**tiny_mnist.__dict__, split: cut})
    monkeypatch.setattr(data, "load", lambda *a, **k: broken)
    monkeypatch.setattr(train, "make_train_step", pytest.fail)
    with pytest.raises(ValueError, match=fragment):
        train.fit(train.TrainConfig(epochs=1, pretrain_epochs=1), broken, log=lambda _: None)
    assert load_cli("mnist").main(["--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()  # the directory it made is gone again


# 2. A run directory is consistent or absent ----------------------------------------------


@pytest.mark.slow
@FINISHED_RUN
def test_published_run_is_verified_and_strict_json(tmp_path, finished_run, tiny_data):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)  # conftest's shared run, published by the same CLI
    names = sorted(p.name for p in out.iterdir())
    assert names == [".lock", "params.msgpack", "results.json", "training.png"]
    text = (out / "results.json").read_text()
    results = json.loads(text, parse_constant=pytest.fail)  # no NaN / Infinity
    assert results["params_sha256"] == files.sha256_file(out / "params.msgpack")
    params = report.load_params(out)
    specs = cost.layer_specs(models.LeNet5(), tiny_data.train[0][:1])
    assert cost.exact_bops(params, specs) == results["bops"] <= 2e6
    # A params file that is not the one results.json describes is refused, naming the file.
    blob = bytearray((out / "params.msgpack").read_bytes())
    blob[-1] ^= 1
    (out / "params.msgpack").write_bytes(bytes(blob))
    with pytest.raises(rundir.RunDirError, match="params.msgpack: SHA-256"):
        report.load_params(out)


@pytest.mark.slow
@FINISHED_RUN
def test_finished_run_is_not_overwritten_without_overwrite(
    tmp_path, finished_run, tiny_data, capsys
):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)  # conftest's shared run (seed 0)
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert load_cli("mnist").main([*TINY, "--seed", "1", "--out", str(out)]) == 2
    assert "already holds a finished run; pass --overwrite" in _one_line_error(capsys)
    assert (out / "results.json").read_bytes() == before
    assert load_cli("mnist").main([*TINY, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["seed"] == 1


def test_a_live_run_locks_its_directory(tmp_path, no_data, capsys):
    with rundir.RunDir.open(tmp_path / "run"):
        assert load_cli("mnist").main(["--out", str(tmp_path / "run")]) == 2
        assert "in use by another live run" in _one_line_error(capsys)
    with rundir.RunDir.open(tmp_path / "run"):  # released on close
        pass


@pytest.mark.slow
def test_full_disk_leaves_no_results_and_no_temporaries(tmp_path, tiny_data, monkeypatch):
    out = tmp_path / "run"
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)
    assert load_cli("mnist").main([*TINY, "--out", str(out)]) == 1
    leftovers = sorted(p.name for p in out.iterdir())
    assert "results.json" not in leftovers
    assert not [name for name in leftovers if name.endswith(files.TMP_SUFFIX)]
    assert "checkpoints" in leftovers  # the trained state survives ...
    monkeypatch.setattr(files.os, "fsync", real_fsync)
    assert (
        load_cli("mnist").main([*TINY, "--out", str(out), "--resume"]) == 0
    )  # ... and is published
    assert report.load_params(out) is not None


# 3. Checkpoint and resume: bit-identical after SIGKILL and after Ctrl-C --------------------

DRIVER = textwrap.dedent(
    """
    import os, runpy, signal, sys
    import jax
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from cgmq_jax import data, train

    tiny = data.synthetic()  # the tests' tiny_mnist
    data.load = lambda *a, **k: tiny
    signal_at = int(os.environ.get("SIGNAL_AT_STEP", "0"))
    signum = getattr(signal, os.environ.get("SIGNAL", "SIGKILL"))
    make_train_step, calls = train.make_train_step, [0]

    def make_counted(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def counted(state, x, y):
            calls[0] += 1
            if calls[0] == signal_at:
                os.kill(os.getpid(), signum)
            return step(state, x, y)

        return counted

    train.make_train_step = make_counted
    sys.argv = ["mnist.py", *sys.argv[1:]]
    runpy.run_path({cli!r}, run_name="__main__")
    """
)


def _run_cli(tmp_path, args, **env):
    driver = tmp_path / "driver.py"
    cli = str(ROOT / "experiments" / "mnist.py")
    driver.write_text(DRIVER.format(cache=str(ROOT / ".jax_cache"), cli=cli))
    environ = {**os.environ, **{k: str(v) for k, v in env.items()}, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(driver), *args], capture_output=True, text=True, env=environ
    )


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The results of the uninterrupted run, trained once per session and shared by the
    pytest-xdist workers (the first trains it under a file lock, as ``finished_run``)."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the basetemp every worker's basetemp is made in
    whole = shared / "uninterrupted"
    with open(shared / "uninterrupted.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (whole / "run" / "results.json").is_file():
            shutil.rmtree(whole, ignore_errors=True)  # a worker that failed half-way
            whole.mkdir()
            done = _run_cli(whole, [*TINY, "--out", str(whole / "run")])
            assert done.returncode == 0, done.stderr
    return json.loads((whole / "run" / "results.json").read_text())


def _same_run(resumed: dict, whole: dict) -> None:
    assert resumed["params_sha256"] == whole["params_sha256"]
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert resumed["certificate"] == whole["certificate"]
    assert resumed["history"] == whole["history"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, uninterrupted):
    out = tmp_path / "run"
    # 6 steps per epoch: step 15 is the third batch of QAT epoch 2 (global epoch 3).
    killed = _run_cli(tmp_path, [*TINY, "--out", str(out)], SIGNAL_AT_STEP=15)
    assert killed.returncode == -9
    assert not (out / "results.json").exists()
    refused = _run_cli(tmp_path, [*TINY, "--out", str(out)])
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    assert "checkpoint at QAT epoch 2, batch 0" in refused.stderr
    resumed = _run_cli(tmp_path, [*TINY, "--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from the checkpoint at QAT epoch 2, batch 0" in resumed.stdout
    _same_run(json.loads((out / "results.json").read_text()), uninterrupted)
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_ctrl_c_checkpoints_mid_epoch_and_resumes_bit_identical(tmp_path, uninterrupted):
    out = tmp_path / "run"
    stopped = _run_cli(tmp_path, [*TINY, "--out", str(out)], SIGNAL_AT_STEP=16, SIGNAL="SIGINT")
    assert stopped.returncode == 130
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("error: interrupted at QAT epoch 2, batch 4 (checkpoint saved)")
    assert "--resume" in last and "Traceback" not in stopped.stderr
    differs = _run_cli(tmp_path, [*TINY, "--seed", "3", "--out", str(out), "--resume"])
    assert differs.returncode == 2 and "--seed 0 -> 3" in differs.stderr
    resumed = _run_cli(tmp_path, [*TINY, "--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from the checkpoint at QAT epoch 2, batch 4" in resumed.stdout
    _same_run(json.loads((out / "results.json").read_text()), uninterrupted)


# 4. Never certify a broken model --------------------------------------------------------


@pytest.mark.slow
def test_divergence_stops_the_run_without_a_certificate(tmp_path, tiny_data, capsys):
    out = tmp_path / "run"
    assert (
        load_cli("mnist").main([*TINY, "--quantizer_lr", "1e30", "--lr", "1e30", "--out", str(out)])
        == 1
    )
    err = _one_line_error(capsys)
    assert "training diverged" in err and "nothing certified" in err
    assert not (out / "results.json").exists()


def test_certify_refuses_non_finite_latents_and_costs_below_the_minimum(lenet, monkeypatch):
    specs, params = lenet["specs"], lenet["params8"]
    broken = jax.tree.map(lambda x: x, params)
    broken["conv1"]["input_quantizer"] = jnp.array([jnp.nan, jnp.nan])
    with pytest.raises(certify.CertificateRefused, match="non-finite parameters in conv1"):
        certify.certify(broken, specs, 2e7)
    real_report = certify.cost_report

    def below_minimum(*args, **kwargs):
        return {**real_report(*args, **kwargs), "bops": cost.min_cost(specs) - 1}

    monkeypatch.setattr(certify, "cost_report", below_minimum)
    with pytest.raises(certify.CertificateRefused, match="below the network's minimum"):
        certify.certify(params, specs, 2e7)


def test_results_json_refuses_non_finite_numbers():
    with pytest.raises(ValueError, match="non-finite"):
        rundir.strict_json({"loss": float("nan")})
    assert np.isfinite(json.loads(rundir.strict_json({"x": 1.5}))["x"])


def test_a_failed_checkpoint_write_is_one_error_and_leaves_no_partial(tmp_path, monkeypatch):
    import threading

    from cgmq_jax import checkpoint

    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # restored afterwards
    saver = checkpoint.Checkpointer(tmp_path / "checkpoints")
    saver.save(1, {"w": jnp.ones(3)}, {"position": "first"})

    def disk_full(index, args, force):
        (saver.directory / f"{index}.orbax-checkpoint-tmp-1").mkdir()
        raise ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")

    monkeypatch.setattr(saver._manager, "save", disk_full)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"checkpoints \(No space left on device\)"
    ):
        saver.save(2, {"w": jnp.zeros(3)}, {"position": "second"})
    assert sorted(p.name for p in saver.directory.iterdir()) == ["1"]
    assert saver.latest_meta() == {"position": "first"}
    saver.close()


def test_a_run_killed_before_its_first_checkpoint_starts_afresh(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # what such a run leaves
    with rundir.RunDir.open(tmp_path / "run") as run:  # not "unfinished": nothing to resume
        run.checkpointer.save(1, {"w": jnp.ones(2)}, {"position": "QAT epoch 1, batch 0"})
    with pytest.raises(rundir.RunDirError, match="checkpoint at QAT epoch 1, batch 0"):
        rundir.RunDir.open(tmp_path / "run")


def test_flags_missing_from_an_older_checkpoint_count_as_unset():
    """A checkpoint written before a flag existed resumes with that flag unset (None)."""
    stored = {"budget_bops": 2e6, "seed": 0}
    now = {"budget_bops": 2e6, "seed": 0, "budget_weight_kib": None, "lam_weight": None}
    assert rundir.changed_flags(stored, now) == []
    assert rundir.changed_flags(stored, {**now, "budget_weight_kib": 14.0}) == ["budget_weight_kib"]
    assert rundir.changed_flags({**stored, "seed": 1}, now) == ["seed"]
    assert rundir.changed_flags(None, now) == []
