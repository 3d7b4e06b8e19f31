"""The fill (docs/method.md section 4): the bits that still fit in the budget, given to the
selected network, with its weights trained to them (every quantizer frozen); the filled
network is kept unless it is worse on validation than the network as trained by more than
chance explains.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax
from flax.training import train_state

from cgmq_jax import quantizer, repair
from cgmq_jax.runs import parallel
from cgmq_jax.runs.config import TrainingDiverged
from cgmq_jax.runs.steps import (
    _check_finite,
    _Progress,
    _train_epoch,
    make_train_step,
    right_each,
)

#: The filled network's weights are trained (bits frozen) from ``lr`` times this,
#: cosine-decayed to zero over ``TrainConfig.fill_epochs``.
FILL_LR_SCALE = 0.1

#: The filled network is dropped only when it is worse than the network as trained by
#: more than this many standard deviations of chance (McNemar's test, one-sided, about
#: 2.3%): see :func:`worse_beyond_chance`.
CHANCE_Z = 2.0


def worse_beyond_chance(right_new: np.ndarray, right_old: np.ndarray, z: float = CHANCE_Z):
    """Whether a network that gets ``right_new`` (a boolean per validation image) right is
    worse than one that gets ``right_old`` right by more than chance explains.

    McNemar's test on the images exactly one of the two gets right: ``lost`` (only the old
    one right) and ``won`` (only the new one); under chance each such image goes either
    way with probability 1/2, so ``lost - won`` has standard deviation
    ``sqrt(lost + won)``. Worse beyond chance: ``lost - won > z * sqrt(lost + won)``.

    Returns:
      ``(worse, lost, won)``.

    Examples:
      >>> old = np.ones(10_000, bool); old[:100] = False  # 99.00% right
      >>> new = old.copy(); new[100:110] = False  # 10 more wrong, none fixed: 98.90%
      >>> worse_beyond_chance(new, old)  # 10 > 2 * sqrt(10)
      (True, 10, 0)
      >>> new[:5] = True  # and 5 fixed: 98.95%, a difference chance explains
      >>> worse_beyond_chance(new, old)  # 10 - 5 <= 2 * sqrt(15)
      (False, 10, 5)
    """
    lost = int(np.sum(right_old & ~right_new))
    won = int(np.sum(right_new & ~right_old))
    return lost - won > z * math.sqrt(lost + won), lost, won


def _fill(setup, params, validation, log, tune):
    """Give the bits that still fit to ``params``, train the weights to them; keep them
    unless the network is then worse beyond chance.

    :func:`cgmq_jax.repair.greedy_fill` adds bits until no single bit fits; the network
    was not trained with them, and they can break it (Fashion-MNIST LeNet-5 at 2e6: 8 bits
    took validation accuracy from 82.88% to 46.16%), so the filled network's weights are
    then trained for ``config.fill_epochs`` with every quantizer frozen (its bits and cost
    do not move; none with 0). The filled network (trained, unless ``fill_epochs`` is 0
    or its training diverged) is returned unless :func:`worse_beyond_chance` on the
    validation images says it is worse than the network as trained; then the network as
    trained is. Not the better of the two on validation: the network as trained was
    selected as the best of its QAT epochs on those same images, so its validation
    accuracy is biased upwards, and differences of a few images are chance (19 runs of
    LeNet-5 at 1e6 and 2e6 and ``lenet5_bb`` at 0.36%: the filled and trained network was
    the better on test in 16, on validation in 8; docs/method.md section 4).

    Returns:
      ``(params, record)``: ``record`` holds the bits added, the three validation
      accuracies (``val_accuracy_before``, ``_filled``, ``_after``: tuned), the images
      only the network as trained gets right (``val_lost``) and only the filled one
      (``val_won``), ``kept`` (whether the returned network has the bits) and ``tuned``
      (and its weights were trained to them).
    """
    model = setup.model
    right_before = right_each(model, params, *validation)
    before = float(right_before.mean())
    filled_params, filled = repair.greedy_fill(params, setup.specs, setup.limits)
    record = {"bits": filled, "val_accuracy_before": before, "tune_epochs": 0}
    if not filled:
        record.update(
            val_accuracy_filled=before, val_accuracy_after=before, val_lost=0, val_won=0,
            kept=False, tuned=False,
        )  # fmt: skip
        return params, record
    right_filled = right_each(model, filled_params, *validation)
    epochs = setup.config.fill_epochs
    tuned_params, diverged = tune(filled_params) if epochs else (None, None)
    if diverged:  # never lose the run for it: the filled network remains
        log(f"the fill's weight training is dropped: {diverged}")
    if tuned_params is None:
        candidate, right = filled_params, right_filled
    else:
        candidate, right = tuned_params, right_each(model, tuned_params, *validation)
    worse, lost, won = worse_beyond_chance(right, right_before)
    record.update(
        val_accuracy_filled=float(right_filled.mean()),
        val_accuracy_after=float(right.mean()),
        tune_epochs=epochs,
        val_lost=lost,
        val_won=won,
        kept=not worse,
        tuned=not worse and tuned_params is not None,
    )
    after = 100 * record["val_accuracy_after"]
    trained = f" -> {after:.2f}% after {epochs} epoch(s) of weight training"
    verdict = "worse beyond chance, the network as trained is kept" if worse else "kept"
    log(
        f"{filled} more bit(s) fit in the budget: validation accuracy "
        f"{100 * before:.2f}% -> {100 * record['val_accuracy_filled']:.2f}% filled"
        + (trained if tuned_params is not None else "")
        + f" ({lost} image(s) lost, {won} won): {verdict}"
    )
    return (params if worse else candidate), record


def _tune_weights(setup, train, params, *, should_stop, saved, timings):
    """``params``' weights trained for ``config.fill_epochs``, every quantizer frozen.

    Adam from ``lr * FILL_LR_SCALE``, cosine-decayed to zero; the loss is the task's
    (cross-entropy). The batches of epoch ``qat_epochs.stop + k`` (an order no QAT epoch
    used). Not checkpointed: an interrupted run resumes from its last QAT epoch and tunes
    again, to the same result.

    Returns:
      ``(params, None)``, or ``(None, why)`` if the training diverged.
    """
    epochs = setup.config.fill_epochs
    schedule = optax.cosine_decay_schedule(
        setup.config.lr * FILL_LR_SCALE, epochs * setup.steps_per_epoch
    )
    tx = optax.partition(
        {"weight": optax.adam(schedule), "quantizer": optax.set_to_zero()},
        quantizer.param_labels,
    )
    state = train_state.TrainState.create(apply_fn=setup.model.apply, params=params, tx=tx)
    state = setup.placement.replicate(state)
    train_step = make_train_step(
        setup.model,
        placement=setup.placement,
        donate=True,
        compiler_options=setup.config.compiler_options,
        microbatches=setup.config.microbatches,
    )
    for k in range(epochs):
        progress = _Progress(phase="tune", epoch=setup.qat_epochs.stop + k)
        state, losses = _train_epoch(
            state,
            train_step,
            setup,
            train,
            progress,
            desc="tune",
            should_stop=should_stop,
            save=lambda *_: saved,
            timings=timings,
            first=k == 0,
        )
        try:
            _check_finite(setup, progress, losses, state.params)
        except TrainingDiverged as error:
            return None, str(error)
    return jax.device_get(parallel.local_copy(state.params)), None
