"""One trace of a Flax model: its layers for the cost, its op graph for the export.

:func:`trace` runs ``model.apply`` once under ``jax.make_jaxpr`` (nothing is computed) with
every quantized layer reporting itself (:func:`cgmq_jax.nn.record_layers`) and marking its
input and output in the jaxpr (``checkpoint_name`` identities named ``cgmq:in:<i>`` /
``cgmq:out:<i>``). The result, a :class:`Graph`, holds

* ``layers``: every layer that does MACs, in call order (quantized ones from the records,
  plain ``nn.Dense`` / ``nn.Conv`` ones as float layers), with their shapes; the cost
  (:func:`cgmq_jax.cost.layer_specs`) is built from these, so the cost and the export count
  the same layers with the same MACs (:func:`macs`);
* ``jaxpr``: the computation, which :func:`ops` reads into the export's graph of integer
  ops (``docs/export.md``): between the layer marks it recognises ReLU / clip, max and
  sum pooling, sums and divisions (averages), residual adds, concatenation and reshapes,
  from the primitives themselves, never from class names. Anything else that touches an
  activation is an :class:`UnsupportedOp` naming the primitive and the module path.
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
from jax.extend.core import Literal

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


# --------------------------------------------------------------------------- op graph


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of the export's graph: tensor ``i + 1`` is op ``i``'s output, 0 the input."""

    op: str
    inputs: tuple[int, ...]
    attrs: dict
    path: str  # the module path the op was traced in (for messages)
    layer: int | None = None  # index into Graph.layers (quantized layers only)


_ALIASES = ("convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier")
_CALLS = (
    "jit",
    "pjit",
    "closed_call",
    "core_call",
    "remat",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "custom_lin",
)


def _module_path(eqn, skip: int = 1) -> str:
    """The module path an equation was traced in, less the first ``skip`` levels (the
    traced model itself, and :func:`cgmq_jax.rules.quantize_model`'s wrapper)."""
    parts = str(eqn.source_info.name_stack).split("/")
    kept = [p for p in parts[skip:] if p and "." not in p and not p.startswith(("jvp(", "vmap("))]
    return "/".join(kept) or "<top level>"


def _literal(var) -> float | None:
    """The scalar value of a literal operand, else ``None``."""
    if isinstance(var, Literal):
        value = np.asarray(var.val)
        if value.size == 1:
            return float(value.reshape(()))
    return None


def _is_mark(eqn, end: str) -> bool:
    name = eqn.params.get("name") if eqn.primitive.name == "name" else None
    return isinstance(name, str) and name.startswith(f"cgmq:{end}:")


def _sub_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            sub = eqn.params[key]
            return sub.jaxpr if hasattr(sub, "jaxpr") else sub
    return None


def _dyadic(value: float, path: str) -> list[int]:
    """``[m, e]`` with ``m * 2**e == value`` exactly (a float32 bound of a clip)."""
    mantissa, exponent = math.frexp(value)
    m, e = int(mantissa * (1 << 53)), exponent - 53
    while m and m % 2 == 0:
        m, e = m // 2, e + 1
    if m * 2.0**e != value:
        raise UnsupportedOp(f"{path}: clip bound {value!r} is not a finite number")
    return [m, 0 if m == 0 else e]


#: Primitives of activation functions the integer engine does not run (GELU, SiLU, ...).
_ACTIVATION_PRIMITIVES = ("integer_pow", "pow", "tanh", "erf", "logistic", "exp", "log", "sin")


def _fix(primitive: str, kind: str | None) -> str:
    """What the user can do about an unsupported op, from the module's class and the op."""
    if kind and "Norm" in kind and kind != "BatchNorm":
        return (
            f"a {kind} normalises each example by its own statistics, which integers cannot "
            "compute: exclude it (remove it from the model you export) or fold it (use a "
            "BatchNorm right after the Dense / Conv instead: quantize_model folds that one); "
        )
    if kind == "BatchNorm":
        return (
            "a BatchNorm is exported only folded into the Dense / Conv right before it: "
            "export the model quantize_model made (given a sample input for NNX), which "
            "folds it; "
        )
    if primitive in _ACTIVATION_PRIMITIVES:
        return (
            "an activation such as GELU, SiLU, sigmoid or tanh computes it: use a supported "
            "activation (nn.relu, nn.relu6, or a clip with constant bounds); "
        )
    return ""


class _Walker:
    """Reads a jaxpr into :class:`Op`\\ s, following the activations from the inputs.

    ``env`` maps a jaxpr variable that holds an activation to its tensor number. Each
    primitive on an activation is translated by its entry of :data:`_TRANSLATE`.
    """

    def __init__(self, graph: Graph):
        self.graph = graph
        self.ops: list[Op] = []
        self.layer_inputs: dict[int, int] = {}
        self.constants: dict = {}  # sub-jaxpr variables bound to scalar literals

    def constant(self, var) -> float | None:
        """The scalar value of a literal operand (or a variable bound to one), else ``None``."""
        value = _literal(var)
        if value is None and not isinstance(var, Literal):
            value = self.constants.get(var)
        return value

    def path(self, eqn) -> str:
        """The user's module path of ``eqn`` (the wrapper of ``quantize_model`` left out)."""
        return _module_path(eqn, 2 if self.graph.wrapped else 1)

    def fail(self, eqn, why: str):
        prim, path = eqn.primitive.name, self.path(eqn)
        where = "" if path == "<top level>" else path
        kind = self.graph.module_types.get(where)
        module = f"module {path!r}" + (f" (a {kind})" if kind else "")
        raise UnsupportedOp(
            f"cannot export op {prim!r} in {module}: {why}; {_fix(prim, kind)}the integer "
            "export runs quantized Dense / Conv layers, ReLU / ReLU6 / clip, max and average "
            "pooling, means, residual adds, concatenation and reshapes"
        )

    def emit(self, kind: str, inputs, path: str, attrs=None, layer=None) -> int:
        self.ops.append(Op(kind, tuple(inputs), dict(attrs or {}), path, layer))
        return len(self.ops)

    def walk(self, jaxpr, env: dict) -> None:
        for eqn in jaxpr.eqns:
            active = [
                i for i, v in enumerate(eqn.invars) if not isinstance(v, Literal) and v in env
            ]
            if _is_mark(eqn, "out"):  # computed from the layer's codes, not an activation
                self.layer_output(eqn, env)
            elif active:  # (no active input: it computes from parameters and constants only)
                self.eqn(eqn, active, env)
            elif eqn.primitive.name in _ALIASES and len(eqn.invars) == 1:
                value = self.constant(eqn.invars[0])
                if value is not None:
                    self.constants[eqn.outvars[0]] = value

    def layer_output(self, eqn, env: dict) -> None:
        index = int(eqn.params["name"].rsplit(":", 1)[1])
        if index not in self.layer_inputs:
            self.fail(eqn, "a layer output without its input")
        layer = self._layer_index(index)
        path = self.path(eqn)
        if path == "<top level>" and self.graph.layers[layer].name:
            path = self.graph.layers[layer].name  # an NNX layer: no name stack, its own path
        env[eqn.outvars[0]] = self.emit(
            self.graph.layers[layer].kind, [self.layer_inputs[index]], path, layer=layer
        )

    def eqn(self, eqn, active: list[int], env: dict) -> None:
        """One equation with an activation among its inputs."""
        prim = eqn.primitive.name
        x = env[eqn.invars[active[0]]]
        if prim == "name":
            if _is_mark(eqn, "in"):
                self.layer_inputs[int(eqn.params["name"].rsplit(":", 1)[1])] = x
            else:
                env[eqn.outvars[0]] = x
        elif prim in _CALLS:
            self.call(eqn, env)
        elif prim in _TRANSLATE:
            env[eqn.outvars[0]] = _TRANSLATE[prim](self, eqn, x, active, env)
        else:
            self.fail(eqn, "this primitive is not one the integer engine runs")

    def call(self, eqn, env: dict) -> None:
        """Walk into a call's body (``jit``, ``remat``, custom derivatives, ...)."""
        sub = _sub_jaxpr(eqn)
        if sub is None:
            self.fail(eqn, "its body is not visible")
        ins, inner = eqn.invars, {}
        for outer, var in zip(ins[len(ins) - len(sub.invars) :], sub.invars, strict=True):
            if not isinstance(outer, Literal) and outer in env:
                inner[var] = env[outer]
            elif self.constant(outer) is not None:
                self.constants[var] = self.constant(outer)
        self.walk(sub, inner)
        for outer, var in zip(eqn.outvars, sub.outvars, strict=True):
            if not isinstance(var, Literal) and var in inner:
                env[outer] = inner[var]

    def _layer_index(self, record_index: int) -> int:
        """Index into ``graph.layers`` (which interleaves float layers) of record ``i``."""
        quantized = [i for i, layer in enumerate(self.graph.layers) if layer.options is not None]
        return quantized[record_index]


# The translations of the primitives the engine runs: ``(walker, eqn, x, active, env)`` ->
# the output's tensor number. ``x`` is the first activation input's tensor, ``active`` the
# positions of the inputs that are activations.


def _alias(w: _Walker, eqn, x: int, active, env) -> int:
    if eqn.primitive.name == "convert_element_type" and not jnp.issubdtype(
        eqn.params["new_dtype"], jnp.floating
    ):
        w.fail(eqn, "it converts an activation to an integer type")
    return x


def _relu_or_clip(w: _Walker, eqn, x: int, active, env) -> int:
    """``max(x, c)`` / ``min(x, c)``: a ReLU (``max`` with 0) or a one-sided clip."""
    prim, path = eqn.primitive.name, w.path(eqn)
    if len(active) != 1:
        w.fail(eqn, "it combines two activations")
    other = w.constant(eqn.invars[1 - active[0]])
    if other is None:
        w.fail(eqn, "its other operand is not a constant scalar")
    if prim == "max" and other == 0.0:
        return w.emit("relu", [x], path)
    bound = _dyadic(other, path)
    attrs = {"min": bound, "max": None} if prim == "max" else {"min": None, "max": bound}
    return w.emit("clip", [x], path, attrs)


def _clamp(w: _Walker, eqn, x: int, active, env) -> int:
    path = w.path(eqn)
    if active != [1]:
        w.fail(eqn, "its bounds are not constants")
    lo, hi = w.constant(eqn.invars[0]), w.constant(eqn.invars[2])
    if lo is None or hi is None:
        w.fail(eqn, "its bounds are not constant scalars")
    return w.emit("clip", [x], path, {"min": _dyadic(lo, path), "max": _dyadic(hi, path)})


def _pool(w: _Walker, eqn, x: int, active, env) -> int:
    p = eqn.params
    if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
        w.fail(eqn, "dilated pooling windows are not supported")
    if (
        p["window_dimensions"][0] != 1
        or p["window_strides"][0] != 1
        or tuple(p["padding"][0]) != (0, 0)
    ):
        w.fail(eqn, "it pools over the batch axis")
    attrs = {
        "window": [int(d) for d in p["window_dimensions"][1:]],
        "strides": [int(s) for s in p["window_strides"][1:]],
        "padding": [[int(a), int(b)] for a, b in p["padding"][1:]],
    }
    kind = "maxpool" if eqn.primitive.name == "reduce_window_max" else "sumpool"
    return w.emit(kind, [x], w.path(eqn), attrs)


def _sum(w: _Walker, eqn, x: int, active, env) -> int:
    axes = [int(a) for a in eqn.params["axes"]]
    if 0 in axes:
        w.fail(eqn, "it sums over the batch axis")
    return w.emit("sum", [x], w.path(eqn), {"axes": sorted(a - 1 for a in axes)})


def _div(w: _Walker, eqn, x: int, active, env) -> int:
    if active != [0]:
        w.fail(eqn, "it divides by an activation")
    by = w.constant(eqn.invars[1])
    if by is None or by < 1 or by != int(by):
        w.fail(eqn, f"it divides by {by!r}, not by a constant positive integer")
    return w.emit("div", [x], w.path(eqn), {"by": int(by)})


def _add(w: _Walker, eqn, x: int, active, env) -> int:
    ins = eqn.invars
    if len(active) != 2:
        w.fail(
            eqn,
            "it adds a constant or a parameter to an activation (an "
            "unfolded BatchNorm, or a bias outside a quantized layer?)",
        )
    if tuple(ins[0].aval.shape) != tuple(ins[1].aval.shape):
        w.fail(eqn, "its operands have different shapes (broadcasting)")
    return w.emit("add", [x, env[ins[active[1]]]], w.path(eqn))


def _concat(w: _Walker, eqn, x: int, active, env) -> int:
    ins = eqn.invars
    if len(active) != len(ins):
        w.fail(eqn, "it concatenates an activation with a constant")
    axis = int(eqn.params["dimension"])
    if axis == 0:
        w.fail(eqn, "it concatenates along the batch axis")
    return w.emit("concat", [env[v] for v in ins], w.path(eqn), {"axis": axis - 1})


def _reshape(w: _Walker, eqn, x: int, active, env) -> int:
    if len(active) != 1:
        w.fail(eqn, "it combines two activations")
    shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()
    before = tuple(eqn.invars[active[0]].aval.shape)
    if not shape or shape[0] != before[0] or math.prod(shape) != math.prod(before):
        w.fail(eqn, f"it changes the batch axis or the size ({before} -> {shape})")
    return w.emit("reshape", [x], w.path(eqn), {"shape": [int(n) for n in shape[1:]]})


_TRANSLATE = {
    **dict.fromkeys(_ALIASES, _alias),
    "max": _relu_or_clip,
    "min": _relu_or_clip,
    "clamp": _clamp,
    "reduce_window_max": _pool,
    "reduce_window_sum": _pool,
    "reduce_sum": _sum,
    "div": _div,
    "add": _add,
    "concatenate": _concat,
    **dict.fromkeys(("reshape", "squeeze", "expand_dims", "broadcast_in_dim"), _reshape),
}


def ops(graph: Graph) -> tuple[list[Op], int]:
    """The export's op graph of a traced model: ``(ops, output tensor)``.

    Raises:
      UnsupportedOp: an op on an activation the integer engine does not run, a layer that is
        not quantized, a model with several inputs or outputs.
    """
    jaxpr = graph.jaxpr.jaxpr
    if len(graph.input_shapes) != 1:
        raise UnsupportedOp(
            f"the integer export takes one input, the model has {len(graph.input_shapes)}"
        )
    for layer in graph.layers:
        if not layer.quantized:
            raise UnsupportedOp(
                f"layer {layer.name!r} is not quantized: the integer export needs every "
                "Dense / Conv quantized (QuantDense / QuantConv, or quantize_model)"
            )
    walker = _Walker(graph)
    x = jaxpr.invars[graph.num_variable_leaves]
    env = {x: 0}
    walker.walk(jaxpr, env)
    outputs = [v for v in jaxpr.outvars if not isinstance(v, Literal)]
    if len(jaxpr.outvars) != 1 or not outputs or outputs[0] not in env:
        raise UnsupportedOp("the model must return one array computed from its input")
    return _live(walker.ops, env[outputs[0]])


def _live(ops: list[Op], output: int) -> tuple[list[Op], int]:
    """Only the ops the output depends on (renumbered, in order), and the output's number."""
    needed, stack = set(), [output]
    while stack:
        tensor = stack.pop()
        if tensor and tensor not in needed:
            needed.add(tensor)
            stack.extend(ops[tensor - 1].inputs)
    number = {0: 0}
    kept = []
    for j, op in enumerate(ops):
        if j + 1 in needed:
            kept.append(dataclasses.replace(op, inputs=tuple(number[i] for i in op.inputs)))
            number[j + 1] = len(kept)
    return kept, number[output]
