"""CGMQ vs DQ's penalty vs fixed-bit QAT vs float, across budgets and seeds.

    python experiments/sweep.py --preset quick      # about 20 minutes on 2 cores
    python experiments/sweep.py --preset full       # the README's numbers

Resumable: rows already in ``OUT/runs.csv`` are not redone. Writes ``runs.csv``,
``summary.md`` and ``pareto.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PRESETS = {
    # epochs are QAT epochs; the float pretraining is shared by all runs of a seed.
    "quick": {"epochs": 2, "pretrain_epochs": 2, "seeds": [0, 1]},
    "full": {"epochs": 8, "pretrain_epochs": 5, "seeds": [0, 1]},
}
BUDGETS = [1e6, 2e6, 4e6, 8e6]
LAMS = [0.01, 0.1, 1.0, 10.0]
FIXED_BITS = [(8, 8), (4, 4), (2, 2)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--out", default=None, help="results directory (default runs/sweep_PRESET)")
    p.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    p.add_argument("--lams", type=float, nargs="+", default=LAMS)
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=["float", "fixed", "cgmq", "dq"])
    p.add_argument("--data", choices=("auto", "tfds", "bundled", "idx"), default="auto")
    p.add_argument("--data_dir", default=None)
    args = p.parse_args(argv)

    from cgmq_jax import data, sweep

    preset = PRESETS[args.preset]
    out = Path(args.out or f"runs/sweep_{args.preset}")
    runs = sweep.grid(
        budgets=args.budgets,
        seeds=args.seeds if args.seeds is not None else preset["seeds"],
        lams=args.lams,
        fixed_bits=FIXED_BITS,
        methods=args.methods,
    )
    try:
        dataset = data.load_mnist(args.data, data_dir=args.data_dir)
    except data.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = sweep.run_grid(
        runs,
        dataset,
        out / "runs.csv",
        epochs=preset["epochs"],
        pretrain_epochs=preset["pretrain_epochs"],
    )
    summary = (
        f"Preset `{args.preset}`: {preset['pretrain_epochs']} float epochs (shared per seed) + "
        f"{preset['epochs']} QAT epochs, seeds {sorted({r['seed'] for r in rows})}.\n\n"
        + sweep.summarize(rows)
        + "\n\n"
        + sweep.dq_search_cost(rows)
        + "\n"
    )
    (out / "summary.md").write_text(summary)
    sweep.plot_pareto(rows, out / "pareto.png", args.budgets)
    print(summary)
    print(f"wrote {out}/runs.csv, summary.md, pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
