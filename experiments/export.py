"""Export a trained run as an integer model file (cgmq-int-npz) and prove it is that model.

    python experiments/export.py RESULTS_DIR [--out FILE] [--check]
    python experiments/export.py FILE.npz --check        # check an existing file

Export writes ``RESULTS_DIR/model_int.npz`` (or ``--out``) from ``results.json`` and
``params.msgpack``. ``--check`` then verifies the file (format, checksums), recounts its
BOPs from the file alone and compares them with the trainer's certificate and budget, runs
the integer-only inference on the 10,000 MNIST test images, and (given a run directory)
compares its predictions and every layer's integer input codes with the JAX fake-quant
model. The check's numbers go to ``FILE.check.json``.

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="a run directory (results.json, params.msgpack) or a .npz file")
    p.add_argument("--out", default=None, help="file to write (default RESULTS_DIR/model_int.npz)")
    p.add_argument("--check", action="store_true", help="verify, recount, run on MNIST, compare")
    p.add_argument(
        "--bias_scheme",
        choices=("odd", "accumulator"),
        default="odd",
        help="how the float bias becomes an integer (docs/export.md; default %(default)s)",
    )
    p.add_argument("--data", choices=("auto", "tfds", "bundled", "idx"), default="auto")
    p.add_argument("--data_dir", default=None, help="tfds data dir, or the IDX directory")
    return p.parse_args(argv)


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
    return "\n".join(lines)


def check(path: Path, run_dir: Path | None, args: argparse.Namespace) -> tuple[dict, bool]:
    """Recount, run on the MNIST test set, and compare with the JAX model when possible."""
    from cgmq_jax import data
    from cgmq_jax import export as ex

    model = ex.load(path)
    counted = ex.count_bops(model)
    print(_bops_text(counted))
    ok = bool(counted["matches_certificate"] and counted["within_budget"])
    dataset = data.load_mnist(args.data, data_dir=args.data_dir)
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
        "data_source": dataset.source,
    }
    if run_dir is not None:
        from cgmq_jax import models, report, rundir

        results, _ = rundir.load_run(run_dir)
        params = report.load_params(run_dir)
        network = models.get_model(results["config"]["model"], quantized=True)
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
    summary["int_test_accuracy"] = float((int_pred == labels).mean())
    summary["ok"] = ok
    print(f"integer-only test accuracy {100 * summary['int_test_accuracy']:.2f}%")
    return summary, ok


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
