"""The integer engine: reference inference of a ``cgmq-int-npz`` model with numpy integers.

Every tensor is an int64 array ``t`` with an exponent ``e`` and a divisor ``k`` (its real
value is ``t * 2**e / k``); the ops and their exact semantics are in ``docs/export.md``.
Only integer operations run: shifts, integer products and sums, integer division with
round-half-to-even. This module imports numpy and :mod:`cgmq_jax.export.format` only.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cgmq_jax.export.format import (
    INT64_MAX,
    INT64_MIN,
    LAYER_OPS,
    PIXEL_EXPONENT,
    IntegerModel,
    Tensor,
    _fail,
    load,
)

_FLOAT64_EXACT = 1 << 53  # float64 products and sums of integers are exact below this


def round_shift(values: np.ndarray, shift: int) -> np.ndarray:
    """``round_half_even(values * 2**shift)`` for integer ``values``, with integer ops only.

    A non-negative ``shift`` is a left shift (exact). A negative one is an arithmetic right
    shift by ``k = -shift`` plus a rounding increment: up if the dropped remainder exceeds
    half, or equals half and the kept part is odd (ties to even, like ``jnp.round``).

    >>> round_shift(np.array([-6, -5, -3, 3, 5, 6, 7]), -1).tolist()
    [-3, -2, -2, 2, 2, 3, 4]
    """
    values = np.asarray(values, np.int64)
    if shift >= 0:
        return values << np.int64(shift)
    k = np.int64(-shift)
    kept = values >> k  # floor division by 2**k
    remainder = values - (kept << k)  # in [0, 2**k)
    half = np.int64(1) << (k - np.int64(1))
    up = (remainder > half) | ((remainder == half) & ((kept & np.int64(1)) == np.int64(1)))
    return kept + up.astype(np.int64)


def divide_round_half_even(numerator: np.ndarray, denominator: int) -> np.ndarray:
    """``round_half_even(numerator / denominator)`` for integers, ``denominator >= 1``.

    >>> divide_round_half_even(np.array([-5, -3, 3, 5, 7, 4]), 2).tolist()
    [-2, -2, 2, 2, 4, 2]
    """
    numerator = np.asarray(numerator, np.int64)
    b = np.int64(denominator)
    q = numerator // b
    r2 = (numerator - q * b) * np.int64(2)
    up = (r2 > b) | ((r2 == b) & ((q & np.int64(1)) == np.int64(1)))
    return q + up.astype(np.int64)


def requantize(
    values: np.ndarray,
    exponent: int,
    *,
    to_exponent: int,
    levels: int,
    signed: bool,
    divisor: int = 1,
) -> np.ndarray:
    """Integers ``t`` at ``2**exponent / divisor`` -> codes of the quantizer of step ``2**e_to``.

    ``clip(round_half_even(t * 2**(exponent - e_to) / divisor), lo, levels)`` (``e_to`` is
    ``to_exponent``),
    exactly the fake-quant ``clip(round(x / d_q), lo, n)`` of the tensor's real value.
    """
    values = np.asarray(values, np.int64)
    lo = -levels if signed else 0
    shift = exponent - to_exponent
    if divisor == 1:
        if shift > 0:  # exact for any shift: compare with levels >> shift before shifting
            top = levels >> shift
            low = -top if signed else 0
            inside = (values >= low) & (values <= top)
            shifted = np.where(inside, values, 0) << np.int64(shift)
            return np.where(values > top, levels, np.where(values < low, lo, shifted))
        return np.clip(round_shift(values, shift), lo, levels)
    if shift > 0:
        bound = (levels + 1) * divisor
        values = np.clip(values, -bound, bound) << np.int64(shift)
        return np.clip(divide_round_half_even(values, divisor), lo, levels)
    return np.clip(divide_round_half_even(values, divisor << -shift), lo, levels)


def _matmul(a: np.ndarray, b: np.ndarray, bound: int) -> np.ndarray:
    """Exact integer ``a @ b``; through float64 BLAS when every partial sum stays below 2**53."""
    if bound < _FLOAT64_EXACT:
        return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)
    return a.astype(np.int64) @ b.astype(np.int64)


def _dilate(x: np.ndarray, dilation: Sequence[int]) -> np.ndarray:
    """Insert ``d - 1`` zeros between the elements of each spatial axis (input dilation)."""
    if all(d == 1 for d in dilation):
        return x
    shape = [
        x.shape[0],
        *((n - 1) * d + 1 for n, d in zip(x.shape[1:-1], dilation, strict=True)),
        x.shape[-1],
    ]
    out = np.zeros(shape, x.dtype)
    out[(slice(None), *(slice(None, None, d) for d in dilation), slice(None))] = x
    return out


def conv(codes: np.ndarray, kernel: np.ndarray, layer: dict, bound: int) -> np.ndarray:
    """Integer channels-last convolution with ``layer``'s geometry (1 to 3 spatial axes)."""
    rank = kernel.ndim - 2
    strides, rhs, groups = layer["strides"], layer["kernel_dilation"], layer["groups"]
    x = _dilate(codes, layer["input_dilation"])
    x = np.pad(x, [(0, 0), *map(tuple, layer["padding"]), (0, 0)])  # code 0 is the value 0
    window, (cin_g, cout) = kernel.shape[:-2], kernel.shape[-2:]
    out_shape = [
        (x.shape[1 + i] - ((window[i] - 1) * rhs[i] + 1)) // strides[i] + 1 for i in range(rank)
    ]
    n = x.shape[0]
    x = x.reshape(*x.shape[:-1], groups, cin_g)
    w = kernel.reshape(*window, cin_g, groups, cout // groups)
    acc = np.zeros((n, *out_shape, groups, cout // groups), np.int64)
    for offset in itertools.product(*(range(k) for k in window)):
        index = tuple(
            slice(o * d, o * d + (m - 1) * s + 1, s)
            for o, d, m, s in zip(offset, rhs, out_shape, strides, strict=True)
        )
        patch = x[(slice(None), *index)]  # (N, *out, G, cin_g)
        for g in range(groups):
            acc[..., g, :] += _matmul(patch[..., g, :], w[offset][:, g, :], bound)
    return acc.reshape(n, *out_shape, cout)


def _windows(t: np.ndarray, op: dict, fill: int) -> np.ndarray:
    """``t`` padded with ``fill`` and cut into windows: ``(N, *out, *window)``."""
    t = np.pad(t, [(0, 0), *map(tuple, op["padding"])], constant_values=fill)
    axes = tuple(range(1, t.ndim))
    windows = np.lib.stride_tricks.sliding_window_view(t, tuple(op["window"]), axis=axes)
    return windows[(slice(None), *(slice(None, None, s) for s in op["strides"]))]


def _layer(model: IntegerModel, index: int, t: np.ndarray, x: Tensor, precoded: bool):
    """``(output, codes)`` of layer ``index`` on tensor ``t`` (facts ``x``)."""
    layer = model.layers[index]
    if precoded:
        codes = t
    else:
        codes = requantize(
            t,
            x.exponent,
            to_exponent=layer["input_exponent"],
            levels=layer["input_levels"],
            signed=layer["input_signed"],
            divisor=x.divisor,
        )
    kernel = model.weight(index)
    n_w = np.max(np.atleast_1d(layer["weight_levels"]))
    bound = math.prod(kernel.shape[:-1]) * int(n_w) * layer["input_levels"]
    if layer["kind"] == "conv":
        acc = conv(codes, kernel, layer, bound)
    else:
        acc = _matmul(codes, kernel, bound)
    shift = np.asarray(layer["accumulator_exponent"], np.int64) - layer["bias_exponent"]
    out = (acc << shift) + model.bias(index).astype(np.int64)
    return out, codes


def run_integer(
    model: IntegerModel | str | os.PathLike,
    inputs: np.ndarray,
    *,
    input_exponent: int | None = None,
    first_layer_codes: bool = False,
    return_codes: bool = False,
) -> tuple[np.ndarray, int] | tuple[np.ndarray, int, dict[str, np.ndarray]]:
    """Integer-only reference inference of an exported model.

    Args:
      model: the loaded file (or its path).
      inputs: a batch of integers shaped ``(N, *header["input"]["shape"])``: the network
        input at ``2**input_exponent`` scale (e.g. ``uint8`` MNIST pixels, exponent -8), or,
        with ``first_layer_codes``, the first layer's input codes already
        (:func:`input_codes_from_float`).
      input_exponent: the exponent of ``inputs``; default ``header["input"]["exponent"]``.
      first_layer_codes: ``inputs`` are codes of the first layer's input quantizer (the
        first op must then be a layer).
      return_codes: also return every layer's integer input codes, by layer name.

    Returns:
      ``(logits, exponent)``: int64 values of the output tensor and its exponent
      (``logits * 2**exponent / header["output"]["divisor"]`` are the float logits;
      ``argmax`` is the prediction), plus ``{layer name: input codes}`` when
      ``return_codes``.
    """
    model = model if isinstance(model, IntegerModel) else load(model)
    header, facts = model.header, model.facts.tensors
    t = _checked_inputs(model, inputs, first_layer_codes)
    exponent = header["input"]["exponent"] if input_exponent is None else int(input_exponent)
    values = [t.astype(np.int64)]
    exponents = [exponent]
    codes_by_layer: dict[str, np.ndarray] = {}
    for j, op in enumerate(header["ops"]):
        first = op["inputs"][0]
        facts_in = Tensor(facts[first].shape, exponents[first], facts[first].divisor)
        if op["op"] in LAYER_OPS:
            out_exponent = facts[j + 1].exponent
            precoded = first_layer_codes and j == 0
            out, codes = _layer(model, op["layer"], values[first], facts_in, precoded)
            if return_codes:
                codes_by_layer[model.layers[op["layer"]]["name"]] = codes
        else:  # add / concat align their inputs to the smallest exponent
            out_exponent = min(exponents[i] for i in op["inputs"])
            ins = [values[i] for i in op["inputs"]]
            if op["op"] in ("add", "concat"):
                ins = [
                    v << np.int64(exponents[i] - out_exponent)
                    for v, i in zip(ins, op["inputs"], strict=True)
                ]
            out = _op(model, op, ins, facts_in)
        values.append(out)
        exponents.append(out_exponent)
    index = header["output"]["tensor"]
    if return_codes:
        return values[index], exponents[index], codes_by_layer
    return values[index], exponents[index]


def _checked_inputs(model: IntegerModel, inputs: np.ndarray, first_layer_codes: bool):
    """``inputs`` as an integer array of the model's input shape, within the range over
    which the file's integer ranges are proven (``TypeError`` / ``ValueError`` if not)."""
    shape = model.header["input"]["shape"]
    t = np.asarray(inputs)
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"run_integer takes integer inputs, got {t.dtype}")
    if list(t.shape[1:]) != shape:
        raise ValueError(f"inputs shaped {t.shape[1:]}, the model takes {shape}")
    bounded = model.facts.input_range if not first_layer_codes else None
    if bounded is not None and t.size and (t.min() < bounded[0] or t.max() > bounded[1]):
        raise ValueError(
            f"inputs reach [{t.min()}, {t.max()}], outside {list(bounded)}: the range over "
            "which the file's integer ranges are proven (format.INPUT_RANGE)"
        )
    return t


def _op(model: IntegerModel, op: dict, ins: list[np.ndarray], facts_in: Tensor) -> np.ndarray:
    """The output of an op other than a layer; ``ins`` already aligned to its exponent."""
    kind, x = op["op"], ins[0]
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "clip":
        return np.clip(x, *_clip_bounds(op, facts_in))
    if kind == "maxpool":
        return _windows(x, op, np.iinfo(np.int64).min).max(axis=tuple(range(-x.ndim + 1, 0)))
    if kind == "sumpool":
        return _windows(x, op, 0).sum(axis=tuple(range(-x.ndim + 1, 0)))
    if kind == "sum":
        return x.sum(axis=tuple(a + 1 for a in op["axes"]))
    if kind in ("div", "reshape"):
        return x if kind == "div" else x.reshape(x.shape[0], *op["shape"])
    if kind == "add":
        return ins[0] + ins[1]
    if kind == "concat":
        return np.concatenate(ins, axis=op["axis"] + 1)
    raise _fail(model.path, f"unknown op {kind!r}")


def _clip_bounds(op: dict, facts_in: Tensor) -> list[int | None]:
    """A clip's ``[min, max]`` (``None``: unbounded) as integers of its input tensor."""
    bounds = []
    for bound in (op["min"], op["max"]):
        if bound is None:
            bounds.append(None)
        else:
            m, e = bound
            scaled = m * facts_in.divisor
            shift = e - facts_in.exponent
            value = scaled << shift if shift >= 0 else scaled >> -shift
            bounds.append(min(max(value, INT64_MIN), INT64_MAX))  # int64 values
    return bounds


def predict(
    model: IntegerModel | str | os.PathLike,
    inputs: np.ndarray,
    *,
    batch_size: int = 1000,
    **kwargs: Any,
) -> np.ndarray:
    """``argmax`` of :func:`run_integer`'s logits, in batches (int64 class indices)."""
    model = model if isinstance(model, IntegerModel) else load(model)
    out = [
        np.argmax(run_integer(model, inputs[i : i + batch_size], **kwargs)[0], axis=-1)
        for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def input_codes_from_float(model: IntegerModel, images: np.ndarray) -> np.ndarray:
    """The first layer's input codes from float inputs: ``clip(round(x / d_in), lo, n)``.

    This is the one float operation of a float-input deployment (division by a power of two
    is exact, ``np.round`` rounds halves to even like ``jnp.round``). Integer inputs at a
    known exponent need no float step: pass them to :func:`run_integer` directly.
    """
    first = model.layers[0]
    lo = -first["input_levels"] if first["input_signed"] else 0
    scaled = np.asarray(images, np.float64) / 2.0 ** first["input_exponent"]
    return np.clip(np.round(scaled), lo, first["input_levels"]).astype(np.int64)


def pixels_from_unit_float(images: np.ndarray) -> np.ndarray:
    """MNIST float images (``uint8 / 256`` exactly) back to ``uint8`` pixels, checked."""
    scaled = np.asarray(images, np.float64) * 2.0**-PIXEL_EXPONENT
    pixels = np.round(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min(initial=0) < 0 or pixels.max() > 255:
        raise ValueError("images are not exact multiples of 1/256 in [0, 255/256]")
    return pixels.astype(np.uint8)
