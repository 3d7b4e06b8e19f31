"""Where a run starts, how it is checkpointed and how it stops to be resumed: the part of a
run that changes as it trains (:class:`_Run`), its first state or the one restored from
the latest checkpoint (:func:`_start`, :func:`_restore`), the checkpoint written after
every epoch and at an interruption (:func:`_save`, of :func:`_checkpoint_arrays`), and the
Ctrl-C flag that asks for that interruption (:func:`stop_on_sigint`).

Kept apart from the epochs that train (:mod:`cgmq_jax.runs.fit`) and the phases that
finish (:mod:`cgmq_jax.runs.finish`): what a checkpoint holds and how it is read back are
one job, and a resumed run ends bit for bit where the uninterrupted one would have only
while the two agree. Every name here still resolves in :mod:`cgmq_jax.runs.fit` and
:mod:`cgmq_jax.runs.train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp

from cgmq_jax.runs import parallel
from cgmq_jax.runs.setup import (
    _calibration_batch,
    _float_state,
    _float_variables_of,
    _qat_state,
    _Setup,
)
from cgmq_jax.runs.steps import BatchNormTrainState, _epoch_name, _Progress


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
