"""The int64 range proof: every tensor's exact worst-case value range, in Python integers.

:func:`prove_ranges` follows the graph from inputs in :data:`INPUT_RANGE`; a graph any of
whose values (or the intermediates that compute them: accumulators, shifted accumulators,
requantize products) can leave int64 is refused. The integer engine and the C emitter
rely on these ranges.
"""

from __future__ import annotations

import math

import numpy as np

from cgmq_jax.export.base import (
    INPUT_RANGE,
    INT64_MAX,
    INT64_MIN,
    LAYER_OPS,
    Tensor,
    _Checker,
)


def _beyond_int64(lo: int, hi: int) -> bool:
    return lo < INT64_MIN or hi > INT64_MAX


def _requantize_fits(check: _Checker, where: str, layer: dict, x: Tensor) -> None:
    """The engine's requantize intermediates of a divided tensor fit int64 (C's too)."""
    levels, k = layer["input_levels"], x.divisor
    shift = x.exponent - layer["input_exponent"]
    if k == 1:
        return  # clipped before any left shift; a right shift cannot overflow
    needed = ((levels + 1) * k) << shift if shift > 0 else 2 * (k << -shift)
    if needed > INT64_MAX:
        raise check.fail(
            f"{where}: requantizing its input (divisor {k}, shift {shift}) needs integers up "
            f"to {needed:,}, beyond int64 ({INT64_MAX:,})"
        )


def _channel_sums(kernel: np.ndarray, levels: int) -> tuple[list[int], list[int]]:
    """Per output channel: the sums of the positive and of the negative weight codes."""
    flat = kernel.reshape(-1, kernel.shape[-1])
    wide = levels * max(flat.shape[0], 1) >= 1 << 62
    flat = flat.astype(object if wide else np.int64)
    pos = np.where(flat > 0, flat, 0).sum(axis=0)
    neg = np.where(flat < 0, flat, 0).sum(axis=0)
    return [int(v) for v in pos], [int(v) for v in neg]


def _layer_range(check: _Checker, index: int, layer: dict, x: Tensor, arrays) -> tuple[int, int]:
    """The exact worst-case output range of a layer over every input, every step in int64.

    Per channel: the accumulator ``sum(w * code)`` lies in ``[P * lo + N * n, P * n + N * lo]``
    (``P``, ``N`` the sums of its positive and negative weight codes, codes in ``[lo, n]``),
    and so does every partial sum; then ``acc << (e_acc - e_b)`` and ``+ bias``.
    """
    where = f"layer {index} ({layer['name']})"
    _requantize_fits(check, where, layer, x)
    levels = layer["input_levels"]
    lo_code = -levels if layer["input_signed"] else 0
    kernel, bias = arrays[layer["weight_key"]], arrays[layer["bias_key"]]
    cout = kernel.shape[-1]
    n_w = np.atleast_1d(layer["weight_levels"])
    pos, neg = _channel_sums(kernel, int(n_w.max()))
    accumulators = np.broadcast_to(np.asarray(layer["accumulator_exponent"]), (cout,))
    lows, highs = [], []
    for c in range(cout):
        shift = int(accumulators[c]) - layer["bias_exponent"]
        acc = (pos[c] * lo_code + neg[c] * levels, pos[c] * levels + neg[c] * lo_code)
        shifted = (acc[0] << shift, acc[1] << shift)
        for what, (lo, hi) in (("accumulator", acc), (f"accumulator << {shift}", shifted)):
            if _beyond_int64(lo, hi):
                raise check.fail(
                    f"{where}: its {what} may reach {max(-lo, hi):,} in magnitude (channel "
                    f"{c}), beyond int64 ({INT64_MAX:,}), the engine's and C's integer type"
                )
        lows.append(shifted[0] + int(bias[c]))
        highs.append(shifted[1] + int(bias[c]))
    return min(lows, default=0), max(highs, default=0)


def _clip_range(op: dict, x: Tensor, lo: int, hi: int) -> tuple[int, int]:
    bounds = []
    for bound in (op["min"], op["max"]):
        if bound is None:
            bounds.append(None)
            continue
        scaled, shift = bound[0] * x.divisor, bound[1] - x.exponent
        bounds.append(scaled << shift if shift >= 0 else scaled >> -shift)

    def clip(v: int) -> int:  # numpy's clip: min(max(v, low), high)
        v = v if bounds[0] is None else max(v, bounds[0])
        return v if bounds[1] is None else min(v, bounds[1])

    return clip(lo), clip(hi)


def _aligned(check: _Checker, where: str, op: dict, tensors, ranges, out: Tensor) -> list:
    """The ranges of an add's or concat's inputs shifted to the output exponent."""
    shifted = []
    for i in op["inputs"]:
        s = tensors[i].exponent - out.exponent
        lo, hi = ranges[i][0] << s, ranges[i][1] << s
        if _beyond_int64(lo, hi):
            raise check.fail(f"{where}: input {i} shifted by {s} bits is beyond int64")
        shifted.append((lo, hi))
    return shifted


def prove_ranges(
    check: _Checker, header: dict, arrays, tensors
) -> tuple[list[tuple[int, int]], bool]:
    """Every tensor's exact worst-case value range, in Python integers; a graph any of whose
    values (or the intermediates that compute them) can leave int64 is refused.

    The network input is assumed in :data:`INPUT_RANGE`; the ranges hold for every input
    there. Ops as in :mod:`cgmq_jax.export.engine` (and the C emitter, which proves the
    same ranges for its input type).

    Returns the ranges and whether any of them depends on the input's range: only when a
    sum, pool, add or concat reads the input (through reshapes, max-pools, ReLUs, clips and
    divisions); a quantizer saturates any int64 input exactly.
    """
    ranges = [INPUT_RANGE]
    raw = [True]  # the tensor holds the input's values as they are (or a pool's, a clip's)
    matters = False
    for j, op in enumerate(header["ops"]):
        kind, where = op["op"], f"op {j} ({op['op']})"
        first, out = op["inputs"][0], tensors[j + 1]
        lo, hi = ranges[first]
        widening = kind in ("sumpool", "sum", "add", "concat")
        matters = matters or (widening and any(raw[i] for i in op["inputs"]))
        raw.append(kind not in LAYER_OPS and not widening and raw[first])
        if kind in LAYER_OPS:
            lo, hi = _layer_range(check, op["layer"], header["layers"][op["layer"]],
                                  tensors[first], arrays)  # fmt: skip
        elif kind == "relu":
            lo, hi = max(lo, 0), max(hi, 0)
        elif kind == "clip":
            lo, hi = _clip_range(op, tensors[first], lo, hi)
        elif kind == "sumpool":  # padding adds zeros
            n = math.prod(op["window"])
            lo, hi = min(lo, 0) * n, max(hi, 0) * n
        elif kind == "sum":
            n = math.prod(tensors[first].shape[a] for a in op["axes"])
            lo, hi = lo * n, hi * n
        elif kind in ("add", "concat"):
            shifted = _aligned(check, where, op, tensors, ranges, out)
            if kind == "add":
                lo, hi = sum(r[0] for r in shifted), sum(r[1] for r in shifted)
            else:
                lo, hi = min(r[0] for r in shifted), max(r[1] for r in shifted)
        if _beyond_int64(lo, hi):  # maxpool, div and reshape keep their input's range
            raise check.fail(
                f"{where}: its values may reach [{lo:,}, {hi:,}], beyond int64 "
                f"([{INT64_MIN:,}, {INT64_MAX:,}]), the engine's and C's integer type"
            )
        ranges.append((lo, hi))
    return ranges, matters
