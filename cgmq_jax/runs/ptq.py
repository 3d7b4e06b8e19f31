"""Post-training quantization in a run (``TrainConfig.method == "ptq"``; docs/method.md
section 11): the float network calibrated at 8 bits, its bits allocated by measured
sensitivity (:func:`cgmq_jax.ptq.allocate`), then its weights trained with the bits frozen
(the fill's weight training, :func:`cgmq_jax.runs.fill._tune_weights`); the better of the
two on validation is kept. :func:`cgmq_jax.runs.fit.fit` then certifies it as it does
every quantized model.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from cgmq_jax import ptq
from cgmq_jax.runs.setup import _qat_state, _Setup
from cgmq_jax.runs.steps import _cross_entropy, make_accuracy


def calibration_split(setup: _Setup, split) -> tuple[jax.Array, jax.Array]:
    """``(images, labels)``: the ``calibration_size`` training examples that calibrate the
    quantizers (the same seeded draw as the calibration batch of ``fit``), with their
    labels: the set whose loss the allocation measures. Never validation or test data."""
    images, labels = split
    order = np.random.default_rng(setup.config.seed).permutation(len(images))
    chosen = order[: setup.config.calibration_size]
    return jnp.asarray(images[chosen]), jnp.asarray(labels[chosen])


def post_train(setup: _Setup, variables: dict, dataset, log, tune) -> tuple[dict, dict]:
    """The float network ``variables`` quantized without QAT, within every limit.

    Calibrated at ``init_bits`` (the QAT state's calibration, BatchNorm folded first), the
    bits allocated on the cross-entropy of :func:`calibration_split`, then (unless
    ``fill_epochs`` is 0) the weights trained by ``tune`` with every quantizer frozen; of
    the two networks the one with the better validation accuracy is returned, ties to the
    trained one.

    Returns:
      ``(params, record)``: ``record`` is :func:`cgmq_jax.ptq.allocate`'s, with the
      validation accuracy before and after the weight training, ``tuned`` (whether the
      trained network was kept) and ``timings`` (wall seconds: ``calibrate``, ``allocate``,
      ``tune``).
    """
    started = time.perf_counter()
    images, labels = calibration_split(setup, dataset.train)
    params = jax.device_get(_qat_state(setup, variables, images).params)
    calibrated = time.perf_counter()
    loss = functools.partial(_cross_entropy, setup.model, images=images, labels=labels)
    params, record = ptq.allocate(params, setup.specs, setup.limits, loss, log=log)
    allocated = time.perf_counter()
    accuracy = make_accuracy(setup.model)
    record["val_accuracy_allocated"] = before = accuracy(params, *dataset.validation)
    record.update(tune_epochs=setup.config.fill_epochs, tuned=False)
    if setup.config.fill_epochs:
        tuned, diverged = tune(params)
        if diverged:
            log(f"the weight training after PTQ is dropped: {diverged}")
        after = -1.0 if tuned is None else accuracy(tuned, *dataset.validation)
        record["val_accuracy_tuned"] = after
        log(
            f"PTQ: validation accuracy {100 * before:.2f}% allocated, {100 * after:.2f}% after "
            f"{setup.config.fill_epochs} epoch(s) of weight training (bits frozen); kept: "
            + ("trained" if after >= before else "allocated")
        )
        if after >= before:
            params, record["tuned"] = tuned, True
    record["timings"] = {
        "calibrate": calibrated - started,
        "allocate": allocated - calibrated,
        "tune": time.perf_counter() - allocated,
    }
    return params, record
