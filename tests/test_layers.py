"""Tests of cgmq_jax.nn's layers against flax.linen.Dense / Conv, and data-decided signedness.

Each trap of a layer that does not behave like Flax's: positional ``features``, int kernel
sizes and strides, every padding form, dilation, groups, 1-D and 3-D, dtypes. With
``quantize=False`` a layer must compute exactly the Flax layer with the same parameters.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgmq_jax import conv, cost, quantizer
from cgmq_jax import nn as cnn

# (Conv keyword arguments, input shape with batch, MACs per example counted by hand:
#  output positions x output channels x prod(window) x input channels / groups). As in
#  Flax, an int kernel_size is a 1-D window; the default padding is 'SAME'.
CONVS = {
    "kernel_size_int_1d": ({"features": 4, "kernel_size": 3}, (2, 10, 2), 10 * 4 * 3 * 2),
    "stride_2_padding_1": (
        {"features": 8, "kernel_size": (3, 3), "strides": 2, "padding": 1},
        (2, 9, 9, 3),
        5 * 5 * 8 * 9 * 3,
    ),
    "same_default": ({"features": 8, "kernel_size": (3, 3)}, (1, 7, 7, 2), 49 * 8 * 9 * 2),
    "pairs_padding": (
        {"features": 5, "kernel_size": (3, 2), "padding": ((1, 2), (0, 1))},
        (1, 6, 6, 2),
        7 * 6 * 5 * 6 * 2,
    ),
    "circular": (
        {"features": 4, "kernel_size": (3, 3), "padding": "CIRCULAR"},
        (1, 6, 6, 2),
        36 * 4 * 9 * 2,
    ),
    "kernel_dilation_2": (
        {"features": 4, "kernel_size": (3, 3), "kernel_dilation": 2, "padding": "VALID"},
        (1, 9, 9, 2),
        5 * 5 * 4 * 9 * 2,
    ),
    "input_dilation_2": (
        {"features": 3, "kernel_size": (2, 2), "input_dilation": 2, "padding": 0},
        (1, 5, 5, 2),
        8 * 8 * 3 * 4 * 2,
    ),
    "causal_1d": (
        {"features": 3, "kernel_size": 4, "padding": "CAUSAL"},
        (2, 12, 2),
        12 * 3 * 4 * 2,
    ),
    "conv_3d": (
        {"features": 4, "kernel_size": (2, 3, 3), "padding": "VALID"},
        (1, 5, 6, 6, 2),
        4 * 4 * 4 * 4 * 18 * 2,
    ),
    "depthwise": (
        {"features": 8, "kernel_size": (3, 3), "feature_group_count": 4, "padding": "VALID"},
        (1, 6, 6, 4),
        4 * 4 * 8 * 9 * 1,
    ),
}


def _inputs(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _max_error(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize(
    ("flax_cls", "ours"), [(nn.Dense, cnn.QuantDense), (nn.Conv, cnn.QuantConv)]
)
def test_fields_are_flax_fields_then_keyword_quantizer_options(flax_cls, ours):
    flax_fields = [f for f in dataclasses.fields(flax_cls) if f.name not in ("parent", "name")]
    our_fields = [f for f in dataclasses.fields(ours) if f.name not in ("parent", "name")]
    n = len(flax_fields)
    assert [(f.name, f.default) for f in our_fields[:n]] == [
        (f.name, f.default) for f in flax_fields
    ]
    extra = our_fields[n:]
    options = [(f.name, f.default) for f in dataclasses.fields(cnn.QuantOptions)]
    assert [(f.name, f.default) for f in extra] == options
    assert options[:2] == [("quantize", True), ("input_signed", None)]
    assert all(f.kw_only for f in extra)


def test_dense_features_is_the_first_field():
    x = _inputs((2, 6))
    params = cnn.QuantDense(10).init(jax.random.key(0), x)["params"]
    assert params["kernel"].shape == (6, 10)
    assert cnn.QuantDense(10).apply({"params": params}, x).shape == (2, 10)


def test_conv_features_and_kernel_size_are_positional():
    x = _inputs((1, 8, 8, 3))
    params = cnn.QuantConv(8, (3, 3)).init(jax.random.key(0), x)["params"]
    assert params["kernel"].shape == (3, 3, 3, 8)
    assert cnn.QuantConv(8, (3, 3)).apply({"params": params}, x).shape == (1, 8, 8, 8)


@pytest.mark.parametrize("use_bias", [True, False])
def test_float_dense_is_flax_dense(use_bias):
    x = _inputs((3, 7))
    params = nn.Dense(5, use_bias=use_bias).init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda v: v + 0.1, params)  # a non-zero bias
    expected = nn.Dense(5, use_bias=use_bias).apply({"params": params}, x)
    ours = cnn.QuantDense(5, use_bias=use_bias, quantize=False)
    np.testing.assert_array_equal(ours.apply({"params": params}, x), expected)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)["params"]) == jax.tree.map(
        jnp.shape, params
    )


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.slow  # compiles whole training steps or many programs
def test_conv_matches_flax_and_counts_macs(name):
    kwargs, shape, hand_macs = CONVS[name]
    x = _inputs(shape)
    reference = nn.Conv(**kwargs)
    params = reference.init(jax.random.key(2), x)["params"]
    params = dict(params, bias=params["bias"] + 0.1)
    expected = reference.apply({"params": params}, x)
    float_layer = cnn.QuantConv(**kwargs, quantize=False)
    np.testing.assert_array_equal(float_layer.apply({"params": params}, x), expected)
    # Quantized at 8 bits (initialised on x: signed input, decided by the data): close.
    layer = cnn.QuantConv(**kwargs)
    qparams = layer.init(jax.random.key(2), x)["params"]
    np.testing.assert_array_equal(
        qparams["kernel"], reference.init(jax.random.key(2), x)["params"]["kernel"]
    )
    assert float(qparams[quantizer.INPUT_SIGNED]) == 1.0
    qparams = dict(qparams, bias=params["bias"])
    y = layer.apply({"params": qparams}, x)
    assert y.shape == expected.shape
    assert _max_error(y, expected) <= 0.05 * float(np.max(np.abs(expected)))
    specs = cost.layer_specs(layer, x, params=qparams)
    assert [(s.macs, s.input_signed) for s in specs] == [(hand_macs, True)]


@pytest.mark.slow  # compiles whole training steps or many programs
def test_bfloat16_layers_match_flax():
    x = _inputs((2, 6, 6, 3))
    for reference, ours in (
        (
            nn.Conv(4, 3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
            cnn.QuantConv(4, 3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
        ),
        (nn.Dense(5, dtype=jnp.bfloat16), cnn.QuantDense(5, dtype=jnp.bfloat16)),
    ):
        params = reference.init(jax.random.key(3), x)["params"]
        expected = reference.apply({"params": params}, x)
        got = ours.clone(quantize=False).apply({"params": params}, x)
        assert got.dtype == expected.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
        qparams = ours.init(jax.random.key(3), x)["params"]
        assert qparams["kernel"].dtype == params["kernel"].dtype
        y = ours.apply({"params": qparams}, x)
        assert y.dtype == jnp.bfloat16 and y.shape == expected.shape
        float_y = reference.apply({"params": cnn.strip_quantizers(qparams)}, x)
        assert _max_error(y, float_y) <= 0.05 * float(
            np.max(np.abs(np.asarray(float_y, np.float32)))
        )


def test_default_input_quantizer_keeps_negative_inputs():
    # The trap: an unsigned input quantizer clips the negative half to 0 (sum 2.28).
    x = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)[None]
    layer = cnn.QuantDense(1, use_bias=False, kernel_init=nn.initializers.ones)
    params = layer.init(jax.random.key(0), x)["params"]
    assert float(params[quantizer.INPUT_SIGNED]) == 1.0
    y = float(layer.apply({"params": params}, x)[0, 0])
    assert abs(y) < 0.02, y
    # The same decision on non-negative data is unsigned.
    params = layer.init(jax.random.key(0), jnp.abs(x))["params"]
    assert float(params[quantizer.INPUT_SIGNED]) == -1.0


class _Net(nn.Module):
    """dense 6 (decided) -> relu -> dense 3 (decided, or as ``head_signed``)."""

    quantized: bool = True
    head_signed: bool | None = None

    @nn.compact
    def __call__(self, x):
        x = nn.relu(cnn.QuantDense(6, quantize=self.quantized, name="body")(x))
        x = x - 0.5 * (self.head_signed is False)  # negative inputs for an unsigned head
        head = cnn.QuantDense(
            3, quantize=self.quantized, input_signed=self.head_signed, name="head"
        )
        return head(x)


@pytest.mark.slow  # compiles whole training steps or many programs
def test_init_quantizers_decides_signedness_from_the_calibration_data():
    x = _inputs((16, 5), seed=4)
    model = _Net()
    float_params = _Net(quantized=False).init(jax.random.key(0), x)["params"]
    params = cnn.init_quantizers(model, float_params, x)
    assert float(params["body"][quantizer.INPUT_SIGNED]) == 1.0  # normal inputs
    assert float(params["head"][quantizer.INPUT_SIGNED]) == -1.0  # ReLU outputs
    specs = cost.layer_specs(model, x, params=params)
    assert [s.input_signed for s in specs] == [True, False]
    rows = cost.layer_table(params, specs)
    assert [(r["weight_bits"], r["input_bits"]) for r in rows] == [(8, 8), (8, 8)]
    jitted = jax.jit(lambda p, b: cnn.init_quantizers(model, p, b))(float_params, x)
    jax.tree.map(np.testing.assert_array_equal, jitted, params)
    with pytest.raises(ValueError, match="'body' decides its input signedness"):
        cost.layer_specs(model, x)
    assert set(cnn.strip_quantizers(params)["body"]) == {"kernel", "bias"}


@pytest.mark.slow  # compiles whole training steps or many programs
def test_explicit_unsigned_with_negative_inputs_raises_naming_the_layer():
    x = jnp.abs(_inputs((4, 5), seed=5))
    model = _Net(head_signed=False)
    message = r"layer 'head' has input_signed=False .* input_signed=None"
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), x)
    float_params = _Net(quantized=False).init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=message):
        cnn.init_quantizers(model, float_params, x)
    with pytest.raises(Exception, match=message):  # under jit: when the compiled code runs
        jax.block_until_ready(jax.jit(lambda b: model.init(jax.random.key(0), b))(x))


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.slow  # compiles whole training steps or many programs
def test_patch_conv_is_the_direct_convolution_bit_for_bit_when_quantized(name, monkeypatch):
    """One input channel: the quantized layer takes :func:`cnn.patch_conv`; its output is
    the direct convolution's exactly (exact sums of codes), its gradients to float
    tolerance."""
    kwargs, shape, _ = CONVS[name]
    if kwargs.get("feature_group_count", 1) != 1:
        kwargs = {**kwargs, "feature_group_count": 1}
    x = _inputs((*shape[:-1], 1), seed=3)
    layer = cnn.QuantConv(**kwargs)
    params = layer.init(jax.random.key(2), x)["params"]

    def loss(params, x):
        return jnp.sum(jnp.sin(layer.apply({"params": params}, x)))

    def both(params, x):  # jitted afresh for each path: the flag is read when tracing
        return layer.apply({"params": params}, x), jax.grad(loss, argnums=(0, 1))(params, x)

    fast = jax.jit(both)(params, x)
    monkeypatch.setattr(cnn, "PATCH_CONV_MAX_CHANNELS", 0)
    direct = jax.jit(lambda params, x: both(params, x))(params, x)
    np.testing.assert_array_equal(fast[0], direct[0])
    for a, b in zip(jax.tree.leaves(fast[1]), jax.tree.leaves(direct[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strides", [1, 2])
def test_a_pointwise_conv_is_one_matrix_product_bit_for_bit_when_quantized(strides, monkeypatch):
    """A quantized 1x1 convolution (many channels, no groups) is computed as a matrix
    product, not XLA's convolution; the output is the direct one's exactly, the gradients
    to float tolerance."""
    layer = cnn.QuantConv(16, (1, 1), strides=strides, input_signed=False)
    x = jnp.abs(_inputs((2, 5, 5, 8), seed=5))
    params = layer.init(jax.random.key(2), x)["params"]

    def both(params, x):
        loss = lambda p, x: jnp.sum(jnp.sin(layer.apply({"params": p}, x)))  # noqa: E731
        return layer.apply({"params": params}, x), jax.grad(loss, argnums=(0, 1))(params, x)

    def program(params, x):  # traced afresh: the flag is read when tracing
        return str(jax.make_jaxpr(lambda p, x: both(p, x))(params, x))

    assert "conv_general_dilated" not in program(params, x)
    fast = jax.jit(both)(params, x)
    monkeypatch.setattr(cnn, "PATCH_CONV_POINTWISE", False)
    assert "conv_general_dilated" in program(params, x)
    direct = jax.jit(lambda params, x: both(params, x))(params, x)
    np.testing.assert_array_equal(fast[0], direct[0])
    for a, b in zip(jax.tree.leaves(fast[1]), jax.tree.leaves(direct[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strides", [(1, 1), (2, 1), (2, 3)])
@pytest.mark.parametrize("padding", ["VALID", "SAME", ((1, 2), (0, 1)), ((-1, 1), (2, 0))])
@pytest.mark.parametrize("dilation", [(1, 1), (2, 1)])
@pytest.mark.slow  # compiles whole training steps or many programs
def test_patch_conv_matches_lax_conv_general_dilated(strides, padding, dilation):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(-3, 4, (2, 9, 8, 2)), jnp.float32)
    kernel = jnp.asarray(rng.integers(-3, 4, (3, 2, 2, 3)), jnp.float32)
    expected = jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    got = cnn.patch_conv(x, kernel, strides, padding, rhs_dilation=dilation)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("strides", [(1, 1), (2, 2), (2, 1)])
@pytest.mark.parametrize("padding", ["VALID", "SAME", ((1, 2), (0, 1))])
@pytest.mark.slow  # compiles whole training steps or many programs
def test_depthwise_patch_conv_matches_lax_and_the_quantized_layer(strides, padding, monkeypatch):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(-3, 4, (2, 9, 8, 4)), jnp.float32)
    kernel = jnp.asarray(rng.integers(-3, 4, (3, 3, 1, 4)), jnp.float32)
    expected = jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=4,
    )
    got = cnn.patch_conv(x, kernel, strides, padding, feature_group_count=4)
    np.testing.assert_array_equal(got, expected)
    # The quantized depthwise layer takes the patches; its output is the direct one's.
    layer = cnn.QuantConv(
        8, (3, 3), strides=strides, padding=padding, feature_group_count=8, input_signed=False
    )
    images = jnp.abs(_inputs((2, 9, 8, 8), seed=4))
    params = layer.init(jax.random.key(2), images)["params"]
    fast = layer.apply({"params": params}, images)
    monkeypatch.setattr(cnn, "PATCH_CONV_MAX_CHANNELS", 0)
    np.testing.assert_array_equal(fast, layer.apply({"params": params}, images))
    with pytest.raises(ValueError, match="depthwise"):
        cnn.patch_conv(x, jnp.ones((3, 3, 2, 4)), strides, padding, feature_group_count=2)


@pytest.mark.parametrize(
    ("shape", "strides", "padding", "dilation"),
    [
        ((2, 9, 8, 3), (1, 1), "SAME", (1, 1)),
        ((2, 9, 8, 3), (2, 2), "SAME", (1, 1)),
        ((2, 9, 8, 3), (2, 3), ((1, 2), (0, 1)), (2, 1)),
        ((2, 9, 8, 3), (1, 2), ((-1, 1), (2, 0)), (1, 2)),
        ((2, 11, 3), (3,), "VALID", (2,)),  # 1-D
        ((1, 5, 6, 4, 2), (2, 1, 1), "SAME", (1, 1, 1)),  # 3-D
    ],
)
@pytest.mark.parametrize("function", ["patch_conv", "depthwise_conv"])
def test_depthwise_patch_conv_gradients_are_those_of_lax(
    shape, strides, padding, dilation, function
):
    """The depthwise running sum has its own backward pass (``conv._depthwise_sum``), and
    so has the float layers' depthwise convolution (``conv.depthwise_conv``: XLA's forward
    pass): with integer values every sum is exact, so their gradients equal XLA's
    convolution's exactly, for any strides, padding (negative crops) and kernel dilation,
    in 1-3 spatial axes. ``depthwise_conv``'s forward pass is XLA's, for any values."""
    rng = np.random.default_rng(3)
    channels, rank = shape[-1], len(shape) - 2
    x = jnp.asarray(rng.integers(-3, 4, shape), jnp.float32)
    kernel = jnp.asarray(rng.integers(-3, 4, (*(3,) * (rank - 1), 2, 1, channels)), jnp.float32)
    spec = "".join("DHW"[3 - rank :])
    numbers = (f"N{spec}C", f"{spec}IO", f"N{spec}C")

    def loss(conv):
        def f(x, kernel):
            y = conv(
                x,
                kernel,
                strides,
                padding,
                rhs_dilation=dilation,
                feature_group_count=channels,
                dimension_numbers=numbers,
            )
            weights = jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) % 5 - 2
            return jnp.sum(y * weights)

        return jax.jit(jax.grad(f, argnums=(0, 1)))

    got = loss(getattr(conv, function))(x, kernel)
    expected = loss(jax.lax.conv_general_dilated)(x, kernel)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    if function == "depthwise_conv":
        noise = jnp.asarray(rng.normal(size=shape), jnp.float32)
        args = (strides, padding)
        options = {"rhs_dilation": dilation, "feature_group_count": channels}
        np.testing.assert_array_equal(
            conv.depthwise_conv(noise, kernel, *args, **options),
            jax.lax.conv_general_dilated(
                noise, kernel, *args, dimension_numbers=numbers, **options
            ),
        )


@pytest.mark.parametrize("function", ["patch_conv", "depthwise_conv"])
@pytest.mark.parametrize("first", [np.inf, np.nan, 2.0])
def test_depthwise_running_sums_with_a_non_finite_tap_are_those_of_lax(function, first):
    """The forward running sums are computed under a ``lax.cond`` on whether the kernel's
    first entry is finite, with the same function in both branches
    (``conv._computed_once``): either branch gives XLA's convolution's values and
    gradients, infinities and NaNs where it has them."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.integers(-3, 4, (2, 7, 6, 3)), jnp.float32)
    kernel = np.asarray(rng.integers(-3, 4, (3, 3, 1, 3)), np.float32)
    kernel[0, 0, 0, 0] = first
    kernel = jnp.asarray(kernel)
    options = {"feature_group_count": 3, "dimension_numbers": ("NHWC", "HWIO", "NHWC")}

    def run(conv_fn):
        def f(x, kernel):
            y = conv_fn(x, kernel, (2, 1), "SAME", **options)
            weights = jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) % 3 - 1.0
            return jnp.sum(y * weights), y

        return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(x, kernel)

    (got_x, got_k), got_y = run(getattr(conv, function))
    (want_x, want_k), want_y = run(jax.lax.conv_general_dilated)
    for got, want in ((got_y, want_y), (got_x, want_x), (got_k, want_k)):
        np.testing.assert_array_equal(got, want)


def test_float_depthwise_layer_is_flax_with_the_running_sums_gradient():
    """A float32 depthwise ``QuantConv(quantize=False)`` computes with
    ``conv.depthwise_conv``: Flax's output bit for bit for any values, and with integer
    values Flax's gradients exactly (the sums are exact in any order). bfloat16 keeps
    Flax's own convolution and gradient, and so does a grouped one that is not depthwise."""
    kwargs = {"features": 6, "kernel_size": (3, 3), "strides": 2, "feature_group_count": 6}
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.integers(-3, 4, (2, 7, 7, 6)), jnp.float32)
    reference = nn.Conv(**kwargs)
    params = reference.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda p: jnp.asarray(rng.integers(-3, 4, p.shape), p.dtype), params)
    ours = cnn.QuantConv(**kwargs, quantize=False)

    def grads(layer, x):
        return jax.grad(lambda p, x: jnp.sum(layer.apply({"params": p}, x) ** 2), (0, 1))(
            params, x
        )

    for got, expected in zip(
        jax.tree.leaves(grads(ours, x)), jax.tree.leaves(grads(reference, x)), strict=True
    ):
        np.testing.assert_array_equal(got, expected)
    noise = _inputs(x.shape, seed=6)
    np.testing.assert_array_equal(
        ours.apply({"params": params}, noise), reference.apply({"params": params}, noise)
    )

    def takes_running_sum(layer, x):
        own = layer.init(jax.random.key(0), x)["params"]
        loss = lambda p: jnp.sum(layer.apply({"params": p}, x).astype(jnp.float32))  # noqa: E731
        return "custom_vjp" in str(jax.make_jaxpr(jax.grad(loss))(own))

    assert takes_running_sum(ours, x)
    assert not takes_running_sum(cnn.QuantConv(**kwargs, quantize=False, dtype=jnp.bfloat16), x)
    grouped = dict(kwargs, features=6, feature_group_count=3)
    assert not takes_running_sum(cnn.QuantConv(**grouped, quantize=False), x)
    with pytest.raises(ValueError, match="depthwise"):
        conv.depthwise_conv(x, jnp.ones((3, 3, 2, 6)), (1, 1), "SAME", feature_group_count=3)


def _assert_same_as_lax(convolve, x, kernel, strides, padding, **options):
    """``convolve``'s output and both gradients (of a weighted sum of the output) equal
    ``jax.lax.conv_general_dilated``'s exactly, with the same arguments."""

    def run(convolve):
        def f(x, kernel):
            y = convolve(x, kernel, strides, padding, **options)
            weights = jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) % 5 - 2
            return jnp.sum(y * weights), y

        return jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(x, kernel)

    (got_grads, got), (grads, expected) = run(convolve), run(jax.lax.conv_general_dilated)
    np.testing.assert_array_equal(got, expected)
    for g, e in zip(got_grads, grads, strict=True):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize(
    ("shape", "strides", "padding", "dilation"),
    [
        ((2, 9, 8, 1), (1, 1), "VALID", (1, 1)),
        ((2, 9, 8, 1), (2, 3), "SAME", (1, 2)),
        ((2, 9, 8, 1), (1, 2), ((-1, 1), (2, 0)), (2, 1)),
        ((2, 11, 1), (2,), ((2, 1),), (2,)),  # 1-D
        ((1, 5, 6, 7, 1), (2, 1, 2), "SAME", (1, 1, 2)),  # 3-D
    ],
)
def test_one_channel_banded_conv_and_its_gradients_are_those_of_lax(
    shape, strides, padding, dilation, monkeypatch
):
    """One input channel into few filters runs as a banded matrix product
    (``conv._banded_conv``): with integer values every sum is exact, so its output and
    both gradients equal XLA's convolution's exactly, in 1-3 spatial axes."""
    rng = np.random.default_rng(4)
    rank = len(shape) - 2
    x = jnp.asarray(rng.integers(-3, 4, shape), jnp.float32)
    kernel = jnp.asarray(rng.integers(-3, 4, (*(3,) * (rank - 1), 2, 1, 4)), jnp.float32)
    spec = "".join("DHW"[3 - rank :])
    numbers = (f"N{spec}C", f"{spec}IO", f"N{spec}C")
    banded, band = [], conv._banded_conv
    monkeypatch.setattr(conv, "_banded_conv", lambda *args: banded.append(1) or band(*args))

    _assert_same_as_lax(
        cnn.patch_conv,
        x,
        kernel,
        strides,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=numbers,
    )
    assert banded, "the one-channel convolution did not take the banded product"


@pytest.mark.parametrize(
    ("shape", "strides", "padding"),
    [((2, 9, 8, 1), (1, 1), "VALID"), ((2, 9, 8, 1), (2, 3), "SAME"), ((2, 11, 1), (2,), "SAME")],
)
def test_one_channel_stacked_patches_and_their_gradients_are_those_of_lax(
    shape, strides, padding, monkeypatch
):
    """One input channel into more filters than the banded product takes: the patches are
    the columns stacked whole, the offsets moved last (``conv.patch_conv``); output and
    both gradients equal XLA's convolution's exactly (integer values)."""
    rng = np.random.default_rng(5)
    rank = len(shape) - 2
    filters = conv.BANDED_MAX_FILTERS + 4
    x = jnp.asarray(rng.integers(-3, 4, shape), jnp.float32)
    kernel = jnp.asarray(rng.integers(-3, 4, (*(3,) * rank, 1, filters)), jnp.float32)
    spec = "".join("DHW"[3 - rank :])
    numbers = (f"N{spec}C", f"{spec}IO", f"N{spec}C")
    monkeypatch.setattr(conv, "_banded_conv", lambda *args: pytest.fail("took the band"))

    _assert_same_as_lax(cnn.patch_conv, x, kernel, strides, padding, dimension_numbers=numbers)


@pytest.mark.parametrize(
    ("shape", "filters", "strides", "padding"),
    [
        ((2, 12, 10, 1), 32, (1, 1), "VALID"),  # lenet5_bb's conv1, smaller
        ((2, 9, 8, 1), 5, (2, 3), "SAME"),
        ((2, 11, 1), 4, (2,), "SAME"),
        ((2, 8, 7, 3), 6, (1, 2), ((1, 2), (0, 1))),  # several channels, explicit padding
    ],
)
def test_image_conv_and_its_gradients_are_those_of_lax(shape, filters, strides, padding):
    """``conv.image_conv`` (XLA's forward and kernel gradient, the patches' input
    gradient): output and both gradients equal XLA's convolution's exactly (integer
    values); groups and input dilation are refused by name."""
    rng = np.random.default_rng(6)
    rank = len(shape) - 2
    x = jnp.asarray(rng.integers(-3, 4, shape), jnp.float32)
    kernel = jnp.asarray(rng.integers(-3, 4, (*(3,) * rank, shape[-1], filters)), jnp.float32)
    spec = "".join("DHW"[3 - rank :])
    numbers = (f"N{spec}C", f"{spec}IO", f"N{spec}C")

    _assert_same_as_lax(cnn.image_conv, x, kernel, strides, padding, dimension_numbers=numbers)
    with pytest.raises(ValueError, match="image_conv has no feature groups"):
        cnn.image_conv(x, kernel, strides, padding, feature_group_count=2)
    with pytest.raises(ValueError, match="image_conv has no input dilation"):
        cnn.image_conv(x, kernel, strides, padding, lhs_dilation=(2,) * rank)


@pytest.mark.parametrize(
    ("shape", "window"),
    [
        ((2, 8, 8, 3), (2, 2)),
        ((2, 9, 7, 2), (2, 3)),
        ((3, 10, 4), (3,)),
        ((1, 4, 4, 4, 2), (2, 2, 2)),
    ],
)
@pytest.mark.slow  # compiles whole training steps or many programs
def test_max_pool_gradient_is_jaxs_first_maximum_rule(shape, window):
    """Same output as ``flax.linen.max_pool``, same gradient bit for bit, ties (ReLU zeros,
    repeated values) and cropped edges included."""
    x = jnp.round(jax.random.normal(jax.random.key(0), shape) * 2) / 2  # many ties
    x = jax.nn.relu(x)
    g = jax.random.normal(jax.random.key(1), cnn.max_pool(x, window).shape)

    def pulled(pool):
        y, vjp = jax.vjp(lambda x: pool(x, window, window), x)
        return y, vjp(g)[0]

    ours, reference = pulled(cnn.max_pool), pulled(nn.max_pool)
    np.testing.assert_array_equal(ours[0], reference[0])
    np.testing.assert_array_equal(ours[1], reference[1])
