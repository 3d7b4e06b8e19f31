"""Tests of cgmq_jax.export: the integer model file, its reader, BOP recount and inference.

No real data: small models with random weights, biases and inputs. The integer engine is
compared with the real Flax layers (``QuantConv`` / ``QuantDense``, i.e. the trainer's
``quantizer.fake_quant`` path) through :func:`cgmq_jax.export.compare_with_model`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cgmq_jax import cost, quantizer
from cgmq_jax import export as ex
from cgmq_jax.nn import QuantConv, QuantDense

REPO = Path(__file__).resolve().parent.parent


class TinyConv(nn.Module):
    """conv 4@3x3 -> relu -> max-pool 2 -> flatten -> dense 3, on 8x8xC inputs.

    Its traced graph: conv, relu, maxpool (window ``[2, 2, 1]``), reshape, dense.
    """

    input_signed: bool = False
    strides: tuple[int, int] = (1, 1)
    padding: str = "VALID"

    @nn.compact
    def __call__(self, x):
        x = QuantConv(
            features=4,
            kernel_size=(3, 3),
            strides=self.strides,
            padding=self.padding,
            input_signed=self.input_signed,
            name="conv",
        )(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        return QuantDense(features=3, name="fc")(x)


class TinyDense(nn.Module):
    """dense 6 -> relu -> dense 4, on flat inputs."""

    input_signed: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QuantDense(features=6, input_signed=self.input_signed, name="fc1")(x))
        return QuantDense(features=4, name="fc2")(x)


def _with_bits(params, layer, weight_bits, input_bits, *, input_signed, input_range=1.0):
    """``params`` with ``layer``'s quantizers at exact bit-widths (random weights kept)."""
    params = jax.tree.map(lambda v: v, params)
    node = params[layer]
    w_range = jnp.max(jnp.abs(node["kernel"]))
    node["weight_quantizer"] = quantizer.latents(
        *quantizer.init_at_bits(w_range, weight_bits, signed=True)
    )
    node["input_quantizer"] = quantizer.latents(
        *quantizer.init_at_bits(jnp.float32(input_range), input_bits, signed=input_signed)
    )
    return params


def _random_inputs(shape, exponent, *, signed, seed):
    """Exact multiples of ``2**exponent`` in [0, 1.2) (or [-1.2, 1.2) signed): some clip."""
    rng = np.random.default_rng(seed)
    top = int(1.2 * 2.0**-exponent)
    ints = rng.integers(-top if signed else 0, top, size=shape)
    return (ints * 2.0**exponent).astype(np.float32), ints


def _random_biases(params, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, v: (
            jnp.asarray(rng.normal(0.0, scale, v.shape), jnp.float32)
            if path[-1].key == "bias"
            else v
        ),
        params,
    )


def _init(model, shape):
    """Random parameters (eager: a jitted init takes XLA:CPU seconds to compile, see
    conftest.py)."""
    sample = jnp.zeros((1, *shape), jnp.float32)
    return model.init(jax.random.key(0), sample)["params"]


# --------------------------------------------------------------------------- integer helpers


def test_round_shift_matches_round_half_even():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(-5000, 5000, 2000), np.arange(-40, 41)])
    for shift in range(-9, 4):
        expected = np.round(values * 2.0**shift)  # float64 is exact here; halves to even
        np.testing.assert_array_equal(ex.round_shift(values, shift), expected)
    assert ex.round_shift(np.array([1, 3, 5, -1, -3, -5]), -1).tolist() == [0, 2, 2, 0, -2, -2]


def test_round_to_odd_keeps_every_coarser_comparison():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0, 20, 4000), np.arange(-8, 8) / 2.0])
    odd = ex.round_to_odd(values)
    integer = values == np.floor(values)
    np.testing.assert_array_equal(odd[integer], values[integer])
    assert np.all(np.mod(odd[~integer], 2) == 1)
    # For any even integer a: sign(a + odd - 2k) == sign(a + value - 2k) for all k.
    np.testing.assert_array_equal(np.floor(odd / 2), np.floor(values / 2))


@pytest.mark.parametrize(("bits", "dtype"), [(1, np.int8), (8, np.int8), (9, np.int16)])
def test_int_dtype_for_bits(bits, dtype):
    assert ex.int_dtype_for_bits(bits) == np.dtype(dtype)
    assert ex.int_dtype_for_bits(17) == np.dtype(np.int32)


# --------------------------------------------------------------------------- round trip


def test_round_trip_every_integer(tmp_path):
    model = TinyConv()
    params = _with_bits(_init(model, (8, 8, 1)), "conv", 5, 3, input_signed=False)
    params = _with_bits(params, "fc", 3, 4, input_signed=False, input_range=2.0)
    params = _random_biases(params, seed=2)
    path = ex.export(params, model, tmp_path / "m.npz", input_shape=(8, 8, 1))
    loaded = ex.load(path)
    for i, name in enumerate(["conv", "fc"]):
        node, layer = params[name], loaded.layers[i]
        d_w, q_w = quantizer.from_latents(node["weight_quantizer"])
        d_in, q_in = quantizer.from_latents(node["input_quantizer"])
        codes, scale = quantizer.quantize(node["kernel"], d_w, q_w, signed=True)
        np.testing.assert_array_equal(loaded.weight(i), np.asarray(codes))
        assert loaded.weight(i).dtype == np.int8
        assert 2.0 ** layer["weight_exponent"] == float(scale)
        assert 2.0 ** layer["input_exponent"] == float(quantizer.power_of_two_step(d_in))
        assert layer["weight_levels"] == int(quantizer.levels(d_w, q_w))
        assert layer["input_levels"] == int(quantizer.levels(d_in, q_in))
        assert layer["weight_bits"] == int(quantizer.exact_bitwidth(d_w, q_w, signed=True))
        assert layer["input_bits"] == int(quantizer.exact_bitwidth(d_in, q_in, signed=False))
        # The bias: within one unit of its exponent, odd unless exact.
        bias = loaded.bias(i).astype(np.float64) * 2.0 ** layer["bias_exponent"]
        error = np.abs(bias - np.asarray(node["bias"], np.float64))
        assert np.all(error < 2.0 ** layer["bias_exponent"])
        assert layer["bias_bits"] == 32  # stored as int32, the width the weight memory counts
        assert loaded.bias(i).dtype == np.int32
        assert ex.signed_bits(int(np.abs(loaded.bias(i)).max())) <= 32
    assert [layer["weight_bits"] for layer in loaded.layers] == [5, 3]
    assert [layer["input_bits"] for layer in loaded.layers] == [3, 4]
    assert [layer["per_channel"] for layer in loaded.layers] == [False, False]
    conv = loaded.layers[0]
    assert (conv["strides"], conv["padding"], conv["groups"]) == ([1, 1], [[0, 0], [0, 0]], 1)
    assert (conv["kernel_dilation"], conv["input_dilation"]) == ([1, 1], [1, 1])
    # The traced graph (format version 2): tensor 0 the input, op j's output tensor j + 1.
    assert [(op["op"], op["inputs"], op.get("layer")) for op in loaded.ops] == [
        ("conv", [0], 0), ("relu", [1], None), ("maxpool", [2], None),
        ("reshape", [3], None), ("dense", [4], 1),
    ]  # fmt: skip
    assert [op["module"] for op in loaded.ops][::4] == ["conv", "fc"]
    pool = loaded.ops[2]
    assert (pool["window"], pool["strides"]) == ([2, 2, 1], [2, 2, 1])
    assert pool["padding"] == [[0, 0], [0, 0], [0, 0]] and loaded.ops[3]["shape"] == [36]
    assert [t.shape for t in loaded.facts.tensors] == [
        (8, 8, 1), (6, 6, 4), (6, 6, 4), (3, 3, 4), (36,), (3,)
    ]  # fmt: skip
    output = loaded.header["output"]
    assert output["tensor"] == 5 and output["divisor"] == 1
    assert output["exponent"] == loaded.layers[1]["bias_exponent"]
    assert [row.macs for row in loaded.facts.rows] == [1296, 108]
    # Numpy alone reads the same integers back.
    with np.load(path, allow_pickle=False) as raw:
        header = json.loads(raw["header.json"].tobytes().decode("utf-8"))
        assert header["format"] == ex.FORMAT and header["version"] == ex.VERSION == 2
        for key in header["arrays"]:
            np.testing.assert_array_equal(raw[key], loaded.arrays[key])


# --------------------------------------------------------------------------- integer == fake-quant


CASES = [
    # (weight bits, input bits, input signed, network-input exponent)
    (2, 1, False, -8),
    (3, 2, False, -8),
    (4, 4, False, -4),  # the first requantization is a left shift
    (8, 8, False, -8),
    (2, 2, True, -8),
    (5, 3, True, -4),
    (8, 8, True, -8),
    (6, 7, True, -8),
]


@pytest.mark.parametrize(("weight_bits", "input_bits", "signed", "exponent"), CASES)
@pytest.mark.parametrize("kind", ["conv", "dense"])
@pytest.mark.slow  # compiles whole training steps or many programs
def test_integer_inference_equals_fake_quant(
    tmp_path, kind, weight_bits, input_bits, signed, exponent
):
    """Every layer's integer input codes equal the Flax layers' exactly; logits up to the bias.

    The hidden layers' codes are exact because the bias is rounded to odd one bit below
    the next quantizer's half step. The logits differ by the logit bias's rounding (less
    than ``2**bias_exponent``) plus float32 rounding of the JAX logits.
    """
    if kind == "conv":
        model, shape = TinyConv(input_signed=signed), (8, 8, 2)
        first, second = "conv", "fc"
    else:
        model, shape = TinyDense(input_signed=signed), (10,)
        first, second = "fc1", "fc2"
    seed = weight_bits * 100 + input_bits * 10 + signed
    params = _with_bits(_init(model, shape), first, weight_bits, input_bits, input_signed=signed)
    params = _with_bits(
        params, second, max(2, 9 - weight_bits), 9 - input_bits, input_signed=False, input_range=2.0
    )
    params = _random_biases(params, seed)
    path = ex.export(params, model, tmp_path / "m.npz", input_shape=shape, input_exponent=exponent)
    images, ints = _random_inputs((64, *shape), exponent, signed=signed, seed=seed)
    result = ex.compare_with_model(path, params, model, images)
    for name, (mismatching, total, _) in result["code_mismatches"].items():
        assert mismatching == 0, f"{name}: {mismatching} of {total} codes differ"
    assert result["agree"] == 64
    # Logits: the logits layer's bias rounding (< 2**bias_exponent) and float32 rounding.
    loaded = ex.load(path)
    logits, _ = ex.run_integer(loaded, ints)
    tolerance = 2.0 ** loaded.layers[-1]["bias_exponent"] + 1e-6 * np.abs(logits).max()
    assert result["max_logit_difference"] <= tolerance
    # The float entry point (first layer codes from float inputs) gives the same logits.
    codes = ex.input_codes_from_float(loaded, images)
    np.testing.assert_array_equal(ex.run_integer(loaded, codes, first_layer_codes=True)[0], logits)


@pytest.mark.parametrize("snap", [True, False])
def test_accumulator_scale_bias(tmp_path, snap):
    """The brief's bias scheme: exact when biases sit on the accumulator grid, else off by
    at most half an accumulator LSB per logit (one dense layer, no next quantizer)."""

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return QuantDense(features=5, name="fc")(x)

    model, shape = One(), (12,)
    params = _with_bits(_init(model, shape), "fc", 4, 3, input_signed=False)
    params = _random_biases(params, seed=7)
    d_w, _ = quantizer.from_latents(params["fc"]["weight_quantizer"])
    d_in, _ = quantizer.from_latents(params["fc"]["input_quantizer"])
    lsb = float(quantizer.power_of_two_step(d_w)) * float(quantizer.power_of_two_step(d_in))
    if snap:
        params["fc"]["bias"] = jnp.round(params["fc"]["bias"] / lsb) * lsb
    path = ex.export(
        params,
        model,
        tmp_path / "m.npz",
        input_shape=shape,
        bias_scheme="accumulator",
    )
    loaded = ex.load(path)
    assert loaded.layers[0]["bias_exponent"] == loaded.layers[0]["accumulator_exponent"]
    images, _ = _random_inputs((32, *shape), -8, signed=False, seed=7)
    error = ex.compare_with_model(loaded, params, model, images)["max_logit_difference"]
    assert error <= (1e-6 if snap else lsb / 2 + 1e-6)
    if not snap:
        assert error > 1e-6  # the rounding is visible


def test_lenet5_integer_equals_fake_quant_and_trainer_cost(tmp_path, lenet, set_bits):
    """The real LeNet-5 graph at mixed bits: identical codes everywhere, BOPs as the trainer's."""
    specs = lenet["specs"]
    weight_bits = {"conv1": 3, "conv2": 2, "fc1": 4, "fc2": 5, "fc3": 3}
    input_bits = {"conv1": 1, "conv2": 2, "fc1": 3, "fc2": 4, "fc3": 8}
    params = set_bits(lenet["params8"], specs, weight_bits, input_bits)
    params = _random_biases(params, seed=3, scale=0.1)
    certificate = {"bops": cost.exact_bops(params, specs), "budget_bops": 2e6}
    path = ex.export(params, lenet["model"], tmp_path / "lenet.npz", certificate=certificate)
    counted = ex.count_bops(path)
    assert counted["bops"] == certificate["bops"] and counted["matches_certificate"]
    certificate["layers"] = cost.layer_table(params, specs)  # per layer, as the trainer's
    assert ex.count_bops(
        ex.export(params, lenet["model"], tmp_path / "l2.npz", certificate=certificate)
    )["matches_certificate"]
    assert counted["within_budget"] == (certificate["bops"] <= 2e6)
    assert [row["macs"] for row in counted["layers"]] == [spec.macs for spec in specs]
    assert counted["macs"] == 281_640
    images, _ = _random_inputs((48, 28, 28, 1), -8, signed=False, seed=3)
    result = ex.compare_with_model(path, params, lenet["model"], np.minimum(images, 255 / 256))
    assert result["max_logit_difference"] < 1e-3
    assert all(row[0] == 0 for row in result["code_mismatches"].values()), result
    assert result["agree"] == 48


def test_mlp_graph(tmp_path, mlp, set_bits):
    """The MLP's op list (a reshape first, no ReLU after the logits) and its BOPs."""
    specs = mlp["specs"]
    params = _random_biases(set_bits(mlp["params8"], specs, 3, 2), seed=6, scale=0.1)
    certificate = {"bops": cost.exact_bops(params, specs), "budget_bops": 2e6}
    path = ex.export(params, mlp["model"], tmp_path / "mlp.npz", certificate=certificate)
    loaded = ex.load(path)
    assert [op["op"] for op in loaded.header["ops"]] == [
        "reshape", "dense", "relu", "dense", "relu", "dense"
    ]  # fmt: skip
    assert loaded.ops[0]["shape"] == [784]
    assert [op.get("layer") for op in loaded.ops if op["op"] == "dense"] == [0, 1, 2]
    assert loaded.header["output"]["tensor"] == 6
    counted = ex.count_bops(loaded)
    assert counted["matches_certificate"] and counted["macs"] == 266_200
    images, _ = _random_inputs((32, 28, 28, 1), -8, signed=False, seed=6)
    result = ex.compare_with_model(loaded, params, mlp["model"], np.minimum(images, 255 / 256))
    assert all(row[0] == 0 for row in result["code_mismatches"].values()), result
    assert result["agree"] == 32


# --------------------------------------------------------------------------- BOP recount


def test_count_bops_hand_computed(tmp_path):
    """8x8x1 -> conv 4@3x3 valid (6x6x4) -> pool (3x3x4) -> flatten 36 -> dense 3.

    conv: 6*6*4 * 3*3*1 = 1,296 MACs at 3 x 2 bits = 7,776 BOPs;
    dense: 36*3 = 108 MACs at 4 x 5 bits = 2,160 BOPs; total 1,404 MACs, 9,936 BOPs.
    With stride 2 and SAME padding the conv gives 4x4x4: 576 MACs, 3,456 BOPs; then
    pool 2x2x4 -> 16 -> dense 3: 48 MACs, 960 BOPs.
    """
    for strides, padding, expected in (
        ((1, 1), "VALID", [(1296, 7776), (108, 2160)]),
        ((2, 2), "SAME", [(576, 3456), (48, 960)]),
    ):
        model = TinyConv(strides=strides, padding=padding)
        params = _with_bits(_init(model, (8, 8, 1)), "conv", 3, 2, input_signed=False)
        params = _with_bits(params, "fc", 4, 5, input_signed=False)
        certificate = {"bops": sum(b for _, b in expected), "budget_bops": 10_000}
        path = ex.export(
            params,
            model,
            tmp_path / f"{padding}.npz",
            input_shape=(8, 8, 1),
            certificate=certificate,
        )
        counted = ex.count_bops(path)
        assert [(row["macs"], row["bops"]) for row in counted["layers"]] == expected
        assert counted["bops"] == certificate["bops"]
        assert counted["matches_certificate"] and counted["within_budget"]


def test_count_bops_runs_with_jax_blocked(tmp_path):
    """The reader, counter and integer engine need numpy only: ``cgmq_jax.export`` and its
    ``format`` and ``engine`` modules import, count and infer with JAX, Flax and Optax
    blocked (``sys.modules[name] = None`` makes any import of them raise ImportError)."""
    model = TinyConv()
    params = _with_bits(_init(model, (8, 8, 1)), "conv", 3, 2, input_signed=False)
    params = _random_biases(_with_bits(params, "fc", 4, 4, input_signed=False), seed=5)
    path = ex.export(params, model, tmp_path / "m.npz", input_shape=(8, 8, 1))
    _, ints = _random_inputs((16, 8, 8, 1), -8, signed=False, seed=5)
    np.save(tmp_path / "inputs.npy", ints)
    script = f"""
import json, sys
for name in ("jax", "jaxlib", "flax", "optax"):
    sys.modules[name] = None  # any import of them now raises ImportError
import numpy as np
import cgmq_jax.export as ex
import cgmq_jax.export.engine as engine
import cgmq_jax.export.format as fmt
try:
    import jax
except ImportError:
    blocked = True
else:
    blocked = False
path, inputs = {str(path)!r}, np.load({str(tmp_path / "inputs.npy")!r})
counted = fmt.count_bops(path)
assert ex.count_bops(path) == counted
model = fmt.load(path)
logits, exponent = engine.run_integer(model, inputs)
assert np.array_equal(ex.run_integer(path, inputs)[0], logits)
loaded = sorted(
    m for m, v in sys.modules.items()
    if v is not None and m.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "cgmq_jax")
)
print(json.dumps({{"counted": counted, "logits": logits.tolist(), "exponent": exponent,
                  "loaded": loaded, "blocked": blocked}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["blocked"]
    assert got["counted"] == ex.count_bops(path)
    logits, exponent = ex.run_integer(path, ints)
    assert got["logits"] == logits.tolist() and got["exponent"] == exponent
    # Neither JAX, Flax, Optax nor the training side of the package was imported.
    loaded = set(got["loaded"])
    assert {"cgmq_jax", "cgmq_jax.export", "cgmq_jax.export.engine"} <= loaded
    assert all(name in ("cgmq_jax", "cgmq_jax.files") or name.startswith("cgmq_jax.export")
               for name in loaded), loaded  # fmt: skip
    assert "cgmq_jax.lowering" not in loaded


# --------------------------------------------------------------------------- clear errors


@pytest.fixture
def small_file(tmp_path):
    model = TinyDense()
    params = _with_bits(_init(model, (10,)), "fc1", 4, 3, input_signed=False)
    params = _random_biases(_with_bits(params, "fc2", 3, 2, input_signed=False), seed=4)
    return ex.export(params, model, tmp_path / "m.npz", input_shape=(10,))


def _rewrite(path, out, *, header=None, drop=(), replace=None, keep_header_sha=False):
    with np.load(path, allow_pickle=False) as npz:
        entries = {key: npz[key] for key in npz.files if key not in drop}
    if header is not None:
        raw = json.dumps(header).encode()
        entries["header.json"] = np.frombuffer(raw, np.uint8)
        if not keep_header_sha:
            digest = hashlib.sha256(raw).hexdigest().encode()
            entries["header.sha256"] = np.frombuffer(digest, np.uint8)
    entries.update(replace or {})
    np.savez(out, **entries)
    return out


def _header(path):
    with np.load(path, allow_pickle=False) as npz:
        return json.loads(npz["header.json"].tobytes())


def _expect_error(path, *fragments):
    with pytest.raises(ex.ExportError) as info:
        ex.count_bops(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_flipped_byte_is_detected(small_file, tmp_path):
    data = bytearray(small_file.read_bytes())
    with zipfile.ZipFile(small_file) as archive:
        start = archive.getinfo("L0.weight.npy").header_offset
    with np.load(small_file) as npz:
        raw = npz["L0.weight"].tobytes()
    offset = data.index(raw, start) + len(raw) // 2  # a byte of the stored weight codes
    data[offset] ^= 0x01
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    _expect_error(bad, "corrupted")


def test_truncated_file(small_file, tmp_path):
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(small_file.read_bytes()[: small_file.stat().st_size // 2])
    _expect_error(bad, "not a readable .npz")


def test_consistent_zip_with_changed_payload(small_file, tmp_path):
    with np.load(small_file) as npz:
        weight = npz["L0.weight"].copy()
    weight.flat[0] = weight.flat[0] + 1 if weight.flat[0] < 0 else weight.flat[0] - 1
    bad = _rewrite(small_file, tmp_path / "payload.npz", replace={"L0.weight": weight})
    _expect_error(bad, "checksum mismatch in array 'L0.weight'")


def test_changed_header_is_detected(small_file, tmp_path):
    header = _header(small_file)
    header["layers"][0]["input_bits"] -= 1  # an attempt to lower the BOP count
    bad = _rewrite(small_file, tmp_path / "header.npz", header=header, keep_header_sha=True)
    _expect_error(bad, "header checksum mismatch")
    # Re-signed header: the counter still refuses bits that disagree with the levels.
    bad = _rewrite(small_file, tmp_path / "resigned.npz", header=header)
    _expect_error(bad, "bit-widths disagree")


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("format", "onnx", "wrong format 'onnx'"),
        ("version", 99, "unsupported cgmq-int-npz version 99"),
        ("version", 2.0, "unsupported cgmq-int-npz version 2.0"),
        ("version", "2", "unsupported cgmq-int-npz version '2'"),
    ],
)
def test_wrong_format_or_version(small_file, tmp_path, field, value, fragment):
    header = _header(small_file)
    header[field] = value
    _expect_error(_rewrite(small_file, tmp_path / "x.npz", header=header), fragment)


def test_version_1_file_is_refused_with_a_re_export_hint(small_file, tmp_path, capsys):
    """A format-version-1 file (a flat op list) is not read: the message says to re-export."""
    header = _header(small_file)
    header["version"] = 1
    for op in header["ops"]:  # version 1's op list: no tensor inputs
        op.pop("inputs")
    header["output"] = {"layer": 1, "exponent": header["output"]["exponent"]}
    bad = _rewrite(small_file, tmp_path / "v1.npz", header=header)
    message = _expect_error(bad, "unsupported cgmq-int-npz version 1", "re-export")
    assert _cli().main([str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_missing_keys(small_file, tmp_path):
    _expect_error(_rewrite(small_file, tmp_path / "a.npz", drop=["L1.bias"]), "missing array")
    _expect_error(_rewrite(small_file, tmp_path / "b.npz", drop=["header.json"]), "missing entry")
    header = _header(small_file)
    del header["layers"][1]["input_levels"]
    _expect_error(_rewrite(small_file, tmp_path / "c.npz", header=header), "input_levels")
    del header["ops"]
    _expect_error(_rewrite(small_file, tmp_path / "d.npz", header=header), "missing ops")
    header = _header(small_file)
    header["arrays"] = ["L0.weight"]  # a list where a table belongs
    _expect_error(_rewrite(small_file, tmp_path / "e.npz", header=header), "malformed header")
    _expect_error(tmp_path / "absent.npz", "no such file")


def test_cli_reports_a_corrupted_file_and_exits_2(small_file, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("export_cli", REPO / "experiments" / "export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(small_file.read_bytes()[:100])
    assert cli.main([str(bad), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and "\n" not in err
    assert cli.main([str(tmp_path / "no_run_here")]) == 2
    assert cli.main([str(small_file)]) == 0  # no --check: integrity and the BOP table only


class _Squash(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(x)


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Squash(name="act")(x)


class TanhBetween(nn.Module):
    """dense 6 -> tanh (in module ``block/act``) -> dense 4: tanh has no integer op."""

    @nn.compact
    def __call__(self, x):
        x = _Block(name="block")(QuantDense(features=6, name="fc1")(x))
        return QuantDense(features=4, name="fc2")(x)


class PlainDenseLast(nn.Module):
    """dense 6 (quantized) -> relu -> a plain, unquantized ``nn.Dense`` 4."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QuantDense(features=6, name="fc1")(x))
        return nn.Dense(features=4, name="fc2")(x)


def test_export_refuses_an_unsupported_op(tmp_path):
    """The graph is traced: an op the integer engine cannot run (``jnp.tanh`` on an
    activation between two quantized layers) is a ValueError naming the primitive and the
    module path, and nothing is written."""
    model = TanhBetween()
    params = _with_bits(_init(model, (10,)), "fc1", 4, 3, input_signed=False)
    params = _with_bits(params, "fc2", 3, 2, input_signed=True)
    with pytest.raises(ValueError) as info:
        ex.export(params, model, tmp_path / "m.npz", input_shape=(10,))
    message = str(info.value)
    assert "'tanh'" in message and "'block/act'" in message, message
    assert not (tmp_path / "m.npz").exists()


def test_export_refuses_a_plain_dense_layer(tmp_path):
    """A float ``nn.Dense`` (no quantizers) between the input and the logits: refused,
    naming the layer."""
    model = PlainDenseLast()
    params = _with_bits(_init(model, (10,)), "fc1", 4, 3, input_signed=False)
    with pytest.raises(ValueError, match="layer 'fc2' is not quantized"):
        ex.export(params, model, tmp_path / "m.npz", input_shape=(10,))
    assert not (tmp_path / "m.npz").exists()


def test_export_refuses_a_step_that_is_not_a_power_of_two(tmp_path, monkeypatch):
    model = TinyDense()
    params = _with_bits(_init(model, (10,)), "fc1", 4, 3, input_signed=False)
    params = _with_bits(params, "fc2", 3, 2, input_signed=False)
    monkeypatch.setattr(quantizer, "power_of_two_step", lambda d: jnp.float32(0.3))
    with pytest.raises(ValueError, match="not a power of two"):
        ex.export(params, model, tmp_path / "m.npz", input_shape=(10,))


# --------------------------------------------------------------------------- a file that cannot lie


def _resign(header, *, total_bops=None):
    """The header with its BOP total and certificate made consistent with its layer claims."""
    total = sum(L["macs"] * L["weight_bits"] * L["input_bits"] for L in header["layers"])
    header["bops"] = total if total_bops is None else total_bops
    header["macs"] = sum(L["macs"] for L in header["layers"])
    if "certificate" in header:
        header["certificate"]["bops"] = header["bops"]
        header["certificate"].pop("layers", None)
    return header


@pytest.fixture
def conv_file(tmp_path):
    """TinyConv on 8x8x1 with a certificate: conv 1,296 MACs, fc 108 MACs.

    Its ops: conv (tensor 1), relu (2), maxpool (3), reshape to [36] (4), dense (5).
    """
    model = TinyConv()
    params = _with_bits(_init(model, (8, 8, 1)), "conv", 3, 2, input_signed=False)
    params = _random_biases(_with_bits(params, "fc", 4, 5, input_signed=False), seed=3)
    certificate = {"bops": 9936, "budget_bops": 10_000}
    return ex.export(
        params,
        model,
        tmp_path / "conv.npz",
        input_shape=(8, 8, 1),
        certificate=certificate,
    )


@pytest.fixture
def lenet_file(tmp_path, lenet, set_bits):
    """LeNet-5 on 28x28x1 at 3-bit weights and 2-bit inputs, with its certificate."""
    params = _random_biases(set_bits(lenet["params8"], lenet["specs"], 3, 2), seed=8, scale=0.1)
    certificate = {"bops": cost.exact_bops(params, lenet["specs"]), "budget_bops": 2e6}
    return ex.export(params, lenet["model"], tmp_path / "lenet.npz", certificate=certificate)


def _cli():
    spec = importlib.util.spec_from_file_location("export_cli", REPO / "experiments" / "export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def _forge_first_layer_input(header, spatial):
    """Layer 0 (a conv) claims a ``spatial`` input: its output shape and MACs recomputed
    from its own kernel, strides and padding, so that the layer record agrees with itself."""
    conv = header["layers"][0]
    window, (cin, cout) = conv["kernel_shape"][:-2], conv["kernel_shape"][-2:]
    out = [
        (n + lo + hi - k) // s + 1
        for n, k, s, (lo, hi) in zip(spatial, window, conv["strides"], conv["padding"], strict=True)
    ]
    conv["input_shape"], conv["output_shape"] = [*spatial, cin], [*out, cout]
    conv["macs"] = math.prod(out) * cout * math.prod(window) * cin
    return conv["macs"]


@pytest.mark.parametrize(
    ("source", "spatial", "real", "macs"),
    [
        ("conv_file", [4, 4], [8, 8], 144),  # a ninth of the real 1,296
        ("lenet_file", [14, 14], [28, 28], 15_000),  # conv1: 10x10x6 x 5x5x1, not 86,400
    ],
)
def test_forged_input_shape_is_refused(request, tmp_path, capsys, source, spatial, real, macs):
    """Issue 10's forgery: the first conv claims a smaller input (4x4 instead of 8x8, or
    LeNet-5's conv1 14x14 instead of 28x28), its output shape, MACs, the BOP total and the
    certificate made to agree with that claim and every checksum recomputed. The graph,
    followed from ``input.shape``, gives the real shape."""
    path = request.getfixturevalue(source)
    honest = ex.count_bops(path)
    assert honest["matches_certificate"]
    header = _header(path)
    assert _forge_first_layer_input(header, spatial) == macs
    bad = _rewrite(path, tmp_path / "forged.npz", header=_resign(header))
    forged = _header(bad)["certificate"]["bops"]
    assert forged < honest["bops"]  # a forged, smaller count
    name = header["layers"][0]["name"]
    message = _expect_error(
        bad,
        f"layer 0 ({name}).input_shape {[*spatial, 1]} does not follow from the graph, "
        f"which gives {[*real, 1]}",
    )
    with pytest.raises(ex.ExportError, match="input_shape"):
        ex.load(bad)
    assert _cli().main([str(bad), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}"


def test_forged_input_all_the_way_down(conv_file, tmp_path):
    """The forgery carried on: ``input.shape`` too, then each op and claim it runs into,
    until the integer arrays themselves (their shapes are checksummed) refuse it."""
    header = _header(conv_file)
    header["input"]["shape"] = [4, 4, 1]
    _forge_first_layer_input(header, [4, 4])  # conv -> [2, 2, 4]; pool -> [1, 1, 4]
    steps = [
        (lambda h: None, "op 3 (reshape): cannot reshape [1, 1, 4] to [36]"),
        (lambda h: h["ops"][3].update(shape=[4]), "(fc).input_shape [36] does not follow"),
        (lambda h: h["layers"][1].update(input_shape=[4]), "kernel_shape [36, 3] does not fit"),
        (lambda h: h["layers"][1].update(kernel_shape=[4, 3]), "weight array shape [36, 3]"),
    ]
    for i, (edit, fragment) in enumerate(steps):
        edit(header)
        _expect_error(_rewrite(conv_file, tmp_path / f"f{i}.npz", header=_resign(header)), fragment)


def _skip_the_reshape(h):
    h["ops"].pop(3)
    h["ops"][3]["inputs"] = [3]


def _drop_the_logits_layer(h):
    h["ops"].pop(4)
    h["output"].update(tensor=4, exponent=h["layers"][0]["bias_exponent"])


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        # layer records that disagree with themselves or with their arrays
        (lambda h: h["layers"][0].update(output_shape=[3, 3, 4]), "output_shape [3, 3, 4]"),
        (lambda h: h["layers"][0].update(macs=100), "(conv).macs 100 disagrees"),
        (lambda h: h["layers"][0].update(kernel_shape=[1, 1, 1, 4]), "!= kernel_shape"),
        (lambda h: h["layers"][0].update(strides=[2, 2]), "output_shape [6, 6, 4]"),
        (lambda h: h["layers"][0].update(strides=[2]), "strides must be a list of 2"),
        (lambda h: h["layers"][0].update(padding=[[1, 1], [1, 1]]), "output_shape"),
        (lambda h: h["layers"][0].update(padding=[[0, 0]]), "padding must hold 2 [low, high]"),
        (lambda h: h["layers"][0].update(groups=2), "groups 2"),
        (lambda h: h["layers"][0].update(kernel_dilation=[2, 2]), "which give [4, 4, 4]"),
        (lambda h: h["layers"][0].update(input_dilation=[2, 2]), "which give [13, 13, 4]"),
        (lambda h: h["layers"][0].update(per_channel=True), "must list 4 per-channel values"),
        (lambda h: h["layers"][1].update(kind="conv"), "layer 1 is missing strides, padding"),
        (lambda h: h["layers"][1].update(input_shape=[9], macs=27), "(fc).input_shape [9]"),
        (lambda h: h["layers"][1].update(weight_key="L0.weight"), "names no array"),
        # ops whose shapes do not lead to the layers' claims
        (lambda h: h["ops"][2].update(window=[3, 3, 1]), "cannot reshape [2, 2, 4] to [36]"),
        (
            lambda h: (h["ops"][2].update(window=[3, 3, 1]), h["ops"][3].update(shape=[16])),
            "(fc).input_shape [36] does not follow from the graph, which gives [16]",
        ),
        (lambda h: h["ops"][2].update(window=[2, 2]), "window must be a list of 3 integers"),
        (lambda h: h["ops"][2].update(padding="VALID"), "padding must be a JSON list"),
        (
            lambda h: h["ops"][2].update(padding=[[0, 0], [0, 0], [2, 2]]),
            "op 2 (maxpool): a window covers padding only",
        ),
        (lambda h: h["ops"][3].update(shape=[35]), "cannot reshape [3, 3, 4] to [35]"),
        (lambda h: h["ops"][3].update(op="flatten"), "unknown op 'flatten'"),  # version 1's
        (lambda h: h["ops"].pop(3), "op 3 (dense).inputs[0] = 4 is outside [0, 3]"),
        (
            _skip_the_reshape,
            "(fc).input_shape [36] does not follow from the graph, which gives [3, 3, 4]",
        ),
        (lambda h: h["input"].update(shape=[10, 10, 1]), "gives [10, 10, 1]"),
        (lambda h: h["ops"].insert(0, {"op": "softmax", "inputs": [0]}), "unknown op 'softmax'"),
        # the graph's wiring
        (lambda h: h["ops"][0].update(inputs=[1]), "op 0 (conv).inputs[0] = 1 is outside [0, 0]"),
        (lambda h: h["ops"][1].update(inputs=[1, 1]), "op 1 (relu) takes 1 inputs, got 2"),
        (lambda h: h["ops"][1].pop("inputs"), "op 1 (relu).inputs must be a JSON list"),
        (lambda h: h["ops"][4].update(layer=0), "op 4 visits layer 0"),
        (lambda h: h["ops"][0].update(op="dense"), "op 0 runs layer 0, a conv, as dense"),
        (_drop_the_logits_layer, "the ops visit 1 of 2 layers"),
        (lambda h: h["output"].update(tensor=9), "output.tensor = 9 is outside [1, 5]"),
        (lambda h: h["output"].update(tensor=4), "is not the last op's"),
        (lambda h: h["output"].update(divisor=2), "disagree with the graph's"),
    ],
)
@pytest.mark.slow  # compiles whole training steps or many programs
def test_inconsistent_shapes_are_refused(conv_file, tmp_path, edit, fragment):
    header = _header(conv_file)
    edit(header)
    bad = _rewrite(conv_file, tmp_path / "bad.npz", header=_resign(header))
    message = _expect_error(bad, fragment)
    with pytest.raises(ex.ExportError):
        ex.load(bad)
    assert message.startswith(str(bad))


@pytest.mark.parametrize("value", [0.5, -8.5, -8.0, "3", None, True, [1]])
@pytest.mark.parametrize(
    "field", ["weight_exponent", "input_exponent", "bias_exponent", "accumulator_exponent"]
)
@pytest.mark.slow  # compiles whole training steps or many programs
def test_exponents_must_be_integers(small_file, tmp_path, field, value):
    header = _header(small_file)
    header["layers"][0][field] = value
    bad = _rewrite(small_file, tmp_path / "x.npz", header=header)
    _expect_error(bad, f"layer 0 (fc1).{field} must be an integer, got {value!r}")


@pytest.mark.parametrize("value", [0.5, -8.5, -8.0, "-8", None, True])
def test_input_and_output_exponents_must_be_integers(small_file, tmp_path, value):
    header = _header(small_file)
    header["input"]["exponent"] = value
    bad = _rewrite(small_file, tmp_path / "i.npz", header=header)
    _expect_error(bad, f"input.exponent must be an integer, got {value!r}")
    header = _header(small_file)
    header["output"]["exponent"] = value
    bad = _rewrite(small_file, tmp_path / "o.npz", header=header)
    _expect_error(bad, f"output.exponent must be an integer, got {value!r}")


@pytest.mark.parametrize(
    ("field", "make"),
    [
        ("exponent", float),
        ("divisor", float),
        ("divisor", bool),
    ],
)
@pytest.mark.slow  # compiles whole training steps or many programs
def test_output_exponent_and_divisor_must_be_json_integers(small_file, tmp_path, field, make):
    """The right value with the wrong JSON type (``-19.0`` for ``-19``, ``true`` for ``1``)."""
    header = _header(small_file)
    header["output"][field] = make(header["output"][field])
    _expect_error(_rewrite(small_file, tmp_path / "o.npz", header=header), f"output.{field}")


def _zip_with(source, out, extra_name, *, inflated=1 << 30):
    """``source`` with ``extra_name`` added or replaced: a deflated member of zeros."""
    with zipfile.ZipFile(source) as archive:
        members = [(i, archive.read(i)) for i in archive.infolist() if i.filename != extra_name]
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for info, data in members:
            archive.writestr(info, data)  # as they were (stored)
        chunk = bytes(1 << 20)
        with archive.open(extra_name, "w", force_zip64=True) as stream:  # streamed
            for _ in range(inflated >> 20):
                stream.write(chunk)
    with zipfile.ZipFile(out) as archive:
        info = archive.getinfo(extra_name)
        assert info.file_size == inflated and info.compress_size < inflated // 200
    return out


@pytest.mark.parametrize(
    ("member", "fragment"),
    [
        ("bomb.npy", "unlisted archive member 'bomb.npy'"),
        ("L0.weight.npy", "claims 1,073,741,824 bytes"),
        ("header.json.npy", "claims 1,073,741,824 bytes"),
    ],
)
@pytest.mark.slow  # compiles whole training steps or many programs
def test_zip_bomb_is_refused_without_inflating(small_file, tmp_path, member, fragment):
    """A small file whose member inflates to 1 GiB: refused from the zip directory alone."""
    import time
    import tracemalloc

    bomb = _zip_with(small_file, tmp_path / "bomb.npz", member)
    assert bomb.stat().st_size < 8 << 20  # a few MB that inflate to 1 GiB
    tracemalloc.start()
    start = time.perf_counter()
    try:
        _expect_error(bomb, fragment)
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert elapsed < 2.0 and peak < 16 << 20, (elapsed, peak)


def _flip_offsets(data, text):
    """``(offset, pattern, inside the header text)`` of the flips of the fuzz below.

    Every byte outside the ``header.json`` text and the ``.npy`` preambles' space padding
    (zip local headers, directory and end records, ``.npy`` magic and dicts, the integer
    arrays, the header checksum) is flipped once, with ``0xFF``, ``0x01`` or ``0x80`` in
    turn. The header text (most of a version-2 file, guarded as one block by the zip CRC
    and its SHA-256) is sampled every 29th byte, the padding every 7th.
    """
    first = data.index(text)
    text_bytes = range(first, first + len(text))
    padding = set()
    for match in re.finditer(rb" {8,}\n", data):
        padding.update(range(*match.span()))
    for offset in range(len(data)):
        inside = offset in text_bytes
        if inside and (offset - first) % 29:
            continue
        if offset in padding and offset % 7:
            continue
        yield offset, (0xFF, 0x01, 0x80)[offset % 3], inside


# About 1,500 loads: slow tier (the unit tier keeps the CLI's 60 flips below).
@pytest.mark.slow
def test_every_single_byte_flip_is_refused_or_harmless(small_file, tmp_path):
    """Flip the bytes of a real export (``_flip_offsets``: about 1,500 loads, a few
    seconds): ``load`` either returns the same model (a flip in zip metadata it does not
    use) or raises a one-line ExportError, nothing else; a flipped header byte is always
    refused."""
    data = small_file.read_bytes()
    good = ex.load(small_file)
    with np.load(small_file, allow_pickle=False) as npz:
        text = npz["header.json"].tobytes()
    bad = tmp_path / "flip.npz"
    outcomes = {"same": 0, "refused": 0}
    for offset, pattern, inside in _flip_offsets(data, text):
        flipped = bytearray(data)
        flipped[offset] ^= pattern
        bad.write_bytes(bytes(flipped))
        try:
            model = ex.load(bad)
        except ex.ExportError as error:
            message = str(error)
            assert "\n" not in message and message.startswith(str(bad)), (offset, message)
            outcomes["refused"] += 1
            continue
        assert not inside, (offset, "a flipped header byte was accepted")
        assert model.header == good.header, offset
        assert model.facts == good.facts, offset
        assert model.arrays.keys() == good.arrays.keys(), offset
        for key, array in good.arrays.items():
            assert model.arrays[key].dtype == array.dtype, (offset, key)
            np.testing.assert_array_equal(model.arrays[key], array, err_msg=str(offset))
        outcomes["same"] += 1
    assert outcomes["refused"] > outcomes["same"] > 0, outcomes


def test_cli_exits_2_on_flipped_bytes(small_file, tmp_path, capsys):
    """A deterministic sample of flips through the CLI: exit 0 (harmless) or 2, one line."""
    cli = _cli()
    data = small_file.read_bytes()
    bad = tmp_path / "flip.npz"
    codes = []
    for offset in np.random.default_rng(10).choice(len(data), 60, replace=False):
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        code = cli.main([str(bad)])
        err = capsys.readouterr().err.strip()
        assert code in (0, 2), (offset, code)
        if code == 2:
            assert err.startswith(f"error: {bad}: ") and "\n" not in err, (offset, err)
        codes.append(code)
    assert 2 in codes
