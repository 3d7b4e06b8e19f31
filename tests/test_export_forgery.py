"""Forged ``cgmq-int-npz`` headers, re-signed: the reader refuses each with one line.

Every file here is a tiny model built with numpy alone (no JAX: each is written and read in
milliseconds); every forgery recomputes the header's SHA-256, so the checksums do not catch
it. The header fuzz at the end mutates every field of a real header and asserts no
traceback and no accepted file whose content differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from cgmq_jax.export import engine
from cgmq_jax.export import format as fmt


def _dense(index, name, n_in, n_out, *, in_levels, in_exponent, w_levels, rng) -> tuple:
    kernel = rng.integers(-w_levels, w_levels + 1, (n_in, n_out)).astype(np.int8)
    bias = rng.integers(-200, 201, n_out).astype(np.int32)
    w_exponent = -3
    record = {
        "name": name,
        "kind": "dense",
        "per_channel": False,
        "input_shape": [n_in],
        "output_shape": [n_out],
        "kernel_shape": [n_in, n_out],
        "kernel_layout": "(in, out)",
        "weight_key": f"L{index}.weight",
        "weight_dtype": "int8",
        "weight_bits": fmt.bits_for_levels(w_levels, signed=True),
        "weight_exponent": w_exponent,
        "weight_levels": w_levels,
        "weight_signed": True,
        "input_bits": fmt.bits_for_levels(in_levels, signed=False),
        "input_exponent": in_exponent,
        "input_levels": in_levels,
        "input_signed": False,
        "accumulator_exponent": w_exponent + in_exponent,
        "bias_key": f"L{index}.bias",
        "bias_dtype": "int32",
        "bias_bits": 32,
        "bias_exponent": w_exponent + in_exponent - 1,
        "bias_rounding": "odd",
        "bias_rounding_max_abs_error": 0.001,
        "output_bits": 40,
        "macs": n_in * n_out,
    }
    return record, {record["weight_key"]: kernel, record["bias_key"]: bias}


def build(path, *, budget_bops=10_000):
    """dense 6 -> 5, relu, dense 5 -> 3, with a full certificate and metadata; returns
    ``(path, header without its checksums, arrays)``."""
    rng = np.random.default_rng(7)
    l0, a0 = _dense(0, "fc1", 6, 5, in_levels=15, in_exponent=-4, w_levels=3, rng=rng)
    l1, a1 = _dense(1, "fc2", 5, 3, in_levels=7, in_exponent=-2, w_levels=7, rng=rng)
    header = {
        "model": "Tiny",
        "input": {"shape": [6], "layout": fmt.INPUT_LAYOUT, "exponent": -8, "note": "ints"},
        "ops": [
            {"op": "dense", "inputs": [0], "layer": 0, "module": "fc1"},
            {"op": "relu", "inputs": [1], "module": "relu"},
            {"op": "dense", "inputs": [2], "layer": 1, "module": "fc2"},
        ],
        "layers": [l0, l1],
        "output": {"tensor": 3, "exponent": l1["bias_exponent"], "divisor": 1, "meaning": "x"},
        "bias_scheme": "odd",
    }
    arrays = {**a0, **a1}
    fmt.save(path, header, arrays)
    counted = fmt.count_bops(path)
    header["macs"], header["bops"] = counted["macs"], counted["bops"]
    costs = {k: counted[k] for k in ("bops", "weight_memory_bits", "activation_bits")}
    header["certificate"] = {
        **costs,
        "budget_bops": budget_bops,
        "within_budget": counted["bops"] <= budget_bops,
        "limits": {
            "bops": {"limit": budget_bops, "cost": costs["bops"], "minimum": 30, "within": True}
        },
        "layers": [
            {**row, "weight_memory_bits": 0, "activation_bits": 0} for row in counted["layers"]
        ],
        "selected_epoch": 3,
    }
    for row, layer in zip(header["certificate"]["layers"], header["layers"], strict=True):
        row.pop("kind", None)
        row["weight_memory_bits"] = (
            layer["kernel_shape"][0] * layer["kernel_shape"][1] * (layer["weight_bits"])
            + layer["output_shape"][-1] * 32
        )
        row["activation_bits"] = layer["input_shape"][0] * layer["input_bits"]
    header["metadata"] = {
        "run": "runs/x",
        "method": "cgmq",
        "seed": 0,
        "test_accuracy": 0.9,
        "dataset": "mnist",
        "data_source": None,
        "params_sha256": "0" * 64,
    }
    fmt.save(path, header, arrays)
    return path, header, arrays


def read_header_text(path) -> str:
    with np.load(path, allow_pickle=False) as npz:
        return npz["header.json"].tobytes().decode()


def resign(path, out, header_text: str | bytes):
    """``path`` with its header replaced by ``header_text`` and the header SHA-256 recomputed
    (the array checksums are the header's own: a forger keeps or rewrites them at will)."""
    raw = header_text.encode() if isinstance(header_text, str) else header_text
    with np.load(path, allow_pickle=False) as npz:
        entries = {key: npz[key] for key in npz.files}
    entries["header.json"] = np.frombuffer(raw, np.uint8)
    digest = hashlib.sha256(raw).hexdigest().encode()
    entries["header.sha256"] = np.frombuffer(digest, np.uint8)
    np.savez(out, **entries)
    return out


def resign_header(path, out, header: dict):
    return resign(path, out, json.dumps(header))


def write_unchecked(path, header: dict, arrays: dict):
    """What :func:`format.save` writes, without its validation (a forger's writer)."""
    header = {"format": fmt.FORMAT, "version": fmt.VERSION, **header}
    header["arrays"] = {
        key: {
            "dtype": value.dtype.str,
            "shape": list(value.shape),
            "sha256": hashlib.sha256(value.tobytes()).hexdigest(),
        }
        for key, value in arrays.items()
    }
    payload = b"".join(value.tobytes() for value in arrays.values())
    header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    raw = json.dumps(header).encode()
    np.savez(
        path,
        **{"header.json": np.frombuffer(raw, np.uint8)},
        **{"header.sha256": np.frombuffer(hashlib.sha256(raw).hexdigest().encode(), np.uint8)},
        **arrays,
    )
    return path


# --------------------------------------------------------------------------- tests


INPUTS = np.random.default_rng(0).integers(0, 256, (16, 6))


@pytest.fixture
def tiny(tmp_path):
    return build(tmp_path / "m.npz")


def refused(path, *fragments) -> str:
    """``load`` and ``count_bops`` refuse ``path`` with one line holding every fragment."""
    for reader in (fmt.load, fmt.count_bops):
        with pytest.raises(fmt.ExportError) as info:
            reader(path)
        message = str(info.value)
        assert "\n" not in message and message.startswith(str(path)), message
        for fragment in fragments:
            assert fragment in message, message
    return message


def _cert(h):
    return h["certificate"]


def _limits(h):
    return h["certificate"]["limits"]


def _layer(h, i=0):
    return h["layers"][i]


def _both_budgets(h, value):
    _cert(h)["budget_bops"] = value
    _limits(h)["bops"]["limit"] = value


FORGERIES = {
    # the hostile trial's header field types
    "budget a string": (lambda h: _both_budgets(h, "2e6"), "budget_bops must be a finite number"),
    "budget a 400-digit integer": (lambda h: _both_budgets(h, 10**400), "beyond int64"),
    "budget Infinity": (lambda h: _both_budgets(h, math.inf), "Infinity is not a JSON number"),
    "budget NaN": (lambda h: _both_budgets(h, math.nan), "NaN is not a JSON number"),
    "budget zero": (lambda h: _both_budgets(h, 0), "is not a positive number"),
    "budget negative": (lambda h: _both_budgets(h, -1e6), "is not a positive number"),
    "certificate a list": (lambda h: h.update(certificate=[1, 2]), "certificate must be a JSON"),
    "layers an int": (lambda h: h.update(layers=3), "layers must be a JSON list"),
    "unknown limit": (
        lambda h: _limits(h).update(flops={"limit": 1, "cost": 1}),
        "certificate.limits has an unknown field 'flops'",
    ),
    "metadata a string": (lambda h: h.update(metadata="x"), "metadata must be a JSON object"),
    "metadata nested": (lambda h: h["metadata"].update(extra={"a": 1}), "metadata.extra must"),
    "test_accuracy a string": (
        lambda h: h["metadata"].update(test_accuracy="high"),
        "metadata.test_accuracy must be a finite number",
    ),
    "params_sha256 not a digest": (
        lambda h: h["metadata"].update(params_sha256="abc"),
        "metadata.params_sha256 must be a SHA-256",
    ),
    "selected_epoch a string": (
        lambda h: _cert(h).update(selected_epoch="3"),
        "certificate.selected_epoch must be an integer",
    ),
    "certificate row bits a string": (
        lambda h: _cert(h)["layers"][0].update(weight_bits="3"),
        "certificate.layers[0].weight_bits must be an integer",
    ),
    "version a 400-digit integer": (lambda h: h.update(version=10**400), "beyond int64"),
    # the nine fields never checked before
    "output_bits a string": (
        lambda h: _layer(h).update(output_bits="40"),
        "layer 0 (fc1).output_bits must be an integer",
    ),
    "output_bits above 64": (lambda h: _layer(h).update(output_bits=65), "is outside [2, 64]"),
    "weight_dtype a float": (
        lambda h: _layer(h).update(weight_dtype="float32"),
        "layer 0 (fc1).weight_dtype must be one of",
    ),
    "weight_dtype not the array's": (
        lambda h: _layer(h).update(weight_dtype="int16"),
        "weight_dtype 'int16', the array is int8",
    ),
    "bias_rounding unknown": (
        lambda h: _layer(h).update(bias_rounding="up"),
        "layer 0 (fc1).bias_rounding must be one of",
    ),
    "bias_rounding not the scheme's": (
        lambda h: h.update(bias_scheme="accumulator"),
        "bias_rounding 'odd' with bias_scheme 'accumulator'",
    ),
    "kernel_layout unknown": (
        lambda h: _layer(h).update(kernel_layout="(out, in)"),
        "kernel_layout must be one of",
    ),
    "kernel_layout a conv's": (
        lambda h: _layer(h).update(kernel_layout="(*window, in / groups, out)"),
        "is not a dense's",
    ),
    "input.layout channels first": (
        lambda h: h["input"].update(layout="channels first"),
        "input.layout must be one of",
    ),
    "bias_scheme unknown": (lambda h: h.update(bias_scheme="exact"), "bias_scheme must be one of"),
    "within_budget false": (
        lambda h: _cert(h).update(within_budget=False),
        "certificate.within_budget is False, the recount",
    ),
    "a limit's within false": (
        lambda h: _limits(h)["bops"].update(within=False),
        "certificate.limits.bops.within is False, the recount 540",
    ),
    "over budget, claimed within": (
        lambda h: _both_budgets(h, 500),
        "certificate.limits.bops.within is True, the recount 540",
    ),
    "over budget, within dropped": (
        lambda h: (_both_budgets(h, 500), _limits(h)["bops"].pop("within")),
        "certificate.within_budget is True",
    ),
    "budget_bops not the BOP limit": (
        lambda h: _cert(h).update(budget_bops=20_000),
        "certificate.budget_bops 20000 is not its BOP limit 10000",
    ),
    "selected_epoch a float": (
        lambda h: _cert(h).update(selected_epoch=3.5),
        "selected_epoch must be an integer",
    ),
    # unknown fields, anywhere
    "unknown top-level field": (lambda h: h.update(verified=True), "unknown field 'verified'"),
    "unknown layer field": (
        lambda h: _layer(h).update(trusted=1),
        "layer 0 (fc1) has an unknown field 'trusted'",
    ),
    "unknown op field": (
        lambda h: h["ops"][1].update(window=[2]),
        "op 1 (relu): missing fields [] or unknown fields ['window']",
    ),
    "unknown input field": (lambda h: h["input"].update(range=[0, 9]), "unknown field 'range'"),
    "unknown certificate field": (
        lambda h: _cert(h).update(signed_by="me"),
        "certificate has an unknown field 'signed_by'",
    ),
    "dense with conv geometry": (
        lambda h: _layer(h).update(strides=[1]),
        "a dense layer with conv geometry",
    ),
    "negative rounding error": (
        lambda h: _layer(h).update(bias_rounding_max_abs_error=-1.0),
        "bias_rounding_max_abs_error -1.0 is negative",
    ),
    "header BOPs lie": (lambda h: h.update(bops=539), "header states 539 BOPs"),
    "header MACs lie": (lambda h: h.update(macs=44), "header states 44 MACs"),
}


@pytest.mark.parametrize("name", FORGERIES)
def test_forged_header_field_is_one_clear_error(tiny, tmp_path, name):
    path, _, _ = tiny
    header = json.loads(read_header_text(path))
    edit, fragment = FORGERIES[name]
    edit(header)
    forged = resign(path, tmp_path / "forged.npz", json.dumps(header))
    refused(forged, fragment)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"budget_bops": 10000', '"budget_bops": 1e400'),
        ('"budget_bops": 10000', '"budget_bops": -Infinity'),
        ('"test_accuracy": 0.9', '"test_accuracy": -Infinity'),
        ('"test_accuracy": 0.9', '"test_accuracy": 9' + "9" * 5000),
    ],
)
def test_non_finite_and_huge_numbers_are_refused(tiny, tmp_path, old, new):
    path, _, _ = tiny
    text = read_header_text(path)
    assert old in text
    forged = resign(path, tmp_path / "forged.npz", text.replace(old, new, 1))
    refused(forged, "header.json is not valid JSON")


@pytest.mark.parametrize(
    "pair",
    ['"model": "Tiny"', '"budget_bops": 10000', '"name": "fc1"', '"seed": 0', '"op": "relu"'],
)
def test_duplicate_json_keys_are_refused(tiny, tmp_path, pair):
    """A duplicated key (the later value is what ``json.loads`` keeps) anywhere in the header."""
    path, _, _ = tiny
    text = read_header_text(path)
    assert pair in text
    forged = resign(path, tmp_path / "dup.npz", text.replace(pair, f"{pair}, {pair}", 1))
    refused(forged, "header.json is not valid JSON: duplicate key")
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        fmt.parse_json('{"b": {"a": 1, "a": 1}}')


def test_save_refuses_what_load_would_refuse(tiny, tmp_path):
    """``save`` checks the bytes it writes as ``load`` reads them."""
    _, header, arrays = tiny
    for edit, fragment in (
        (lambda h: _both_budgets(h, math.inf), "not JSON"),
        (lambda h: _cert(h).update(within_budget=False), "within_budget is False"),
        (lambda h: h.update(verified=True), "unknown field 'verified'"),
    ):
        forged = json.loads(json.dumps(header))
        edit(forged)
        with pytest.raises(fmt.ExportError, match=fragment):
            fmt.save(tmp_path / "x.npz", forged, arrays)
    assert not (tmp_path / "x.npz").exists()


def test_accuracy_in_the_metadata_is_no_verdict(tiny, tmp_path):
    """A file's recorded accuracy is informative: a forged one changes no result of the
    reader, the counter or the engine (and ``-Infinity`` is not JSON)."""
    path, header, _ = tiny
    results = []
    for accuracy in (0.9, 0.05, -3.0, None):
        forged = json.loads(json.dumps(header))
        forged["metadata"]["test_accuracy"] = accuracy
        out = tmp_path / f"{accuracy}.npz"
        write_unchecked(out, forged, tiny[2])
        logits = engine.run_integer(out, INPUTS)[0].tolist()
        results.append((fmt.count_bops(out), logits))
    assert all(result == results[0] for result in results)
    assert "test_accuracy" not in json.dumps(results[0][0])


def test_within_budget_is_recounted(tiny, tmp_path):
    """``count_bops``'s verdict comes from the recount against the limits, never from a
    claim; with no limit it is ``None``."""
    path, header, arrays = tiny
    assert fmt.count_bops(path)["within_budget"] is True
    over = json.loads(json.dumps(header))
    _both_budgets(over, 539)
    over["certificate"]["within_budget"] = False
    over["certificate"]["limits"]["bops"]["within"] = False
    fmt.save(tmp_path / "over.npz", over, arrays)  # an honest over-budget certificate
    assert fmt.count_bops(tmp_path / "over.npz")["within_budget"] is False
    bare = json.loads(json.dumps(header))
    del bare["certificate"]
    fmt.save(tmp_path / "bare.npz", bare, arrays)
    assert fmt.count_bops(tmp_path / "bare.npz")["within_budget"] is None


# --------------------------------------------------------------------------- resources

_MEASURE = """
import resource, sys, time
from cgmq_jax.export import format as fmt
start = time.perf_counter()
try:
    fmt.load(sys.argv[1])
except fmt.ExportError as error:
    print("REFUSED", error)
else:
    print("ACCEPTED")
seconds = time.perf_counter() - start
try:  # this process image's own peak (ru_maxrss keeps the forked parent's across exec)
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak // 1024, seconds)
"""


def _measure(path) -> tuple[str, int, float]:
    """``(first line, peak RSS in MiB, seconds)`` of ``load(path)`` in a fresh process (its
    peak RSS includes Python and numpy, about 40 MiB)."""
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    first, last = out.stdout.strip().splitlines()
    rss, seconds = last.split()
    return first, int(rss), float(seconds)


def _with_member(source, out, name: str, npy_header: bytes, inflated: int):
    """``source`` plus a deflated member: a valid ``.npy`` preamble, then ``inflated`` zeros."""
    with zipfile.ZipFile(source) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for info, data in members:
            archive.writestr(info, data)
        with archive.open(name, "w", force_zip64=True) as stream:
            stream.write(npy_header)
            chunk = bytes(1 << 22)
            for _ in range(inflated >> 22):
                stream.write(chunk)
    return out


def _npy_preamble(dtype: str, shape: tuple) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": dtype, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


@pytest.mark.slow  # compiles whole training steps or many programs
def test_an_unused_1_gib_array_is_refused_before_it_is_read(tiny, tmp_path):
    """The hostile trial's case: a small file listing an unused 1 GiB array (valid sizes and
    a matching checksum claim) cost 2.1 GB and 114 s; now refused from the header alone."""
    path, _, _ = tiny
    header = json.loads(read_header_text(path))
    header["arrays"]["junk"] = {"dtype": "|i1", "shape": [1 << 30], "sha256": "0" * 64}
    listed = resign(path, tmp_path / "listed.npz", json.dumps(header))
    bomb = _with_member(
        listed, tmp_path / "bomb.npz", "junk.npy", _npy_preamble("|i1", (1 << 30,)), 1 << 30
    )
    assert bomb.stat().st_size < 8 << 20
    first, rss, seconds = _measure(bomb)
    assert first.startswith("REFUSED") and "'junk' belongs to no layer" in first, first
    print(f"unused 1 GiB array: refused, peak RSS {rss} MiB, {seconds:.3f} s")
    assert rss < 200 and seconds < 5


def test_arrays_over_the_total_cap_are_refused_before_any_read(tiny, tmp_path):
    """Arrays each under the per-array cap but together over :data:`MAX_TOTAL_BYTES`."""
    path, _, _ = tiny
    header = json.loads(read_header_text(path))
    header["arrays"]["L0.weight"].update(dtype="<i8", shape=[6, 5_000_000])
    header["arrays"]["L1.weight"].update(dtype="<i8", shape=[5, 5_000_000])
    forged = resign(path, tmp_path / "big.npz", json.dumps(header))
    first, rss, seconds = _measure(forged)
    assert "over the reader's cap of 67,108,864" in first, first
    print(f"440 MB declared: refused, peak RSS {rss} MiB, {seconds:.3f} s")
    assert rss < 200


def test_a_huge_header_is_refused_before_it_is_read(tiny, tmp_path):
    path, _, _ = tiny
    text = read_header_text(path)
    forged = resign(path, tmp_path / "h.npz", text[:-1] + ', "pad": "' + "x" * (2 << 20) + '"}')
    refused(forged, "header.json.npy' claims")


# --------------------------------------------------------------------------- overflow


def _wide(tiny, *, in_levels, w_levels, fill, bias_shift=1):
    """The tiny model's first layer at wide levels, its kernel all ``fill``."""
    _, header, arrays = tiny
    header = json.loads(json.dumps(header))
    del header["certificate"], header["macs"], header["bops"]
    layer = header["layers"][0]
    w_bits = fmt.bits_for_levels(w_levels, signed=True)
    layer.update(
        input_levels=in_levels,
        input_bits=fmt.bits_for_levels(in_levels, signed=False),
        weight_levels=w_levels,
        weight_bits=w_bits,
        weight_dtype=fmt.int_dtype_for_bits(w_bits).name,
        bias_exponent=layer["accumulator_exponent"] - bias_shift,
    )
    arrays = dict(arrays)
    arrays["L0.weight"] = np.full((6, 5), fill, fmt.int_dtype_for_bits(w_bits))
    return header, arrays


@pytest.mark.parametrize(
    ("levels", "bias_shift", "fragment"),
    [
        ((1 << 31, 1 << 31), 1, "its accumulator may reach 27,670,116,110,564,327,424"),
        ((1 << 31, 1 << 31), 0, "its accumulator may reach"),  # 32-bit levels
        ((1 << 62, 1 << 62), 1, "its accumulator may reach"),  # 64-bit levels
        ((1 << 20, 1 << 20), 40, "its accumulator << 40 may reach"),  # the shift overflows
    ],
)
def test_an_accumulator_beyond_int64_is_refused(tiny, tmp_path, levels, bias_shift, fragment):
    """Refused by ``save`` (so at export) and by ``load`` (so by the engine and by C, which
    both load through it), with the bound and the limit in the message."""
    header, arrays = _wide(tiny, in_levels=levels[0], w_levels=levels[1], fill=levels[1],
                           bias_shift=bias_shift)  # fmt: skip
    with pytest.raises(fmt.ExportError, match=fragment):
        fmt.save(tmp_path / "saved.npz", header, arrays)
    forged = write_unchecked(tmp_path / "forged.npz", header, arrays)
    message = refused(forged, fragment, "beyond int64 (9,223,372,036,854,775,807)")
    with pytest.raises(fmt.ExportError):
        engine.run_integer(forged, INPUTS)
    from cgmq_jax.export import c

    with pytest.raises(fmt.ExportError) as info:
        c.emit_c(forged, tmp_path / "c")
    assert str(info.value) == message


def test_a_wide_accumulator_that_fits_is_exact(tiny, tmp_path):
    """40-bit codes: accepted, and the engine's logits are exact integer arithmetic."""
    header, arrays = _wide(tiny, in_levels=(1 << 20) - 1, w_levels=1 << 20, fill=-(1 << 20))
    fmt.save(tmp_path / "wide.npz", header, arrays)
    model = fmt.load(tmp_path / "wide.npz")
    x = np.full((2, 6), 255)
    codes = round(255 * 2.0 ** (-8 - header["layers"][0]["input_exponent"]))  # ties to even
    out = engine.run_integer(model, x, return_codes=True)
    assert out[2]["fc1"].tolist() == [[codes] * 6] * 2
    low, high = model.facts.ranges[1]
    assert low == 6 * ((1 << 20) - 1) * -(1 << 20) * 2 + int(arrays["L0.bias"].min())


def test_requantize_is_exact_for_any_left_shift():
    """A 62-bit left shift: the engine saturates first instead of overflowing."""
    values = np.array([-3, -1, 0, 1, 2, 3, (1 << 62) - 1])
    levels = (1 << 62) - 1
    got = engine.requantize(values, 0, to_exponent=-62, levels=levels, signed=True)
    exact = [max(-levels, min(levels, int(v) << 62)) for v in values]
    assert got.tolist() == exact
    got = engine.requantize(values, 0, to_exponent=-3, levels=20, signed=False)
    assert got.tolist() == [max(0, min(20, int(v) * 8)) for v in values]


# --------------------------------------------------------------------------- header fuzz


class _Dup(dict):
    """A JSON object written with one key twice (its first key repeated at the end)."""


def _dumps(value) -> str:
    if isinstance(value, _Dup):
        pairs = [*value.items(), next(iter(value.items()))]
        return "{" + ", ".join(f"{json.dumps(k)}: {_dumps(v)}" for k, v in pairs) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_dumps, value)) + "]"
    return json.dumps(value)


def _paths(value, prefix=()):
    """Every path into a JSON value (containers included), in document order."""
    yield prefix
    if isinstance(value, dict | list):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            yield from _paths(item, (*prefix, key))


def _variants(value) -> list:
    """Replacements of one value: type swaps, nearby and far numbers, emptied containers."""
    out = [None, True, False, "x", 0, -1, 1.5, 2**62, [], {}, [value]]
    if isinstance(value, bool):
        out += [not value, int(value)]
    elif isinstance(value, int):
        out += [value + 1, value - 1, -value, 2 * value, float(value), str(value), value + 2**32]
    elif isinstance(value, float):
        out += [value * 2, -value, 0.0, int(value), str(value)]
    elif isinstance(value, str):
        out += ["", value + "x", value.upper(), "0" * 64]
    elif isinstance(value, list) and value:
        out += [value[:-1], [*value, value[-1]], value[::-1]]
    elif isinstance(value, dict) and value:
        out += [_Dup(value), dict(list(value.items())[:-1])]
    return out


def _mutations(header: dict, rng: np.random.Generator):
    """``(description, header text)``: per path, a deletion and a seeded sample of values;
    a duplicated key in every object; non-finite and huge numbers in every number."""
    for path in list(_paths(header))[1:]:
        *parent_path, key = path
        parent = header
        for step in parent_path:
            parent = parent[step]
        value = parent[key]
        variants = _variants(value)
        picks = rng.choice(len(variants), size=min(5, len(variants)), replace=False)
        for choice in [*picks, "delete"]:
            forged = json.loads(json.dumps(header))
            target = forged
            for step in parent_path:
                target = target[step]
            if choice == "delete":
                target.pop(key) if isinstance(target, dict) else target.pop(key)
            else:
                target[key] = variants[choice]
            yield f"{path} {'deleted' if choice == 'delete' else variants[choice]!r}", forged
        if isinstance(value, int | float) and not isinstance(value, bool):
            for raw in ("NaN", "-Infinity", "1e999", "9" * 30):
                marker = json.loads(json.dumps(header))
                target = marker
                for step in parent_path:
                    target = target[step]
                target[key] = "@@RAW@@"
                yield f"{path} {raw}", _dumps(marker).replace('"@@RAW@@"', raw)


#: Header fields that are parameters of the model as much as its weights are, and that no
#: other field of the file determines: a re-signed change to one is a different,
#: self-consistent model (the run comparison of ``export.py --check`` catches it).
MODEL_PARAMETERS = ("('input', 'exponent')",)


def _content(path) -> tuple:
    """What a verdict rests on: the recount (no labels), the arrays, the graph, the logits."""
    model = fmt.load(path)
    counted = fmt.count_bops(model)
    rows = [(r["macs"], r["weight_bits"], r["input_bits"], r["bops"]) for r in counted["layers"]]
    costs = [counted[k] for k in ("macs", "bops", "weight_memory_bits", "activation_bits")]
    arrays = sorted((k, v.dtype.str, v.tobytes()) for k, v in model.arrays.items())
    layers = [(model.weight(i).tobytes(), model.bias(i).tobytes()) for i in range(len(rows))]
    logits, exponent = engine.run_integer(model, INPUTS)
    facts = model.facts
    unnamed = [dataclasses.replace(row, layer="") for row in facts.rows]  # names are labels
    graph = (facts.tensors, unnamed, facts.ranges, facts.input_range)
    return rows, costs, arrays, layers, graph, logits.tolist(), exponent


# Over a thousand forged headers, each re-signed and read: slow tier (the named forgeries
# above are the unit tier's).
@pytest.mark.slow
def test_header_fuzz_accepts_no_different_model(tiny, tmp_path):
    """Every field of a full header mutated (a seeded sample of type swaps, numbers changed,
    fields deleted or duplicated, non-finite numbers), the header re-signed: each file is
    refused with an ExportError or read as a model identical in every verdict-relevant
    respect (only labels and informative fields may differ, and a changed certificate is
    reported by ``matches_certificate`` and ``within_budget``, both recomputed)."""
    path, header, _ = tiny
    header = json.loads(read_header_text(path))
    original = _content(path)
    honest = fmt.count_bops(path)
    counts = {"refused": 0, "accepted_identical": 0, "accepted_different": 0}
    certificate_flagged = 0
    different = []
    for index, (what, forged) in enumerate(_mutations(header, np.random.default_rng(24))):
        text = forged if isinstance(forged, str) else _dumps(forged)
        out = resign(path, tmp_path / f"f{index % 8}.npz", text)
        try:
            content = _content(out)
        except fmt.ExportError:
            counts["refused"] += 1
            continue
        counted = fmt.count_bops(out)
        if content != original:
            flagged = counted["matches_certificate"] is False
            assert flagged or what.startswith(MODEL_PARAMETERS), what
            different.append(what)
            counts["accepted_different"] += 1
            continue
        limits = fmt.stated_limits(json.loads(text).get("certificate") or {})
        recount = {k: counted[k] for k in ("bops", "weight_memory_bits", "activation_bits")}
        verdict = all(recount[k] <= v for k, v in limits.items()) if limits else None
        assert counted["within_budget"] == verdict, what
        certificate_flagged += counted["matches_certificate"] != honest["matches_certificate"]
        counts["accepted_identical"] += 1
    total = sum(counts.values())
    print(f"header fuzz: {total} mutations, {counts}, {certificate_flagged} certificate mismatches")
    print(
        f"accepted, different (each flagged by the certificate, or a model parameter): {different}"
    )
    assert total > 1000 and counts["refused"] > total // 2 and counts["accepted_identical"] > 50
