"""CGMQ vs DQ's penalty vs fixed-bit QAT vs float (and PTQ), across budgets and seeds.

    python experiments/sweep.py --preset quick      # about 20 minutes on 2 cores
    python experiments/sweep.py --preset full       # the README's numbers
    python experiments/sweep.py --preset full --methods cgmq ptq --budgets 2e6 4e6 8e6

``ptq`` (post-training quantization, no QAT: on request) quantizes the same shared float
network as the QAT rows start from; its rows' wall time is the PTQ's.

The quantized runs of a seed share one float pretraining (``pretrain_epochs``) and then
train ``epochs`` QAT epochs; the ``float`` row is a float network trained as long,
``pretrain_epochs + epochs`` epochs (13 in the full preset), in a run of its own.

Every flag is checked before any data is loaded or any training starts: a bad one is an
``error: ...`` line on stderr and exit status 2.

Resumable: rows already in ``OUT/runs.csv`` are not redone. Writes ``runs.csv``,
``summary.md``, ``pareto.png`` (test accuracy vs BOPs) and ``loss.png`` (training loss per
epoch of every run) into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

PRESETS = {
    # epochs are QAT epochs, after a float pretraining shared by the quantized runs of a
    # seed; the float row trains pretrain_epochs + epochs float epochs on its own.
    # lr, batch_size: the presets' own (the ones they were measured with), for every model
    # whatever its default schedule.
    "quick": {"epochs": 2, "pretrain_epochs": 2, "lr": 1e-3, "batch_size": 128, "seeds": [0, 1]},
    "full": {"epochs": 8, "pretrain_epochs": 5, "lr": 1e-3, "batch_size": 128, "seeds": [0, 1]},
}
BUDGETS = [1e6, 2e6, 4e6, 8e6]
LAMS = [0.01, 0.1, 1.0, 10.0]
FIXED_BITS = [(8, 8), (4, 4), (2, 2)]
DEFAULT_METHODS = ("float", "fixed", "cgmq", "dq")  # cgmq_jax.runs.sweep.DEFAULT_METHODS


def parse_args(argv=None) -> argparse.Namespace:
    from cgmq_jax.data import DATASETS, SOURCES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", default=None, help="results directory (default runs/sweep_PRESET)")
    p.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    p.add_argument("--lams", type=float, nargs="+", default=LAMS)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="float, fixed, cgmq, dq, ptq (post-training: on request)",
    )
    p.add_argument("--model", default="lenet5", help="lenet5, lenet5_bb, mlp or dscnn")
    p.add_argument(
        "--fixed_bits",
        nargs="+",
        default=[f"{w}/{a}" for w, a in FIXED_BITS],
        help="the fixed rows' weight/input bits, e.g. 8/8 4/4",
    )
    p.add_argument("--dataset", choices=tuple(DATASETS), default="mnist")
    p.add_argument("--data", choices=SOURCES, default="auto", help="the dataset's source")
    p.add_argument("--data_dir", default=None, help="tfds data dir, IDX directory, or tarball")
    args = p.parse_args(argv)
    if args.out is None:
        suffix = "" if args.dataset == "mnist" else f"_{args.dataset}"
        suffix += "" if args.model == "lenet5" else f"_{args.model}"
        args.out = f"runs/sweep_{args.preset}{suffix}"
    if args.seeds is None:
        args.seeds = PRESETS[args.preset]["seeds"]
    return args


def check_args(args: argparse.Namespace) -> Path:
    """Validate every flag before any compute; return the (created, writable) ``--out``.

    Raises:
      ValueError: the first bad flag, with a one-line message (an infeasible budget raises
        :class:`cgmq_jax.limits.InfeasibleBudgetError`, a ``ValueError``).
    """
    from cgmq_jax import cost, data, models
    from cgmq_jax.runs import sweep, train

    unknown = [m for m in args.methods if m not in train.METHODS]
    if unknown:
        raise ValueError(
            f"unknown method {unknown[0]!r} in --methods; choose from {', '.join(train.METHODS)}"
        )
    if args.model not in models.MODELS:
        raise ValueError(f"unknown --model {args.model!r}; choose one of {sorted(models.MODELS)}")
    for budget in args.budgets:
        try:
            cost.validate_budget(budget)
            config = train.TrainConfig(method="cgmq", budget_bops=budget, model=args.model)
            train.check_config(config, data.DATASETS[args.dataset].image_shape)
        except ValueError as error:  # InfeasibleBudgetError is one, and says the minimum
            message = str(error).replace("--budget_bops", "--budgets")  # this script's flag
            raise type(error)(f"--budgets: {message}") from None
    args.fixed_bits = [_bits_pair(text) for text in args.fixed_bits]
    for lam in args.lams:
        if not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"--lams must be positive finite numbers, got {lam:g}")
    for seed in args.seeds:
        if seed < 0:
            raise ValueError(f"--seeds must be non-negative integers, got {seed}")
    out = _check_out(Path(args.out))
    sweep.check_csv(out / "runs.csv")
    return out


def _bits_pair(text) -> tuple[int, int]:
    """``"4/4"`` -> ``(4, 4)``; ``ValueError`` naming ``--fixed_bits`` otherwise."""
    if isinstance(text, tuple):
        return text
    try:
        weight, activation = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(
            f"--fixed_bits takes WEIGHT/INPUT bits such as 4/4, got {text!r}"
        ) from None
    if not (2 <= weight <= 16 and 1 <= activation <= 16):
        raise ValueError(
            f"--fixed_bits {text}: weight bits must be in [2, 16], input bits in [1, 16]"
        )
    return weight, activation


def _check_out(out: Path) -> Path:
    """Create ``out`` and probe it with a temporary file; ``ValueError`` if unusable."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe_"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise ValueError(f"--out {out}: cannot create or write the directory ({reason})") from None
    return out


def _error(error: Exception) -> int:
    print("error: " + " ".join(str(error).split()), file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    from cgmq_jax import data, files
    from cgmq_jax.runs import parallel, sweep, train

    parallel.use_compilation_cache()  # the runs after the first skip compiling their steps
    try:
        out = check_args(args)
    except (ValueError, TypeError) as error:
        return _error(error)
    preset = PRESETS[args.preset]
    base = train.TrainConfig(model=args.model, lr=preset["lr"], batch_size=preset["batch_size"])
    runs = sweep.grid(
        budgets=args.budgets,
        seeds=args.seeds,
        lams=args.lams,
        fixed_bits=args.fixed_bits,
        methods=args.methods,
    )
    try:
        dataset = data.load(args.dataset, args.data, data_dir=args.data_dir)
        train.check_dataset(base, dataset)
    except ValueError as error:  # data.DataError is a ValueError
        return _error(error)
    rows = sweep.run_grid(
        runs,
        dataset,
        out / "runs.csv",
        epochs=preset["epochs"],
        pretrain_epochs=preset["pretrain_epochs"],
        base=base,
    )
    summary = _summary(args.preset, preset, rows, f"{dataset.name} ({args.model})")
    files.write_text(out / "summary.md", summary)
    sweep.plot_pareto(rows, out / "pareto.png", args.budgets)
    sweep.plot_losses(rows, out / "loss.png")
    print(summary)
    print(f"wrote {out}/runs.csv, summary.md, pareto.png, loss.png")
    return 0


def _summary(name: str, preset: dict, rows: list[dict], dataset: str = "mnist") -> str:
    from cgmq_jax.runs import sweep

    pretrain, epochs = preset["pretrain_epochs"], preset["epochs"]
    ptq = any(r["method"] == "ptq" for r in rows)
    return (
        f"Preset `{name}` on {dataset}: quantized runs {pretrain} float epochs (shared per seed) + "
        f"{epochs} QAT epochs; float runs {pretrain + epochs} float epochs; "
        + ("ptq runs: the shared float network, no QAT; " if ptq else "")
        + f"seeds {sorted({int(r['seed']) for r in rows})}.\n\n"
        + sweep.summarize(rows)
        + "\n"
        + (
            "\n" + sweep.dq_search_cost(rows) + "\n"
            if any(r["method"] == "dq" for r in rows)
            else ""
        )
    )


if __name__ == "__main__":
    sys.exit(main())
