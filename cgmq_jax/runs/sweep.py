"""Method comparison: a resumable grid of runs, one CSV row each, a summary and two plots.

Every run goes through :func:`cgmq_jax.runs.train.fit` with the same protocol. The quantized runs
of one seed share one float pretraining of ``pretrain_epochs`` epochs, then train
``epochs`` QAT epochs. The ``float`` row of a seed is a float network trained as long as
they are, ``pretrain_epochs + epochs`` epochs, by a separate :func:`~cgmq_jax.runs.train.fit`
(not the shared checkpoint), so that the comparison does not favour the quantized runs by
training them longer.

``ptq`` rows (on request: :data:`DEFAULT_METHODS` leaves them out) start from the same
shared float network and quantize it without QAT (:mod:`cgmq_jax.runs.ptq`); their
``epochs`` are 0 and their wall time is the PTQ's (the float network is given), as the
other quantized rows' is their QAT's.

Each row records the training loss of every epoch of its run (``epoch_losses``: QAT epochs
for the quantized methods, float epochs for ``float``); :func:`plot_losses` draws them.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import os
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

from cgmq_jax import data
from cgmq_jax.runs import train

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
    "final_loss",
    "epoch_losses",
    "layer_bits",
    "one_more_bit_bops",
)
STYLES = {  # method -> (marker, colour), shared by the plots
    "cgmq": ("o", "tab:blue"),
    "dq": ("x", "tab:orange"),
    "fixed": ("s", "tab:green"),
    "float": ("*", "tab:gray"),
    "ptq": ("D", "tab:purple"),
}
#: The methods of a grid unless others are asked for (``ptq`` only when named).
DEFAULT_METHODS = ("float", "fixed", "cgmq", "dq")


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
        """``(method, budget_bops, lam, bits, seed)`` as the CSV writes them (``""``: unset);
        a run whose key has a row is skipped on resume."""
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
    methods: Iterable[str] = DEFAULT_METHODS,
) -> list[Run]:
    """All runs, seed by seed: float first, then fixed, then cgmq, dq and ptq per budget."""
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
            if "ptq" in methods:
                runs.append(Run("ptq", seed, budget_bops=budget))
    return runs


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``runs.csv`` (none if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def check_csv(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` if ``path`` exists but is not a ``runs.csv`` with :data:`COLUMNS`.

    Appending to a file of an older sweep (other columns, float rows from the shared
    checkpoint) would mix incomparable rows.
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_file():
        raise ValueError(f"{path} exists but is not a file")
    with path.open(newline="") as f:
        header = next(csv.reader(f), None)
    if header is not None and tuple(header) != COLUMNS:
        raise ValueError(
            f"{path} was written by an older sweep (columns {','.join(header)}); "
            "move it away or choose another --out"
        )


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
    fit: Callable | None = None,
    log: Callable[[str], None] = _print_now,
) -> list[dict]:
    """Run every run whose row is not in ``csv_path`` yet; append each row when done.

    Quantized runs train ``epochs`` QAT epochs from their seed's shared float checkpoint of
    ``pretrain_epochs`` epochs (trained once, when first needed); the ``float`` row trains a
    float network for ``pretrain_epochs + epochs`` epochs on its own. ``fit`` defaults to
    :func:`cgmq_jax.runs.train.fit` (looked up at call time).

    Raises:
      ValueError: ``csv_path`` is not a ``runs.csv`` of this version (:func:`check_csv`).
    """
    base = base if base is not None else train.TrainConfig()
    fit = fit if fit is not None else train.fit
    csv_path = Path(csv_path)
    check_csv(csv_path)
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
        if run.method == "float":  # as long as the quantized runs: pretraining + QAT
            run_epochs = pretrain_epochs + epochs
            config = dataclasses.replace(
                base, method="float", epochs=run_epochs, seed=run.seed, budget_bops=None
            )
            result = fit(config, dataset, log=lambda _: None)
        else:
            run_epochs = 0 if run.method == "ptq" else epochs  # ptq trains no QAT epoch
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
        row = _row(run, result, run_epochs)
        _append(csv_path, row)
        log(
            f"[{i + 1}/{len(runs)}] {' '.join(k for k in run.key if k)}: "
            f"test {100 * result.test_accuracy:.2f}%  {row['bops']:,} BOPs  "
            f"within budget: {row['within_budget'] or '-'}  {row['wall_seconds']} s"
        )
    return read_rows(csv_path)


def epoch_losses(history: list[dict], method: str) -> list[float]:
    """The mean training loss of each epoch of a run of ``method``, from its ``history``.

    Its QAT epochs for a quantized method (a run that pretrained its own float network also
    has float epochs; they are left out), its float epochs for ``float``.
    """
    phase = "float" if method == "float" else "qat"
    return [float(h["loss"]) for h in history if h["phase"] == phase]


def _row(run: Run, result: train.FitResult, epochs: int) -> dict:
    method, budget, lam, bits, seed = run.key
    certificate = result.certificate
    losses = epoch_losses(result.history, run.method)
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
        "final_loss": f"{losses[-1]:.4f}" if losses else "",
        "epoch_losses": " ".join(f"{loss:.4f}" for loss in losses),
        "layer_bits": layer_bits,
        "one_more_bit_bops": certificate.get("one_more_bit_bops") or "",
    }


def _append(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def summarize(rows: list[dict]) -> str:
    """Markdown: per method and budget, median and range of test accuracy, median BOPs,
    median final training loss, compliance."""
    lines = [
        "| method | budget (BOPs) | lam / bits | runs | test acc. median (min-max) | "
        "BOPs median | final loss median | within budget | budget use, min (full) |",
        "|---|---|---|---|---|---|---|---|---|",
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
        losses = [float(r["final_loss"]) for r in group if r.get("final_loss")]
        final_loss = f"{statistics.median(losses):.4f}" if losses else "n/a"
        setting = bits or (f"{lam:g}" if method == "dq" else "")
        lines.append(
            f"| {method} | {f'{budget:.0e}' if budget else '-'} | {setting} | {len(group)} | "
            f"{statistics.median(accuracies):.2f} ({min(accuracies):.2f}-{max(accuracies):.2f}) | "
            f"{bops:,.0f} | {final_loss} | {compliance} | {_budget_use(group, budget)} |"
        )
    return "\n".join(lines)


def _budget_use(group: list[dict], budget: float) -> str:
    """The smallest certified / budget of a group's compliant runs, and how many of them
    are full (no single bit fits: ``bops + one_more_bit_bops > budget``)."""
    within = [r for r in group if budget and r["within_budget"] == "True"]
    if not within:
        return "n/a"
    use = min(int(r["bops"]) for r in within) / budget
    full = sum(
        bool(r.get("one_more_bit_bops")) and int(r["bops"]) + int(r["one_more_bit_bops"]) > budget
        for r in within
    )
    return f"{100 * use:.1f}% ({full}/{len(within)})"


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

    fig, ax = plt.subplots(figsize=(8, 5))
    for budget in budgets:
        ax.axvline(budget, color="red", alpha=0.3, linestyle="--")
    over = [r for r in rows if r["within_budget"] == "False"]
    for method, (marker, color) in STYLES.items():
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


def plot_losses(rows: list[dict], path: str | os.PathLike) -> None:
    """Training loss per epoch (log axis), one line per run, coloured by method.

    Each run's epochs are its own: the QAT epochs of a quantized run, all the float epochs
    of a ``float`` run. The legend has one entry per method.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for method, (marker, color) in STYLES.items():
        label = method
        for row in rows:
            losses = [float(x) for x in row.get("epoch_losses", "").split()]
            if row["method"] != method or not losses:
                continue
            epochs = range(1, len(losses) + 1)
            ax.plot(epochs, losses, color=color, marker=marker, alpha=0.6, label=label)
            label = "_nolegend_"  # one legend entry per method
    ax.set_yscale("log")
    ax.set_xlabel("epoch of the run (quantized: QAT epochs; float: all its epochs)")
    ax.set_ylabel("training loss (mean over the epoch, log)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
