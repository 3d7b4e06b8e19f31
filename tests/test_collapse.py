"""No certified collapse: a model far below its float network says so (docs/method.md
section 4), in the certificate, in ``fit``'s result, in results.json and on the terminal."""

from __future__ import annotations

import json

import pytest
from conftest import FINISHED_RUN, load_cli, standard_promotion

from cgmq_jax import certify, cost, models


def _specs():
    import jax

    x = jax.ShapeDtypeStruct((1, 28, 28, 1), jax.numpy.float32)
    return cost.layer_specs(models.MLP(), x)


def test_collapse_rule_is_more_than_five_points_below_float():
    report = {"limits": {"bops": {"limit": 4e6, "minimum": 2_403_456, "cost": 3_932_928}}}
    assert certify.collapse_check(report, 0.8896, 0.8396)["collapsed"] is False  # 5.00 points
    check = certify.collapse_check(report, 0.8896, 0.8395)
    assert check["collapsed"] is True
    assert check["drop_points"] == pytest.approx(5.01)
    assert "COLLAPSED" in check["message"] and "bops 4,000,000 is 1.66x its minimum" in (
        check["message"]
    )
    assert "not a usable result" in check["message"]


def test_the_binding_limit_is_the_one_closest_to_its_minimum():
    report = {
        "limits": {
            "bops": {"limit": 2.5e6, "minimum": 532_400, "cost": 2.4e6},
            "weight_memory_bits": {"limit": 32_768, "minimum": 16_000, "cost": 32_000},
        }
    }
    check = certify.collapse_check(report, 0.8277, 0.1135)
    assert check["collapsed"] and check["binding"]["name"] == "weight_memory_bits"
    assert check["binding"]["times_minimum"] == pytest.approx(32_768 / 16_000)
    assert "weight_memory_bits 32,768 is 2.05x its minimum 16,000" in check["message"]


@pytest.mark.slow  # compiles whole training steps or many programs
def test_certify_flags_a_collapse_only_when_given_both_accuracies(mlp):
    params, specs = mlp["params8"], mlp["specs"]
    plain = certify.certify(params, specs, 2e7)
    assert "collapsed" not in plain
    collapsed = certify.certify(params, specs, 2e7, float_accuracy=0.98, accuracy=0.11)
    assert collapsed["collapsed"] is True and collapsed["collapse"]["accuracy"] == 0.11
    fine = certify.certify(params, specs, 2e7, float_accuracy=0.98, accuracy=0.97)
    assert fine["collapsed"] is False
    # Still a certificate: the limits are checked as ever.
    with pytest.raises(certify.CertificateRefused):
        certify.certify(params, specs, 1e6, float_accuracy=0.98, accuracy=0.97)


@pytest.mark.slow  # the shared finished run: the unit tier trains nothing end to end
@FINISHED_RUN
def test_results_json_records_both_accuracies_and_the_verdict(finished_run):
    results = json.loads((finished_run / "results.json").read_text())
    float_rows = [row for row in results["history"] if row["phase"] == "float"]
    assert results["float_val_accuracy"] == float_rows[-1]["val_accuracy"]
    assert 0.0 <= results["val_accuracy"] <= 1.0
    drop = 100 * (results["float_val_accuracy"] - results["val_accuracy"])
    assert results["collapsed"] is (drop > certify.COLLAPSE_POINTS)
    assert results["certificate"]["collapsed"] is results["collapsed"]


@pytest.mark.slow
def test_a_collapsed_run_is_published_and_says_so(tmp_path, tiny_mnist, monkeypatch, capsys):
    from cgmq_jax import data

    # Any quantized model "collapses" under a rule of -100 points: the plumbing is checked.
    monkeypatch.setattr(certify, "COLLAPSE_POINTS", -100.0)
    monkeypatch.setattr(data, "load", lambda *a, **k: tiny_mnist)
    flags = ["--epochs", "1", "--pretrain_epochs", "1", "--batch_size", "64"]
    with standard_promotion():
        code = load_cli("mnist").main([*flags, "--budget_bops", "2e6", "--out", str(tmp_path)])
    assert code == 0  # published, certified
    err = capsys.readouterr().err
    assert "WARNING: COLLAPSED" in err and "the binding limit bops 2,000,000 is" in err
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["collapsed"] is True and results["within_budget"] is True
    assert results["certificate"]["collapse"]["binding"]["name"] == "bops"
