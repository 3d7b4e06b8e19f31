"""The cost of an NNX model's quantized layers, and the views of it the rest reads.

:func:`layer_specs` finds the quantized layers and their MACs from an abstract forward pass.
Its :class:`cgmq_jax.cost.LayerSpec` paths index the model's ``nnx.State``, so
:func:`cgmq_jax.cost.bops`, :func:`cgmq_jax.cost.exact_bops` and
:func:`cgmq_jax.constraint.constrained_update` work on NNX models unchanged. It refuses
what would be silently free: a plain Flax layer that multiply-accumulates (as
:func:`cgmq_jax.graph.trace` does), a layer run in float, or one not calibrated.
:func:`linen_params` is the model's parameters as the linen layers' tree (what the export
reads), :func:`with_state` the model holding a given ``nnx.State``.

Kept apart from :mod:`cgmq_jax.nnx` (the layers, their forward pass and their calibration),
which re-exports every name here: ``cgmq_jax.nnx.layer_specs`` is this module's
:func:`layer_specs`, resolved on first use (this module imports that one).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cgmq_jax import cost, graph, quantizer
from cgmq_jax.nnx import NOT_CALIBRATED, QUANTIZED_LAYERS, _name, _recording

# Flax NNX layers that multiply-accumulate: left unquantized, their cost would go uncounted.
_MAC_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.ConvTranspose)


def _is_array(leaf) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | jax.ShapeDtypeStruct)


def layer_specs(model: nnx.Module, *args, **kwargs) -> tuple[cost.LayerSpec, ...]:
    """Find every quantized layer of ``model`` and its MACs per example, from shapes alone.

    Runs ``model(*args, **kwargs)`` abstractly (``jax.eval_shape`` over ``nnx.split``: no
    compute, the model is not modified). Array arguments (or ``jax.ShapeDtypeStruct``) are
    traced; anything else (``train=False``) is passed as it is. MACs are counted as by
    :func:`cgmq_jax.cost.layer_specs`: ``prod(output.shape[1:]) * prod(kernel.shape[:-1])``.
    A layer's input signedness is its ``input_signed``, or, where that is ``None``, the
    decision :func:`calibrate` stored. Its ``weights``, ``biases`` and ``input_elements``
    (what the weight and activation memory limits count) come from its kernel's and its
    input's shapes, as for linen, so a memory limit is never free.

    Raises a ``ValueError`` for what would be silently free: a plain Flax layer that
    multiply-accumulates (``nnx.Linear``, ``nnx.Conv``, ...), a quantized layer that runs
    with ``quantize=False``, or one whose signedness is not calibrated yet.

    Returns:
      One :class:`cgmq_jax.cost.LayerSpec` per call of a quantized layer, in call order;
      its ``path`` indexes ``nnx.state(model)`` (and its pure and ``nnx.Param`` states).
    """
    _refuse_plain_layers(model)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten((args, kwargs))
    traced_at = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
    calls: list[tuple[tuple, Any, int, dict]] = []  # (path, layer, MACs, sizes) per call

    def forward(state, traced):
        given = list(leaves)
        for i, value in zip(traced_at, traced, strict=True):
            given[i] = value
        call_args, call_kwargs = jax.tree.unflatten(treedef, given)
        copy = nnx.merge(graphdef, state)
        paths = {id(module): path for path, module in nnx.iter_modules(copy)}
        with _recording(calibrating=False) as recorder:
            copy(*call_args, **call_kwargs)
        for layer, input_shape, output_shape in recorder.calls:
            kernel_shape = tuple(layer.kernel.shape)
            macs = graph.macs(output_shape, kernel_shape)
            sizes = cost.layer_sizes(kernel_shape, input_shape)
            calls.append((paths[id(layer)], layer, macs, sizes))

    shapes = [jax.ShapeDtypeStruct(jnp.shape(leaves[i]), leaves[i].dtype) for i in traced_at]
    jax.eval_shape(forward, state, shapes)
    if not calls:
        raise ValueError(f"{type(model).__name__} called no QuantLinear / QuantConv layer")
    float_layers = sorted(
        {_name(path) for path, layer, _, _ in calls if not layer.quantize and not layer.keep_float}
    )
    if float_layers:
        raise ValueError(
            f"layers {float_layers} run with quantize=False, so they would not be counted: "
            "model.set_attributes(quantize=True) before layer_specs"
        )
    modules = dict(nnx.iter_modules(model))
    specs = tuple(_spec(path, modules[path], macs, sizes) for path, _, macs, sizes in calls)
    if any(spec.prune for spec in specs):  # the channels it keeps follow the op graph
        specs = cost.with_sources(specs, graph.trace(model, *args, **kwargs))
    return specs


def _refuse_plain_layers(model: nnx.Module) -> None:
    """Raise for a plain Flax layer that multiply-accumulates (its cost would be free)."""
    plain = [
        _name(path)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, _MAC_LAYERS) and not isinstance(module, QUANTIZED_LAYERS)
    ]
    if plain:
        raise ValueError(
            f"layers {plain} are plain Flax layers that multiply-accumulate: their cost would "
            "not be counted; build them as cgmq_jax.nnx.QuantLinear / QuantConv, or quantize "
            "the model with cgmq_jax.quantize_model"
        )


def _spec(path: tuple, layer, macs: int, sizes: dict) -> cost.LayerSpec:
    """One call's :class:`cgmq_jax.cost.LayerSpec`, as the linen one is made."""
    if layer.keep_float:  # kept in float by a rule: counted at 32 x 32 bits, as in linen
        return cost.LayerSpec(path, macs, False, quantized=False, **sizes)
    return cost.LayerSpec(
        path,
        macs,
        _calibrated_signedness(layer, path),
        input_bits=layer.input_bits,
        weight_bits=layer.weight_bits,
        channels=layer.kernel.shape[-1] if layer.per_channel else 1,
        prune=layer.prune,
        **sizes,
    )


def with_state(model: nnx.Module, state) -> nnx.Module:
    """``model``, or (given an ``nnx.State`` of it) a copy of it holding ``state``."""
    if state is None:
        return model
    copy = nnx.merge(*nnx.split(model))
    nnx.update(copy, state)
    return copy


def linen_params(model: nnx.Module) -> dict:
    """The model's parameters as the linen layers' tree (what the export reads).

    ``nnx.Param`` values as a plain nested dict with string keys (a list item's index as
    a string, as :func:`reporting_paths` names it), plus, for a layer that decides its input
    signedness from data, the leaf ``input_signed`` (+1.0 / -1.0) that a linen layer stores
    (from its calibrated ``input_signedness``).
    """

    def strings(node):
        return {str(k): strings(v) for k, v in node.items()} if isinstance(node, dict) else node

    params = strings(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for path, layer in nnx.iter_modules(model):
        if isinstance(layer, QUANTIZED_LAYERS) and layer.quantized and layer.input_signed is None:
            node = params
            for key in path:
                node = node[str(key)]
            node[quantizer.INPUT_SIGNED] = jnp.float32(_calibrated_signedness(layer, path) * 2 - 1)
    return params


def _calibrated_signedness(layer, path: tuple) -> bool:
    if layer.input_signed is not None:
        return bool(layer.input_signed)
    stored = float(np.asarray(layer.input_signedness[...]))
    if stored == NOT_CALIBRATED:
        raise ValueError(
            f"layer {_name(path)!r} decides its input signedness from data "
            "(input_signed=None) and is not calibrated: cgmq_jax.nnx.calibrate(model, batch) "
            "before layer_specs"
        )
    return stored > 0
