"""Writing a run's results: ``results.json``, the parameters, ``training.png``, a table."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import flax.serialization

from cgmq_jax.runs.rundir import RunDir, load_run

if TYPE_CHECKING:  # the type only: writing a report does not load the trainer
    from cgmq_jax.runs.config import FitResult

PACKAGES = ("jax", "jaxlib", "flax", "optax", "chex", "numpy")


def package_versions() -> dict[str, str]:
    """Python's and the :data:`PACKAGES`' versions (``"not installed"`` where missing), and
    the ``XLA_FLAGS`` the process ran with (XLA's options change the last bits of a run)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return versions


def _weight_bits_text(row: dict) -> str:
    """A row's weight bits: one number, or per channel ``low-high`` over the live channels."""
    bits = row["weight_bits"]
    if not isinstance(bits, list):
        return str(bits)
    live = [b for b in bits if b] or [0]
    return str(live[0]) if min(live) == max(live) else f"{min(live)}-{max(live)}"


def layer_table_text(layers: list[dict], budget: float | None) -> str:
    """A plain-text table of per-layer bit-widths, MACs and BOPs, with the total (and, for
    a pruning network, each layer's live output channels)."""
    pruning = any("live_channels" in row for row in layers)
    head = f" {'channels':>9}" if pruning else ""
    lines = [f"{'layer':<8} {'w bits':>6} {'in bits':>7} {'MACs':>9} {'BOPs':>11}{head}"]
    for row in layers:
        live = f" {row['live_channels']:>4}/{row['channels']:<4}" if pruning else ""
        lines.append(
            f"{row['layer']:<8} {_weight_bits_text(row):>6} {row['input_bits']:>7} "
            f"{row['macs']:>9,} {row['bops']:>11,}{live}"
        )
    total = sum(row["bops"] for row in layers)
    lines.append(f"{'total':<8} {'':>6} {'':>7} {sum(r['macs'] for r in layers):>9,} {total:>11,}")
    if budget is not None:
        verdict = "within" if total <= budget else "OVER"
        lines.append(f"budget {budget:,.0f} BOPs: {verdict} budget")
    return "\n".join(lines)


def _amount(name: str, value: float) -> str:
    if name == "bops":
        return f"{value:,.0f} BOPs"
    return f"{value:,.0f} bits ({value / 8192:,.3f} KiB)"


def limits_text(certificate: dict) -> str:
    """One line per limit of a certificate: its exact cost, limit, minimum and verdict."""
    return "\n".join(
        f"{name}: {_amount(name, v['cost'])}, limit {_amount(name, v['limit'])}: "
        f"{'within' if v['within'] else 'OVER'} (minimum {_amount(name, v['minimum'])})"
        for name, v in (certificate.get("limits") or {}).items()
    )


def timings_text(timings: dict) -> str:
    """One line: a fit's wall time by part (:attr:`FitResult.timings`)."""
    parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
    return f"time: {parts} (total {sum(timings.values()):.1f} s)"


def result_dict(result: FitResult, *, flags: dict | None = None) -> dict:
    """The contents of ``results.json`` for ``result``: flags (default: its config), config,
    seed, data source, package versions (with the train steps' XLA options), history, test
    accuracy, BOPs, budget verdict, wall time and its split (``timings``) and certificate."""
    return {
        "flags": flags if flags is not None else dataclasses.asdict(result.config),
        "config": dataclasses.asdict(result.config),
        "seed": result.config.seed,
        "data_source": result.data_source,
        "versions": {**package_versions(), "compiler_options": result.config.compiler_options},
        "history": result.history,
        "test_accuracy": result.test_accuracy,
        "val_accuracy": result.val_accuracy,
        "float_val_accuracy": result.float_val_accuracy,
        "collapsed": result.collapsed,
        "bops": result.certificate["bops"],
        "within_budget": result.certificate["within_budget"],
        "wall_seconds": result.wall_seconds,
        "timings": result.timings,
        "certificate": result.certificate,
    }


def write_results(result: FitResult, run: RunDir, *, flags: dict | None = None) -> Path:
    """Publish a finished run into its (locked) directory: ``params.msgpack`` and
    ``training.png``, then ``results.json`` with the params' SHA-256, each atomically."""
    run.publish(
        flax.serialization.to_bytes(result.params),
        result_dict(result, flags=flags),
        lambda f: plot_training(result.history, result.config.limits, f),
    )
    return run.path


def load_params(out: str | os.PathLike):
    """Deprecated: ``cgmq_jax.runs.rundir.load_run(out, restore=True)[1]``, which it calls.

    The parameters of a finished run (a nested dict of numpy arrays), verified against
    the SHA-256 that its ``results.json`` records.

    Raises:
      RunDirError: no finished run, or params that are not the ones the results describe.
    """
    return load_run(out, restore=True)[1]


def plot_training(history: list[dict], budget, path) -> None:
    """Validation accuracy and exact BOPs per epoch, with the budget line (PNG to ``path``,
    a file name or a binary file object). ``budget``: the BOP budget, None, or ``{cost
    name: limit}`` (``TrainConfig.limits``); with a limit other than BOPs the lower panel
    shows each exact cost as a share of its limit."""
    if isinstance(budget, dict) and set(budget) <= {"bops"}:  # BOPs alone, or no limit
        budget = budget.get("bops")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_bops) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    epochs = [row["epoch"] for row in history]
    ax_acc.plot(epochs, [100 * row["val_accuracy"] for row in history], "o-")
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.grid(alpha=0.3)
    qat = [row for row in history if "bops" in row]
    if isinstance(budget, dict):  # several limits: each exact cost as a share of its limit
        for name, limit in budget.items():
            shown = [r for r in qat if name in r]
            ax_bops.plot(
                [r["epoch"] for r in shown],
                [100 * r[name] / limit for r in shown],
                "s-",
                label=f"{name} (limit {limit:,.0f})",
            )
        ax_bops.axhline(100, color="red", linestyle="--", label="limit")
        ax_bops.set_ylabel("exact cost, % of its limit")
    else:
        if qat:
            ax_bops.plot(
                [r["epoch"] for r in qat], [r["bops"] for r in qat], "s-", label="exact BOPs"
            )
            ax_bops.set_yscale("log")
        if budget is not None:
            ax_bops.axhline(budget, color="red", linestyle="--", label=f"budget {budget:.3g}")
        ax_bops.set_ylabel("BOPs per example")
    ax_bops.set_xlabel("epoch (float pretraining, then QAT)")
    ax_bops.grid(alpha=0.3)
    ax_bops.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
