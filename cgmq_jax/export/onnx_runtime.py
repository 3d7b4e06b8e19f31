"""ONNX Runtime on an exported ONNX model: a CPU session, its logits, every layer's input codes.

:func:`session` opens an ONNX Runtime CPU ``InferenceSession`` (of a path or a
``ModelProto``) at a chosen graph optimization level; :func:`run_onnx` computes the float32
logits in batches; :func:`layer_codes` reads every layer's input codes off a copy of the
graph whose layers' clipped inputs are extra outputs, to be compared with the integer
engine's (:func:`cgmq_jax.export.engine.run_integer`).

Kept apart from :mod:`cgmq_jax.export.onnx` (the writer), which re-exports these names,
resolved on first use (this module imports that one's :func:`~cgmq_jax.export.onnx.require`).
Numpy and the standard library at import; ``onnxruntime`` (and ``onnx``) are imported when
first needed (``pip install -r requirements-onnx.txt``), never JAX.
"""

from __future__ import annotations

import os

import numpy as np

from cgmq_jax.export.onnx import require


def session(model, *, threads: int | None = None, optimization: str = "all"):
    """An ONNX Runtime CPU ``InferenceSession`` of an ONNX model (a path or a ``ModelProto``).

    ``optimization``: ``"all"`` (ONNX Runtime's default), ``"extended"``, ``"basic"`` or
    ``"none"``."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    options.graph_optimization_level = levels[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(str(source) if isinstance(source, os.PathLike) else source,
                                options, providers=["CPUExecutionProvider"])  # fmt: skip


def run_onnx(model, inputs: np.ndarray, *, batch_size: int = 1000, **kwargs) -> np.ndarray:
    """float32 logits of ONNX Runtime on ``inputs`` (real values, ``[N, *input shape]``).

    ``model``: an ``.onnx`` path, a ``ModelProto`` or an ``InferenceSession``; ``kwargs``
    go to :func:`session`."""
    ort = require("onnxruntime")
    sess = model if isinstance(model, ort.InferenceSession) else session(model, **kwargs)
    x = np.asarray(inputs, np.float32)
    out = [sess.run(["logits"], {"input": x[i : i + batch_size]})[0]
           for i in range(0, len(x), batch_size)]  # fmt: skip
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def layer_codes(model, inputs: np.ndarray, **kwargs) -> dict[str, np.ndarray]:
    """Every layer's input codes as ONNX Runtime computes them, by layer name (int64).

    The graph is re-written with each layer's clipped input (after its ``DequantizeLinear``)
    as an extra output (the file is not changed); codes are those values over the scale
    (exact: a power of two).
    """
    onnx = require("onnx")
    proto = onnx.load(str(model)) if isinstance(model, (str, os.PathLike)) else model
    proto = type(proto).FromString(proto.SerializeToString())
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    wanted = {}
    for node in proto.graph.node:
        if node.op_type == "Clip" and node.name.split("#")[0].endswith("/input_clip"):
            scale = float(scales[producer[node.input[0]].input[1]])  # the DequantizeLinear's
            wanted[node.output[0]] = (node.name.split("/input_clip")[0], scale)
    for name in wanted:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = session(proto, **kwargs)
    x = np.asarray(inputs, np.float32)
    values = sess.run(list(wanted), {"input": x})
    return {
        layer: np.rint(v.astype(np.float64) / scale).astype(np.int64)
        for (layer, scale), v in zip(wanted.values(), values, strict=True)
    }
