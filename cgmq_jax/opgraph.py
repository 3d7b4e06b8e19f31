"""The export's op graph: the jaxpr of one trace (:func:`cgmq_jax.graph.trace`) read into
integer ops.

:func:`ops` walks the traced jaxpr from the model's input, between the layer marks that
:func:`cgmq_jax.graph.trace` leaves (``cgmq:in:<i>`` / ``cgmq:out:<i>``), and recognises
ReLU / clip, max and sum pooling, sums and divisions (averages), residual adds,
concatenation and reshapes from the primitives themselves, never from class names
(``docs/export.md``). Anything else that touches an activation is a
:class:`cgmq_jax.graph.UnsupportedOp` naming the primitive, the module path and, where
there is one, the fix. The lowering (:mod:`cgmq_jax.lowering`) turns these ops into the
integer file; :mod:`cgmq_jax.channels` and :mod:`cgmq_jax.compaction` follow channels
through them.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from cgmq_jax.graph import Graph, UnsupportedOp


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
