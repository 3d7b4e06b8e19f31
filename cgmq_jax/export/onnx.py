"""The certified model as ONNX: a QDQ graph written from the integer file, run by ONNX Runtime.

:func:`to_onnx` turns a ``cgmq-int-npz`` model (:func:`cgmq_jax.export.format.load`) into an
ONNX model whose every quantizer is a ``QuantizeLinear`` -> ``DequantizeLinear`` -> ``Clip``
chain at its own power-of-two scale, clipped to the quantizer's levels; weights are integer
initializers (each layer's codes, in the narrowest ONNX integer type that holds them) with a
``DequantizeLinear`` at their scale (per channel where the layer is), biases ``int32`` at
``2**bias_exponent``. Between the quantizers the graph computes in float32 what the integer
engine computes in integers (``docs/export.md``, "ONNX"). The bit-widths, the certificate
and a SHA-256 of the graph go into ``metadata_props``. :func:`recount_onnx`
(:mod:`cgmq_jax.export.onnx_recount`) recounts MACs, bits and BOPs from an ONNX file alone.
Running the file (:func:`session`, :func:`run_onnx`, :func:`layer_codes`) is
:mod:`cgmq_jax.export.onnx_runtime`'s; those names resolve here too (on first use: that
module imports this one).

The graph keeps the file's channels-last layout: a convolution or pool is wrapped in two
``Transpose`` nodes (ONNX Runtime cancels the pairs between layers). The input is the real
value, float32, ``[N, *input.shape]`` (MNIST: ``pixels / 256``); the output ``logits`` is
the logits' real value.

Opset 25 by default: the first with ``int2`` / ``uint2`` (ONNX Runtime 1.30 runs
``QuantizeLinear`` / ``DequantizeLinear`` of them on CPU), so a 2-bit weight is stored as
``int2``; opsets 21 to 24 are accepted (2-bit codes then stored as 4-bit). Activation codes
are 8- or 16-bit types by default, clipped to their levels: ONNX Runtime 1.30 does not load
4- or 2-bit activation QDQ at its default optimization level (``narrow_activations=True``
writes them anyway). The IR version is 13, the newest ONNX Runtime 1.30 loads.

Numpy and the standard library at import; ``onnx`` and ``onnxruntime`` are imported when
first needed (``pip install -r requirements-onnx.txt``), never JAX.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from cgmq_jax.export.base import LAYER_OPS, ExportError, IntegerModel, bits_for_levels
from cgmq_jax.export.format import load

#: The opset written by default: int2 / uint2 exist from 25 on (ONNX Runtime 1.30 runs them).
DEFAULT_OPSET = 25
#: The oldest opset accepted: int4 / uint4 in QuantizeLinear / DequantizeLinear.
MIN_OPSET = 21
#: The newest opset accepted (the newest ONNX Runtime 1.30 implements).
MAX_OPSET = 25
#: The ONNX IR version written (ONNX Runtime 1.30 loads up to 13).
IR_VERSION = 13
#: What ``metadata_props`` calls the format.
ONNX_FORMAT = "cgmq-onnx-qdq"
ONNX_FORMAT_VERSION = 1
#: The keys of ``metadata_props``.
META_FORMAT = "cgmq.format"
META_LAYERS = "cgmq.layers"
META_CERTIFICATE = "cgmq.certificate"
META_GRAPH_SHA = "cgmq.graph_sha256"
META_SOURCE = "cgmq.source"
META_FLOAT32 = "cgmq.float32_exact"
INSTALL_HINT = "pip install -r requirements-onnx.txt"
#: float32 sums of integers at one scale are exact below this many units.
FLOAT32_EXACT = 1 << 24


class OnnxError(ExportError):
    """A model the ONNX writer cannot express, or an ONNX file the recount refuses (one line)."""


def require(module: str = "onnx") -> Any:
    """Import ``onnx`` or ``onnxruntime``, or raise :class:`OnnxError` naming the fix."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxError(f"{module} is not installed: {INSTALL_HINT}") from None


def code_type(
    bits: int,
    *,
    signed: bool,
    opset: int = DEFAULT_OPSET,
    weight: bool = False,
    narrow: bool = True,
) -> str:
    """The narrowest ONNX integer type (a ``TensorProto`` name) holding ``bits``-bit codes.

    2 (opset >= 25), 4, 8 or 16 bits (``QuantizeLinear``'s types); weights also 32
    (``DequantizeLinear`` reads ``int32``). ``narrow=False``: 8 bits at the least.

    >>> code_type(3, signed=False), code_type(2, signed=True), code_type(2, signed=True, opset=21)
    ('UINT4', 'INT2', 'INT4')
    >>> code_type(3, signed=False, narrow=False)
    'UINT8'
    """
    widths = ((2,) if opset >= 25 else ()) + (4, 8, 16) + ((32,) if weight else ())
    widths = widths if narrow else tuple(w for w in widths if w >= 8)
    for width in widths:
        if bits <= width:
            if width == 32:
                return "INT32"
            return f"{'INT' if signed else 'UINT'}{width}"
    what = "weight" if weight else "activation"
    raise OnnxError(
        f"a {bits}-bit {what} quantizer: ONNX QDQ holds at most {widths[-1]}-bit {what} codes "
        "(export a model with narrower quantizers)"
    )


def graph_sha256(model) -> str:
    """SHA-256 of the graph's deterministic serialization (nodes, initializers, inputs)."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


class _Graph:
    """Nodes and initializers of the graph being written, with unique names."""

    def __init__(self, onnx, opset: int, narrow_activations: bool):
        self.onnx, self.opset, self.narrow_activations = onnx, opset, narrow_activations
        self.helper, self.tp = onnx.helper, onnx.TensorProto
        self.nodes: list = []
        self.initializers: list = []
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}#{self.count}"

    def node(self, op: str, inputs: list[str], stem: str, **attrs) -> str:
        out = self.name(stem)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, name: str, array: np.ndarray, type_name: str | None = None) -> str:
        """An initializer; ``type_name`` (``"INT4"``...) stores integers at that ONNX type."""
        array = np.asarray(array)
        if type_name is not None:  # raw little-endian bytes, 2- and 4-bit codes packed
            import ml_dtypes  # numpy's int2 / int4 (a dependency of onnx)

            narrow = type_name in ("INT2", "UINT2", "INT4", "UINT4")
            array = array.astype(getattr(ml_dtypes if narrow else np, type_name.lower()))
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def f32(self, name: str, value) -> str:
        return self.const(name, np.asarray(value, np.float32))

    def i64(self, name: str, value) -> str:
        return self.const(name, np.asarray(value, np.int64))


def _nchw(rank: int) -> tuple[list[int], list[int]]:
    """Permutations channels-last -> channels-first and back, for ``rank`` spatial axes."""
    return [0, rank + 1, *range(1, rank + 1)], [0, *range(2, rank + 2), 1]


def _dilate(g: _Graph, x: str, shape: list[int], dilation: list[int], stem: str) -> str:
    """Zeros inserted between elements of each spatial axis of channels-first ``x``.

    ``shape`` is ``x``'s shape without the batch axis (``[C, *spatial]``)."""
    shape = list(shape)
    for i, d in enumerate(dilation):
        if d == 1:
            continue
        axis, n = 2 + i, shape[1 + i]
        x = g.node("Unsqueeze", [x, g.i64(g.name(f"{stem}/axis"), [axis + 1])], f"{stem}/dilate")
        pads = [0] * (2 * (len(shape) + 2))
        pads[len(shape) + 2 + axis + 1] = d - 1  # after each element, on the new axis
        x = g.node("Pad", [x, g.i64(g.name(f"{stem}/pads"), pads)], f"{stem}/dilate")
        merged = [0, *shape[: 1 + i], n * d, *shape[2 + i :]]
        x = g.node("Reshape", [x, g.i64(g.name(f"{stem}/shape"), merged)], f"{stem}/dilate")
        starts, ends = (
            g.i64(g.name(f"{stem}/start"), [0]),
            g.i64(g.name(f"{stem}/end"), [(n - 1) * d + 1]),
        )
        x = g.node(
            "Slice", [x, starts, ends, g.i64(g.name(f"{stem}/axes"), [axis])], f"{stem}/dilate"
        )
        shape[1 + i] = (n - 1) * d + 1
    return x


def _quantize_input(g: _Graph, layer: dict, x: str, stem: str) -> str:
    """``QuantizeLinear`` -> ``DequantizeLinear`` -> ``Clip``: the layer's input quantizer.

    The clip follows the pair: ``clip(saturate(round(x / s)))`` is ``clip(round(x / s))``
    (the type's range holds the clip's), and ONNX Runtime 1.30 fails to load a ``Clip``
    that feeds a 4- or 2-bit ``QuantizeLinear`` (its Clip-into-Quantize fusion does not
    know those types)."""
    levels, signed, e = layer["input_levels"], layer["input_signed"], layer["input_exponent"]
    bits = bits_for_levels(levels, signed=signed)
    type_name = code_type(bits, signed=signed, opset=g.opset, narrow=g.narrow_activations)
    scale = 2.0**e
    lo = -levels if signed else 0
    s = g.f32(f"{stem}.input_scale", scale)
    zero = g.const(f"{stem}.input_zero_point", np.zeros((), np.int64), type_name)
    q = g.node("QuantizeLinear", [x, s, zero], f"{stem}/input_q")
    dq = g.node("DequantizeLinear", [q, s, zero], f"{stem}/input_dq")
    bounds = [g.f32(f"{stem}.input_min", lo * scale), g.f32(f"{stem}.input_max", levels * scale)]
    return g.node("Clip", [dq, *bounds], f"{stem}/input_clip")


def _weight(g: _Graph, model: IntegerModel, index: int, stem: str) -> str:
    """The layer's integer codes, in ONNX layout, through ``DequantizeLinear``."""
    layer = model.layers[index]
    kernel = np.asarray(model.weight(index), np.int64)
    levels = np.atleast_1d(layer["weight_levels"])
    bits = bits_for_levels(int(levels.max()), signed=True)
    type_name = code_type(bits, signed=True, opset=g.opset, weight=True)
    if layer["kind"] == "conv":  # (*window, in / groups, out) -> (out, in / groups, *window)
        rank = kernel.ndim - 2
        kernel = kernel.transpose(rank + 1, rank, *range(rank))
    else:  # (in, out) -> (out, in): the left operand of the MatMul (see _dense)
        kernel = kernel.T
    axis = 0
    exponents = np.atleast_1d(layer["weight_exponent"])
    codes = g.const(f"{stem}.weight", kernel, type_name)
    attrs = {}
    if layer["per_channel"]:
        scale = g.f32(f"{stem}.weight_scale", [2.0 ** int(e) for e in exponents])
        zero = g.const(f"{stem}.weight_zero_point", np.zeros(len(exponents), np.int64), type_name)
        attrs["axis"] = axis
    else:
        scale = g.f32(f"{stem}.weight_scale", 2.0 ** int(exponents[0]))
        zero = g.const(f"{stem}.weight_zero_point", np.zeros((), np.int64), type_name)
    return g.node("DequantizeLinear", [codes, scale, zero], f"{stem}/weight_dq", **attrs)


def _bias(g: _Graph, model: IntegerModel, index: int, stem: str) -> str:
    layer = model.layers[index]
    bias = np.asarray(model.bias(index), np.int64)
    if bias.size and (bias.min() < -(1 << 31) or bias.max() >= 1 << 31):
        raise OnnxError(
            f"layer {index} ({layer['name']}): its bias needs more than 32 bits; ONNX's "
            "DequantizeLinear reads int32 at most (re-export with --bias_scheme accumulator)"
        )
    codes = g.const(f"{stem}.bias", bias, "INT32")
    scale = g.f32(f"{stem}.bias_scale", 2.0 ** layer["bias_exponent"])
    zero = g.const(f"{stem}.bias_zero_point", np.zeros((), np.int64), "INT32")
    return g.node("DequantizeLinear", [codes, scale, zero], f"{stem}/bias_dq")


def _dense(g: _Graph, x: str, w: str, shape: list[int], features: int, stem: str) -> str:
    """``x @ kernel`` over the last axis as ``MatMul(kernel.T, x.T)``: one GEMM per batch.

    ``x`` (``[N, *lead, in]``) goes to ``[in, N * L]`` (``L = prod(lead)``), the weight
    ``[out, in]`` is the left operand, the product ``[out, N * L]`` comes back to
    ``[N, *lead, out]``. With the weight on the right, ONNX Runtime 1.30 (extended level
    and up) turns ``DequantizeLinear`` -> ``MatMul`` into ``MatMulNBits`` whose default
    ``accuracy_level`` 4 requantizes the activations to int8 per block of 32: not exact
    (logits off by up to 0.4 in a probe). On the left it stays a float ``MatMul``."""
    x = g.node("Reshape", [x, g.i64(g.name(f"{stem}/rows"), [-1, shape[-1]])], f"{stem}/rows")
    x = g.node("Transpose", [x], f"{stem}/columns", perm=[1, 0])
    y = g.node("MatMul", [w, x], f"{stem}/matmul")
    y = g.node("Transpose", [y], f"{stem}/rows_out", perm=[1, 0])
    out = [-1, *shape[:-1], features]
    return g.node("Reshape", [y, g.i64(g.name(f"{stem}/shape"), out)], f"{stem}/shape")


def _layer(g: _Graph, model: IntegerModel, index: int, x: str, shape: list[int]) -> str:
    """One quantized layer: input QDQ, weight DQ, ``Conv`` / ``MatMul``, ``+`` bias DQ."""
    layer = model.layers[index]
    stem = layer["name"]
    xq = _quantize_input(g, layer, x, stem)
    w = _weight(g, model, index, stem)
    if layer["kind"] == "dense":
        y = _dense(g, xq, w, shape, model.weight(index).shape[-1], stem)
    else:
        rank = len(shape) - 1
        first, back = _nchw(rank)
        for pad in layer["padding"]:
            if min(pad) < 0:
                raise OnnxError(f"layer {index} ({stem}): negative padding {pad} is not ONNX's")
        t = g.node("Transpose", [xq], f"{stem}/to_nchw", perm=first)
        t = _dilate(g, t, [shape[-1], *shape[:-1]], layer["input_dilation"], stem)
        kernel_shape = list(model.weight(index).shape[:-2])
        t = g.node(
            "Conv",
            [t, w],
            f"{stem}/conv",
            kernel_shape=kernel_shape,
            strides=layer["strides"],
            pads=[p[0] for p in layer["padding"]] + [p[1] for p in layer["padding"]],
            dilations=layer["kernel_dilation"],
            group=layer["groups"],
        )
        y = g.node("Transpose", [t], f"{stem}/to_nhwc", perm=back)
    return g.node("Add", [y, _bias(g, model, index, stem)], f"{stem}/bias_add")


def _pool(g: _Graph, op: dict, x: str, shape: list[int], stem: str) -> str:
    """``maxpool`` (``MaxPool``) or ``sumpool`` (a ``Conv`` with a kernel of ones: exact sums).

    A window of 1 over channels (stride 1, no padding) pools the spatial axes channels
    first; otherwise every non-batch axis is a spatial axis of one channel."""
    window, strides, padding = op["window"], op["strides"], op["padding"]
    channels = shape[-1]
    per_channel = window[-1] == 1 and strides[-1] == 1 and list(padding[-1]) == [0, 0]
    if per_channel:
        rank = len(shape) - 1
        first, back = _nchw(rank)
        window, strides, padding = window[:-1], strides[:-1], padding[:-1]
        t = g.node("Transpose", [x], f"{stem}/to_nchw", perm=first)
    else:
        t = g.node("Unsqueeze", [x, g.i64(g.name(f"{stem}/axis"), [1])], f"{stem}/one_channel")
    if len(window) > 3:
        raise OnnxError(f"{stem}: a pool over {len(window)} axes; ONNX Runtime pools 1 to 3")
    pads = [p[0] for p in padding] + [p[1] for p in padding]
    if op["op"] == "maxpool":
        t = g.node("MaxPool", [t], stem, kernel_shape=window, strides=strides, pads=pads)
    else:
        groups = channels if per_channel else 1
        ones = g.f32(g.name(f"{stem}.ones"), np.ones((groups, 1, *window), np.float32))
        t = g.node(
            "Conv", [t, ones], stem, kernel_shape=window, strides=strides, pads=pads, group=groups
        )
    if per_channel:
        return g.node("Transpose", [t], f"{stem}/to_nhwc", perm=back)
    return g.node("Squeeze", [t, g.i64(g.name(f"{stem}/axis"), [1])], f"{stem}/squeeze")


def _op(g: _Graph, model: IntegerModel, j: int, op: dict, names: list[str], shapes) -> str:
    kind, x = op["op"], names[op["inputs"][0]]
    stem = f"op{j}_{kind}"
    shape = list(shapes[op["inputs"][0]])
    if kind in LAYER_OPS:
        return _layer(g, model, op["layer"], x, shape)
    if kind == "relu":
        return g.node("Relu", [x], stem)
    if kind == "clip":
        bounds = ["" if b is None else g.f32(g.name(f"{stem}.bound"), b[0] * 2.0 ** b[1])
                  for b in (op["min"], op["max"])]  # fmt: skip
        return g.node("Clip", [x, *bounds], stem)
    if kind in ("maxpool", "sumpool"):
        return _pool(g, op, x, shape, stem)
    if kind == "sum":
        axes = g.i64(g.name(f"{stem}.axes"), [a + 1 for a in op["axes"]])
        return g.node("ReduceSum", [x, axes], stem, keepdims=0)
    if kind == "div":
        return g.node("Div", [x, g.f32(g.name(f"{stem}.by"), op["by"])], stem)
    if kind == "add":
        return g.node("Add", [x, names[op["inputs"][1]]], stem)
    if kind == "concat":
        return g.node("Concat", [names[i] for i in op["inputs"]], stem, axis=op["axis"] + 1)
    if kind == "reshape":
        return g.node("Reshape", [x, g.i64(g.name(f"{stem}.shape"), [-1, *op["shape"]])], stem)
    raise OnnxError(f"op {j} ({kind!r}): the ONNX writer has no translation for it")


def float32_exact(model: IntegerModel) -> dict[str, bool]:
    """Per layer: whether float32 computes every value up to its output exactly, for every
    input (given as float32 real values, as the ONNX graph takes it).

    A tensor is exact when each of its values, and each partial sum computing it in any
    order, is a multiple of its scale below ``2**24`` of them: a layer whose input is exact
    and whose accumulator (``sum |w| * n_in`` per channel), bias and proven output range
    (:func:`~cgmq_jax.export.ranges.prove_ranges`) stay below; a sum pool, sum or add of
    exact tensors whose proven range stays below; ReLU, clip, max pool, reshape and concat
    of exact tensors; a division by a power of two. Then ONNX Runtime's codes equal the
    engine's, and its logits are the engine's real values. Where False, a float sum may be
    rounded once more than the integer engine's: a code can differ only where a rounded
    value lands on a rounding boundary of the next quantizer (``docs/export.md`` has the
    measured counts).
    """
    ranges = model.facts.ranges

    def small(t: int) -> bool:
        return bool(ranges) and max(-ranges[t][0], ranges[t][1]) < FLOAT32_EXACT

    exact, layers = [True], {}
    for j, op in enumerate(model.ops):
        kind, ok = op["op"], all(exact[i] for i in op["inputs"])
        if kind in LAYER_OPS:
            index = op["layer"]
            layer = model.layers[index]
            kernel = np.abs(np.asarray(model.weight(index), np.int64))
            partial = int(kernel.reshape(-1, kernel.shape[-1]).sum(axis=0).max(initial=0))
            bias = int(np.abs(np.asarray(model.bias(index), np.int64)).max(initial=0))
            largest = max(partial * layer["input_levels"], bias)
            ok = ok and largest < FLOAT32_EXACT and small(j + 1)
            layers[layer["name"]] = ok
        elif kind in ("sumpool", "sum", "add"):
            ok = ok and small(j + 1)
        elif kind == "div":
            ok = ok and op["by"] & (op["by"] - 1) == 0
        exact.append(ok)
    return layers


def _metadata(model: IntegerModel) -> dict[str, str]:
    """``metadata_props``: the layers' quantizers and costs, the certificate, the source."""
    from cgmq_jax.export.format import count_bops

    counted = count_bops(model)
    layers = []
    for row, layer in zip(counted["layers"], model.layers, strict=True):
        layers.append(
            {
                **row,
                "weight_levels": layer["weight_levels"],
                "weight_exponent": layer["weight_exponent"],
                "input_levels": layer["input_levels"],
                "input_exponent": layer["input_exponent"],
                "input_signed": layer["input_signed"],
                "bias_exponent": layer["bias_exponent"],
            }
        )
    header = model.header
    source = {
        "file": model.path.name,
        "payload_sha256": header.get("payload_sha256"),
        "model": header.get("model"),
        "input": header["input"],
        "output": header["output"],
        "macs": counted["macs"],
        "bops": counted["bops"],
        "metadata": header.get("metadata"),
    }
    props = {
        META_FORMAT: f"{ONNX_FORMAT}/{ONNX_FORMAT_VERSION}",
        META_LAYERS: json.dumps(layers),
        META_SOURCE: json.dumps(source),
        META_FLOAT32: json.dumps(float32_exact(model)),
    }
    if header.get("certificate") is not None:
        props[META_CERTIFICATE] = json.dumps(header["certificate"])
    return props


def build(
    model: IntegerModel | str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    narrow_activations: bool = False,
):
    """The ONNX ``ModelProto`` of an integer model (see :func:`to_onnx`), checked."""
    onnx = require("onnx")
    model = model if isinstance(model, IntegerModel) else load(model)
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise OnnxError(
            f"opset {opset}: the writer emits {MIN_OPSET} to {MAX_OPSET} (int4 QDQ needs "
            f"{MIN_OPSET}, int2 25; ONNX Runtime 1.30 runs up to {MAX_OPSET})"
        )
    g = _Graph(onnx, int(opset), bool(narrow_activations))
    shapes = [list(t.shape) for t in model.facts.tensors]
    names = ["input"]
    for j, op in enumerate(model.ops):
        names.append(_op(g, model, j, op, names, shapes))
    out = model.header["output"]["tensor"]
    g.nodes.append(g.helper.make_node("Identity", [names[out]], ["logits"], name="logits"))
    float_type = g.tp.FLOAT
    graph = g.helper.make_graph(
        g.nodes,
        "cgmq",
        [g.helper.make_tensor_value_info("input", float_type, ["N", *shapes[0]])],
        [g.helper.make_tensor_value_info("logits", float_type, ["N", *shapes[out]])],
        g.initializers,
    )
    proto = g.helper.make_model(
        graph,
        opset_imports=[g.helper.make_opsetid("", int(opset))],
        ir_version=IR_VERSION,
        producer_name="cgmq_jax",
        doc_string="cgmq_jax certified model: QDQ, power-of-two scales (docs/export.md)",
    )
    props = _metadata(model)
    props[META_GRAPH_SHA] = graph_sha256(proto)
    g.helper.set_model_props(proto, props)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:  # a writer bug, never a user's
        first = str(error).strip().splitlines()[0]
        raise OnnxError(f"{model.path}: the ONNX checker refuses the graph: {first}") from None
    return proto


def to_onnx(
    model: IntegerModel | str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    narrow_activations: bool = False,
):
    """Write an integer model (a ``cgmq-int-npz`` file or its loaded form) as ONNX.

    Every layer: its input quantizer as ``QuantizeLinear`` -> ``DequantizeLinear`` (scale
    ``2**e``, zero point 0, the narrowest type holding ``[lo, n]``: :func:`code_type`) ->
    ``Clip(lo * 2**e, n * 2**e)``; its weight codes as an integer initializer through
    ``DequantizeLinear`` (per-axis scales for a per-channel layer); ``Conv`` / ``MatMul``
    (the weight its left operand: :func:`_dense`);
    ``+`` its ``int32`` bias through ``DequantizeLinear`` at ``2**bias_exponent``. The other
    ops: ``Relu``, ``Clip``, ``MaxPool``, a sum pool as a ``Conv`` with a kernel of ones,
    ``ReduceSum``, ``Div``, ``Add``, ``Concat``, ``Reshape``. ``onnx.checker`` (full check)
    passes before anything is written.

    Args:
      model: the integer model, or the path of its file (loaded and verified).
      path: where to write the ``.onnx`` file (atomically); ``None``: only return it.
      opset: 21 to 25 (default 25: 2-bit types).

    Returns:
      The ``onnx.ModelProto``.

    Raises:
      OnnxError: one line: a graph ONNX cannot express (a quantizer wider than 16 bits, a
        bias beyond int32, a pool over more than 3 axes), an opset outside 21..25, or
        ``onnx`` not installed.
    """
    proto = build(model, opset=opset, narrow_activations=narrow_activations)
    if path is not None:
        from cgmq_jax import files

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_bytes(path, proto.SerializeToString())
    return proto


#: ONNX Runtime's side, moved to :mod:`cgmq_jax.export.onnx_runtime` and still importable
#: from here (lazily: that module imports this one). Written out rather than through
#: ``cgmq_jax._deprecated.moved``: the export package imports nothing outside itself.
_RUNTIME = ("layer_codes", "run_onnx", "session")


def __getattr__(name: str):
    if name in _RUNTIME:
        value = getattr(importlib.import_module("cgmq_jax.export.onnx_runtime"), name)
        globals()[name] = value  # resolved once; later lookups find it directly
        return value
    raise AttributeError(f"module 'cgmq_jax.export.onnx' has no attribute {name!r}")


def __dir__():
    return sorted((*globals(), *_RUNTIME))


from cgmq_jax.export.onnx_recount import recount_onnx  # noqa: E402  (the public face)

__all__ = [
    "DEFAULT_OPSET",
    "IR_VERSION",
    "MAX_OPSET",
    "MIN_OPSET",
    "OnnxError",
    "build",
    "code_type",
    "float32_exact",
    "graph_sha256",
    "layer_codes",  # noqa: F822  (resolved by __getattr__)
    "recount_onnx",
    "require",
    "run_onnx",  # noqa: F822  (resolved by __getattr__)
    "session",  # noqa: F822  (resolved by __getattr__)
    "to_onnx",
]
