"""quantize_model on unmodified linen models; per-channel and pinned quantizers; float
layers never free; layer_specs with call arguments, several inputs, BatchNorm, dropout,
residuals, pooling, remat, and clear errors for nn.scan / nn.vmap."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import standard_promotion

from cgmq_jax import certify, constraint, cost, models, quantizer, repair, rules
from cgmq_jax import nn as qnn


class PlainLeNet5(nn.Module):
    """The classic LeNet-5 of cgmq_jax.models, written with plain flax.linen layers."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (5, 5), padding="VALID", name="conv1")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = nn.Conv(16, (5, 5), padding="VALID", name="conv2")(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(10, name="fc3")(x)


def _images(n=8, seed=0):
    return jax.random.uniform(jax.random.key(seed), (n, 28, 28, 1))


UNSIGNED = rules.QuantRule(input_signed=False)


@pytest.mark.slow  # compiles whole training steps or many programs
def test_quantize_model_keeps_names_and_loads_the_float_checkpoint():
    x = _images()
    plain = PlainLeNet5()
    float_params = plain.init(jax.random.key(0), x)["params"]
    model = rules.quantize_model(plain, UNSIGNED)
    # The float model is the original one, parameters and outputs identical.
    float_model = model.clone(quantized=False)
    assert jax.tree.structure(float_model.init(jax.random.key(0), x)["params"]) == (
        jax.tree.structure(float_params)
    )
    np.testing.assert_array_equal(
        float_model.apply({"params": float_params}, x), plain.apply({"params": float_params}, x)
    )
    params = qnn.init_quantizers(model, float_params, x)
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        assert sorted(params[name]) == ["bias", "input_quantizer", "kernel", "weight_quantizer"]
        np.testing.assert_array_equal(params[name]["kernel"], float_params[name]["kernel"])


@pytest.mark.slow  # compiles whole training steps or many programs
def test_quantize_model_computes_exactly_what_the_library_lenet5_computes():
    x = _images()
    float_params = PlainLeNet5().init(jax.random.key(1), x)["params"]
    ours = models.LeNet5()
    wrapped = rules.quantize_model(PlainLeNet5(), UNSIGNED)
    params = qnn.init_quantizers(ours, float_params, x)
    params_wrapped = qnn.init_quantizers(wrapped, float_params, x)
    jax.tree.map(np.testing.assert_array_equal, params, params_wrapped)
    np.testing.assert_array_equal(
        jax.jit(ours.apply)({"params": params}, x), jax.jit(wrapped.apply)({"params": params}, x)
    )
    assert cost.layer_specs(wrapped, x) == cost.layer_specs(ours, x)
    # Gradients flow to every quantizer leaf through the intercepted layers.
    loss = lambda p: jnp.sum(wrapped.apply({"params": p}, x) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params_wrapped)
    assert all(
        float(jnp.sum(jnp.abs(grads[name]["weight_quantizer"]))) > 0
        for name in ("conv1", "conv2", "fc1", "fc2", "fc3")
    )


@pytest.mark.slow  # compiles whole training steps or many programs
def test_rules_pin_the_image_input_and_exclude_a_layer_counted_at_32_bits():
    x = _images()
    model = rules.quantize_model(
        PlainLeNet5(),
        [
            rules.QuantRule(module_path="conv1", input_bits=8, input_signed=False),
            rules.QuantRule(module_path="fc3", quantize=False),
            UNSIGNED,
        ],
    )
    float_params = PlainLeNet5().init(jax.random.key(0), x)["params"]
    params = qnn.init_quantizers(model, float_params, x, input_bits=4, weight_bits=4)
    assert "input_quantizer" not in params["fc3"]
    specs = cost.layer_specs(model, x)
    by_name = {spec.name: spec for spec in specs}
    assert by_name["conv1"].input_bits == 8
    assert not by_name["fc3"].quantized and by_name["fc3"].macs == 840
    rows = {row["layer"]: row for row in cost.layer_table(params, specs)}
    assert rows["conv1"]["input_bits"] == 8 and rows["conv2"]["input_bits"] == 4
    assert rows["fc3"]["bops"] == 840 * 32 * 32 and rows["fc3"]["float"]
    # The minimum keeps the pin and the float layer: 8 * 2 on conv1, 32 * 32 on fc3.
    assert cost.min_cost(specs) == 86400 * 2 * 8 + 153600 * 2 + 30720 * 2 + 10080 * 2 + 840 * 1024
    # A pinned quantizer is a constant in the traced cost (no gradient)...
    grads = jax.grad(lambda p: cost.bops(p, specs))(params)
    np.testing.assert_array_equal(grads["conv1"]["input_quantizer"], 0.0)
    assert float(jnp.sum(jnp.abs(grads["conv1"]["weight_quantizer"]))) > 0
    # ...and stays at its pin through training steps with the constraint.
    budget = 0.7 * cost.exact_bops(params, specs)
    tx = optax.chain(
        optax.adam(1e-2),
        constraint.constrained_update(functools.partial(cost.bops, specs=specs), budget),
    )
    state = tx.init(params)
    loss = lambda p: jnp.mean(model.apply({"params": p}, x) ** 2)  # noqa: E731

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    with standard_promotion():  # optax's Adam
        for _ in range(60):
            params, state = step(params, state)
    rows = {row["layer"]: row for row in cost.layer_table(params, specs)}
    assert rows["conv1"]["input_bits"] == 8
    assert cost.exact_bops(params, specs) <= budget


@pytest.mark.slow  # compiles whole training steps or many programs
def test_unmatched_and_plain_layers_are_counted_at_32_bits_never_free():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = qnn.QuantDense(16, input_signed=True, name="quantized")(x)
            return nn.Dense(4, name="plain")(nn.relu(x))  # left in float by mistake

    x = jax.random.normal(jax.random.key(0), (3, 8))
    specs = cost.layer_specs(Mixed(), x)
    assert [(s.name, s.macs, s.quantized) for s in specs] == [
        ("quantized", 128, True),
        ("plain", 64, False),
    ]
    params = Mixed().init(jax.random.key(0), x)["params"]
    assert cost.exact_bops(params, specs) == 128 * 8 * 8 + 64 * 32 * 32
    # The same through quantize_model: a rule that matches only the first layer.
    rule = rules.QuantRule(module_path="conv1", input_signed=False)
    specs = cost.layer_specs(rules.quantize_model(PlainLeNet5(), rule), _images())
    assert [(s.name, s.quantized) for s in specs] == [
        ("conv1", True),
        ("conv2", False),
        ("fc1", False),
        ("fc2", False),
        ("fc3", False),
    ]


def test_layers_whose_macs_cannot_be_counted_are_an_error_naming_them():
    class General(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = qnn.QuantDense(8, input_signed=True)(x)
            return nn.DenseGeneral((2, 3), name="proj")(x)

    with pytest.raises(ValueError, match=r"'proj' is a DenseGeneral, whose MACs cannot"):
        cost.layer_specs(General(), jnp.ones((2, 4)))


def test_layer_specs_passes_call_arguments_and_several_inputs():
    class TwoInputs(nn.Module):
        @nn.compact
        def __call__(self, image, extra, *, train: bool):
            x = qnn.QuantConv(4, (3, 3), strides=2, input_signed=False, name="stem")(image)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
            y = nn.relu(qnn.QuantConv(4, (3, 3), input_signed=False, name="body")(x))
            x = nn.avg_pool(x + y, (2, 2), strides=(2, 2))  # residual add, average pooling
            x = nn.remat(qnn.QuantConv)(4, (1, 1), input_signed=False, name="remat")(x)
            x = jnp.concatenate([jnp.mean(x, axis=(1, 2)), extra], axis=-1)
            return qnn.QuantDense(3, input_signed=True, name="head")(x)

    image = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    extra = jnp.ones((2, 5))
    for train in (True, False):
        with standard_promotion():  # flax's avg_pool divides by an int
            specs = cost.layer_specs(TwoInputs(), image, extra, train=train)
        # stem 4x4x4 out, 9 taps of 1; body 4x4x4 out, 9 taps of 4; remat 2x2x4 out, 4 in;
        # head 3 out of 4 + 5.
        assert [(s.name, s.macs) for s in specs] == [
            ("stem", 64 * 9),
            ("body", 64 * 36),
            ("remat", 16 * 4),
            ("head", 27),
        ]


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.relu(qnn.QuantDense(8, input_signed=True)(x)), None


@pytest.mark.slow  # compiles whole training steps or many programs
def test_scan_and_vmap_give_a_clear_error_in_layer_specs():
    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                _Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
            )
            return scan()(x, None)[0]

    class Vmapped(nn.Module):
        @nn.compact
        def __call__(self, x):
            vmap = nn.vmap(
                qnn.QuantDense,
                variable_axes={"params": None},
                split_rngs={"params": False},
                in_axes=1,
            )
            return vmap(8)(x)

    x = jax.random.normal(jax.random.key(0), (4, 5, 8))
    with pytest.raises(ValueError, match="inside a lifted transform .* unroll the loop"):
        cost.layer_specs(Scanned(), x[:, 0])
    with pytest.raises(ValueError, match="runs inside nn.vmap"):
        cost.layer_specs(Vmapped(), x)
    # Both still initialise and run (the quantizer init does not depend on batched data).
    for model, inputs in ((Scanned(), x[:, 0]), (Vmapped(), x)):
        variables = model.init(jax.random.key(0), inputs)
        assert np.all(np.isfinite(model.apply(variables, inputs)))


@pytest.mark.slow  # compiles whole training steps or many programs
def test_per_channel_weight_quantizers_have_gradients_and_per_channel_cost():
    x = jax.random.normal(jax.random.key(0), (6, 5))
    layer = qnn.QuantDense(3, per_channel=True, input_signed=True)
    params = layer.init(jax.random.key(0), x)["params"]
    assert params["weight_quantizer"].shape == (3, 2)
    kernel = np.asarray(params["kernel"])
    d, q_max = quantizer.from_latents(params["weight_quantizer"])
    np.testing.assert_array_equal(
        quantizer.exact_bitwidth(d, q_max, signed=True), [8, 8, 8]
    )  # each channel at 8 bits of its own range
    np.testing.assert_allclose(q_max, np.abs(kernel).max(axis=0), rtol=2**-7)
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(params)
    assert grads["weight_quantizer"].shape == (3, 2)
    assert np.all(np.isfinite(grads["weight_quantizer"]))
    # Cost: each channel's MACs (5 each) at its own bit-width.
    specs = cost.layer_specs(layer, x)
    assert specs[0].channels == 3 and specs[0].macs == 15
    low = (
        params["weight_quantizer"]
        .at[1]
        .set(repair._set_bits(params["weight_quantizer"][1], 3, signed=True))
    )
    params = {**params, "weight_quantizer": low}
    row = cost.layer_table(params, specs)[0]
    assert row["weight_bits"] == [8, 3, 8]
    assert row["bops"] == 5 * (8 + 3 + 8) * 8 == cost.exact_bops(params, specs)
    assert float(cost.bops(params, specs)) == row["bops"]
    # The repair lowers single channels, and the certificate holds.
    repaired, steps = repair.greedy_repair(params, specs, 5 * (2 + 2 + 2) * 8 + 40)
    assert steps > 0
    assert certify.certify(repaired, specs, 5 * (2 + 2 + 2) * 8 + 40)["within_budget"]


@pytest.mark.slow
def test_own_model_example_runs_and_certifies(tiny_mnist, standard_promotion_fixture, capsys):
    from conftest import load_cli

    argv = ["--synthetic", "--float_epochs", "1", "--epochs", "1", "--budget_bops", "1e6"]
    assert load_cli("own_model").main(argv) == 0
    out = capsys.readouterr().out
    assert "<= budget 1,000,000" in out and "stem" in out
    assert load_cli("own_model").main([*argv[:-1], "1e4"]) == 2
    assert "minimum achievable cost of this network" in capsys.readouterr().err
