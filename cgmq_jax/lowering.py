"""The lowering: a Flax model and its parameters -> a ``cgmq-int-npz`` file (needs JAX).

:func:`export` traces the model once (:func:`cgmq_jax.graph.trace`, the trace the cost
uses), reads its op graph (:func:`cgmq_jax.opgraph.ops`), turns every quantizer into a
power-of-two step and a level count with the trainer's own functions, rounds the kernels
to their integer codes and the float biases to integers (the one float-to-integer step),
and writes the file with :func:`cgmq_jax.export.format.save` (which validates it first).
:func:`build` is the same without the file, :func:`differences` compares a file with a
re-derivation. A pruned model's file holds its live channels only
(:mod:`cgmq_jax.compaction`). Running the file next to the JAX fake-quant model
(:func:`cgmq_jax.model_check.compare_with_model`, :func:`cgmq_jax.model_check.layer_inputs`)
is :mod:`cgmq_jax.model_check`'s; both names still resolve here.

This is library core: it imports :mod:`cgmq_jax.graph`, :mod:`cgmq_jax.opgraph`,
:mod:`cgmq_jax.cost`, :mod:`cgmq_jax.compaction`, :mod:`cgmq_jax.nn`,
:mod:`cgmq_jax.quantizer`, :mod:`cgmq_jax.model_check` and the numpy-only
:mod:`cgmq_jax.export`, never the run harness. Exporting a trainer's run directory is
:mod:`cgmq_jax.runs.export_run`. (``cgmq_jax.export.writer`` is a deprecated alias of this
module.) It runs a little over 550 lines: :func:`export` documents both bias schemes in
full, and the input checks name the user's mistake.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cgmq_jax.export.diff import INFORMATIVE, differences  # noqa: F401  (the lowering's names)
from cgmq_jax.export.format import (
    BIAS_BITS,
    LAYER_OPS,
    PIXEL_EXPONENT,
    LayerRow,
    bits_for_levels,
    int_dtype_for_bits,
    save,
    signed_bits,
)
from cgmq_jax.model_check import compare_with_model, layer_inputs  # noqa: F401  (re-exported)

#: How the float bias becomes an integer (see :func:`export`): ``"odd"`` (default) or
#: ``"accumulator"`` (round half to even at the accumulator scale).
BIAS_SCHEMES = ("odd", "accumulator")
#: Bits below the accumulator LSB of a bias whose layer output is not simply requantized
#: (the logits, or an output that is added, concatenated or averaged) under ``"odd"``.
LOGIT_BIAS_BITS = 16
#: Ops that keep a tensor on its grid and its order: a layer output reaching the next
#: quantizer through these only gets the narrow ``"odd"`` bias.
_GRID_OPS = ("relu", "maxpool", "reshape")


@dataclasses.dataclass(frozen=True)
class _Quantizer:
    exponent: int  # of the power-of-two step
    levels: int
    bits: int


@dataclasses.dataclass(frozen=True)
class _LayerFacts:
    """One quantized layer's integers, before the bias exponent is chosen."""

    name: str
    kind: str
    weight: list[_Quantizer]  # one, or one per output channel
    inputs: _Quantizer
    input_signed: bool
    per_channel: bool
    kernel: np.ndarray  # float, as trained (mask applied)
    bias: np.ndarray  # float64
    input_shape: list[int]
    output_shape: list[int]
    geometry: dict


def _quantizer_facts(theta, *, signed: bool, where: str) -> _Quantizer:
    """Step exponent, levels and bits of one quantizer leaf, via the trainer's code."""
    from cgmq_jax import quantizer

    d, q_max = quantizer.from_latents(np.asarray(theta, np.float32))
    d_q = float(np.asarray(quantizer.power_of_two_step(d)))
    mantissa, exp = math.frexp(d_q)
    if mantissa != 0.5:  # jnp.exp2 is inexact for some integer exponents on XLA:CPU
        raise ValueError(
            f"{where}: the trainer's step {d_q!r} is not a power of two (jnp.exp2 of an "
            f"integer exponent near {exp - 1} is inexact), so no integer file reproduces it"
        )
    levels = int(np.asarray(quantizer.levels(d, q_max)))
    bits = int(np.asarray(quantizer.exact_bitwidth(d, q_max, signed=signed)))
    if bits != bits_for_levels(levels, signed=signed):
        raise ValueError(f"{where}: bit-width {bits} disagrees with {levels} levels")
    return _Quantizer(exp - 1, levels, bits)


def _conv_geometry(layer) -> dict:
    """Strides, explicit padding, dilations and groups of a traced convolution."""
    import jax

    from cgmq_jax import nn as qnn

    module = layer.module
    geometry = qnn.conv_geometry(module)
    spatial = list(layer.input_shape[1:-1])
    kernel_size = geometry["kernel_size"]
    lhs, rhs = geometry["input_dilation"], geometry["kernel_dilation"]
    padding = geometry["padding"]
    if geometry["pre_padding"] is not None:
        if geometry["pad_mode"] != "constant" or padding != "VALID":
            raise ValueError(
                f"layer {layer.name!r}: padding {module.padding!r} is not exported (only zero "
                "padding: 'SAME', 'VALID', 'CAUSAL' or explicit)"
            )
        padding = [list(p) for p in geometry["pre_padding"]]
    elif isinstance(padding, str):
        dilated_in = [(n - 1) * d + 1 for n, d in zip(spatial, lhs, strict=True)]
        dilated_k = [(k - 1) * d + 1 for k, d in zip(kernel_size, rhs, strict=True)]
        padding = jax.lax.padtype_to_pads(dilated_in, dilated_k, geometry["strides"], padding)
    return {
        "strides": [int(s) for s in geometry["strides"]],
        "padding": [[int(a), int(b)] for a, b in padding],
        "kernel_dilation": [int(d) for d in rhs],
        "input_dilation": [int(d) for d in lhs],
        "groups": int(module.feature_group_count),
    }


def _layer_facts(params, layer, cut=None) -> _LayerFacts:
    """A layer's facts; with a :class:`cgmq_jax.compaction.Cut`, of its live channels only."""
    from cgmq_jax import compaction, cost
    from cgmq_jax import nn as qnn

    node = params
    for key in layer.path:
        node = node[key]
    options = layer.options
    signed = options.input_signed
    if signed is None:
        signed = cost.stored_input_signed(params, layer.path)
    signed = bool(signed)
    input_theta = qnn.effective_quantizer(
        node["input_quantizer"], options.input_bits, signed=signed
    )
    weight_theta = qnn.effective_quantizer(
        node["weight_quantizer"], options.weight_bits, signed=True
    )
    kernel = np.asarray(node["kernel"], np.float32)
    if getattr(layer.module, "mask", None) is not None:
        kernel = kernel * np.asarray(layer.module.mask, np.float32)
    if "bias" in node:
        bias = np.asarray(node["bias"], np.float32).astype(np.float64)
    else:
        bias = np.zeros(kernel.shape[-1], np.float64)
    if cut is not None and cut.constants is not None and np.any(cut.constants != 0.0):
        bias = bias + _folded(weight_theta, kernel, cut.constants, prune=options.prune)
    weight_theta = np.asarray(weight_theta, np.float32).reshape(-1, 2)
    if cut is not None and options.per_channel:
        weight_theta = weight_theta[cut.live_out]
    where = f"layer {layer.name!r}"
    facts = _LayerFacts(
        name=layer.name,
        kind=layer.kind,
        weight=[_quantizer_facts(t, signed=True, where=where) for t in weight_theta],
        inputs=_quantizer_facts(input_theta, signed=signed, where=where),
        input_signed=signed,
        per_channel=bool(options.per_channel),
        kernel=kernel,
        bias=bias,
        input_shape=[int(n) for n in layer.input_shape[1:]],
        output_shape=[int(n) for n in layer.output_shape[1:]],
        geometry=_conv_geometry(layer) if layer.kind == "conv" else {},
    )
    return facts if cut is None else compaction.cut_layer(facts, cut)


def _folded(weight_theta, kernel: np.ndarray, constants: np.ndarray, *, prune: bool):
    """What the input channels that hold one constant each add to every output: the
    quantized kernel (the layer's own fake-quant, exact multiples of its steps) times the
    constants, summed over the window and the channels, exactly (float64 of dyadic
    numbers). Only an ungrouped layer without padding is folded into
    (:func:`cgmq_jax.channels.constant_folds` refuses the rest)."""
    from cgmq_jax import operands

    weights = operands.quantize_tensor(weight_theta, kernel, signed=True, prune=prune)
    weights = np.asarray(weights, np.float64)
    per_input = weights.reshape(-1, *weights.shape[-2:]).sum(axis=0)  # (in, out)
    return constants @ per_input


def _next_quantizers(ops, start: int, facts: dict[int, _LayerFacts]) -> list[int] | None:
    """Input exponents of the quantizers tensor ``start`` reaches through grid ops only;
    ``None`` if it reaches anything else (an add, an average, the output, ...)."""
    reached, frontier = [], [start]
    while frontier:
        tensor = frontier.pop()
        consumers = [j for j, op in enumerate(ops) if tensor in op.inputs]
        if not consumers:
            return None  # the output (or a dead end)
        for j in consumers:
            op = ops[j]
            if op.op in LAYER_OPS:
                reached.append(facts[op.layer].inputs.exponent)
            elif op.op in _GRID_OPS:
                frontier.append(j + 1)
            else:
                return None
    return reached


def round_to_odd(values: np.ndarray) -> np.ndarray:
    """Integers as they are; anything else to the odd one of its two integer neighbours.

    Rounding to odd keeps a value strictly inside the same open interval between
    consecutive even integers, so adding it to an even integer and comparing with even
    integers (or rounding at any coarser power-of-two grid) gives the same answer as the
    unrounded value (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums:
    proved algorithms using rounding to odd", IEEE TC 2008).

    >>> round_to_odd(np.array([-2.5, -2.0, 0.25, 1.5, 2.0, 2.01])).tolist()
    [-3.0, -2.0, 1.0, 1.0, 2.0, 3.0]
    """
    values = np.asarray(values, np.float64)
    low = np.floor(values)
    odd_low = np.mod(low, 2.0) == 1.0
    return np.where(values == low, low, np.where(odd_low, low, low + 1.0))


def _layer_record(index: int, f: _LayerFacts, e_bias: int, scheme: str, arrays: dict) -> dict:
    """The header record of one layer; its integer kernel and bias go into ``arrays``."""
    e_w = np.array([q.exponent for q in f.weight], np.int64)
    n_w = np.array([q.levels for q in f.weight], np.int64)
    codes = np.clip(np.round(f.kernel.astype(np.float64) / 2.0**e_w), -n_w, n_w)
    b_w = [q.bits for q in f.weight]
    weight = codes.astype(int_dtype_for_bits(max(b_w)))
    e_acc = [int(e) + f.inputs.exponent for e in e_w]
    while True:
        scaled = f.bias / 2.0**e_bias  # exact: a float32 over a power of two, in float64
        bias_codes = np.round(scaled) if scheme == "accumulator" else round_to_odd(scaled)
        bias_max = int(np.max(np.abs(bias_codes), initial=0))
        if signed_bits(bias_max) <= BIAS_BITS:
            break
        if e_bias >= min(e_acc):
            raise ValueError(
                f"layer {f.name!r}: a bias of {float(np.max(np.abs(f.bias))):.6g} does not "
                f"fit {BIAS_BITS} bits even at the accumulator scale 2**{min(e_acc)}"
            )
        e_bias += 1  # a coarser bias grid: fewer fine bits, but it fits its storage
    bias_error = float(np.max(np.abs(f.bias - bias_codes * 2.0**e_bias), initial=0.0))
    bias_bits = BIAS_BITS  # the stored width, the one the weight memory counts
    fan_in = math.prod(f.kernel.shape[:-1])
    out_bound = (
        max(
            (fan_in * int(n) * f.inputs.levels << (e - e_bias))
            for n, e in zip(n_w, e_acc, strict=True)
        )
        + bias_max
    )
    weight_key, bias_key = f"L{index}.weight", f"L{index}.bias"
    arrays[weight_key] = weight
    arrays[bias_key] = bias_codes.astype(int_dtype_for_bits(bias_bits))
    one = lambda values: list(values) if f.per_channel else values[0]  # noqa: E731
    record = {
        "name": f.name,
        "kind": f.kind,
        "per_channel": f.per_channel,
        "input_shape": f.input_shape,
        "output_shape": f.output_shape,
        "kernel_shape": list(f.kernel.shape),
        "kernel_layout": "(*window, in / groups, out)" if f.kind == "conv" else "(in, out)",
        **f.geometry,
        "weight_key": weight_key,
        "weight_dtype": weight.dtype.name,
        "weight_bits": one(b_w),
        "weight_exponent": one([int(e) for e in e_w]),
        "weight_levels": one([int(n) for n in n_w]),
        "weight_signed": True,
        "input_bits": f.inputs.bits,
        "input_exponent": f.inputs.exponent,
        "input_levels": f.inputs.levels,
        "input_signed": f.input_signed,
        "accumulator_exponent": one(e_acc),
        "bias_key": bias_key,
        "bias_dtype": arrays[bias_key].dtype.name,
        "bias_bits": bias_bits,
        "bias_exponent": e_bias,
        "bias_rounding": "half_even" if scheme == "accumulator" else "odd",
        "bias_rounding_max_abs_error": bias_error,
        "output_bits": signed_bits(out_bound),
        "macs": math.prod(f.output_shape) * fan_in,
    }
    return record


def export(
    params: Any,
    model: Any,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int] = (28, 28, 1),
    input_exponent: int = PIXEL_EXPONENT,
    bias_scheme: str = "odd",
    certificate: dict | None = None,
    metadata: dict | None = None,
    **call_kwargs: Any,
) -> Path:
    """Write a quantized model's parameters as a ``cgmq-int-npz`` file (needs JAX).

    Any linen or NNX model whose layers are quantized (:class:`~cgmq_jax.nn.QuantDense` /
    ``QuantConv``, :class:`~cgmq_jax.nnx.QuantLinear` / ``QuantConv``, or plain Flax layers
    under :func:`~cgmq_jax.rules.quantize_model`) and whose other ops are ReLU / ReLU6 /
    clip, max / average pooling, means, residual adds, concatenation and reshapes exports;
    its graph comes from one trace of the model (:func:`cgmq_jax.graph.trace`).

    Args:
      params: the quantized parameter tree (``report.load_params`` of a run, or ``fit``'s);
        for an NNX model ``None`` (its own state) or an ``nnx.State`` of it.
      model: the Flax model (``quantized=True``), e.g. ``models.get_model("lenet5")``, or
        an NNX module.
      path: the ``.npz`` file to write.
      input_shape: one example's input shape (no batch axis).
      input_exponent: the exponent of the integer network input the file expects
        (default -8: MNIST pixels, ``x = uint8 / 256``).
      bias_scheme: how the float bias becomes an integer ``B`` at exponent ``e_b`` (the
        export's one float -> int step); a layer's output is ``(acc << (e_acc - e_b)) + B``
        at exponent ``e_b``, with ``e_acc = e_w + e_in``.

        * ``"accumulator"``: ``e_b = e_acc``, ``B = round_half_even(bias / 2**e_acc)``.
          Simple, but it loses up to half an accumulator LSB, which is up to several input
          steps of the next layer when the accumulator is the coarser, and it decides the
          frequent exact ties of the next quantizer's rounding differently from the float
          bias (measured: 46 of 10,000 LeNet-5 test predictions changed).
        * ``"odd"`` (default): where the output reaches the next quantizers through ReLU,
          max-pool and reshapes only, ``e_b = min(e_acc, e_next - 1) - 1`` (``e_next`` the
          smallest of their input exponents; a quantizer rounds at multiples of
          ``2**(e_next - 1)``), ``B = round_to_odd(bias / 2**e_b)``: the next layer's codes
          are then exactly those of exact arithmetic with the float bias (see
          :func:`round_to_odd`), for one or two more bias bits. Any other output (the
          logits, an output that is added, concatenated or averaged) takes
          ``e_b = e_acc - LOGIT_BIAS_BITS``: fine bits rather than parity.
      certificate: the trainer's certificate (``results.json["certificate"]``), copied into
        the header for the cross-check of :func:`count_bops`.
      metadata: free-form JSON-able facts to keep (run directory, seed, accuracy, params
        SHA-256, ...).
      **call_kwargs: further call arguments of the model (e.g. ``train=False``).

    Returns:
      The path written.

    Raises:
      ValueError: an unknown ``bias_scheme``; an op the integer engine does not run, or a
        layer that is not quantized (:class:`cgmq_jax.graph.UnsupportedOp`, naming the op,
        the module path and class, and what to do); parameters that do not fit
        ``input_shape`` (naming the layer); a non-finite parameter (the run diverged,
        naming its path); a quantizer whose step is not a power of two; a pruned network
        an op of which needs channels one operand removed (:mod:`cgmq_jax.compaction`).
    """
    header, arrays = build(
        params,
        model,
        input_shape=input_shape,
        input_exponent=input_exponent,
        bias_scheme=bias_scheme,
        certificate=certificate,
        metadata=metadata,
        **call_kwargs,
    )
    return save(path, header, arrays)


def build(
    params: Any,
    model: Any,
    *,
    input_shape: Sequence[int] = (28, 28, 1),
    input_exponent: int = PIXEL_EXPONENT,
    bias_scheme: str = "odd",
    certificate: dict | None = None,
    metadata: dict | None = None,
    **call_kwargs: Any,
) -> tuple[dict, dict[str, np.ndarray]]:
    """The ``(header, arrays)`` that :func:`export` writes (same arguments, no path).

    ``--check`` re-derives a file with it and compares the two (:func:`differences`).
    """
    import jax
    import jax.numpy as jnp

    from cgmq_jax import compaction, graph, opgraph

    if bias_scheme not in BIAS_SCHEMES:
        raise ValueError(f"bias_scheme must be one of {BIAS_SCHEMES}, got {bias_scheme!r}")
    model, params = _model_and_params(model, params)
    _check_finite(params)
    sample = jax.ShapeDtypeStruct((graph.TRACE_BATCH, *input_shape), jnp.float32)
    traced = _trace(model, sample, params, input_shape, call_kwargs)
    ops, output = opgraph.ops(traced)
    cuts = compaction.plan(model, params, traced, ops, sample, call_kwargs)  # None: no pruning
    ops = ops if cuts is None else cuts.ops
    facts = {
        i: _layer_facts(params, layer, None if cuts is None else cuts.layers[i])
        for i, layer in enumerate(traced.layers)
    }
    order = [op.layer for op in ops if op.op in LAYER_OPS]
    if sorted(order) != list(range(len(traced.layers))) or order != sorted(order):
        raise ValueError("every quantized layer must run once, in call order")
    layers, arrays = [], {}
    for j, op in enumerate(ops):
        if op.op not in LAYER_OPS:
            continue
        f = facts[op.layer]
        e_acc = min(q.exponent for q in f.weight) + f.inputs.exponent
        if bias_scheme == "accumulator":
            e_bias = e_acc
        else:
            nxt = _next_quantizers(ops, j + 1, facts)
            e_bias = e_acc - LOGIT_BIAS_BITS if not nxt else min(e_acc, min(nxt) - 1) - 1
        layers.append(_layer_record(op.layer, f, e_bias, bias_scheme, arrays))
    header = _graph_header(ops, output, layers, input_shape, int(input_exponent))
    header["model"] = _model_name(model)
    header["bias_scheme"] = bias_scheme
    if certificate is not None:
        header["certificate"] = {key: certificate[key] for key in CERTIFIED if key in certificate}
        if cuts is not None:
            header["certificate"] = compaction.certificate(header["certificate"], cuts.layers)
    if metadata is not None:
        header["metadata"] = metadata
    return header, arrays


def _check_finite(params: Any) -> None:
    """Refuse a diverged run: no integer file reproduces a NaN or infinite parameter."""
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(params)
    bad = [
        jax.tree_util.keystr(path, simple=True, separator="/")
        for path, leaf in leaves  # (abstract parameters: nothing to check)
        if not isinstance(leaf, jax.ShapeDtypeStruct) and not np.all(np.isfinite(leaf))
    ]
    if bad:
        raise ValueError(
            f"the run diverged: non-finite parameters at {', '.join(map(repr, bad[:4]))}"
            f"{' ...' if len(bad) > 4 else ''}, which no integer file reproduces; export an "
            "earlier checkpoint, or retrain (a lower learning rate)"
        )


class ParamShapeError(ValueError):
    """A parameter's shape does not fit the model at ``input_shape`` (a forgotten
    ``input_shape=``, or parameters of another model)."""


def _trace(model: Any, sample: Any, params: Any, input_shape, call_kwargs: dict):
    """:func:`cgmq_jax.graph.trace`, naming the likely cause of a parameter shape mismatch."""
    import flax

    from cgmq_jax import graph

    try:
        return graph.trace(model, sample, params=params, **call_kwargs)
    except flax.errors.ScopeParamShapeError as error:
        found = re.search(r'"(\w+)" in "/?([^"]*)".*shape (\(.*?\)).*shape (\(.*?\))', str(error))
        name, path, needed, stored = found.groups() if found else ("", "", "?", "?")
        raise ParamShapeError(
            f"layer {path!r}: its {name} has shape {stored}, which does not fit "
            f"input_shape={tuple(input_shape)} (that input needs {needed}): pass "
            "export(..., input_shape=...) with one example's shape, without the batch axis "
            "(the default, (28, 28, 1), is an MNIST image)"
        ) from None


def _model_and_params(model: Any, params: Any) -> tuple[Any, Any]:
    """An NNX module (``params``: ``None``, or an ``nnx.State`` of it) and its parameters as
    the linen tree (:func:`cgmq_jax.nnx.linen_params`); a linen model and ``params``."""
    from cgmq_jax import nn as qnn

    if not qnn.is_nnx_module(model):
        return model, params
    from cgmq_jax import nnx as cnnx

    model = cnnx.with_state(model, params)
    return model, cnnx.linen_params(model)


def _model_name(model: Any) -> str:
    """The user's model class name (that of the model :func:`cgmq_jax.quantize_model` wraps)."""
    from cgmq_jax import rules

    return type(model.model if isinstance(model, rules.QuantizedModel) else model).__name__


#: The keys of the trainer's certificate that the header keeps.
CERTIFIED = (
    "bops",
    "budget_bops",
    "within_budget",
    "weight_memory_bits",
    "activation_bits",
    "limits",
    "layers",
    "selected_epoch",
)


def _graph_header(ops, output: int, layers: list, input_shape, input_exponent: int) -> dict:
    """The header's input, ops, layers, output, MACs and BOPs (in the file's key order)."""
    header_ops = []
    for op in ops:
        entry = {"op": op.op, "inputs": list(op.inputs), **op.attrs, "module": op.path}
        if op.layer is not None:
            entry["layer"] = op.layer
        header_ops.append(entry)
    exponents, divisors = [input_exponent], [1]
    for op in ops:
        if op.op in LAYER_OPS:
            exponents.append(layers[op.layer]["bias_exponent"])
            divisors.append(1)
        else:
            exponents.append(min(exponents[i] for i in op.inputs))
            divisors.append(divisors[op.inputs[0]] * op.attrs.get("by", 1))
    rows = [
        LayerRow(
            layer=L["name"],
            macs=L["macs"],
            weight_bits=tuple(w) if isinstance(w := L["weight_bits"], list) else w,
            input_bits=L["input_bits"],
        )
        for L in layers
    ]
    return {
        "model": None,
        "input": {
            "shape": [int(n) for n in input_shape],
            "layout": "channels last, no batch axis",
            "exponent": input_exponent,
            "note": "integers at 2**exponent scale (MNIST: uint8 pixels, x = uint8 / 256)",
        },
        "ops": header_ops,
        "layers": layers,
        "output": {
            "tensor": output,
            "exponent": exponents[output],
            "divisor": divisors[output],
            "meaning": "int values; logits = values * 2**exponent / divisor; prediction = argmax",
        },
        "bias_scheme": None,
        "macs": sum(row.macs for row in rows),
        "bops": sum(row.bops for row in rows),
    }
