"""Train-step throughput (samples/s) of float, cgmq, dq and fixed, and the headline fit's
wall time split, with its peak memory.

    python benchmarks/train_step.py                  # lenet5, 5 interleaved rounds
    python benchmarks/train_step.py --models lenet5,mlp,lenet5_bb,dscnn --fit

Every configuration's jitted step (:func:`cgmq_jax.runs.train.initial_step`, as ``fit`` builds
it) is compiled first; then ``--repeats`` rounds each time ``--steps`` steps of every
configuration in turn (interleaved, so that a slow moment of the machine hits all of
them), on real MNIST batches already on the device. Printed: the median samples/s, the
spread, and the ratios that the targets are stated in. The lever variants time the same
cgmq step with one lever undone: ``direct-conv`` (conv1 by XLA's direct convolution
instead of :func:`cgmq_jax.nn.patch_conv`) and ``no-donate`` (the state's buffers not
donated to the step), ``flax-max-pool`` (``flax.linen.max_pool``'s gradient instead of
:func:`cgmq_jax.nn.max_pool`'s), and ``no-levers`` (all three undone: the step of
the release before them).

PyTorch peer: with ``--torch_python PATH`` (or ``CGMQ_TORCH_PYTHON``), a Python that has
``torch`` (never a dependency of this project; a separate venv), each round also runs
``benchmarks/torch_peer.py`` (float, and QAT with learnable fake quantizers) in its own
process. Without it the peer is skipped with a message.

``--fit`` also runs the headline (``experiments/mnist.py --budget_bops 2e6``'s config) in a
child process and prints its wall time split into compile / train / evaluate / other, the
test accuracy, the certified BOPs, and the child's peak resident memory (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

VARIANTS = ("direct-conv", "no-donate", "flax-max-pool", "no-levers")
HEADLINE_FLOAT_BOPS = 288_399_360  # lenet5 at 32 x 32 bits


def _build(model: str, method: str, dataset, batch_size: int):
    """``(step, state, batches)`` for one configuration, compiled and warmed up."""
    import flax.linen
    import jax

    from cgmq_jax import cost, models, nn
    from cgmq_jax.runs import train

    variant = None
    if ":" in method:
        method, variant = method.split(":")
    budget = None
    if method in ("cgmq", "dq"):  # the headline's 2e6 for lenet5, the same share elsewhere
        specs = train.check_config(train.TrainConfig(model=model, method="float"))
        budget = 2e6 * cost.float_bops(specs) / HEADLINE_FLOAT_BOPS
    config = train.TrainConfig(
        model=model, method=method, budget_bops=budget, batch_size=batch_size
    )
    saved = nn.PATCH_CONV_MAX_CHANNELS, models.max_pool
    if variant in ("direct-conv", "no-levers"):
        nn.PATCH_CONV_MAX_CHANNELS = 0
    if variant in ("flax-max-pool", "no-levers"):
        models.max_pool = flax.linen.max_pool
    try:
        step, state, placement = train.initial_step(
            config, dataset, donate=variant not in ("no-donate", "no-levers")
        )
        images, labels = dataset.train
        batches = [
            placement.put_batch(
                images[i * batch_size : (i + 1) * batch_size],
                labels[i * batch_size : (i + 1) * batch_size],
            )
            for i in range(20)
        ]
        state, loss = step(state, *batches[0])  # compiles (PATCH_CONV_MAX_CHANNELS is read now)
        jax.block_until_ready(loss)
    finally:
        nn.PATCH_CONV_MAX_CHANNELS, models.max_pool = saved
    return {"step": step, "state": state, "batches": batches}


def _time(entry: dict, steps: int, batch_size: int) -> float:
    import jax

    step, state, batches = entry["step"], entry["state"], entry["batches"]
    start = time.perf_counter()
    for i in range(steps):
        state, loss = step(state, *batches[i % len(batches)])
    jax.block_until_ready((state, loss))
    entry["state"] = state
    return steps * batch_size / (time.perf_counter() - start)


def _torch(python: str, mode: str, steps: int, batch_size: int) -> float:
    out = subprocess.run(
        [python, str(HERE / "torch_peer.py"), "--mode", mode, "--steps", str(steps)]
        + ["--batch_size", str(batch_size)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["samples_per_second"]


def _steps_for(model: str, steps: int) -> int:
    """``--steps`` for lenet5, fewer for bigger networks (about the same seconds)."""
    from cgmq_jax import cost
    from cgmq_jax.runs import train

    specs = train.check_config(train.TrainConfig(model=model, method="float"))
    share = cost.float_bops(specs) / HEADLINE_FLOAT_BOPS
    return max(20, int(steps / max(share, 1.0)))


def step_table(args) -> dict:
    from cgmq_jax import data

    dataset = data.load_mnist()
    rows = [(m, method) for m in args.models for method in args.methods]
    rows += [("lenet5", f"{m}:{v}") for v in args.variants for m in ("float", "cgmq")]
    entries, steps = {}, {}
    for model, method in rows:
        print(f"compiling {model} {method} ...", file=sys.stderr, flush=True)
        entries[model, method] = _build(model, method, dataset, args.batch_size)
        steps[model, method] = _steps_for(model, args.steps)
    torch_python = args.torch_python or os.environ.get("CGMQ_TORCH_PYTHON")
    if torch_python:
        rows += [("lenet5", "torch-float"), ("lenet5", "torch-qat")]
        steps["lenet5", "torch-float"] = steps["lenet5", "torch-qat"] = args.steps
    else:
        print(
            "PyTorch peer skipped: pass --torch_python /path/to/venv/bin/python (a Python "
            "with torch; see benchmarks/torch_peer.py)",
            file=sys.stderr,
        )
    samples = {row: [] for row in rows}
    for r in range(args.repeats):
        for row in rows:
            model, method = row
            if method.startswith("torch-"):
                mode = method.split("-")[1]
                samples[row].append(_torch(torch_python, mode, steps[row], args.batch_size))
            else:
                samples[row].append(_time(entries[row], steps[row], args.batch_size))
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    medians = {row: statistics.median(v) for row, v in samples.items()}
    print(f"\n| model | train step | steps | samples/s (median of {args.repeats}) | range |")
    print("|---|---|---:|---:|---|")
    for row in rows:
        low, high = min(samples[row]), max(samples[row])
        print(
            f"| {row[0]} | {row[1]} | {steps[row]} | {medians[row]:,.0f} | {low:,.0f}-{high:,.0f} |"
        )
    print()
    for model in args.models:
        if (model, "float") in medians:
            for method in args.methods:
                if method != "float":
                    ratio = medians[model, "float"] / medians[model, method]
                    print(f"{model}: {method} step costs {ratio:.2f}x the float step")
    if ("lenet5", "torch-qat") in medians and ("lenet5", "cgmq") in medians:
        paired = [
            ours / theirs
            for ours, theirs in zip(
                samples["lenet5", "cgmq"], samples["lenet5", "torch-qat"], strict=True
            )
        ]
        ratio = medians["lenet5", "cgmq"] / medians["lenet5", "torch-qat"]
        print(
            f"lenet5: cgmq runs at {ratio:.2f}x PyTorch's learnable fake-quant QAT "
            f"(paired per round {min(paired):.2f}-{max(paired):.2f})"
        )
    return {"|".join(row): {"median": medians[row], "samples": samples[row]} for row in rows}


FIT = """
import json, sys
from cgmq_jax import data
from cgmq_jax.runs import train
config = train.TrainConfig(**json.loads(sys.argv[1]))
result = train.fit(config, data.load_mnist(), log=lambda line: print(line, file=sys.stderr))
print("RESULT" + json.dumps({"timings": result.timings, "wall_seconds": result.wall_seconds,
    "test_accuracy": result.test_accuracy, "bops": result.certificate["bops"],
    "within_budget": result.certificate["within_budget"]}))
"""


def fit_split(args) -> dict:
    """The headline fit in a child process: time split, accuracy, BOPs, peak RSS."""
    config = {"model": "lenet5", "method": "cgmq", "budget_bops": 2e6}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", FIT, json.dumps(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(HERE.parent)},
    )
    elapsed = time.perf_counter() - start
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    result = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))[6:])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = result["timings"]
    print("\nheadline fit (lenet5, cgmq, 2e6 BOPs, default schedule):")
    print(
        f"  process {elapsed:.1f} s; fit {sum(t.values()):.1f} s = compile {t['compile']:.1f} "
        f"+ train {t['train']:.1f} + evaluate {t['evaluate']:.1f} + other {t['other']:.1f}"
    )
    print(f"  training (wall_seconds, as the CLI reports it): {result['wall_seconds']:.1f} s")
    print(
        f"  test accuracy {100 * result['test_accuracy']:.2f}%  BOPs {result['bops']:,}  "
        f"within budget: {result['within_budget']}"
    )
    print(f"  peak RSS {peak_kib / 1024:.0f} MiB")
    return {**result, "process_seconds": elapsed, "peak_rss_mib": peak_kib / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="lenet5", help="comma-separated")
    parser.add_argument("--methods", default="float,cgmq,dq,fixed", help="comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="lever variants, or ''")
    parser.add_argument("--steps", type=int, default=300, help="per timing, for lenet5")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--torch_python", default=None)
    parser.add_argument("--fit", action="store_true", help="also run the headline fit")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    results = {"steps": step_table(args)}
    if args.fit:
        results["fit"] = fit_split(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
