"""A file against its model: the integer engine next to the JAX fake-quant model (needs JAX).

:func:`compare_with_model` runs a ``cgmq-int-npz`` file with the integer engine
(:func:`cgmq_jax.export.engine.run_integer`) and the Flax model (linen or NNX) on the same
batches, and compares their predictions, their logits and every quantized layer's input
codes, which the JAX side reports from the layers' own quantizers
(:func:`cgmq_jax.nn.record_layers`); a pruned model's file holds its live channels only,
and its codes are spread back to the model's channels (:class:`cgmq_jax.compaction.Spread`).
:func:`layer_inputs` is that interception alone. The file is written by
:mod:`cgmq_jax.lowering` (which still resolves both names).

This is library core: it imports the numpy-only :mod:`cgmq_jax.export`
(:func:`cgmq_jax.export.format.load`, :class:`cgmq_jax.export.format.IntegerModel`, the
engine) at module level and, on first use, JAX, :mod:`cgmq_jax.nn`, :mod:`cgmq_jax.nnx`,
:mod:`cgmq_jax.compaction` and :mod:`cgmq_jax.lowering` (an NNX model's parameters as the
linen tree), never the run harness.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from cgmq_jax.export import engine
from cgmq_jax.export.format import IntegerModel, load


@functools.cache
def _jitted_forward():
    """``jit(model, params, x) -> (logits, {layer: Q(x)})``, built once (needs JAX).

    ``Q(x)`` is each quantized layer's input as its quantizer computed it (a multiple of
    its power-of-two step), reported by the layer itself (:func:`cgmq_jax.nn.record_layers`).
    """
    import jax

    from cgmq_jax import nn as qnn

    def forward(model, params, x):
        with qnn.record_layers() as records:
            logits = model.apply({"params": params}, x)
        quantized = {
            "/".join(r.path): r.quantized_input for r in records if r.quantized_input is not None
        }
        return logits, quantized

    return jax.jit(forward, static_argnums=0)


def _nnx_forward(model, params, x):
    """:func:`_jitted_forward`'s ``(logits, {layer: Q(x)})`` for an NNX model, eagerly."""
    from cgmq_jax import nn as qnn
    from cgmq_jax import nnx as cnnx

    model = cnnx.with_state(model, params)
    with qnn.record_layers() as records, cnnx.reporting_paths(model):
        logits = model(x)
    codes = {"/".join(r.path): r.quantized_input for r in records if r.quantized_input is not None}
    return logits, codes


def layer_inputs(model: Any, params: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """``{layer name: Q(x)}``: each quantized layer's input as its own quantizer computes
    it, on the batch ``x``, as :func:`compare_with_model` intercepts them (a linen model
    with its ``params``; an NNX module holds its own state, ``params`` is not read)."""
    import jax.numpy as jnp

    from cgmq_jax import nn as qnn

    if qnn.is_nnx_module(model):
        _, codes = _nnx_forward(model, None, jnp.asarray(x))
    else:
        _, codes = _jitted_forward()(model, params, jnp.asarray(x))
    return {name: np.asarray(value) for name, value in codes.items()}


def compare_with_model(
    path: str | os.PathLike | IntegerModel,
    params: Any,
    model: Any,
    images: np.ndarray,
    *,
    batch_size: int = 1000,
) -> dict:
    """Run the file's integer inference and the JAX fake-quant model side by side (needs JAX).

    Args:
      path: the exported file (or a loaded :class:`IntegerModel`).
      params: the quantized parameters it was exported from (an NNX model: ``None``, or
        an ``nnx.State`` of it).
      model: the Flax model (linen or NNX).
      images: float inputs, exact multiples of ``2**header["input"]["exponent"]``
        (MNIST: ``uint8 / 256``); the integer side gets them as integers at that exponent.
      batch_size: examples per batch.

    Returns:
      ``{"examples", "agree", "int_predictions", "jax_predictions", "code_mismatches":
      {layer: [mismatching codes, total codes, max |difference|]}, "max_logit_difference"}``:
      the layer input codes are those the JAX model's quantizers produce (intercepted),
      compared with the integer engine's; the logit difference is in float units.
    """
    import jax.numpy as jnp

    exported = path if isinstance(path, IntegerModel) else load(path)
    header = exported.header
    exponent, divisor = header["input"]["exponent"], header["output"]["divisor"]
    from cgmq_jax import nn as qnn

    forward = _nnx_forward if qnn.is_nnx_module(model) else _jitted_forward()
    images = np.asarray(images)
    scaled = images.astype(np.float64) * 2.0**-exponent
    integers = np.round(scaled)
    if not np.array_equal(integers, scaled):
        raise ValueError(f"inputs are not exact multiples of 2**{exponent}")
    integers = integers.astype(np.int64)
    names = {layer["name"]: i for i, layer in enumerate(exported.layers)}
    from cgmq_jax import compaction
    from cgmq_jax.lowering import _model_and_params

    spread = compaction.Spread(lambda: _model_and_params(model, params), header["input"]["shape"])
    int_pred, jax_pred, mismatches, max_logit = [], [], {}, 0.0
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        logits, codes = forward(model, params, jnp.asarray(images[start:stop]))
        logits = np.asarray(logits, np.float64)
        int_logits, out_exp, int_codes = engine.run_integer(
            exported, integers[start:stop], return_codes=True
        )
        jax_pred.append(np.argmax(logits, -1))
        int_pred.append(np.argmax(int_logits, -1))
        scaled_logits = int_logits.astype(np.float64) * 2.0**out_exp / divisor
        max_logit = max(max_logit, float(np.max(np.abs(scaled_logits - logits), initial=0.0)))
        for name, ours in int_codes.items():
            step = 2.0 ** exported.layers[names[name]]["input_exponent"]
            ours = spread(name, ours, np.size(codes[name]), step)  # a pruned model's file
            theirs = np.asarray(codes[name], np.float64).reshape(ours.shape) / step
            theirs = np.round(theirs).astype(np.int64)  # exact: Q(x) is a multiple of step
            row = mismatches.setdefault(name, [0, 0, 0])
            row[0] += int(np.sum(theirs != ours))
            row[1] += int(ours.size)
            row[2] = max(row[2], int(np.max(np.abs(theirs - ours), initial=0)))
    int_pred, jax_pred = np.concatenate(int_pred), np.concatenate(jax_pred)
    return {
        "examples": len(images),
        "agree": int(np.sum(int_pred == jax_pred)),
        "int_predictions": int_pred,
        "jax_predictions": jax_pred,
        "code_mismatches": mismatches,
        "max_logit_difference": max_logit,
    }
