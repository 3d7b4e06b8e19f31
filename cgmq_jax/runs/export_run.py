"""Export a trainer's run directory: ``results.json`` + ``params.msgpack`` -> ``cgmq-int-npz``.

This is the harness side of the export: it reads run directories
(:func:`cgmq_jax.runs.rundir.load_run`), rebuilds the run's model (:mod:`cgmq_jax.models`)
and its dataset's input shape (:mod:`cgmq_jax.data`), then hands the params to the
library's lowering (:func:`cgmq_jax.lowering.build`), which knows nothing of run
directories.

The params file is read and its SHA-256 verified once per :func:`open_run`; pass the
:class:`RunExport` it returns to :func:`derive_run` / :func:`export_run` (and its
``params`` / ``model`` to :func:`cgmq_jax.model_check.compare_with_model`) to export and check
a run from that one read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from cgmq_jax import lowering
from cgmq_jax.export.format import DEFAULT_FILE, save


def read_results(results_dir: str | os.PathLike) -> dict:
    """A run's ``results.json``, parsed strictly: a duplicated key, a non-finite number, no
    ``config`` object or an unknown ``config.model`` is a ``ValueError`` naming the file.

    The params are not read here (:func:`open_run` verifies them against the file).
    """
    from cgmq_jax import models

    file = Path(results_dir) / "results.json"
    try:
        text = file.read_text()
    except OSError as error:
        raise ValueError(
            f"{file}: unreadable ({error.strerror}); is this a run directory?"
        ) from None
    try:
        results = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except ValueError as error:
        raise ValueError(f"{file}: not valid results JSON ({error})") from None
    if not isinstance(results, dict):
        raise ValueError(f"{file}: not a results object")
    config = results.get("config")
    if not isinstance(config, dict):
        raise ValueError(
            f"{file}: no 'config' object, so the model cannot be rebuilt; restore the file "
            "the trainer wrote (or re-run the training)"
        )
    name = config.get("model", "lenet5")
    if name not in models.MODELS:
        raise ValueError(f"{file}: config.model {name!r} is not one of {sorted(models.MODELS)}")
    return results


def _unique_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    if duplicated:
        raise ValueError(f"duplicated key {duplicated[0]!r}")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"non-finite number {name}")


@dataclasses.dataclass(frozen=True)
class RunExport:
    """A run directory read for export: its results, verified params and rebuilt model.

    Attributes:
      path: the run directory.
      results: its ``results.json`` (parsed strictly, :func:`read_results`).
      params: the quantized parameters, read once and verified against the SHA-256 that
        ``results.json`` records.
      model: the Flax model of ``config.model`` (``quantized=True``).
      dataset: the dataset the run was trained on (``flags.dataset``; ``"mnist"`` before
        the flag existed).
    """

    path: Path
    results: dict
    params: Any
    model: Any
    dataset: str

    @property
    def metadata(self) -> dict:
        """The header's ``metadata``: where the run was, its accuracy and params SHA-256."""
        results = self.results
        return {
            "run": str(self.path),
            "method": results["config"].get("method"),
            "seed": results.get("seed"),
            "test_accuracy": results.get("test_accuracy"),
            "dataset": self.dataset,
            "data_source": results.get("data_source"),
            "params_sha256": results.get("params_sha256"),
        }


def open_run(results_dir: str | os.PathLike) -> RunExport:
    """Read a run directory for export: the one read (and SHA-256 check) of its params.

    Raises:
      ValueError: as :func:`export_run`.
    """
    from cgmq_jax import data, models
    from cgmq_jax.runs import rundir

    results_dir = Path(results_dir)
    results = read_results(results_dir)
    _, params = rundir.load_run(results_dir, restore=True)  # verified against results.json
    config = results["config"]
    if config.get("method") == "float":
        raise ValueError(f"{results_dir}: a float run has no quantizers to export")
    name = config.get("model", "lenet5")
    model = models.get_model(
        name, quantized=True, input_bits=config.get("input_bits"), prune=config.get("prune", False)
    )
    dataset = (results.get("flags") or {}).get("dataset") or "mnist"  # None: before the flag
    if dataset not in data.DATASETS:
        raise ValueError(f"{results_dir / 'results.json'}: flags.dataset {dataset!r} is unknown")
    return RunExport(results_dir, results, params, model, dataset)


def derive_run(
    results_dir: str | os.PathLike | RunExport, *, bias_scheme: str = "odd"
) -> tuple[dict, dict[str, np.ndarray]]:
    """The ``(header, arrays)`` of a run directory's export (:func:`cgmq_jax.lowering.build`
    of its params); ``results_dir`` may be an :func:`open_run` already read.

    Raises:
      ValueError: as :func:`export_run`, and params that the model of ``config.model``
        does not fit (one line naming the model and the params file).
    """
    from cgmq_jax import data

    run = results_dir if isinstance(results_dir, RunExport) else open_run(results_dir)
    name = run.results["config"].get("model", "lenet5")
    try:
        return lowering.build(
            run.params,
            run.model,
            input_shape=data.DATASETS[run.dataset].image_shape,
            bias_scheme=bias_scheme,
            certificate=run.results.get("certificate"),
            metadata=run.metadata,
        )
    except (KeyError, TypeError, IndexError, AttributeError, lowering.ParamShapeError) as error:
        # The input shape is the run's dataset's: a shape that does not fit is the params'.
        raise ValueError(_misfit(run.path, name, error)) from None
    except Exception as error:  # flax.errors.ScopeParamShapeError and kin
        if type(error).__module__.startswith("flax"):
            raise ValueError(_misfit(run.path, name, error)) from None
        raise


def _misfit(results_dir: Path, name: str, error: BaseException) -> str:
    problem = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return (
        f"{results_dir / 'params.msgpack'}: not the params of config.model {name!r} "
        f"({type(error).__name__}: {problem}); results.json does not describe this run"
    )


def export_run(
    results_dir: str | os.PathLike | RunExport,
    path: str | os.PathLike | None = None,
    *,
    bias_scheme: str = "odd",
) -> Path:
    """Export a run directory (``results.json`` + ``params.msgpack``) written by the trainer.

    The header's ``metadata`` records the run, its test accuracy and the SHA-256 of the
    params file it came from (``--check`` re-derives the file and compares). The run may be
    an :func:`open_run` already read (its params are then not read again).

    Raises:
      ValueError: a missing, unfinished or unreadable run, params whose SHA-256 is not the
        one ``results.json`` records (each names the file), or a float (unquantized) run.
    """
    run = results_dir if isinstance(results_dir, RunExport) else open_run(results_dir)
    header, arrays = derive_run(run, bias_scheme=bias_scheme)
    return save(path if path is not None else run.path / DEFAULT_FILE, header, arrays)
