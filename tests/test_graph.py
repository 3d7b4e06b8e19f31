"""Tests of cgmq_jax.graph: user-written linen models traced, exported and run in integers.

Every model here is small (8x8 / 12x12 inputs, few features) and written the way a user
would write it (``QuantConv`` / ``QuantDense``, or plain ``nn.Conv`` / ``nn.Dense`` under
``quantize_model``). Each is exported with :func:`cgmq_jax.export.writer.export`; the
integer engine must then reproduce every layer's input codes of the JAX fake-quant model
exactly and every prediction, and the file's BOPs must be the trainer's cost.
"""

from __future__ import annotations

import dataclasses
import math
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgmq_jax import cost, graph, models, opgraph, quantizer
from cgmq_jax.export import count_bops, load, run_integer, writer
from cgmq_jax.nn import QuantConv, QuantDense
from cgmq_jax.rules import QuantRule, quantize_model

EXAMPLES = 64


# --------------------------------------------------------------------------- helpers


def _unit_inputs(shape, seed, count=EXAMPLES):
    """Exact multiples of 2**-8 in [0, 1): integers at the export's input exponent -8."""
    ints = np.random.default_rng(seed).integers(0, 256, size=(count, *shape))
    return (ints / 256.0).astype(np.float32)


def _quantizer_leaf(value_range, bits, *, signed):
    """A quantizer leaf at exactly ``bits`` bits whose range covers ``value_range``
    (elementwise: one row per channel for a per-channel range)."""
    d, q_max = quantizer.init_at_bits(jnp.asarray(value_range, jnp.float32), bits, signed=signed)
    return quantizer.latents(d, q_max)


def _params(model, shape, bits, seed, *, signed=(), input_range=1.5):
    """Random parameters at mixed bit-widths, without compiling ``model.init``.

    The tree's structure comes from ``jax.eval_shape(model.init)``; kernels are
    ``N(0, 1 / fan_in)``, biases ``N(0, 0.3)`` (so that the bias rounding matters), a
    data-decided ``input_signed`` leaf is signed for the layers in ``signed``; every
    quantizer is at ``bits[layer] = (weight bits, input bits)`` (a weight quantizer's range
    ``max|W|``, per output channel for a per-channel layer; an input quantizer's
    ``input_range``). A pinned input quantizer is stored at range 0.5 (step ``2**-8``, 128
    levels), so only its pin gives it 255 levels (codes above 128 show that the pin is
    applied on both sides).
    """
    sample = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), sample)["params"]
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in flat.items():
        layer, name = "/".join(path[:-1]), path[-1]
        if name == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            value = rng.normal(0.0, fan_in**-0.5, leaf.shape)
        elif name == "bias":
            value = rng.normal(0.0, 0.3, leaf.shape)
        elif name == quantizer.INPUT_SIGNED:
            value = quantizer.signedness_leaf(layer in signed)
        else:  # a quantizer leaf, set below
            value = np.zeros(leaf.shape)
        params[path] = jnp.asarray(value, jnp.float32)
    params = flax.traverse_util.unflatten_dict(params)
    specs = cost.layer_specs(model, sample, params=params)
    assert sorted(bits) == sorted(spec.name for spec in specs)
    for spec in specs:
        node = params
        for key in spec.path:
            node = node[key]
        weight_bits, input_bits = bits[spec.name]
        per_channel = node["weight_quantizer"].ndim == 2
        w_range = jnp.max(jnp.abs(node["kernel"]), axis=tuple(range(node["kernel"].ndim - 1)))
        node["weight_quantizer"] = _quantizer_leaf(
            w_range if per_channel else jnp.max(w_range),
            spec.weight_bits or weight_bits,
            signed=True,
        )
        if spec.input_bits is None:
            leaf = _quantizer_leaf(input_range, input_bits, signed=spec.input_signed)
        else:  # stored narrower than its pin (step 2**-8, 128 levels): only the pin gives 255
            leaf = _quantizer_leaf(0.5, spec.input_bits, signed=spec.input_signed)
        node["input_quantizer"] = leaf
    return params, specs


def _export_and_compare(tmp_path, model, shape, bits, seed, signed=()):
    """Export, then: identical codes in every layer, all predictions, BOPs == the cost's."""
    params, specs = _params(model, shape, bits, seed, signed=signed)
    path = writer.export(params, model, tmp_path / "m.npz", input_shape=shape)
    images = _unit_inputs(shape, seed)
    result = writer.compare_with_model(path, params, model, images)
    assert sorted(result["code_mismatches"]) == sorted(bits)  # every layer compared
    for name, (mismatching, total, worst) in result["code_mismatches"].items():
        assert mismatching == 0, f"{name}: {mismatching} of {total} codes differ (by <= {worst})"
    assert result["agree"] == EXAMPLES, result
    x = jnp.zeros((1, *shape), jnp.float32)
    expected = cost.exact_bops(params, cost.layer_specs(model, x, params=params))
    assert count_bops(path)["bops"] == expected
    loaded = load(path)
    _, _, codes = run_integer(loaded, np.round(images * 256).astype(np.int64), return_codes=True)
    return loaded, codes


# --------------------------------------------------------------------------- models


class StridedSame(nn.Module):
    """stride-2 SAME conv -> ReLU6 -> explicit-padding per-channel conv -> ReLU ->
    SAME max pool -> flatten -> dense, on 8x8x1 (first input pinned at 8 bits)."""

    @nn.compact
    def __call__(self, x):
        x = QuantConv(
            4, (3, 3), strides=2, padding="SAME", input_signed=False, input_bits=8, name="conv1"
        )(x)
        x = jax.nn.relu6(x)
        x = QuantConv(4, (3, 3), padding=((1, 2), (0, 1)), per_channel=True, name="conv2")(x)
        x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding="SAME")
        return QuantDense(3, name="fc")(jnp.reshape(x, (x.shape[0], -1)))


class Dilated1D(nn.Module):
    """1-D convs on (N, L, C): kernel dilation 2, input dilation 2; a clip to [0, 4] written
    with min / max; a dense on the 3-D (N, T, F) activation (no flatten), flatten, dense."""

    @nn.compact
    def __call__(self, x):
        x = QuantConv(3, (3,), kernel_dilation=2, padding="VALID", name="c1")(x)
        x = nn.relu(x)
        x = QuantConv(4, (2,), input_dilation=2, padding=((1, 1),), name="c2")(x)
        x = jnp.minimum(jnp.maximum(x, 0.0), 4.0)
        x = nn.relu(QuantDense(5, name="per_step")(x))  # (N, T, 4) -> (N, T, 5)
        return QuantDense(3, name="fc")(jnp.reshape(x, (x.shape[0], -1)))


class GroupedPooled(nn.Module):
    """groups=2 conv -> ReLU -> depthwise conv -> ReLU -> avg pool 2 -> global mean -> dense,
    on 8x8x2."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QuantConv(4, (3, 3), padding="SAME", feature_group_count=2, name="grouped")(x))
        x = nn.relu(QuantConv(4, (3, 3), padding="VALID", feature_group_count=4, name="dw")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return QuantDense(3, name="fc")(x)


class Residual(nn.Module):
    """stem -> ReLU -> (a 1x1 conv) + (a 3x3 conv), no ReLU: the sum is signed -> a conv
    whose input signedness the data decides (signed) -> ReLU -> flatten -> dense with an
    explicitly signed input, on 8x8x1."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(QuantConv(4, (3, 3), padding="SAME", input_signed=False, name="stem")(x))
        s = QuantConv(4, (1, 1), name="a")(h) + QuantConv(4, (3, 3), padding="SAME", name="b")(h)
        y = nn.relu(QuantConv(3, (3, 3), strides=2, padding="VALID", name="post")(s))
        return QuantDense(3, input_signed=True, name="fc")(jnp.reshape(y, (y.shape[0], -1)))


class Concat(nn.Module):
    """Two branches on the input (one pinned at 8 input bits), ReLU, concatenated on the
    channel axis, SAME max pool, flatten, dense, on 8x8x1."""

    @nn.compact
    def __call__(self, x):
        left = nn.relu(QuantConv(3, (3, 3), padding="SAME", input_signed=False, name="left")(x))
        right = QuantConv(2, (1, 1), input_bits=8, input_signed=False, name="right")(x)
        x = jnp.concatenate([left, nn.relu(right)], axis=-1)
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        return QuantDense(3, per_channel=True, name="fc")(jnp.reshape(x, (x.shape[0], -1)))


class JnpClip(nn.Module):
    """dense -> ``jnp.clip(x, 0, 4)`` -> dense, on 8 features."""

    @nn.compact
    def __call__(self, x):
        x = jnp.clip(QuantDense(6, input_signed=False, name="fc1")(x), 0, 4)
        return QuantDense(3, name="fc2")(x)


class PlainNet(nn.Module):
    """A plain linen model (nn.Conv / nn.Dense only), quantized by ``quantize_model``."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME", name="conv")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(6, name="hidden")(jnp.reshape(x, (x.shape[0], -1))))
        return nn.Dense(3, name="head")(x)


RULES = [QuantRule(module_path="hidden", per_channel=True), QuantRule()]
# The first layer's input pinned at 8 bits and declared unsigned by its rule.
PINNED_RULES = [QuantRule(module_path="conv", input_bits=8, input_signed=False), *RULES]


@dataclasses.dataclass(frozen=True)
class Case:
    model: nn.Module
    shape: tuple[int, ...]  # one example
    bits: dict  # {layer: (weight bits, input bits)}
    ops: list  # the file's op kinds, in order
    layers: dict  # {layer: {header field: expected value}}
    op_attrs: dict = dataclasses.field(default_factory=dict)  # {op index: {attr: value}}
    signed: tuple = ()  # layers whose data-decided input quantizer is signed
    standard_promotion: bool = False  # flax's avg_pool divides by a numpy integer


CASES = {
    "strided_same": Case(
        StridedSame(),
        (8, 8, 1),
        {"conv1": (3, 8), "conv2": (4, 3), "fc": (3, 4)},
        ["conv", "relu", "clip", "conv", "relu", "maxpool", "reshape", "dense"],
        {
            "conv1": {
                "strides": [2, 2],
                "padding": [[0, 1], [0, 1]],
                "input_bits": 8,
                "input_signed": False,
                "output_shape": [4, 4, 4],
            },
            "conv2": {
                "padding": [[1, 2], [0, 1]],
                "per_channel": True,
                "weight_bits": [4] * 4,
                "output_shape": [5, 3, 4],
                "input_signed": False,
            },
            "fc": {"input_shape": [24], "input_bits": 4},
        },
        {
            2: {"min": None, "max": [3, 1]},  # ReLU6: max(x, 0) (a relu), then min(x, 6)
            5: {"window": [3, 3, 1], "strides": [2, 2, 1], "padding": [[1, 1], [1, 1], [0, 0]]},
        },
    ),
    "dilated_1d": Case(
        Dilated1D(),
        (12, 2),
        {"c1": (4, 5), "c2": (3, 2), "per_step": (2, 3), "fc": (5, 4)},
        ["conv", "relu", "conv", "relu", "clip", "dense", "relu", "reshape", "dense"],
        {
            "c1": {
                "kernel_dilation": [2],
                "input_dilation": [1],
                "padding": [[0, 0]],
                "output_shape": [8, 3],
            },
            "c2": {
                "kernel_dilation": [1],
                "input_dilation": [2],
                "padding": [[1, 1]],
                "output_shape": [16, 4],
            },
            "per_step": {
                "kind": "dense",
                "input_shape": [16, 4],
                "output_shape": [16, 5],
                "macs": 16 * 4 * 5,
            },
            "fc": {"input_shape": [80]},
        },
        {4: {"min": None, "max": [1, 2]}},  # min(x, 4.0) (the max(x, 0.0) is a relu)
    ),
    "grouped_pooled": Case(
        GroupedPooled(),
        (8, 8, 2),
        {"grouped": (3, 4), "dw": (4, 3), "fc": (4, 5)},
        ["conv", "relu", "conv", "relu", "sumpool", "div", "sum", "div", "dense"],
        {
            "grouped": {
                "groups": 2,
                "kernel_shape": [3, 3, 1, 4],
                "padding": [[1, 1], [1, 1]],
                "macs": 8 * 8 * 4 * 9,
            },
            "dw": {"groups": 4, "kernel_shape": [3, 3, 1, 4], "output_shape": [6, 6, 4]},
            "fc": {"input_shape": [4]},
        },
        {
            4: {"window": [2, 2, 1], "strides": [2, 2, 1]},
            5: {"by": 4},
            6: {"axes": [0, 1]},
            7: {"by": 9},
        },
        standard_promotion=True,
    ),
    "residual": Case(
        Residual(),
        (8, 8, 1),
        {"stem": (4, 6), "a": (2, 3), "b": (6, 4), "post": (3, 4), "fc": (4, 3)},
        ["conv", "relu", "conv", "conv", "add", "conv", "relu", "reshape", "dense"],
        {
            "stem": {"input_signed": False},
            "a": {"input_signed": False, "weight_bits": 2},
            "b": {"input_signed": False, "weight_bits": 6},
            "post": {"input_signed": True, "strides": [2, 2], "input_bits": 4},
            "fc": {"input_signed": True, "input_bits": 3},
        },
        {4: {"inputs": [3, 4]}},
        signed=("post",),
    ),
    "concat": Case(
        Concat(),
        (8, 8, 1),
        {"left": (3, 5), "right": (5, 8), "fc": (4, 3)},
        ["conv", "relu", "conv", "relu", "concat", "maxpool", "reshape", "dense"],
        {
            "left": {"input_signed": False, "input_bits": 5},
            "right": {"input_signed": False, "input_bits": 8},
            "fc": {"per_channel": True, "weight_bits": [4, 4, 4], "input_shape": [80]},
        },
        {4: {"inputs": [2, 4], "axis": 2}, 5: {"padding": [[0, 0], [0, 0], [0, 0]]}},
    ),
    "quantize_model": Case(
        quantize_model(PlainNet(), RULES),
        (12, 12, 3),
        {"conv": (4, 6), "hidden": (3, 4), "head": (5, 3)},
        ["conv", "relu", "maxpool", "reshape", "dense", "relu", "dense"],
        {
            "conv": {"strides": [2, 2], "input_signed": False, "output_shape": [6, 6, 4]},
            "hidden": {"per_channel": True, "weight_bits": [3] * 6, "input_shape": [36]},
            "head": {"per_channel": False, "weight_bits": 5},
        },
    ),
    "quantize_model_pinned": Case(
        quantize_model(PlainNet(), PINNED_RULES),
        (12, 12, 3),
        {"conv": (4, 8), "hidden": (3, 4), "head": (5, 3)},
        ["conv", "relu", "maxpool", "reshape", "dense", "relu", "dense"],
        {
            "conv": {
                "input_bits": 8,
                "input_levels": 255,
                "input_exponent": -8,
                "input_signed": False,
            }
        },
    ),
    "jnp_clip": Case(
        JnpClip(),
        (8,),
        {"fc1": (3, 4), "fc2": (4, 3)},
        ["dense", "relu", "clip", "dense"],  # max(x, 0) then min(., 4)
        {},
        {2: {"min": None, "max": [1, 2]}},
    ),
}


# --------------------------------------------------------------------------- export == model


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow  # compiles whole training steps or many programs
def test_export_reproduces_the_model(tmp_path, name):
    """Identical input codes in every layer, all predictions, BOPs equal to the cost's; the
    file's ops, geometry, bit-widths and signedness are the model's."""
    case = CASES[name]
    seed = list(CASES).index(name)
    promotion = "standard" if case.standard_promotion else "strict"
    with jax.numpy_dtype_promotion(promotion):
        loaded, codes = _export_and_compare(
            tmp_path, case.model, case.shape, case.bits, seed, signed=case.signed
        )
    assert [op["op"] for op in loaded.header["ops"]] == case.ops
    for index, attrs in case.op_attrs.items():
        op = loaded.header["ops"][index]
        assert {key: op[key] for key in attrs} == attrs, (index, op)
    by_name = {layer["name"]: layer for layer in loaded.layers}
    for layer, fields in case.layers.items():
        assert {key: by_name[layer][key] for key in fields} == fields, layer
    for layer in loaded.layers:  # the bits set (or pinned) are the file's bits
        weight_bits, input_bits = case.bits[layer["name"]]
        stated = layer["weight_bits"]
        assert (stated if isinstance(stated, int) else max(stated)) == weight_bits, layer["name"]
        assert layer["input_bits"] == input_bits, layer["name"]
        if not layer["input_signed"]:
            assert codes[layer["name"]].min() >= 0, layer["name"]
        if layer["input_bits"] == 8:  # the pinned layers: at the pin's 255 levels, used
            assert layer["input_levels"] == 255 and codes[layer["name"]].max() > 128
    if name == "residual":
        assert codes["post"].min() < 0  # the sum of the branches is signed, and so its codes
        tensors = loaded.facts.tensors  # the two branches reach the add at different exponents
        a, b = loaded.header["ops"][4]["inputs"]
        assert tensors[a].exponent != tensors[b].exponent


# --------------------------------------------------------------------------- refusals


class Act(nn.Module):
    """One computation on an activation that the integer export cannot run."""

    kind: str

    @nn.compact
    def __call__(self, x):
        if self.kind == "tanh":
            return jnp.tanh(x)
        if self.kind == "sigmoid":
            return jax.nn.sigmoid(x)
        if self.kind == "scale":  # an activation times a parameter
            return x * self.param("scale", nn.initializers.ones, (1, x.shape[-1]))
        if self.kind == "layer_norm":
            return nn.LayerNorm(name="ln")(x)
        if self.kind == "float_dense":  # a plain nn.Dense that nothing quantizes
            return nn.Dense(4, name="plain")(x)
        raise AssertionError(self.kind)


class Refused(nn.Module):
    """dense -> ``Act`` (named ``act``) -> dense, on 6 features."""

    kind: str

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QuantDense(4, input_signed=False, name="fc1")(x))
        return QuantDense(3, name="fc2")(Act(self.kind, name="act")(x))


@pytest.mark.parametrize(
    ("kind", "fragments"),
    [
        ("tanh", ["op 'tanh'", "module 'act'"]),
        ("sigmoid", ["op 'logistic'", "module 'act'"]),
        ("scale", ["op 'mul'", "module 'act'"]),
        # LayerNorm's mean (a sum and a division) is exportable; its variance is not.
        ("layer_norm", [r"op '(square|integer_pow|mul)'", "module 'act/ln'"]),
        ("float_dense", ["layer 'act/plain' is not quantized"]),
    ],
)
@pytest.mark.slow  # compiles whole training steps or many programs
def test_unsupported_ops_are_refused(tmp_path, kind, fragments):
    """``opgraph.ops`` and ``export`` raise a ValueError naming the primitive and the module."""
    model = Refused(kind)
    sample = jax.ShapeDtypeStruct((1, 6), jnp.float32)
    with pytest.raises(graph.UnsupportedOp) as info:
        opgraph.ops(graph.trace(model, sample))
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert re.search(fragment, str(info.value)), str(info.value)
    params = jax.eval_shape(model.init, jax.random.key(0), sample)["params"]
    with pytest.raises(ValueError) as info:
        writer.export(params, model, tmp_path / "m.npz", input_shape=(6,))
    for fragment in fragments:
        assert re.search(fragment, str(info.value)), str(info.value)
    assert not (tmp_path / "m.npz").exists()


def test_op_graph_names_still_reachable_from_graph():
    """The op graph moved to ``cgmq_jax.opgraph``; ``graph.ops`` / ``graph.Op`` still work."""
    assert graph.ops is opgraph.ops
    assert graph.Op is opgraph.Op
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        graph.nothing  # noqa: B018


class PaddedConv(nn.Module):
    padding: str

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QuantConv(2, (3, 3), padding=self.padding, input_signed=False, name="conv")(x))
        return QuantDense(3, name="fc")(jnp.reshape(x, (x.shape[0], -1)))


@pytest.mark.parametrize("padding", ["CIRCULAR", "REFLECT"])
def test_non_zero_padding_is_refused(tmp_path, padding):
    """The integer conv pads with code 0 only: a wrap-around / mirrored padding is refused by
    the export, naming the layer and its padding (the cost still counts it)."""
    model = PaddedConv(padding)
    params, specs = _params(model, (8, 8, 1), {"conv": (4, 4), "fc": (4, 4)}, seed=0)
    assert [spec.macs for spec in specs] == [8 * 8 * 2 * 9, 8 * 8 * 2 * 3]
    with pytest.raises(ValueError, match=f"layer 'conv': padding '{padding}' is not exported"):
        writer.export(params, model, tmp_path / "m.npz", input_shape=(8, 8, 1))
    assert not (tmp_path / "m.npz").exists()


# --------------------------------------------------------------------------- library models


_LENET_FEATURES = ["conv", "relu", "maxpool"] * 2 + ["reshape"]
LIBRARY_OPS = {
    "lenet5": _LENET_FEATURES + ["dense", "relu"] * 2 + ["dense"],
    "lenet5_bb": _LENET_FEATURES + ["dense", "relu", "dense"],
    "mlp": ["reshape"] + ["dense", "relu"] * 2 + ["dense"],
    "dscnn": ["conv", "relu"]  # stem
    + ["conv", "relu"] * 4  # blocks 1 and 2: depthwise, pointwise
    + ["conv", "relu", "conv", "add", "relu"] * 2  # blocks 3 and 4: residual
    + ["sum", "div", "dense"],  # global average, logits
}
LIBRARY_MACS = {"lenet5": 281_640, "lenet5_bb": 4_267_008, "mlp": 266_200, "dscnn": 1_201_728}


@pytest.mark.slow  # compiles whole training steps or many programs
def test_library_models_trace_cost_and_op_graph():
    """For every model of cgmq_jax.models: the trace's layers are the cost's (same names,
    same MACs), and the op graph is the expected one, each layer once and in order."""
    assert sorted(LIBRARY_OPS) == sorted(models.MODELS)
    sample = jax.ShapeDtypeStruct((graph.TRACE_BATCH, 28, 28, 1), jnp.float32)
    for name in models.MODELS:
        model = models.get_model(name)
        traced = graph.trace(model, sample)
        specs = cost.layer_specs(model, sample)
        assert [(layer.name, layer.macs) for layer in traced.layers] == [
            (spec.name, spec.macs) for spec in specs
        ], name
        assert sum(layer.macs for layer in traced.layers) == LIBRARY_MACS[name]
        assert all(layer.quantized for layer in traced.layers)
        ops, output = opgraph.ops(traced)
        assert [op.op for op in ops] == LIBRARY_OPS[name], name
        assert output == len(ops)  # the last op's tensor: the logits
        assert [op.layer for op in ops if op.layer is not None] == list(range(len(specs)))
        assert all(op.inputs == (j,) for j, op in enumerate(ops) if op.op != "add")
        if name == "dscnn":
            adds = [(j, op.inputs) for j, op in enumerate(ops) if op.op == "add"]
            # each block's input (the ReLU before it) plus its pointwise conv's output
            assert adds == [(13, (10, 13)), (18, (15, 18))]
            (total,) = [op for op in ops if op.op == "sum"]
            (mean,) = [op for op in ops if op.op == "div"]
            assert total.attrs == {"axes": [0, 1]} and mean.attrs == {"by": 49}
