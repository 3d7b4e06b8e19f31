"""The export of a pruned network: an ordinary, smaller network of its live channels only.

With pruning (:class:`cgmq_jax.nn.QuantOptions` ``prune=True``, docs/method.md section 12)
a removed output channel has all codes 0 and its bias masked to 0, so its output is
exactly 0 everywhere, and so is every input channel of the next layers that only removed
channels feed (:mod:`cgmq_jax.channels`). Dropping those channels changes no live value, so
:func:`cgmq_jax.lowering.build` writes each layer with only its live output channels
(kernel's last axis, bias, per-channel weight quantizers) and its live input channels
(kernel's input axis; after a flatten, the live flattened features), as
:func:`cgmq_jax.cost.live_channels` gives them. The reader, the integer engine and the C
emitter see an ordinary network whose recount from shapes is the pruned cost
(:func:`cgmq_jax.cost.exact_costs`): nothing of :mod:`cgmq_jax.export` changes.

:func:`plan` follows the stored channels of every tensor through the export's op graph
(:func:`cgmq_jax.opgraph.ops`): a layer's output stores its live channels, ReLU / clip /
division / pooling over positions keep their input's, a flatten keeps the live features,
a concatenation along channels joins them. An op that would need a channel an operand
does not store (a residual add of differently pruned tensors, a pooling window over
channels, a clip that maps 0 elsewhere) is refused with a ``ValueError`` naming it: the
file could only hold it with removed channels stored as zeros, which the pruned cost does
not count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

#: The keys of a pruned certificate row (:func:`cgmq_jax.cost.layer_table`) that the
#: file's certificate schema does not hold; the file's own shapes state them.
PRUNED_ROW_KEYS = (
    "live_channels",
    "channels",
    "live_inputs",
    "inputs",
    "channel_macs",
    "channel_weights",
)


@dataclasses.dataclass(frozen=True)
class Cut:
    """What one layer keeps: ``live_in`` over its input's last axis, ``live_out`` over its
    output channels (boolean), the compacted shapes (no batch axis), ``weights_kept``:
    the output channels its weight quantizer keeps (a removed channel with kept weights
    is one whose every input is removed: its output is its bias, a constant), and
    ``constants``: the value its quantized input holds at every position of each channel
    that is not live (0 at a removed one; a depthwise channel's bias, through ReLU and this
    layer's input quantizer, where that channel's input is removed), which
    :func:`cgmq_jax.lowering.build` folds into this layer's bias."""

    name: str
    live_in: np.ndarray
    live_out: np.ndarray
    weights_kept: np.ndarray
    input_shape: list[int]
    output_shape: list[int]
    constants: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every layer's :class:`Cut` (in call order) and the op graph with the compacted
    reshape targets."""

    layers: tuple[Cut, ...]
    ops: list


def plan(model: Any, params: Any, traced: Any, ops: list, sample: Any, call_kwargs: dict):
    """The :class:`Plan` of a pruning network's export; ``None`` when no layer prunes.

    Raises:
      ValueError: an op whose operands store different channels (naming the op and its
        module), or a layer input that stores other channels than the cost counts live.
    """
    if not any(getattr(layer.options, "prune", False) for layer in traced.layers):
        return None
    found = _live(model, params, sample, call_kwargs)
    if found is None:
        return None
    followed = _follow(params, traced, ops, found[1])
    if not any(np.any(~cut.live_out & cut.weights_kept) for cut in followed.layers):
        return followed  # no constant channels: every non-live input is exactly 0
    values = constants(model, params, sample, found)
    cuts = tuple(dataclasses.replace(cut, constants=values[cut.name]) for cut in followed.layers)
    return dataclasses.replace(followed, layers=cuts)


def constants(model: Any, params: Any, sample: Any, found) -> dict[str, np.ndarray]:
    """Per layer name, the value its quantized input holds at each channel that is not
    live (0 at the live ones), read off the model itself on a zero input
    (:func:`cgmq_jax.model_check.layer_inputs`: the layers' own quantizers).

    Raises:
      ValueError: a channel counted as not live whose value is not one constant (it
        would not fold into the layer's bias).
    """
    from cgmq_jax import model_check

    specs, live = found
    zeros = np.zeros((1, *sample.shape[1:]), np.float32)
    codes = model_check.layer_inputs(model, params, zeros)
    out = {}
    for spec, (live_in, _) in zip(specs, live, strict=True):
        live_in = np.asarray(live_in, bool).reshape(-1)
        values = np.asarray(codes[spec.name], np.float64).reshape(-1, live_in.size)
        held = values[:, ~live_in]
        if np.any(held != held[:1]):
            c = int(np.flatnonzero(~live_in)[np.argmax(np.any(held != held[:1], axis=0))])
            raise ValueError(
                f"layer {spec.name!r}: its input channel {c} is counted as removed, but its "
                "value is not one constant over positions, so it cannot fold into the "
                "layer's bias"
            )
        fill = np.zeros(live_in.size, np.float64)
        fill[~live_in] = held[0] if len(held) else 0.0
        out[spec.name] = fill
    return out


def _live(model: Any, params: Any, sample: Any, call_kwargs: dict):
    """``(specs, cost.live_channels)`` of a model (linen, or NNX with ``params`` its linen
    tree, :func:`cgmq_jax.nnx.linen_params`); ``None`` when nothing prunes."""
    from cgmq_jax import cost
    from cgmq_jax import nn as qnn

    if qnn.is_nnx_module(model):  # an NNX module holds its own state
        specs = cost.layer_specs(model, sample, **call_kwargs)
    else:
        specs = cost.layer_specs(model, sample, params=params, **call_kwargs)
    live = cost.live_channels(params, specs)
    return None if live is None else (specs, live)


def _weights_kept(params: Any, layer: Any, channels: int) -> np.ndarray:
    """The output channels ``layer``'s weight quantizer keeps (all, if it does not prune)."""
    from cgmq_jax import operands

    if not layer.options.prune:
        return np.ones(channels, bool)
    node = params
    for key in layer.path:
        node = node[key]
    theta = np.asarray(node["weight_quantizer"], np.float32)
    return np.asarray(operands.live_channels(theta), np.float64).reshape(-1) > 0


def clip_keeps_zero(attrs: dict) -> bool:
    """Whether a traced ``clip`` op's range holds 0 (its ``min`` / ``max`` attributes,
    dyadic ``[m, e]`` pairs, either absent): a removed channel's 0 then stays 0 after it.
    The cost (:mod:`cgmq_jax.channels`) and the export decide it here, alike."""
    low, high = attrs.get("min"), attrs.get("max")
    value = lambda bound: bound[0] * 2.0 ** bound[1]  # noqa: E731  ([m, e] dyadic)
    return (low is None or value(low) <= 0.0) and (high is None or value(high) >= 0.0)


def _compact(shape: tuple, stored: np.ndarray | None) -> list[int]:
    """The stored shape of a tensor of full ``shape`` whose last axis keeps ``stored``."""
    return [int(n) for n in shape] if stored is None else [*shape[:-1], int(stored.sum())]


def _every(stored: np.ndarray | None) -> bool:
    return stored is None or bool(np.all(stored))


def _shown(stored: np.ndarray | None) -> str:
    if stored is None or np.all(stored):
        return "all channels"
    kept = np.flatnonzero(stored).tolist()
    text = ", ".join(map(str, kept[:8])) + (", ..." if len(kept) > 8 else "")
    return f"{len(kept)} of {stored.size} channels ({text})"


def _follow(params: Any, traced: Any, ops: list, live: list) -> Plan:
    """Every tensor's full shape and stored channels (``None``: a 0-d tensor, all stored),
    op by op; each layer's :class:`Cut`."""
    (input_shape,) = traced.input_shapes
    full = [tuple(int(n) for n in input_shape[1:])]
    stored: list[np.ndarray | None] = [np.ones(full[0][-1], bool) if full[0] else None]
    cuts: dict[int, Cut] = {}
    new_ops = []
    for j, op in enumerate(ops):
        where = f"op {j} ({op.op}, module {op.path!r})"
        x, s = full[op.inputs[0]], stored[op.inputs[0]]
        if op.layer is not None:
            layer = traced.layers[op.layer]
            live_in, live_out = (np.asarray(a, bool).reshape(-1) for a in live[op.layer])
            if s is None or s.shape != live_in.shape or np.any(s != live_in):
                raise ValueError(
                    f"layer {layer.name!r}: its input stores {_shown(s)} but the cost counts "
                    f"{_shown(live_in)} live, so its file would not recount to the pruned "
                    "cost (an op between the layers keeps channels the cost removes)"
                )
            shape = tuple(int(n) for n in layer.output_shape[1:])
            cuts[op.layer] = Cut(
                name=layer.name,
                live_in=live_in,
                live_out=live_out,
                weights_kept=_weights_kept(params, layer, live_out.size),
                input_shape=_compact(x, s),
                output_shape=_compact(shape, live_out),
            )
            s = live_out
        elif op.op in ("relu", "div") or (op.op == "clip" and clip_keeps_zero(op.attrs)):
            shape = x
        elif op.op == "clip":
            shape = x
            _need_all(s, where, "maps 0 to a nonzero value, so a removed channel is not 0 after it")
        elif op.op in ("maxpool", "sumpool"):
            shape, s = _pooled(x, s, op.attrs, where)
        elif op.op == "sum":
            axes = [int(a) for a in op.attrs["axes"]]
            shape = tuple(n for i, n in enumerate(x) if i not in axes)
            if len(x) - 1 in axes:  # a sum over the channels: the removed ones add 0
                s = np.ones(shape[-1], bool) if shape else None
        elif op.op == "add":
            other = stored[op.inputs[1]]
            if not _same(s, other):
                raise ValueError(
                    f"{where}: adds a tensor that stores {_shown(s)} to one that stores "
                    f"{_shown(other)}: a residual add of differently pruned tensors is not "
                    "exportable yet (each side would need the union, with removed channels "
                    "stored as zeros that the pruned cost does not count); prune the layers "
                    "that feed both sides alike, or do not prune them"
                )
            shape = x
        elif op.op == "concat":
            shape, s = _joined(op, full, stored, where)
        elif op.op == "reshape":
            shape = tuple(int(n) for n in op.attrs["shape"])
            s = _reshaped(x, s, shape, where)
            op = dataclasses.replace(op, attrs={**op.attrs, "shape": _compact(shape, s)})
        else:  # pragma: no cover  (opgraph.ops emits only the kinds above)
            raise ValueError(f"{where}: the export of a pruned network cannot follow it")
        full.append(shape)
        stored.append(s)
        new_ops.append(op)
    return Plan(tuple(cuts[i] for i in range(len(traced.layers))), new_ops)


def _need_all(stored: np.ndarray | None, where: str, why: str) -> None:
    if not _every(stored):
        raise ValueError(
            f"{where}: its input stores {_shown(stored)}; it {why}, which the export of a "
            "pruned network cannot store (do not prune the layers that feed it)"
        )


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.all(a == b))


def _pooled(x: tuple, s, attrs: dict, where: str):
    """A pooling's output shape and stored channels: those of its input, unless its window
    spans channels (then every channel must be stored)."""
    window, strides, padding = attrs["window"], attrs["strides"], attrs["padding"]
    shape = tuple(
        (n + lo + hi - w) // st + 1
        for n, w, st, (lo, hi) in zip(x, window, strides, padding, strict=True)
    )
    if (window[-1], strides[-1], tuple(padding[-1])) != (1, 1, (0, 0)):
        _need_all(s, where, "pools across channels")
        s = np.ones(shape[-1], bool)
    return shape, s


def _joined(op, full: list, stored: list, where: str):
    """A concatenation's output shape and stored channels."""
    axis = int(op.attrs["axis"])
    shapes = [full[i] for i in op.inputs]
    parts = [stored[i] for i in op.inputs]
    shape = (*shapes[0][:axis], sum(t[axis] for t in shapes), *shapes[0][axis + 1 :])
    if axis == len(shape) - 1:
        return shape, np.concatenate(parts)
    if not all(_same(parts[0], p) for p in parts[1:]):
        raise ValueError(
            f"{where}: concatenates tensors that store different channels "
            f"({'; '.join(map(_shown, parts))}) along axis {axis}: not exportable (prune "
            "the layers that feed it alike, or do not prune them)"
        )
    return shape, parts[0]


def _reshaped(x: tuple, s, shape: tuple, where: str):
    """The stored channels after a reshape: the stored elements, reshaped, must again be
    every position of some channels (a flatten keeps the live features)."""
    if _every(s):
        return np.ones(shape[-1], bool) if shape else None
    kept = np.broadcast_to(s, x).reshape(shape)
    rows = kept.reshape(-1, shape[-1]) if shape else kept.reshape(1, 1)
    if not np.all(rows == rows[:1]):
        raise ValueError(
            f"{where}: reshapes {list(x)} storing {_shown(s)} to {list(shape)}, which mixes "
            "removed and live channels within its last axis: not exportable"
        )
    return rows[0].copy()


def cut_layer(facts: Any, cut: Cut) -> Any:
    """A layer's facts (:class:`cgmq_jax.lowering._LayerFacts`, its weight quantizers
    already of the live channels only) with only its live channels: kernel, bias, shapes,
    a grouped convolution's group count.

    Raises:
      ValueError: an ungrouped layer's removed output channel with a nonzero bias (its
        weights are kept but all its inputs are removed: its output is its bias, not 0;
        a depthwise channel's is folded into the next layer's bias instead,
        :func:`constants`), or a grouped convolution whose groups would keep different
        numbers of channels.
    """
    live_in, live_out = cut.live_in, cut.live_out
    groups = int(facts.geometry.get("groups", 1))
    constant = ~live_out & cut.weights_kept & (facts.bias != 0.0)
    if groups == 1 and np.any(constant):
        c = int(np.flatnonzero(constant)[0])
        raise ValueError(
            f"layer {cut.name!r}: output channel {c} is counted as removed (every input of "
            f"its group is removed) but its bias {facts.bias[c]:.6g} makes it a nonzero "
            "constant, which the export of a pruned network cannot drop"
        )
    kernel, geometry = facts.kernel, dict(facts.geometry)
    if groups == 1:
        kernel = kernel[..., live_in, :][..., live_out]
    elif not (np.all(live_in) and np.all(live_out)):
        per_group = kernel.shape[-1] // groups
        if kernel.shape[-2] != 1 or np.any(live_out != np.repeat(live_in, per_group)):
            raise ValueError(
                f"layer {cut.name!r}: a grouped convolution ({groups} groups) whose live "
                "channels do not keep whole groups cannot be stored compacted"
            )
        kernel = kernel[..., live_out]
        geometry["groups"] = int(np.sum(live_in))
    return dataclasses.replace(
        facts,
        kernel=kernel,
        bias=facts.bias[live_out],
        input_shape=list(cut.input_shape),
        output_shape=list(cut.output_shape),
        geometry=geometry,
    )


def certificate(found: dict, layers: tuple[Cut, ...]) -> dict:
    """The trainer's certificate as the file's header holds it: each pruned per-layer row
    (:func:`cgmq_jax.cost.layer_table`) without the keys the file's shapes state
    (:data:`PRUNED_ROW_KEYS`), its per-channel ``weight_bits`` without the 0 of each
    removed channel, so that :func:`cgmq_jax.export.count_bops` compares it entry by entry
    with the file's live channels. An entry that is not 0 is kept (a certificate that
    disagrees with the file still differs from it)."""
    rows = found.get("layers")
    if not isinstance(rows, list) or len(rows) != len(layers):
        return found
    out = []
    for row, cut in zip(rows, layers, strict=True):
        if isinstance(row, dict) and "live_channels" in row:
            row = {k: v for k, v in row.items() if k not in PRUNED_ROW_KEYS}
            bits = row.get("weight_bits")
            if isinstance(bits, list) and len(bits) == cut.live_out.size:
                row["weight_bits"] = [
                    b for b, live in zip(bits, cut.live_out.tolist(), strict=True) if live or b
                ]
        out.append(row)
    return {**found, "layers": out}


def input_channels(model: Any, params: Any, input_shape) -> dict[str, tuple] | None:
    """``{layer name: (live input channels, constants)}`` of a pruning model at one
    example's ``input_shape`` (:func:`constants`; an NNX model: ``params`` its linen tree);
    ``None`` when nothing prunes."""
    import jax
    import jax.numpy as jnp

    from cgmq_jax import graph

    sample = jax.ShapeDtypeStruct((graph.TRACE_BATCH, *input_shape), jnp.float32)
    found = _live(model, params, sample, {})
    if found is None:
        return None
    values = constants(model, params, sample, found)
    specs, live = found
    return {
        spec.name: (np.asarray(pair[0], bool).reshape(-1), values[spec.name])
        for spec, pair in zip(specs, live, strict=True)
    }


class Spread:
    """``spread(name, codes, size, step)``: a layer's input codes from a file, spread over
    every channel of the model's input where the file holds fewer than the model's
    ``size`` (a pruned model's compacted file): 0 at the removed channels, a folded
    constant's code (its value over ``step``) at a depthwise channel whose input is
    removed. The model's live channels are found on first need (:func:`input_channels`;
    ``model_params`` gives the ``(model, params)`` it takes)."""

    def __init__(self, model_params: Any, input_shape):
        self._model_params, self._input_shape = model_params, input_shape
        self._live: dict | None = None

    def __call__(self, name: str, codes: np.ndarray, size: int, step: float) -> np.ndarray:
        if codes.size == size:
            return codes
        if self._live is None:
            self._live = input_channels(*self._model_params(), self._input_shape) or {}
        if name not in self._live:
            return codes
        live_in, values = self._live[name]
        return full_codes(codes, live_in, np.round(values / step).astype(codes.dtype))


def full_codes(codes: np.ndarray, live_in: np.ndarray | None, fill=None) -> np.ndarray:
    """A compacted layer input's codes ``(..., live)`` spread over every channel: ``fill``
    (per channel; 0 by default) at the ones that are not live; as they are if nothing was
    removed."""
    if live_in is None or codes.shape[-1] == live_in.size:
        return codes
    out = np.zeros((*codes.shape[:-1], live_in.size), codes.dtype)
    if fill is not None:
        out[...] = fill
    out[..., live_in] = codes
    return out


__all__ = [
    "Cut",
    "Plan",
    "Spread",
    "certificate",
    "constants",
    "cut_layer",
    "full_codes",
    "input_channels",
    "plan",
]
