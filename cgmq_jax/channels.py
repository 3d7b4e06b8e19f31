"""Which channels a pruned network still computes: sources through the graph, live counts.

With pruning (:class:`cgmq_jax.nn.QuantOptions` ``prune=True``, docs/method.md section 12)
a per-channel weight quantizer at 0 bits removes its output channel: its codes and its bias
are 0, so the channel's output is exactly 0 everywhere. Every op the integer export runs
maps an all-zero channel to an all-zero channel (ReLU, a clip whose range holds 0, max and
sum pooling, sums, divisions, reshapes, concatenation), and a residual add of a removed
channel and a live one is live. So the channels of a layer's input that are exactly 0 are
known from the graph alone, and the next layer's MACs on them vanish too.

:func:`input_sources` follows every element of every activation through the export's op
graph (:func:`cgmq_jax.opgraph.ops`) back to the layer output channels it is computed from
(a set; ``ALWAYS`` for the network input and for anything a constant makes nonzero), and
gives each layer, per channel of its input's last axis, the union over positions.
:func:`liveness` turns the weight quantizers' live channels into each layer's live inputs
and live outputs, in call order, with numpy (the certificate) or jax.numpy (the traced
cost): the two share this one function, and so do the costs over live channels
(:func:`terms`, and :func:`table`, the rows of :func:`cgmq_jax.cost.layer_table`).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from cgmq_jax import compaction
from cgmq_jax import graph as graph_mod
from cgmq_jax.export.format import BIAS_BITS, LayerRow

#: The source token of the network input, and of a channel a constant keeps nonzero.
ALWAYS = -1


class _Sets:
    """Interned frozensets of source tokens: arrays of set ids stand for arrays of sets."""

    def __init__(self):
        self.sets: list[frozenset] = [frozenset(), frozenset({ALWAYS})]
        self.ids: dict[frozenset, int] = {s: i for i, s in enumerate(self.sets)}
        self.unions: dict[tuple[int, int], int] = {}

    EMPTY, ALWAYS_ID = 0, 1

    def intern(self, tokens) -> int:
        key = frozenset(tokens)
        if key not in self.ids:
            self.ids[key] = len(self.sets)
            self.sets.append(key)
        return self.ids[key]

    def union(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Elementwise union of two id arrays (of one shape)."""
        out = np.array(a, copy=True)
        differ = a != b
        if np.any(differ):
            pairs = np.stack([a[differ], b[differ]], axis=-1)
            unique, inverse = np.unique(pairs, axis=0, return_inverse=True)
            ids = []
            for x, y in unique:
                key = (int(x), int(y))
                if key not in self.unions:
                    self.unions[key] = self.intern(self.sets[x] | self.sets[y])
                ids.append(self.unions[key])
            out[differ] = np.asarray(ids)[np.reshape(inverse, -1)]
        return out

    def reduce(self, a: np.ndarray, axes) -> np.ndarray:
        """The union over ``axes``."""
        a = np.moveaxis(a, axes, list(range(len(axes))))
        rest = a.shape[len(axes) :]
        flat = np.reshape(a, (-1, *rest))
        out = flat[0]
        for row in flat[1:]:
            out = self.union(out, row)
        return out


def _pool(sets: _Sets, x: np.ndarray, attrs: dict) -> np.ndarray:
    """The union over each pooling window (padding is empty: it is no channel's value)."""
    pads = [tuple(p) for p in attrs["padding"]]
    padded = np.pad(x, pads, constant_values=_Sets.EMPTY)
    window, strides = attrs["window"], attrs["strides"]
    out_shape = [
        (size - w) // s + 1 for size, w, s in zip(padded.shape, window, strides, strict=True)
    ]
    out = None
    for offset in itertools.product(*(range(w) for w in window)):
        index = tuple(
            slice(o, o + s * (n - 1) + 1, s)
            for o, s, n in zip(offset, strides, out_shape, strict=True)
        )
        part = padded[index]
        out = part if out is None else sets.union(out, part)
    return out


def input_sources(traced: graph_mod.Graph) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Per layer of ``traced.layers``, per channel of its input's last axis, the sorted
    source tokens: ``offset(p) + c`` for output channel ``c`` of layer ``p`` (offsets in
    layer order, :func:`offsets`), or :data:`ALWAYS`.

    Raises:
      graph.UnsupportedOp: an op the integer export does not run (pruning follows channels
        through the export's op graph, so a network it cannot export cannot be pruned).
    """
    ops, _ = graph_mod.ops(traced)
    starts = offsets(traced.layers)
    sets = _Sets()
    (input_shape,) = traced.input_shapes
    tensors = [np.full(input_shape[1:], _Sets.ALWAYS_ID, np.int64)]
    found: dict[int, tuple] = {}
    for op in ops:
        x = tensors[op.inputs[0]]
        if op.layer is not None:
            layer = traced.layers[op.layer]
            per_channel = sets.reduce(x, list(range(x.ndim - 1))) if x.ndim > 1 else x
            found[op.layer] = tuple(tuple(sorted(sets.sets[int(i)])) for i in per_channel)
            features = layer.output_shape[-1]
            ids = np.array([sets.intern({starts[op.layer] + c}) for c in range(features)])
            out = np.broadcast_to(ids, layer.output_shape[1:]).copy()
        elif op.op == "relu" or (op.op == "clip" and compaction.clip_keeps_zero(op.attrs)):
            out = x
        elif op.op == "clip":  # maps 0 to a nonzero constant: nothing is removable
            out = np.full(x.shape, _Sets.ALWAYS_ID, np.int64)
        elif op.op in ("maxpool", "sumpool"):
            out = _pool(sets, x, op.attrs)
        elif op.op == "sum":
            out = sets.reduce(x, op.attrs["axes"])
        elif op.op == "div":
            out = x
        elif op.op == "add":
            out = sets.union(x, tensors[op.inputs[1]])
        elif op.op == "concat":
            out = np.concatenate([tensors[i] for i in op.inputs], axis=op.attrs["axis"])
        elif op.op == "reshape":
            out = np.reshape(x, op.attrs["shape"])
        else:  # pragma: no cover  (opgraph.ops emits only the kinds above)
            raise graph_mod.UnsupportedOp(f"pruning cannot follow channels through {op.op!r}")
        tensors.append(out)
    missing = [layer.name for i, layer in enumerate(traced.layers) if i not in found]
    if missing:
        raise graph_mod.UnsupportedOp(f"layers {missing} do not reach the model's output")
    return tuple(found[i] for i in range(len(traced.layers)))


def offsets(layers) -> tuple[int, ...]:
    """Each layer's first global channel number: its output channels are numbered in layer
    order (a layer's ``output_shape[-1]`` channels each)."""
    sizes = [layer.output_shape[-1] for layer in layers]
    return tuple(int(x) for x in np.cumsum([0, *sizes[:-1]]))


@functools.lru_cache(maxsize=256)
def _index_matrix(sources: tuple, start: int) -> np.ndarray:
    """``(K, S)`` indices into ``[live outputs of the layers before, True, False]`` (of
    length ``start + 2``): the sources of each input channel, padded with the ``False``."""
    width = max(1, max((len(s) for s in sources), default=1))
    matrix = np.full((len(sources), width), start + 1, np.int64)
    for k, tokens in enumerate(sources):
        for j, token in enumerate(tokens):
            matrix[k, j] = start if token == ALWAYS else token
    matrix.flags.writeable = False  # cached: shared by every call
    return matrix


def liveness(specs, weight_live, xp=np):
    """Each layer's ``(live inputs (K,), live outputs (C,), live inputs per output (C,))``.

    ``weight_live``: per layer, a ``(C,)`` boolean array of the channels its weight
    quantizer keeps (``None`` for a layer that does not prune: all kept). An input channel
    is live when any of its sources is (:func:`input_sources`); an output channel when its
    weights are and its feature group has a live input. ``xp`` is ``numpy`` or
    ``jax.numpy`` (traced, inside the cost).
    """
    outs, table = [], []
    for spec, keep in zip(specs, weight_live, strict=True):
        start = sum(int(np.shape(t)[0]) for t in table)
        live = xp.concatenate([*table, xp.asarray([True, False])])
        live_in = xp.any(live[_index_matrix(spec.input_sources, start)], axis=1)
        groups = spec.groups
        per_group = xp.sum(xp.reshape(live_in.astype(xp.int32), (groups, -1)), axis=1)
        per_output = xp.repeat(per_group, spec.channels_out // groups)
        live_out = per_output > 0
        if keep is not None:
            live_out = live_out & keep
        table.append(live_out)
        outs.append((live_in, live_out, per_output))
    return outs


#: Ops a constant channel passes through as a constant channel (one value everywhere).
_ELEMENTWISE = ("relu", "clip", "div")


def constant_folds(traced: graph_mod.Graph) -> dict[int, str | None]:
    """Per layer of ``traced.layers``: ``None`` when a constant output channel of it folds
    exactly into the layers that read it, else why not.

    A depthwise channel whose input is removed outputs its bias at every position, a
    constant (docs/method.md section 12). It folds into the next layer's bias exactly
    when it reaches that layer through elementwise ops only (ReLU, clip, division: still
    one value per channel) and that layer reads each input channel at every kernel tap:
    a dense layer, or an ungrouped convolution without padding or input dilation (a
    1x1 pointwise one). Zero padding would read the constant as 0 at the borders.
    """
    from cgmq_jax.lowering import _conv_geometry

    ops, _ = graph_mod.ops(traced)
    users: dict[int, list[int]] = {}
    for j, op in enumerate(ops):
        for tensor in op.inputs:
            users.setdefault(tensor, []).append(j)
    out: dict[int, str | None] = {}
    for start, op in enumerate(ops):
        if op.layer is None:
            continue
        why, frontier = None, [start + 1]
        while frontier and why is None:
            tensor = frontier.pop()
            if not users.get(tensor):
                why = "it reaches the model's output"
            for j in users.get(tensor, []):
                user = ops[j]
                if user.layer is not None:
                    layer = traced.layers[user.layer]
                    if layer.kind == "conv":
                        geometry = _conv_geometry(layer)
                        pads = any(any(p) for p in geometry["padding"])
                        dilated = any(d != 1 for d in geometry["input_dilation"])
                        if geometry["groups"] != 1 or pads or dilated:
                            why = (
                                f"layer {layer.name!r} reads it with zero padding, input "
                                "dilation or groups, so a constant does not fold into its bias"
                            )
                elif user.op in _ELEMENTWISE:
                    frontier.append(j + 1)
                else:
                    why = f"it reaches a {user.op!r} op before the next layer"
        out[op.layer] = why
    return out


def check_groups(spec, fold: str | None = None) -> None:
    """Refuse a grouped convolution fed by channels a pruning layer may remove, unless it
    is depthwise (one input channel per group) and its constant channels fold (``fold``:
    :func:`constant_folds`' answer for it). A depthwise channel whose input is removed
    outputs its bias, a constant that the next layer's bias absorbs; a group of several
    inputs that kept some would hold a different number than the others.
    """
    if spec.groups == 1 or all(s == (ALWAYS,) for s in spec.input_sources):
        return
    depthwise = len(spec.input_sources) == spec.groups
    if depthwise and fold is None:
        return
    why = (
        f"a depthwise channel whose input is removed outputs its bias, and {fold}"
        if depthwise
        else "a group that kept some of its inputs would hold a different number than the others"
    )
    raise ValueError(
        f"layer {spec.name!r} is a grouped convolution ({spec.groups} groups) fed by "
        f"channels that pruning may remove: {why}; do not prune the layers that feed it "
        "(pruning before a depthwise convolution needs its output to reach a dense or "
        "unpadded ungrouped convolution through ReLU / clip only, e.g. a 1x1 pointwise one)"
    )


def pair_sizes(spec) -> tuple[int, int, int]:
    """``(MACs, kernel elements)`` per (output channel, input channel) pair of a layer,
    and its input positions (input elements per input channel)."""
    inputs = len(spec.input_sources)
    pairs = spec.channels_out * inputs // spec.groups
    return spec.macs // pairs, spec.weights // pairs, spec.input_elements // max(inputs, 1)


# --------------------------------------------------------------------------- the costs


def terms(bits, specs, xp=np):
    """Per layer of a pruning network, ``(bops, weight memory, activation bits, facts)``
    from its ``(weight bits, input bits)``: numpy integers (exact) or traced floats.

    Only live channels count (docs/method.md section 12): an output channel's MACs are
    ``pair_macs * (its live inputs)``, its kernel ``pair_weights * (its live inputs)``
    elements; a removed output channel stores no bias; the input holds its live channels.
    """
    weight_live = [
        xp.asarray(w) > 0 if spec.prune else None for spec, (w, _) in zip(specs, bits, strict=True)
    ]
    live = liveness(specs, weight_live, xp)
    out = []
    for spec, (w, b_in), (live_in, live_out, per_output) in zip(specs, bits, live, strict=True):
        pair_macs, pair_weights, positions = pair_sizes(spec)
        dtype = np.int64 if xp is np else jnp.float32  # exact integers, or the traced cost
        # Live inputs of each output channel (0 for a removed one): a constant, no gradient.
        inputs = (per_output * live_out.astype(per_output.dtype)).astype(dtype)
        if xp is not np:
            inputs = jax.lax.stop_gradient(inputs)
        w_eff = xp.broadcast_to(xp.asarray(w).astype(dtype), (spec.channels_out,)) * inputs
        bops_l = pair_macs * xp.sum(w_eff) * b_in
        memory = pair_weights * xp.sum(w_eff) + xp.sum(live_out.astype(dtype)) * BIAS_BITS
        activation = positions * xp.sum(live_in.astype(dtype)) * b_in
        out.append((bops_l, memory, activation, (live_in, live_out, per_output)))
    return out


def table(bits, specs) -> list[dict]:
    """:func:`cgmq_jax.cost.layer_table` of a pruning network: rows over live channels only,
    with each
    layer's live output channels and live inputs (``live_channels`` of ``channels``,
    ``live_inputs`` of ``inputs``); a removed channel's entry in ``weight_bits`` is 0."""
    bits = [(np.asarray(w, np.int64), int(np.asarray(b))) for w, b in bits]
    rows = []
    for spec, (w, b_in), (_, _, _, facts) in zip(specs, bits, terms(bits, specs), strict=True):
        live_in, live_out, per_output = facts
        pair_macs, pair_weights, positions = pair_sizes(spec)
        kept = int(live_out.sum())
        # Live inputs per kept output channel (one number: check_groups refuses the rest;
        # a depthwise channel has one).
        each = int(per_output[live_out].max()) if kept else 0
        per_channel = w.ndim > 0
        row = LayerRow(
            layer=spec.name,
            macs=pair_macs * each * kept,
            weight_bits=tuple(int(x) for x in w * live_out) if per_channel else int(w),
            input_bits=b_in,
            weights=pair_weights * each * kept,
            biases=kept,
            bias_bits=BIAS_BITS,
            input_elements=positions * int(live_in.sum()),
            channel_macs=pair_macs * each if per_channel else None,
            channel_weights=pair_weights * each if per_channel else None,
        )
        row = {
            **row.as_dict(),
            "weight_memory_bits": row.weight_memory_bits,
            "activation_bits": row.activation_bits,
            "live_channels": kept,
            "channels": spec.channels_out,
            "live_inputs": int(live_in.sum()),
            "inputs": len(spec.input_sources),
            "channel_macs": pair_macs * each,
            "channel_weights": pair_weights * each,
        }
        if not spec.quantized:
            row["float"] = True
        rows.append(row)
    return rows


__all__ = [
    "ALWAYS",
    "check_groups",
    "constant_folds",
    "input_sources",
    "liveness",
    "offsets",
    "pair_sizes",
    "table",
    "terms",
]
