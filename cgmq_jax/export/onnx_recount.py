"""Recount MACs, bits and BOPs from an exported ONNX file alone (``onnx`` and numpy; no JAX).

A quantized layer of the graph is a ``Conv`` or ``MatMul`` whose weight (a ``MatMul``'s
left operand, a ``Conv``'s second) is a ``DequantizeLinear`` of an integer initializer and
whose input, through layout-only nodes (``Transpose``, ``Unsqueeze``, ``Pad``,
``Reshape``, ``Slice``), is a ``QuantizeLinear`` -> ``DequantizeLinear`` -> ``Clip`` chain.
From the graph: the input quantizer's levels and sign (its ``Clip`` bounds over its
scale), every scale (a power of two, or the file is refused), the codes' ONNX types (which
must hold the clip range), the MACs (from the shapes ONNX's shape inference gives: a
``Conv``'s output elements x the kernel's inputs per output; a ``MatMul``'s quantized input
elements x its outputs per row). The weight quantizer's levels are the one claim taken from
``metadata_props`` (ONNX has no 2- to 16-bit weight range besides the codes' type),
checked: every stored code lies within them and the type holds them. Everything is
compared with the certificate and the layer table in ``metadata_props`` and the graph's
SHA-256.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from cgmq_jax.export.base import BIAS_BITS, LayerRow, bits_for_levels

#: The op types the writer emits; anything else is refused (the recount could not count it).
KNOWN_OPS = frozenset(
    "Clip QuantizeLinear DequantizeLinear MatMul Conv Transpose Add Relu MaxPool ReduceSum "
    "Div Concat Reshape Unsqueeze Squeeze Pad Slice Identity".split()
)
#: Nodes that move or pad values without changing them: the path from a quantizer to a layer.
LAYOUT_OPS = frozenset(("Transpose", "Unsqueeze", "Pad", "Reshape", "Slice"))
#: Code range of each ONNX integer type.
TYPE_RANGES = {
    "INT2": (-2, 1),
    "UINT2": (0, 3),
    "INT4": (-8, 7),
    "UINT4": (0, 15),
    "INT8": (-128, 127),
    "UINT8": (0, 255),
    "INT16": (-(1 << 15), (1 << 15) - 1),
    "UINT16": (0, (1 << 16) - 1),
    "INT32": (-(1 << 31), (1 << 31) - 1),
}


class _Reader:
    """The graph of an ONNX model, indexed: producers, initializers (as numpy), shapes."""

    def __init__(self, onnx, proto, where: str):
        from cgmq_jax.export.onnx import OnnxError

        self.onnx, self.where, self.error = onnx, where, OnnxError
        self.init = {i.name: i for i in proto.graph.initializer}
        self.producer = {out: node for node in proto.graph.node for out in node.output}
        try:
            inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
        except Exception as error:  # onnx raises several types; all mean a broken graph
            raise self.fail(f"shape inference fails: {str(error).splitlines()[0]}") from None
        values = [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
        self.shapes = {v.name: v.type.tensor_type.shape for v in values}

    def fail(self, problem: str):
        return self.error(f"{self.where}: {problem}")

    def array(self, name: str) -> np.ndarray:
        if name not in self.init:
            raise self.fail(f"{name!r} is not an initializer (a constant the recount can read)")
        return self.onnx.numpy_helper.to_array(self.init[name])

    def type_name(self, name: str) -> str:
        return self.onnx.TensorProto.DataType.Name(self.init[name].data_type)

    def shape(self, name: str) -> list[int]:
        """A value's shape without the batch axis (every other dimension static)."""
        shape = self.shapes.get(name)
        dims = [] if shape is None else list(shape.dim)
        if len(dims) < 1 or any(not d.HasField("dim_value") for d in dims[1:]):
            raise self.fail(f"the shape of {name!r} is not static past the batch axis")
        return [int(d.dim_value) for d in dims[1:]]

    def exponent(self, name: str, what: str) -> list[int]:
        """Each entry of a scale initializer as ``e`` in ``2**e`` (else refused)."""
        scale = np.atleast_1d(self.array(name).astype(np.float64))
        out = []
        for value in scale:
            mantissa, e = math.frexp(float(value))
            if mantissa != 0.5:
                raise self.fail(f"{what}: scale {float(value):.9g} is not a power of two")
            out.append(e - 1)
        return out

    def zero(self, node, what: str) -> str:
        """The type of a QDQ node's zero point, which must be all zeros."""
        if len(node.input) < 3 or not node.input[2]:
            raise self.fail(f"{what}: no zero point (its type states the codes' width)")
        if np.any(self.array(node.input[2]).astype(np.int64) != 0):
            raise self.fail(f"{what}: a zero point other than 0")
        return self.type_name(node.input[2])


def _input_quantizer(r: _Reader, layer_node, what: str) -> dict:
    """The ``Q`` -> ``DQ`` -> ``Clip`` feeding a layer: levels, sign, exponent, elements."""
    name = layer_node.input[0 if layer_node.op_type == "Conv" else 1]
    clip = r.producer.get(name)
    while clip is not None and clip.op_type in LAYOUT_OPS:
        name = clip.input[0]
        clip = r.producer.get(name)
    if clip is None or clip.op_type != "Clip" or len(clip.input) != 3 or not all(clip.input):
        raise r.fail(f"{what}: its input is not a Clip with both bounds (no input quantizer)")
    node = r.producer.get(clip.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        raise r.fail(f"{what}: its input Clip does not read a DequantizeLinear")
    q = r.producer.get(node.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        raise r.fail(f"{what}: its input DequantizeLinear does not read a QuantizeLinear")
    (e,) = r.exponent(q.input[1], f"{what} input")
    if r.exponent(node.input[1], f"{what} input") != [e]:
        raise r.fail(f"{what}: its QuantizeLinear and DequantizeLinear scales differ")
    type_name = r.zero(q, f"{what} input")
    if r.zero(node, f"{what} input") != type_name:
        raise r.fail(f"{what}: its QuantizeLinear and DequantizeLinear types differ")
    lo, hi = (float(r.array(b)) / 2.0**e for b in clip.input[1:])
    levels = int(hi)
    if levels != hi or levels < 1 or lo not in (0.0, -hi):
        raise r.fail(
            f"{what}: input clip [{lo:g}, {hi:g}] steps is not [0, n] or [-n, n], n an integer"
        )
    signed = lo < 0
    low, high = TYPE_RANGES.get(type_name, (0, -1))
    if not (low <= lo and hi <= high):
        raise r.fail(f"{what}: input clip [{lo:g}, {hi:g}] does not fit its type {type_name}")
    shape = r.shape(q.input[0])
    return dict(
        levels=levels,
        signed=signed,
        exponent=e,
        type=type_name,
        elements=math.prod(shape),
        last=shape[-1] if shape else 1,
    )


def _weight(r: _Reader, layer_node, what: str):
    """``(codes, exponents, type)`` of a layer's weight ``DequantizeLinear``, or ``None`` for
    a sum pool (a float ``Conv`` kernel of ones)."""
    name = layer_node.input[1 if layer_node.op_type == "Conv" else 0]
    if name in r.init and layer_node.op_type == "Conv":
        if np.all(r.array(name) == 1) and r.type_name(name) == "FLOAT":
            return None  # a sum pool: not a layer
    node = r.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in r.init:
        raise r.fail(f"{what}: its weight is not a DequantizeLinear of integer codes")
    type_name = r.zero(node, f"{what} weight")
    if r.type_name(node.input[0]) != type_name or type_name not in TYPE_RANGES:
        raise r.fail(f"{what}: weight codes of type {r.type_name(node.input[0])}")
    codes = r.array(node.input[0]).astype(np.int64)
    return codes, r.exponent(node.input[1], f"{what} weight"), type_name


def _layer_row(r: _Reader, node, claim: dict | None, what: str) -> tuple[LayerRow, dict] | None:
    weight = _weight(r, node, what)
    if weight is None:
        return None
    codes, w_exponents, w_type = weight
    x = _input_quantizer(r, node, what)
    # Conv: codes (out, in / groups, *window); MatMul: (out, in), the left operand
    cout, per_output = codes.shape[0], math.prod(codes.shape[1:])
    if node.op_type == "Conv":  # output elements x the inputs of each
        macs = math.prod(r.shape(node.output[0])) * per_output
    else:  # the quantized input's rows (its elements / in) x in x out
        if codes.ndim != 2:
            raise r.fail(f"{what}: a MatMul weight of rank {codes.ndim}")
        if x["last"] != codes.shape[1]:
            raise r.fail(
                f"{what}: its input's last axis {x['last']} is not the weight's {codes.shape[1]}"
            )
        macs = x["elements"] * cout
    if claim is None:
        raise r.fail(f"{what}: metadata_props states no weight levels for it")
    levels = np.atleast_1d(np.asarray(claim["weight_levels"], np.int64))
    per_channel = isinstance(claim["weight_levels"], list)
    if per_channel and len(levels) != cout:
        raise r.fail(f"{what}: {len(levels)} weight levels stated for {cout} channels")
    bound = np.broadcast_to(levels, (cout,))
    moved = np.moveaxis(codes, 0, -1).reshape(-1, cout)
    if moved.size and np.any(np.abs(moved) > bound):
        raise r.fail(f"{what}: a weight code lies outside the stated levels {levels.tolist()}")
    low, high = TYPE_RANGES[w_type]
    if int(levels.max()) > high or -int(levels.max()) < low:
        raise r.fail(f"{what}: weight levels {int(levels.max())} do not fit its type {w_type}")
    bits = tuple(bits_for_levels(int(n), signed=True) for n in levels)
    row = LayerRow(
        layer=claim.get("layer", what),
        macs=macs,
        weight_bits=bits if per_channel else bits[0],
        input_bits=bits_for_levels(x["levels"], signed=x["signed"]),
        kind="conv" if node.op_type == "Conv" else "dense",
        weights=codes.size,
        biases=cout,
        bias_bits=BIAS_BITS,
        input_elements=x["elements"],
    )
    scales = dict(
        input_levels=x["levels"],
        input_exponent=x["exponent"],
        input_signed=x["signed"],
        weight_exponent=w_exponents if per_channel else w_exponents[0],
    )
    return row, scales


def _claims(props: dict, r: _Reader) -> tuple[list[dict], dict | None]:
    from cgmq_jax.export import onnx as writer

    if props.get(writer.META_FORMAT, "").split("/")[0] != writer.ONNX_FORMAT:
        raise r.fail(f"not a {writer.ONNX_FORMAT} model (metadata_props {writer.META_FORMAT})")
    try:
        layers = json.loads(props.get(writer.META_LAYERS, "[]"))
        certificate = json.loads(props[writer.META_CERTIFICATE]) if (
            writer.META_CERTIFICATE in props) else None  # fmt: skip
    except ValueError as error:
        raise r.fail(f"metadata_props is not JSON: {error}") from None
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise r.fail(f"metadata_props {writer.META_LAYERS} is not a list of layers")
    return layers, certificate


def recount_onnx(model: str | os.PathLike | object) -> dict:
    """Recount MACs, bits, BOPs and memory from an exported ONNX model alone.

    Reads the graph (``onnx`` and numpy only: no JAX, no ``cgmq-int-npz`` file): per
    quantized layer (``Conv`` / ``MatMul`` with a ``DequantizeLinear`` integer weight) the
    MACs from the inferred shapes, the input bits from its quantizer's ``Clip`` over its
    scale, the weight bits from the stated levels (checked against every code and the
    type); ``BOPs = MACs x b_w x b_in`` (per channel at each channel's bits).

    Args:
      model: an ``.onnx`` path or a ``ModelProto``.

    Returns:
      ``{"layers": [{layer, kind, macs, weight_bits, input_bits, bops}], "macs", "bops",
      "weight_memory_bits", "activation_bits", "certificate_bops", "budget_bops",
      "matches_certificate", "within_budget", "matches_metadata", "graph_intact", "opset",
      "ok"}``. ``matches_certificate``: the totals and every layer row equal the
      certificate's (``None`` without one); ``matches_metadata``: every layer's scales,
      levels and costs equal the layer table the writer stated; ``graph_intact``: the
      graph's SHA-256 is the one stated; ``ok``: all three.

    Raises:
      OnnxError: one line: not an ONNX file of this writer, an op the recount cannot count,
        a scale that is not a power of two, a clip range its type cannot hold, a weight
        code outside its levels, ``onnx`` not installed.
    """
    from cgmq_jax.export import onnx as writer

    onnx = writer.require("onnx")
    where = str(model) if isinstance(model, (str, os.PathLike)) else "the ONNX model"
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise writer.OnnxError(f"{where}: no such file")
        try:
            model = onnx.load(str(model))
        except Exception as error:  # protobuf's DecodeError and friends
            raise writer.OnnxError(f"{where}: not a readable ONNX file ({error})") from None
    r = _Reader(onnx, model, where)
    unknown = sorted({n.op_type for n in model.graph.node} - KNOWN_OPS)
    if unknown or any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        raise r.fail(f"op {unknown[0] if unknown else 'of another domain'} is not one the "
                     "writer emits; the recount cannot count it")  # fmt: skip
    props = {p.key: p.value for p in model.metadata_props}
    claims, certificate = _claims(props, r)
    rows, scales = [], []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul"):
            continue
        index = len(rows)
        claim = claims[index] if index < len(claims) else None
        what = f"layer {index} ({claim.get('layer') if claim else node.name})"
        found = _layer_row(r, node, claim, what)
        if found is not None:
            rows.append(found[0])
            scales.append(found[1])
    result = _totals(rows)
    result["opset"] = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          default=None)  # fmt: skip
    result["matches_metadata"] = len(claims) == len(rows) and all(
        _same(row.as_dict(), scale, claim)
        for row, scale, claim in zip(rows, scales, claims, strict=False)
    )
    result["graph_intact"] = props.get(writer.META_GRAPH_SHA) == writer.graph_sha256(model)
    result.update(_against(result, certificate))
    result["ok"] = bool(
        result["matches_metadata"]
        and result["graph_intact"]
        and result["matches_certificate"] is not False
    )
    return result


def _same(row: dict, scale: dict, claim: dict) -> bool:
    keys = ("layer", "macs", "weight_bits", "input_bits", "bops")
    return all(row[k] == claim.get(k) for k in keys) and all(
        scale[k] == claim.get(k) for k in scale
    )


def _totals(rows: list[LayerRow]) -> dict:
    return {
        "layers": [row.as_dict() for row in rows],
        "macs": sum(row.macs for row in rows),
        "bops": sum(row.bops for row in rows),
        "weight_memory_bits": sum(row.weight_memory_bits for row in rows),
        "activation_bits": max((row.activation_bits for row in rows), default=0),
    }


def _against(result: dict, certificate: dict | None) -> dict:
    """The recount against the certificate (as :func:`cgmq_jax.export.format.count_bops`)."""
    if certificate is None:
        return dict(certificate_bops=None, budget_bops=None, matches_certificate=None,
                    within_budget=None)  # fmt: skip
    matches = result["bops"] == certificate.get("bops")
    for name, entry in (certificate.get("limits") or {}).items():
        if matches and isinstance(entry, dict) and entry.get("cost") != result.get(name):
            matches = False
    if matches and certificate.get("layers") is not None:
        keys = ("layer", "macs", "weight_bits", "input_bits", "bops")
        ours = [tuple(row[k] for k in keys) for row in result["layers"]]
        matches = ours == [tuple(row.get(k) for k in keys) for row in certificate["layers"]]
    limits = {
        name: entry["limit"]
        for name, entry in (certificate.get("limits") or {}).items()
        if isinstance(entry, dict) and isinstance(entry.get("limit"), (int, float))
    }
    if not limits and isinstance(certificate.get("budget_bops"), (int, float)):
        limits = {"bops": certificate["budget_bops"]}
    within = None if not limits else all(result.get(n, math.inf) <= v for n, v in limits.items())
    return dict(
        certificate_bops=certificate.get("bops"),
        budget_bops=certificate.get("budget_bops"),
        matches_certificate=matches,
        within_budget=within,
    )
