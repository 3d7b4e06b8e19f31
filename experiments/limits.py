"""Several hard limits at once on LeNet-5: CGMQ under each limit in turn and all three,
and how many trainings DQ's penalty (one ``lam`` per limit) needs to find a compliant model.

    python experiments/limits.py --out runs/limits            # all runs, then the table
    python experiments/limits.py --out runs/limits --summary  # the table of finished runs

Every run is ``experiments/mnist.py`` with its own directory under ``--out`` (a finished
one is not redone), so each has its ``results.json``, certificate and plot. The table
(``--out/limits.md``) lists accuracy, every exact cost and the verdict of every limit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

# name -> flags: the BOP limit alone, the weight-memory limit alone, the activation limit
# alone, then all three tighter (each binds in turn, then all at once).
SETTINGS = {
    "bops": ["--budget_bops", "2e6"],
    "weight": ["--budget_weight_kib", "14"],
    "activation": ["--budget_activation_kib", "0.2"],
    "all": [
        "--budget_bops", "1.5e6", "--budget_weight_kib", "13", "--budget_activation_kib", "0.15"
    ],
}  # fmt: skip
#: DQ's grid for the "all" setting: one lam per limit.
DQ_LAMS = [0.1, 10.0]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/limits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain_epochs", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--no_dq", action="store_true", help="skip DQ's lam grid")
    p.add_argument("--summary", action="store_true", help="only summarise finished runs")
    return p.parse_args(argv)


def _runs(args) -> list[tuple[str, list[str]]]:
    """``(run name, mnist.py flags)`` of every run of the study."""
    schedule = ["--pretrain_epochs", str(args.pretrain_epochs), "--epochs", str(args.epochs)]
    runs = [
        (f"{name}_s{seed}", [*flags, *schedule, "--seed", str(seed)])
        for seed in args.seeds
        for name, flags in SETTINGS.items()
    ]
    if not args.no_dq:
        for lams in itertools.product(DQ_LAMS, repeat=3):
            name = "dq_" + "_".join(f"{lam:g}" for lam in lams) + f"_s{args.seeds[0]}"
            lam_flags = ["--lam", str(lams[0]), "--lam_weight", str(lams[1])]
            lam_flags += ["--lam_activation", str(lams[2])]
            runs.append(
                (name, [*SETTINGS["all"], *schedule, "--seed", str(args.seeds[0]), "--method",
                        "dq", *lam_flags])
            )  # fmt: skip
    return runs


def _load(out: Path, name: str) -> dict | None:
    path = out / name / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _row(name: str, results: dict) -> dict:
    certificate = results["certificate"]
    limits = certificate.get("limits") or {}
    layers = certificate["layers"]
    return {
        "run": name,
        "method": results["config"]["method"],
        "accuracy": results["test_accuracy"],
        "bops": certificate["bops"],
        "weight_memory_bits": certificate.get("weight_memory_bits"),
        "activation_bits": certificate.get("activation_bits"),
        "limits": {k: (v["limit"], v["within"]) for k, v in limits.items()},
        "compliant": all(v["within"] for v in limits.values()),
        "bits": " ".join(f"{r['weight_bits']}/{r['input_bits']}" for r in layers),
    }


def table(out: Path, runs: list[tuple[str, list[str]]]) -> str:
    rows = [_row(name, r) for name, _ in runs if (r := _load(out, name)) is not None]
    lines = [
        "| run | method | test acc. | BOPs | weight memory (bits) | largest activation (bits) "
        "| limits: within? | w/in bits per layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        verdicts = ", ".join(
            f"{k} {limit:,.0f}: {'yes' if ok else 'NO'}" for k, (limit, ok) in row["limits"].items()
        )
        lines.append(
            f"| {row['run']} | {row['method']} | {100 * row['accuracy']:.2f}% | {row['bops']:,} "
            f"| {row['weight_memory_bits']:,} | {row['activation_bits']:,} | {verdicts} "
            f"| {row['bits']} |"
        )
    lines += ["", "| setting | runs | test acc. mean (min-max) | compliant |", "|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        key = row["run"].rsplit("_s", 1)[0] if row["method"] == "cgmq" else "dq (all)"
        groups.setdefault(key, []).append(row)
    for key, group in groups.items():
        accs = [100 * r["accuracy"] for r in group]
        lines.append(
            f"| {key} | {len(group)} | {statistics.mean(accs):.2f}% ({min(accs):.2f}-"
            f"{max(accs):.2f}) | {sum(r['compliant'] for r in group)} of {len(group)} |"
        )
    dq = groups.get("dq (all)", [])
    if dq:
        found = next((i + 1 for i, r in enumerate(dq) if r["compliant"]), None)
        lines.append(
            f"\nDQ's penalty, {len(dq)} trainings over the lam grid {DQ_LAMS} per limit: "
            f"{sum(r['compliant'] for r in dq)} compliant; in grid order the first compliant "
            f"model is training {found}." if found else
            f"\nDQ's penalty: none of {len(dq)} trainings over the lam grid is compliant."
        )  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    runs = _runs(args)
    if not args.summary:
        sys.path.insert(0, str(Path(__file__).parent))
        import mnist

        for name, flags in runs:
            if _load(out, name) is not None:
                continue
            status = mnist.main([*flags, "--out", str(out / name), "--overwrite"])
            if status != 0:
                print(f"error: run {name} failed with exit status {status}", file=sys.stderr)
                return status
    text = table(out, runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "limits.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
