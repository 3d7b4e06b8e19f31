"""CGMQ: Constraint Guided Model Quantization in JAX, Flax and Optax.

Mixed-precision quantization-aware training under a hard bit-operation (BOP) budget.
"""

from cgmq_jax import constraint, cost, models, nn, quantizer
from cgmq_jax.constraint import ConstrainedUpdateState, constrained_update
from cgmq_jax.cost import bops, exact_bops, layer_specs, layer_table, min_cost
from cgmq_jax.quantizer import bitwidth, dequantize, fake_quant, param_labels, quantize

__all__ = [
    "ConstrainedUpdateState",
    "bitwidth",
    "bops",
    "constrained_update",
    "constraint",
    "cost",
    "dequantize",
    "exact_bops",
    "fake_quant",
    "layer_specs",
    "layer_table",
    "min_cost",
    "models",
    "nn",
    "param_labels",
    "quantize",
    "quantizer",
]
__version__ = "0.1.0"
