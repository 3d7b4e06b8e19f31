"""The end of a run, after its last epoch (docs/method.md section 4): the best feasible
checkpoint, or the last one repaired (``cgmq``), filled, certified and tested
(:func:`_finish_qat`); PTQ from the float network, certified the same way
(:func:`_finish_ptq`); a float run's network and cost report (:func:`_finish_float`).

Kept apart from the epochs that train (:mod:`cgmq_jax.runs.fit`): these phases run once,
on the trained network, and turn it into the :class:`~cgmq_jax.runs.config.FitResult`.
Every name here still resolves in :mod:`cgmq_jax.runs.fit` and :mod:`cgmq_jax.runs.train`.
"""

from __future__ import annotations

import time

import jax

from cgmq_jax import certify, repair
from cgmq_jax.runs import parallel
from cgmq_jax.runs.config import FitResult
from cgmq_jax.runs.fill import _fill
from cgmq_jax.runs.ptq import post_train
from cgmq_jax.runs.setup import _Setup
from cgmq_jax.runs.steps import _float_variables, make_accuracy


def _finish_qat(
    setup, last_params, best_params, progress, dataset, log, tune, known=None
) -> FitResult:
    """The best feasible checkpoint, or the last one repaired (cgmq); filled; certified.

    ``known``: ``(accuracy function, validation accuracy)`` of ``best_params`` already
    measured (PTQ's), so that neither is compiled or measured again."""
    config, specs, limits = setup.config, setup.specs, setup.limits
    repaired_bits = 0
    if best_params is not None:
        params = jax.device_get(best_params)
    else:
        # dq keeps its last epoch when no epoch was feasible (as DQ's code does); cgmq repairs.
        params = jax.device_get(last_params)
        if config.method == "cgmq":
            params, repaired_bits = repair.greedy_repair(params, specs, limits)
            log(f"no feasible checkpoint: greedy repair removed {repaired_bits} bits")
    fill = None
    if config.method == "cgmq":
        params, fill = _fill(setup, params, dataset.validation, log, tune)
        # the returned network's validation accuracy, measured by the fill: not again
        kept = fill["val_accuracy_after"] if fill["kept"] else fill["val_accuracy_before"]
        known = make_accuracy(setup.model), kept
    if config.method in ("cgmq", "ptq"):
        certificate = certify.certify(params, specs, limits)
    else:  # dq and fixed are reported as they are: meeting the budget is their problem
        certificate = certify.cost_report(params, specs, limits or None)
    if known is None:
        accuracy_fn = make_accuracy(setup.model)
        known = accuracy_fn, accuracy_fn(params, *dataset.validation)
    (accuracy_fn, accuracy), float_accuracy = known, progress.float_val_accuracy
    if float_accuracy is not None:
        certify.with_collapse(certificate, float_accuracy, accuracy)
    if certificate.get("collapsed"):
        log(certificate["collapse"]["message"])
    certificate["selected_epoch"] = progress.best_epoch
    certificate["repaired_bits"] = repaired_bits
    certificate["fill"] = fill
    return FitResult(
        config=config,
        params=params,
        history=progress.history,
        test_accuracy=accuracy_fn(params, *dataset.test),
        certificate=certificate,
        wall_seconds=0.0,  # set by fit
        data_source=dataset.source,
        specs=specs,
        val_accuracy=accuracy,
        float_val_accuracy=float_accuracy,
    )


def _finish_ptq(setup, run, float_params, dataset, log, tune) -> FitResult:
    """PTQ from the float network (:func:`cgmq_jax.runs.ptq.post_train`), certified as
    :func:`_finish_qat` certifies; the certificate's ``ptq`` holds its record, with
    ``float_seconds`` (the run's time before PTQ: setup, and the float training unless a
    float network was given)."""
    float_seconds = run.progress.seconds + time.perf_counter() - run.started
    float_rows = [row for row in run.progress.history if row.get("phase") == "float"]
    run.progress.float_val_accuracy = (
        float_rows[-1]["val_accuracy"]
        if float_rows
        else _float_accuracy(setup, float_params, dataset)
    )
    variables = _float_variables(parallel.local_copy(run.state))
    params, record = post_train(setup, variables, dataset, log, tune)
    known = record.pop("accuracy"), record["val_accuracy"]
    result = _finish_qat(setup, params, params, run.progress, dataset, log, tune, known)
    result.certificate["ptq"] = {**record, "float_seconds": float_seconds}
    return result


def _finish_float(setup, variables, history, dataset) -> FitResult:
    """A float run: its params, or (a model with BatchNorm) its variables, as ``params``."""
    variables = jax.device_get(variables)
    params = variables if "batch_stats" in variables else variables["params"]
    certificate = certify.cost_report(None, setup.specs, setup.config.limits or None)
    certificate.update(selected_epoch=setup.config.epochs, repaired_bits=0)
    return FitResult(
        config=setup.config,
        params=params,
        history=history,
        test_accuracy=make_accuracy(setup.float_model)(
            variables["params"], *dataset.test, batch_stats=variables.get("batch_stats")
        ),
        certificate=certificate,
        wall_seconds=0.0,  # set by fit
        data_source=dataset.source,
        specs=setup.specs,
    )


def _float_accuracy(setup: _Setup, float_params, dataset) -> float:
    """The validation accuracy of a given float network (params, or variables with
    BatchNorm statistics)."""
    variables = float_params if "batch_stats" in float_params else {"params": float_params}
    return make_accuracy(setup.float_model)(
        variables["params"], *dataset.validation, batch_stats=variables.get("batch_stats")
    )
