"""Export a trained run as an integer model file (cgmq-int-npz) and prove it is that model.

    python experiments/export.py RESULTS_DIR [--out FILE] [--check] [--c OUT_DIR] [--overwrite]
    python experiments/export.py FILE.npz --check [--c OUT_DIR]   # an existing file
    python experiments/export.py RESULTS_DIR --onnx OUT.onnx [--check]   # and as ONNX

Export writes ``RESULTS_DIR/model_int.npz`` (or ``--out``) from ``results.json`` and
``params.msgpack``; an existing file (or C file in ``OUT_DIR``) is never replaced without
``--overwrite``. ``--check`` verifies the file and trusts none of its claims:

* In a run directory (the one exported, or the one holding the file), the file is
  re-derived from the run's ``params.msgpack`` and compared member by member and field by
  field (only ``metadata.run``, where the run was, is informative); ``results.json`` is read
  strictly (no duplicated key) and its claims are recounted: the flags' limits against the
  config and the certificate, the certificate's BOPs, memory and per-layer table against
  a recount, ``within_budget`` recomputed, ``test_accuracy`` against a fresh evaluation of
  the JAX model (within 0.1 point: float evaluation may differ across devices).
* A file alone has only its own claims: its budget must be a finite positive number its
  recounted BOPs respect, its certificate must equal the recount, and its
  ``metadata.test_accuracy`` (the JAX model's, copied at export) must be within 0.1 point
  of the accuracy measured here with the integer engine, both ways.
* Always: the integer-only inference runs on the test images of the dataset the run was
  trained on (``--dataset`` as recorded; MNIST's 10,000 by default), its accuracy may be at
  most 0.1 point below the recorded one and must beat always predicting the most frequent
  class; in a run directory its predictions and every layer's integer input codes are
  compared with the JAX fake-quant model.

``--c OUT_DIR`` writes the network as self-contained C99 (``model.c``, ``model.h``, a test
harness ``main.c``); with ``--check`` it is compiled with ``cc`` and its logits on the test
images must be bit-identical to the integer engine's. ``--onnx OUT.onnx`` writes the model as
an ONNX QDQ graph (``cgmq_jax.export.onnx``; needs ``pip install -r requirements-onnx.txt``)
and recounts its BOPs from the ONNX file alone; with ``--check`` ONNX Runtime runs it on
the test images, and its recount must equal the certificate and its predictions agree with
the integer engine's on at least 99.9% of them. The check's numbers go to
``FILE.check.json``.

Exit status: 0 on success, 1 when a check fails, 2 on bad input (no run, unreadable or
corrupted file, a file that exists, an unwritable directory, bad flag), with one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import cgmq_jax.limits

#: Minimum fraction of test predictions on which the file must agree with the JAX model.
MIN_AGREEMENT = 0.999
#: How far (a fraction) the integer-only test accuracy may fall below the recorded one.
MAX_ACCURACY_DROP = 0.001


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    from cgmq_jax.data import DATASETS, SOURCES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="a run directory (results.json, params.msgpack) or a .npz file")
    p.add_argument("--out", default=None, help="file to write (default RESULTS_DIR/model_int.npz)")
    p.add_argument(
        "--check", action="store_true", help="verify, recount, run on the test set, compare"
    )
    p.add_argument(
        "--bias_scheme",
        choices=("odd", "accumulator"),
        default="odd",
        help="how the float bias becomes an integer (docs/export.md; default %(default)s)",
    )
    p.add_argument("--c", default=None, metavar="OUT_DIR", help="also write the network as C99")
    p.add_argument(
        "--onnx",
        default=None,
        metavar="OUT.onnx",
        help="also write the model as ONNX (QDQ); needs pip install -r requirements-onnx.txt",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing export file (and C files in OUT_DIR, the --onnx file)",
    )
    p.add_argument(
        "--dataset",
        choices=tuple(DATASETS),
        default=None,
        help="the run's dataset (default: the one it was trained on, as recorded)",
    )
    p.add_argument("--data", choices=SOURCES, default="auto", help="the dataset's source")
    for flag, unit, _ in cgmq_jax.limits.LIMIT_FLAGS.values():
        p.add_argument(
            flag,
            type=float,
            default=None,
            help=f"with --check: YOUR limit ({unit}); the recount must be within it (the "
            "file's and the run's budgets are only their claims)",
        )
    p.add_argument("--data_dir", default=None, help="tfds data dir, IDX directory, or tarball")
    return p.parse_args(argv)


def trained_on(path: Path, run_dir: Path | None, model, asked: str | None) -> str:
    """The dataset the exported network was trained on: the run's ``--dataset`` flag (in
    its ``results.json``), else the file's metadata, else ``mnist`` (runs from before the
    flag). ``ValueError`` if ``asked`` (``--dataset``) names another one."""
    source = run_dir if run_dir is not None else path.parent
    recorded = (model.header.get("metadata") or {}).get("dataset")
    if (source / "results.json").is_file():
        results = json.loads((source / "results.json").read_text())
        recorded = (results.get("flags") or {}).get("dataset") or recorded
    recorded = recorded or "mnist"
    if asked is not None and asked != recorded:
        raise ValueError(f"--dataset {asked}: the network was trained on {recorded}")
    return recorded


def _bops_text(counted: dict) -> str:
    lines = [f"{'layer':<8} {'kind':<6} {'w bits':>6} {'in bits':>7} {'MACs':>9} {'BOPs':>11}"]
    for row in counted["layers"]:
        bits = row["weight_bits"]  # per channel: a list, shown as its range
        bits = f"{min(bits)}-{max(bits)}" if isinstance(bits, list) else str(bits)
        lines.append(
            f"{row['layer']:<8} {row['kind']:<6} {bits:>6} {row['input_bits']:>7} "
            f"{row['macs']:>9,} {row['bops']:>11,}"
        )
    lines.append(
        f"{'total':<8} {'':<6} {'':>6} {'':>7} {counted['macs']:>9,} {counted['bops']:>11,}"
    )
    if counted["certificate_bops"] is not None:
        verdict = "EQUAL to" if counted["matches_certificate"] else "DIFFERENT from"
        lines.append(
            f"recounted from the file: {counted['bops']:,} BOPs, {verdict} the certificate's "
            f"{counted['certificate_bops']:,}"
        )
    budget = counted["budget_bops"]
    if _number(budget):  # the verdict from the recount, never the file's own
        verdict = "within" if counted["bops"] <= budget else "OVER"
        lines.append(f"budget {budget:,.0f} BOPs (the file's claim): {verdict} budget")
    elif budget is not None:
        lines.append(f"budget {budget!r}: not a finite positive number of BOPs")
    lines.append(
        f"weight memory {counted['weight_memory_bits']:,} bits, largest activation "
        f"{counted['activation_bits']:,} bits (recounted from the file)"
    )
    limits = counted.get("certificate_limits")
    for name, limit in (limits if isinstance(limits, dict) else {}).items():
        value = limit.get("limit") if isinstance(limit, dict) else None
        if name in ("weight_memory_bits", "activation_bits") and _number(value):
            verdict = "within" if counted[name] <= value else "OVER"
            lines.append(f"limit {name} {value:,.0f} bits: {counted[name]:,} {verdict}")
    return "\n".join(lines)


def check(path: Path, run_dir: Path | None, args: argparse.Namespace, opened=None):
    """Compare with the run (or weigh the file's own claims), evaluate, and return
    ``(summary, ok)``; each failed check is one line in ``summary["problems"]``.

    ``opened``: the run already read (:func:`cgmq_jax.runs.export_run.open_run`), so that
    its params are read and hashed once on the way from the run to the check and C."""
    from cgmq_jax import export as ex
    from cgmq_jax.runs import export_run

    model = ex.load(path)
    counted = ex.count_bops(model)
    print(_bops_text(counted))
    run = run_dir
    if run is None and (path.parent / "results.json").is_file():
        run = path.parent
    summary = {
        "file": str(path),
        "run": None if run is None else str(run),
        "bias_scheme": model.header.get("bias_scheme"),
        "bops_recounted": counted["bops"],
        "certificate_bops": counted["certificate_bops"],
        "budget_bops": counted["budget_bops"],
        "matches_certificate": counted["matches_certificate"],
    }
    problems: list[str] = []
    results = None
    if run is not None:
        opened = opened if opened is not None else export_run.open_run(run)
        results = _against_run(model, opened, summary, problems)
        if summary["differences"]:
            return _verdict(summary, problems)
        limits = _run_limits(results, run / "results.json", problems)
        _certificate_checks(results.get("certificate"), limits, counted, "results.json", problems)
        _results_totals(results, limits, counted, problems)
    else:
        print("a file alone: its budget and accuracy are its own claims, weighed here; check it ")
        print("inside its run directory to tie them to the run's flags and params")
        limits = _file_limits(model.header.get("certificate"), problems)
        _certificate_checks(model.header.get("certificate"), limits, counted, "the file", problems)
    within = bool(limits) and all(_costs(counted)[n] <= v for n, v in limits.items())
    summary.update(limits=limits, within_budget=within)
    _your_limits(args, counted, summary, problems)
    _evaluate(model, path, opened, args, summary, problems)
    return _verdict(summary, problems)


def _verdict(summary: dict, problems: list[str]) -> tuple[dict, bool]:
    for problem in problems:
        print(f"FAILED: {problem}")
    summary["problems"] = problems
    summary["ok"] = not problems
    return summary, not problems


def _against_run(model, opened, summary: dict, problems: list[str]) -> dict:
    """Re-derive the file from the run's params and compare; returns ``results.json``."""
    from cgmq_jax import lowering
    from cgmq_jax.runs import export_run

    run, results = opened.path, opened.results  # strict: duplicated keys, config, model
    metadata = model.header.get("metadata")
    recorded = metadata.get("params_sha256") if isinstance(metadata, dict) else None
    matches = recorded == results.get("params_sha256")
    summary["params_sha256"] = recorded
    summary["params_match_run"] = matches
    print(
        f"params SHA-256 in the file {'MATCHES' if matches else 'does NOT match'} "
        f"{run / 'results.json'}"
    )
    scheme = model.header.get("bias_scheme")
    if scheme not in lowering.BIAS_SCHEMES:
        differences = [f"header.bias_scheme: {scheme!r} is not one the writer produces"]
    else:
        header, arrays = export_run.derive_run(opened, bias_scheme=scheme)
        differences = lowering.differences(model, header, arrays)
    summary["differences"] = differences
    if differences:
        print(f"the file is NOT the export of {run}'s params:")
        for line in differences:
            print(f"  {line}")
        problems.append(f"{model.path} differs from the export of {run}'s params: {differences[0]}")
    else:
        print(f"the file is the export of {run}'s params: every member and field equal")
    return results


#: The trainer's limit flags: cost name -> (flag without dashes, bits per flag unit).
LIMIT_FLAGS = {
    name: (flag.removeprefix("--"), per_unit)
    for name, (flag, _, per_unit) in cgmq_jax.limits.LIMIT_FLAGS.items()
}


def _your_limits(args: argparse.Namespace, counted: dict, summary: dict, problems) -> None:
    """The recount against the limits the user states (``--budget_bops`` ...), if any."""
    yours = {
        name: getattr(args, flag) * scale
        for name, (flag, scale) in LIMIT_FLAGS.items()
        if getattr(args, flag, None) is not None
    }
    summary["your_limits"] = yours
    for name, limit in yours.items():
        cost = _costs(counted)[name]
        verdict = "within" if cost <= limit else "OVER"
        print(f"your limit on {name}: {limit:,.0f}; recounted {cost:,}: {verdict}")
        if cost > limit:
            problems.append(f"recounted {name} {cost:,} is over your limit {limit:,.0f}")


def _number(value) -> bool:
    """A finite positive number (not a bool)."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and math.isfinite(value) and value > 0


def _run_limits(results: dict, where: Path, problems: list[str]) -> dict:
    """``{cost: limit}`` from the run's config, which its flags must repeat."""
    config, flags = results["config"], results.get("flags")
    if flags is not None and not isinstance(flags, dict):
        problems.append(f"{where}: flags is not an object")
        flags = None
    limits = {}
    for name, (flag, scale) in LIMIT_FLAGS.items():
        value = config.get(flag)
        if flags is not None and flag in flags and flags[flag] != value:
            problems.append(f"{where}: flags.{flag} is {flags[flag]!r}, config.{flag} {value!r}")
        if value is None:
            continue
        if not _number(value):
            problems.append(f"{where}: config.{flag} {value!r} is not a finite positive number")
            continue
        limits[name] = value * scale
    if not limits:
        problems.append(f"{where}: the config sets no limit, so nothing is certified")
    return limits


def _file_limits(certificate, problems: list[str]) -> dict:
    """``{cost: limit}`` that a file alone claims (its certificate), each a finite number."""
    if not isinstance(certificate, dict):
        problems.append("the file carries no certificate: no budget to check against")
        return {}
    entries = certificate.get("limits")
    if entries is None:
        entries = {"bops": {"limit": certificate.get("budget_bops")}}
    if not isinstance(entries, dict):
        problems.append("the file's certificate.limits is not an object")
        return {}
    limits = {}
    for name, entry in entries.items():
        value = entry.get("limit") if isinstance(entry, dict) else None
        if name not in LIMIT_FLAGS or not _number(value):
            problems.append(f"the file's limit {name} {value!r}: not a finite positive budget")
            continue
        limits[name] = value
    if not limits:
        problems.append("the file states no budget")
    return limits


def _costs(counted: dict) -> dict:
    return {name: counted[name] for name in LIMIT_FLAGS}


def _certificate_checks(certificate, limits: dict, counted: dict, where: str, problems) -> None:
    """Every number of a certificate against the recount and the limits."""
    if not isinstance(certificate, dict):
        problems.append(f"{where}: no certificate")
        return
    costs = _costs(counted)
    if certificate.get("bops") != costs["bops"]:
        problems.append(
            f"{where}: certificate.bops {certificate.get('bops')!r}, recounted {costs['bops']:,}"
        )
    if counted["matches_certificate"] is False:
        problems.append(f"{where}: the certificate's layers or memory differ from the recount")
    if certificate.get("budget_bops") != limits.get("bops"):
        problems.append(
            f"{where}: certificate.budget_bops {certificate.get('budget_bops')!r}, "
            f"the budget is {limits.get('bops')!r}"
        )
    entries = certificate.get("limits") or {}
    if not isinstance(entries, dict) or set(entries) != set(limits):
        problems.append(
            f"{where}: certificate.limits {sorted(entries)} are not the limits {sorted(limits)}"
        )
        entries = {}
    for name, entry in entries.items():
        within = costs[name] <= limits[name]
        entry = entry if isinstance(entry, dict) else {}
        for key, value in (("limit", limits[name]), ("cost", costs[name]), ("within", within)):
            found = entry.get(key)
            if found != value or isinstance(found, bool) != isinstance(value, bool):
                problems.append(
                    f"{where}: certificate.limits.{name}.{key} {found!r}, recomputed {value!r}"
                )
    for name in ("weight_memory_bits", "activation_bits"):
        if name in certificate and certificate[name] != costs[name]:
            problems.append(
                f"{where}: certificate.{name} {certificate[name]!r}, recounted {costs[name]:,}"
            )
    within = bool(limits) and all(costs[n] <= v for n, v in limits.items())
    if certificate.get("within_budget") is not within:
        problems.append(
            f"{where}: certificate.within_budget {certificate.get('within_budget')!r}, "
            f"recomputed {within}"
        )
    for name, limit in limits.items():
        if costs[name] > limit:
            problems.append(f"OVER budget: {name} recounted {costs[name]:,} > limit {limit:,.0f}")


def _results_totals(results: dict, limits: dict, counted: dict, problems: list[str]) -> None:
    """``results.json``'s top-level ``bops`` and ``within_budget`` against the recount."""
    within = bool(limits) and all(_costs(counted)[n] <= v for n, v in limits.items())
    if results.get("bops") != counted["bops"]:
        problems.append(
            f"results.json: bops {results.get('bops')!r}, recounted {counted['bops']:,}"
        )
    if results.get("within_budget") is not within:
        problems.append(
            f"results.json: within_budget {results.get('within_budget')!r}, recomputed {within}"
        )


def _integer_inputs(model, images):
    """The test images as integers at the file's input exponent (exactly, or ``ValueError``)."""
    import numpy as np

    exponent = model.header["input"]["exponent"]
    scaled = np.asarray(images, np.float64) * 2.0**-exponent
    ints = np.round(scaled)
    if not np.array_equal(ints, scaled):
        raise ValueError(f"the test images are not multiples of 2**{exponent}, the file's input")
    return ints.astype(np.int64)


def _evaluate(model, path, opened, args, summary: dict, problems: list[str]) -> None:
    """Run the test set: the integer engine, the JAX model in a run, the C code if asked."""
    from cgmq_jax import data
    from cgmq_jax import export as ex

    run = None if opened is None else opened.path
    name = trained_on(path, run, model, args.dataset)
    dataset = data.load(name, args.data, data_dir=args.data_dir)
    images, labels = dataset.test
    inputs = _integer_inputs(model, images)
    summary.update(test_examples=len(labels), dataset=dataset.name, data_source=dataset.source)
    jax_pred = None
    if run is not None:
        int_pred, jax_pred = _against_jax(model, opened, images, labels, summary, problems)
        claim = opened.results.get("test_accuracy")
    else:
        int_pred = ex.predict(model, inputs)
        metadata = model.header.get("metadata")
        claim = metadata.get("test_accuracy") if isinstance(metadata, dict) else None
    accuracy = float((int_pred == labels).mean())
    summary["int_test_accuracy"] = accuracy
    _accuracy_verdict(accuracy, claim, run is None, summary, problems)
    _baseline(accuracy, labels, problems)
    if args.c is not None and not _check_c(model, inputs, args.c, summary):
        problems.append("the C logits differ from the integer engine's")
    if args.onnx is not None:
        real = inputs * 2.0 ** model.header["input"]["exponent"]
        _check_onnx(Path(args.onnx), real, labels, int_pred, jax_pred, summary, problems)


def _against_jax(model, opened, images, labels, summary, problems):
    """Predictions and codes against the JAX model; its accuracy against the claim."""
    from cgmq_jax import model_check

    results, params, network = opened.results, opened.params, opened.model
    compared = model_check.compare_with_model(model, params, network, images)
    int_pred, jax_pred = compared["int_predictions"], compared["jax_predictions"]
    agree, n = compared["agree"], len(labels)
    jax_accuracy = float((jax_pred == labels).mean())
    summary.update(
        agree=agree,
        disagree_indices=[int(i) for i in (int_pred != jax_pred).nonzero()[0]],
        jax_test_accuracy=jax_accuracy,
        trainer_test_accuracy=results.get("test_accuracy"),
        code_mismatches=compared["code_mismatches"],
        max_logit_difference=compared["max_logit_difference"],
    )
    print(
        f"integer vs JAX fake-quant: {agree:,} of {n:,} test predictions agree "
        f"({100 * agree / n:.2f}%); max |logit difference| "
        f"{compared['max_logit_difference']:.3g}"
    )
    for name, (bad, total, worst) in compared["code_mismatches"].items():
        print(f"  {name:<6} input codes differing: {bad:,} of {total:,} (max |diff| {worst})")
    if agree < MIN_AGREEMENT * n:
        problems.append(f"only {agree:,} of {n:,} predictions agree with the JAX model")
    claim = results.get("test_accuracy")
    print(f"JAX fake-quant test accuracy {100 * jax_accuracy:.2f}% (measured now)")
    if not _accuracy(claim) or abs(jax_accuracy - claim) > MAX_ACCURACY_DROP + 1e-12:
        problems.append(
            f"results.json: test_accuracy {claim!r}, the JAX model measures {jax_accuracy!r} "
            f"(more than {100 * MAX_ACCURACY_DROP:.1f} point apart)"
        )
    return int_pred, jax_pred


def _accuracy(value) -> bool:
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and math.isfinite(value) and 0 <= value <= 1


def _accuracy_verdict(accuracy, claim, alone: bool, summary: dict, problems: list) -> None:
    """The measured integer accuracy against the recorded one (a file alone: both ways)."""
    summary["recorded_test_accuracy"] = claim
    print(f"integer-only test accuracy {100 * accuracy:.2f}%", end="")
    if claim is None:
        print("; no accuracy recorded at training to compare with: FAILED")
        problems.append("no accuracy recorded at training to compare with")
        return
    if not _accuracy(claim):
        print(f"; the recorded accuracy {claim!r} is not one: FAILED")
        problems.append(f"recorded test accuracy {claim!r} is not a number in [0, 1]")
        return
    floor_ok = accuracy >= claim - MAX_ACCURACY_DROP - 1e-12
    print(
        f", recorded at training {100 * claim:.2f}%: "
        f"{'within' if floor_ok else 'MORE than'} {100 * MAX_ACCURACY_DROP:.1f} point below"
    )
    if not floor_ok:
        problems.append(f"integer accuracy {accuracy!r} is more than 0.1 point below {claim!r}")
    elif alone and accuracy > claim + MAX_ACCURACY_DROP + 1e-12:
        problems.append(
            f"the file claims test accuracy {claim!r}, the integer engine measures {accuracy!r}"
        )


def _baseline(accuracy: float, labels, problems: list[str]) -> None:
    """A model no better than always answering the most frequent class is refused."""
    import numpy as np

    counts = np.bincount(np.asarray(labels, np.int64))
    majority = float(counts.max() / counts.sum()) if counts.size else 0.0
    if accuracy <= majority:
        problems.append(
            f"integer accuracy {100 * accuracy:.2f}% is no better than always predicting class "
            f"{int(counts.argmax())} ({100 * majority:.2f}%): a degenerate model"
        )


def _check_c(model, pixels, out_dir: Path, summary: dict) -> bool:
    """Compile the C export and compare its logits with the integer engine's (all images)."""
    import shutil

    import numpy as np

    from cgmq_jax import export as ex

    with _writing(out_dir):
        program = ex.emit_c(model, out_dir)
    summary["c"] = {
        "dir": str(out_dir),
        "input_type": program.input.ctype,
        "model_c_bytes": program.source.stat().st_size,
        "weight_bytes": program.weight_bytes,
        "weight_bits": program.weight_bits,
        "activation_bits": program.activation_bits,
    }
    if shutil.which("cc") is None:
        print("no C compiler (cc) on this machine: the C code was written, not compiled")
        summary["c"]["identical"] = None
        return True
    from cgmq_jax.export import c as emitter

    logits = emitter.compile_and_run(program, pixels)
    reference = np.concatenate(
        [ex.run_integer(model, pixels[i : i + 1000])[0] for i in range(0, len(pixels), 1000)]
    )
    identical = bool(np.array_equal(logits, reference))
    summary["c"]["identical"] = identical
    print(
        f"C ({program.source}, input {program.input.ctype}, "
        f"{summary['c']['model_c_bytes']:,} bytes, weights "
        f"{program.weight_bytes:,} bytes): logits on {len(pixels):,} images "
        f"{'IDENTICAL to' if identical else 'DIFFERENT from'} the integer engine's"
    )
    return identical


def _write_onnx(model, path: Path) -> dict:
    """Write the ONNX graph of ``model`` and recount its BOPs from the ONNX file alone."""
    from cgmq_jax.export import onnx as ox

    with _writing(path):
        ox.to_onnx(model, path)
    counted = ox.recount_onnx(path)
    verdict = {True: "EQUAL to", False: "DIFFERENT from", None: "no certificate to compare with"}
    certificate = counted["certificate_bops"]
    print(
        f"wrote {path} ({path.stat().st_size:,} bytes, ONNX opset {counted['opset']}); "
        f"recounted from the ONNX file: {counted['bops']:,} BOPs, "
        f"{verdict[counted['matches_certificate']]}"
        + ("" if certificate is None else f" the certificate's {certificate:,}")
    )
    return counted


def _check_onnx(path: Path, real, labels, int_pred, jax_pred, summary: dict, problems) -> None:
    """ONNX Runtime on the test set: accuracy, agreement with the engine (and JAX)."""
    import time

    from cgmq_jax.export import onnx as ox

    counted = ox.recount_onnx(path)
    start = time.perf_counter()
    logits = ox.run_onnx(path, real)
    seconds = time.perf_counter() - start
    pred = logits.argmax(axis=-1)
    n = len(labels)
    agree = int((pred == int_pred).sum())
    summary["onnx"] = {
        "file": str(path),
        "bytes": path.stat().st_size,
        "opset": counted["opset"],
        "bops_recounted": counted["bops"],
        "matches_certificate": counted["matches_certificate"],
        "graph_intact": counted["graph_intact"],
        "test_accuracy": float((pred == labels).mean()),
        "agree_with_engine": agree,
        "agree_with_jax": None if jax_pred is None else int((pred == jax_pred).sum()),
        "seconds": seconds,
    }
    also = "" if jax_pred is None else f", with JAX {summary['onnx']['agree_with_jax']:,}"
    print(
        f"ONNX Runtime: test accuracy {100 * summary['onnx']['test_accuracy']:.2f}%; "
        f"predictions agreeing with the integer engine {agree:,} of {n:,}{also} ({seconds:.1f} s)"
    )
    if not counted["ok"]:
        problems.append(f"{path}: the ONNX recount differs from the certificate or its metadata")
    if agree < MIN_AGREEMENT * n:
        problems.append(f"only {agree:,} of {n:,} ONNX Runtime predictions agree with the engine")


#: The files ``--c`` writes.
C_FILES = ("model.h", "model.c", "main.c")


def _refuse_existing(paths: list[Path], overwrite: bool, instead: str) -> None:
    """``ValueError`` naming the first existing export file, unless ``--overwrite``."""
    for existing in paths:
        if existing.exists() and not overwrite:
            raise ValueError(f"{existing} exists; pass --overwrite to replace it ({instead})")


@contextlib.contextmanager
def _writing(path: Path):
    """An ``OSError`` inside names ``path`` when it names no file itself."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            error.filename = str(path)
        raise


def _os_problem(error: OSError) -> str:
    """One line for an ``OSError`` of writing: the file and what went wrong."""
    where = error.filename if error.filename is not None else "a file"
    reason = error.strerror or str(error) or type(error).__name__
    return (
        f"cannot write {where}: {reason} (a read-only or full directory?); free space or "
        "choose another path"
    )


def run(args: argparse.Namespace) -> int:
    """Export (and check) what ``args`` asks; errors are exceptions (see :func:`main`)."""
    from cgmq_jax import export as ex
    from cgmq_jax import files
    from cgmq_jax.runs import export_run

    if args.out == "" or args.c == "" or args.onnx == "":
        raise ValueError("--out, --c and --onnx take a path, not an empty string")
    for flag, _ in LIMIT_FLAGS.values():
        value = getattr(args, flag)
        if value is not None and not _number(value):
            raise ValueError(f"--{flag} {value!r}: give a finite positive number")
        if value is not None and not args.check:
            raise ValueError(f"--{flag} is a limit to check against: add --check")
    source = Path(args.source)
    if args.c is not None:  # cc later runs inside it: no path relative to the start
        args.c = Path(os.path.abspath(args.c))
    c_files = [] if args.c is None else [args.c / name for name in C_FILES]
    if args.onnx is not None:
        _refuse_existing([Path(args.onnx)], args.overwrite, "or choose another --onnx path")
        from cgmq_jax.export import onnx as ox

        ox.require("onnx")  # before any work: a missing package is one line with the fix
        ox.require("onnxruntime")
    if source.is_dir():
        run_dir = source
        path = Path(args.out) if args.out is not None else source / ex.DEFAULT_FILE
        _refuse_existing([path], args.overwrite, "or check it: export.py FILE.npz --check")
        _refuse_existing(c_files, args.overwrite, "or choose another --c directory")
        opened = export_run.open_run(source)  # the run's params, read and hashed once
        with _writing(path):
            path = ex.export_run(opened, path, bias_scheme=args.bias_scheme)
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    elif source.suffix == ".npz" and source.is_file():
        run_dir, path, opened = None, source, None
        if args.out is not None:
            raise ValueError("--out is for exporting a run directory, not a .npz file")
        _refuse_existing(c_files, args.overwrite, "or choose another --c directory")
    else:
        raise ValueError(f"{source}: not a run directory or an existing .npz file")
    if args.onnx is not None:
        _write_onnx(ex.load(path), Path(args.onnx))
    if not args.check:
        model = ex.load(path)  # read and verified once, for the count and for C
        print(_bops_text(ex.count_bops(model)))
        if args.c is not None:
            with _writing(args.c):
                program = ex.emit_c(model, args.c)
            print(f"wrote {program.source}, {program.header}, {program.harness}")
        return 0
    summary, ok = check(path, run_dir, args, opened)
    report = path.with_name(path.name + ".check.json")
    with _writing(report):
        files.write_text(report, json.dumps(summary, indent=2) + "\n")
    print(f"check {'PASSED' if ok else 'FAILED'}; wrote {report}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    """Export (and check); return the exit status (errors: one line on stderr, status 2)."""
    args = parse_args(argv)
    from cgmq_jax import data

    try:
        return run(args)
    except (ValueError, data.DataError) as error:  # ExportError is a ValueError
        print(f"error: {error}", file=sys.stderr)
    except OSError as error:
        print(f"error: {_os_problem(error)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
