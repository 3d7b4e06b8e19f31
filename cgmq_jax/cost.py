"""The traced bit-operation (BOP) cost of a quantized network.

``BOPs = sum_l MACs_l * b_w,l * b_in,l`` for one example (docs/method.md section 2):

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

The layer specs (:class:`LayerSpec`, :func:`layer_specs` and the facts read from them) are
:mod:`cgmq_jax.specs`'s, kept apart from what they cost; every one of their names resolves
here too (``cgmq_jax.cost.layer_specs``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from cgmq_jax import quantizer
from cgmq_jax.export.format import BIAS_BITS, LayerRow
from cgmq_jax.specs import (
    LayerSpec,
    _check_not_lifted,  # noqa: F401  (moved to cgmq_jax.specs; still resolves here)
    _layer_params,
    is_pruning,
    layer_sizes,
    layer_specs,
    prunable_quantizers,
    stored_input_signed,
    with_sources,
)

FLOAT_BITS = 32

#: The public names, in the API reference's order (the layer specs' from :mod:`cgmq_jax.specs`).
__all__ = [
    "FLOAT_BITS",
    "LayerSpec",
    "layer_specs",
    "with_sources",
    "prunable_quantizers",
    "is_pruning",
    "layer_sizes",
    "stored_input_signed",
    "layer_bitwidths",
    "bops",
    "weight_memory",
    "activation_memory",
    "exact_weight_memory",
    "exact_activation_memory",
    "exact_bops",
    "layer_table",
    "live_channels",
    "total_macs",
    "float_bops",
    "relative_bops",
    "bops_with_input_at",
    "validate_budget",
    "min_cost",
    "COSTS",
    "cost_functions",
    "exact_costs",
    "table_costs",
    "min_costs",
    "costs_at",
]


def _bits(theta, pinned: int | None, *, signed: bool, exact: bool, prune: bool = False):
    if pinned is not None:  # a constant: no gradient, exactly the pin
        shape = jnp.shape(theta)[:-1]
        return jnp.full(shape, pinned, jnp.int32 if exact else jnp.float32)
    fn = quantizer.exact_bitwidth if exact else quantizer.bitwidth
    return fn(*quantizer.from_latents(theta), signed=signed, prune=prune)


def layer_bitwidths(params, spec: LayerSpec, *, exact: bool = False):
    """``(weight_bits, input_bits)`` of one layer: traced floats, or int32 when ``exact``.

    ``weight_bits`` has one entry per output channel for a per-channel layer (else it is a
    scalar); a float layer is ``FLOAT_BITS`` for both.
    """
    return _layer_bits(_layer_params(params, spec.path) if spec.quantized else None, spec, exact)


_QUANTIZER_LEAVES = ("weight_quantizer", "input_quantizer")


def _layer_bits(layer, spec: LayerSpec, exact: bool):
    """:func:`layer_bitwidths` from the layer's own parameters (``None`` for a float layer)."""
    if not spec.quantized:
        dtype = jnp.int32 if exact else jnp.float32
        return jnp.asarray(FLOAT_BITS, dtype), jnp.asarray(FLOAT_BITS, dtype)
    weight_bits = _bits(
        layer["weight_quantizer"],
        spec.weight_bits,
        signed=spec.weight_signed,
        exact=exact,
        prune=spec.prune,
    )
    input_bits = _bits(
        layer["input_quantizer"], spec.input_bits, signed=spec.input_signed, exact=exact
    )
    return weight_bits, input_bits


def bops(params, specs: tuple[LayerSpec, ...]) -> jax.Array:
    """The network's BOPs per example: a traced float32 with a straight-through gradient.

    Its value equals :func:`exact_bops` (up to float32 rounding above 2**24); its gradient
    w.r.t. the quantizer latents is that of the relaxed bit-widths, zero for quantizers at
    their minimum bit-width.

    Examples:
      >>> import jax
      >>> from cgmq_jax import cost, models
      >>> model = models.MLP(hidden=(), num_classes=4)  # one dense layer, 16 -> 4
      >>> x = jax.numpy.ones((1, 4, 4, 1))
      >>> params = model.init(jax.random.key(0), x)["params"]  # quantizers start at 8 bits
      >>> specs = cost.layer_specs(model, x)
      >>> cost.bops(params, specs)  # 64 MACs * 8 * 8
      Array(4096., dtype=float32)
      >>> cost.exact_bops(params, specs)
      4096
    """
    if is_pruning(specs):
        return _pruned_costs(params, specs)["bops"]
    total = jnp.float32(0.0)
    for spec in specs:
        weight_bits, input_bits = layer_bitwidths(params, spec)
        per_channel = spec.macs // spec.channels  # each channel's MACs at its own bits
        total = total + per_channel * jnp.sum(weight_bits) * input_bits
    return total


def _pruned_costs(params, specs, reduce: str = "max") -> dict:
    """The traced costs of a pruning network (the three of :data:`COSTS`)."""
    from cgmq_jax import channels

    terms = channels.terms([layer_bitwidths(params, spec) for spec in specs], specs, jnp)
    sizes = jnp.stack([t[2] for t in terms]).astype(jnp.float32)
    return {
        "bops": sum(t[0] for t in terms),
        "weight_memory_bits": sum(t[1] for t in terms),
        "activation_bits": jnp.max(sizes) if reduce == "max" else jnp.sum(sizes),
    }


def weight_memory(params, specs: tuple[LayerSpec, ...]) -> jax.Array:
    """Weight memory in bits, ``sum_l #weights_l * b_w,l + #biases_l * BIAS_BITS``: traced,
    exact in value, straight-through and floor-aware like :func:`bops` (docs/method.md section 8).

    Per-channel layers count each channel's weights at its own bits; biases are stored at
    :data:`BIAS_BITS` (what the export writes), a constant with no gradient.
    """
    if is_pruning(specs):
        return _pruned_costs(params, specs)["weight_memory_bits"]
    total = jnp.float32(0.0)
    for spec in specs:
        weight_bits, _ = layer_bitwidths(params, spec)
        per_channel = spec.weights // spec.channels
        total = total + per_channel * jnp.sum(weight_bits) + spec.biases * BIAS_BITS
    return total


def activation_memory(params, specs: tuple[LayerSpec, ...], *, reduce: str = "max") -> jax.Array:
    """Activation memory in bits per example: the largest quantized layer input,
    ``max_l #elements_l * b_in,l`` (DQ's "largest activation"), or with ``reduce="sum"``
    their sum. Traced, exact in value, straight-through like :func:`bops` (the max passes
    its gradient to the largest input)."""
    if reduce not in ("max", "sum"):
        raise ValueError(f"reduce must be 'max' or 'sum', got {reduce!r}")
    if is_pruning(specs):
        return _pruned_costs(params, specs, reduce)["activation_bits"]
    sizes = jnp.stack(
        [spec.input_elements * layer_bitwidths(params, spec)[1] for spec in specs]
    ).astype(jnp.float32)
    return jnp.max(sizes) if reduce == "max" else jnp.sum(sizes)


def exact_weight_memory(params, specs: tuple[LayerSpec, ...]) -> int:
    """The exact weight memory in bits (Python integers, for certificates)."""
    return sum(row["weight_memory_bits"] for row in layer_table(params, specs))


def exact_activation_memory(params, specs: tuple[LayerSpec, ...], *, reduce: str = "max") -> int:
    """The exact activation memory in bits per example (Python integers)."""
    sizes = [row["activation_bits"] for row in layer_table(params, specs)]
    return max(sizes) if reduce == "max" else sum(sizes)


def exact_bops(params, specs: tuple[LayerSpec, ...]) -> int:
    """The exact integer BOPs per example (host-side Python integers, for certificates)."""
    return sum(row["bops"] for row in layer_table(params, specs))


def _quantizer_leaves(params, specs: tuple[LayerSpec, ...]) -> tuple:
    """Each layer's quantizer leaves (``None`` for a float layer): nothing else is needed."""
    return tuple(
        {name: _layer_params(params, spec.path)[name] for name in _QUANTIZER_LEAVES}
        if spec.quantized
        else None
        for spec in specs
    )


@functools.partial(jax.jit, static_argnums=1)
def _exact_bitwidths(layers: tuple, specs: tuple[LayerSpec, ...]) -> list:
    """Every layer's exact ``(weight_bits, input_bits)`` in one compiled call (the certificate
    and the greedy repair and fill read bit-widths often; op by op it was most of their time)."""
    return [_layer_bits(layer, spec, True) for layer, spec in zip(layers, specs, strict=True)]


def layer_table(params, specs: tuple[LayerSpec, ...]) -> list[dict]:
    """Per-layer rows: name, MACs, weight bits, input bits, BOPs (exact integers).

    A per-channel layer's ``weight_bits`` is a list, one int per output channel; a float
    layer's row has ``"float": True`` and 32 bits for both.
    """
    specs = tuple(specs)
    bits = jax.device_get(_exact_bitwidths(_quantizer_leaves(params, specs), specs))
    if is_pruning(specs):
        from cgmq_jax import channels

        return channels.table(bits, specs)
    rows = []
    for spec, (weight_bits, input_bits) in zip(specs, bits, strict=True):
        weight_bits = np.asarray(weight_bits)
        per_channel = tuple(int(b) for b in weight_bits.reshape(-1))
        row = LayerRow(
            layer=spec.name,
            macs=spec.macs,
            weight_bits=per_channel if weight_bits.ndim else per_channel[0],
            input_bits=int(np.asarray(input_bits)),
            weights=spec.weights,
            biases=spec.biases,
            bias_bits=BIAS_BITS,
            input_elements=spec.input_elements,
        )
        row = {
            **row.as_dict(),
            "weight_memory_bits": row.weight_memory_bits,
            "activation_bits": row.activation_bits,
        }
        if not spec.quantized:
            row["float"] = True
        rows.append(row)
    return rows


def live_channels(params, specs: tuple[LayerSpec, ...]) -> list | None:
    """Per layer of a pruning network, ``(live inputs, live outputs)``: boolean numpy
    arrays over the channels of its input's last axis and over its output channels;
    ``None`` when no layer prunes (every channel is live).

    A removed output channel's output is exactly 0 (its codes and its bias are); a removed
    input channel is one all of whose sources are removed (docs/method.md section 12). The
    export stores only the live ones.
    """
    specs = tuple(specs)
    if not is_pruning(specs):
        return None
    bits = jax.device_get(_exact_bitwidths(_quantizer_leaves(params, specs), specs))
    bits = [(np.asarray(w, np.int64), int(np.asarray(b))) for w, b in bits]
    from cgmq_jax import channels

    return [(t[3][0], t[3][1]) for t in channels.terms(bits, specs)]


def total_macs(specs: tuple[LayerSpec, ...]) -> int:
    """Multiply-accumulates per example of all quantized layers."""
    return sum(spec.macs for spec in specs)


def float_bops(specs: tuple[LayerSpec, ...]) -> int:
    """The same network's cost at 32x32 bits: ``sum MACs * 32 * 32``."""
    return total_macs(specs) * FLOAT_BITS * FLOAT_BITS


def relative_bops(cost: float, specs: tuple[LayerSpec, ...]) -> float:
    """``cost`` in percent of :func:`float_bops` (Bayesian Bits' "relative GBOPs")."""
    return 100.0 * cost / float_bops(specs)


def bops_with_input_at(table: list[dict], bits: int = 8) -> int:
    """The BOPs of :func:`layer_table` rows with the network input (the first layer's
    input) counted at ``bits``: Bayesian Bits' convention counts the 8-bit image at 8.

    >>> bops_with_input_at([{"bops": 2 * 3 * 4, "input_bits": 4}, {"bops": 5, "input_bits": 1}])
    53
    """
    first = table[0]
    return (
        sum(row["bops"] for row in table)
        - first["bops"]
        + first["bops"] // first["input_bits"] * bits
    )


def validate_budget(budget: float) -> None:
    """Raise a clear error unless ``budget`` is a positive finite number of BOPs."""
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise TypeError(f"budget must be a number of BOPs, got {type(budget).__name__}")
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"the budget must be a positive finite number of BOPs, got {budget}")


def min_cost(specs: tuple[LayerSpec, ...]) -> int:
    """The smallest achievable BOPs: ``min_costs(specs)["bops"]`` (:func:`min_costs`, which
    gives every cost's minimum; kept as the short name for the BOP one).

    Examples:
      >>> import jax
      >>> from cgmq_jax import cost, models
      >>> x = jax.ShapeDtypeStruct((1, 28, 28, 1), jax.numpy.float32)
      >>> specs = cost.layer_specs(models.MLP(), x)
      >>> cost.min_cost(specs)  # 2-bit signed weights, 1-bit unsigned inputs: 266200 * 2 * 1
      532400
    """
    return min_costs(specs)["bops"]


def _min_bits(spec: LayerSpec) -> tuple[int, int]:
    """``(weight bits, input bits)`` of a layer at its minimum (pins; float layers 32)."""
    if not spec.quantized:
        return FLOAT_BITS, FLOAT_BITS
    weight = spec.weight_bits or quantizer.min_bitwidth(signed=spec.weight_signed)
    inputs = spec.input_bits or quantizer.min_bitwidth(signed=spec.input_signed)
    return weight, inputs


#: The costs a limit can bind, by name (docs/method.md sections 2 and 8), in bits per example.
COSTS = ("bops", "weight_memory_bits", "activation_bits")


def cost_functions(specs: tuple[LayerSpec, ...], *, activation_reduce: str = "max") -> dict:
    """``{name: params -> traced cost}`` for every name of :data:`COSTS`."""
    import functools

    return {
        "bops": functools.partial(bops, specs=specs),
        "weight_memory_bits": functools.partial(weight_memory, specs=specs),
        "activation_bits": functools.partial(
            activation_memory, specs=specs, reduce=activation_reduce
        ),
    }


def exact_costs(params, specs: tuple[LayerSpec, ...], *, activation_reduce: str = "max") -> dict:
    """``{name: exact integer cost}`` for every name of :data:`COSTS`, from one table."""
    return table_costs(layer_table(params, specs), activation_reduce)


def table_costs(table: list[dict], activation_reduce: str = "max") -> dict:
    """``{name: exact integer cost}`` for every name of :data:`COSTS`, from the rows of
    :func:`layer_table` (the activation: the largest input, or their sum)."""
    sizes = [row["activation_bits"] for row in table]
    return {
        "bops": sum(row["bops"] for row in table),
        "weight_memory_bits": sum(row["weight_memory_bits"] for row in table),
        "activation_bits": max(sizes) if activation_reduce == "max" else sum(sizes),
    }


def min_costs(specs: tuple[LayerSpec, ...], *, activation_reduce: str = "max") -> dict:
    """``{name: smallest achievable cost}``: every learned quantizer at its minimum
    bit-width at once (pinned quantizers at their pin, float layers at 32 x 32 bits), which
    minimises every cost together (so a set of limits is feasible exactly when each is at
    least its own minimum)."""
    bits = [_min_bits(spec) for spec in specs]
    if is_pruning(specs):  # every pruning layer keeps one channel (the first), at its floor
        floors = [
            (np.eye(1, spec.channels_out, dtype=np.int64)[0] * b_w if spec.prune else b_w, b_in)
            for spec, (b_w, b_in) in zip(specs, bits, strict=True)
        ]
        from cgmq_jax import channels

        terms = channels.terms(floors, specs)
        sizes = [int(t[2]) for t in terms]
        return {
            "bops": sum(int(t[0]) for t in terms),
            "weight_memory_bits": sum(int(t[1]) for t in terms),
            "activation_bits": max(sizes) if activation_reduce == "max" else sum(sizes),
        }
    return _costs_of(specs, bits, activation_reduce)


def costs_at(
    specs: tuple[LayerSpec, ...], weight_bits: int, input_bits: int, *, activation_reduce="max"
) -> dict:
    """``{name: exact cost}`` with every learned quantizer at ``weight_bits`` /
    ``input_bits`` (pinned quantizers at their pin, float layers at 32 x 32 bits, every
    channel kept): a network's costs at its initial bits
    (:func:`cgmq_jax.calibration.init_quantizers`), known before it is calibrated.

    Examples:
      >>> import jax
      >>> from cgmq_jax import cost, models
      >>> x = jax.ShapeDtypeStruct((1, 28, 28, 1), jax.numpy.float32)
      >>> cost.costs_at(cost.layer_specs(models.MLP(), x), 8, 8)["bops"]  # 266200 * 8 * 8
      17036800
    """
    bits = [
        (spec.weight_bits or weight_bits, spec.input_bits or input_bits)
        if spec.quantized
        else (FLOAT_BITS, FLOAT_BITS)
        for spec in specs
    ]
    return _costs_of(specs, bits, activation_reduce)


def _costs_of(specs, bits: list, activation_reduce: str) -> dict:
    """Every cost of :data:`COSTS` from each layer's ``(weight bits, input bits)``."""
    sizes = [spec.input_elements * b_in for spec, (_, b_in) in zip(specs, bits, strict=True)]
    return {
        "bops": sum(spec.macs * b_w * b_in for spec, (b_w, b_in) in zip(specs, bits, strict=True)),
        "weight_memory_bits": sum(
            spec.weights * b_w + spec.biases * BIAS_BITS
            for spec, (b_w, _) in zip(specs, bits, strict=True)
        ),
        "activation_bits": max(sizes) if activation_reduce == "max" else sum(sizes),
    }
