"""Deployable output: a trained, certified model as an integer file, and C code for a device.

The package is split by job:

* :mod:`~cgmq_jax.export.format`: the ``cgmq-int-npz`` file (constants, :func:`load`,
  :func:`save`, the validator and :func:`count_bops`); numpy only;
* :mod:`~cgmq_jax.export.engine`: integer-only reference inference (:func:`run_integer`,
  :func:`predict`); numpy only;
* :mod:`~cgmq_jax.export.writer`: :func:`export` / :func:`export_run` from a Flax model and
  its parameters, and :func:`compare_with_model` (these need JAX and are imported lazily);
* :mod:`~cgmq_jax.export.c`: the C99 emitter (:func:`emit_c`); numpy only.

``import cgmq_jax.export`` imports numpy only; the file format and the integer semantics
are in ``docs/export.md``.
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
]

_LAZY = {
    "BIAS_SCHEMES": "writer",
    "LOGIT_BIAS_BITS": "writer",
    "compare_with_model": "writer",
    "export": "writer",
    "export_run": "writer",
    "round_to_odd": "writer",
    "emit_c": "c",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"cgmq_jax.export.{_LAZY[name]}"), name)
        globals()[name] = value  # resolved once; later lookups (and pdoc) find it directly
        return value
    raise AttributeError(f"module 'cgmq_jax.export' has no attribute {name!r}")
