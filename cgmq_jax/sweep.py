"""Method comparison: a resumable grid of runs, one CSV row each, a summary and a plot.

Every run goes through :func:`cgmq_jax.train.fit` with the same protocol; runs of one seed
share one float pretraining (the ``float`` rows are that checkpoint, evaluated).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import os
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

from cgmq_jax import data, train

COLUMNS = (
    "method",
    "budget_bops",
    "lam",
    "bits",
    "seed",
    "test_accuracy",
    "bops",
    "relative_bops_percent",
    "within_budget",
    "wall_seconds",
    "epochs",
    "layer_bits",
)


def _print_now(line: str) -> None:
    print(line, flush=True)


@dataclasses.dataclass(frozen=True)
class Run:
    """One cell of the grid."""

    method: str
    seed: int
    budget_bops: float | None = None
    lam: float | None = None
    bits: tuple[int, int] | None = None  # fixed: (weight bits, input bits)

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        bits = "" if self.bits is None else f"W{self.bits[0]}A{self.bits[1]}"
        return (
            self.method,
            "" if self.budget_bops is None else f"{self.budget_bops:g}",
            "" if self.lam is None else f"{self.lam:g}",
            bits,
            str(self.seed),
        )


def grid(
    *,
    budgets: Iterable[float],
    seeds: Iterable[int],
    lams: Iterable[float],
    fixed_bits: Iterable[tuple[int, int]],
    methods: Iterable[str] = train.METHODS,
) -> list[Run]:
    """All runs: float first per seed (its checkpoint seeds the others), then the rest."""
    methods, budgets, lams, fixed_bits = list(methods), list(budgets), list(lams), list(fixed_bits)
    runs = []
    for seed in seeds:
        if "float" in methods:
            runs.append(Run("float", seed))
        if "fixed" in methods:
            runs += [Run("fixed", seed, bits=tuple(b)) for b in fixed_bits]
        for budget in budgets:
            if "cgmq" in methods:
                runs.append(Run("cgmq", seed, budget_bops=budget))
            if "dq" in methods:
                runs += [Run("dq", seed, budget_bops=budget, lam=lam) for lam in lams]
    return runs


def read_rows(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _row_key(row: dict) -> tuple[str, ...]:
    return tuple(row[c] for c in ("method", "budget_bops", "lam", "bits", "seed"))


def run_grid(
    runs: list[Run],
    dataset: data.MnistData,
    csv_path: str | os.PathLike,
    *,
    epochs: int,
    pretrain_epochs: int,
    base: train.TrainConfig | None = None,
    fit: Callable = train.fit,
    log: Callable[[str], None] = _print_now,
) -> list[dict]:
    """Run every run whose row is not in ``csv_path`` yet; append each row when done."""
    base = base if base is not None else train.TrainConfig()
    csv_path = Path(csv_path)
    done = {_row_key(row) for row in read_rows(csv_path)}
    float_results: dict[int, train.FitResult] = {}

    def pretrained(seed: int) -> train.FitResult:
        if seed not in float_results:
            config = dataclasses.replace(
                base, method="float", epochs=pretrain_epochs, seed=seed, budget_bops=None
            )
            float_results[seed] = fit(config, dataset, log=lambda _: None)
        return float_results[seed]

    for i, run in enumerate(runs):
        if run.key in done:
            continue
        if run.method == "float":
            result = pretrained(run.seed)
        else:
            config = dataclasses.replace(
                base,
                method=run.method,
                budget_bops=run.budget_bops,
                lam=run.lam if run.lam is not None else base.lam,
                bits_w=run.bits[0] if run.bits else base.bits_w,
                bits_a=run.bits[1] if run.bits else base.bits_a,
                epochs=epochs,
                pretrain_epochs=pretrain_epochs,
                seed=run.seed,
            )
            float_params = pretrained(run.seed).params
            result = fit(config, dataset, log=lambda _: None, float_params=float_params)
        row = _row(run, result, epochs if run.method != "float" else pretrain_epochs)
        _append(csv_path, row)
        log(
            f"[{i + 1}/{len(runs)}] {' '.join(k for k in run.key if k)}: "
            f"test {100 * result.test_accuracy:.2f}%  {row['bops']:,} BOPs  "
            f"within budget: {row['within_budget'] or '-'}  {row['wall_seconds']} s"
        )
    return read_rows(csv_path)


def _row(run: Run, result: train.FitResult, epochs: int) -> dict:
    method, budget, lam, bits, seed = run.key
    certificate = result.certificate
    layer_bits = " ".join(
        f"{r['layer']}:{r['weight_bits']}/{r['input_bits']}" for r in certificate["layers"]
    )
    return {
        "method": method,
        "budget_bops": budget,
        "lam": lam,
        "bits": bits,
        "seed": seed,
        "test_accuracy": f"{result.test_accuracy:.4f}",
        "bops": certificate["bops"],
        "relative_bops_percent": f"{certificate['relative_bops_percent']:.4f}",
        "within_budget": "" if run.budget_bops is None else str(certificate["within_budget"]),
        "wall_seconds": f"{result.wall_seconds:.1f}",
        "epochs": epochs,
        "layer_bits": layer_bits,
    }


def _append(path: Path, row: dict) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def summarize(rows: list[dict]) -> str:
    """Markdown: per method and budget, median and range of test accuracy, compliance."""
    lines = [
        "| method | budget (BOPs) | lam / bits | runs | test acc. median (min-max) | "
        "BOPs median | within budget |",
        "|---|---|---|---|---|---|---|",
    ]

    def group_key(row):
        budget = float(row["budget_bops"]) if row["budget_bops"] else 0.0
        lam = float(row["lam"]) if row["lam"] else 0.0
        return (budget, row["method"] != "cgmq", row["method"], lam, row["bits"])

    ordered = sorted(rows, key=group_key)
    for (budget, _, method, lam, bits), group in itertools.groupby(ordered, key=group_key):
        group = list(group)
        accuracies = [100 * float(r["test_accuracy"]) for r in group]
        bops = statistics.median(int(r["bops"]) for r in group)
        compliant = [r["within_budget"] == "True" for r in group if r["within_budget"]]
        compliance = f"{sum(compliant)}/{len(compliant)}" if compliant else "n/a"
        setting = bits or (f"{lam:g}" if method == "dq" else "")
        lines.append(
            f"| {method} | {f'{budget:.0e}' if budget else '-'} | {setting} | {len(group)} | "
            f"{statistics.median(accuracies):.2f} ({min(accuracies):.2f}-{max(accuracies):.2f}) | "
            f"{bops:,.0f} | {compliance} |"
        )
    return "\n".join(lines)


def dq_search_cost(rows: list[dict]) -> str:
    """Markdown: per budget and seed, how many dq runs (lam tried from small to large) it
    took to find a model within budget, against CGMQ's one run."""
    lines = [
        "| budget (BOPs) | seed | dq runs until compliant (lam ascending) | cgmq runs |",
        "|---|---|---|---|",
    ]
    dq = [r for r in rows if r["method"] == "dq"]
    cgmq = {(r["budget_bops"], r["seed"]): r for r in rows if r["method"] == "cgmq"}
    for budget, seed in sorted({(r["budget_bops"], r["seed"]) for r in dq}, key=_numeric):
        tries = sorted(
            (r for r in dq if r["budget_bops"] == budget and r["seed"] == seed),
            key=lambda r: float(r["lam"]),
        )
        found = next((i + 1 for i, r in enumerate(tries) if r["within_budget"] == "True"), None)
        searched = str(found) if found else f"none of {len(tries)}"
        ours = cgmq.get((budget, seed))
        ours = "1" if ours and ours["within_budget"] == "True" else "not compliant"
        lines.append(f"| {float(budget):.0e} | {seed} | {searched} | {ours} |")
    return "\n".join(lines)


def _numeric(pair):
    return tuple(float(x) for x in pair)


def plot_pareto(rows: list[dict], path: str | os.PathLike, budgets: Iterable[float]) -> None:
    """Test accuracy vs BOPs (log axis): one marker per run, budgets as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "cgmq": ("o", "tab:blue"),
        "dq": ("x", "tab:orange"),
        "fixed": ("s", "tab:green"),
        "float": ("*", "tab:gray"),
    }
    fig, ax = plt.subplots(figsize=(8, 5))
    for budget in budgets:
        ax.axvline(budget, color="red", alpha=0.3, linestyle="--")
    over = [r for r in rows if r["within_budget"] == "False"]
    for method, (marker, color) in styles.items():
        chosen = [r for r in rows if r["method"] == method and r not in over]
        if chosen:
            ax.scatter(
                [int(r["bops"]) for r in chosen],
                [100 * float(r["test_accuracy"]) for r in chosen],
                marker=marker,
                color=color,
                label=method,
                alpha=0.8,
            )
    if over:
        ax.scatter(
            [int(r["bops"]) for r in over],
            [100 * float(r["test_accuracy"]) for r in over],
            marker="x",
            color="tab:red",
            label="over budget (dq)",
            alpha=0.8,
        )
    for r in rows:
        if r["method"] == "fixed":
            ax.annotate(r["bits"], (int(r["bops"]), 100 * float(r["test_accuracy"])), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("BOPs per example (log); dashed: budgets; dq within budget in orange")
    ax.set_ylabel("test accuracy (%)")
    lowest = min((100 * float(r["test_accuracy"]) for r in rows), default=0)
    ax.set_ylim(max(lowest - 1, 80 if lowest > 80 else 0), 100)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
