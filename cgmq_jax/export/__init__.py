"""Deployable output: a trained, certified model as an integer file, and C code for a device.

The package is split by job:

* :mod:`~cgmq_jax.export.format`: the ``cgmq-int-npz`` file (constants, :func:`load`,
  :func:`save`, the validator and :func:`count_bops`); numpy only;
* :mod:`~cgmq_jax.export.engine`: integer-only reference inference (:func:`run_integer`,
  :func:`predict`); numpy only;
* :mod:`~cgmq_jax.export.c`: the C99 emitter (:func:`emit_c`); numpy only;
* :mod:`~cgmq_jax.export.onnx`: the ONNX QDQ writer (:func:`to_onnx`), ONNX Runtime runner
  and the recount from an ONNX file alone (:func:`recount_onnx`); numpy at import, ``onnx``
  and ``onnxruntime`` when used (``pip install -r requirements-onnx.txt``).

The JAX side lives outside this package: :mod:`cgmq_jax.lowering` (:func:`export`: a Flax
model and its parameters to a file), :mod:`cgmq_jax.model_check` (:func:`compare_with_model`:
the file run next to the model) and, for a trainer's run directory,
:mod:`cgmq_jax.runs.export_run` (:func:`export_run`). Their names here are
resolved on first use, so ``import cgmq_jax.export`` imports numpy only (and
``cgmq_jax.export.writer`` is a deprecated alias of :mod:`cgmq_jax.lowering`). The file
format and the integer semantics are in ``docs/export.md``.
"""

from __future__ import annotations

import importlib

from cgmq_jax.export.engine import (
    divide_round_half_even,
    input_codes_from_float,
    pixels_from_unit_float,
    predict,
    requantize,
    round_shift,
    run_integer,
)
from cgmq_jax.export.format import (
    DEFAULT_FILE,
    FORMAT,
    PIXEL_EXPONENT,
    VERSION,
    ExportError,
    IntegerModel,
    LayerRow,
    bits_for_levels,
    count_bops,
    int_dtype_for_bits,
    load,
    save,
    signed_bits,
)

__all__ = [
    "DEFAULT_FILE",
    "FORMAT",
    "PIXEL_EXPONENT",
    "VERSION",
    "ExportError",
    "IntegerModel",
    "LayerRow",
    "bits_for_levels",
    "count_bops",
    "divide_round_half_even",
    "input_codes_from_float",
    "int_dtype_for_bits",
    "load",
    "pixels_from_unit_float",
    "predict",
    "requantize",
    "round_shift",
    "run_integer",
    "save",
    "signed_bits",
    "BIAS_SCHEMES",
    "LOGIT_BIAS_BITS",
    "compare_with_model",
    "emit_c",
    "export",
    "export_run",
    "round_to_odd",
    "recount_onnx",
    "to_onnx",
]

#: Public names imported on first use: name -> the module that owns it.
_LAZY = {
    "BIAS_SCHEMES": "cgmq_jax.lowering",
    "LOGIT_BIAS_BITS": "cgmq_jax.lowering",
    "compare_with_model": "cgmq_jax.model_check",
    "export": "cgmq_jax.lowering",
    "export_run": "cgmq_jax.runs.export_run",
    "round_to_odd": "cgmq_jax.lowering",
    "emit_c": "cgmq_jax.export.c",
    "recount_onnx": "cgmq_jax.export.onnx",
    "to_onnx": "cgmq_jax.export.onnx",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # resolved once; later lookups (and pdoc) find it directly
        return value
    raise AttributeError(f"module 'cgmq_jax.export' has no attribute {name!r}")
