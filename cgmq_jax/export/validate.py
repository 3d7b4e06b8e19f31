"""The graph walk of the reader: every shape, MAC count, bit-width, exponent and memory
figure of a file recomputed from its input shape, and every claim checked against them.

:func:`validate` is what :func:`cgmq_jax.export.format.load` and ``save`` run on every
header; the range proof it ends with is :mod:`cgmq_jax.export.ranges`'.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from cgmq_jax.export.base import (
    INPUT_RANGE,
    LAYER_OPS,
    MAX_BIAS_SHIFT,
    MAX_TENSOR_ELEMENTS,
    OPS,
    LayerRow,
    Tensor,
    Validated,
    _Checker,
    _is_int,
    bits_for_levels,
    signed_bits,
)
from cgmq_jax.export.ranges import prove_ranges
from cgmq_jax.export.schema import (
    _CONV_FIELDS,
    _LAYER_FIELDS,
    BIAS_ROUNDING,
    KERNEL_LAYOUTS,
    OP_FIELDS,
    _shown,
    check_header_types,
)


def _window_out(
    check: _Checker,
    where: str,
    size: int,
    window: int,
    stride: int,
    pad,
    *,
    input_dilation: int = 1,
    window_dilation: int = 1,
) -> int:
    """Output length of a (possibly dilated, padded) window sliding over one axis."""
    dilated = (size - 1) * input_dilation + 1
    span = (window - 1) * window_dilation + 1
    padded = dilated + pad[0] + pad[1]
    if padded < span:
        raise check.fail(f"{where}: window {span} is larger than the padded input {padded}")
    return (padded - span) // stride + 1


def _pairs(check: _Checker, where: str, value: Any, count: int) -> list[list[int]]:
    pairs = check.list(where, value)
    if len(pairs) != count:
        raise check.fail(f"{where} must hold {count} [low, high] pairs, got {len(pairs)}")
    return [check.ints(f"{where}[{i}]", p, 2, lo=0) for i, p in enumerate(pairs)]


def _exponents(check: _Checker, where: str, value: Any, channels: int | None) -> list[int]:
    """One exponent, or one per channel (``channels`` given: a per-channel layer)."""
    if channels is None:
        return [check.exponent(where, value)]
    values = check.list(where, value)
    if len(values) != channels:
        raise check.fail(f"{where} must list {channels} per-channel values")
    return [check.exponent(f"{where}[{i}]", v) for i, v in enumerate(values)]


def _layer(check: _Checker, index: int, layer: dict, shape: tuple[int, ...], arrays) -> tuple:
    """``(output shape, LayerRow, bias exponent)`` of layer ``index`` on an input of
    ``shape``, every field checked."""
    where = f"layer {index} ({layer['name']})"
    claimed = check.ints(f"{where}.input_shape", layer["input_shape"])
    if tuple(claimed) != shape:
        raise check.fail(
            f"{where}.input_shape {claimed!r} does not follow from the graph, which gives "
            f"{list(shape)}"
        )
    kernel = check.ints(f"{where}.kernel_shape", layer["kernel_shape"])
    weight, bias = arrays[layer["weight_key"]], arrays[layer["bias_key"]]
    if list(weight.shape) != kernel:
        raise check.fail(f"{where}: weight array shape {list(weight.shape)} != kernel_shape")
    if layer["kind"] == "conv":
        out, fan_in = _conv_shape(check, where, layer, kernel, shape)
    else:
        if len(kernel) != 2 or kernel[0] != shape[-1]:
            raise check.fail(
                f"{where}.kernel_shape {kernel} does not fit the dense input {list(shape)}"
            )
        out, fan_in = (*shape[:-1], kernel[1]), kernel[0]
    macs = math.prod(out) * fan_in
    if list(bias.shape) != [out[-1]]:
        raise check.fail(f"{where}: bias array shape {list(bias.shape)} != [{out[-1]}]")
    if check.ints(f"{where}.output_shape", layer["output_shape"]) != list(out):
        raise check.fail(
            f"{where}.output_shape {layer['output_shape']!r} disagrees with its shapes, "
            f"which give {list(out)}"
        )
    if not _is_int(layer["macs"]) or layer["macs"] != macs:
        raise check.fail(
            f"{where}.macs {layer['macs']!r} disagrees with its shapes, which give {macs}"
        )
    per_channel = check.bool(f"{where}.per_channel", layer["per_channel"])
    n_w, weight_bits, input_bits, e_b = _layer_quantizers(
        check, where, layer, out[-1] if per_channel else None
    )
    _check_codes(check, where, layer, n_w, weight, bias)
    row = LayerRow(
        layer=check.str(f"layer {index} name", layer["name"]),
        kind=layer["kind"],
        macs=macs,
        weight_bits=tuple(weight_bits) if per_channel else weight_bits[0],
        input_bits=input_bits,
        weights=math.prod(kernel),
        biases=out[-1],
        bias_bits=int(layer["bias_bits"]),
        input_elements=math.prod(shape),
    )
    return tuple(out), row, e_b


def _conv_shape(check: _Checker, where: str, layer: dict, kernel: list[int], shape) -> tuple:
    """``(output shape, fan-in)`` of a convolution, its geometry checked."""
    rank = len(shape) - 1
    if not 1 <= rank <= 3 or len(kernel) != rank + 2:
        raise check.fail(f"{where}: kernel {kernel} does not fit the conv input {list(shape)}")
    strides = check.ints(f"{where}.strides", layer["strides"], rank)
    padding = _pairs(check, f"{where}.padding", layer["padding"], rank)
    rhs = check.ints(f"{where}.kernel_dilation", layer["kernel_dilation"], rank)
    lhs = check.ints(f"{where}.input_dilation", layer["input_dilation"], rank)
    groups = check.int(f"{where}.groups", layer["groups"], 1)
    cin_g, cout = kernel[-2], kernel[-1]
    if cin_g * groups != shape[-1] or cout % groups:
        raise check.fail(
            f"{where}.kernel_shape {kernel} with groups {groups} does not fit input "
            f"channels {shape[-1]}"
        )
    spatial = [
        _window_out(check, where, n, k, s, p, input_dilation=a, window_dilation=b)
        for n, k, s, p, a, b in zip(
            shape[:-1], kernel[:-2], strides, padding, lhs, rhs, strict=True
        )
    ]
    return (*spatial, cout), math.prod(kernel[:-1])


def _layer_quantizers(check: _Checker, where: str, layer: dict, channels: int | None) -> tuple:
    """``(weight levels, weight bits, input bits, bias exponent)`` of a layer: its levels,
    exponents and stated bit-widths checked (``channels``: per-channel, that many)."""
    levels = layer["weight_levels"]
    listed = channels is not None and isinstance(levels, list)
    n_w = [
        check.int(f"{where}.weight_levels", n, 1, 1 << 62) for n in (levels if listed else [levels])
    ]
    if len(n_w) != (channels or 1):
        raise check.fail(f"{where}.weight_levels must list {channels} per-channel values")
    e_w = _exponents(check, f"{where}.weight_exponent", layer["weight_exponent"], channels)
    e_acc = _exponents(
        check, f"{where}.accumulator_exponent", layer["accumulator_exponent"], channels
    )
    n_in = check.int(f"{where}.input_levels", layer["input_levels"], 1, 1 << 62)
    signed = check.bool(f"{where}.input_signed", layer["input_signed"])
    if layer.get("weight_signed", True) is not True:
        raise check.fail(f"{where}.weight_signed must be true")
    e_in = check.exponent(f"{where}.input_exponent", layer["input_exponent"])
    e_b = check.exponent(f"{where}.bias_exponent", layer["bias_exponent"])
    if e_acc != [e + e_in for e in e_w]:
        raise check.fail(f"{where}.accumulator_exponent {e_acc} != weight + input exponent")
    if not all(0 <= e - e_b <= MAX_BIAS_SHIFT for e in e_acc):
        raise check.fail(
            f"{where}: bias_exponent {e_b} above an accumulator_exponent {e_acc} or more "
            f"than {MAX_BIAS_SHIFT} below it"
        )
    weight_bits = [bits_for_levels(n, signed=True) for n in n_w]
    input_bits = bits_for_levels(n_in, signed=signed)
    stated_w = layer["weight_bits"]
    stated_w = stated_w if isinstance(stated_w, list) else [stated_w]
    if not all(map(_is_int, [*stated_w, layer["input_bits"]])) or (
        stated_w != weight_bits or layer["input_bits"] != input_bits
    ):
        raise check.fail(f"{where}: stated bit-widths disagree with the levels")
    return n_w, weight_bits, input_bits, e_b


def _check_codes(check: _Checker, where: str, layer: dict, n_w: list, weight, bias) -> None:
    """Weight codes within their levels ``n_w`` (per output channel), biases within
    ``bias_bits``."""
    if weight.size:  # per output channel (the last axis), against its own levels
        reach = np.abs(weight.astype(np.int64)).reshape(-1, weight.shape[-1]).max(axis=0)
        if np.any(reach > np.asarray(n_w)):
            raise check.fail(f"{where}: weight codes exceed their levels")
    bias_bits = check.int(f"{where}.bias_bits", layer["bias_bits"], 1, bias.dtype.itemsize * 8)
    if bias.size and signed_bits(int(np.abs(bias.astype(np.int64)).max())) > bias_bits:
        raise check.fail(f"{where}: bias values exceed bias_bits {bias_bits}")


def _clip_bound(check: _Checker, where: str, value: Any, tensor: Tensor) -> None:
    if value is None:
        return
    m, x = check.ints(where, value, 2, lo=-(1 << 62))
    check.exponent(f"{where}[1]", x)
    scaled = m * tensor.divisor
    if x < tensor.exponent and scaled % (1 << (tensor.exponent - x)):
        raise check.fail(
            f"{where} {value} is not an integer at the tensor's scale 2**{tensor.exponent}"
        )


def _pool(check: _Checker, where: str, op: dict, shape: tuple[int, ...], *, needs_real: bool):
    rank = len(shape)
    window = check.ints(f"{where}.window", op.get("window"), rank)
    strides = check.ints(f"{where}.strides", op.get("strides"), rank)
    padding = _pairs(check, f"{where}.padding", op.get("padding"), rank)
    out = []
    for n, w, s, (lo, hi) in zip(shape, window, strides, padding, strict=True):
        size = _window_out(check, where, n, w, s, (lo, hi))
        if needs_real and (lo >= w or (size - 1) * s - lo >= n):
            raise check.fail(f"{where}: a window covers padding only")
        out.append(size)
    return tuple(out)


def validate(path: os.PathLike | str, header: dict, arrays: dict[str, np.ndarray]) -> Validated:
    """Follow the graph from the input shape; every tensor and layer recomputed and checked.

    Returns every tensor's shape, exponent and divisor, and every layer's :class:`LayerRow`
    (MACs and bit-widths recomputed from the validated shapes and levels; the header's
    ``macs`` and ``*_bits`` must equal them).
    """
    check = _Checker(Path(path))
    check_header_types(check, header)
    layers = check.list("layers", header["layers"])
    ops = check.list("ops", header["ops"])
    entry = check.dict("input", header["input"])
    if "shape" not in entry or "exponent" not in entry:
        raise check.fail("input needs shape and exponent")
    shape = tuple(check.ints("input.shape", entry["shape"]))
    if len(shape) > 4:
        raise check.fail(f"input.shape {list(shape)} has more than 4 axes")
    _check_layer_entries(check, layers, arrays)
    tensors = [Tensor(shape, check.exponent("input.exponent", entry["exponent"]))]
    rows: list[LayerRow] = []
    for j, op in enumerate(ops):
        result = _op_output(check, j, op, tensors, layers, rows, arrays)
        if math.prod(result.shape) > MAX_TENSOR_ELEMENTS:
            raise check.fail(
                f"op {j} ({op['op']}): its output {list(result.shape)} has over "
                f"{MAX_TENSOR_ELEMENTS:,} elements per example"
            )
        tensors.append(result)
    if len(rows) != len(layers):
        raise check.fail(f"the ops visit {len(rows)} of {len(layers)} layers")
    _check_output(check, header["output"], tensors)
    ranges, matters = prove_ranges(check, header, arrays, tensors)
    facts = Validated(tuple(tensors), tuple(rows), tuple(ranges), INPUT_RANGE if matters else None)
    _check_layer_claims(check, header, arrays)
    _check_totals(check, header, facts)
    _check_certificate(check, header, facts)
    return facts


def _check_layer_entries(check: _Checker, layers: list, arrays: dict) -> None:
    """Each layer an object of a known kind with its fields, owning two arrays of its own;
    every array some layer's."""
    keys: set[str] = set()
    for i, layer in enumerate(layers):
        check.dict(f"layer {i}", layer)
        kind = layer.get("kind")
        if kind not in LAYER_OPS:
            raise check.fail(f"header layer {i}: unknown kind {kind!r}")
        needed = _LAYER_FIELDS + (_CONV_FIELDS if kind == "conv" else ())
        missing = [key for key in needed if key not in layer]
        if missing:
            raise check.fail(f"header layer {i} is missing {', '.join(missing)}")
        if kind == "dense" and any(key in layer for key in _CONV_FIELDS):
            raise check.fail(f"header layer {i}: a dense layer with conv geometry")
        check.str(f"layer {i} name", layer["name"])
        for field in ("weight_key", "bias_key"):
            key = check.str(f"layer {i} {field}", layer[field])
            if key not in arrays or key in keys:
                raise check.fail(f"layer {i} {field} {key!r} names no array, or a used one")
            keys.add(key)
    if keys != set(arrays):
        raise check.fail(f"arrays {sorted(set(arrays) - keys)} belong to no layer")


def _op_output(check: _Checker, j: int, op: Any, tensors: list, layers: list, rows, arrays):
    """The :class:`Tensor` op ``j`` makes, its fields and inputs checked (a layer's row is
    appended to ``rows``)."""
    check.dict(f"op {j}", op)
    kind = op.get("op")
    where = f"op {j} ({kind})"
    if kind not in OPS:
        raise check.fail(f"op {j}: unknown op {_shown(kind)}")
    fields = set(OP_FIELDS[kind])
    if not fields <= set(op) or set(op) - fields - {"op", "inputs", "module"}:
        unknown = sorted(set(op) - fields - {"op", "inputs", "module"})
        missing = sorted(fields - set(op))
        raise check.fail(f"{where}: missing fields {missing} or unknown fields {unknown}")
    names = check.list(f"{where}.inputs", op.get("inputs"))
    arity = {"add": 2, "concat": None}.get(kind, 1)
    if (arity is not None and len(names) != arity) or not names:
        raise check.fail(f"{where} takes {arity or 'one or more'} inputs, got {len(names)}")
    ins = [tensors[check.int(f"{where}.inputs[{i}]", t, 0, j)] for i, t in enumerate(names)]
    if kind in LAYER_OPS:
        index = check.int(f"{where}.layer", op.get("layer"), 0, len(layers) - 1)
        if index != len(rows):
            raise check.fail(f"op {j} visits layer {index}; layers go once each, in order")
        layer = layers[index]
        if layer["kind"] != kind:
            raise check.fail(f"op {j} runs layer {index}, a {layer['kind']}, as {kind}")
        out, row, e_b = _layer(check, index, layer, ins[0].shape, arrays)
        if abs(ins[0].exponent - layer["input_exponent"]) > MAX_BIAS_SHIFT:
            raise check.fail(
                f"op {j}: requantizing from exponent {ins[0].exponent} to "
                f"{layer['input_exponent']} shifts by more than {MAX_BIAS_SHIFT} bits"
            )
        rows.append(row)
        return Tensor(out, e_b)
    if kind in ("add", "concat"):
        return _joined(check, where, op, ins)
    return _unary_output(check, where, op, ins[0])


def _unary_output(check: _Checker, where: str, op: dict, x: Tensor) -> Tensor:
    """The output of a one-input op other than a layer, its fields checked."""
    kind = op["op"]
    if kind == "relu":
        return x
    if kind == "clip":
        _clip_bound(check, f"{where}.min", op.get("min"), x)
        _clip_bound(check, f"{where}.max", op.get("max"), x)
        return x
    if kind in ("maxpool", "sumpool"):
        shape = _pool(check, where, op, x.shape, needs_real=kind == "maxpool")
        return Tensor(shape, x.exponent, x.divisor)
    if kind == "sum":
        axes = check.ints(f"{where}.axes", op.get("axes"), lo=0)
        if len(set(axes)) != len(axes) or max(axes) >= len(x.shape):
            raise check.fail(f"{where}.axes {axes} do not fit the input {list(x.shape)}")
        kept = tuple(n for i, n in enumerate(x.shape) if i not in axes)
        return Tensor(kept, x.exponent, x.divisor)
    if kind == "div":
        by = check.int(f"{where}.by", op.get("by"), 1, 1 << 24)
        divisor = check.int(f"{where} divisor", x.divisor * by, 1, 1 << 31)
        return Tensor(x.shape, x.exponent, divisor)
    out = tuple(check.ints(f"{where}.shape", op.get("shape")))  # reshape
    if math.prod(out) != math.prod(x.shape):
        raise check.fail(f"{where}: cannot reshape {list(x.shape)} to {list(out)}")
    return Tensor(out, x.exponent, x.divisor)


def _joined(check: _Checker, where: str, op: dict, ins: list[Tensor]) -> Tensor:
    """The output of an add or a concat: its inputs aligned to the smallest exponent."""
    if len({t.divisor for t in ins}) != 1:
        raise check.fail(f"{where}: its inputs have different divisors")
    exponent = min(t.exponent for t in ins)
    if max(t.exponent for t in ins) - exponent > MAX_BIAS_SHIFT:
        raise check.fail(f"{where}: input exponents more than {MAX_BIAS_SHIFT} apart")
    x = ins[0]
    if op["op"] == "add":
        if ins[0].shape != ins[1].shape:
            raise check.fail(f"{where}: shapes {[list(t.shape) for t in ins]} differ")
        return Tensor(x.shape, exponent, x.divisor)
    axis = check.int(f"{where}.axis", op.get("axis"), 0, len(x.shape) - 1)
    rest = {t.shape[:axis] + t.shape[axis + 1 :] for t in ins}
    if len(rest) != 1 or any(len(t.shape) != len(x.shape) for t in ins):
        raise check.fail(f"{where}: shapes {[list(t.shape) for t in ins]} do not concatenate")
    out = x.shape[:axis] + (sum(t.shape[axis] for t in ins),) + x.shape[axis + 1 :]
    return Tensor(out, exponent, x.divisor)


def _check_output(check: _Checker, output: Any, tensors: list[Tensor]) -> None:
    """``output`` names the last tensor, with the graph's exponent and divisor."""
    output = check.dict("output", output)
    index = check.int("output.tensor", output.get("tensor"), 1, len(tensors) - 1)
    if index != len(tensors) - 1:
        raise check.fail(f"output.tensor {index} is not the last op's ({len(tensors) - 1})")
    logits = tensors[index]
    stated = (
        check.int("output.exponent", output.get("exponent")),
        check.int("output.divisor", output.get("divisor")),
    )
    if stated != (logits.exponent, logits.divisor):
        raise check.fail(
            f"output exponent / divisor {output.get('exponent')!r} / {output.get('divisor')!r} "
            f"disagree with the graph's {logits.exponent} / {logits.divisor}"
        )


def _check_layer_claims(check: _Checker, header: dict, arrays) -> None:
    """The layer fields no computation reads: each a supported value that agrees with the
    file (``kernel_layout``, ``*_dtype``, ``bias_rounding`` and ``bias_scheme``)."""
    scheme = header.get("bias_scheme")
    for i, layer in enumerate(header["layers"]):
        where = f"layer {i} ({layer['name']})"
        layout = layer.get("kernel_layout", KERNEL_LAYOUTS[layer["kind"]])
        if layout != KERNEL_LAYOUTS[layer["kind"]]:
            raise check.fail(f"{where}.kernel_layout {layout!r} is not a {layer['kind']}'s")
        for field, key in (("weight_dtype", "weight_key"), ("bias_dtype", "bias_key")):
            stored = arrays[layer[key]].dtype.name
            if layer.get(field, stored) != stored:
                raise check.fail(f"{where}.{field} {layer[field]!r}, the array is {stored}")
        rounding = layer.get("bias_rounding")
        if scheme is not None and rounding not in (None, BIAS_ROUNDING[scheme]):
            raise check.fail(f"{where}.bias_rounding {rounding!r} with bias_scheme {scheme!r}")
        accumulators = np.atleast_1d(layer["accumulator_exponent"])
        if scheme == "accumulator" and layer["bias_exponent"] != int(accumulators.min()):
            raise check.fail(f"{where}: bias_exponent is not the accumulator's (bias_scheme)")
        check.int(f"{where}.output_bits", layer["output_bits"], 2, 64)
        error = layer.get("bias_rounding_max_abs_error", 0)
        if error < 0:
            raise check.fail(f"{where}.bias_rounding_max_abs_error {error} is negative")


def _recount(facts: Validated) -> dict[str, int]:
    return {
        "bops": sum(row.bops for row in facts.rows),
        "weight_memory_bits": facts.weight_memory_bits,
        "activation_bits": facts.activation_bits,
    }


def stated_limits(certificate: dict) -> dict[str, float]:
    """``{cost name: limit}`` of a certificate: its ``limits``, else ``{"bops": budget_bops}``
    (empty without a budget)."""
    if certificate.get("limits") is not None:
        return {name: entry["limit"] for name, entry in certificate["limits"].items()}
    budget = certificate.get("budget_bops")
    return {} if budget is None else {"bops": budget}


def _check_certificate(check: _Checker, header: dict, facts: Validated) -> None:
    """The certificate's verdicts recomputed from the recount: every limit positive,
    ``budget_bops`` the BOP limit, each ``within`` and ``within_budget`` what the recounted
    costs give against the limits. (Its costs are compared by :func:`count_bops`.)"""
    certificate = header.get("certificate")
    if certificate is None:
        return
    limits = stated_limits(certificate)
    for name, limit in limits.items():
        if not limit > 0:
            raise check.fail(f"certificate limit {name} = {limit!r} is not a positive number")
    budget = certificate.get("budget_bops")
    if certificate.get("limits") is not None and budget != limits.get("bops"):
        raise check.fail(
            f"certificate.budget_bops {budget!r} is not its BOP limit {limits.get('bops')!r}"
        )
    recount = _recount(facts)
    verdicts = {name: recount[name] <= limit for name, limit in limits.items()}
    for name, entry in (certificate.get("limits") or {}).items():
        if entry.get("within", verdicts[name]) != verdicts[name]:
            raise check.fail(
                f"certificate.limits.{name}.within is {entry['within']}, the recount "
                f"{recount[name]:,} against {limits[name]!r} gives {verdicts[name]}"
            )
    verdict = bool(limits) and all(verdicts.values())
    if certificate.get("within_budget", verdict) != verdict:
        raise check.fail(
            f"certificate.within_budget is {certificate['within_budget']}, the recount "
            f"{recount} against the limits {limits} gives {verdict}"
        )


def _check_totals(check: _Checker, header: dict, facts: Validated) -> None:
    """The header's ``macs`` and ``bops``, when stated, equal the recount."""
    totals = {"macs": sum(row.macs for row in facts.rows), "bops": _recount(facts)["bops"]}
    for name, total in totals.items():
        if header.get(name, total) != total:
            unit = "BOPs" if name == "bops" else "MACs"
            raise check.fail(f"header states {header[name]} {unit}, its layers give {total}")
