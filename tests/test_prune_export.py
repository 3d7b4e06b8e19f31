"""The export of a pruned network (cgmq_jax.compaction): only live channels are stored.

A LeNet-5 with ``prune=True``, calibrated on a few synthetic images, with channels removed
in conv1, conv2 and fc1 (a conv2 channel removes 16 of fc1's flattened features): its file
is an ordinary smaller network whose recount is the pruned cost, whose integer engine
agrees with the JAX model (which masks the removed channels' biases) code for code, and
whose C code is bit-exact. Residual adds and depthwise convolutions after pruned layers:
exported when exact, refused by name when not. No data download; random biases (a removed
channel's stored bias is nonzero, so its mask matters).
"""

from __future__ import annotations

import hashlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import strict_promotion
from test_export import _random_biases

from cgmq_jax import certify, compaction, cost, lowering, models, quantizer
from cgmq_jax import export as ex
from cgmq_jax import nn as qnn
from cgmq_jax.nn import QuantConv, QuantDense

#: The output channels removed, by layer.
REMOVED = {"conv1": [1, 4], "conv2": [0, 5, 11], "fc1": [3, 50, 100]}


def _images(n, shape, seed):
    """Exact multiples of 2**-8 in [0, 1): integer pixels / 256."""
    ints = np.random.default_rng(seed).integers(0, 256, (n, *shape))
    return (ints / 256.0).astype(np.float32)


def _remove(params, layer, channels):
    """``params`` with these output channels of ``layer`` removed (``n = 0``)."""
    leaf = params[layer]["weight_quantizer"]
    rows = jnp.asarray(channels)
    leaf = leaf.at[rows].set(quantizer.at_min_bitwidth(leaf[rows], prune=True))
    return {**params, layer: {**params[layer], "weight_quantizer": leaf}}


@pytest.fixture(scope="module")
def lenet():
    """LeNet-5 (prune=True), calibrated on 8 synthetic images, biases random; ``params``
    with :data:`REMOVED` removed, ``full`` with every channel kept."""
    model = models.LeNet5(prune=True)
    images = jnp.asarray(_images(8, (28, 28, 1), seed=0))
    with strict_promotion():
        float_params = models.LeNet5(quantized=False).init(jax.random.key(0), images[:1])
        full = qnn.init_quantizers(model, float_params["params"], images)
        full = _random_biases(full, seed=1, scale=0.1)
        params = full
        for layer, channels in REMOVED.items():
            params = _remove(params, layer, channels)
        specs = cost.layer_specs(model, images[:1])
    return {"model": model, "params": params, "full": full, "specs": specs}


@pytest.fixture(scope="module")
def exported(lenet, tmp_path_factory):
    """The pruned LeNet-5's file, with the trainer's certificate."""
    certificate = certify.certify(lenet["params"], lenet["specs"], 2e7)
    path = tmp_path_factory.mktemp("pruned") / "lenet.npz"
    with strict_promotion():
        lowering.export(lenet["params"], lenet["model"], path, certificate=certificate)
    return ex.load(path)


def test_the_file_holds_only_live_channels(exported):
    shapes = {
        layer["name"]: (layer["input_shape"], layer["kernel_shape"], layer["output_shape"])
        for layer in exported.layers
    }
    assert shapes == {
        "conv1": ([28, 28, 1], [5, 5, 1, 4], [24, 24, 4]),
        "conv2": ([12, 12, 4], [5, 5, 4, 13], [8, 8, 13]),
        "fc1": ([208], [208, 117], [117]),  # 13 channels x 4 x 4 positions
        "fc2": ([117], [117, 84], [84]),
        "fc3": ([84], [84, 10], [10]),
    }
    assert [op["shape"] for op in exported.ops if op["op"] == "reshape"] == [[208]]
    for layer in exported.layers:
        assert list(exported.arrays[layer["weight_key"]].shape) == layer["kernel_shape"]
        assert list(exported.arrays[layer["bias_key"]].shape) == [layer["kernel_shape"][-1]]
        levels = layer["weight_levels"]
        if layer["per_channel"]:
            assert len(levels) == layer["kernel_shape"][-1] and min(levels) >= 1
    macs = [layer["macs"] for layer in exported.layers]
    assert macs == [24 * 24 * 4 * 25, 8 * 8 * 13 * 25 * 4, 208 * 117, 117 * 84, 84 * 10]


def test_the_recount_is_the_pruned_cost_and_matches_the_certificate(lenet, exported):
    costs = cost.exact_costs(lenet["params"], lenet["specs"])
    counted = ex.count_bops(exported)
    assert {name: counted[name] for name in costs} == costs
    assert counted["matches_certificate"] is True
    rows = cost.layer_table(lenet["params"], lenet["specs"])
    assert [row["macs"] for row in counted["layers"]] == [row["macs"] for row in rows]
    assert [row["bops"] for row in counted["layers"]] == [row["bops"] for row in rows]
    # The header's certificate rows: the live channels' bits, no pruning keys.
    header_rows = exported.header["certificate"]["layers"]
    assert header_rows[1]["weight_bits"] == [b for b in rows[1]["weight_bits"] if b]
    assert len(header_rows[1]["weight_bits"]) == 13
    assert not any(set(compaction.PRUNED_ROW_KEYS) & set(row) for row in header_rows)


@pytest.mark.parametrize("where", ["removed", "live"])
def test_a_certificate_that_differs_still_differs(lenet, tmp_path, where):
    """Dropping the removed channels' 0s does not hide a certificate that disagrees: a
    removed channel claimed at 2 bits, or a live one at other bits, no longer matches."""
    certificate = certify.certify(lenet["params"], lenet["specs"], 2e7)
    bits = certificate["layers"][1]["weight_bits"]
    channel = REMOVED["conv2"][0] if where == "removed" else 1
    assert (bits[channel] == 0) == (where == "removed")
    bits[channel] = 2 if where == "removed" else bits[channel] + 1
    with strict_promotion():
        path = lowering.export(
            lenet["params"], lenet["model"], tmp_path / "m.npz", certificate=certificate
        )
    assert ex.count_bops(path)["matches_certificate"] is False


def test_the_integer_engine_agrees_with_the_jax_model(lenet, exported):
    images = _images(48, (28, 28, 1), seed=2)
    with strict_promotion():
        result = lowering.compare_with_model(exported, lenet["params"], lenet["model"], images)
    assert result["agree"] == 48
    assert all(row[0] == 0 for row in result["code_mismatches"].values()), result
    # The codes are compared over every channel of the model (0 at the removed ones).
    assert result["code_mismatches"]["conv2"][1] == 48 * 12 * 12 * 6
    assert result["code_mismatches"]["fc1"][1] == 48 * 256  # 16 channels x 4 x 4
    assert result["max_logit_difference"] < 1e-3
    with strict_promotion():
        logits = lenet["model"].apply({"params": lenet["params"]}, jnp.asarray(images))
    ints, exponent = ex.run_integer(exported, np.round(images * 256).astype(np.int64))
    np.testing.assert_array_equal(np.argmax(ints, -1), np.argmax(np.asarray(logits), -1))
    scaled = ints * 2.0**exponent / exported.header["output"]["divisor"]
    assert np.max(np.abs(scaled - np.asarray(logits))) < 1e-3


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on the PATH")
def test_the_c_code_compiles_warning_free_and_is_bit_exact(exported, tmp_path):
    from cgmq_jax.export import c as emit

    program = emit.emit_c(exported, tmp_path / "c")  # compiled with -Wall -Wextra -Werror
    x = np.random.default_rng(3).integers(0, 256, (20, 28, 28, 1), dtype=np.uint8)
    x = np.concatenate([x, np.zeros_like(x[:1]), np.full_like(x[:1], 255)])
    expected = ex.run_integer(exported, x)[0].reshape(len(x), -1)
    np.testing.assert_array_equal(emit.compile_and_run(program, x), expected)
    assert program.weight_bits == exported.facts.weight_memory_bits


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nothing_removed_exports_as_without_compaction(lenet, tmp_path, monkeypatch):
    """A pruning model with every channel kept: the same bytes as with no compaction at all,
    and an unpruned model never consults it."""
    with strict_promotion():
        kept = lowering.export(lenet["full"], lenet["model"], tmp_path / "a.npz")
        monkeypatch.setattr(compaction, "plan", lambda *args: None)
        plain = lowering.export(lenet["full"], lenet["model"], tmp_path / "b.npz")
    assert _sha(kept) == _sha(plain)
    monkeypatch.setattr(compaction, "_live", lambda *args: pytest.fail("consulted"))
    model = models.MLP(hidden=(6,))
    with strict_promotion():
        params = model.init(jax.random.key(0), jnp.asarray(_images(2, (28, 28, 1), 4)))
        path = lowering.export(params["params"], model, tmp_path / "mlp.npz")
        images = _images(4, (28, 28, 1), seed=5)
        result = lowering.compare_with_model(path, params["params"], model, images)
    assert result["agree"] == 4


# --------------------------------------------------------------------------- other graphs


class Residual(nn.Module):
    """conv a -> relu -> conv b (SAME) -> relu, added to a's; flatten; dense."""

    @nn.compact
    def __call__(self, x):
        hidden = {"per_channel": True, "prune": True, "input_signed": False}
        a = nn.relu(QuantConv(4, (3, 3), padding="SAME", name="a", **hidden)(x))
        b = nn.relu(QuantConv(4, (3, 3), padding="SAME", name="b", **hidden)(a))
        y = a + b
        return QuantDense(3, name="fc")(jnp.reshape(y, (y.shape[0], -1)))


class Depthwise(nn.Module):
    """conv (pruning) -> relu -> depthwise conv (not pruning) -> relu; flatten; dense."""

    @nn.compact
    def __call__(self, x):
        hidden = {"per_channel": True, "prune": True, "input_signed": False}
        x = nn.relu(QuantConv(4, (3, 3), name="conv", **hidden)(x))
        x = QuantConv(4, (3, 3), feature_group_count=4, input_signed=False, name="dw")(x)
        x = nn.relu(x)
        return QuantDense(3, name="fc")(jnp.reshape(x, (x.shape[0], -1)))


def _small(model, seed):
    images = _images(16, (8, 8, 1), seed)
    with strict_promotion():
        params = model.init(jax.random.key(seed), jnp.asarray(images))["params"]
    return _random_biases(params, seed, scale=0.3), images


def _export_and_compare(model, params, images, path):
    with strict_promotion():
        lowering.export(params, model, path, input_shape=(8, 8, 1))
        result = lowering.compare_with_model(path, params, model, images)
        specs = cost.layer_specs(model, jnp.asarray(images[:1]), params=params)
    assert result["agree"] == len(images)
    assert all(row[0] == 0 for row in result["code_mismatches"].values()), result
    costs = cost.exact_costs(params, specs)
    assert {name: ex.count_bops(path)[name] for name in costs} == costs
    return ex.load(path)


def test_a_residual_add_of_differently_pruned_tensors_is_refused(tmp_path):
    params, images = _small(Residual(), seed=6)
    params = _remove(params, "b", [1])  # b's channel 1 is 0, a's is not: the sum keeps it
    with (
        strict_promotion(),
        pytest.raises(ValueError, match=r"op \d+ \(add.*residual add of differently pruned"),
    ):
        lowering.export(params, Residual(), tmp_path / "m.npz", input_shape=(8, 8, 1))


def test_a_residual_add_of_alike_pruned_tensors_exports(tmp_path):
    params, images = _small(Residual(), seed=7)
    params = _remove(_remove(params, "a", [1]), "b", [1, 2])
    with pytest.raises(ValueError, match="residual add"):  # b removes 2, a keeps it
        with strict_promotion():
            lowering.export(params, Residual(), tmp_path / "x.npz", input_shape=(8, 8, 1))
    params = _remove(params, "a", [2])
    loaded = _export_and_compare(Residual(), params, images, tmp_path / "m.npz")
    assert [layer["kernel_shape"] for layer in loaded.layers] == [
        [3, 3, 1, 2], [3, 3, 2, 2], [8 * 8 * 2, 3]
    ]  # fmt: skip


def test_a_depthwise_convolution_after_a_pruned_one_is_refused(tmp_path):
    """A removed input channel of a depthwise convolution leaves its group with its bias
    alone, a nonzero constant: the cost refuses the network by name (and so does the
    export, which traces the same specs)."""
    params, images = _small(Depthwise(), seed=8)
    with strict_promotion(), pytest.raises(ValueError, match="'dw' is a grouped convolution"):
        cost.layer_specs(Depthwise(), jnp.asarray(images[:1]), params=params)


class Separable(nn.Module):
    """A DS-CNN in small: conv a (pruning) -> relu -> depthwise 3x3 SAME -> relu ->
    pointwise 1x1 (pruning) -> relu -> depthwise 3x3 stride 2 -> relu -> pointwise 1x1 ->
    relu -> mean -> dense."""

    @nn.compact
    def __call__(self, x):
        hidden = {"per_channel": True, "prune": True, "input_signed": False}
        plain = {"input_signed": False}
        x = nn.relu(QuantConv(4, (3, 3), name="a", **hidden)(x))
        x = nn.relu(QuantConv(4, (3, 3), feature_group_count=4, name="dw1", **plain)(x))
        x = nn.relu(QuantConv(6, (1, 1), name="pw1", **hidden)(x))
        x = QuantConv(6, (3, 3), strides=2, feature_group_count=6, name="dw2", **plain)(x)
        x = nn.relu(QuantConv(5, (1, 1), name="pw2", **plain)(nn.relu(x)))
        return QuantDense(3, name="fc", **plain)(jnp.mean(x, axis=(1, 2)))


def _separable(seed, removed):
    """A :class:`Separable` with ``removed`` output channels of ``a`` and ``pw1``; the
    depthwise biases of those channels positive, so that each outputs a nonzero constant."""
    params, images = _small(Separable(), seed)
    for layer, channels in removed.items():
        params = _remove(params, layer, channels)
        dw = {"a": "dw1", "pw1": "dw2"}[layer]
        bias = params[dw]["bias"].at[jnp.asarray(channels)].set(0.4)
        params = {**params, dw: {**params[dw], "bias": bias}}
    return params, images


def test_a_depthwise_channel_whose_input_is_removed_folds_into_the_next_bias(tmp_path):
    """Removing a channel of ``a`` removes ``dw1``'s channel (its bias, a constant through
    ReLU and ``pw1``'s input quantizer, folds into ``pw1``'s bias) and ``pw1``'s MACs on
    it; the same from ``pw1`` through ``dw2`` to ``pw2``. The file holds live channels
    only, recounts to the pruned cost, and its integer engine and C code agree with the
    JAX model code for code."""
    removed = {"a": [1], "pw1": [0, 4]}
    params, images = _separable(10, removed)
    loaded = _export_and_compare(Separable(), params, images, tmp_path / "m.npz")
    shapes = {layer["name"]: layer["kernel_shape"] for layer in loaded.layers}
    assert shapes == {
        "a": [3, 3, 1, 3], "dw1": [3, 3, 1, 3], "pw1": [1, 1, 3, 4],
        "dw2": [3, 3, 1, 4], "pw2": [1, 1, 4, 5], "fc": [5, 3],
    }  # fmt: skip
    groups = {layer["name"]: layer.get("groups") for layer in loaded.layers}
    assert (groups["dw1"], groups["dw2"]) == (3, 4)
    with strict_promotion():
        live = compaction.input_channels(Separable(), params, (8, 8, 1))
    np.testing.assert_array_equal(live["pw1"][0], [True, False, True, True])
    assert live["pw1"][1][1] > 0 and np.all(live["pw2"][1][[0, 4]] > 0)  # folded, nonzero
    if shutil.which("cc") is not None:
        from cgmq_jax.export import c as emit

        program = emit.emit_c(loaded, tmp_path / "c")  # compiled with -Wall -Wextra -Werror
        x = np.random.default_rng(11).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
        expected = ex.run_integer(loaded, x)[0].reshape(len(x), -1)
        np.testing.assert_array_equal(emit.compile_and_run(program, x), expected)


def test_without_the_fold_the_file_would_disagree(tmp_path, monkeypatch):
    """The fold is what keeps the compacted file exact: with it skipped, the codes after
    ``pw1`` differ from the model's."""
    params, images = _separable(10, {"a": [1], "pw1": [0, 4]})
    monkeypatch.setattr(lowering, "_folded", lambda theta, kernel, values, prune: 0.0)
    with strict_promotion():
        lowering.export(params, Separable(), tmp_path / "m.npz", input_shape=(8, 8, 1))
        result = lowering.compare_with_model(tmp_path / "m.npz", params, Separable(), images)
    assert result["code_mismatches"]["dw2"][0] > 0


def test_the_cost_counts_a_depthwise_channel_whose_input_is_removed_as_removed():
    """The removed channel of ``a`` takes its 3x3 MACs out of ``dw1`` and its 1x1 MACs
    out of ``pw1``, exactly, in the numpy cost and the traced one alike."""
    full, images = _small(Separable(), seed=12)
    params, _ = _separable(12, {"a": [1]})
    with strict_promotion():
        specs = cost.layer_specs(Separable(), jnp.asarray(images[:1]), params=params)
    before, after = cost.layer_table(full, specs), cost.layer_table(params, specs)
    macs = {row["layer"]: (b["macs"], row["macs"]) for b, row in zip(before, after, strict=True)}
    assert macs["a"] == (8 * 8 * 9 * 4, 8 * 8 * 9 * 3)
    assert macs["dw1"] == (8 * 8 * 9 * 4, 8 * 8 * 9 * 3)
    assert macs["pw1"] == (8 * 8 * 4 * 6, 8 * 8 * 3 * 6)
    assert macs["dw2"][0] == macs["dw2"][1] and macs["pw2"][0] == macs["pw2"][1]
    with strict_promotion():
        assert float(cost.bops(params, specs)) == cost.exact_bops(params, specs)


class _PlainSeparable(nn.Module):
    """A user's own depthwise-separable net of plain linen layers (no cgmq_jax in it)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="a")(x))
        x = nn.relu(nn.Conv(4, (3, 3), feature_group_count=4, name="dw")(x))
        x = nn.relu(nn.Conv(5, (1, 1), name="pw")(x))
        return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


def test_quantize_model_prunes_before_a_users_depthwise_convolution(tmp_path):
    from cgmq_jax import rules

    model = rules.quantize_model(
        _PlainSeparable(),
        [
            rules.QuantRule(module_path="a", input_signed=False, per_channel=True, prune=True),
            rules.QuantRule(input_signed=False),
        ],
    )
    params, images = _small(model, seed=15)
    params = _remove(params, "a", [2])
    params = {**params, "dw": {**params["dw"], "bias": params["dw"]["bias"].at[2].set(0.5)}}
    loaded = _export_and_compare(model, params, images, tmp_path / "m.npz")
    assert [layer["kernel_shape"] for layer in loaded.layers] == [
        [3, 3, 1, 3], [3, 3, 1, 3], [1, 1, 3, 5], [5, 3]
    ]  # fmt: skip


def test_a_depthwise_convolution_before_a_padded_one_is_refused():
    """A constant channel read by a zero-padded convolution is not one constant at its
    borders, so it does not fold: refused by name."""

    class Padded(nn.Module):
        @nn.compact
        def __call__(self, x):
            hidden = {"per_channel": True, "prune": True, "input_signed": False}
            x = nn.relu(QuantConv(4, (3, 3), name="a", **hidden)(x))
            dw = QuantConv(4, (3, 3), feature_group_count=4, name="dw", input_signed=False)
            x = nn.relu(dw(x))
            x = QuantConv(4, (3, 3), padding="SAME", name="c", input_signed=False)(x)
            return QuantDense(3, name="fc")(jnp.mean(x, axis=(1, 2)))

    params, images = _small(Padded(), seed=13)
    with (
        strict_promotion(),
        pytest.raises(ValueError, match="'dw' is a grouped.*layer 'c' reads it with zero padding"),
    ):
        cost.layer_specs(Padded(), jnp.asarray(images[:1]), params=params)


def _nnx_pruned_export(net, *, seed, path, change=None):
    """An NNX ``net`` (layer ``conv`` pruning), calibrated on 8 synthetic 8x8 images, with
    ``conv``'s channel 0 removed (and ``change`` applied), exported and compared with the
    model: ``(loaded file, compare_with_model's result)``."""
    from flax import nnx

    from cgmq_jax import nnx as cnnx

    images = _images(8, (8, 8, 1), seed=seed)
    with strict_promotion():
        model = net(nnx.Rngs(0))
        cnnx.calibrate(model, jnp.asarray(images))
        leaf = model.conv.weight_quantizer[...]
        model.conv.weight_quantizer[...] = leaf.at[:1].set(
            quantizer.at_min_bitwidth(leaf[:1], prune=True)
        )
        if change is not None:
            change(model)
        lowering.export(None, model, path, input_shape=(8, 8, 1))
        result = lowering.compare_with_model(path, None, model, images)
    return ex.load(path), result


def test_an_nnx_model_exports_its_live_channels(tmp_path):
    from flax import nnx

    from cgmq_jax import nnx as cnnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            opts = {"input_signed": False, "per_channel": True, "prune": True}
            self.conv = cnnx.QuantConv(1, 4, (3, 3), strides=2, rngs=rngs, **opts)
            self.fc = cnnx.QuantLinear(4 * 4 * 4, 6, rngs=rngs, **opts)
            self.head = cnnx.QuantLinear(6, 3, input_signed=False, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.conv(x))
            return self.head(nnx.relu(self.fc(jnp.reshape(x, (x.shape[0], -1)))))

    loaded, result = _nnx_pruned_export(Net, seed=9, path=tmp_path / "m.npz")
    assert [layer["kernel_shape"] for layer in loaded.layers] == [[3, 3, 1, 3], [48, 6], [6, 3]]
    assert result["agree"] == 8
    assert all(row[0] == 0 for row in result["code_mismatches"].values()), result


def test_an_nnx_depthwise_channel_whose_input_is_removed_folds_too(tmp_path):
    from flax import nnx

    from cgmq_jax import nnx as cnnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            opts = {"input_signed": False, "per_channel": True, "prune": True}
            self.conv = cnnx.QuantConv(1, 4, (3, 3), rngs=rngs, **opts)
            self.dw = cnnx.QuantConv(
                4, 4, (3, 3), feature_group_count=4, input_signed=False, rngs=rngs
            )
            self.pw = cnnx.QuantConv(4, 5, (1, 1), input_signed=False, rngs=rngs)
            self.head = cnnx.QuantLinear(5, 3, input_signed=False, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.dw(nnx.relu(self.conv(x))))
            return self.head(jnp.mean(nnx.relu(self.pw(x)), axis=(1, 2)))

    def nonzero_constant(model):  # dw's channel 0 outputs 0.5 once its input is removed
        model.dw.bias[...] = model.dw.bias[...].at[0].set(0.5)

    loaded, result = _nnx_pruned_export(
        Net, seed=14, path=tmp_path / "m.npz", change=nonzero_constant
    )
    assert [layer["kernel_shape"] for layer in loaded.layers] == [
        [3, 3, 1, 3], [3, 3, 1, 3], [1, 1, 3, 5], [5, 3]
    ]  # fmt: skip
    assert result["agree"] == 8
    assert all(row[0] == 0 for row in result["code_mismatches"].values()), result
