"""The training protocol (docs/method.md sections 4-5) as one library call: :func:`fit`.

``fit`` checks feasibility, pretrains the float network (BatchNorm, if the model has it,
on batch statistics, with running averages for evaluation), folds its BatchNorm into the
layers before it, initialises every quantizer at 8 bits, runs quantization-aware training
inside one jitted train step, evaluates the validation accuracy and the exact cost after
each epoch, keeps the best feasible checkpoint, repairs if none was feasible, fills,
certifies, and reports the test accuracy. Its phases: :func:`_start` (initial or resumed
state), :func:`_train_phase` (the float epochs, then the QAT ones, each by
:func:`_one_epoch`), :func:`_finish_qat` / :func:`_finish_float` (select, repair, fill,
certify, test).

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

import contextlib
import dataclasses
import functools
import signal
import threading
import time
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cgmq_jax import calibration, certify, cost, data, repair, trades
from cgmq_jax.runs import parallel
from cgmq_jax.runs.config import FitResult, TrainConfig
from cgmq_jax.runs.fill import _fill, _tune_weights
from cgmq_jax.runs.ptq import _evaluator, post_train
from cgmq_jax.runs.setup import (
    _calibration_batch,
    _float_state,
    _float_variables_of,
    _make_setup,
    _qat_loss,
    _qat_state,
    _Setup,
)
from cgmq_jax.runs.steps import (
    BatchNormTrainState,
    _check_finite,
    _epoch_name,
    _evaluate_float,
    _evaluate_qat,
    _float_variables,
    _Progress,
    _train_epoch,
    make_accuracy,
    make_train_step,
)


def _stop_never() -> bool:
    return False


@dataclasses.dataclass
class _Run:
    """The part of a run that changes as it trains: the state, where it stands, the best
    feasible params so far, and the wall time by part."""

    state: Any
    progress: _Progress
    best_params: Any
    calibration: jax.Array
    started: float  # ``time.perf_counter()`` when this process's part of the run began
    timings: dict = dataclasses.field(
        default_factory=lambda: {"compile": 0.0, "train": 0.0, "evaluate": 0.0}
    )
    trade_loss: Any = None  # the trades' jitted loss (compiled once per run)


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


def _start(setup: _Setup, images, float_params, checkpointer, log) -> _Run:
    """The run's first state (float, or QAT when nothing is pretrained), or the state of
    ``checkpointer``'s latest checkpoint (when resuming; None: start afresh), replicated."""
    config = setup.config
    sample = jnp.asarray(images[:2])
    if float_params is None:
        variables = jax.jit(setup.float_model.init)(jax.random.key(config.seed), sample)
        variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    else:
        variables = _float_variables_of(setup, float_params, sample)
    calibration = _calibration_batch(setup, images)
    progress = _Progress(epoch=setup.float_epochs.start if setup.float_epochs else 0)
    state, best_params = _float_state(setup, variables), None
    if not setup.float_epochs and config.method not in ("float", "ptq"):
        progress = _Progress(phase="qat", epoch=setup.qat_epochs.start)
        state = _qat_state(setup, variables, calibration)
    if checkpointer is not None:
        restored = _restore(setup, checkpointer, state, variables, calibration)
        if restored is not None:
            state, progress, best_params = restored
            log(
                f"resumed from the checkpoint at {_epoch_name(setup, progress)}, "
                f"batch {progress.step}"
            )
    state = setup.placement.replicate(state)
    return _Run(state, progress, best_params, calibration, time.perf_counter())


def _save(setup: _Setup, run: _Run, checkpointer, meta: dict | None, state, progress) -> bool:
    """Checkpoint ``state`` at ``progress`` (with the run's best params); False if there is
    no ``checkpointer``."""
    if checkpointer is None:
        return False
    elapsed = progress.seconds + time.perf_counter() - run.started
    body = {
        "progress": {**dataclasses.asdict(progress), "seconds": elapsed},
        "position": f"{_epoch_name(setup, progress)}, batch {progress.step}",
    }
    index = progress.epoch * setup.steps_per_epoch + progress.step
    arrays = parallel.local_copy(_checkpoint_arrays(state, run.best_params))
    checkpointer.save(index, arrays, {**(meta or {}), **body})
    return True


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
    train_step = make_train_step(model, loss_fn, placement=setup.placement, donate=True)
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


def _float_accuracy(setup: _Setup, float_params, dataset) -> float:
    """The validation accuracy of a given float network (params, or variables with
    BatchNorm statistics)."""
    variables = float_params if "batch_stats" in float_params else {"params": float_params}
    return make_accuracy(setup.float_model)(
        variables["params"], *dataset.validation, batch_stats=variables.get("batch_stats")
    )


def _restore(setup: _Setup, checkpointer, state, variables, calibration):
    """``(state, progress, best_params)`` from the latest checkpoint, or None if there is none.

    ``state`` is the fresh state of the run's first phase (``variables`` the float
    network's); a QAT checkpoint of a run that pretrains is restored into the QAT state's
    structure (built abstractly, no compute). A float checkpoint of a model with BatchNorm
    holds its ``batch_stats`` too.
    """
    meta = checkpointer.latest_meta()
    if meta is None:
        return None
    progress = _Progress(**meta["progress"])
    if progress.phase == "qat" and setup.float_epochs:  # ``state`` is the float one
        state = jax.eval_shape(lambda v: _qat_state(setup, v, calibration), variables)
    like = jax.eval_shape(lambda s: _checkpoint_arrays(s, None), state)
    arrays = checkpointer.restore_arrays(like)
    state = state.replace(
        params=arrays["params"], opt_state=arrays["opt_state"], step=arrays["step"]
    )
    if "batch_stats" in arrays:
        state = state.replace(batch_stats=arrays["batch_stats"])
    best_params = arrays["best_params"] if progress.best_epoch is not None else None
    return state, progress, best_params


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


def _checkpoint_arrays(state, best_params) -> dict:
    arrays = {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": jnp.asarray(state.step, jnp.int32),
        "best_params": best_params if best_params is not None else state.params,
    }
    if isinstance(state, BatchNormTrainState):  # the float phase of a model with BatchNorm
        arrays["batch_stats"] = state.batch_stats
    return arrays


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


class StopFlag:
    """A flag set by the first SIGINT (Ctrl-C); a second one interrupts at once."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


@contextlib.contextmanager
def stop_on_sigint():
    """Within the block, Ctrl-C asks :func:`fit` to checkpoint and stop after the current
    step (pass the yielded flag as ``should_stop``); a second Ctrl-C raises at once."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        flag.requested = True
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
