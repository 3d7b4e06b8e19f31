"""Export a trained run as an integer model file (cgmq-int-npz) and prove it is that model.

    python experiments/export.py RESULTS_DIR [--out FILE] [--check] [--c OUT_DIR]
    python experiments/export.py FILE.npz --check [--c OUT_DIR]   # an existing file

Export writes ``RESULTS_DIR/model_int.npz`` (or ``--out``) from ``results.json`` and
``params.msgpack``. ``--check`` then verifies the file (format, checksums, graph), recounts
its BOPs from the file alone and compares them with the trainer's certificate and budget,
ties the file to the run (the SHA-256 of the params it was exported from must be the one
``results.json`` records), runs the integer-only inference on the test images of the
dataset the run was trained on (``--dataset`` as recorded; MNIST's 10,000 by default)
(its accuracy may be at most 0.1 point below the accuracy recorded at training), and
(given a run directory) compares its predictions and every layer's integer input codes
with the JAX fake-quant model. ``--c OUT_DIR`` writes the network as self-contained C99
(``model.c``, ``model.h``, a test harness ``main.c``); with ``--check`` it is compiled with
``cc`` and its logits on the test images must be bit-identical to the integer engine's.
The check's numbers go to ``FILE.check.json``.

Exit status: 0 on success, 1 when a check fails, 2 on bad input (no run, unreadable or
corrupted file, bad flag).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
        "--dataset",
        choices=tuple(DATASETS),
        default=None,
        help="the run's dataset (default: the one it was trained on, as recorded)",
    )
    p.add_argument("--data", choices=SOURCES, default="auto", help="the dataset's source")
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
        lines.append(
            f"{row['layer']:<8} {row['kind']:<6} {row['weight_bits']:>6} {row['input_bits']:>7} "
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
    if counted["budget_bops"] is not None:
        verdict = "within" if counted["within_budget"] else "OVER"
        lines.append(f"budget {counted['budget_bops']:,.0f} BOPs: {verdict} budget")
    lines.append(
        f"weight memory {counted['weight_memory_bits']:,} bits, largest activation "
        f"{counted['activation_bits']:,} bits (recounted from the file)"
    )
    for name, limit in (counted.get("certificate_limits") or {}).items():
        if name != "bops":
            ours = counted[name]
            verdict = "within" if ours <= limit["limit"] else "OVER"
            lines.append(f"limit {name} {limit['limit']:,.0f} bits: {ours:,} {verdict}")
    return "\n".join(lines)


def check(path: Path, run_dir: Path | None, args: argparse.Namespace) -> tuple[dict, bool]:
    """Recount, run on the test set, and compare with the JAX model when possible."""
    from cgmq_jax import data
    from cgmq_jax import export as ex

    model = ex.load(path)
    counted = ex.count_bops(model)
    print(_bops_text(counted))
    ok = bool(counted["matches_certificate"] and counted["within_budget"] is not False)
    for name, limit in (counted.get("certificate_limits") or {}).items():
        ok = ok and counted["bops" if name == "bops" else name] <= limit["limit"]
    name = trained_on(path, run_dir, model, args.dataset)
    dataset = data.load(name, args.data, data_dir=args.data_dir)
    images, labels = dataset.test
    pixels = ex.pixels_from_unit_float(images)
    summary = {
        "file": str(path),
        "bias_scheme": model.header.get("bias_scheme"),
        "bops_recounted": counted["bops"],
        "certificate_bops": counted["certificate_bops"],
        "budget_bops": counted["budget_bops"],
        "matches_certificate": counted["matches_certificate"],
        "within_budget": counted["within_budget"],
        "test_examples": len(labels),
        "dataset": dataset.name,
        "data_source": dataset.source,
    }
    results = _provenance(path, model, run_dir, summary)
    if run_dir is not None:
        from cgmq_jax import models, report

        ok = ok and summary["params_match_run"]
        params = report.load_params(run_dir)
        network = models.get_model(
            results["config"]["model"],
            quantized=True,
            input_bits=results["config"].get("input_bits"),
        )
        compared = ex.compare_with_model(model, params, network, images)
        int_pred, jax_pred = compared["int_predictions"], compared["jax_predictions"]
        agree = compared["agree"]
        summary.update(
            agree=agree,
            disagree_indices=[int(i) for i in (int_pred != jax_pred).nonzero()[0]],
            jax_test_accuracy=float((jax_pred == labels).mean()),
            trainer_test_accuracy=results.get("test_accuracy"),
            code_mismatches=compared["code_mismatches"],
            max_logit_difference=compared["max_logit_difference"],
        )
        ok = ok and agree >= MIN_AGREEMENT * len(labels)
        print(
            f"integer vs JAX fake-quant: {agree:,} of {len(labels):,} test predictions agree "
            f"({100 * agree / len(labels):.2f}%); max |logit difference| "
            f"{compared['max_logit_difference']:.3g}"
        )
        for name, (bad, total, worst) in compared["code_mismatches"].items():
            print(f"  {name:<6} input codes differing: {bad:,} of {total:,} (max |diff| {worst})")
        print(f"JAX fake-quant test accuracy {100 * summary['jax_test_accuracy']:.2f}%")
    else:
        int_pred = ex.predict(model, pixels)
    accuracy = float((int_pred == labels).mean())
    summary["int_test_accuracy"] = accuracy
    recorded = summary.get("recorded_test_accuracy")
    print(f"integer-only test accuracy {100 * accuracy:.2f}%", end="")
    if recorded is None:
        print("; no accuracy recorded at training to compare with: FAILED")
        ok = False
    else:
        floor_ok = accuracy >= recorded - MAX_ACCURACY_DROP - 1e-12
        print(
            f", recorded at training {100 * recorded:.2f}%: "
            f"{'within' if floor_ok else 'MORE than'} {100 * MAX_ACCURACY_DROP:.1f} point below"
        )
        ok = ok and floor_ok
    if run_dir is None and summary.get("params_match_run") is False:
        ok = False
    if args.c is not None:
        ok = _check_c(model, pixels, args.c, summary) and ok
    summary["ok"] = ok
    return summary, ok


def _provenance(path: Path, model, run_dir: Path | None, summary: dict) -> dict | None:
    """Tie the file to its run: the params SHA-256 it records vs the run's ``results.json``.

    The run is ``run_dir``, or, for a file alone, the directory holding it when that holds
    a ``results.json``. Returns the run's results (``None`` without a run).
    """
    from cgmq_jax import rundir

    metadata = model.header.get("metadata") or {}
    summary["recorded_test_accuracy"] = metadata.get("test_accuracy")
    summary["params_sha256"] = metadata.get("params_sha256")
    source = run_dir if run_dir is not None else path.parent
    if not (source / "results.json").is_file():
        summary["params_match_run"] = None
        print("no run directory beside the file: the params SHA-256 is not checked")
        return None
    results, _ = rundir.load_run(source)  # verifies params.msgpack against results.json
    matches = metadata.get("params_sha256") == results.get("params_sha256")
    summary["params_match_run"] = matches
    summary["recorded_test_accuracy"] = results.get("test_accuracy")
    print(
        f"params SHA-256 in the file {'MATCHES' if matches else 'does NOT match'} "
        f"{source / 'results.json'}"
    )
    return results


def _check_c(model, pixels, out_dir: str, summary: dict) -> bool:
    """Compile the C export and compare its logits with the integer engine's (all images)."""
    import shutil

    import numpy as np

    from cgmq_jax import export as ex

    program = ex.emit_c(model, out_dir)
    summary["c"] = {
        "dir": str(out_dir),
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
        f"C ({program.source}, {summary['c']['model_c_bytes']:,} bytes, weights "
        f"{program.weight_bytes:,} bytes): logits on {len(pixels):,} images "
        f"{'IDENTICAL to' if identical else 'DIFFERENT from'} the integer engine's"
    )
    return identical


def main(argv: list[str] | None = None) -> int:
    """Export (and check); return the exit status."""
    args = parse_args(argv)
    from cgmq_jax import data
    from cgmq_jax import export as ex

    source = Path(args.source)
    try:
        if source.is_dir():
            run_dir = source
            path = ex.export_run(source, args.out, bias_scheme=args.bias_scheme)
            print(f"wrote {path} ({path.stat().st_size:,} bytes)")
        elif source.suffix == ".npz" and source.exists():
            run_dir, path = None, source
            if args.out is not None:
                raise ValueError("--out is for exporting a run directory, not a .npz file")
        else:
            raise ValueError(f"{source}: not a run directory or an existing .npz file")
        if not args.check:
            print(_bops_text(ex.count_bops(path)))
            if args.c is not None:
                program = ex.emit_c(path, args.c)
                print(f"wrote {program.source}, {program.header}, {program.harness}")
            return 0
        summary, ok = check(path, run_dir, args)
    except (ValueError, data.DataError) as error:  # ExportError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2
    from cgmq_jax import files

    report = path.with_name(path.name + ".check.json")
    files.write_text(report, json.dumps(summary, indent=2) + "\n")
    print(f"check {'PASSED' if ok else 'FAILED'}; wrote {report}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
