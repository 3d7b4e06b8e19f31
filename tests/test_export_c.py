"""Tests of cgmq_jax.export.c: the C99 emitter, bit-identical to the numpy integer engine.

Small synthetic ``cgmq-int-npz`` models (random integer weights and biases, written with
``format.save``) cover every op of format version 2; each is compiled with
``cc -std=c99 -O2 -Wall -Wextra -Werror`` and its logits on random ``uint8`` examples must
equal ``engine.run_integer``'s exactly.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

if shutil.which("cc") is None:
    pytest.skip(
        "no C compiler (cc) on the PATH: the C emitter's output cannot be compiled",
        allow_module_level=True,
    )

from integer_models import Builder, residual_model  # noqa: E402

from cgmq_jax.export import c as emit  # noqa: E402
from cgmq_jax.export import engine, format  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
N_EXAMPLES = 50


# --------------------------------------------------------------------------- the models


def conv2d_model(path, output=None):
    """Conv stride 2 + padding; depthwise per-channel conv with kernel dilation; relu6 clip;
    max-pool with padding and a window over channels; reshape; dense."""
    b = Builder([9, 9, 3], seed=1)
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
        bias_shift=1,
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
    t = b.op("reshape", [t], [27], shape=[27])
    b.layer("dense", t, [27, 10], in_exponent=-2, in_levels=31, w_levels=7, bias_max=300)
    return b.save(path, output)


def conv1d_model(path, output=None):
    """Signed first-layer quantizer, 1-D conv with input dilation, average pool (sumpool +
    div) into a grouped conv (divisor 3, input shifted left), global average (sum + div)
    into a dense layer (divisor 6, shifted right)."""
    b = Builder([12, 2], seed=2)
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
    b.layer("dense", t, [4, 5], in_exponent=-5, in_levels=15, w_levels=3, bias_max=40)
    return b.save(path, output)


def wide_model(path, output=None):
    """Wide codes (11-, 42- and 62-bit weights, 32- to 64-bit biases, per-channel widths) and
    every requantize case (shift left / none / right, divisor 1 / 3), concatenated at
    different exponents; a dead op; the output is a concat, not a layer."""
    b = Builder([4, 6], seed=4)
    s = b.op("sumpool", [0], [4, 2], window=[2, 3], strides=[1, 3], padding=[[0, 1], [1, 1]])
    s = b.op("div", [s], [4, 2], by=3)
    a = b.layer(
        "dense",
        s,
        [2, 3],
        in_exponent=-10,
        in_levels=2000,
        signed=True,
        w_levels=1000,
        w_exponent=-10,
        bias_max=1 << 30,
        bias_bits=32,
    )
    c = b.layer(
        "dense",
        s,
        [2, 3],
        in_exponent=-5,
        in_levels=31,
        w_levels=[1 << 20, 5, 1 << 40],
        w_exponent=[-20, -3, -40],
        bias_shift=0,
        bias_max=1 << 45,
    )
    d = b.layer("dense", s, [2, 2], in_exponent=-8, in_levels=300, w_levels=2, bias_bits=64)
    e = b.layer("dense", 0, [6, 2], in_exponent=-11, in_levels=1500, signed=True, w_levels=2)
    f = b.layer(
        "dense",
        0,
        [6, 2],
        in_exponent=-6,
        in_levels=1,
        w_levels=1 << 60,
        w_exponent=-39,
        bias_shift=0,
        bias_max=1 << 40,
        bias_bits=61,
    )
    b.op("relu", [a], b.shapes[a])  # a dead op: its result is never used
    b.op("concat", [a, c, d, e, f], [4, 12], axis=1)
    return b.save(path, output)


def conv3d_model(path, output=None):
    """3-D conv with strides, asymmetric padding, kernel and input dilation; a max-pool over
    all four axes with padding; reshape; dense."""
    b = Builder([3, 4, 4, 2], seed=5)
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
        [3, 2, 2, 1],
        window=[2, 1, 2, 3],
        strides=[2, 1, 1, 3],
        padding=[[1, 0], [0, 0], [0, 1], [0, 0]],
    )
    t = b.op("reshape", [t], [12], shape=[12])
    b.layer("dense", t, [12, 4], in_exponent=-4, in_levels=15, signed=True, w_levels=3)
    return b.save(path, output)


def lenet_model(path, output=None):
    """A LeNet-5-sized MNIST model (the largest here): conv 6@5x5, pool, conv 16@5x5, pool,
    dense 120, 84, 10."""
    b = Builder([28, 28, 1], seed=6)
    t = b.layer(
        "conv",
        0,
        [5, 5, 1, 6],
        in_exponent=-4,
        in_levels=15,
        padding=[[2, 2], [2, 2]],
        w_levels=7,
        w_exponent=-4,
        bias_max=100,
    )
    t = b.op("relu", [t], b.shapes[t])
    t = b.op("maxpool", [t], [14, 14, 6], window=[2, 2, 1], strides=[2, 2, 1], padding=[[0, 0]] * 3)
    t = b.layer(
        "conv",
        t,
        [5, 5, 6, 16],
        in_exponent=-3,
        in_levels=7,
        w_levels=3,
        w_exponent=-3,
        bias_max=100,
    )
    t = b.op("relu", [t], b.shapes[t])
    t = b.op("maxpool", [t], [5, 5, 16], window=[2, 2, 1], strides=[2, 2, 1], padding=[[0, 0]] * 3)
    t = b.op("reshape", [t], [400], shape=[400])
    t = b.layer(
        "dense", t, [400, 120], in_exponent=-2, in_levels=7, w_levels=3, w_exponent=-4, bias_max=100
    )
    t = b.op("relu", [t], b.shapes[t])
    t = b.layer(
        "dense", t, [120, 84], in_exponent=-2, in_levels=7, w_levels=3, w_exponent=-4, bias_max=100
    )
    t = b.op("relu", [t], b.shapes[t])
    b.layer("dense", t, [84, 10], in_exponent=-2, in_levels=7, w_levels=3, bias_max=100)
    return b.save(path, output)


MODELS = {
    "conv2d": conv2d_model,
    "conv1d": conv1d_model,
    "residual": residual_model,
    "wide": wide_model,
    "conv3d": conv3d_model,
    "lenet": lenet_model,
}


# --------------------------------------------------------------------------- helpers


def examples(model, seed, n=N_EXAMPLES):
    """Random uint8 examples, plus an all-0 and an all-255 one (saturation)."""
    shape = model.header["input"]["shape"]
    x = np.random.default_rng(seed).integers(0, 256, (n - 2, *shape), dtype=np.uint8)
    return np.concatenate([x, np.zeros((1, *shape), np.uint8), np.full((1, *shape), 255, np.uint8)])


def defines(program) -> dict[str, int]:
    text = program.header.read_text()
    return {k: int(v) for k, v in re.findall(r"#define CGMQ_(\w+) \(?(-?\d+)\)?", text)}


def check(model, out_dir, seed=0):
    """Emit, compile, run: C logits == engine logits; model.h's figures == the file's."""
    program = emit.emit_c(model, out_dir)
    x = examples(model, seed)
    expected = engine.run_integer(model, x)[0].reshape(len(x), -1)
    got = emit.compile_and_run(program, x)
    assert got.dtype == np.int64 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    d = defines(program)
    facts = model.facts
    bops = format.count_bops(model)
    assert d["WEIGHT_BITS"] == facts.weight_memory_bits == program.weight_bits
    assert d["WEIGHT_BYTES"] == -(-facts.weight_memory_bits // 8) == program.weight_bytes
    assert d["ACTIVATION_BITS"] == facts.activation_bits == program.activation_bits
    assert d["BUFFER_BYTES"] == program.buffer_bytes
    assert d["INPUT_SIZE"] == math.prod(model.header["input"]["shape"]) == program.input_size
    assert d["NUM_OUTPUTS"] == expected.shape[1] == program.num_outputs
    assert d["OUTPUT_EXPONENT"] == model.header["output"]["exponent"]
    assert d["OUTPUT_DIVISOR"] == model.header["output"]["divisor"]
    assert d["BOPS"] == bops["bops"] and d["MACS"] == bops["macs"]
    return program, x, expected


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.slow
def test_c_logits_equal_the_engine(name, tmp_path):
    model = MODELS[name](tmp_path / f"{name}.npz")
    program, _, _ = check(model, tmp_path / "c", seed=sum(map(ord, name)))
    source = program.source.read_text()
    includes = set(re.findall(r"#include\s*[<\"]([^>\"]+)", source))
    assert includes <= {"stdint.h", "string.h", "model.h"}
    assert not re.search(r"\b(float|double|malloc|calloc|free)\b", source)
    assert source.count("static const uint8_t cgmq_weights[CGMQ_WEIGHT_BYTES]") == 1
    assert len(re.findall(r"0x[0-9a-f]{2},", source)) == program.weight_bytes


@pytest.mark.parametrize("name", ["conv2d", "conv1d", "residual"])
@pytest.mark.slow
def test_every_intermediate_tensor(name, tmp_path):
    """Each tensor in turn as the output (the graph cut after it): every op checked alone."""
    model = MODELS[name](tmp_path / "full.npz")
    for t in range(1, len(model.ops)):
        part = MODELS[name](tmp_path / f"t{t}.npz", output=t)
        check(part, tmp_path / f"c{t}", seed=t)
        if name == "conv2d" and model.ops[t - 1]["op"] == "clip":  # the ReLU6 bites
            x = examples(part, 0)
            values = engine.run_integer(part, x)[0]
            six = 6 << -part.header["output"]["exponent"]
            assert values.min() == 0 and values.max() == six
            before = MODELS[name](tmp_path / "pre.npz", output=t - 1)
            assert (engine.run_integer(before, x)[0] > six).any()


def test_dead_ops_are_skipped(tmp_path):
    program = emit.emit_c(wide_model(tmp_path / "m.npz"), tmp_path / "c")
    assert "op 7 (relu): its result is never used; skipped" in program.source.read_text()


@pytest.mark.slow
def test_predict_is_the_first_argmax(tmp_path):
    model = conv2d_model(tmp_path / "m.npz")
    program = emit.emit_c(model, tmp_path / "c")
    x = examples(model, 7)
    expected = np.argmax(engine.run_integer(model, x)[0], axis=-1)
    np.testing.assert_array_equal(emit.compile_and_run(program, x, predict=True), expected)


@pytest.mark.slow
def test_emit_from_a_path_with_a_prefix(tmp_path):
    model = conv1d_model(tmp_path / "m.npz")
    program = emit.emit_c(tmp_path / "m.npz", tmp_path / "c", prefix="net")
    header = program.header.read_text()
    assert "void net_logits(const int16_t *input, int64_t *logits);" in header
    assert "int net_predict(const int16_t *input);" in header
    assert "#define NET_WEIGHT_BITS" in header and "CGMQ_" not in header
    assert model.header["payload_sha256"] in header
    x = examples(model, 3)
    np.testing.assert_array_equal(emit.compile_and_run(program, x), engine.run_integer(model, x)[0])
    with pytest.raises(ValueError, match="not a C identifier"):
        emit.emit_c(model, tmp_path / "d", prefix="1x")


def test_buffers_are_reused(tmp_path):
    """LeNet: the scratch RAM is two buffers, less than all its tensors stored at once."""
    model = lenet_model(tmp_path / "m.npz")
    program = emit.emit_c(model, tmp_path / "c")
    source = program.source.read_text()
    assert len(re.findall(r"static union", source)) == 2
    every = sum(math.prod(t.shape) for t in model.facts.tensors[1:])
    assert program.buffer_bytes < every  # even at one byte per element


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch):
    program = emit.emit_c(conv3d_model(tmp_path / "m.npz"), tmp_path / "c")
    monkeypatch.setattr(emit.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"no C compiler \(cc\) found"):
        emit.compile_and_run(program, np.zeros((1, 96), np.uint8))


def test_import_without_jax():
    code = (
        "import sys\n"
        "for name in ('jax', 'jaxlib', 'flax', 'optax'): sys.modules[name] = None\n"
        "import cgmq_jax.export.c as c\n"
        "assert callable(c.emit_c) and callable(c.compile_and_run)\n"
        "from cgmq_jax.export import emit_c\n"
        "assert emit_c is c.emit_c\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
