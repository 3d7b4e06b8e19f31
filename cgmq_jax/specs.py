"""Layer specs: the static facts of a quantized network's layers that its cost needs.

:func:`layer_specs` finds every layer that does MACs, from shapes alone (one abstract trace,
:func:`cgmq_jax.graph.trace`), as one :class:`LayerSpec` each: its place in the parameter
tree, its MACs per example, its signedness and pinned bit-widths, its memory sizes
(:func:`layer_sizes`) and, for a pruning network (:func:`is_pruning`), its channel structure
(:func:`with_sources`). :func:`prunable_quantizers` marks the weight quantizers that may
remove channels; :func:`stored_input_signed` reads a data-decided signedness from the
parameters.

Kept apart from :mod:`cgmq_jax.cost` (what the layers cost: bit-widths, the traced and
exact costs, the per-layer table, the minimum costs), which re-exports every name here:
``cgmq_jax.cost.layer_specs`` is this module's :func:`layer_specs`. Nothing here imports
:mod:`cgmq_jax.cost`.
"""

from __future__ import annotations

import dataclasses
import math

import flax
import numpy as np

from cgmq_jax import quantizer


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The static facts of one layer that its cost needs."""

    path: tuple[str | int, ...]  # the layer's place in the parameter tree (int: a list index)
    macs: int  # multiply-accumulates per example
    input_signed: bool
    weight_signed: bool = True
    input_bits: int | None = None  # pinned input bit-width (None: learned)
    weight_bits: int | None = None  # pinned weight bit-width (None: learned)
    quantized: bool = True  # False: a float layer, counted at FLOAT_BITS x FLOAT_BITS
    channels: int = 1  # weight quantizers (output channels when per-channel, else 1)
    weights: int = 0  # kernel elements
    biases: int = 0  # bias elements the export stores (one per output channel)
    input_elements: int = 0  # elements of the layer's (quantized) input, per example
    prune: bool = False  # its weight quantizer may remove output channels (0 bits)
    groups: int = 1  # a convolution's feature groups
    channels_out: int = 0  # output channels (features)
    # With pruning anywhere in the network: per channel of the input's last axis, the
    # output channels it is computed from (cgmq_jax.channels.input_sources); None: every
    # input channel is always live (no pruning), the cost of docs/method.md section 2.
    input_sources: tuple | None = None

    @property
    def name(self) -> str:
        """The layer's ``path`` joined by ``/`` (e.g. ``"Dense_0"`` or ``"blocks/0/conv"``)."""
        return "/".join(map(str, self.path))


def layer_specs(model, *args, params=None, **kwargs) -> tuple[LayerSpec, ...]:
    """Find every layer of ``model`` that does MACs, and its MACs per example, from shapes.

    One name for linen and NNX: a Flax NNX module is passed to
    :func:`cgmq_jax.nnx.layer_specs` (its state is its own, so ``params`` is not taken);
    what follows describes a linen model.

    The layers come from :func:`cgmq_jax.graph.trace` (one abstract trace of the model, the
    same one the export reads), so nothing is computed. Quantized layers
    (:class:`cgmq_jax.nn.QuantDense` / ``QuantConv``, or ``nn.Dense`` / ``nn.Conv``
    quantized by :func:`cgmq_jax.rules.quantize_model`) report themselves; any other
    ``nn.Dense`` / ``nn.Conv`` is a float layer and is counted at 32 x 32 bits (never free);
    ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.ConvTranspose`` and ``nn.ConvLocal`` are an
    error. A layer's input signedness is its ``input_signed`` option, or, where that is
    ``None`` (decided by the data), the decision stored in its ``input_signed`` parameter
    leaf, read from ``params``.

    Args:
      model: a Flax linen model, quantized (its layers have quantizer parameters), or a
        Flax NNX module (then see :func:`cgmq_jax.nnx.layer_specs`).
      *args: the model's inputs (arrays or ``jax.ShapeDtypeStruct``), each with a leading
        batch axis.
      params: the quantized parameters; needed only if a layer decides its input
        signedness from the data.
      **kwargs: further call arguments of the model (e.g. ``train=False``).

    Returns:
      One :class:`LayerSpec` per layer, in call order.

    Raises:
      ValueError: no quantized layer, a layer whose MACs cannot be counted, or a layer
        inside ``nn.scan`` / ``nn.vmap`` (its calls cannot be counted from one trace).

    Examples:
      >>> import jax
      >>> from cgmq_jax import cost, models
      >>> x = jax.ShapeDtypeStruct((1, 28, 28, 1), jax.numpy.float32)  # shapes suffice
      >>> specs = cost.layer_specs(models.MLP(), x)
      >>> for s in specs:
      ...     print(s.name, s.macs, s.input_signed, s.weights, s.biases)
      fc1 235200 False 235200 300
      fc2 30000 False 30000 100
      fc3 1000 False 1000 10
      >>> cost.total_macs(specs)
      266200
    """
    from cgmq_jax import graph
    from cgmq_jax import nn as qnn

    if qnn.is_nnx_module(model):
        if params is not None:
            raise TypeError(
                "layer_specs(nnx_module, *inputs) takes no params: an NNX module holds its own"
            )
        from cgmq_jax import nnx as cnnx

        return cnnx.layer_specs(model, *args, **kwargs)
    traced = graph.trace(model, *args, **kwargs)  # abstract parameters: shapes only
    shapes = flax.traverse_util.flatten_dict(traced.variables.get("params", {}))
    specs = []
    for layer in traced.layers:
        _check_not_lifted(layer.path, layer.kernel_shape, shapes)
        if layer.batched:
            raise ValueError(
                f"layer {layer.name!r} runs inside nn.vmap / jax.vmap: its shapes "
                "lack the mapped axis, so layer_specs cannot count its MACs; apply the "
                "layer to the whole batch (it takes any number of leading axes) instead"
            )
        sizes = layer_sizes(layer.kernel_shape, layer.input_shape)
        if not layer.quantized:
            specs.append(LayerSpec(layer.path, layer.macs, False, quantized=False, **sizes))
            continue
        options = layer.options
        signed = options.input_signed
        if signed is None:
            signed = stored_input_signed(params, layer.path)
        specs.append(
            LayerSpec(
                layer.path,
                layer.macs,
                bool(signed),
                input_bits=options.input_bits,
                weight_bits=options.weight_bits,
                channels=layer.kernel_shape[-1] if options.per_channel else 1,
                prune=options.prune,
                **sizes,
            )
        )
    if not any(spec.quantized for spec in specs):
        raise ValueError(
            f"{type(model).__name__} has no quantized layers (modules with 'input_quantizer' "
            "and 'weight_quantizer' parameters); build it with quantized=True, or wrap it "
            "with cgmq_jax.rules.quantize_model"
        )
    if any(spec.prune for spec in specs):
        specs = with_sources(specs, traced)
    return tuple(specs)


def with_sources(specs, traced) -> tuple[LayerSpec, ...]:
    """``specs`` with their channel structure (groups, output channels, input sources),
    which the cost of a pruning network needs (docs/method.md section 12)."""
    from cgmq_jax import channels

    sources = channels.input_sources(traced)
    groups = [
        int(getattr(layer.module, "feature_group_count", 1)) if layer.kind == "conv" else 1
        for layer in traced.layers
    ]
    folds = channels.constant_folds(traced) if max(groups) > 1 else {}
    out = []
    for i, (spec, layer, found) in enumerate(zip(specs, traced.layers, sources, strict=True)):
        spec = dataclasses.replace(
            spec, groups=groups[i], channels_out=layer.kernel_shape[-1], input_sources=found
        )
        channels.check_groups(spec, folds.get(i))
        out.append(spec)
    return tuple(out)


def prunable_quantizers(specs):
    """``params -> tree of bools``, ``True`` at the weight quantizer leaves that may remove
    channels: the ``prunable`` argument of :func:`cgmq_jax.constraint.constrained_update`
    and :func:`cgmq_jax.optimizers.fixed_bitwidths` (``None`` when nothing prunes)."""
    paths = {(*spec.path, "weight_quantizer") for spec in specs if spec.prune}
    if not paths:
        return None

    def name(key):
        return getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))

    def mask(params):  # linen parameters, or an NNX state (a variable is one leaf)
        return quantizer._map_variables_with_path(
            lambda path, _: tuple(name(k) for k in path) in paths, params
        )

    return mask


def is_pruning(specs) -> bool:
    """Whether the network's cost follows live channels (some layer prunes)."""
    return any(spec.input_sources is not None for spec in specs)


def layer_sizes(kernel_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> dict[str, int]:
    """A layer's memory sizes, the same for linen and NNX layers: the kernel's elements
    (``weights``), one bias per output channel (``biases``, stored by the export even
    without ``use_bias``), its input's elements per example (``input_elements``; the
    shape's first axis is the batch).

    >>> layer_sizes((3, 3, 1, 8), (2, 28, 28, 1))
    {'weights': 72, 'biases': 8, 'input_elements': 784}
    """
    return {
        "weights": math.prod(kernel_shape),
        "biases": kernel_shape[-1],
        "input_elements": math.prod(input_shape[1:]),
    }


def _check_not_lifted(path, kernel_shape, shapes) -> None:
    """A layer under ``nn.scan`` / ``nn.vmap`` sees a slice of its stacked kernel."""
    stored = shapes.get((*path, "kernel"))
    if stored is not None and tuple(stored.shape) != tuple(kernel_shape):
        raise ValueError(
            f"layer {'/'.join(path)!r} computes with a kernel of shape {tuple(kernel_shape)} "
            f"but its parameter has shape {tuple(stored.shape)}: it runs inside a lifted "
            "transform (nn.scan / nn.vmap), whose repeated calls layer_specs cannot count "
            "from one trace; unroll the loop (a Python for loop over layers)"
        )


def _layer_params(params, path: tuple[str, ...]):
    node = params
    for key in path:
        node = node[key]
    return node


def stored_input_signed(params, path: tuple[str, ...]) -> bool:
    """The data's signedness decision of the layer at ``path``, from its ``input_signed`` leaf."""
    name = "/".join(path)
    if params is None:
        raise ValueError(
            f"layer {name!r} decides its input signedness from the data (input_signed=None): "
            "pass its parameters, layer_specs(model, *inputs, params=params)"
        )
    layer = _layer_params(params, path)
    if quantizer.INPUT_SIGNED not in layer:
        raise ValueError(f"layer {name!r} has no {quantizer.INPUT_SIGNED!r} leaf in params")
    return bool(np.asarray(layer[quantizer.INPUT_SIGNED]) > 0)
