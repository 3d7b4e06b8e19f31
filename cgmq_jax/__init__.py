"""CGMQ: Constraint Guided Model Quantization in JAX, Flax and Optax.

Mixed-precision quantization-aware training under a hard bit-operation (BOP) budget.

Submodules and the public names below are imported lazily (PEP 562), so that the
numpy-only reader of exported models (:mod:`cgmq_jax.export`) works without JAX.

The library core (quantizer, layers, graph and cost, the constrained update, the limits,
repair and certificate, the
integer format, engine and C) imports nothing from the run harness, :mod:`cgmq_jax.runs`
(fit, run directories, checkpoints, reports, sweeps, parallel placement); ``train``,
``report`` and ``sweep`` here (and ``cgmq_jax.rundir``, ``checkpoint``, ``parallel``) are
deprecated aliases of its modules.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
    "calibration",
    "certify",
    "constraint",
    "cost",
    "data",
    "export",
    "limits",
    "models",
    "nn",
    "nnx",
    "optimizers",
    "ptq",
    "quantizer",
    "repair",
    "report",
    "rules",
    "runs",
    "sweep",
    "trades",
    "train",
)
_NAMES = {
    "ConstrainedUpdateState": "constraint",
    "cgmq_optimizer": "optimizers",
    "constrained_update": "constraint",
    "bops": "cost",
    "exact_bops": "cost",
    "layer_specs": "cost",
    "layer_table": "cost",
    "min_cost": "cost",
    "QuantDense": "nn",
    "QuantConv": "nn",
    "QuantOptions": "nn",
    "init_quantizers": "calibration",
    "QuantRule": "rules",
    "quantize_model": "rules",
    "bitwidth": "quantizer",
    "dequantize": "quantizer",
    "fake_quant": "quantizer",
    "is_quantizer": "quantizer",
    "param_labels": "quantizer",
    "quantize": "quantizer",
    "trade_bits": "trades",
}
__all__ = sorted((*_SUBMODULES, *_NAMES))


def __getattr__(name: str):
    if name in _SUBMODULES:
        value = importlib.import_module(f"cgmq_jax.{name}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(f"cgmq_jax.{_NAMES[name]}"), name)
    else:
        raise AttributeError(f"module 'cgmq_jax' has no attribute {name!r}")
    globals()[name] = value  # resolved once; later lookups (and pdoc) find it directly
    return value


def __dir__():
    return __all__
