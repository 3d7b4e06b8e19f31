"""Tests of cgmq_jax.export.onnx: the QDQ graph from the integer file, run by ONNX Runtime.

Small synthetic ``cgmq-int-npz`` models (random integer weights and biases, written with
``format.save``; numpy only) cover every op of format version 2 the ONNX writer translates:
conv 1-D / 2-D with strides, padding, groups, depthwise per-channel weights, kernel and
input dilation, ReLU, ReLU6, max and sum pools (per channel and over channels), sum, div,
residual add, concat, reshape, dense on inputs of any rank, signed and unsigned quantizers
from 1 to 15 bits. Each is exported, checked by ``onnx.checker`` (full), run by ONNX
Runtime, and every layer's input codes must equal the integer engine's; the recount from
the ONNX file alone must equal the file's. Tampered files recount differently or are
refused.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from integer_models import Builder, residual_model  # noqa: E402

from cgmq_jax.export import engine, format  # noqa: E402
from cgmq_jax.export import onnx as ox  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the models


def lenet_model(path):
    """conv (SAME) -> ReLU -> 2x2 max pool -> conv 2-bit input -> ReLU -> max pool ->
    reshape -> dense 1-bit input -> ReLU -> dense (8-bit weights, 4-bit input)."""
    b = Builder([12, 12, 1], bias_bits=32, seed=6)
    t = b.layer(
        "conv",
        0,
        [3, 3, 1, 4],
        in_exponent=-4,
        in_levels=15,
        padding=[[1, 1]] * 2,
        w_levels=7,
        w_exponent=-4,
        bias_max=100,
    )
    t = b.op("relu", [t], b.shapes[t])
    t = b.op("maxpool", [t], [6, 6, 4], window=[2, 2, 1], strides=[2, 2, 1], padding=[[0, 0]] * 3)
    t = b.layer("conv", t, [3, 3, 4, 6], in_exponent=-3, in_levels=3, w_levels=1, w_exponent=-2)
    t = b.op("relu", [t], b.shapes[t])
    t = b.op("maxpool", [t], [2, 2, 6], window=[2, 2, 1], strides=[2, 2, 1], padding=[[0, 0]] * 3)
    t = b.op("reshape", [t], [24], shape=[24])
    t = b.layer("dense", t, [24, 16], in_exponent=-1, in_levels=1, w_levels=3, bias_max=20)
    t = b.op("relu", [t], b.shapes[t])
    b.layer("dense", t, [16, 10], in_exponent=-2, in_levels=15, w_levels=127, w_exponent=-8)
    return b.save(path)


def depthwise_model(path):
    """Conv stride 2 + padding; depthwise per-channel conv with kernel dilation (2- to
    5-bit channels); ReLU6 clip; max pool with padding and a window over channels (pooled
    as one channel); a sum pool per channel (average: sum + div); reshape; dense."""
    b = Builder([9, 9, 3], bias_bits=32, seed=1)
    t = b.layer(
        "conv",
        0,
        [3, 3, 3, 6],
        in_exponent=-4,
        in_levels=15,
        strides=[2, 2],
        padding=[[1, 1], [1, 1]],
        w_levels=3,
        w_exponent=-1,
        bias_shift=2,
        bias_max=200,
    )
    t = b.op("relu", [t], b.shapes[t])
    t = b.layer(
        "conv",
        t,
        [3, 3, 1, 6],
        in_exponent=-3,
        in_levels=31,
        signed=True,
        groups=6,
        kernel_dilation=[2, 2],
        padding=[[2, 2], [2, 2]],
        w_levels=[1, 3, 7, 15, 2, 5],
        w_exponent=[0, -1, -1, -2, 0, -1],
        bias_max=1000,
    )
    t = b.op("clip", [t], b.shapes[t], min=[0, 0], max=[3, 1])  # ReLU6
    t = b.op(
        "maxpool",
        [t],
        [3, 3, 3],
        window=[2, 2, 2],
        strides=[2, 2, 2],
        padding=[[0, 1], [0, 1], [0, 0]],
    )
    t = b.op(
        "sumpool",
        [t],
        [3, 3, 3],
        window=[2, 2, 1],
        strides=[1, 1, 1],
        padding=[[0, 1], [0, 1], [0, 0]],
    )
    t = b.op("div", [t], [3, 3, 3], by=4)
    t = b.op("reshape", [t], [27], shape=[27])
    b.layer("dense", t, [27, 10], in_exponent=-2, in_levels=31, w_levels=7, bias_max=300)
    return b.save(path)


def conv1d_model(path):
    """Signed first quantizer, 1-D conv with input dilation, average pool over time and
    channels (sum pool + div, one channel) into a grouped conv, global average (sum + div)
    into a per-channel dense layer."""
    b = Builder([12, 2], bias_bits=32, seed=2)
    t = b.layer(
        "conv",
        0,
        [3, 2, 4],
        in_exponent=-5,
        in_levels=31,
        signed=True,
        input_dilation=[2],
        padding=[[1, 2]],
        w_levels=3,
        w_exponent=-2,
        bias_max=20,
    )
    t = b.op("sumpool", [t], [12, 4], window=[3, 1], strides=[2, 1], padding=[[1, 1], [0, 0]])
    t = b.op("div", [t], [12, 4], by=3)
    t = b.layer(
        "conv",
        t,
        [2, 2, 4],
        in_exponent=-5,
        in_levels=63,
        signed=True,
        strides=[2],
        groups=2,
        w_levels=7,
        w_exponent=-3,
        bias_shift=2,
        bias_max=500,
    )
    t = b.op("relu", [t], b.shapes[t])
    t = b.op("sum", [t], [4], axes=[0])
    t = b.op("div", [t], [4], by=6)
    b.layer(
        "dense",
        t,
        [4, 5],
        in_exponent=-5,
        in_levels=15,
        w_levels=[3, 1, 7, 2, 3],
        w_exponent=[-2, -1, -3, -2, -2],
        bias_max=40,
    )
    return b.save(path)


def conv3d_model(path):
    """3-D conv with strides, asymmetric padding, kernel and input dilation; a max pool over
    the three spatial axes with padding; a dense layer on the 4-D result (per position)."""
    b = Builder([3, 4, 4, 2], bias_bits=32, seed=5)
    t = b.layer(
        "conv",
        0,
        [2, 2, 3, 2, 3],
        in_exponent=-3,
        in_levels=15,
        strides=[1, 2, 1],
        padding=[[1, 0], [0, 1], [1, 1]],
        kernel_dilation=[1, 1, 2],
        input_dilation=[2, 1, 1],
        w_levels=3,
        bias_max=30,
    )
    t = b.op(
        "maxpool",
        [t],
        [3, 2, 2, 3],
        window=[2, 1, 2, 1],
        strides=[2, 1, 1, 1],
        padding=[[1, 0], [0, 0], [0, 1], [0, 0]],
    )
    b.layer("dense", t, [3, 4], in_exponent=-4, in_levels=15, signed=True, w_levels=3)
    return b.save(path)


MODELS = {
    "lenet": lenet_model,
    "conv3d": conv3d_model,
    "depthwise": depthwise_model,
    "conv1d": conv1d_model,
    "residual": functools.partial(residual_model, bias_bits=32),
}
N_EXAMPLES = 64


def _examples(model, seed):
    """Random uint8 examples plus an all-0 and an all-255 one (saturation)."""
    shape = model.header["input"]["shape"]
    x = np.random.default_rng(seed).integers(0, 256, (N_EXAMPLES - 2, *shape))
    return np.concatenate([x, np.zeros((1, *shape), np.int64), np.full((1, *shape), 255)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``{name: (integer model, ONNX path)}`` for every model, written once."""
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, make in MODELS.items():
        model = make(folder / f"{name}.npz")
        out[name] = (model, ox.to_onnx(model, folder / f"{name}.onnx") and folder / f"{name}.onnx")
    return out


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_runtime_equals_the_engine(exported, name):
    """Every layer's input codes identical to the engine's; logits within float32 rounding,
    bit-for-bit where :func:`float32_exact` proves every layer exact; same predictions."""
    model, path = exported[name]
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    ints = _examples(model, seed=len(name))
    real = (ints * 2.0 ** model.header["input"]["exponent"]).astype(np.float32)
    sess = ox.session(path)
    logits = ox.run_onnx(sess, real)
    expected, exponent, codes = engine.run_integer(model, ints, return_codes=True)
    reference = expected * 2.0**exponent / model.header["output"]["divisor"]
    ours = ox.layer_codes(path, real)
    assert set(ours) == set(codes)
    for layer, theirs in codes.items():
        np.testing.assert_array_equal(ours[layer], theirs, err_msg=layer)
    tolerance = 2.0**-20 * np.abs(reference).max() + 1e-30
    np.testing.assert_allclose(logits, reference, rtol=0, atol=tolerance)
    if all(ox.float32_exact(model).values()):
        np.testing.assert_array_equal(logits, reference.astype(np.float32))
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("name", list(MODELS))
def test_recount_from_the_onnx_file_equals_the_integer_file(exported, name):
    model, path = exported[name]
    counted, recounted = format.count_bops(model), ox.recount_onnx(path)
    assert recounted["layers"] == [{k: v for k, v in row.items()} for row in counted["layers"]]
    for key in ("macs", "bops", "weight_memory_bits", "activation_bits", "certificate_bops"):
        assert recounted[key] == counted[key], key
    assert recounted["matches_certificate"] and recounted["ok"] and recounted["graph_intact"]
    assert recounted["opset"] == ox.DEFAULT_OPSET


def test_narrowest_types_and_metadata(exported):
    """Weights in the narrowest type (int2 at opset 25), activations 8 or 16 bits, clipped
    to their levels; the bit-widths and the certificate in metadata_props."""
    model, path = exported["lenet"]
    proto = onnx.load(str(path))
    init = {i.name: i for i in proto.graph.initializer}
    name = onnx.TensorProto.DataType.Name
    assert name(init["conv1.weight"].data_type) == "INT2"  # levels 1: codes -1..1
    assert name(init["conv0.weight"].data_type) == "INT4"  # levels 7
    assert name(init["dense3.weight"].data_type) == "INT8"
    assert name(init["conv1.input_zero_point"].data_type) == "UINT8"
    clip = onnx.numpy_helper.to_array
    assert clip(init["conv1.input_max"]) == 3 * 2.0**-3 and clip(init["conv1.input_min"]) == 0
    props = {p.key: p.value for p in proto.metadata_props}
    layers = json.loads(props["cgmq.layers"])
    assert [row["input_bits"] for row in layers] == [4, 2, 1, 4]
    assert json.loads(props["cgmq.certificate"])["bops"] == format.count_bops(model)["bops"]
    residual = onnx.load(str(exported["residual"][1]))
    types = {i.name: name(i.data_type) for i in residual.graph.initializer}
    assert types["dense3.input_zero_point"] == "INT16"  # 15-bit signed codes


def test_narrow_activations_at_opset_21(exported, tmp_path):
    """``narrow_activations``: 4-bit activation types; opset 21 stores 2-bit codes in 4."""
    model, _ = exported["lenet"]
    proto = ox.to_onnx(model, opset=21, narrow_activations=True)
    init = {i.name: onnx.TensorProto.DataType.Name(i.data_type) for i in proto.graph.initializer}
    assert init["conv1.weight"] == "INT4" and init["conv1.input_zero_point"] == "UINT4"
    assert init["dense2.input_zero_point"] == "UINT4"
    assert ox.recount_onnx(proto)["bops"] == format.count_bops(model)["bops"]


# --------------------------------------------------------------------------- tampering


def _tampered(path, tmp_path, edit):
    proto = onnx.load(str(path))
    init = {i.name: i for i in proto.graph.initializer}
    edit(proto, init)
    out = tmp_path / "tampered.onnx"
    onnx.save(proto, str(out))
    return out


def _set(init, name, value):
    init[name].CopyFrom(onnx.numpy_helper.from_array(np.asarray(value, np.float32), name))


def test_a_changed_scale_is_seen(exported, tmp_path):
    """Another power of two: recount equal, metadata and graph SHA-256 not; not a power of
    two: refused."""
    _, path = exported["lenet"]
    out = _tampered(path, tmp_path, lambda p, i: _set(i, "dense2.weight_scale", 2.0**-5))
    recounted = ox.recount_onnx(out)
    assert not recounted["matches_metadata"] and not recounted["graph_intact"]
    assert not recounted["ok"]
    out = _tampered(path, tmp_path, lambda p, i: _set(i, "conv0.input_scale", 0.1))
    with pytest.raises(ox.OnnxError, match="scale 0.100000001 is not a power of two"):
        ox.recount_onnx(out)


def test_a_changed_clip_range_recounts_differently(exported, tmp_path):
    """conv1's input clip widened from 0..3 to 0..7 steps: 3 bits, not 2; the BOPs differ."""
    model, path = exported["lenet"]
    out = _tampered(path, tmp_path, lambda p, i: _set(i, "conv1.input_max", 7 * 2.0**-3))
    recounted = ox.recount_onnx(out)
    assert recounted["layers"][1]["input_bits"] == 3
    assert recounted["bops"] > format.count_bops(model)["bops"]
    assert recounted["matches_certificate"] is False and not recounted["ok"]


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda p, i: _set(i, "conv1.input_max", 2.5 * 2.0**-3), "not \\[0, n\\]"),
        (lambda p, i: _set(i, "conv0.input_max", 300 * 2.0**-4), "does not fit its type UINT8"),
        (
            lambda p, i: i["dense2.weight"].CopyFrom(
                onnx.helper.make_tensor("dense2.weight", onnx.TensorProto.INT4, [16, 24], [5] * 384)
            ),
            "outside the stated levels",
        ),
        (
            lambda p, i: p.graph.node.append(onnx.helper.make_node("Tanh", ["logits"], ["t"])),
            "op Tanh is not one the writer emits",
        ),
        (lambda p, i: p.metadata_props.pop(0), "not a cgmq-onnx-qdq model"),
    ],
    ids=[
        "clip-not-integer-levels",
        "clip-beyond-type",
        "weight-beyond-levels",
        "foreign-op",
        "no-metadata",
    ],
)
def test_a_tampered_file_is_refused(exported, tmp_path, edit, fragment):
    _, path = exported["lenet"]
    with pytest.raises(ox.OnnxError, match=fragment):
        ox.recount_onnx(_tampered(path, tmp_path, edit))


# --------------------------------------------------------------------------- bad input


def test_clear_errors(exported, tmp_path, monkeypatch):
    model, _ = exported["lenet"]
    with pytest.raises(ox.OnnxError, match="opset 20: the writer emits 21 to 25"):
        ox.to_onnx(model, opset=20)
    with pytest.raises(ox.OnnxError, match="a 17-bit activation quantizer: ONNX QDQ holds at most"):
        ox.code_type(17, signed=True)
    with pytest.raises(ox.OnnxError, match="no such file"):
        ox.recount_onnx(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00junk")
    with pytest.raises(ox.OnnxError, match="not a readable ONNX file"):
        ox.recount_onnx(tmp_path / "junk.onnx")
    wide = Builder([4], bias_bits=32, seed=9)
    wide.layer("dense", 0, [4, 2], in_exponent=-8, in_levels=1 << 17, signed=True)
    with pytest.raises(ox.OnnxError, match="a 19-bit activation quantizer: ONNX QDQ holds"):
        ox.to_onnx(wide.save(tmp_path / "wide.npz"))
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    with pytest.raises(
        ox.OnnxError, match=r"onnx is not installed: pip install -r requirements-onnx.txt"
    ):
        ox.to_onnx(model)


def test_onnx_module_and_recount_run_with_jax_blocked(exported):
    """``cgmq_jax.export.onnx`` imports no JAX; the recount reads an ONNX file alone."""
    _, path = exported["conv1d"]
    script = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "chex"):
            raise ImportError(name + " is blocked")
sys.meta_path.insert(0, Block())
from cgmq_jax.export import onnx
print(onnx.recount_onnx({str(path)!r})["bops"])
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == format.count_bops(exported["conv1d"][0])["bops"]


# --------------------------------------------------------------------------- the CLI


def test_cli_writes_onnx_from_a_file(exported, tmp_path, capsys, monkeypatch):
    """``export.py FILE.npz --onnx OUT.onnx``: written and recounted; an existing file is
    refused without --overwrite; without onnx, one line naming the fix (exit 2)."""
    from conftest import load_cli

    main = load_cli("export").main
    model, _ = exported["depthwise"]
    out = tmp_path / "m.onnx"
    assert main([str(model.path), "--onnx", str(out)]) == 0
    bops = format.count_bops(model)["bops"]
    text = capsys.readouterr().out
    assert f"recounted from the ONNX file: {bops:,} BOPs, EQUAL to the certificate's" in text
    assert ox.recount_onnx(out)["ok"]
    assert main([str(model.path), "--onnx", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main([str(model.path), "--onnx", str(out), "--overwrite"]) == 0
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main([str(model.path), "--onnx", str(tmp_path / "n.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: onnx is not installed: pip install -r requirements-onnx.txt"


def test_check_onnx_reports_agreement(exported, tmp_path):
    """``--check``'s ONNX step: accuracy, agreement with the engine and JAX, the recount."""
    from conftest import load_cli

    cli = load_cli("export")
    model, path = exported["lenet"]
    ints = _examples(model, seed=7)
    real = (ints * 2.0**-8).astype(np.float32)
    int_pred = engine.predict(model, ints)
    labels = (int_pred + np.arange(len(ints)) % 2) % 10  # half of them right
    summary, problems = {}, []
    jax_pred = int_pred.copy()
    jax_pred[0] = (jax_pred[0] + 1) % 10
    cli._check_onnx(path, real, labels, int_pred, jax_pred, summary, problems)
    assert problems == []
    assert summary["onnx"]["agree_with_engine"] == len(ints)
    assert summary["onnx"]["agree_with_jax"] == len(ints) - 1
    assert summary["onnx"]["test_accuracy"] == 0.5
    assert summary["onnx"]["matches_certificate"] and summary["onnx"]["graph_intact"]
    wrong = int_pred.copy()
    wrong[:2] = (wrong[:2] + 1) % 10  # 62 of 64 agree: below 99.9%
    cli._check_onnx(path, real, labels, wrong, None, {}, problems)
    assert problems == ["only 62 of 64 ONNX Runtime predictions agree with the engine"]


def test_float32_exact_follows_the_graph(exported):
    """A division by 3 (an average pool) is not exact in float32, nor is all that follows;
    a division by 4 is."""
    lenet, depthwise, conv1d = (exported[name][0] for name in ("lenet", "depthwise", "conv1d"))
    assert ox.float32_exact(lenet) == dict.fromkeys(["conv0", "conv1", "dense2", "dense3"], True)
    assert ox.float32_exact(depthwise) == dict.fromkeys(["conv0", "conv1", "dense2"], True)
    assert ox.float32_exact(conv1d) == {"conv0": True, "conv1": False, "dense2": False}
