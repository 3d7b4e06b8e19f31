"""``experiments/export.py --check`` compares instead of trusting (issue 24).

The forgeries of the hostile-reviewer trial, each on a copy of one tiny LeNet-5 run: a
bias changed and the checksums recomputed, ``results.json`` claims rewritten (budgets,
certificate, accuracy, duplicated keys, no ``config``, another ``config.model``), a lone
file whose weights are zeroed or whose budget is rewritten; and the CLI's errors (an
export that exists, a full disk, a relative ``--c`` directory): one line, status 2.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import FINISHED_RUN, load_cli

from cgmq_jax import data, files
from cgmq_jax import export as ex

pytestmark = [
    pytest.mark.usefixtures("standard_promotion_fixture"),  # optax.adam
    pytest.mark.slow,  # trains a run (once per session), exports, compiles C
    FINISHED_RUN,
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_mnist, finished_run):
    """A finished LeNet-5 run on the tiny synthetic MNIST (a copy of conftest's shared
    ``finished_run``), exported (``model_int.npz``)."""
    run = tmp_path_factory.mktemp("run") / "lenet5"
    shutil.copytree(finished_run, run)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "load", lambda *a, **k: tiny_mnist)
        assert load_cli("export").main([str(run)]) == 0
    return run


@pytest.fixture
def cli(monkeypatch, tiny_mnist):
    monkeypatch.setattr(data, "load", lambda *a, **k: tiny_mnist)
    return load_cli("export").main


@pytest.fixture
def run(exported, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(exported, copy)
    return copy


def _resave(path, edit_header=None, edit_arrays=None, to=None):
    """Rewrite an export with its checksums recomputed (``format.save``), as a forger would."""
    model = ex.load(path)
    header = {k: v for k, v in model.header.items() if k not in ("arrays", "payload_sha256")}
    header = json.loads(json.dumps(header))
    arrays = {k: np.array(v) for k, v in model.arrays.items()}
    if edit_header:
        edit_header(header)
    if edit_arrays:
        edit_arrays(arrays)
    return ex.save(to or path, header, arrays)


def _edit_results(run, edit):
    results = json.loads((run / "results.json").read_text())
    edit(results)
    (run / "results.json").write_text(json.dumps(results))


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- in a run


def test_a_changed_bias_with_new_checksums_is_refused(run, cli, capsys):
    def forge(arrays):
        arrays["L3.bias"][5] += 494_597_728

    _resave(run / "model_int.npz", edit_arrays=forge)
    assert cli([str(run / "model_int.npz"), "--check"]) == 1
    out = capsys.readouterr().out
    assert "params SHA-256 in the file MATCHES" in out  # the claim is true, and not enough
    assert "the file is NOT the export of" in out
    assert "layer 3 ('fc2') bias (L3.bias) differs in 1 of 84 entries" in out
    summary = json.loads((run / "model_int.npz.check.json").read_text())
    assert summary["ok"] is False and summary["differences"]


def test_a_changed_header_field_is_named(run, cli, capsys):
    def forge(header):
        header["layers"][1]["bias_exponent"] += 1

    def shift(arrays):
        arrays["L1.bias"] //= 2

    _resave(run / "model_int.npz", forge, shift)
    assert cli([str(run / "model_int.npz"), "--check"]) == 1
    out = capsys.readouterr().out
    assert "header.layers[1].bias_exponent: the file says" in out


def test_the_check_of_a_run_never_overwrites_its_export(run, cli, capsys):
    path = run / "model_int.npz"
    _resave(path, edit_arrays=lambda a: a["L0.bias"].__setitem__(0, 7))  # the evidence
    before = path.read_bytes()
    assert cli([str(run), "--check"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(path) in err and "--overwrite" in err
    assert path.read_bytes() == before
    c_dir = run / "c"
    c_dir.mkdir()
    (c_dir / "model.h").write_text("mine")
    assert cli([str(path), "--c", str(c_dir)]) == 2
    assert "model.h exists; pass --overwrite" in _one_line(capsys.readouterr().err)
    assert (c_dir / "model.h").read_text() == "mine"
    assert cli([str(run), "--overwrite", "--c", str(c_dir)]) == 0
    assert path.read_bytes() != before and "cgmq_logits" in (c_dir / "model.h").read_text()


@pytest.mark.parametrize(
    ("forge", "expected"),
    [
        (lambda r: r["flags"].update(budget_bops=1e6), "flags.budget_bops is 1000000.0"),
        (lambda r: r["certificate"].update(budget_bops=1e9), "certificate.budget_bops"),
        (lambda r: r.update(test_accuracy=r["test_accuracy"] - 0.05), "test_accuracy"),
        (lambda r: r["certificate"].update(bops=1_999_200), "certificate.bops 1999200"),
        (lambda r: r.update(within_budget=False), "within_budget False, recomputed True"),
    ],
    ids=["flags-budget", "certificate-budget", "accuracy-lowered", "certificate-bops", "within"],
)
def test_results_json_claims_are_recomputed(run, cli, capsys, forge, expected):
    """Forged after the export (the file then differs from the re-derivation too) and
    re-exported from the forged results (the file agrees, the claims do not)."""
    _edit_results(run, forge)
    assert cli([str(run / "model_int.npz"), "--check"]) == 1
    assert "check FAILED" in capsys.readouterr().out
    code = cli([str(run), "--check", "--overwrite"])  # the writer may refuse it (2) already
    captured = capsys.readouterr()
    assert code in (1, 2)
    if code == 2:
        assert expected in _one_line(captured.err)
    else:
        assert expected in captured.out and "check FAILED" in captured.out


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda text: text.replace('"seed": ', '"seed": 1, "seed": ', 1), "duplicated key 'seed'"),
        (
            lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "config"}),
            "no 'config' object",
        ),
        (
            lambda text: text.replace('"model": "lenet5"', '"model": "mlp"'),
            "not the params of config.model 'mlp'",
        ),
    ],
    ids=["duplicate-key", "no-config", "other-model"],
)
def test_a_broken_results_json_is_one_line(run, cli, capsys, edit, expected):
    results = run / "results.json"
    results.write_text(edit(results.read_text()))
    for argv in ([str(run / "model_int.npz"), "--check"], [str(run), "--overwrite"]):
        assert cli(argv) == 2
        assert expected in _one_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- a file alone


def _alone(run, tmp_path, edit_header=None, edit_arrays=None):
    return _resave(run / "model_int.npz", edit_header, edit_arrays, to=tmp_path / "a" / "m.npz")


def test_a_lone_file_passes_on_measured_numbers(run, tmp_path, cli, capsys):
    path = _alone(run, tmp_path)
    assert cli([str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "a file alone" in out and "check PASSED" in out


@pytest.mark.parametrize("claim", [0.05, None, "measured"])
def test_zeroed_weights_alone_cannot_pass(run, tmp_path, cli, capsys, tiny_mnist, claim):
    """Whatever accuracy it claims, even the true one: no better than a constant answer."""

    def zero(arrays):
        for key in arrays:
            if key.endswith(".weight"):
                arrays[key][...] = 0

    path = _alone(run, tmp_path, edit_arrays=zero)
    images, labels = tiny_mnist.test
    predicted = ex.predict(ex.load(path), ex.pixels_from_unit_float(images))
    measured = float(np.mean(predicted == labels))

    def set_claim(header):
        header["metadata"]["test_accuracy"] = measured if claim == "measured" else claim

    _resave(path, set_claim)
    assert cli([str(path), "--check"]) == 1
    out = capsys.readouterr().out
    assert "check FAILED" in out
    if claim == "measured":
        assert "a degenerate model" in out


def test_a_non_finite_claimed_accuracy_cannot_pass(run, tmp_path, cli, capsys):
    def forge(header):
        header["metadata"]["test_accuracy"] = float("-inf")

    try:
        path = _alone(run, tmp_path, forge)
    except ValueError:  # the writer may refuse non-finite numbers itself
        return
    assert cli([str(path), "--check"]) != 0


@pytest.mark.parametrize(
    ("forge", "expected"),
    [
        (lambda c: c.update(budget_bops=float("inf")), "budget"),
        (lambda c: c.update(budget_bops=1e6, within_budget=False), "OVER budget"),
        (lambda c: c.update(budget_bops=1e9), "certificate.budget_bops"),
        (lambda c: c.update(within_budget=False), "within_budget False, recomputed True"),
    ],
    ids=["infinite", "over", "budget-vs-limits", "within"],
)
def test_a_lone_files_budget_is_recomputed(run, tmp_path, cli, capsys, forge, expected):
    def edit(header):
        forge(header["certificate"])
        budget = header["certificate"]["budget_bops"]
        if budget in (1e6, float("inf")):  # the limit rewritten to match
            header["certificate"]["limits"]["bops"]["limit"] = budget
            header["certificate"]["limits"]["bops"]["within"] = budget > 1e6

    try:
        path = _alone(run, tmp_path, edit)
    except ValueError:  # the reader refuses it already: not accepted either
        return
    code = cli([str(path), "--check"])
    captured = capsys.readouterr()
    assert code != 0
    if code == 1:
        assert expected in captured.out
    else:
        _one_line(captured.err)


# --------------------------------------------------------------------------- CLI errors


def test_a_full_disk_is_one_line_and_leaves_no_file(run, tmp_path, cli, capsys, monkeypatch):
    import os

    real = files.write_bytes

    def full(path, payload):
        if str(path).endswith("main.c"):
            raise OSError(28, "No space left on device")
        return real(path, payload)

    monkeypatch.setattr(files, "write_bytes", full)
    c_dir = tmp_path / "c"
    assert cli([str(run / "model_int.npz"), "--c", str(c_dir)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "No space left on device" in err and str(c_dir) in err
    assert not c_dir.exists() or not any(c_dir.iterdir())  # no lone model.h
    monkeypatch.setattr(files, "write_bytes", real)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space")))
    out = tmp_path / "o" / "m.npz"
    assert cli([str(run), "--out", str(out)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert str(out) in err and "No space" in err
    assert not out.exists()


def test_a_read_only_directory_is_one_line(run, tmp_path, cli, capsys):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert cli([str(run), "--out", str(ro / "m.npz")]) == 2
        assert str(ro) in _one_line(capsys.readouterr().err)
    finally:
        ro.chmod(0o755)


def test_a_relative_c_directory_compiles(run, tmp_path, cli, capsys, monkeypatch):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.chdir(tmp_path)
    assert cli([str(run / "model_int.npz"), "--check", "--c", "rel/c"]) == 0
    summary = json.loads((run / "model_int.npz.check.json").read_text())
    assert summary["c"]["identical"] is True
    assert (tmp_path / "rel" / "c" / "model.c").is_file()


# --------------------------------------------------------------------------- your limits


def _raised_budget(header):
    """A lone file whose budget a forger raised, the certificate rewritten to match."""
    certificate = header["certificate"]
    certificate["budget_bops"] = 1e9
    certificate["limits"]["bops"].update(limit=1e9, within=True)
    certificate["within_budget"] = True


def test_your_budget_catches_a_lone_file_whose_budget_was_raised(run, tmp_path, cli, capsys):
    try:
        path = _alone(run, tmp_path, _raised_budget)
    except ValueError:  # the reader refuses the forgery already
        return
    bops = ex.count_bops(path)["bops"]
    assert cli([str(path), "--check"]) == 0  # its own claims agree with each other ...
    capsys.readouterr()
    assert cli([str(path), "--check", "--budget_bops", str(bops - 1)]) == 1  # ... not yours
    out = capsys.readouterr().out
    assert f"recounted bops {bops:,} is over your limit {bops - 1:,}" in out
    assert cli([str(path), "--check", "--budget_bops", str(bops)]) == 0
    assert f"recounted {bops:,}: within" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags", [["--budget_bops", "inf"], ["--budget_weight_kib", "0"], ["--budget_bops", "2e6"]]
)
def test_your_limits_must_be_positive_and_need_check(run, cli, capsys, flags):
    args = [str(run / "model_int.npz"), *flags]
    if flags[1] != "2e6":
        args.append("--check")
    assert cli(args) == 2
    _one_line(capsys.readouterr().err)
