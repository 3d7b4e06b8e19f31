"""``quantize_model``: CGMQ quantizers on an unmodified Flax linen model, by rules.

In the manner of Qwix's ``quantize_model``: the model's code is not touched. Every call of
a plain ``flax.linen.Dense`` or ``flax.linen.Conv`` inside it is intercepted
(``nn.intercept_methods``) and computed by :func:`cgmq_jax.nn.dense_forward` /
:func:`cgmq_jax.nn.conv_forward` in the layer's own scope, with the options of the first
:class:`QuantRule` whose ``module_path`` matches the layer's path. So the parameter tree
keeps the model's names (``nn.share_scope``: no wrapper level), the float checkpoint loads
(its ``kernel`` and ``bias`` are the same leaves; :func:`cgmq_jax.calibration.init_quantizers` adds
the quantizer leaves), and the layers quantize input and kernel exactly as
:class:`cgmq_jax.nn.QuantDense` / ``QuantConv`` do.

A ``Dense`` / ``Conv`` that no rule matches, or one matched by a rule with
``quantize=False``, stays a float layer: :func:`cgmq_jax.cost.layer_specs` counts it at
32 x 32 bits (never free). ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.ConvTranspose`` and
``nn.ConvLocal`` are not quantized, and ``layer_specs`` refuses them (their MACs are not
counted). Multiplications written with ``jnp`` outside a layer (e.g. attention scores)
are not seen at all.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cgmq_jax import nn as qnn


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule(qnn.QuantOptions):
    """How the layers whose path matches ``module_path`` are quantized.

    Attributes:
      module_path: a regular expression, matched in full against the layer's path joined
        by ``/`` (e.g. ``"conv1"``, ``"encoder/.*"``, ``".*"``).
      quantize, input_signed, calibration_percentile, per_channel, input_bits,
        weight_bits: as in :class:`cgmq_jax.nn.QuantOptions`. For example
        ``QuantRule(module_path="conv1", input_bits=8)`` pins the first layer's input at
        8 bits (Bayesian Bits' and HAQ's convention), ``QuantRule(module_path="head",
        quantize=False)`` keeps a layer in float (counted at 32 x 32 bits).
    """

    module_path: str = ".*"

    def __post_init__(self):
        super().__post_init__()
        try:
            re.compile(self.module_path)
        except re.error as error:
            raise ValueError(f"module_path {self.module_path!r} is not a regex: {error}") from None

    @property
    def options(self) -> qnn.QuantOptions:
        """The rule's :class:`cgmq_jax.nn.QuantOptions` (its fields less ``module_path``)."""
        return qnn.options_of(self)

    def matches(self, path: str) -> bool:
        """Whether ``module_path`` matches ``path`` (a layer's path joined by ``/``) in full."""
        return re.fullmatch(self.module_path, path) is not None


def _intercepted(module) -> bool:
    """A plain ``nn.Dense`` / ``nn.Conv`` (not a subclass with its own ``__call__``)."""
    if isinstance(module, qnn.QuantDense | qnn.QuantConv):
        return False  # already quantized by its own options
    return (isinstance(module, nn.Dense) and type(module).__call__ is nn.Dense.__call__) or (
        isinstance(module, nn.Conv) and type(module).__call__ is nn.Conv.__call__
    )


class QuantizedModel(nn.Module):
    """An unmodified linen model whose ``Dense`` / ``Conv`` layers quantize by ``rules``.

    Made by :func:`quantize_model`; a model with a ``quantized`` switch like those of
    :mod:`cgmq_jax.models`, so :func:`cgmq_jax.calibration.init_quantizers`,
    :func:`cgmq_jax.cost.layer_specs` and :func:`cgmq_jax.train.fit`'s steps take it.
    ``quantized=False`` is the original float model (same parameters, no quantizers).

    BatchNorm, as in :class:`cgmq_jax.models.DSCNN`, is part of the float network only:
    with ``quantized=True`` (or ``batch_norm=False``) every ``nn.BatchNorm`` right after a
    ``Dense`` / ``Conv`` is folded into that layer (the BatchNorm computes nothing, the
    layer gets a ``bias`` if it had none), so the quantizers quantize the folded weights and
    the export sees no BatchNorm. :func:`cgmq_jax.calibration.init_quantizers` given the float
    variables ``{"params": ..., "batch_stats": ...}`` folds them
    (:func:`cgmq_jax.models.fold_batchnorm`). A BatchNorm after anything else is an error
    naming it.
    """

    model: nn.Module
    rules: tuple[QuantRule, ...] = (QuantRule(),)
    quantized: bool = True
    batch_norm: bool = True  # BatchNorm in the float network (folded when quantized)

    @property
    def has_batch_norm(self) -> bool:
        """Whether the BatchNorm layers run: ``batch_norm`` and not ``quantized``."""
        return self.batch_norm and not self.quantized

    def setup(self):
        """Shares ``model``'s scope, so the parameters keep the wrapped model's names."""
        nn.share_scope(self, self.model)  # the model's parameter names, no extra level

    def __call__(self, *args, **kwargs):
        folds = {} if self.has_batch_norm else _folds(self.model.clone(parent=None), args, kwargs)
        # A plain function, not a method: a module method would itself be intercepted.
        interceptor = _interceptor(self.rules, self.quantized, folds)
        with nn.intercept_methods(interceptor):
            return self.model(*args, **kwargs)


def _folds(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, str]:
    """``{BatchNorm path: path of the layer it folds into}`` of the unbound ``model``.

    Traced from shapes in a thread of its own: Flax's interceptors are thread-local, so the
    caller's (e.g. :func:`cgmq_jax.graph.trace`'s) do not see this second trace.
    """
    shapes = tuple(
        jax.ShapeDtypeStruct(jnp.shape(x), jnp.float32) if hasattr(x, "shape") else x for x in args
    )
    try:
        return _cached_folds(model, shapes, tuple(sorted(kwargs.items())))
    except TypeError:  # an unhashable argument: not cached
        return _traced_folds(model, shapes, kwargs)


@functools.lru_cache(maxsize=64)
def _cached_folds(model: nn.Module, shapes: tuple, kwargs: tuple) -> dict[str, str]:
    return _traced_folds(model, shapes, dict(kwargs))


def _traced_folds(model: nn.Module, shapes: tuple, kwargs: dict) -> dict[str, str]:
    from cgmq_jax import models

    outcome: dict = {}

    def run():
        try:
            outcome["pairs"] = models.batchnorm_pairs(model, *shapes, **kwargs)
        except Exception as error:  # raised in the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return {"/".join(norm): "/".join(layer) for norm, (layer, _) in outcome["pairs"].items()}


def _rule_for(rules: tuple[QuantRule, ...], path: str) -> QuantRule | None:
    """The first rule whose ``module_path`` matches ``path``, or ``None``."""
    return next((rule for rule in rules if rule.matches(path)), None)


def _interceptor(rules: tuple[QuantRule, ...], quantized: bool, folds: dict[str, str]):
    """Computes each ``Dense`` / ``Conv`` by its rule; folded BatchNorm layers pass through."""
    folded_layers = set(folds.values())

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        if isinstance(module, nn.BatchNorm) and path in folds:
            return args[0]  # folded into the layer before it
        folded = path in folded_layers
        if isinstance(module, qnn.QuantDense | qnn.QuantConv):
            options = qnn.options_of(module)  # quantized by its own options
        elif _intercepted(module):
            rule = _rule_for(rules, path)
            if rule is None and not folded:
                return next_fun(*args, **kwargs)
            options = rule.options if rule is not None else qnn.QuantOptions(quantize=False)
            if not quantized:
                options = dataclasses.replace(options, quantize=False)
        else:
            return next_fun(*args, **kwargs)
        if not folded and isinstance(module, qnn.QuantDense | qnn.QuantConv):
            return next_fun(*args, **kwargs)
        if kwargs or len(args) != 1:
            raise TypeError(f"layer {path!r}: expected one input array")
        forward = qnn.conv_forward if qnn.is_conv(module) else qnn.dense_forward
        return forward(module, options, args[0], use_bias=True if folded else None)

    return intercept


def quantize_model(
    model, rules: Sequence[QuantRule] | QuantRule = (QuantRule(),), *sample_inputs, **call_kwargs
):
    """Quantize an unmodified linen or NNX model's ``Dense`` / ``Conv`` layers by rules.

    One name for both (dispatched on the model's type), with the same rules:

    * a linen model is wrapped: every call of a plain ``nn.Dense`` / ``nn.Conv`` is
      intercepted (see the module docstring); BatchNorm right after such a layer is folded
      into it in the quantized model (see :class:`QuantizedModel`);
    * an NNX model is copied (the original is not modified) with every plain
      ``nnx.Linear`` / ``nnx.Conv`` replaced by a :class:`cgmq_jax.nnx.QuantLinear` /
      :class:`cgmq_jax.nnx.QuantConv` holding the same ``kernel`` and ``bias`` and the
      first matching rule's options; one no rule quantizes is kept in float (no
      quantizers, counted at 32 x 32 bits); each ``nnx.BatchNorm`` right after such a
      layer is folded into it first (its running averages: pass the trained float model),
      which needs ``sample_inputs`` (:mod:`cgmq_jax.rules_nnx`). Then
      :func:`cgmq_jax.nnx.calibrate` (or ``init_quantizers(model, batch)``) sets the
      quantizers from data.

    Args:
      model: any ``flax.linen.Module`` (unbound), or a ``flax.nnx.Module``.
      rules: :class:`QuantRule` s, the first match wins; the default quantizes every
        ``Dense`` and ``Conv`` with learned bit-widths and data-decided input signedness.
      *sample_inputs: NNX only, needed if the model has BatchNorm: its inputs (arrays or
        ``jax.ShapeDtypeStruct``), to trace which layer each BatchNorm follows.
      **call_kwargs: NNX only: further call arguments for that trace (``train=False``).

    Returns:
      Linen: a :class:`QuantizedModel` (``quantized=True``); ``.clone(quantized=False)`` is
      the float model, whose parameters are the original model's. NNX: the quantized copy.

    Raises:
      TypeError: ``model`` is neither a linen nor an NNX module, a rule is not a
        :class:`QuantRule`, or an NNX model has BatchNorm and no ``sample_inputs``.
      ValueError: a BatchNorm that does not directly follow a layer (it cannot be folded).

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from cgmq_jax import calibration, cost, rules
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
      ...         return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))
      >>> x = jnp.ones((2, 8, 8, 1))
      >>> float_params = Net().init(jax.random.key(0), x)["params"]
      >>> pin_image = rules.QuantRule(module_path="conv1", input_bits=8, input_signed=False)
      >>> model = rules.quantize_model(Net(), [pin_image, rules.QuantRule()])
      >>> params = calibration.init_quantizers(model, float_params, x)
      >>> sorted(params["conv1"])
      ['bias', 'input_quantizer', 'kernel', 'weight_quantizer']
      >>> specs = cost.layer_specs(model, x, params=params)
      >>> [(s.name, s.macs, s.input_bits, s.input_signed) for s in specs]
      [('conv1', 2304, 8, False), ('head', 2560, None, False)]
      >>> cost.exact_bops(params, specs)  # (2304 + 2560) * 8 * 8
      311296
    """
    if isinstance(rules, QuantRule):
        rules = (rules,)
    rules = tuple(rules)
    for rule in rules:
        if not isinstance(rule, QuantRule):
            raise TypeError(f"rules must be QuantRule instances, got {type(rule).__name__}")
    if qnn.is_nnx_module(model):
        from cgmq_jax import rules_nnx

        rule_for = functools.partial(_rule_for, rules)
        return rules_nnx.quantize_model(model, rule_for, *sample_inputs, **call_kwargs)
    if sample_inputs or call_kwargs:
        raise TypeError("quantize_model takes sample inputs for an NNX model only")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model takes a flax.linen.Module, got {type(model).__name__}")
    if model.scope is not None:
        raise ValueError("quantize_model takes an unbound model (not one inside apply/bind)")
    return QuantizedModel(model=model, rules=rules)
