"""Post-training quantization in a run (``TrainConfig.method == "ptq"``; docs/method.md
section 11): the float network calibrated at 8 bits, its bits allocated by measured
sensitivity (:func:`cgmq_jax.ptq.allocate`), then its weights trained briefly with the bits
frozen (the fill's weight training, :func:`cgmq_jax.runs.fill._tune_weights`, on
:data:`TUNE_IMAGES` training images); the better of the two on validation is kept.
:func:`cgmq_jax.runs.fit.fit` then certifies it as it does every quantized model.

Nothing here depends on ``--epochs`` (QAT's epochs): the weight training's batch order is
that of epoch ``--pretrain_epochs``, the first after the float phase.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cgmq_jax import calibration, ptq
from cgmq_jax.runs.setup import _Setup

#: The allocation's loss is measured on this many of the calibration images (the first of
#: :func:`calibration_split`'s): each loss evaluation is one pass over them.
ALLOCATION_SIZE = 1024
#: The weight training after the allocation sees this many training images per
#: ``--fill_epochs`` epoch (the first of the run's seeded permutation; at the default batch
#: size of 128, 100 steps).
TUNE_IMAGES = 12_800


def _permutation(setup: _Setup, count: int) -> np.ndarray:
    """The run's seeded order of the ``count`` training examples (calibration's)."""
    return np.random.default_rng(setup.config.seed).permutation(count)


def calibration_split(setup: _Setup, split) -> tuple[jax.Array, jax.Array]:
    """``(images, labels)``: the ``calibration_size`` training examples that calibrate the
    quantizers (the same seeded draw as the calibration batch of ``fit``), with their
    labels: the set whose loss the allocation measures (its first :data:`ALLOCATION_SIZE`).
    Never validation or test data."""
    images, labels = split
    chosen = _permutation(setup, len(images))[: setup.config.calibration_size]
    return jnp.asarray(images[chosen]), jnp.asarray(labels[chosen])


def tune_split(setup: _Setup, split) -> tuple[np.ndarray, np.ndarray]:
    """The :data:`TUNE_IMAGES` training examples the weight training sees (the first of the
    run's seeded permutation, so the calibration images among them)."""
    images, labels = split
    chosen = np.sort(_permutation(setup, len(images))[:TUNE_IMAGES])
    return images[chosen], labels[chosen]


def _evaluator(model, size: int) -> Callable:
    """``(params, images, labels) -> (summed cross-entropy, correct)`` over any number of
    examples, in chunks of ``size`` (the last one padded and masked): one jitted program,
    compiled once for the allocation's loss and every accuracy of the run."""

    @jax.jit
    def chunk(params, images, labels, mask):
        logits = model.apply({"params": params}, images)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(mask * losses), jnp.sum(mask * (jnp.argmax(logits, -1) == labels))

    full = jnp.ones(size, jnp.float32)

    def evaluate(params, images, labels):
        loss = correct = 0.0
        for start in range(0, len(labels), size):
            x, y, mask = images[start : start + size], labels[start : start + size], full
            if len(y) < size:
                mask = (jnp.arange(size) < len(y)).astype(jnp.float32)
                x = jnp.concatenate([x, jnp.zeros((size - len(y), *x.shape[1:]), x.dtype)])
                y = jnp.concatenate([y, jnp.zeros((size - len(y),), y.dtype)])
            chunk_loss, chunk_correct = chunk(params, x, y, mask)
            loss, correct = loss + chunk_loss, correct + chunk_correct
        return loss, correct

    return evaluate


def _calibrate(setup: _Setup, variables: dict, images) -> dict:
    """The float network's quantizers at ``init_bits`` (BatchNorm folded first), as the QAT
    state's calibration (:func:`cgmq_jax.runs.setup._qat_state`), in one jitted call."""
    bits = setup.config.init_bits
    float_params = variables if "batch_stats" in variables else variables["params"]

    @jax.jit
    def calibrate(float_params, images):
        return calibration.init_quantizers(
            setup.model, float_params, images, input_bits=bits, weight_bits=bits
        )

    return jax.device_get(calibrate(float_params, images))


def _tune_setup(setup: _Setup, images) -> _Setup:
    """``setup`` for the weight training on ``images``: its epoch that many images' steps,
    and no QAT epoch (the batch order is epoch ``pretrain_epochs``'s, whatever ``epochs``)."""
    first = setup.config.pretrain_epochs
    return dataclasses.replace(
        setup,
        steps_per_epoch=max(1, len(images) // setup.config.batch_size),
        qat_epochs=range(first, first),
    )


def post_train(setup: _Setup, variables: dict, dataset, log, tune) -> tuple[dict, dict]:
    """The float network ``variables`` quantized without QAT, within every limit.

    Calibrated at ``init_bits`` (BatchNorm folded first), the bits allocated on the
    cross-entropy of the first :data:`ALLOCATION_SIZE` images of :func:`calibration_split`,
    then (unless ``fill_epochs`` is 0) the weights trained by ``tune(setup, split, params)``
    (:func:`cgmq_jax.runs.fill._tune_weights`) on :func:`tune_split` with every quantizer
    frozen; of the two networks the one with the better validation accuracy is returned,
    ties to the trained one.

    Returns:
      ``(params, record)``: ``record`` is :func:`cgmq_jax.ptq.allocate`'s, with the
      validation accuracy before and after the weight training (``val_accuracy``: the
      returned network's), ``tuned`` (whether the trained network was kept), the number of
      ``allocation_images`` and ``tune_images``, ``accuracy``
      (the compiled accuracy function, for the caller to reuse; not JSON) and ``timings``
      (wall seconds: ``calibrate``, ``allocate``, ``tune``).
    """
    started = time.perf_counter()
    images, labels = calibration_split(setup, dataset.train)
    params = _calibrate(setup, variables, images)
    calibrated = time.perf_counter()
    size = min(ALLOCATION_SIZE, len(labels))
    evaluate = _evaluator(setup.model, size)

    chosen = images[:size], labels[:size]

    def loss(params):
        return evaluate(params, *chosen)[0] / size

    def accuracy(params, images, labels):
        return float(evaluate(params, jnp.asarray(images), jnp.asarray(labels))[1]) / len(labels)

    params, record = ptq.allocate(params, setup.specs, setup.limits, loss, log=log, compiled=True)
    allocated = time.perf_counter()
    record["val_accuracy_allocated"] = before = accuracy(params, *dataset.validation)
    record.update(
        tune_epochs=setup.config.fill_epochs, tuned=False, val_accuracy=before, accuracy=accuracy
    )
    record["allocation_images"] = size
    if setup.config.fill_epochs:
        split = tune_split(setup, dataset.train)
        record["tune_images"] = len(split[1])
        tuned, diverged = tune(_tune_setup(setup, split[0]), split, params)
        if diverged:
            log(f"the weight training after PTQ is dropped: {diverged}")
        after = -1.0 if tuned is None else accuracy(tuned, *dataset.validation)
        record["val_accuracy_tuned"] = after
        log(
            f"PTQ: validation accuracy {100 * before:.2f}% allocated, {100 * after:.2f}% after "
            f"{setup.config.fill_epochs} epoch(s) of weight training on {len(split[1]):,} "
            "images (bits frozen); kept: " + ("trained" if after >= before else "allocated")
        )
        if after >= before:
            params, record["tuned"], record["val_accuracy"] = tuned, True, after
    record["timings"] = {
        "calibrate": calibrated - started,
        "allocate": allocated - calibrated,
        "tune": time.perf_counter() - allocated,
    }
    return params, record
