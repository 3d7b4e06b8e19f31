"""The NNX side of :func:`cgmq_jax.rules.quantize_model`: an unmodified NNX model, copied with
its plain ``nnx.Linear`` / ``nnx.Conv`` layers quantized by rules and its BatchNorm folded.

Kept apart from :mod:`cgmq_jax.rules` so that a linen user never imports ``flax.nnx``.

* :func:`quantize_layers`: each plain layer becomes a :class:`cgmq_jax.nnx.QuantLinear` /
  :class:`cgmq_jax.nnx.QuantConv` holding the same ``kernel`` and ``bias`` (the object's
  attributes, under the quantized class), with the first matching rule's options; one no
  rule quantizes is kept in float (no quantizers, counted at 32 x 32 bits).
* :func:`fold_batchnorms`: each ``nnx.BatchNorm`` whose input is the very output of a
  plain layer is folded into that layer (:func:`cgmq_jax.models.folded_kernel_and_bias`,
  the linen folding's arithmetic) and replaced by a :class:`FoldedBatchNorm`, which passes
  its input through. Which BatchNorm follows which layer is traced from shapes, so it needs
  the model's inputs, as Qwix's NNX ``quantize_model`` does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cgmq_jax import models
from cgmq_jax import nn as qnn
from cgmq_jax import nnx as cnnx

#: The plain Flax layers :func:`quantize_layers` replaces, and what by.
_REPLACEMENTS = ((nnx.Conv, cnnx.QuantConv), (nnx.Linear, cnnx.QuantLinear))


class FoldedBatchNorm(nnx.Module):
    """Where a BatchNorm was: folded into the layer before it, it passes its input through."""

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """``x`` itself (BatchNorm's other arguments, e.g. ``use_running_average``, ignored)."""
        return x


def _replacement(module) -> type | None:
    """The quantized class for a plain ``nnx.Linear`` / ``nnx.Conv`` (not a subclass with
    its own ``__call__``, nor one already quantized), else ``None``."""
    if isinstance(module, cnnx.QUANTIZED_LAYERS):
        return None
    for plain, quantized in _REPLACEMENTS:
        if isinstance(module, plain) and type(module).__call__ is plain.__call__:
            return quantized
    return None


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def _set(model: nnx.Module, path: tuple, module: nnx.Module) -> None:
    """Put ``module`` at ``path`` in ``model`` (an attribute, or an index of a list)."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = module
    else:
        setattr(parent, path[-1], module)


def _as(cls: type, module: nnx.Module) -> nnx.Module:
    """A ``cls`` object with ``module``'s attributes (its variables: the same values)."""
    new = object.__new__(cls)
    new.__dict__.update(vars(module))
    return new


def quantize_layers(model: nnx.Module, rule_for) -> nnx.Module:
    """Replace the plain ``nnx.Linear`` / ``nnx.Conv`` layers of ``model`` in place.

    Each takes the options of ``rule_for(path)`` (a :class:`cgmq_jax.rules.QuantRule`, or
    ``None``: kept in float, counted at 32 x 32 bits) and keeps its ``kernel`` and
    ``bias``. Returns ``model``. (:func:`cgmq_jax.rules.quantize_model` calls it on a copy.)
    """
    for path, module in list(nnx.iter_modules(model)):
        quantized_class = _replacement(module)
        if quantized_class is None or not path:
            continue
        rule = rule_for(_name(path))
        options = rule.options if rule is not None else qnn.QuantOptions(quantize=False)
        layer = _as(quantized_class, module)
        layer._add_quantizers(options, keep_float=not options.quantize)
        _set(model, path, layer)
    return model


# What the trace of batchnorm_pairs records (None outside it): the layer that produced each
# array, and the array (and its rank) each BatchNorm received.
_record: dict | None = None


def _plain_base(module) -> type:
    return next(plain for plain, _ in _REPLACEMENTS if isinstance(module, plain))


class _RecordingLinear(nnx.Linear):
    def __call__(self, inputs, *args, **kwargs):
        y = super().__call__(inputs, *args, **kwargs)
        _record["producers"][id(y)] = _record["paths"][id(self)]
        _record["kept"].append(y)  # alive, so that no other array reuses its id
        return y


class _RecordingConv(nnx.Conv):
    def __call__(self, inputs, *args, **kwargs):
        y = super().__call__(inputs, *args, **kwargs)
        _record["producers"][id(y)] = _record["paths"][id(self)]
        _record["kept"].append(y)
        return y


class _RecordingBatchNorm(nnx.BatchNorm):
    def __call__(self, x, *args, **kwargs):
        layer = _record["producers"].get(id(x))
        _record["pairs"][_record["paths"][id(self)]] = (layer, jnp.ndim(x))
        return super().__call__(x, *args, **kwargs)


_RECORDING = {nnx.Linear: _RecordingLinear, nnx.Conv: _RecordingConv}


def batchnorm_pairs(model: nnx.Module, *inputs, **call_kwargs) -> dict[tuple, tuple]:
    """``{BatchNorm path: path of the plain layer it follows}``, traced from shapes.

    Raises:
      ValueError: a BatchNorm that cannot be folded (it does not directly follow a plain
        ``nnx.Linear`` / ``nnx.Conv``, or it normalises another axis than the features),
        naming its path.
    """
    global _record
    graphdef, state = nnx.split(model)
    shapes = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32) for x in inputs]

    def forward(state, *xs):
        copy = nnx.merge(graphdef, state)
        for path, module in list(nnx.iter_modules(copy)):
            if type(module) is nnx.BatchNorm:
                _set(copy, path, _as(_RecordingBatchNorm, module))
            elif _replacement(module) is not None:
                _set(copy, path, _as(_RECORDING[_plain_base(module)], module))
        _record["paths"] = {id(m): path for path, m in nnx.iter_modules(copy)}
        copy(*xs, **call_kwargs)

    _record = {"producers": {}, "kept": [], "pairs": {}, "paths": {}}
    try:
        jax.eval_shape(forward, state, *shapes)
        pairs = dict(_record["pairs"])
    finally:
        _record = None
    modules = dict(nnx.iter_modules(model))
    for norm, (layer, rank) in pairs.items():
        if layer is None:
            raise ValueError(
                f"BatchNorm {_name(norm)!r} does not directly follow an nnx.Linear / nnx.Conv, "
                "so it cannot be folded into one for quantization: put it right after its "
                "layer (conv -> BatchNorm -> activation), or remove it"
            )
        if modules[norm].axis not in (-1, rank - 1) or modules[norm].axis_name is not None:
            raise ValueError(f"BatchNorm {_name(norm)!r}: only a feature-axis (-1) one folds")
    return {norm: layer for norm, (layer, _) in pairs.items()}


def fold_batchnorms(model: nnx.Module, *inputs, **call_kwargs) -> nnx.Module:
    """Fold every BatchNorm of ``model`` into the plain layer before it, in place.

    Each layer's kernel and bias become what the layer and its BatchNorm compute with the
    running averages (a layer without a bias gets one); the BatchNorm becomes a
    :class:`FoldedBatchNorm`. Returns ``model``.
    """
    modules = dict(nnx.iter_modules(model))
    for norm_path, layer_path in batchnorm_pairs(model, *inputs, **call_kwargs).items():
        norm, layer = modules[norm_path], modules[layer_path]
        features = layer.kernel.shape[-1]
        kernel, bias = models.folded_kernel_and_bias(
            layer.kernel[...],
            layer.bias[...] if layer.bias is not None else jnp.zeros(features),
            norm.scale[...] if norm.scale is not None else jnp.ones(features),
            norm.bias[...] if norm.bias is not None else jnp.zeros(features),
            norm.mean[...],
            norm.var[...],
            norm.epsilon,
        )
        layer.kernel[...] = kernel
        if layer.bias is None:
            layer.bias, layer.use_bias = nnx.Param(bias), True
        else:
            layer.bias[...] = bias
        _set(model, norm_path, FoldedBatchNorm())
    return model


def quantize_model(model: nnx.Module, rule_for, *inputs, **call_kwargs) -> nnx.Module:
    """A quantized copy of ``model`` (see the module docstring); ``model`` is not modified.

    Raises:
      TypeError: the model has BatchNorm but no ``inputs`` were given to trace it from.
    """
    copy = nnx.merge(*nnx.split(model))
    if any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_modules(copy)):
        if not inputs:
            raise TypeError(
                f"{type(model).__name__} has BatchNorm: pass a sample input, "
                "quantize_model(model, rules, x), so that each BatchNorm is folded into the "
                "layer before it"
            )
        fold_batchnorms(copy, *inputs, **call_kwargs)
    return quantize_layers(copy, rule_for)
