"""Tests of cgmq_jax.models and cgmq_jax.nn (float and quantized LeNet-5 and MLP; Bayesian
Bits' LeNet-5 and the DS-CNN: hand-counted MACs, BatchNorm folding, a certified tiny fit)."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_cli

from cgmq_jax import checkpoint, cost, export, models, quantizer, train
from cgmq_jax import nn as cnn
from cgmq_jax.train import TrainConfig

BUNDLES = ["lenet", "mlp"]


def _shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def test_strict_promotion_is_on():
    # conftest.py: every test runs with strict dtype promotion and rank promotion errors.
    assert jax.config.jax_numpy_dtype_promotion == "strict"
    assert jax.config.jax_numpy_rank_promotion == "raise"
    with pytest.raises(Exception, match="implicit dtype promotion"):
        jnp.ones(2, jnp.float32) + jnp.ones(2, jnp.int32)
    with pytest.raises(ValueError, match="rank_promotion"):
        jnp.ones((2, 3), jnp.float32) + jnp.ones(3, jnp.float32)


@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.slow  # compiles whole training steps or many programs
def test_float_model_has_the_same_weights_and_no_quantizers(name, request, sample_input):
    bundle = request.getfixturevalue(name)
    float_params = bundle["float_params"]
    labels = jax.tree.leaves(quantizer.param_labels(float_params))
    assert labels and set(labels) == {"weight"}
    if name == "lenet":  # the same init, once per session
        quantized = request.getfixturevalue("lenet_init_params")
    else:  # eager: a jitted init takes XLA:CPU seconds to compile (see conftest.py)
        quantized = bundle["model"].init(jax.random.key(0), sample_input)["params"]
    q_labels = jax.tree.leaves(quantizer.param_labels(quantized))
    assert q_labels.count("quantizer") == 2 * len(bundle["specs"])
    stripped = cnn.strip_quantizers(quantized)
    assert jax.tree.structure(stripped) == jax.tree.structure(float_params)
    assert _shapes(stripped) == _shapes(float_params)
    for layer in float_params.values():
        assert set(layer) == {"kernel", "bias"}
    # Same seed, same weights: the quantizers do not shift the weight initialisation.
    chex.assert_trees_all_equal(stripped, float_params)


@pytest.mark.parametrize("name", BUNDLES)
def test_init_quantizers_gives_exactly_8_bits(name, request, calibration_batch):
    bundle = request.getfixturevalue(name)
    params, specs = bundle["params8"], bundle["specs"]
    for spec in specs:
        layer = params
        for key in spec.path:
            layer = layer[key]
        for leaf, signed in (
            ("weight_quantizer", spec.weight_signed),
            ("input_quantizer", spec.input_signed),
        ):
            d, q_max = quantizer.from_latents(layer[leaf])
            assert int(quantizer.exact_bitwidth(d, q_max, signed=signed)) == 8, (spec.name, leaf)
            assert float(d) > 0 and float(q_max) > 0
        # The weight range is max|W| of the float kernel (up to half a step: init_at_bits
        # may round it to its level, n * d_q).
        d, q_max = quantizer.from_latents(layer["weight_quantizer"])
        max_w = float(jnp.max(jnp.abs(layer["kernel"])))
        assert abs(float(q_max) - max_w) <= float(d) / 2 * (1 + 1e-5)
    assert cost.exact_bops(params, specs) == cost.total_macs(specs) * 64
    # The weights are the float model's, untouched.
    chex.assert_trees_all_equal(cnn.strip_quantizers(params), bundle["float_params"])
    # The first layer's input range is a high percentile of the calibration batch.
    d_in, q_in = quantizer.from_latents(params[specs[0].name]["input_quantizer"])
    expected = float(jnp.percentile(calibration_batch, cnn.DEFAULT_PERCENTILE))
    assert abs(float(q_in) - expected) <= float(d_in) / 2 * (1 + 1e-5)
    assert 0.9 < expected <= 1.0


def test_init_quantizers_other_widths(lenet, calibration_batch):
    init = jax.jit(
        functools.partial(cnn.init_quantizers, lenet["model"], input_bits=3, weight_bits=5)
    )
    params = init(lenet["float_params"], calibration_batch)
    rows = cost.layer_table(params, lenet["specs"])
    assert all(r["weight_bits"] == 5 and r["input_bits"] == 3 for r in rows)
    assert cost.exact_bops(params, lenet["specs"]) == 281640 * 15


@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("name", BUNDLES)
def test_output_shapes(name, batch_size, request):
    bundle = request.getfixturevalue(name)
    x = jax.random.uniform(jax.random.key(3), (batch_size, 28, 28, 1), jnp.float32)
    for model, params in (
        (bundle["float_model"], bundle["float_params"]),
        (bundle["model"], bundle["params8"]),
    ):
        logits = jax.jit(model.apply)({"params": params}, x)
        chex.assert_shape(logits, (batch_size, 10))
        chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("name", BUNDLES)
def test_float_and_8_bit_logits_are_close(name, request, set_bits):
    bundle = request.getfixturevalue(name)
    x = jax.random.uniform(jax.random.key(7), (32, 28, 28, 1), jnp.float32)
    float_logits = np.asarray(
        jax.jit(bundle["float_model"].apply)({"params": bundle["float_params"]}, x)
    )
    apply = jax.jit(bundle["model"].apply)
    logits8 = np.asarray(apply({"params": bundle["params8"]}, x))
    scale = np.max(np.abs(float_logits))
    error8 = np.max(np.abs(logits8 - float_logits))
    assert error8 <= 0.1 * scale, (error8, scale)  # measured: 0.039 (LeNet-5), 0.022 (MLP)
    # The quantization really happens: at the minimum widths the logits are far off.
    params_min = set_bits(bundle["params8"], bundle["specs"], 2, 1)
    error_min = np.max(np.abs(np.asarray(apply({"params": params_min}, x)) - float_logits))
    assert error_min > 3 * error8


def test_quantized_layer_is_fake_quant_then_multiply():
    layer = cnn.QuantDense(features=3)
    x = jnp.asarray([[0.1, 0.6, 0.35, 1.2]], jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    params = dict(params, bias=jnp.asarray([0.5, -0.5, 0.0], jnp.float32))
    params["input_quantizer"] = quantizer.latents(0.25, 1.0)  # unsigned, 0.25 steps up to 1
    params["weight_quantizer"] = quantizer.latents(0.5, 1.0)  # signed, {-1, -0.5, 0, 0.5, 1}
    y = layer.apply({"params": params}, x)
    x_q = np.asarray([[0.0, 0.5, 0.25, 1.0]], np.float32)  # 0.1 -> 0, 0.35 -> 0.25, 1.2 -> 1
    w_q = np.clip(np.round(np.asarray(params["kernel"]) / 0.5), -2, 2) * 0.5
    np.testing.assert_allclose(np.asarray(y), x_q @ w_q + [0.5, -0.5, 0.0], rtol=1e-6, atol=1e-6)


def test_get_model():
    assert isinstance(models.get_model("lenet5"), models.LeNet5)
    assert models.get_model("mlp", quantized=False).quantized is False
    assert isinstance(models.get_model("lenet5_bb"), models.LeNet5BB)
    assert isinstance(models.get_model("dscnn"), models.DSCNN)
    with pytest.raises(ValueError, match="unknown model"):
        models.get_model("resnet")


# Bayesian Bits' LeNet-5 and the DS-CNN ----------------------------------------------------


def _conv_macs(out_size: int, out_channels: int, window: int, in_per_group: int) -> int:
    """Output positions x output channels x kernel window x input channels per group."""
    return out_size * out_size * out_channels * window * window * in_per_group


def test_lenet5_bb_macs_are_the_hand_count(sample_input):
    # Bayesian Bits' nn.Conv2d(1, 32, 5) / (32, 64, 5) have padding=0 ('VALID').
    conv1 = _conv_macs(28 - 5 + 1, 32, 5, 1)  # 24x24x32 = 460,800; max-pool -> 12x12x32
    conv2 = _conv_macs(12 - 5 + 1, 64, 5, 32)  # 8x8x64 = 3,276,800; max-pool -> 4x4x64
    fc1 = (4 * 4 * 64) * 512  # 524,288
    fc2 = 512 * 10  # 5,120
    hand = {"conv1": conv1, "conv2": conv2, "fc1": fc1, "fc2": fc2}
    assert hand == {"conv1": 460_800, "conv2": 3_276_800, "fc1": 524_288, "fc2": 5_120}
    specs = cost.layer_specs(models.LeNet5BB(), sample_input)
    assert {spec.name: spec.macs for spec in specs} == hand
    assert cost.total_macs(specs) == sum(hand.values()) == 4_267_008
    assert not any(spec.input_signed for spec in specs)  # pixels and ReLU outputs


def test_dscnn_macs_are_the_hand_count(sample_input):
    # SAME padding: the output is ceil(input / stride); depthwise: 1 input channel per group.
    hand = {
        "stem": _conv_macs(14, 32, 3, 1),  # 28 -> 14, stride 2: 56,448
        "dw1": _conv_macs(14, 32, 3, 1),  # 56,448
        "pw1": _conv_macs(14, 64, 1, 32),  # 401,408
        "dw2": _conv_macs(7, 64, 3, 1),  # 14 -> 7, stride 2: 28,224
        "pw2": _conv_macs(7, 64, 1, 64),  # 200,704
        "dw3": _conv_macs(7, 64, 3, 1),
        "pw3": _conv_macs(7, 64, 1, 64),
        "dw4": _conv_macs(7, 64, 3, 1),
        "pw4": _conv_macs(7, 64, 1, 64),
        "fc": 64 * 10,  # after global average pooling: 640
    }
    assert (hand["stem"], hand["pw1"], hand["dw2"], hand["pw2"]) == (
        56_448,
        401_408,
        28_224,
        200_704,
    )
    specs = cost.layer_specs(models.DSCNN(), sample_input)
    assert {spec.name: spec.macs for spec in specs} == hand
    assert [spec.name for spec in specs] == list(hand)  # call order
    assert cost.total_macs(specs) == sum(hand.values()) == 1_201_728
    assert not any(spec.input_signed for spec in specs)  # pixels, ReLU outputs, their mean
    assert cost.min_cost(specs) == 2 * 1_201_728  # signed 2-bit weights x unsigned 1-bit inputs


def _bn_variables(model, x, seed: int = 0):
    """Float variables with BatchNorm statistics and affine parameters far from identity."""
    variables = model.init(jax.random.key(seed), x)  # eager: see conftest.py
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))

    def perturb(path, leaf):
        name = path[-1].key
        noise = jax.random.uniform(next(keys), leaf.shape, leaf.dtype)
        if name in ("var", "scale"):
            return 0.5 + 2.0 * noise  # positive
        return leaf + noise - 0.5

    return {
        "params": jax.tree_util.tree_map_with_path(perturb, variables["params"]),
        "batch_stats": jax.tree_util.tree_map_with_path(perturb, variables["batch_stats"]),
    }


@pytest.mark.slow  # compiles whole training steps or many programs
def test_fold_batchnorm_equals_batchnorm_in_eval_mode(calibration_batch):
    model = models.DSCNN(quantized=False)
    variables = _bn_variables(model, calibration_batch)
    folded_model = models.folded(model)
    folded = jax.jit(functools.partial(models.fold_batchnorm, model), static_argnums=1)(
        variables, jax.ShapeDtypeStruct(calibration_batch.shape, jnp.float32)
    )
    # The folded float network's parameters: no BatchNorm, every conv with a bias.
    template = jax.eval_shape(folded_model.init, jax.random.key(0), calibration_batch)
    assert "batch_stats" not in template
    assert _shapes(folded) == _shapes(template["params"])
    assert not [name for name in folded if name.endswith("_bn")]
    # ... and the quantized model's weights (its quantizer leaves aside).
    quantized = jax.eval_shape(models.DSCNN().init, jax.random.key(0), calibration_batch)
    assert _shapes(cnn.strip_quantizers(quantized["params"])) == _shapes(folded)
    # It computes what the network with BatchNorm computes with the running averages.
    expected = jax.jit(model.apply)(variables, calibration_batch)
    logits = jax.jit(folded_model.apply)({"params": folded}, calibration_batch)
    scale = float(jnp.max(jnp.abs(expected)))
    assert scale > 1.0  # the statistics matter: far from the identity
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5 * scale)
    # The folding formula, for one layer.
    bn, stats = variables["params"]["stem_bn"], variables["batch_stats"]["stem_bn"]
    s = bn["scale"] / jnp.sqrt(stats["var"] + 1e-5)
    np.testing.assert_allclose(
        folded["stem"]["kernel"],
        variables["params"]["stem"]["kernel"] * s[None, None, None],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        folded["stem"]["bias"], bn["bias"] - stats["mean"] * s, rtol=1e-5, atol=1e-6
    )
    # Training mode normalises with the batch's statistics instead: a different function.
    train_logits, updates = model.apply(
        variables, calibration_batch, train=True, mutable=["batch_stats"]
    )
    assert float(jnp.max(jnp.abs(train_logits - expected))) > 1e-2 * scale
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )


def test_fold_batchnorm_keeps_a_model_without_batchnorm(lenet, sample_input):
    folded = models.fold_batchnorm(
        lenet["float_model"], {"params": lenet["float_params"]}, sample_input
    )
    chex.assert_trees_all_equal(folded, lenet["float_params"])
    assert models.folded(lenet["model"]) is lenet["model"]


def test_fold_batchnorm_refuses_a_batchnorm_that_follows_no_layer(sample_input):
    import flax.linen as linen

    class NormFirst(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = linen.BatchNorm(use_running_average=True, name="bn")(x)
            return cnn.QuantConv(4, (3, 3), quantize=False, name="conv")(x)

    model = NormFirst()
    variables = model.init(jax.random.key(0), sample_input)
    with pytest.raises(ValueError, match="BatchNorm 'bn' does not directly follow"):
        models.fold_batchnorm(model, variables, sample_input)


@pytest.mark.slow
def test_qat_starts_from_the_folded_weights(tiny_mnist, standard_promotion_fixture):
    config = TrainConfig(model="dscnn", budget_bops=5e6, epochs=1, pretrain_epochs=1)
    setup = train._make_setup(config, tiny_mnist, pretrained=False)
    calibration = jnp.asarray(tiny_mnist.train[0][:16])
    variables = _bn_variables(setup.float_model, calibration)
    state = train._qat_state(setup, variables, calibration)
    folded = models.fold_batchnorm(setup.float_model, variables, calibration[:1])
    chex.assert_trees_all_close(cnn.strip_quantizers(state.params), folded, rtol=1e-6)
    rows = cost.layer_table(state.params, setup.specs)
    assert {(row["weight_bits"], row["input_bits"]) for row in rows} == {(8, 8)}


@pytest.mark.slow
def test_dscnn_qat_checkpoint_restores_through_the_folding(
    tiny_mnist, tmp_path, standard_promotion_fixture
):
    # A QAT checkpoint of a run that pretrains is restored into the structure of the QAT
    # state, which is built abstractly from the float variables: through the folding, and
    # with the budget warm-up (its start counted from the specs: there are no values).
    config = TrainConfig(
        model="dscnn", budget_bops=5e6, epochs=1, pretrain_epochs=1, budget_warmup_epochs=0.5
    )
    setup = train._make_setup(config, tiny_mnist, pretrained=False)
    calibration = jnp.asarray(tiny_mnist.train[0][:16])
    variables = _bn_variables(setup.float_model, calibration)
    qat = train._qat_state(setup, variables, calibration)
    progress = train._Progress(phase="qat", epoch=1, best_epoch=None)
    saver = checkpoint.Checkpointer(tmp_path / "checkpoints")
    saver.save(1, train._checkpoint_arrays(qat, None), {"progress": dataclasses.asdict(progress)})
    float_state = train._float_state(setup, variables)
    assert "batch_stats" in train._checkpoint_arrays(float_state, None)
    assert "batch_stats" not in train._checkpoint_arrays(qat, None)
    state, restored, _ = train._restore(setup, saver, float_state, variables, calibration)
    saver.close()
    assert restored == progress
    chex.assert_trees_all_equal(state.params, qat.params)
    chex.assert_trees_all_equal(state.opt_state, qat.opt_state)


@pytest.mark.slow  # compiles whole training steps or many programs
def test_every_model_passes_the_checks_before_data(sample_input):
    for name in models.MODELS:
        specs = train.check_config(TrainConfig(model=name, budget_bops=1e9))
        assert cost.total_macs(specs) == cost.total_macs(
            cost.layer_specs(models.get_model(name), sample_input)
        )
    args = load_cli("mnist").parse_args(["--model", "dscnn"])
    assert args.model == "dscnn"


@pytest.mark.parametrize("name", ["lenet5_bb", "dscnn"])
@pytest.mark.slow
def test_every_library_model_exports_exactly(name, tmp_path, tiny_mnist, set_bits):
    """The integer file of Bayesian Bits' LeNet-5 and of the DS-CNN (depthwise, residual
    adds, global average) reproduces the fake-quant model: every layer's input codes, every
    prediction, and the trainer's exact BOPs."""
    model = models.folded(models.get_model(name))
    images = jnp.asarray(tiny_mnist.test[0][:32])
    float_model = models.folded(models.get_model(name, quantized=False))
    float_params = float_model.init(jax.random.key(0), images)["params"]
    params = cnn.init_quantizers(model, float_params, images)
    specs = cost.layer_specs(model, images[:1])
    params = set_bits(params, specs, 4, 3)
    path = export.export(params, model, tmp_path / "model.npz")
    assert export.count_bops(path)["bops"] == cost.exact_bops(params, specs)
    compared = export.compare_with_model(path, params, model, np.asarray(images))
    assert compared["agree"] == len(images)
    assert {layer: bad for layer, (bad, _, _) in compared["code_mismatches"].items()} == {
        spec.name: 0 for spec in specs
    }


@pytest.mark.slow
def test_dscnn_pruned_below_its_unpruned_minimum_is_certified_and_exports(
    tiny_mnist, tmp_path, standard_promotion_fixture
):
    """The DS-CNN's fit end to end (BatchNorm folded into the quantized network), here
    below its unpruned minimum (2,403,456 BOPs), where only removed channels fit: the
    stem's and pw1's removed channels take dw1's and dw2's with them, and the file of live
    channels recounts to the certificate and computes what the model computes."""
    budget = 2e6
    config = TrainConfig(
        model="dscnn", prune=True, budget_bops=budget, epochs=1, pretrain_epochs=1,
        batch_size=64, fill_epochs=0,
        refit_ranges=False,  # the same code for every model (test_refit.py), and slow to compile
        admission="all_or_nothing",  # so is its default gain guard (tests/test_prune.py)
        calibration_size=128,  # an eager float pass of the DS-CNN: 2,048 images take seconds
    )  # fmt: skip
    result = train.fit(config, tiny_mnist, log=lambda _: None)
    assert result.certificate["within_budget"] and result.certificate["bops"] <= budget
    rows = {row["layer"]: row for row in result.certificate["layers"]}
    assert rows["stem"]["live_channels"] + rows["pw1"]["live_channels"] < 32 + 64
    assert rows["dw1"]["live_channels"] == rows["stem"]["live_channels"]
    assert rows["dw2"]["live_channels"] == rows["pw1"]["live_channels"]
    assert rows["pw2"]["live_inputs"] == rows["pw1"]["live_channels"]
    assert not [name for name in result.params if name.endswith("_bn")]  # folded
    assert [row["phase"] for row in result.history] == ["float", "qat"]
    chex.assert_tree_all_finite(result.params)
    model = models.get_model("dscnn", prune=True)
    path = export.export(result.params, model, tmp_path / "m.npz", certificate=result.certificate)
    assert export.count_bops(path)["matches_certificate"]
    images = np.round(np.asarray(tiny_mnist.test[0][:32]) * 256) / 256
    compared = export.compare_with_model(path, result.params, model, images)
    assert compared["agree"] == 32
    assert all(row[0] == 0 for row in compared["code_mismatches"].values()), compared


@pytest.mark.slow
def test_dscnn_float_phase_checkpoints_batch_stats_and_resumes(
    tiny_mnist, tmp_path, standard_promotion_fixture
):
    config = TrainConfig(model="dscnn", method="float", budget_bops=None, epochs=2, batch_size=64)
    whole = train.fit(config, tiny_mnist, log=lambda _: None)
    assert set(whole.params) == {"params", "batch_stats"}
    initial = models.DSCNN(quantized=False).init(jax.random.key(0), tiny_mnist.train[0][:2])
    moved = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), whole.params["batch_stats"], initial["batch_stats"]
    )
    assert all(jax.tree.leaves(moved))  # the running averages were updated by training
    # Stopped in the middle of the second epoch (6 steps per epoch), then resumed.
    steps = iter(range(1, 100))
    saver = checkpoint.Checkpointer(tmp_path / "checkpoints")
    with pytest.raises(train.Interrupted):
        train.fit(
            config,
            tiny_mnist,
            log=lambda _: None,
            checkpointer=saver,
            should_stop=lambda: next(steps) == 9,
        )
    assert saver.latest_meta()["position"] == "float epoch 2, batch 3"
    resumed = train.fit(config, tiny_mnist, log=lambda _: None, checkpointer=saver, resume=True)
    saver.close()
    chex.assert_trees_all_equal(resumed.params, whole.params)
    assert resumed.history == whole.history
    assert resumed.test_accuracy == whole.test_accuracy
    # A pretrained float network with BatchNorm is handed to QAT as its variables.
    qat = dataclasses.replace(config, method="cgmq", budget_bops=6e6, epochs=1)
    with pytest.raises(ValueError, match="float_params must be its float variables"):
        train.fit(qat, tiny_mnist, log=lambda _: None, float_params=whole.params["params"])
