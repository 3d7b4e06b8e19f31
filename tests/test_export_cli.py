"""``experiments/export.py`` end to end on a real (tiny) run: export, check, C, forgeries.

A LeNet-5 run on the tiny synthetic MNIST is exported and checked (BOPs equal to the
certificate, every prediction and code equal to the JAX model, the params SHA-256 tied to
the run, the integer accuracy not below the recorded one, C logits bit-identical). Then a
forger zeroes the weights: the export refuses params that ``results.json`` does not
describe, and once ``results.json`` is re-signed too, the accuracy floor fails the check.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import flax.serialization
import jax
import numpy as np
import pytest
from conftest import FINISHED_RUN, load_cli

from cgmq_jax import data

# The run: conftest's shared ``finished_run`` (LeNet-5 that learns, ~87%, on tiny_mnist).

pytestmark = [
    pytest.mark.usefixtures("standard_promotion_fixture"),  # optax.adam
    pytest.mark.slow,  # trains a run (once per session), exports, compiles C
    FINISHED_RUN,
]


@pytest.fixture(scope="module")
def tiny_run(finished_run):
    """A finished LeNet-5 run directory trained on the tiny synthetic MNIST (shared: every
    test copies it before changing it)."""
    return finished_run


@pytest.fixture
def export_cli(monkeypatch, tiny_mnist):
    monkeypatch.setattr(data, "load", lambda *a, **k: tiny_mnist)
    return load_cli("export").main


def _check(run) -> dict:
    return json.loads((run / "model_int.npz.check.json").read_text())


def test_check_passes_and_ties_the_file_to_its_run(tiny_run, tmp_path, export_cli, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    c_dir = tmp_path / "c"
    assert export_cli([str(run), "--check", "--c", str(c_dir)]) == 0
    out = capsys.readouterr().out
    assert "params SHA-256 in the file MATCHES" in out
    summary = _check(run)
    results = json.loads((run / "results.json").read_text())
    assert summary["params_match_run"] is True
    assert summary["bops_recounted"] == results["certificate"]["bops"]
    assert summary["agree"] == summary["test_examples"]
    assert all(bad == 0 for bad, _, _ in summary["code_mismatches"].values())
    assert summary["int_test_accuracy"] == summary["recorded_test_accuracy"]
    if shutil.which("cc"):
        assert summary["c"]["identical"] is True
    assert (c_dir / "model.c").is_file() and (c_dir / "model.h").is_file()
    # The file alone (in its run directory): provenance and floor checked again.
    assert export_cli([str(run / "model_int.npz"), "--check"]) == 0
    assert _check(run)["params_match_run"] is True


def _zero_weights(run):
    tree = flax.serialization.msgpack_restore((run / "params.msgpack").read_bytes())
    tree = jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if path[-1].key == "kernel" else x, tree
    )
    blob = flax.serialization.msgpack_serialize(tree)
    (run / "params.msgpack").write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def test_zeroed_weights_cannot_pass(tiny_run, tmp_path, export_cli, capsys):
    """Issue 10: weights zeroed in the params file used to export and pass --check."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "model_int.npz").unlink(missing_ok=True)
    digest = _zero_weights(run)
    # 1. results.json does not describe these params: refused before anything is written.
    assert export_cli([str(run), "--check"]) == 2
    assert "SHA-256" in capsys.readouterr().err
    assert not (run / "model_int.npz").exists()
    # 2. results.json re-signed as well: the file is exported, its accuracy fails the floor.
    results = json.loads((run / "results.json").read_text())
    results["params_sha256"] = digest
    (run / "results.json").write_text(json.dumps(results))
    assert export_cli([str(run), "--check"]) == 1
    summary = _check(run)
    assert summary["int_test_accuracy"] < summary["recorded_test_accuracy"] - 0.001
    assert "MORE than 0.1 point below" in capsys.readouterr().out


def test_a_file_from_other_params_fails_the_run_check(tiny_run, tmp_path, export_cli, capsys):
    """A file whose recorded params SHA-256 is not the run's fails the check."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert export_cli([str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    from cgmq_jax import export

    model = export.load(run / "model_int.npz")
    header = {k: v for k, v in model.header.items() if k not in ("arrays", "payload_sha256")}
    header["metadata"] = dict(header["metadata"], params_sha256="0" * 64)
    export.save(run / "model_int.npz", header, model.arrays)
    assert export_cli([str(run / "model_int.npz"), "--check"]) == 1
    assert "does NOT match" in capsys.readouterr().out
    assert results["params_sha256"] != "0" * 64


def test_a_file_without_recorded_accuracy_fails(tiny_run, tmp_path, export_cli, capsys):
    from cgmq_jax import export

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert export_cli([str(run)]) == 0
    model = export.load(run / "model_int.npz")
    header = {k: v for k, v in model.header.items() if k not in ("arrays", "payload_sha256")}
    header.pop("metadata")
    alone = tmp_path / "alone" / "model.npz"
    export.save(alone, header, model.arrays)
    assert export_cli([str(alone), "--check"]) == 1
    out = capsys.readouterr().out
    assert "no accuracy recorded at training" in out


@pytest.mark.parametrize(
    ("flags", "metadata", "asked", "expected"),
    [
        ({"dataset": "fashion_mnist"}, {}, None, "fashion_mnist"),
        ({"dataset": None}, {}, None, "mnist"),  # a run from before --dataset
        (None, {"dataset": "cifar10"}, None, "cifar10"),  # a file alone: its metadata
        ({"dataset": "fashion_mnist"}, {}, "mnist", "--dataset mnist: the network was trained"),
    ],
    ids=["recorded", "before-the-flag", "file-metadata", "mismatch"],
)
def test_check_evaluates_on_the_dataset_the_run_was_trained_on(
    tmp_path, flags, metadata, asked, expected
):
    class File:
        header = {"metadata": metadata}

    if flags is not None:
        (tmp_path / "results.json").write_text(json.dumps({"flags": flags}))
    trained_on = load_cli("export").trained_on
    if expected.startswith("--"):
        with pytest.raises(ValueError, match=expected):
            trained_on(tmp_path / "model_int.npz", None, File, asked)
    else:
        assert trained_on(tmp_path / "model_int.npz", None, File, asked) == expected
