"""ONNX Runtime against our integer engine (and the JAX model) on the test set, per model.

    python benchmarks/onnx_runtime.py RUN_DIR_OR_FILE.npz [...] [--out DIR] [--json FILE]

For each run directory (or integer file): export the integer file (a run) and its ONNX
graph (``cgmq_jax.export.onnx.to_onnx``) into ``--out``, recount the BOPs from the ONNX
file alone, run ONNX Runtime (CPU, its default graph optimizations) and the numpy integer
engine on the 10,000 test images, and, for a run, the JAX model. Prints per model: the
ONNX file's size and opset, ONNX Runtime's accuracy, its prediction agreement with the
engine and with JAX, every layer's input codes differing between ONNX Runtime and the
engine, recount = certificate, and the inference time of ONNX Runtime and of the engine per
10,000 images (measured here, after one warm-up batch). Each disagreement is listed with
the engine's top-two logit gap and ONNX Runtime's largest logit difference.

Needs ``pip install -r requirements-onnx.txt``. Writes only under ``--out`` (default
``/tmp/cgmq_onnx_bench``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="+", help="run directories or cgmq-int-npz files")
    p.add_argument("--out", default="/tmp/cgmq_onnx_bench", help="where the files are written")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--batch_size", type=int, default=1000)
    p.add_argument("--data", default="auto", help="the dataset's source (cgmq_jax.data)")
    return p.parse_args(argv)


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _integer_file(source: Path, out: Path):
    """``(integer model, opened run or None)``: a run is exported into ``out`` first."""
    from cgmq_jax import export as ex

    if source.is_dir():
        from cgmq_jax.runs import export_run

        opened = export_run.open_run(source)
        path = ex.export_run(opened, out / f"{source.name}.npz")
        return ex.load(path), opened
    return ex.load(source), None


def _jax_predictions(opened, images, batch_size: int) -> np.ndarray:
    import jax

    model = opened.model
    apply = jax.jit(lambda params, x: model.apply({"params": params}, x))
    out = [
        np.asarray(apply(opened.params, images[i : i + batch_size])).argmax(-1)
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def _code_mismatches(model, onnx_path, ints, real, batch_size) -> dict[str, list[int]]:
    """Per layer: ``[differing codes, codes, max |difference|]``, ONNX Runtime vs engine."""
    from cgmq_jax.export import onnx as ox
    from cgmq_jax.export import run_integer

    rows: dict[str, list[int]] = {}
    for i in range(0, len(ints), batch_size):
        ours = ox.layer_codes(onnx_path, real[i : i + batch_size])
        _, _, theirs = run_integer(model, ints[i : i + batch_size], return_codes=True)
        for name, codes in theirs.items():
            row = rows.setdefault(name, [0, 0, 0])
            diff = np.abs(ours[name] - codes)
            row[0] += int((diff != 0).sum())
            row[1] += int(codes.size)
            row[2] = max(row[2], int(diff.max(initial=0)))
    return rows


def measure(source: Path, out: Path, args, datasets: dict) -> dict:
    """One model's row."""
    from cgmq_jax import data
    from cgmq_jax.export import count_bops, run_integer
    from cgmq_jax.export import onnx as ox

    model, opened = _integer_file(source, out)
    onnx_path = out / f"{source.stem if source.is_file() else source.name}.onnx"
    ox.to_onnx(model, onnx_path)
    recount, counted = ox.recount_onnx(onnx_path), count_bops(model)
    name = "mnist" if opened is None else opened.dataset
    if name not in datasets:
        datasets[name] = data.load(name, args.data)
    images, labels = datasets[name].test
    exponent = model.header["input"]["exponent"]
    ints = np.round(np.asarray(images, np.float64) * 2.0**-exponent).astype(np.int64)
    real = (ints * 2.0**exponent).astype(np.float32)
    batch = args.batch_size

    def engine():
        return np.concatenate(
            [run_integer(model, ints[i : i + batch])[0] for i in range(0, len(ints), batch)]
        )

    session = ox.session(onnx_path)
    ox.run_onnx(session, real[:batch])  # warm-up
    engine_logits, engine_seconds = _timed(engine)
    onnx_logits, onnx_seconds = _timed(lambda: ox.run_onnx(session, real, batch_size=batch))
    output = model.header["output"]
    reference = engine_logits * 2.0 ** output["exponent"] / output["divisor"]
    engine_pred, onnx_pred = engine_logits.argmax(-1), onnx_logits.argmax(-1)
    jax_pred = None if opened is None else _jax_predictions(opened, images, batch)
    disagreements = []
    for i in np.nonzero(engine_pred != onnx_pred)[0]:
        top = np.sort(reference[i])[-2:]
        disagreements.append(
            dict(
                index=int(i),
                engine=int(engine_pred[i]),
                onnx=int(onnx_pred[i]),
                engine_top2_gap=float(top[1] - top[0]),
                max_logit_difference=float(np.abs(onnx_logits[i] - reference[i]).max()),
            )
        )
    per = 10_000 / len(ints)
    return {
        "model": source.name,
        "network": model.header.get("model"),
        "onnx_bytes": onnx_path.stat().st_size,
        "npz_bytes": model.path.stat().st_size,
        "opset": recount["opset"],
        "test_examples": len(ints),
        "onnx_accuracy": float((onnx_pred == labels).mean()),
        "engine_accuracy": float((engine_pred == labels).mean()),
        "jax_accuracy": None if jax_pred is None else float((jax_pred == labels).mean()),
        "agree_engine": int((onnx_pred == engine_pred).sum()),
        "agree_jax": None if jax_pred is None else int((onnx_pred == jax_pred).sum()),
        "engine_agree_jax": None if jax_pred is None else int((engine_pred == jax_pred).sum()),
        "disagreements": disagreements,
        "max_logit_difference": float(np.abs(onnx_logits - reference).max()),
        "float32_exact": ox.float32_exact(model),
        "code_mismatches": _code_mismatches(model, onnx_path, ints, real, batch),
        "bops_recounted_onnx": recount["bops"],
        "bops_recounted_npz": counted["bops"],
        "certificate_bops": recount["certificate_bops"],
        "recount_equals_certificate": bool(recount["matches_certificate"]),
        "onnx_ok": recount["ok"],
        "onnx_seconds_per_10k": onnx_seconds * per,
        "engine_seconds_per_10k": engine_seconds * per,
    }


def _table(rows: list[dict]) -> str:
    head = (
        f"{'model':<16} {'ONNX bytes':>10} {'opset':>5} {'ORT acc':>8} {'= engine':>12} "
        f"{'= JAX':>12} {'codes differing':>16} {'recount = cert.':>22} {'ORT s':>6} "
        f"{'engine s':>8}"
    )
    lines = [head]
    for r in rows:
        n = r["test_examples"]
        jax = "n/a" if r["agree_jax"] is None else f"{r['agree_jax']:,}/{n:,}"
        codes = sum(v[0] for v in r["code_mismatches"].values())
        total = sum(v[1] for v in r["code_mismatches"].values())
        same = "=" if r["recount_equals_certificate"] else "!="
        cert = f"{r['bops_recounted_onnx']:,} {same} {r['certificate_bops']:,}"
        lines.append(
            f"{r['model']:<16} {r['onnx_bytes']:>10,} {r['opset']:>5} "
            f"{100 * r['onnx_accuracy']:>7.2f}% {r['agree_engine']:>6,}/{n:,} {jax:>12} "
            f"{f'{codes:,}/{total:,}':>16} {cert:>22} {r['onnx_seconds_per_10k']:>6.2f} "
            f"{r['engine_seconds_per_10k']:>8.2f}"
        )
        for d in r["disagreements"]:
            lines.append(f"  disagreement {d}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cgmq_jax.export import onnx as ox

    try:
        ox.require("onnx")
        ort = ox.require("onnxruntime")
    except ox.OnnxError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    datasets: dict = {}
    rows = []
    for source in map(Path, args.sources):
        rows.append(measure(source, out, args, datasets))
        print(_table(rows[-1:]).splitlines()[-1 - len(rows[-1]["disagreements"])], flush=True)
    import onnx

    print(
        f"\nonnx {onnx.__version__}, onnxruntime {ort.__version__} (CPU, default graph "
        "optimizations); times in seconds per 10,000 images, one warm-up batch first"
    )
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
