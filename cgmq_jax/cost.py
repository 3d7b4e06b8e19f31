"""The traced bit-operation (BOP) cost of a quantized network.

``BOPs = sum_l MACs_l * b_w,l * b_in,l`` for one example (CGMQ.md section 2):

* a quantized layer is any Flax module with ``kernel``, ``input_quantizer`` and
  ``weight_quantizer`` parameters (e.g. :class:`cgmq_jax.nn.QuantDense`, ``QuantConv``);
* ``MACs_l = prod(output.shape[1:]) * prod(kernel.shape[:-1])``, found once from the
  model's shapes with ``jax.eval_shape`` (dense: out x in; convolution of any rank, with
  any strides, padding, dilation: output positions x output channels x prod(kernel
  window) x in / groups, since the kernel is ``(*window, in / groups, out)``);
* the network input is quantized by the first layer's input quantizer and counted;
  biases (accumulator precision), the unquantized logits, pooling and ReLU cost nothing.

:func:`bops` is the jittable cost (exact value, straight-through, floor-aware gradient);
:func:`exact_bops` is the certificate's integer cost, computed with Python integers.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cgmq_jax import quantizer

FLOAT_BITS = 32


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The static facts of one quantized layer that its cost needs."""

    path: tuple[str | int, ...]  # the layer's place in the parameter tree (int: a list index)
    macs: int  # multiply-accumulates per example
    input_signed: bool
    weight_signed: bool = True

    @property
    def name(self) -> str:
        return "/".join(map(str, self.path))


def layer_specs(model: nn.Module, sample_input: jax.Array, params=None) -> tuple[LayerSpec, ...]:
    """Find every quantized layer of ``model`` and its MACs per example, from shapes alone.

    A layer's input signedness is its ``input_signed`` field, or, where that is ``None``
    (decided by the data), the decision stored in its ``input_signed`` parameter leaf,
    read from ``params``.

    Args:
      model: a Flax linen model (quantized, so that its layers have quantizer parameters).
      sample_input: an input batch (or a ``jax.ShapeDtypeStruct``) with a leading batch axis.
      params: the quantized parameters (concrete values); needed only if a layer decides
        its input signedness from the data.

    Returns:
      One :class:`LayerSpec` per quantized layer, in call order.
    """
    found: list[LayerSpec] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and module.has_variable("params", "input_quantizer"):
            kernel = module.get_variable("params", "kernel")
            macs = math.prod(out.shape[1:]) * math.prod(kernel.shape[:-1])
            path = tuple(module.path)
            signed = getattr(module, "input_signed", False)
            if signed is None:
                signed = stored_input_signed(params, path)
            found.append(LayerSpec(path, int(macs), bool(signed)))
        return out

    sample = jax.ShapeDtypeStruct(jnp.shape(sample_input), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), sample)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no quantized layers (modules with 'input_quantizer' "
            "and 'weight_quantizer' parameters); build it with quantized=True"
        )
    return tuple(found)


def _layer_params(params, path: tuple[str, ...]):
    node = params
    for key in path:
        node = node[key]
    return node


def stored_input_signed(params, path: tuple[str, ...]) -> bool:
    """The data's signedness decision of the layer at ``path``, from its ``input_signed`` leaf."""
    name = "/".join(path)
    if params is None:
        raise ValueError(
            f"layer {name!r} decides its input signedness from the data (input_signed=None): "
            "pass its parameters, layer_specs(model, sample_input, params)"
        )
    layer = _layer_params(params, path)
    if quantizer.INPUT_SIGNED not in layer:
        raise ValueError(f"layer {name!r} has no {quantizer.INPUT_SIGNED!r} leaf in params")
    return bool(np.asarray(layer[quantizer.INPUT_SIGNED]) > 0)


def layer_bitwidths(params, spec: LayerSpec, *, exact: bool = False):
    """``(weight_bits, input_bits)`` of one layer: traced floats, or int32 when ``exact``."""
    layer = _layer_params(params, spec.path)
    fn = quantizer.exact_bitwidth if exact else quantizer.bitwidth
    weight_bits = fn(*quantizer.from_latents(layer["weight_quantizer"]), signed=spec.weight_signed)
    input_bits = fn(*quantizer.from_latents(layer["input_quantizer"]), signed=spec.input_signed)
    return weight_bits, input_bits


def bops(params, specs: tuple[LayerSpec, ...]) -> jax.Array:
    """The network's BOPs per example: a traced float32 with a straight-through gradient.

    Its value equals :func:`exact_bops` (up to float32 rounding above 2**24); its gradient
    w.r.t. the quantizer latents is that of the relaxed bit-widths, zero for quantizers at
    their minimum bit-width.
    """
    total = jnp.float32(0.0)
    for spec in specs:
        weight_bits, input_bits = layer_bitwidths(params, spec)
        total = total + spec.macs * weight_bits * input_bits
    return total


def exact_bops(params, specs: tuple[LayerSpec, ...]) -> int:
    """The exact integer BOPs per example (host-side Python integers, for certificates)."""
    return sum(row["bops"] for row in layer_table(params, specs))


def layer_table(params, specs: tuple[LayerSpec, ...]) -> list[dict]:
    """Per-layer rows: name, MACs, weight bits, input bits, BOPs (exact integers)."""
    bits = jax.device_get([layer_bitwidths(params, spec, exact=True) for spec in specs])
    rows = []
    for spec, (weight_bits, input_bits) in zip(specs, bits, strict=True):
        weight_bits, input_bits = int(np.asarray(weight_bits)), int(np.asarray(input_bits))
        rows.append(
            {
                "layer": spec.name,
                "macs": spec.macs,
                "weight_bits": weight_bits,
                "input_bits": input_bits,
                "bops": spec.macs * weight_bits * input_bits,
            }
        )
    return rows


def total_macs(specs: tuple[LayerSpec, ...]) -> int:
    """Multiply-accumulates per example of all quantized layers."""
    return sum(spec.macs for spec in specs)


def float_bops(specs: tuple[LayerSpec, ...]) -> int:
    """The same network's cost at 32x32 bits: ``sum MACs * 32 * 32``."""
    return total_macs(specs) * FLOAT_BITS * FLOAT_BITS


def relative_bops(cost: float, specs: tuple[LayerSpec, ...]) -> float:
    """``cost`` in percent of :func:`float_bops` (Bayesian Bits' "relative GBOPs")."""
    return 100.0 * cost / float_bops(specs)


def validate_budget(budget: float) -> None:
    """Raise a clear error unless ``budget`` is a positive finite number of BOPs."""
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise TypeError(f"budget must be a number of BOPs, got {type(budget).__name__}")
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"the budget must be a positive finite number of BOPs, got {budget}")


def min_cost(specs: tuple[LayerSpec, ...]) -> int:
    """The smallest achievable cost: every quantizer at its minimum bit-width."""
    return sum(
        spec.macs
        * quantizer.min_bitwidth(signed=spec.weight_signed)
        * quantizer.min_bitwidth(signed=spec.input_signed)
        for spec in specs
    )
