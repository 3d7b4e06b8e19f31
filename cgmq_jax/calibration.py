"""Calibration: a quantized network's initial quantizers, and their ranges refitted.

* :func:`init_quantizers`: quantized parameters from float ones, every quantizer at an
  exact bit-width (ranges from ``max|W|`` and the float network's input percentiles);
* :func:`refit_ranges`: every learned quantizer's range of least squared error at its
  present bit-width (the trainer's ``--refit_ranges``);
* :func:`layer_inputs`: what each quantized layer receives; :func:`strip_quantizers`: the
  float model's parameter tree.

Pure functions of linen models and parameter trees over the layers of :mod:`cgmq_jax.nn`
(which re-exports these names, their public home before this module). NNX modules
calibrate in :mod:`cgmq_jax.nnx`.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from cgmq_jax import cost, quantizer
from cgmq_jax.nn import QuantConv, QuantDense, is_nnx_module, record_layers
from cgmq_jax.operands import CALIBRATION, initial_quantizer, weight_range


def init_quantizers(
    model: nn.Module,
    params,
    *args,
    input_bits: int = 8,
    weight_bits: int = 8,
    **kwargs,
):
    """Quantized parameters from float ones: every quantizer at an exact bit-width.

    Weight quantizers take their range from ``max|W|`` (per output channel where the layer
    is ``per_channel``); input quantizers from a high percentile of the layer's inputs in
    the float network on the calibration inputs. A layer with ``input_signed=None`` gets a
    signed input quantizer iff its calibration inputs have a negative value (stored in its
    ``input_signed`` leaf); one with ``input_signed=False`` and negative inputs raises a
    ``ValueError`` naming it (inside ``jax.jit``, when the compiled function runs). A
    quantizer pinned by the layer (``input_bits`` / ``weight_bits`` options) starts at its
    pinned bit-width.

    Args:
      model: a model with a ``quantized`` field (as in :mod:`cgmq_jax.models`, or made by
        :func:`cgmq_jax.rules.quantize_model`).
      params: its float parameters (``model.clone(quantized=False)``'s tree); any quantizer
        leaves already present are replaced.
      *args: the calibration inputs (a batch), as the model takes them.
      input_bits: the initial bit-width of every learned input quantizer.
      weight_bits: the initial bit-width of every learned weight quantizer.
      **kwargs: further call arguments of the model (e.g. ``train=False``).

    Returns:
      The parameter tree of ``model.clone(quantized=True)``.

    For a Flax NNX module this is :func:`cgmq_jax.nnx.calibrate`: the module holds its own
    state, so every argument after ``model`` is a call argument (the calibration batch
    first), the quantizers are set in place, and ``None`` is returned.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from cgmq_jax import calibration, models
      >>> model, x = models.MLP(), jnp.ones((2, 28, 28, 1))
      >>> float_params = model.clone(quantized=False).init(jax.random.key(0), x)["params"]
      >>> params = calibration.init_quantizers(model, float_params, x, weight_bits=4)
      >>> sorted(params["fc1"])
      ['bias', 'input_quantizer', 'kernel', 'weight_quantizer']
    """
    if is_nnx_module(model):
        from cgmq_jax import nnx as cnnx

        cnnx.calibrate(
            model, params, *args, input_bits=input_bits, weight_bits=weight_bits, **kwargs
        )
        return None
    return _init_linen_quantizers(model, params, args, kwargs, input_bits, weight_bits)


def _init_linen_quantizers(model, params, args, kwargs, input_bits, weight_bits):
    """:func:`init_quantizers` for a linen model."""
    model, weights = _float_weights(model, params, args, kwargs)
    observed = _observe_float(model, weights, args, kwargs)
    quantized = model.clone(quantized=True)
    with record_layers() as records:
        template = jax.eval_shape(lambda: quantized.init(jax.random.key(0), *args, **kwargs))[
            "params"
        ]
    options = {record.path: record.options for record in records}
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(template))
    weights_flat = flax.traverse_util.flatten_dict(weights)
    result = {}
    for path in flat:
        layer, name = path[:-1], path[-1]
        if name in ("input_quantizer", quantizer.INPUT_SIGNED):
            if (*layer, "input_range") not in observed:
                raise _not_observed_error(layer)
        if name == "input_quantizer":
            input_range = observed[(*layer, "input_range")]
            signed = observed[(*layer, "input_signed")]  # a bool, or the data's decision
            bits = options[layer].input_bits or input_bits
            result[path] = initial_quantizer(input_range, signed=signed, bits=bits)
        elif name == quantizer.INPUT_SIGNED:
            result[path] = quantizer.signedness_leaf(observed[(*layer, "input_signed")])
        elif name == "weight_quantizer":
            kernel = weights_flat[(*layer, "kernel")]
            result[path] = initial_quantizer(
                weight_range(kernel, options[layer].per_channel),
                signed=True,
                bits=options[layer].weight_bits or weight_bits,
            )
        else:
            result[path] = weights_flat[path]
    return flax.traverse_util.unflatten_dict(result)


def _is_float_variables(params) -> bool:
    """Whether ``params`` are a float network's variables with BatchNorm statistics."""
    return isinstance(params, Mapping) and "params" in params and "batch_stats" in params


def _float_weights(model, params, args: tuple, kwargs: dict):
    """``(model without BatchNorm, its float weights)``: float variables with
    ``batch_stats`` are folded first (:func:`cgmq_jax.models.fold_batchnorm`)."""
    if not _is_float_variables(params):
        return model, strip_quantizers(params)
    from cgmq_jax import models  # BatchNorm folding lives with the models (imported lazily)

    folded = models.fold_batchnorm(model.clone(quantized=False), params, *args, **kwargs)
    return models.folded(model), strip_quantizers(folded)


def _observe_float(model, weights, args: tuple, kwargs: dict) -> dict:
    """The calibration facts each layer sows in the float network's pass on ``args``."""
    float_model = model.clone(quantized=False)
    try:
        _, state = float_model.apply({"params": weights}, *args, mutable=[CALIBRATION], **kwargs)
    except flax.errors.ScopeCollectionNotFound as error:
        if "batch_stats" not in str(error):
            raise
        raise ValueError(
            f"{type(getattr(model, 'model', model)).__name__} has BatchNorm but "
            "init_quantizers got parameters "
            "without its statistics: pass the float network's variables "
            '{"params": ..., "batch_stats": ...} (what its init and float training give); '
            "each BatchNorm is then folded into the layer before it"
        ) from None
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(state.get(CALIBRATION, {})))


def _not_observed_error(layer: tuple) -> ValueError:
    """A layer whose input the float pass did not record: it runs inside a lifted transform."""
    return ValueError(
        f"layer {'/'.join(map(str, layer))!r} runs inside nn.scan (or another lifted "
        "transform, e.g. nn.vmap), whose repeated calls init_quantizers cannot calibrate: "
        "unroll nn.scan into a Python for loop over the blocks (one module per block)"
    )


def strip_quantizers(params):
    """The parameter tree without its quantizer leaves and signedness (the float model's)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    kept = {
        k: v
        for k, v in flat.items()
        if not (k[-1].endswith(quantizer.QUANTIZER_SUFFIX) or k[-1] == quantizer.INPUT_SIGNED)
    }
    return flax.traverse_util.unflatten_dict(kept)


def layer_inputs(model: nn.Module, params, *args, **kwargs) -> dict:
    """``{layer path: its input}``: what each quantized layer of ``model`` receives (before
    its input quantizer) when ``model`` is applied to ``args`` with ``params``."""
    found = {}

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, QuantDense | QuantConv):
            found[tuple(module.path)] = jnp.asarray(call_args[0], jnp.float32)
        return next_fun(*call_args, **call_kwargs)

    with nn.intercept_methods(record):
        model.apply({"params": params}, *args, **kwargs)
    return found


def refit_ranges(
    model: nn.Module,
    params,
    *args,
    weights: bool = True,
    inputs: bool = True,
    layers=None,
    specs=None,
    **kwargs,
):
    """``params`` with every learned quantizer's range refitted at its present bit-width.

    Each learned quantizer (not pinned by ``input_bits`` / ``weight_bits``) of the layers
    ``layers`` (paths; ``None``: all) keeps its exact bit-width, so every cost is
    unchanged, and gets the power-of-two step, and the range ``top * d``, of least squared
    error (:func:`cgmq_jax.quantizer.least_squares_latents`): on its kernel (per channel
    for a per-channel layer), or on the layer's inputs in ``model`` applied to ``args``
    (a calibration batch; the inputs as the quantized network computes them).

    At ``max|W|`` or a high input percentile, a quantizer at 1-2 bits rounds most values
    to zero (docs/method.md section 10); its range learns only from clipped values, of
    which there are none there. A pure function of linen parameters, traceable (jit it);
    ``specs`` (``cost.layer_specs`` of ``model``) saves tracing the model for them.
    """
    params = flax.core.unfreeze(params)
    if specs is None:
        specs = cost.layer_specs(model, *args, params=params, **kwargs)
    observed = layer_inputs(model, params, *args, **kwargs) if inputs else {}
    flat = flax.traverse_util.flatten_dict(params)
    wanted = None if layers is None else {tuple(p) for p in layers}
    for spec in specs:
        path = tuple(spec.path)
        if not spec.quantized or (wanted is not None and path not in wanted):
            continue
        weight_bits, input_bits = cost.layer_bitwidths(params, spec, exact=True)
        if weights and spec.weight_bits is None:
            leaf = flat[(*path, "weight_quantizer")]
            flat[(*path, "weight_quantizer")] = quantizer.least_squares_latents(
                flat[(*path, "kernel")],
                weight_bits,
                signed=True,
                per_channel=jnp.ndim(leaf) == 2,
            )
        if inputs and spec.input_bits is None:
            flat[(*path, "input_quantizer")] = quantizer.least_squares_latents(
                observed[path], input_bits, signed=spec.input_signed
            )
    return flax.traverse_util.unflatten_dict(flat)
