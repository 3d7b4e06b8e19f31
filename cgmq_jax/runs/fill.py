"""The fill (docs/method.md section 4): the bits that still fit in the budget, given to the
selected network, with its weights trained to them (every quantizer frozen); of the three
networks (filled and trained, filled, as trained) the best on validation is kept.
"""

from __future__ import annotations

import jax
import optax
from flax.training import train_state

from cgmq_jax import quantizer, repair
from cgmq_jax.runs import parallel
from cgmq_jax.runs.config import TrainingDiverged
from cgmq_jax.runs.steps import (
    _check_finite,
    _Progress,
    _train_epoch,
    make_accuracy,
    make_train_step,
)

#: The filled network's weights are trained (bits frozen) from ``lr`` times this,
#: cosine-decayed to zero over ``TrainConfig.fill_epochs``.
FILL_LR_SCALE = 0.1


def _fill(setup, params, validation, log, tune):
    """Give the bits that still fit to ``params``, train the weights to them, keep the best.

    :func:`cgmq_jax.repair.greedy_fill` adds bits until no single bit fits; the network
    was not trained with them, and they can break it (Fashion-MNIST LeNet-5 at 2e6: 8 bits
    took validation accuracy from 82.88% to 46.16%), so the filled network's weights are
    then trained for ``config.fill_epochs`` with every quantizer frozen (its bits and cost
    do not move; none with 0). Of the three (filled and trained, filled, as trained) the
    one with the best validation accuracy is returned, ties to the first: the budget is
    used wherever that costs no validation accuracy.

    Returns:
      ``(params, record)``: ``record`` holds the bits added, the three validation
      accuracies (``val_accuracy_before``, ``_filled``, ``_after``: tuned) and ``kept``
      (whether the returned network has the bits).
    """
    accuracy = make_accuracy(setup.model)
    before = accuracy(params, *validation)
    filled_params, filled = repair.greedy_fill(params, setup.specs, setup.limits)
    record = {"bits": filled, "val_accuracy_before": before, "tune_epochs": 0}
    if not filled:
        record.update(
            val_accuracy_filled=before, val_accuracy_after=before, kept=False, tuned=False
        )
        return params, record
    filled_accuracy = accuracy(filled_params, *validation)
    epochs = setup.config.fill_epochs
    tuned_params, diverged = tune(filled_params) if epochs else (None, None)
    if diverged:  # never lose the run for it: the other two remain
        log(f"the fill's weight training is dropped: {diverged}")
    tuned_accuracy = -1.0 if tuned_params is None else accuracy(tuned_params, *validation)
    candidates = [(tuned_accuracy, tuned_params), (filled_accuracy, filled_params)]
    candidates.append((before, params))
    best = max(range(3), key=lambda i: (candidates[i][0], -i))
    record.update(
        val_accuracy_filled=filled_accuracy,
        val_accuracy_after=tuned_accuracy if epochs else filled_accuracy,
        tune_epochs=epochs,
        kept=best < 2,
        tuned=best == 0,
    )
    trained = f" -> {100 * tuned_accuracy:.2f}% after {epochs} epoch(s) of weight training"
    log(
        f"{filled} more bit(s) fit in the budget: validation accuracy "
        f"{100 * before:.2f}% -> {100 * filled_accuracy:.2f}% filled"
        + (trained if epochs else "")
        + "; kept: "
        + ("filled and trained", "filled", "the network as trained (no bits added)")[best]
    )
    return candidates[best][1], record


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
