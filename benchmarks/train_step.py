"""Train-step throughput (samples/s) of float, cgmq, dq and fixed, and the headline fit's
wall time split, with its peak memory.

    python benchmarks/train_step.py                  # lenet5, 5 interleaved rounds
    python benchmarks/train_step.py --models lenet5,mlp,lenet5_bb,dscnn --fit

Every configuration's jitted step (:func:`cgmq_jax.runs.train.initial_step`, as ``fit`` builds
it) is compiled first; then ``--repeats`` rounds each time every configuration in turn
(interleaved, so that a slow moment of the machine hits all of them), on real MNIST
batches already on the device, for about ``--seconds`` each: a probe of
:data:`PROBE_STEPS` steps after the compile sets each configuration's (and each peer's)
step count. (``--steps N`` instead times N steps of LeNet-5 and fewer, by MACs, of the
bigger networks: their windows then differ in length, ``lenet5_bb``'s under a second.)
Printed: the median samples/s, the spread, and the ratios that the targets are stated
in. The lever variants time the same cgmq step with one lever undone: ``direct-conv``
(XLA's direct convolution instead of :func:`cgmq_jax.nn.patch_conv` for conv1, depthwise
and pointwise convolutions) and ``no-donate`` (the state's buffers not donated to the
step), ``flax-max-pool`` (``flax.linen.max_pool``'s gradient instead of
:func:`cgmq_jax.nn.max_pool`'s), and ``no-levers`` (all three undone: the step of the
release before them). ``--microbatches 1`` adds each model's cgmq step with its batch whole
(``cgmq/1``: the DS-CNN's before its default of 8 parts, :func:`cgmq_jax.runs.steps.microbatched`).

Peers: with ``--peers_python PATH`` (or ``CGMQ_PEERS_PYTHON``; ``make setup-peers`` builds
``.venv-peers``, never a dependency of this project), each round also times the peers, each
in its own long-lived process (``benchmarks/peer_serve.py``: started and warmed up once, so
neither its start nor its compile is timed): ``benchmarks/torch_peer.py`` (PyTorch eager,
float and QAT with learnable fake quantizers) for each of lenet5, lenet5_bb and dscnn among
``--models``, and ``benchmarks/qwix_peer.py`` (Qwix int8 QAT on a plain linen LeNet-5) for
lenet5. The ratios to a peer are paired per round (ours / the peer's, in the same round),
and their median over the rounds is printed with their range. PyTorch's OpenMP workers run
with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it: on a loaded 2-core machine
its spinning workers made its LeNet-5 QAT step 9x slower (283 against 2,536 samples/s),
which would flatter us. The load average is printed before and after the rounds, and the CPU
(model, usable cores, AVX2 / AVX-512 / AMX: the ratios depend on it). Without
a peers' Python the peers are skipped with a message.

``--fit`` also runs the headline (``experiments/mnist.py --budget_bops 2e6``'s config) in a
child process and prints its wall time split into compile / train / evaluate / other, the
test accuracy, the certified BOPs, and the child's peak resident memory (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

VARIANTS = ("direct-conv", "no-donate", "flax-max-pool", "no-levers")
HEADLINE_FLOAT_BOPS = 288_399_360  # lenet5 at 32 x 32 bits
PROBE_STEPS = 20  # timed once after the compile to size each window (--seconds)


def _build(model: str, method: str, dataset, batch_size: int):
    """``(step, state, batches)`` for one configuration, compiled and warmed up."""
    import flax.linen
    import jax

    from cgmq_jax import cost, models, nn
    from cgmq_jax.runs import train

    variant = None
    method, _, parts = method.partition("/")  # cgmq/1: the batch in 1 part (--microbatches)
    method, _, devices = method.partition("@")  # cgmq@2: data parallel over 2 (--devices)
    if ":" in method:
        method, variant = method.split(":")
    budget = None
    if method in ("cgmq", "dq"):  # the headline's 2e6 for lenet5, the same share elsewhere
        specs = train.check_config(train.TrainConfig(model=model, method="float"))
        budget = 2e6 * cost.float_bops(specs) / HEADLINE_FLOAT_BOPS
    config = train.TrainConfig(
        model=model,
        method=method,
        budget_bops=budget,
        batch_size=batch_size,
        devices=int(devices or 1),
        microbatches=int(parts) if parts else None,  # None: the model's schedule's
    )
    saved = nn.PATCH_CONV_MAX_CHANNELS, nn.PATCH_CONV_POINTWISE, models.max_pool
    if variant in ("direct-conv", "no-levers"):
        nn.PATCH_CONV_MAX_CHANNELS, nn.PATCH_CONV_POINTWISE = 0, False
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
        state, loss = step(state, *batches[0])  # compiles (the PATCH_CONV flags are read now)
        jax.block_until_ready(loss)
    finally:
        nn.PATCH_CONV_MAX_CHANNELS, nn.PATCH_CONV_POINTWISE, models.max_pool = saved
    return {"step": step, "state": state, "batches": batches, "wait": placement.synchronous}


def _time(entry: dict, steps: int, batch_size: int) -> float:
    import jax

    step, state, batches = entry["step"], entry["state"], entry["batches"]
    start = time.perf_counter()
    for i in range(steps):
        state, loss = step(state, *batches[i % len(batches)])
        if entry["wait"]:  # several devices of one CPU: as fit runs them (parallel.py)
            jax.block_until_ready(loss)
    jax.block_until_ready((state, loss))
    entry["state"] = state
    return steps * batch_size / (time.perf_counter() - start)


def _timer(entry: dict, batch_size: int):
    """``steps -> samples/s`` of one of our configurations, as a peer's ``time``."""
    return lambda steps: _time(entry, steps, batch_size)


#: (model, row) -> the peer script and its arguments; rows named ``<peer>-<mode>``.
PEERS = {
    (model, f"torch-{mode}"): ("torch_peer.py", "--model", model, "--mode", mode)
    for model in ("lenet5", "lenet5_bb", "dscnn")
    for mode in ("float", "qat")
} | {("lenet5", "qwix-int8"): ("qwix_peer.py", "--mode", "int8")}


class Peer:
    """A peer's step in its own process (``benchmarks/peer_serve.py``'s protocol)."""

    def __init__(self, python: str, script: str, *args: str, batch_size: int):
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        self.process = subprocess.Popen(
            [python, str(HERE / script), *args, "--serve", "--batch_size", str(batch_size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.info = None

    def ready(self) -> dict | None:
        """The peer's versions once it has warmed up; ``None`` (and a message) if it died."""
        line = self.process.stdout.readline()
        if not line:
            error = self.process.stderr.read().strip().splitlines()
            print(f"peer {self.process.args[1:4]} failed: {error[-1:]}", file=sys.stderr)
            return None
        self.info = json.loads(line)
        return self.info

    def time(self, steps: int) -> float:
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["samples_per_second"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _start_peers(args) -> dict:
    """The peers of ``args.models`` that ``args.peers`` names, started (not yet ready)."""
    python = args.peers_python or os.environ.get("CGMQ_PEERS_PYTHON")
    python = python or os.environ.get("CGMQ_TORCH_PYTHON")
    if not python:
        print(
            "peers skipped: pass --peers_python .venv-peers/bin/python (make setup-peers: "
            "PyTorch and Qwix; see benchmarks/torch_peer.py, benchmarks/qwix_peer.py)",
            file=sys.stderr,
        )
        return {}
    return {
        row: Peer(python, *command, batch_size=args.batch_size)
        for row, command in PEERS.items()
        if row[0] in args.models and row[1].split("-")[0] in args.peers
    }


def _counts(args, python: str | None) -> None:
    """Parameters and MACs of ours beside the PyTorch peer's networks (layer for layer)."""
    import jax
    import jax.numpy as jnp

    from cgmq_jax import cost, models

    theirs = {}
    if python:
        out = subprocess.run(
            [python, str(HERE / "torch_peer.py"), "--describe"],
            capture_output=True,
            text=True,
            check=True,
        )
        theirs = json.loads(out.stdout.strip().splitlines()[-1])
    x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    print("\n| network | params ours (float / QAT) | PyTorch | MACs ours | PyTorch |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models:
        counts = []
        for quantized in (False, True):
            model = models.get_model(name, quantized=quantized)
            shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
            leaves = jax.tree_util.tree_leaves_with_path(shapes)
            counts.append(
                sum(v.size for path, v in leaves if path[-1].key in ("kernel", "bias", "scale"))
            )
        macs = cost.total_macs(cost.layer_specs(models.get_model(name), x))
        peer = [theirs.get(f"{name}:{mode}") for mode in ("float", "qat")]
        peer_params = " / ".join(f"{p['params']:,}" for p in peer) if all(peer) else "-"
        peer_macs = f"{peer[1]['macs']:,}" if all(peer) else "-"
        ours = f"{counts[0]:,} / {counts[1]:,}"
        print(f"| {name} | {ours} | {peer_params} | {macs:,} | {peer_macs} |")


def _steps_for_seconds(samples_per_second: float, seconds: float, batch_size: int) -> int:
    """The steps that take about ``seconds`` at ``samples_per_second`` (at least 20).

    Examples:
      >>> _steps_for_seconds(12_800, 3.0, 128)
      300
      >>> _steps_for_seconds(500, 3.0, 128)
      20
    """
    return max(20, round(seconds * samples_per_second / batch_size))


def _steps_for(model: str, steps: int) -> int:
    """``--steps`` for lenet5, fewer for bigger networks, by their MACs (the rule before
    ``--seconds``: a window's seconds then differ from network to network)."""
    from cgmq_jax import cost
    from cgmq_jax.runs import train

    specs = train.check_config(train.TrainConfig(model=model, method="float"))
    share = cost.float_bops(specs) / HEADLINE_FLOAT_BOPS
    return max(20, int(steps / max(share, 1.0)))


def step_table(args) -> dict:
    from cgmq_jax import data

    dataset = data.load_mnist()
    rows = [
        (m, method + (f"@{n}" if n > 1 else ""))
        for m in args.models
        for n in args.devices
        for method in args.methods
    ]
    rows += [("lenet5", f"{m}:{v}") for v in args.variants for m in ("float", "cgmq")]
    rows += [(m, f"cgmq/{k}") for m in args.models for k in args.microbatches]
    started = _start_peers(args)  # they start and compile while ours compile
    entries = {}
    for model, method in rows:
        print(f"compiling {model} {method} ...", file=sys.stderr, flush=True)
        entries[model, method] = _build(model, method, dataset, args.batch_size)
    peers = {row: peer for row, peer in started.items() if peer.ready() is not None}
    rows += list(peers)
    timers = {  # steps -> samples/s, ours and the peers' alike
        row: peers[row].time if row in peers else _timer(entries[row], args.batch_size)
        for row in rows
    }
    if args.steps is not None:
        steps = {row: _steps_for(row[0], args.steps) for row in rows}
    else:
        steps = {
            row: _steps_for_seconds(timers[row](PROBE_STEPS), args.seconds, args.batch_size)
            for row in rows
        }
        sized = ", ".join(f"{' '.join(row)} {n}" for row, n in steps.items())
        print(f"steps per timing (about {args.seconds:g} s each): {sized}", file=sys.stderr)
    versions = {row[1].split("-")[0]: peer.info for row, peer in peers.items()}
    for name, info in versions.items():
        keys = ("torch", "threads") if name == "torch" else ("qwix", "jax", "flax")
        print(f"peer {name}: " + ", ".join(f"{k} {info.get(k)}" for k in keys), file=sys.stderr)
    cpu = cpu_model()
    print(f"cpu: {cpu}", file=sys.stderr)
    load = [os.getloadavg()]
    print(f"load average before the rounds: {_load(load[0])}", file=sys.stderr, flush=True)
    samples = {row: [] for row in rows}
    for r in range(args.repeats):
        for row in rows:
            samples[row].append(timers[row](steps[row]))
        print(f"round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    for peer in peers.values():
        peer.close()
    load.append(os.getloadavg())
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
    ratios = _paired_ratios(args, samples)
    if ratios:
        print(f"\n| model | ratio, paired per round | median of {args.repeats} | range |")
        print("|---|---|---:|---|")
        for (model, label), values in ratios.items():
            print(
                f"| {model} | {label} | {statistics.median(values):.2f}x | "
                f"{min(values):.2f}-{max(values):.2f} |"
            )
    print(f"\nload average (1, 5, 15 min): before {_load(load[0])}, after {_load(load[1])}")
    print(f"cpu: {cpu}")
    result = {"|".join(row): {"median": medians[row], "samples": samples[row]} for row in rows}
    result["ratios"] = {f"{m}|{label}": values for (m, label), values in ratios.items()}
    result["load_average"] = load
    result["cpu"] = cpu
    result["peers"] = versions
    return result


def _load(load: tuple[float, ...]) -> str:
    return ", ".join(f"{x:.2f}" for x in load)


def cpu_model() -> str:
    """The CPU's model name and usable cores, and its widest vector units (the ratios to the
    peers depend on them: docs/performance.md), from ``/proc/cpuinfo`` where there is one."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    flags = set(fields.get("flags", "").split())
    units = [u for u in ("avx2", "avx512f", "amx_tile") if u in flags]
    name = fields.get("model name", platform.machine())
    return f"{name}, {len(os.sched_getaffinity(0))} cores, {' '.join(units) or 'no AVX2'}"


#: (ours, theirs, label): a ratio of samples/s, paired per round; the QAT / float cost ratio
#: is float's samples/s over QAT's (how much longer a QAT step takes).
RATIOS = (
    ("cgmq", "torch-qat", "CGMQ QAT / PyTorch QAT (speed)"),
    ("cgmq", "qwix-int8", "CGMQ QAT / Qwix int8 QAT (speed)"),
    ("float", "torch-float", "our float / PyTorch float (speed)"),
    ("float", "cgmq", "CGMQ QAT / our float (step time)"),
    ("torch-float", "torch-qat", "PyTorch QAT / PyTorch float (step time)"),
)


def _paired_ratios(args, samples: dict) -> dict:
    ratios = {}
    pairs = list(RATIOS)
    for n in (n for n in args.devices if n > 1):  # the split CPU (--devices)
        pairs += [
            (f"cgmq@{n}", "torch-qat", f"CGMQ QAT on {n} devices / PyTorch QAT (speed)"),
            (f"cgmq@{n}", "qwix-int8", f"CGMQ QAT on {n} devices / Qwix int8 QAT (speed)"),
            (f"float@{n}", "torch-float", f"our float on {n} devices / PyTorch float (speed)"),
            (f"cgmq@{n}", "cgmq", f"CGMQ QAT on {n} devices / on 1 (speed)"),
        ]
    for k in args.microbatches:  # the batch in k parts instead of the model's
        pairs += [
            (f"cgmq/{k}", "torch-qat", f"CGMQ QAT, the batch in {k} part(s) / PyTorch QAT (speed)"),
            ("cgmq", f"cgmq/{k}", f"CGMQ QAT / the batch in {k} part(s) (speed)"),
        ]
    for model in args.models:
        for ours, theirs, label in pairs:
            if (model, ours) in samples and (model, theirs) in samples:
                paired = zip(samples[model, ours], samples[model, theirs], strict=True)
                ratios[model, label] = [a / b for a, b in paired]
    return ratios


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
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="about this long per timing (a probe sizes it)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="instead: this many per timing for lenet5"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument(
        "--devices", default="1", help="comma-separated: time our steps on each (1,2 on 2 cores)"
    )
    parser.add_argument(
        "--peers_python", "--torch_python", default=None, help="a Python with torch and qwix"
    )
    parser.add_argument("--peers", default="torch,qwix", help="comma-separated, or ''")
    parser.add_argument(
        "--microbatches",
        default="",
        help="comma-separated: also time each model's cgmq step with its batch in N parts "
        "(cgmq/N rows; 1: the whole batch, the DS-CNN's step before its default of 8)",
    )
    parser.add_argument("--fit", action="store_true", help="also run the headline fit")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    args.peers = [p for p in args.peers.split(",") if p]
    args.devices = [int(n) for n in args.devices.split(",") if n]
    args.microbatches = [int(n) for n in args.microbatches.split(",") if n]
    if max(args.devices) > 1:  # before anything computes; on a GPU it splits nothing
        from cgmq_jax.runs import parallel

        parallel.split_cpu(max(args.devices))
    if not args.seconds > 0 or (args.steps is not None and args.steps < 1):
        parser.error("--seconds must be > 0 and --steps (when given) at least 1")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    _counts(args, args.peers_python or os.environ.get("CGMQ_PEERS_PYTHON"))
    results = {"steps": step_table(args)}
    if args.fit:
        results["fit"] = fit_split(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
