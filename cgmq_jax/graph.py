"""One trace of a Flax model: its layers for the cost, its jaxpr for the export's op graph.

:func:`trace` runs ``model.apply`` once under ``jax.make_jaxpr`` (nothing is computed) with
every quantized layer reporting itself (:func:`cgmq_jax.nn.record_layers`) and marking its
input and output in the jaxpr (``checkpoint_name`` identities named ``cgmq:in:<i>`` /
``cgmq:out:<i>``). The result, a :class:`Graph`, holds

* ``layers``: every layer that does MACs, in call order (quantized ones from the records,
  plain ``nn.Dense`` / ``nn.Conv`` ones as float layers), with their shapes; the cost
  (:func:`cgmq_jax.cost.layer_specs`) is built from these, so the cost and the export count
  the same layers with the same MACs (:func:`macs`);
* ``jaxpr``: the computation, which :func:`cgmq_jax.opgraph.ops` reads into the export's
  graph of integer ops (``docs/export.md``); anything there that touches an activation
  and that the integer engine does not run is an :class:`UnsupportedOp` naming the
  primitive and the module path.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cgmq_jax import nn as qnn

# Layers that do MACs. A call of one of these that no quantizer intercepts is a float
# layer (counted at 32 x 32 bits); a kind whose MACs we cannot count is an error.
_COUNTED = (nn.Dense, nn.Conv)
_UNCOUNTED = (nn.DenseGeneral, nn.Einsum, nn.ConvTranspose, nn.ConvLocal)
#: The batch size of the trace (2, so that the batch axis cannot be confused with a 1).
TRACE_BATCH = 2


class UnsupportedOp(ValueError):
    """A computation on an activation that the integer export cannot run."""


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer that does MACs, as the trace saw it (shapes include the batch axis)."""

    path: tuple[str, ...]
    options: qnn.QuantOptions | None  # None: a plain float nn.Dense / nn.Conv
    input_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    module: Any
    batched: bool = False

    @property
    def name(self) -> str:
        """The layer's ``path`` joined by ``/``, as :class:`cgmq_jax.cost.LayerSpec` names it."""
        return "/".join(map(str, self.path))

    @property
    def quantized(self) -> bool:
        """Whether the layer has quantizers (``False``: a float layer, counted at 32 x 32 bits)."""
        return self.options is not None and self.options.quantize

    @property
    def kind(self) -> str:
        """``"conv"`` for an ``nn.Conv`` / ``nnx.Conv`` (or subclass), else ``"dense"``."""
        return "conv" if qnn.is_conv(self.module) else "dense"

    @property
    def macs(self) -> int:
        """Multiply-accumulates per example, by :func:`macs` from the traced shapes."""
        return macs(self.output_shape, self.kernel_shape)


def macs(output_shape, kernel_shape) -> int:
    """``prod(output per example) * prod(kernel.shape[:-1])``: dense on any number of axes
    and any convolution (its kernel is ``(*window, in / groups, out)``)."""
    return int(math.prod(output_shape[1:]) * math.prod(kernel_shape[:-1]))


@dataclasses.dataclass(frozen=True)
class Graph:
    """What :func:`trace` captured."""

    layers: tuple[Layer, ...]
    jaxpr: Any  # a ClosedJaxpr of (variables, *inputs) -> outputs
    variables: Any  # the (abstract) variables the trace used
    num_variable_leaves: int
    input_shapes: tuple[tuple[int, ...], ...]
    wrapped: bool = False  # a quantize_model wrapper: its name-stack level is not the user's
    #: ``{module path: class name}`` of every module called ("" the traced model), for messages
    module_types: dict = dataclasses.field(default_factory=dict)


def _abstract(value):
    if isinstance(value, jax.Array | np.ndarray | jax.ShapeDtypeStruct):
        dtype = jnp.float32 if jnp.issubdtype(value.dtype, jnp.floating) else value.dtype
        return jax.ShapeDtypeStruct(jnp.shape(value), dtype)
    return value


def trace(model: nn.Module, *args, params=None, **kwargs) -> Graph:
    """Trace ``model.apply`` once: its layers (in call order) and its jaxpr.

    Args:
      model: a Flax linen model, or a Flax NNX module (traced as
        ``nnx.merge(graphdef, state)(*args)``; its quantized layers report their paths).
      *args: its inputs (arrays or ``jax.ShapeDtypeStruct``), each with a leading batch axis.
      params: its parameters (abstract ones from ``model.init`` under ``jax.eval_shape``
        when ``None``); for an NNX module its own state is used and ``params`` is ignored.
      **kwargs: further call arguments (e.g. ``train=False``).

    Raises:
      ValueError: a layer whose MACs cannot be counted (``nn.DenseGeneral``, ``nn.Einsum``,
        ``nn.ConvTranspose``, ``nn.ConvLocal``; in NNX any plain MAC layer).
    """
    abstract_args = [_abstract(a) for a in args]
    if qnn.is_nnx_module(model):
        return _trace_nnx(model, abstract_args, kwargs)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    if params is None:
        variables = jax.eval_shape(lambda *a: model.init(rngs, *a, **kwargs), *abstract_args)
    else:
        variables = {"params": params}
    variables = jax.tree.map(_abstract, flax.core.unfreeze(variables))
    mutable = [name for name in variables if name != "params"]

    def apply(variables, *inputs):
        out = model.apply(
            variables, *inputs, rngs={"dropout": rngs["dropout"]}, mutable=mutable, **kwargs
        )
        return out[0] if mutable else out

    floats: list[tuple[int, Layer]] = []
    module_types = {"": type(model.model if _is_wrapper(model) else model).__name__}
    with qnn.record_layers(mark=True) as records:
        with nn.intercept_methods(_float_layer_finder(records, floats, module_types)):
            jaxpr = jax.make_jaxpr(apply)(variables, *abstract_args)
    layers = [(i, _layer_of(record)) for i, record in enumerate(records)]
    ordered = sorted(layers + floats, key=lambda item: item[0])  # a float layer first
    return Graph(
        layers=tuple(layer for _, layer in ordered),
        jaxpr=jaxpr,
        variables=variables,
        num_variable_leaves=len(jax.tree.leaves(variables)),
        input_shapes=tuple(tuple(a.shape) for a in abstract_args),
        wrapped=_is_wrapper(model),
        module_types=module_types,
    )


def _name_of(path: tuple) -> str:
    return "/".join(map(str, path))


def _is_wrapper(model) -> bool:
    """Whether ``model`` is :func:`cgmq_jax.rules.quantize_model`'s wrapper of a linen model."""
    from cgmq_jax import rules

    return isinstance(model, rules.QuantizedModel)


def _trace_nnx(model, abstract_args: list, kwargs: dict) -> Graph:
    """:func:`trace` for a Flax NNX module: its whole state is the jaxpr's first inputs."""
    from flax import nnx

    from cgmq_jax import nnx as cnnx

    cnnx._refuse_plain_layers(model)
    graphdef, state = nnx.split(model)
    variables = jax.tree.map(_abstract, state)

    def apply(variables, *inputs):
        copy = nnx.merge(graphdef, variables)
        with cnnx.reporting_paths(copy):
            return copy(*inputs, **kwargs)

    with qnn.record_layers(mark=True) as records:
        jaxpr = jax.make_jaxpr(apply)(variables, *abstract_args)
    module_types = {_name_of(path): type(m).__name__ for path, m in nnx.iter_modules(model)}
    return Graph(
        module_types=module_types,
        layers=tuple(_layer_of(record) for record in records),
        jaxpr=jaxpr,
        variables=variables,
        num_variable_leaves=len(jax.tree.leaves(variables)),
        input_shapes=tuple(tuple(a.shape) for a in abstract_args),
    )


def _layer_of(record: qnn.LayerRecord) -> Layer:
    """The :class:`Layer` of a quantized (or ``quantize=False``) layer's record."""
    return Layer(
        record.path,
        record.options,
        record.input_shape,
        record.kernel_shape,
        record.output_shape,
        record.module,
        record.batched,
    )


def _float_layer_finder(records: list, floats: list[tuple[int, Layer]], module_types: dict):
    """An interceptor that appends ``(records so far, Layer)`` to ``floats`` for every call
    of an ``nn.Dense`` / ``nn.Conv`` that ran no quantized forward (so reported no record),
    refuses a layer kind whose MACs cannot be counted, and notes every module's class."""

    def find_float_layers(next_fun, call_args, call_kwargs, context):
        module = context.module
        if module.path:
            module_types.setdefault("/".join(map(str, module.path)), type(module).__name__)
        if context.method_name != "__call__" or not isinstance(module, _COUNTED + _UNCOUNTED):
            return next_fun(*call_args, **call_kwargs)
        before = len(records)
        out = next_fun(*call_args, **call_kwargs)
        if len(records) == before:  # no quantized forward ran: a float layer
            name = "/".join(module.path)
            if not isinstance(module, _COUNTED):
                raise ValueError(
                    f"layer {name!r} is a {type(module).__name__}, whose MACs cannot be "
                    "counted; use nn.Dense / nn.Conv (or QuantDense / QuantConv) there"
                )
            kernel = module.get_variable("params", "kernel")
            layer = Layer(
                tuple(module.path),
                None,
                tuple(jnp.shape(call_args[0])),
                tuple(kernel.shape),
                tuple(out.shape),
                module,
                qnn.is_batched(out),
            )
            floats.append((len(records), layer))
        return out

    return find_float_layers


def __getattr__(name: str):
    """``graph.ops`` / ``graph.Op``: the op graph moved to :mod:`cgmq_jax.opgraph`."""
    if name in ("ops", "Op"):
        from cgmq_jax import opgraph

        return getattr(opgraph, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
