"""Tests of cgmq_jax.nnx: Flax NNX quantized layers, calibration, labels, cost, training.

The traps of issue 9 for NNX: ``param_labels`` labelled every leaf of an ``nnx.State`` as a
weight (so ``nnx.Optimizer`` with ``optax.partition`` failed), ``layer_specs`` needed
``.init``, there were no NNX layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_cli
from flax import nnx

from cgmq_jax import constrained_update, cost, data, quantizer
from cgmq_jax import nn as linen_layers
from cgmq_jax import nnx as cnnx
from cgmq_jax.train import batches

# (name, nnx.Conv / linen.Conv keyword arguments shared by both, input shape). As in Flax,
# an int kernel_size is a 1-D window; the default padding is 'SAME'.
CONVS = {
    "kernel_size_int_1d": ({"kernel_size": 3}, (2, 10, 2)),
    "stride_2_padding_1": ({"kernel_size": (3, 3), "strides": 2, "padding": 1}, (2, 9, 9, 2)),
    "circular": ({"kernel_size": (3, 3), "padding": "CIRCULAR"}, (1, 6, 6, 2)),
    "reflect": ({"kernel_size": (3, 3), "padding": "REFLECT"}, (1, 6, 6, 2)),
    "pairs_padding": ({"kernel_size": (3, 2), "padding": ((1, 2), (0, 1))}, (1, 6, 6, 2)),
    "kernel_dilation_2": (
        {"kernel_size": (3, 3), "kernel_dilation": 2, "padding": "VALID"},
        (1, 9, 9, 2),
    ),
    "input_dilation_2": ({"kernel_size": (2, 2), "input_dilation": 2, "padding": 0}, (1, 5, 5, 2)),
    "causal_1d": ({"kernel_size": 4, "padding": "CAUSAL"}, (2, 12, 2)),
    "conv_3d": ({"kernel_size": (2, 3, 3), "padding": "VALID"}, (1, 5, 6, 6, 2)),
    "depthwise": ({"kernel_size": (3, 3), "feature_group_count": 2}, (2, 7, 7, 2)),
    "no_bias": ({"kernel_size": (3, 3), "use_bias": False}, (1, 5, 5, 2)),
    "no_batch_axis": ({"kernel_size": (3, 3)}, (5, 5, 2)),
    "two_batch_axes": ({"kernel_size": (3, 3)}, (2, 3, 5, 5, 2)),
}
OUT_FEATURES = 4


def _signed_input(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _snapshot(model):
    """A copy of the model's arrays (its RNG keys left out: they are not numpy arrays)."""
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.RngKey)))


def _assert_unchanged(model, snapshot):
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Not(nnx.RngKey)), snapshot)


def test_float_linear_is_flax_linear():
    layer = cnnx.QuantLinear(3, 4, quantize=False, rngs=nnx.Rngs(0))
    flax_layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    x = _signed_input((2, 5, 3))
    np.testing.assert_array_equal(layer.kernel[...], flax_layer.kernel[...])
    np.testing.assert_array_equal(layer.bias[...], flax_layer.bias[...])
    np.testing.assert_array_equal(layer(x), flax_layer(x))
    # Quantized or not, the layer draws its parameters as Flax does.
    quantized = cnnx.QuantLinear(3, 4, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(quantized.kernel[...], flax_layer.kernel[...])


@pytest.mark.parametrize(("options", "shape"), CONVS.values(), ids=CONVS.keys())
@pytest.mark.slow  # compiles whole training steps or many programs
def test_float_conv_is_flax_conv(options, shape):
    layer = cnnx.QuantConv(shape[-1], OUT_FEATURES, quantize=False, rngs=nnx.Rngs(0), **options)
    flax_layer = nnx.Conv(shape[-1], OUT_FEATURES, rngs=nnx.Rngs(0), **options)
    x = _signed_input(shape)
    np.testing.assert_array_equal(layer.kernel[...], flax_layer.kernel[...])
    np.testing.assert_array_equal(layer(x), flax_layer(x))


@pytest.mark.parametrize(("options", "shape"), CONVS.values(), ids=CONVS.keys())
@pytest.mark.slow  # compiles whole training steps or many programs
def test_quantized_conv_computes_what_the_linen_layer_computes(options, shape):
    """The same kernel and calibration batch give the same quantizers and the same output."""
    x = _signed_input(shape)
    linen_layer = linen_layers.QuantConv(OUT_FEATURES, **options)
    params = linen_layer.init(jax.random.key(0), x)["params"]
    layer = cnnx.QuantConv(shape[-1], OUT_FEATURES, rngs=nnx.Rngs(0), **options)
    layer.kernel[...] = params["kernel"]
    if "bias" in params:
        layer.bias[...] = params["bias"]
    cnnx.calibrate(layer, x)
    for name in ("input_quantizer", "weight_quantizer"):
        np.testing.assert_array_equal(getattr(layer, name)[...], params[name])
    np.testing.assert_array_equal(layer.input_signedness[...], params[quantizer.INPUT_SIGNED])
    np.testing.assert_array_equal(layer(x), linen_layer.apply({"params": params}, x))


def test_quantized_linear_computes_what_the_linen_layer_computes():
    x = _signed_input((3, 6))
    linen_layer = linen_layers.QuantDense(5, input_signed=True)
    params = linen_layer.init(jax.random.key(0), x)["params"]
    layer = cnnx.QuantLinear(6, 5, input_signed=True, rngs=nnx.Rngs(0))
    layer.kernel[...], layer.bias[...] = params["kernel"], params["bias"]
    cnnx.calibrate(layer, x)
    np.testing.assert_array_equal(layer.input_quantizer[...], params["input_quantizer"])
    np.testing.assert_array_equal(layer(x), linen_layer.apply({"params": params}, x))


class Net(nnx.Module):
    """A small CNN with everything layer_specs must see through.

    A strided SAME stem, BatchNorm, a depthwise and a 1x1 conv in an ``nnx.List`` (integer
    paths), average pooling, dropout, a dense layer on a 3-D input called twice, and a
    ``train`` flag. MACs per example, by hand:

    * stem: 14*14 positions x 8 out x 3*3 window x 1 in = 14,112
    * blocks/0 (depthwise, 8 groups): 14*14 x 8 x 3*3 x 8/8 = 14,112
    * blocks/1 (1x1): 14*14 x 16 x 8 = 25,088
    * shared, on (49, 16), twice: 2 x 49 x 16 x 16 = 2 x 12,544
    * head: 16 x 10 = 160
    """

    MACS = 14_112 + 14_112 + 25_088 + 2 * 12_544 + 160

    def __init__(self, rngs: nnx.Rngs, *, input_signed=None):
        options = {"input_signed": input_signed, "rngs": rngs}
        self.stem = cnnx.QuantConv(1, 8, (3, 3), strides=2, **options)
        self.norm = nnx.BatchNorm(8, rngs=rngs)
        self.blocks = nnx.List(
            [
                cnnx.QuantConv(8, 8, (3, 3), feature_group_count=8, **options),
                cnnx.QuantConv(8, 16, (1, 1), **options),
            ]
        )
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.shared = cnnx.QuantLinear(16, 16, **options)
        self.head = cnnx.QuantLinear(16, 10, **options)

    def __call__(self, x, *, train: bool):
        x = self.norm(self.stem(x), use_running_average=not train)
        x = self.blocks[1](nnx.relu(self.blocks[0](x)))
        # Average pooling by hand: flax's avg_pool fails strict dtype promotion (int divisor).
        x = jnp.mean(jnp.reshape(x, (x.shape[0], 7, 2, 7, 2, 16)), axis=(2, 4))
        x = self.dropout(x, deterministic=not train)
        x = jnp.reshape(x, (x.shape[0], 49, 16))
        x = jnp.mean(self.shared(nnx.relu(self.shared(x))), axis=1)
        return self.head(x)


@pytest.fixture
def images():
    return jnp.asarray(data.synthetic(train=32, validation=1, test=1).train[0])


@pytest.mark.slow  # compiles whole training steps or many programs
def test_layer_specs_count_macs_by_hand_and_index_the_state(images):
    model = Net(nnx.Rngs(0))
    cnnx.calibrate(model, images, train=False)
    before = _snapshot(model)
    specs = cnnx.layer_specs(model, images[:1], train=True)
    _assert_unchanged(model, before)  # BatchNorm statistics, RNG counts: all as they were
    assert specs == cnnx.layer_specs(
        model, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32), train=False
    )
    assert [spec.name for spec in specs] == [
        "stem",
        "blocks/0",
        "blocks/1",
        "shared",
        "shared",
        "head",
    ]
    assert [spec.macs for spec in specs] == [14_112, 14_112, 25_088, 12_544, 12_544, 160]
    assert cost.total_macs(specs) == Net.MACS
    # Data-decided signedness: images and ReLU outputs unsigned, linear outputs signed; a
    # layer called twice (signed inputs, then ReLU outputs) is signed for both calls.
    assert [spec.input_signed for spec in specs] == [False, True, False, True, True, True]
    params = nnx.state(model, nnx.Param)
    expected = 8 * 8 * Net.MACS
    assert cost.exact_bops(params, specs) == expected
    assert cost.exact_bops(nnx.as_pure(params), specs) == expected
    assert float(jax.jit(cost.bops, static_argnums=1)(nnx.as_pure(params), specs)) == expected


def test_calibrate_sets_every_quantizer_at_the_given_bits(images):
    model = Net(nnx.Rngs(0))
    cnnx.calibrate(model, images, train=False, input_bits=5, weight_bits=3)
    specs = cnnx.layer_specs(model, images[:1], train=False)
    rows = cost.layer_table(nnx.state(model, nnx.Param), specs)
    assert {(row["weight_bits"], row["input_bits"]) for row in rows} == {(3, 5)}


def test_signedness_is_state_but_not_a_param(images):
    model = Net(nnx.Rngs(0))
    assert all(
        "input_signedness" not in path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
    )
    signedness = nnx.state(model, cnnx.InputSignedness)
    assert {float(v[...]) for _, v in nnx.to_flat_state(signedness)} == {cnnx.NOT_CALIBRATED}
    cnnx.calibrate(model, images, train=False)
    assert float(model.stem.input_signedness[...]) == -1.0
    assert float(model.blocks[0].input_signedness[...]) == 1.0


def test_uncalibrated_quantized_forward_raises(images):
    model = Net(nnx.Rngs(0))
    with pytest.raises(ValueError, match="calibrate"):
        model(images, train=False)
    with pytest.raises(Exception, match="calibrate"):  # inside jit: when the program runs
        jax.block_until_ready(nnx.jit(lambda m, x: m(x, train=False))(model, images))
    with pytest.raises(ValueError, match="'stem'.*calibrate"):
        cnnx.layer_specs(model, images[:1], train=False)
    model.set_attributes(quantize=False)  # float needs no calibration
    assert model(images, train=False).shape == (32, 10)


def test_explicit_unsigned_with_negative_inputs_raises_naming_the_layer(images):
    model = Net(nnx.Rngs(0), input_signed=False)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="'blocks/0' has input_signed=False"):
        cnnx.calibrate(model, images, train=False)
    _assert_unchanged(model, before)  # all or nothing


def test_layer_specs_refuses_layers_that_would_be_free(images):
    class WithPlainLayer(nnx.Module):
        def __init__(self, rngs):
            self.quantized = cnnx.QuantLinear(784, 8, rngs=rngs)
            self.plain = nnx.Linear(8, 10, rngs=rngs)

        def __call__(self, x):
            return self.plain(self.quantized(jnp.reshape(x, (x.shape[0], -1))))

    with pytest.raises(ValueError, match=r"\['plain'\] are plain Flax layers"):
        cnnx.layer_specs(WithPlainLayer(nnx.Rngs(0)), images[:1])
    model = Net(nnx.Rngs(0))
    cnnx.calibrate(model, images, train=False)
    model.head.quantize = False
    with pytest.raises(ValueError, match=r"\['head'\] run with quantize=False"):
        cnnx.layer_specs(model, images[:1], train=False)


def _labels_by_path(tree):
    return {
        tuple(str(k) for k in path): label
        for path, label in nnx.to_flat_state(nnx.State(nnx.as_pure(tree)))
    }


def test_param_labels_and_is_quantizer_on_nnx_state():
    model = Net(nnx.Rngs(0))
    for state in (nnx.state(model, nnx.Param), nnx.as_pure(nnx.state(model, nnx.Param))):
        labels = quantizer.param_labels(state)
        assert jax.tree.structure(labels) == jax.tree.structure(state)
        for path, label in _labels_by_path(labels).items():
            expected = "quantizer" if path[-1].endswith("_quantizer") else "weight"
            assert label == expected, path
        mask = quantizer.is_quantizer(state)
        assert sum(jax.tree.leaves(mask)) == 2 * 5  # two quantizers in each of 5 layers
    # Linen parameter dicts are labelled as before.
    linen_params = {"dense": {"kernel": jnp.zeros(2), "input_quantizer": jnp.zeros(2)}}
    assert quantizer.param_labels(linen_params) == {
        "dense": {"kernel": "weight", "input_quantizer": "quantizer"}
    }


def test_nnx_optimizer_partitions_quantizers_from_weights(images):
    """``optax.partition`` over ``param_labels`` inside ``nnx.Optimizer`` (the issue's trap)."""
    model = Net(nnx.Rngs(0))
    cnnx.calibrate(model, images, train=False)
    before = dict(nnx.to_flat_state(jax.tree.map(np.asarray, nnx.state(model, nnx.Param))))
    tx = optax.partition(
        {"weight": optax.sgd(0.0), "quantizer": optax.sgd(1.0)}, quantizer.param_labels
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        moved = not np.array_equal(value[...], before[path][...])
        assert moved == str(path[-1]).endswith("_quantizer"), path


class SmallCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = cnnx.QuantConv(1, 8, (3, 3), strides=2, rngs=rngs)
        self.conv2 = cnnx.QuantConv(8, 16, (3, 3), strides=2, rngs=rngs)
        self.fc = cnnx.QuantLinear(7 * 7 * 16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
        return self.fc(jnp.reshape(x, (x.shape[0], -1)))


def _loss(model, images, labels):
    logits = model(images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
@nnx.jit  # one compilation, not every op of every step dispatched alone
def _train_step(model, optimizer, images, labels):
    grads = nnx.grad(_loss)(model, images, labels)
    optimizer.update(model, grads)


def _epochs(model, optimizer, split, epochs, *, first=0):
    for epoch in range(first, first + epochs):
        for images, labels in batches(*split, 32, seed=0, epoch=epoch):
            _train_step(model, optimizer, images, labels)


@pytest.mark.usefixtures("standard_promotion_fixture")  # optax.adam
@pytest.mark.slow
def test_nnx_model_trains_within_budget_with_nnx_optimizer(tiny_mnist):
    model = SmallCNN(nnx.Rngs(0))
    # Float pretraining: the quantizers stay out of the optimizer (selected by type).
    model.set_attributes(quantize=False)
    weights_only = nnx.All(nnx.Param, nnx.Not(cnnx.Quantizer))
    _epochs(model, nnx.Optimizer(model, optax.adam(1e-3), wrt=weights_only), tiny_mnist.train, 2)
    model.set_attributes(quantize=True)
    cnnx.calibrate(model, tiny_mnist.train[0][:256])
    specs = cnnx.layer_specs(model, tiny_mnist.train[0][:1])
    eight_bits = cost.exact_bops(nnx.state(model, nnx.Param), specs)
    assert eight_bits == 8 * 8 * cost.total_macs(specs)
    budget = eight_bits / 2
    signedness = jax.tree.map(np.asarray, nnx.state(model, cnnx.InputSignedness))

    tx = optax.chain(
        optax.partition(
            {"weight": optax.adam(1e-3), "quantizer": optax.adam(1e-2)}, quantizer.param_labels
        ),
        constrained_update(functools.partial(cost.bops, specs=specs), budget),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    _epochs(model, optimizer, tiny_mnist.train, 12, first=2)

    assert cost.exact_bops(nnx.state(model, nnx.Param), specs) <= budget
    images, labels = tiny_mnist.test
    accuracy = float(jnp.mean(jnp.argmax(model(images), -1) == labels))
    assert accuracy > 0.5  # chance is 0.1
    constraint_state = optimizer.opt_state[-1]
    assert int(constraint_state.infeasible_steps[...]) > 0
    # The signedness decided at calibration is not the optimizer's: unchanged, not held.
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, cnnx.InputSignedness), signedness)
    held = [path for path, _ in nnx.to_flat_state(nnx.state(optimizer.opt_state))]
    assert held and not any("input_signedness" in map(str, path) for path in held)


@pytest.mark.usefixtures("standard_promotion_fixture")  # optax.adam
@pytest.mark.slow
def test_the_readme_example_script_runs(tiny_mnist, monkeypatch, capsys):
    monkeypatch.setattr(data, "synthetic", lambda: tiny_mnist)
    argv = ["--synthetic", "--pretrain_epochs", "0", "--epochs", "1", "--budget_bops", "2e7"]
    assert load_cli("nnx_example").main(argv) == 0
    out = capsys.readouterr().out
    assert "certified within budget 20,000,000" in out and "conv1" in out


@pytest.mark.slow  # compiles whole training steps or many programs
def test_nnx_layers_take_the_linen_options_and_compute_the_same():
    """per_channel, input_bits and weight_bits (a TypeError before issue 28), as in linen."""
    options = {"per_channel": True, "input_bits": 8, "weight_bits": 4, "input_signed": False}
    x = jnp.abs(_signed_input((2, 6, 6, 1)))
    linen_layer = linen_layers.QuantConv(3, (3, 3), **options)
    params = linen_layer.init(jax.random.key(0), x)["params"]
    layer = cnnx.QuantConv(1, 3, (3, 3), rngs=nnx.Rngs(0), **options)
    layer.kernel[...], layer.bias[...] = params["kernel"], params["bias"]
    cnnx.calibrate(layer, x)
    assert layer.weight_quantizer.shape == (3, 2)
    for name in ("input_quantizer", "weight_quantizer"):
        np.testing.assert_array_equal(getattr(layer, name)[...], params[name])
    np.testing.assert_array_equal(layer(x), linen_layer.apply({"params": params}, x))
    (spec,) = cnnx.layer_specs(layer, x)
    assert (spec.input_bits, spec.weight_bits, spec.channels) == (8, 4, 3)
    assert spec == cost.layer_specs(linen_layer, x)[0]
