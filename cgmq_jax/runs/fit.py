"""The training protocol (docs/method.md sections 4-5) as one library call: :func:`fit`.

``fit`` checks feasibility, pretrains the float network (BatchNorm, if the model has it,
on batch statistics, with running averages for evaluation), folds its BatchNorm into the
layers before it, initialises every quantizer at 8 bits, runs quantization-aware training
inside one jitted train step, evaluates the validation accuracy and the exact cost after
each epoch, keeps the best feasible checkpoint, repairs if none was feasible, fills,
certifies, and reports the test accuracy. Its phases: :func:`_start` (initial or resumed
state; :mod:`cgmq_jax.runs.resume`, with the checkpoints and :func:`stop_on_sigint`),
:func:`_train_phase` (the float epochs, then the QAT ones, each by :func:`_one_epoch`;
here), :func:`_finish_qat` / :func:`_finish_float` (select, repair, fill, certify, test;
:mod:`cgmq_jax.runs.finish`). The names of both modules still resolve here
(``cgmq_jax.runs.fit.stop_on_sigint``).

Methods (``TrainConfig.method``):

* ``cgmq``: :func:`cgmq_jax.optimizers.cgmq_optimizer`, that is
  ``optax.chain(partition(adam), constrained_update(cost, budget))``;
* ``dq``: DQ's penalty, loss ``+ lam * max(0, C / budget - 1) ** 2``, no constrained update;
* ``fixed``: uniform ``bits_w`` / ``bits_a`` with learned power-of-two steps (no budget);
* ``float``: the unquantized network;
* ``ptq``: no QAT: the float network calibrated, its bits allocated by measured
  sensitivity and its weights trained with the bits frozen (:mod:`cgmq_jax.runs.ptq`).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cgmq_jax import calibration, cost, data, trades
from cgmq_jax.runs import parallel
from cgmq_jax.runs.config import FitResult, TrainConfig
from cgmq_jax.runs.fill import _tune_weights
from cgmq_jax.runs.finish import _finish_float, _finish_ptq, _finish_qat, _float_accuracy
from cgmq_jax.runs.ptq import _evaluator
from cgmq_jax.runs.resume import (
    StopFlag,
    _checkpoint_arrays,  # noqa: F401  (moved to cgmq_jax.runs.resume; still resolves here)
    _restore,  # noqa: F401  (moved to cgmq_jax.runs.resume; still resolves here)
    _Run,
    _save,
    _start,
    _stop_never,
    stop_on_sigint,
)
from cgmq_jax.runs.setup import _make_setup, _qat_loss, _qat_state, _Setup
from cgmq_jax.runs.steps import (
    _check_finite,
    _evaluate_float,
    _evaluate_qat,
    _float_variables,
    _train_epoch,
    make_accuracy,
    make_train_step,
)

#: The public names, in the API reference's order (``StopFlag`` and ``stop_on_sigint``
#: from :mod:`cgmq_jax.runs.resume`).
__all__ = ["fit", "REFIT_EXAMPLES", "TRADE_EXAMPLES", "StopFlag", "stop_on_sigint"]


def fit(
    config: TrainConfig,
    dataset: data.MnistData,
    *,
    log=tqdm.write,
    float_params=None,
    checkpointer=None,
    resume: bool = False,
    checkpoint_meta: dict | None = None,
    should_stop=_stop_never,
) -> FitResult:
    """Run the whole protocol and return a certified result.

    The run is a sequence of epochs (float pretraining, then QAT); after each epoch the
    full training state is checkpointed (when ``checkpointer`` is given), so that
    ``resume=True`` continues from the last checkpoint and ends bit for bit where the
    uninterrupted run would have.

    Args:
      config: the run's settings.
      dataset: train / validation / test splits (:func:`cgmq_jax.data.load_mnist`).
      log: where the per-epoch lines go.
      float_params: a pretrained float checkpoint (e.g. the ``params`` of a ``float``
        run's result); pretraining is skipped when given. For a model with BatchNorm it is
        the float network's variables ``{"params": ..., "batch_stats": ...}`` (what a float
        run of it returns), folded before QAT.
      checkpointer: a :class:`cgmq_jax.runs.checkpoint.Checkpointer`, or None for no checkpoints.
      resume: continue from ``checkpointer``'s latest checkpoint (from the start if none).
      checkpoint_meta: extra JSON stored in every checkpoint (e.g. the CLI's flags).
      should_stop: asked after every step; when it returns true, the state is checkpointed
        mid-epoch and :class:`Interrupted` is raised (see :func:`stop_on_sigint`).

    Raises:
      ValueError: a bad config, or a dataset that cannot train one step.
      InfeasibleBudgetError: before any training, if the budget is below the
        network's minimum cost (the message states both numbers).
      TrainingDiverged: a non-finite loss or parameter; nothing is certified.
      Interrupted: ``should_stop()`` returned true.
    """
    started = time.perf_counter()
    setup = _make_setup(config, dataset, pretrained=float_params is not None)
    run = _start(setup, dataset.train[0], float_params, checkpointer if resume else None, log)
    run.started = started  # checkpoints count the setup's time too
    save = functools.partial(_save, setup, run, checkpointer, checkpoint_meta)
    train = functools.partial(
        _train_phase, setup, run, dataset, save=save, should_stop=should_stop, log=log
    )
    if run.progress.phase == "float":
        train("float")
        if config.method not in ("float", "ptq"):
            _to_qat(setup, run)
    elif run.progress.float_val_accuracy is None and float_params is not None:
        run.progress.float_val_accuracy = _float_accuracy(setup, float_params, dataset)
    if run.progress.phase == "qat":
        train("qat")
    state = parallel.local_copy(run.state)
    if config.method == "float":
        result = _finish_float(setup, _float_variables(state), run.progress.history, dataset)
    else:
        tune = functools.partial(
            _tune_weights,
            should_stop=should_stop,
            saved=checkpointer is not None,
            timings=run.timings,
        )
        if config.method == "ptq":  # its own setup and images (cgmq_jax.runs.ptq)
            result = _finish_ptq(setup, run, float_params, dataset, log, tune)
        else:
            tune = functools.partial(tune, setup, dataset.train)
            result = _finish_qat(
                setup, state.params, run.best_params, run.progress, dataset, log, tune
            )
    result.wall_seconds = run.progress.seconds + time.perf_counter() - started
    other = time.perf_counter() - started - sum(run.timings.values())
    result.timings = {**run.timings, "other": other}
    return result


def _train_phase(setup: _Setup, run: _Run, dataset, phase: str, *, save, should_stop, log):
    """Train the epochs of ``phase`` (``"float"`` or ``"qat"``) from where ``run`` stands."""
    if phase == "float":
        model, loss_fn, evaluate, epochs = (
            setup.float_model,
            None,
            _evaluate_float,
            setup.float_epochs,
        )
    else:
        model, loss_fn, evaluate, epochs = (
            setup.model,
            _qat_loss(setup),
            _evaluate_qat,
            setup.qat_epochs,
        )
    accuracy_fn = make_accuracy(model)
    train_step = make_train_step(
        model,
        loss_fn,
        placement=setup.placement,
        donate=True,
        compiler_options=setup.config.compiler_options,
        microbatches=setup.config.microbatches,
    )
    if phase == "qat" and setup.config.method == "cgmq" and setup.config.refits:
        train_step = _with_input_refit(setup, run, train_step)
    first = run.progress.epoch
    for epoch in range(first, epochs.stop):
        run.progress.epoch = epoch
        loss = _one_epoch(
            setup,
            run,
            dataset.train,
            phase,
            train_step,
            first=epoch == first,
            should_stop=should_stop,
            save=save,
        )
        row = _evaluated(setup, run, evaluate, loss, dataset.validation, accuracy_fn, log)
        progress = run.progress
        if (
            phase == "qat"
            and row["within_budget"]
            and row["val_accuracy"] > progress.best_val_accuracy
        ):
            progress.best_val_accuracy, progress.best_epoch = row["val_accuracy"], epoch + 1
            run.best_params = parallel.local_copy(run.state.params)
        if (
            phase == "qat"
            and setup.config.trades
            and row["within_budget"]
            and epoch + 1 < epochs.stop
        ):
            _trade(setup, run, dataset.train, row, log)
        progress.epoch, progress.step, progress.losses = epoch + 1, 0, []
        save(run.state, progress)


#: The inputs' ranges are refitted on this many calibration images (``--refit_ranges``).
REFIT_EXAMPLES = 512


def _input_refit(setup: _Setup, images):
    """``(input_bits, refit)``, both jitted: ``input_bits(params)``, the exact bits of every
    learned input quantizer; ``refit(params, lost)``, ``params`` with the quantizers where
    ``lost`` (a boolean per learned input quantizer) refitted on ``images``
    (:func:`cgmq_jax.calibration.refit_ranges`; same bits, so the same exact costs)."""
    learned = [s for s in setup.specs if s.quantized and s.input_bits is None]
    keys = [(*s.path, "input_quantizer") for s in learned]

    @jax.jit
    def input_bits(params):
        return jnp.stack([cost.layer_bitwidths(params, s, exact=True)[1] for s in learned])

    @jax.jit
    def refit(params, lost):
        fitted = calibration.refit_ranges(
            setup.model, params, images, weights=False, specs=setup.specs
        )
        fitted, flat = (flax.traverse_util.flatten_dict(p) for p in (fitted, params))
        for i, key in enumerate(keys):
            flat[key] = jnp.where(lost[i], fitted[key], flat[key])
        return type(params)(flax.traverse_util.unflatten_dict(flat))

    return input_bits, refit


def _with_input_refit(setup: _Setup, run: _Run, train_step):
    """``train_step`` followed, when it left a layer's input quantizer with fewer bits, by
    that quantizer's least-squares range at its new bit-width on :data:`REFIT_EXAMPLES`
    calibration images (:func:`_input_refit`). The weights' ranges are refitted inside the
    update (``constrained_update(refit_weight_ranges=True)``). A function of the state and
    the calibration batch alone, so a resumed run refits as the uninterrupted one did.

    The refit is a separate jitted call, made only on the steps where a bit fell (the
    check costs one host sync per step): inside the step, under ``lax.cond``, the step ran
    at half the speed on XLA:CPU (docs/performance.md).
    """
    if not any(s.quantized and s.input_bits is None for s in setup.specs):
        return train_step
    input_bits, refit = _input_refit(setup, jnp.asarray(run.calibration[:REFIT_EXAMPLES]))

    def step(state, x, y):
        before = input_bits(state.params)  # dispatched, read after the step: one sync
        state, loss = train_step(state, x, y)
        lost = np.asarray(input_bits(state.params)) < np.asarray(before)
        if lost.any():
            params = refit(parallel.local_copy(state.params), lost)
            state = setup.placement.replicate(state.replace(params=params))
        return state, loss

    return step


#: The trades (:func:`cgmq_jax.trades.trade_bits`) measure the loss on this many training
#: examples, drawn afresh after every QAT epoch from the run's seed and the epoch.
TRADE_EXAMPLES = 1024


def _trade(setup: _Setup, run: _Run, split, row: dict, log) -> None:
    """Move bits where the measured loss says they pay (:mod:`cgmq_jax.trades`), between
    two QAT epochs, on a network within every limit; the moves go into the epoch's ``row``."""
    started = time.perf_counter()
    images, labels = split
    rng = np.random.default_rng([setup.config.seed, run.progress.epoch])
    chosen = np.sort(rng.choice(len(labels), min(TRADE_EXAMPLES, len(labels)), replace=False))
    x, y = jnp.asarray(images[chosen]), jnp.asarray(labels[chosen])
    if run.trade_loss is None:
        run.trade_loss = _evaluator(setup.model, len(chosen))
    params = parallel.local_copy(run.state.params)
    params, record = trades.trade_bits(
        params, setup.specs, setup.limits, lambda p: run.trade_loss(p, x, y)[0] / len(y)
    )
    row["trades"] = record["moves"]
    if record["moves"]:
        run.state = setup.placement.replicate(run.state.replace(params=params))
        moves = "; ".join(
            "+".join(m["up"]) + (" <- " if m["up"] and m["down"] else "") + "-".join(m["down"])
            for m in record["moves"]
        )
        log(
            f"  trades: {moves} (loss {record['loss_before']:.4f} -> "
            f"{record['loss_after']:.4f}, {record['evaluations']} evaluations)"
        )
    run.timings["evaluate"] += time.perf_counter() - started


def _one_epoch(setup, run, split, phase, train_step, *, first, should_stop, save) -> float:
    """Train the rest of the epoch in progress; raise if it diverged; return its mean loss."""
    progress, timings = run.progress, run.timings
    started, compiling = time.perf_counter(), timings["compile"]
    run.state, losses = _train_epoch(
        run.state,
        train_step,
        setup,
        split,
        progress,
        desc=phase,
        should_stop=should_stop,
        save=save,
        timings=timings,
        first=first,
    )
    _check_finite(setup, progress, losses, run.state.params)
    timings["train"] += time.perf_counter() - started - (timings["compile"] - compiling)
    return float(np.mean(np.asarray(losses, np.float32)))


def _evaluated(setup, run, evaluate, loss, split, accuracy_fn, log) -> dict:
    """The epoch's history row (validation accuracy, exact costs), appended to the history."""
    started = time.perf_counter()
    row = evaluate(
        setup, parallel.local_copy(run.state), run.progress, loss, split, accuracy_fn, log
    )
    run.timings["evaluate"] += time.perf_counter() - started
    run.progress.history.append(row)
    return row


def _to_qat(setup: _Setup, run: _Run) -> None:
    """From the float phase to QAT: the trained float network, quantized and calibrated."""
    float_rows = [row for row in run.progress.history if row.get("phase") == "float"]
    run.progress = dataclasses.replace(
        run.progress,
        phase="qat",
        epoch=setup.qat_epochs.start,
        float_val_accuracy=float_rows[-1]["val_accuracy"] if float_rows else None,
    )
    variables = parallel.local_copy(_float_variables(run.state))
    run.state = setup.placement.replicate(_qat_state(setup, variables, run.calibration))
