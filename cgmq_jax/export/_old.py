"""Deployable output: integer weights, power-of-two scales and bit-widths in one ``.npz`` file.

This module is the export room of ``cgmq_jax``. It turns a trained, certified model into a
self-describing integer file that a firmware tool can read without JAX, and it holds the
tools that prove the file is the trained model and fits its budget:

* :func:`export` / :func:`export_run` write the file (these need JAX; they import it lazily);
* :func:`load` reads and verifies it (format, version, keys, shapes, dtypes, SHA-256);
* :func:`count_bops` recounts MACs and BOPs from the file's shapes and levels alone;
* :func:`run_integer` is an integer-only reference inference (int64 accumulators,
  power-of-two rescaling by shifts with exact round-half-to-even, integer ReLU / max-pool).

Everything except the two writers uses only numpy, ``json``, ``hashlib`` and ``zipfile``,
and this file imports nothing else at import time. NOTE: ``import cgmq_jax.export`` still
runs ``cgmq_jax/__init__.py``, which imports JAX; on a machine without JAX load this one
file by path (it is self-contained)::

    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("cgmq_export", "cgmq_jax/export.py")
    cgmq_export = sys.modules["cgmq_export"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cgmq_export)
    cgmq_export.count_bops("model_int.npz")

File format ``cgmq-int-npz`` version 1 (all fields in ``docs/export.md``): an uncompressed
numpy ``.npz`` archive (load it with ``allow_pickle=False``) with

* ``header.json``: the UTF-8 JSON header, stored as a 1-D ``uint8`` array;
* ``header.sha256``: the hex SHA-256 of those header bytes, as a 1-D ``uint8`` array;
* per quantized layer ``L<i>.weight`` (integer weight codes, the layer's kernel layout) and
  ``L<i>.bias`` (integer bias at ``2**bias_exponent``), little-endian, listed in
  ``header["arrays"]`` with dtype, shape and SHA-256; ``header["payload_sha256"]`` is the
  SHA-256 of all those arrays' raw bytes concatenated in that order.

Integer semantics (CGMQ.md section 1): a tensor flowing between ops is an integer array
``t`` with a power-of-two exponent ``e`` (its real value is ``t * 2**e``). A layer with
input exponent ``e_in`` and ``n_in`` levels first requantizes its input,
``code = clip(round_half_even(t * 2**(e - e_in)), lo, n_in)`` (``lo = 0`` unsigned,
``-n_in`` signed), done with shifts; then ``acc = codes (*) W`` in int64, an integer at
exponent ``e_acc = e_w + e_in``; the layer's output is ``(acc << (e_acc - e_b)) + B`` at
exponent ``e_b = bias_exponent <= e_acc``. ReLU, max-pool and flatten act on the integers.
``B``, the trained float bias as an integer, is the one float-to-integer step of the export:
by default rounded to odd one bit below the next quantizer's half step, which makes every
next-layer code equal to exact arithmetic with the float bias (see :func:`export`,
``bias_scheme``). The network input (``uint8`` pixels at exponent -8, MNIST's
``x = uint8 / 256``) needs no float step at all.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "cgmq-int-npz"
VERSION = 1
HEADER_KEY = "header.json"
HEADER_SHA_KEY = "header.sha256"
DEFAULT_FILE = "model_int.npz"
#: The exponent of MNIST pixels: images are ``uint8 / 256`` exactly (``cgmq_jax.data``).
PIXEL_EXPONENT = -8
#: How the float bias becomes an integer (see :func:`export`): ``"odd"`` (default) or
#: ``"accumulator"`` (round half to even at the accumulator scale).
BIAS_SCHEMES = ("odd", "accumulator")
#: Bits below the accumulator LSB of the logits layer's bias under the ``"odd"`` scheme.
LOGIT_BIAS_BITS = 16
_INT_DTYPES = ((8, np.int8), (16, np.int16), (32, np.int32), (64, np.int64))
_LAYER_OPS = ("conv", "dense")


class ExportError(ValueError):
    """A file that is not a valid, intact ``cgmq-int-npz`` model (one-line message)."""


# --------------------------------------------------------------------------- integer helpers


def int_dtype_for_bits(bits: int) -> np.dtype:
    """The smallest signed numpy integer dtype holding a ``bits``-bit two's-complement value.

    >>> int_dtype_for_bits(3), int_dtype_for_bits(9)
    (dtype('int8'), dtype('int16'))
    """
    for width, dtype in _INT_DTYPES:
        if bits <= width:
            return np.dtype(dtype)
    raise ValueError(f"{bits} bits do not fit a 64-bit integer")


def bits_for_levels(levels: int, *, signed: bool) -> int:
    """The bit-width of a quantizer with ``levels`` positive levels (CGMQ.md section 1).

    ``bit_length(n)`` unsigned (at least 1), ``bit_length(n) + 1`` signed (at least 2).

    >>> bits_for_levels(1, signed=False), bits_for_levels(3, signed=True)
    (1, 3)
    """
    bits = max(int(levels), 1).bit_length()
    return bits + 1 if signed else bits


def signed_bits(max_abs: int) -> int:
    """Bits of a two's-complement integer holding every value in ``[-max_abs, max_abs]``."""
    return int(max_abs).bit_length() + 1


def round_shift(values: np.ndarray, shift: int) -> np.ndarray:
    """``round_half_even(values * 2**shift)`` for integer ``values``, with integer ops only.

    A non-negative ``shift`` is a left shift (exact). A negative one is an arithmetic right
    shift by ``k = -shift`` plus a rounding increment: up if the dropped remainder exceeds
    half, or equals half and the kept part is odd (ties to even, like ``jnp.round``).

    >>> round_shift(np.array([-6, -5, -3, 3, 5, 6, 7]), -1).tolist()
    [-3, -2, -2, 2, 2, 3, 4]
    """
    values = np.asarray(values, np.int64)
    if shift >= 0:
        return values << np.int64(shift)
    k = np.int64(-shift)
    kept = values >> k  # floor division by 2**k
    remainder = values - (kept << k)  # in [0, 2**k)
    half = np.int64(1) << (k - np.int64(1))
    up = (remainder > half) | ((remainder == half) & ((kept & np.int64(1)) == np.int64(1)))
    return kept + up.astype(np.int64)


def requantize(
    values: np.ndarray, exponent: int, *, to_exponent: int, levels: int, signed: bool
) -> np.ndarray:
    """Integer tensor at ``exponent`` -> codes of a quantizer (step ``2**to_exponent``).

    ``clip(round_half_even(values * 2**(exponent - to_exponent)), lo, levels)``, exactly the
    fake-quant ``clip(round(x / d_q), lo, n)`` of ``x = values * 2**exponent``.
    """
    values = np.asarray(values, np.int64)
    lo = -levels if signed else 0
    shift = exponent - to_exponent
    if shift > 0:  # pre-clip so that the left shift cannot overflow; the result is the same
        values = np.clip(values, -(levels + 1), levels + 1)
    return np.clip(round_shift(values, shift), lo, levels)


def _conv_output_size(size: int, kernel: int, stride: int, pad: Sequence[int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _max_pool(t: np.ndarray, window: Sequence[int], strides: Sequence[int]) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(t, tuple(window), axis=(1, 2))
    windows = windows[:, :: strides[0], :: strides[1]]
    return windows.max(axis=(-2, -1))


def _conv(codes: np.ndarray, kernel: np.ndarray, layer: dict) -> np.ndarray:
    """Integer NHWC x HWIO convolution (explicit padding, strides, groups) in int64."""
    (pt, pb), (pl, pr) = layer["padding"]
    sh, sw = layer["strides"]
    kh, kw, cin_g, cout = kernel.shape
    groups = layer["groups"]
    x = np.pad(codes, ((0, 0), (pt, pb), (pl, pr), (0, 0)))  # code 0 is the value 0
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    windows = windows[:, ::sh, ::sw]  # (N, OH, OW, C, kh, kw)
    n, oh, ow = windows.shape[:3]
    cout_g = cout // groups
    outs = []
    for g in range(groups):
        patch = windows[:, :, :, g * cin_g : (g + 1) * cin_g]
        patch = patch.transpose(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, kh * kw * cin_g)
        w = kernel[..., g * cout_g : (g + 1) * cout_g].reshape(kh * kw * cin_g, cout_g)
        outs.append(patch.astype(np.int64) @ w.astype(np.int64))
    return np.concatenate(outs, axis=-1).reshape(n, oh, ow, cout)


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class IntegerModel:
    """A loaded, verified ``cgmq-int-npz`` file: its header and integer arrays."""

    path: Path
    header: dict
    arrays: dict[str, np.ndarray]

    @property
    def layers(self) -> list[dict]:
        """The per-layer header records, in network order."""
        return self.header["layers"]

    def weight(self, index: int) -> np.ndarray:
        """Integer weight codes of layer ``index``."""
        return self.arrays[self.layers[index]["weight_key"]]

    def bias(self, index: int) -> np.ndarray:
        """Integer bias of layer ``index`` (at exponent ``accumulator_exponent``)."""
        return self.arrays[self.layers[index]["bias_key"]]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _as_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def _fail(path: os.PathLike | str, problem: str) -> ExportError:
    message = f"{path}: {problem}"
    return ExportError(message.replace("\r", "\\r").replace("\n", "\\n"))


#: The dtypes an array of the file may have (little-endian signed integers).
_ARRAY_DTYPES = ("|i1", "<i2", "<i4", "<i8")
#: The largest ``header.json`` member accepted, in bytes (a real header is a few KiB).
MAX_HEADER_BYTES = 1 << 22
#: The largest ``.npy`` preamble (magic, version, header dict, padding) accepted, in bytes.
_NPY_PREAMBLE_MAX = 4096
#: The most elements one array of the file may declare (2**31: 2-16 GiB; a model is tiny).
MAX_ARRAY_ELEMENTS = 1 << 31
#: The largest exponent magnitude and bias shift (``accumulator - bias`` exponent) accepted.
MAX_EXPONENT = 1024
MAX_BIAS_SHIFT = 62

_LAYER_FIELDS = (
    "name",
    "kind",
    "input_shape",
    "output_shape",
    "kernel_shape",
    "weight_key",
    "bias_key",
    "weight_bits",
    "weight_exponent",
    "weight_levels",
    "input_bits",
    "input_exponent",
    "input_levels",
    "input_signed",
    "accumulator_exponent",
    "bias_exponent",
    "output_bits",
    "bias_bits",
    "macs",
)
_CONV_FIELDS = ("strides", "padding", "groups")
_DILATION_FIELDS = ("dilation", "kernel_dilation", "input_dilation", "rhs_dilation", "lhs_dilation")
_HEADER_FIELDS = ("format", "version", "input", "ops", "layers", "output", "arrays")


def _is_int(value: Any) -> bool:
    """A Python or numpy integer (not a bool, not a float with an integer value)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


class _Checker:
    """Type and range checks of header values; each failure is one line naming the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, problem: str) -> ExportError:
        return _fail(self.path, problem)

    def int(self, where: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
        if not _is_int(value):
            raise self.fail(f"{where} must be an integer, got {value!r}")
        value = int(value)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise self.fail(f"{where} = {value} is outside {bounds}")
        return value

    def exponent(self, where: str, value: Any) -> int:
        return self.int(where, value, -MAX_EXPONENT, MAX_EXPONENT)

    def ints(self, where: str, value: Any, length: int | None = None, lo: int = 1) -> list[int]:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            size = "a list" if length is None else f"a list of {length}"
            raise self.fail(f"{where} must be {size} integers, got {value!r}")
        if not value:
            raise self.fail(f"{where} is empty")
        return [self.int(f"{where}[{i}]", v, lo) for i, v in enumerate(value)]

    def bool(self, where: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"{where} must be true or false, got {value!r}")
        return value

    def str(self, where: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{where} must be a string, got {value!r}")
        return value

    def dict(self, where: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise self.fail(f"{where} must be a JSON object, got {type(value).__name__}")
        return value

    def list(self, where: str, value: Any) -> list:
        if not isinstance(value, list):
            raise self.fail(f"{where} must be a JSON list, got {type(value).__name__}")
        return value


def _parse_npy(check: _Checker, name: str, raw: bytes) -> tuple[np.dtype, list[int], int]:
    """``(dtype, shape, data offset)`` of a ``.npy`` member's bytes (no pickles, C order)."""
    buffer = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, TypeError, SyntaxError, KeyError, IndexError, OverflowError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise check.fail(f"member {name!r} is not a valid .npy array: {problem}") from None
    if fortran or dtype.hasobject:
        raise check.fail(f"member {name!r}: Fortran-order or object arrays are not accepted")
    return dtype, [int(n) for n in shape], buffer.tell()


def _read_member(
    check: _Checker, archive: zipfile.ZipFile, name: str, dtype: str, shape: list[int] | None
) -> np.ndarray:
    """One ``.npy`` member, its size checked against its declaration before it is read.

    ``shape=None`` (the header) only bounds the size by :data:`MAX_HEADER_BYTES`. The read
    is bounded by the checked size too, so a member whose zip header understates its size
    cannot inflate past it.
    """
    info = archive.getinfo(name)
    itemsize = np.dtype(dtype).itemsize
    if shape is None:
        low, high = 0, MAX_HEADER_BYTES + _NPY_PREAMBLE_MAX
    else:
        nbytes = math.prod(shape) * itemsize
        low, high = nbytes + 10, nbytes + _NPY_PREAMBLE_MAX
    if not low <= info.file_size <= high:
        raise check.fail(
            f"member {name!r} claims {info.file_size:,} bytes, its declaration allows "
            f"{low:,} to {high:,} (refused before decompressing)"
        )
    with archive.open(info) as stream:
        raw = stream.read(info.file_size + 1)
    if len(raw) != info.file_size:
        raise check.fail(f"member {name!r} holds {len(raw):,} bytes, not {info.file_size:,}")
    found, found_shape, offset = _parse_npy(check, name, raw)
    if found.str != dtype or (shape is not None and found_shape != shape):
        raise check.fail(
            f"array {name[:-4]!r} is {found.str}{found_shape}, header says {dtype}{shape}"
        )
    count = math.prod(found_shape)
    if len(raw) - offset != count * itemsize:
        raise check.fail(f"member {name!r}: {len(raw) - offset:,} data bytes for {found_shape}")
    return np.frombuffer(raw, found, count=count, offset=offset).reshape(found_shape).copy()


def _read_archive(check: _Checker, archive: zipfile.ZipFile) -> tuple[dict, dict]:
    """``(header, arrays)``: the header verified, then only the listed arrays, size-checked."""
    names = archive.namelist()
    if len(set(names)) != len(names):
        raise check.fail("duplicate archive members")
    for key in (HEADER_KEY, HEADER_SHA_KEY):
        if key + ".npy" not in names:
            raise check.fail(f"missing entry {key!r}; not a {FORMAT} file")
    header_bytes = _read_member(check, archive, HEADER_KEY + ".npy", "|u1", None)
    if header_bytes.ndim != 1:
        raise check.fail(f"{HEADER_KEY} is not a 1-D byte array")
    header_bytes = header_bytes.tobytes()
    expected = _read_member(check, archive, HEADER_SHA_KEY + ".npy", "|u1", [64]).tobytes()
    if _sha256(header_bytes) != expected.decode("ascii", "replace"):
        raise check.fail("header checksum mismatch (header.json corrupted)")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise check.fail(f"header.json is not valid JSON: {error}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise check.fail(f"wrong format {found!r}, expected {FORMAT!r}")
    if header.get("version") != VERSION or not _is_int(header.get("version")):
        raise check.fail(
            f"unsupported {FORMAT} version {header.get('version')!r} (reader: {VERSION})"
        )
    missing = [key for key in _HEADER_FIELDS if key not in header]
    if missing:
        raise check.fail(f"header is missing {', '.join(missing)}")
    table = header["arrays"]
    if not isinstance(table, dict):
        raise check.fail(f"malformed header: arrays must be a table, got {type(table).__name__}")
    listed = {HEADER_KEY + ".npy", HEADER_SHA_KEY + ".npy"}
    for key, meta in table.items():
        where = f"arrays[{key!r}]"
        check.dict(where, meta)
        for field in ("dtype", "shape", "sha256"):
            if field not in meta:
                raise check.fail(f"malformed header: {where} has no {field}")
        if meta["dtype"] not in _ARRAY_DTYPES:
            raise check.fail(f"{where}.dtype {meta['dtype']!r} is not one of {_ARRAY_DTYPES}")
        shape = check.list(f"{where}.shape", meta["shape"])
        for i, n in enumerate(shape):
            check.int(f"{where}.shape[{i}]", n, 0, MAX_ARRAY_ELEMENTS)
        if math.prod(shape) > MAX_ARRAY_ELEMENTS:
            raise check.fail(f"{where}.shape {shape} has over {MAX_ARRAY_ELEMENTS:,} elements")
        check.str(f"{where}.sha256", meta["sha256"])
        if key + ".npy" in listed:
            raise check.fail(f"array {key!r} is listed twice")
        listed.add(key + ".npy")
    unlisted = [name for name in names if name not in listed]
    if unlisted:
        raise check.fail(f"unlisted archive member {unlisted[0]!r} (not read)")
    arrays: dict[str, np.ndarray] = {}
    payload = hashlib.sha256()
    for key, meta in table.items():
        if key + ".npy" not in names:
            raise check.fail(f"missing array {key!r}")
        array = _read_member(check, archive, key + ".npy", meta["dtype"], meta["shape"])
        raw = _as_bytes(array)
        if _sha256(raw) != meta["sha256"]:
            raise check.fail(f"checksum mismatch in array {key!r} (payload corrupted)")
        payload.update(raw)
        arrays[key] = array
    if payload.hexdigest() != header.get("payload_sha256"):
        raise check.fail("payload checksum mismatch")
    return header, arrays


def _conv_geometry(check: _Checker, where: str, layer: dict, shape: list[int], kernel: list[int]):
    """``(output shape, MACs)`` of a conv layer from its input shape and declared geometry."""
    if len(shape) != 3:
        raise check.fail(f"{where}: a conv needs an HWC input, the graph gives {shape}")
    if len(kernel) != 4:
        raise check.fail(f"{where}.kernel_shape {kernel} is not HWIO")
    h, w, c = shape
    kh, kw, cin_g, cout = kernel
    sh, sw = check.ints(f"{where}.strides", layer["strides"], 2)
    padding = check.list(f"{where}.padding", layer["padding"])
    if len(padding) != 2:
        raise check.fail(f"{where}.padding must be [[top, bottom], [left, right]]")
    (pt, pb), (pl, pr) = (
        check.ints(f"{where}.padding[{i}]", p, 2, lo=0) for i, p in enumerate(padding)
    )
    groups = check.int(f"{where}.groups", layer["groups"], 1)
    for field in _DILATION_FIELDS:
        if field in layer and check.ints(f"{where}.{field}", layer[field], 2) != [1, 1]:
            raise check.fail(f"{where}.{field} {layer[field]}: dilated convolutions are not run")
    if cin_g * groups != c or cout % groups:
        raise check.fail(
            f"{where}.kernel_shape {kernel} with groups {groups} does not fit input channels {c}"
        )
    if h + pt + pb < kh or w + pl + pr < kw:
        raise check.fail(f"{where}: kernel {kh}x{kw} is larger than the padded input {shape}")
    oh = _conv_output_size(h, kh, sh, (pt, pb))
    ow = _conv_output_size(w, kw, sw, (pl, pr))
    return [oh, ow, cout], oh * ow * cout * kh * kw * cin_g


def _validate(path: Path, header: dict, arrays: dict[str, np.ndarray]) -> list[dict]:
    """Follow the graph from the input shape; every layer's shapes, MACs, bits and arrays.

    Returns the per-layer rows of :func:`count_bops` (MACs and bit-widths recomputed from the
    validated shapes and levels; the header's ``macs`` and ``*_bits`` must equal them).
    """
    check = _Checker(path)
    layers = check.list("layers", header["layers"])
    ops = check.list("ops", header["ops"])
    entry = check.dict("input", header["input"])
    if "shape" not in entry or "exponent" not in entry:
        raise check.fail("input needs shape and exponent")
    shape = check.ints("input.shape", entry["shape"])
    if len(shape) not in (1, 3):
        raise check.fail(f"input.shape {shape} is neither features nor HWC")
    check.exponent("input.exponent", entry["exponent"])
    keys: set[str] = set()
    for i, layer in enumerate(layers):
        check.dict(f"layer {i}", layer)
        kind = layer.get("kind")
        needed = _LAYER_FIELDS + (_CONV_FIELDS if kind == "conv" else ())
        missing = [key for key in needed if key not in layer]
        if missing:
            raise check.fail(f"header layer {i} is missing {', '.join(missing)}")
        if kind not in _LAYER_OPS:
            raise check.fail(f"header layer {i}: unknown kind {kind!r}")
        check.str(f"layer {i} name", layer["name"])
        for field in ("weight_key", "bias_key"):
            key = check.str(f"layer {i} {field}", layer[field])
            if key not in arrays or key in keys:
                raise check.fail(f"layer {i} {field} {key!r} names no array, or a used one")
            keys.add(key)
    if keys != set(arrays):
        raise check.fail(f"arrays {sorted(set(arrays) - keys)} belong to no layer")
    rows: dict[int, dict] = {}
    for j, op in enumerate(ops):
        check.dict(f"op {j}", op)
        kind = op.get("op")
        if kind in _LAYER_OPS:
            index = check.int(f"op {j} layer", op.get("layer"), 0, len(layers) - 1)
            if index in rows or index != len(rows):
                raise check.fail(f"op {j} visits layer {index}; layers go once each, in order")
            layer = layers[index]
            where = f"layer {index} ({layer['name']})"
            if layer["kind"] != kind:
                raise check.fail(f"op {j} runs {where}, a {layer['kind']}, as {kind}")
            claimed = check.ints(f"{where}.input_shape", layer["input_shape"])
            if claimed != shape:
                raise check.fail(
                    f"{where}.input_shape {claimed!r} does not follow from the graph, which "
                    f"gives {shape}"
                )
            kernel = check.ints(f"{where}.kernel_shape", layer["kernel_shape"])
            weight, bias = arrays[layer["weight_key"]], arrays[layer["bias_key"]]
            if list(weight.shape) != kernel:
                raise check.fail(
                    f"{where}: weight array shape {list(weight.shape)} != kernel_shape"
                )
            if kind == "conv":
                out, macs = _conv_geometry(check, where, layer, shape, kernel)
            else:
                if len(shape) != 1 or len(kernel) != 2 or kernel[0] != shape[0]:
                    raise check.fail(
                        f"{where}.kernel_shape {kernel} does not fit the dense input {shape}"
                    )
                out, macs = [kernel[1]], kernel[0] * kernel[1]
            if list(bias.shape) != [out[-1]]:
                raise check.fail(f"{where}: bias array shape {list(bias.shape)} != [{out[-1]}]")
            if check.ints(f"{where}.output_shape", layer["output_shape"]) != out:
                raise check.fail(
                    f"{where}.output_shape {layer['output_shape']!r} disagrees with its shapes, "
                    f"which give {out}"
                )
            if not _is_int(layer["macs"]) or layer["macs"] != macs:
                raise check.fail(
                    f"{where}.macs {layer['macs']!r} disagrees with its shapes, which give {macs}"
                )
            rows[index] = _layer_row(check, where, layer, macs, weight)
            shape = out
        elif kind == "maxpool":
            if len(shape) != 3:
                raise check.fail(f"op {j} maxpool needs an HWC input, the graph gives {shape}")
            wh, ww = check.ints(f"op {j} window", op.get("window"), 2)
            sh, sw = check.ints(f"op {j} strides", op.get("strides"), 2)
            if op.get("padding", "VALID") != "VALID":
                raise check.fail(f"op {j} maxpool padding {op.get('padding')!r} is not VALID")
            if wh > shape[0] or ww > shape[1]:
                raise check.fail(f"op {j} maxpool window {[wh, ww]} exceeds its input {shape}")
            shape = [(shape[0] - wh) // sh + 1, (shape[1] - ww) // sw + 1, shape[2]]
        elif kind == "flatten":
            shape = [math.prod(shape)]
        elif kind != "relu":
            raise check.fail(f"op {j}: unknown op {kind!r}")
    if len(rows) != len(layers):
        raise check.fail(f"the ops visit {len(rows)} of {len(layers)} layers")
    if not ops or ops[-1].get("op") not in _LAYER_OPS:
        raise check.fail("the op graph must end with a layer (the logits)")
    output = check.dict("output", header["output"])
    last = ops[-1]["layer"]
    if output.get("layer") != last or not _is_int(output.get("layer")):
        raise check.fail(f"output.layer {output.get('layer')!r} is not the last layer {last}")
    if output.get("exponent") != layers[last]["bias_exponent"]:
        raise check.fail(f"output.exponent {output.get('exponent')!r} != last bias_exponent")
    return [rows[i] for i in range(len(layers))]


def _layer_row(check: _Checker, where: str, layer: dict, macs: int, weight: np.ndarray) -> dict:
    """Levels, bits, exponents of one layer checked; its ``count_bops`` row."""
    n_w = check.int(f"{where}.weight_levels", layer["weight_levels"], 1, 1 << 62)
    n_in = check.int(f"{where}.input_levels", layer["input_levels"], 1, 1 << 62)
    signed = check.bool(f"{where}.input_signed", layer["input_signed"])
    if layer.get("weight_signed", True) is not True:
        raise check.fail(f"{where}.weight_signed must be true")
    e_w = check.exponent(f"{where}.weight_exponent", layer["weight_exponent"])
    e_in = check.exponent(f"{where}.input_exponent", layer["input_exponent"])
    e_acc = check.exponent(f"{where}.accumulator_exponent", layer["accumulator_exponent"])
    e_b = check.exponent(f"{where}.bias_exponent", layer["bias_exponent"])
    if e_acc != e_w + e_in:
        raise check.fail(f"{where}.accumulator_exponent {e_acc} != weight + input exponent")
    if not 0 <= e_acc - e_b <= MAX_BIAS_SHIFT:
        raise check.fail(
            f"{where}: bias_exponent {e_b} above accumulator_exponent {e_acc} or more than "
            f"{MAX_BIAS_SHIFT} below it"
        )
    weight_bits = bits_for_levels(n_w, signed=True)
    input_bits = bits_for_levels(n_in, signed=signed)
    stated = (layer["weight_bits"], layer["input_bits"])
    if not all(map(_is_int, stated)) or (weight_bits, input_bits) != stated:
        raise check.fail(f"{where}: stated bit-widths disagree with the levels")
    if weight.size and int(np.abs(weight.astype(np.int64)).max()) > n_w:
        raise check.fail(f"{where}: weight codes exceed +-{n_w}")
    return {
        "layer": layer["name"],
        "kind": layer["kind"],
        "macs": macs,
        "weight_bits": weight_bits,
        "input_bits": input_bits,
        "bops": macs * weight_bits * input_bits,
    }


#: What a damaged zip can raise inside :mod:`zipfile` (all become one-line ExportErrors).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    NotImplementedError,
    RuntimeError,
    UnicodeDecodeError,
    struct.error,
    OverflowError,
    MemoryError,
)


def load(path: str | os.PathLike) -> IntegerModel:
    """Read and verify an exported file; nothing it says is trusted before it is checked.

    Checks, in order: a readable zip; the ``header.json`` member's size, then its SHA-256,
    ``format``, ``version`` and fields; the archive holds only the header and the arrays it
    lists, each member's size (from the zip directory) equal to what its declared dtype and
    shape imply before any byte of it is decompressed; each array's dtype, shape and
    SHA-256, and the payload SHA-256; then the graph: shapes are followed from
    ``input.shape`` through every op, each layer's ``input_shape`` must be the shape the
    graph brings it, its ``output_shape`` and ``macs`` those its kernel, strides, padding
    and groups give, its kernel and bias arrays shaped to match, every exponent an integer,
    its bit-widths those of its levels and its weight codes within them.

    Raises:
      ExportError: with a one-line message naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file")
    check = _Checker(path)
    try:
        with zipfile.ZipFile(path) as archive:
            header, arrays = _read_archive(check, archive)
    except ExportError:
        raise
    except _ZIP_ERRORS as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _fail(
            path, f"not a readable .npz archive (truncated or corrupted?): {problem}"
        ) from None
    try:
        _validate(path, header, arrays)
    except ExportError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as error:
        raise _fail(path, f"malformed header ({type(error).__name__}: {error})") from None
    return IntegerModel(path=path, header=header, arrays=arrays)


# --------------------------------------------------------------------------- BOP recount


def count_bops(path: str | os.PathLike | IntegerModel) -> dict:
    """Recount MACs and BOPs from the file alone (shapes, strides, padding, levels).

    Per layer: MACs from shapes (conv: ``out_h * out_w * out_ch * kh * kw * in_ch / groups``
    with ``out_h = (h + pad - kh) // stride + 1``; dense: ``in * out``), bit-widths from the
    quantizer levels (``bit_length(n)``, +1 signed), BOPs ``= MACs * b_w * b_in``. It also
    checks that the header's own ``macs`` and bit-width fields agree, that every weight
    code is within ``[-n_w, n_w]``, and compares with the trainer's certificate.

    Args:
      path: the exported file (or an already loaded :class:`IntegerModel`).

    Returns:
      ``{"layers": [{layer, kind, macs, weight_bits, input_bits, bops}], "macs", "bops",
      "certificate_bops", "budget_bops", "matches_certificate", "within_budget"}``;
      the last four are ``None`` when the file carries no certificate.
      ``matches_certificate`` needs the totals equal and, when the certificate lists its
      layers, every layer's name, MACs, bit-widths and BOPs equal too.

    Raises:
      ExportError: an unreadable file, or a header that contradicts itself.
    """
    model = path if isinstance(path, IntegerModel) else load(path)
    fail = lambda problem: _fail(model.path, problem)  # noqa: E731
    try:
        rows = _validate(model.path, model.header, model.arrays)
    except ExportError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as error:
        raise fail(f"malformed header ({type(error).__name__}: {error})") from None
    total = sum(row["bops"] for row in rows)
    if model.header.get("bops", total) != total:
        raise fail(f"header states {model.header['bops']} BOPs, its layers give {total}")
    certificate = model.header.get("certificate") or {}
    certified = certificate.get("bops")
    budget = certificate.get("budget_bops")
    matches = None if certified is None else total == certified
    if matches and certificate.get("layers") is not None:
        keys = ("layer", "macs", "weight_bits", "input_bits", "bops")
        ours = [tuple(row[k] for k in keys) for row in rows]
        matches = ours == [tuple(row.get(k) for k in keys) for row in certificate["layers"]]
    return {
        "layers": rows,
        "macs": sum(row["macs"] for row in rows),
        "bops": total,
        "certificate_bops": certified,
        "budget_bops": budget,
        "matches_certificate": matches,
        "within_budget": None if budget is None else total <= budget,
    }


# --------------------------------------------------------------------------- inference


def input_codes_from_float(model: IntegerModel, images: np.ndarray) -> np.ndarray:
    """The first layer's input codes from float inputs: ``clip(round(x / d_in), lo, n)``.

    This is the one float operation of a float-input deployment (division by a power of two
    is exact, ``np.round`` rounds halves to even like ``jnp.round``). Integer inputs at a
    known exponent need no float step: pass them to :func:`run_integer` directly.
    """
    first = model.layers[next(op["layer"] for op in model.header["ops"] if op["op"] in _LAYER_OPS)]
    lo = -first["input_levels"] if first["input_signed"] else 0
    scaled = np.asarray(images, np.float64) / 2.0 ** first["input_exponent"]
    return np.clip(np.round(scaled), lo, first["input_levels"]).astype(np.int64)


def run_integer(
    model: IntegerModel | str | os.PathLike,
    inputs: np.ndarray,
    *,
    input_exponent: int | None = None,
    first_layer_codes: bool = False,
    return_codes: bool = False,
) -> tuple[np.ndarray, int] | tuple[np.ndarray, int, dict[str, np.ndarray]]:
    """Integer-only reference inference of an exported model.

    Args:
      model: the loaded file (or its path).
      inputs: a batch of integers shaped ``(N, *header["input"]["shape"])``: the network
        input at ``2**input_exponent`` scale (e.g. ``uint8`` MNIST pixels, exponent -8), or,
        with ``first_layer_codes``, the first layer's input codes already
        (:func:`input_codes_from_float`).
      input_exponent: the exponent of ``inputs``; default ``header["input"]["exponent"]``.
      first_layer_codes: ``inputs`` are codes of the first layer's input quantizer.
      return_codes: also return every layer's integer input codes, by layer name.

    Returns:
      ``(logits, exponent)``: int64 accumulators of the last layer and their exponent
      (``logits * 2**exponent`` are the float logits; ``argmax`` is the prediction), plus
      ``{layer name: input codes}`` when ``return_codes``.
    """
    model = model if isinstance(model, IntegerModel) else load(model)
    header = model.header
    t = np.asarray(inputs)
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"run_integer takes integer inputs, got {t.dtype}")
    if list(t.shape[1:]) != header["input"]["shape"]:
        raise ValueError(f"inputs shaped {t.shape[1:]}, the model takes {header['input']['shape']}")
    t = t.astype(np.int64)
    exponent = header["input"]["exponent"] if input_exponent is None else int(input_exponent)
    precoded = first_layer_codes
    codes_by_layer: dict[str, np.ndarray] = {}
    for op in header["ops"]:
        kind = op["op"]
        if kind in _LAYER_OPS:
            layer = model.layers[op["layer"]]
            if precoded:
                codes, precoded = t, False
            else:
                codes = requantize(
                    t,
                    exponent,
                    to_exponent=layer["input_exponent"],
                    levels=layer["input_levels"],
                    signed=layer["input_signed"],
                )
            if return_codes:
                codes_by_layer[layer["name"]] = codes
            kernel = model.weight(op["layer"])
            if kind == "conv":
                acc = _conv(codes, kernel, layer)
            else:
                acc = codes @ kernel.astype(np.int64)
            shift = layer["accumulator_exponent"] - layer["bias_exponent"]
            t = (acc << np.int64(shift)) + model.bias(op["layer"]).astype(np.int64)
            exponent = layer["bias_exponent"]
        elif kind == "relu":
            t = np.maximum(t, 0)
        elif kind == "maxpool":
            t = _max_pool(t, op["window"], op["strides"])
        elif kind == "flatten":
            t = t.reshape(t.shape[0], -1)
        else:
            raise _fail(model.path, f"unknown op {kind!r}")
    if return_codes:
        return t, exponent, codes_by_layer
    return t, exponent


def predict(
    model: IntegerModel | str | os.PathLike,
    inputs: np.ndarray,
    *,
    batch_size: int = 1000,
    **kwargs: Any,
) -> np.ndarray:
    """``argmax`` of :func:`run_integer`'s logits, in batches (int64 class indices)."""
    model = model if isinstance(model, IntegerModel) else load(model)
    out = [
        np.argmax(run_integer(model, inputs[i : i + batch_size], **kwargs)[0], axis=-1)
        for i in range(0, len(inputs), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


def pixels_from_unit_float(images: np.ndarray) -> np.ndarray:
    """MNIST float images (``uint8 / 256`` exactly) back to ``uint8`` pixels, checked."""
    scaled = np.asarray(images, np.float64) * 2.0**-PIXEL_EXPONENT
    pixels = np.round(scaled)
    if not np.array_equal(pixels, scaled) or pixels.min(initial=0) < 0 or pixels.max() > 255:
        raise ValueError("images are not exact multiples of 1/256 in [0, 255/256]")
    return pixels.astype(np.uint8)


# --------------------------------------------------------------------------- writing (JAX)


#: The models whose op graph the export knows (by class name; not their subclasses).
GRAPH_MODELS = ("LeNet5", "MLP")


def _graph_for(model, layer_names: list[str]) -> list[dict]:
    name = type(model).__name__
    pool = {"op": "maxpool", "window": [2, 2], "strides": [2, 2], "padding": "VALID"}
    if name == "LeNet5":
        conv1, conv2, *dense = layer_names
        ops = [{"op": "conv", "layer": conv1}, {"op": "relu"}, dict(pool)]
        ops += [{"op": "conv", "layer": conv2}, {"op": "relu"}, dict(pool), {"op": "flatten"}]
    elif name == "MLP":
        ops, dense = [{"op": "flatten"}], layer_names
    else:
        raise ValueError(f"no op graph known for {name}; pass graph=[...] to export()")
    for i, layer in enumerate(dense):
        ops.append({"op": "dense", "layer": layer})
        if i < len(dense) - 1:
            ops.append({"op": "relu"})
    return ops


def _conv_facts(module, input_shape: Sequence[int]) -> dict:
    """Strides, explicit padding and groups of a 2-D convolution the integer engine runs."""
    import jax

    from cgmq_jax import nn as qnn

    geometry = qnn.conv_geometry(module)
    name = "/".join(module.path)
    if len(geometry["kernel_size"]) != 2 or len(input_shape) != 4:
        raise ValueError(f"layer {name}: the integer engine runs 2-D convolutions only")
    if geometry["pre_padding"] is not None or module.mask is not None:
        raise ValueError(f"layer {name}: padding {module.padding!r} / masks are not exported")
    if set(geometry["input_dilation"]) != {1} or set(geometry["kernel_dilation"]) != {1}:
        raise ValueError(f"layer {name}: dilated convolutions are not exported")
    padding = geometry["padding"]
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(
            input_shape[1:3], geometry["kernel_size"], geometry["strides"], padding
        )
    return {
        "strides": [int(s) for s in geometry["strides"]],
        "padding": [[int(a), int(b)] for a, b in padding],
        "groups": int(module.feature_group_count),
    }


def _trace_layers(model, input_shape: Sequence[int]) -> list[dict]:
    """Every quantized layer in call order, with its attributes and shapes (no FLOPs)."""
    import jax
    import jax.numpy as jnp
    from flax import linen

    from cgmq_jax import nn as qnn

    sample = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    with qnn.record_layers() as records:
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), sample)
    found = []
    for record in records:
        name, options, module = "/".join(record.path), record.options, record.module
        if not options.quantize:
            raise ValueError(f"layer {name} is not quantized")
        if options.per_channel or options.input_bits or options.weight_bits:
            raise ValueError(f"layer {name}: per-channel or pinned quantizers are not exported yet")
        entry = {
            "path": record.path,
            "kind": "conv" if isinstance(module, linen.Conv) else "dense",
            "input_shape": list(record.input_shape[1:]),
            "output_shape": list(record.output_shape[1:]),
            "input_signed": options.input_signed,  # None: decided by data, in params
            "use_bias": bool(module.use_bias),
        }
        if entry["kind"] == "conv":
            entry.update(_conv_facts(module, record.input_shape))
        found.append(entry)
    if not found:
        raise ValueError(f"{type(model).__name__} has no quantized layers")
    return found


def _quantizer_facts(theta, *, signed: bool) -> tuple[int, int, int]:
    """``(exponent of d_q, levels n, bits)`` of a quantizer leaf, via the trainer's code."""
    from cgmq_jax import quantizer

    d, q_max = quantizer.from_latents(np.asarray(theta, np.float32))
    d_q = float(np.asarray(quantizer.power_of_two_step(d)))
    mantissa, exp = math.frexp(d_q)
    if mantissa != 0.5:  # jnp.exp2 is inexact for some integer exponents on XLA:CPU
        raise ValueError(
            f"the trainer's step {d_q!r} is not a power of two (jnp.exp2 of an integer "
            f"exponent near {exp - 1} is inexact), so no integer file reproduces it"
        )
    levels = int(np.asarray(quantizer.levels(d, q_max)))
    bits = int(np.asarray(quantizer.exact_bitwidth(d, q_max, signed=signed)))
    if bits != bits_for_levels(levels, signed=signed):
        raise ValueError(f"bit-width {bits} disagrees with {levels} levels")
    return exp - 1, levels, bits


def _bias_exponent(
    e_acc: int, facts: list[tuple], order: list[int], index: int, scheme: str
) -> int:
    """The exponent of a layer's integer bias (and of its output); see :func:`export`."""
    if scheme == "accumulator":
        return e_acc
    position = order.index(index)
    if position + 1 == len(order):  # the logits
        return e_acc - LOGIT_BIAS_BITS
    next_input_exponent = facts[order[position + 1]][3]
    # The next quantizer rounds at multiples of half its step, 2**(e_next - 1).
    return min(e_acc, next_input_exponent - 1) - 1


def round_to_odd(values: np.ndarray) -> np.ndarray:
    """Integers as they are; anything else to the odd one of its two integer neighbours.

    Rounding to odd keeps a value strictly inside the same open interval between
    consecutive even integers, so adding it to an even integer and comparing with even
    integers (or rounding at any coarser power-of-two grid) gives the same answer as the
    unrounded value (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums:
    proved algorithms using rounding to odd", IEEE TC 2008).

    >>> round_to_odd(np.array([-2.5, -2.0, 0.25, 1.5, 2.0, 2.01])).tolist()
    [-3.0, -2.0, 1.0, 1.0, 2.0, 3.0]
    """
    values = np.asarray(values, np.float64)
    low = np.floor(values)
    odd_low = np.mod(low, 2.0) == 1.0
    return np.where(values == low, low, np.where(odd_low, low, low + 1.0))


def _check_graph(ops: list[dict], layers: list[dict], input_shape: list[int]) -> None:
    """Follow the op list's shapes; they must meet every traced layer's input and output."""
    shape = list(input_shape)
    seen = []
    for op in ops:
        kind = op["op"]
        if kind in _LAYER_OPS:
            layer = layers[op["layer"]]
            if layer["kind"] != kind or shape != layer["input_shape"]:
                raise ValueError(
                    f"op graph reaches {layer['name']} ({layer['kind']}, input "
                    f"{layer['input_shape']}) as {kind} with shape {shape}"
                )
            shape = list(layer["output_shape"])
            seen.append(op["layer"])
        elif kind == "maxpool":
            (wh, ww), (sh, sw) = op["window"], op["strides"]
            shape = [(shape[0] - wh) // sh + 1, (shape[1] - ww) // sw + 1, shape[2]]
        elif kind == "flatten":
            shape = [math.prod(shape)]
        elif kind != "relu":
            raise ValueError(f"unknown op {kind!r}")
    if seen != list(range(len(layers))):
        raise ValueError(f"op graph visits layers {seen}, expected each once in call order")
    if ops[-1]["op"] not in _LAYER_OPS:
        raise ValueError("the op graph must end with a layer (the logits)")


def export(
    params: Any,
    model: Any,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int] = (28, 28, 1),
    input_exponent: int = PIXEL_EXPONENT,
    bias_scheme: str = "odd",
    graph: list[dict] | None = None,
    certificate: dict | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write a quantized model's parameters as a ``cgmq-int-npz`` file (needs JAX).

    Args:
      params: the quantized parameter tree (``report.load_params`` of a run, or ``fit``'s).
      model: the Flax model (``quantized=True``), e.g. ``models.get_model("lenet5")``.
      path: the ``.npz`` file to write.
      input_shape: one example's input shape (no batch axis).
      input_exponent: the exponent of the integer network input the file expects
        (default -8: MNIST pixels, ``x = uint8 / 256``).
      bias_scheme: how the float bias becomes an integer ``B`` at exponent ``e_b`` (the
        export's one float -> int step); a layer's output is ``(acc << (e_acc - e_b)) + B``
        at exponent ``e_b``, with ``e_acc = e_w + e_in``.

        * ``"accumulator"``: ``e_b = e_acc``, ``B = round_half_even(bias / 2**e_acc)``.
          Simple, but it loses up to half an accumulator LSB, which is up to several input
          steps of the next layer when the accumulator is the coarser, and it decides the
          frequent exact ties of the next quantizer's rounding differently from the float
          bias (measured: 46 of 10,000 LeNet-5 test predictions changed).
        * ``"odd"`` (default): ``e_b = min(e_acc, e_next - 1) - 1`` (``e_next`` the next
          layer's input exponent; the next quantizer rounds at multiples of
          ``2**(e_next - 1)``), ``B = round_to_odd(bias / 2**e_b)``. The next layer's codes
          (and ReLU / max-pool) are then exactly those of exact arithmetic with the float
          bias (see :func:`round_to_odd`), for one or two more bias bits. The logits layer
          takes ``e_b = e_acc - LOGIT_BIAS_BITS``: its argmax compares different channels'
          biases, so it needs fine bits rather than parity.
      graph: the op list, with ``"layer"`` naming a layer by its ``/``-joined path; known
        for :class:`~cgmq_jax.models.LeNet5` and :class:`~cgmq_jax.models.MLP`. It is checked
        against the model's traced shapes.
      certificate: the trainer's certificate (``results.json["certificate"]``), copied into
        the header for the cross-check of :func:`count_bops`.
      metadata: free-form JSON-able facts to keep (run directory, seed, accuracy, ...).

    Returns:
      The path written.
    """
    if bias_scheme not in BIAS_SCHEMES:
        raise ValueError(f"bias_scheme must be one of {BIAS_SCHEMES}, got {bias_scheme!r}")
    if graph is None and type(model).__name__ not in GRAPH_MODELS:
        raise ValueError(
            f"cannot export {type(model).__name__}: no op graph known for it; the integer "
            f"export knows those of {' and '.join(GRAPH_MODELS)} only (pass graph=[...] for "
            "a model of conv, dense, relu, max-pool and flatten ops)"
        )
    traced = _trace_layers(model, input_shape)
    names = ["/".join(entry["path"]) for entry in traced]
    ops = graph if graph is not None else _graph_for(model, names)
    ops = [dict(op) for op in ops]
    for op in ops:
        if op["op"] in _LAYER_OPS:
            if op["layer"] not in names:
                raise ValueError(f"op graph names unknown layer {op['layer']!r}; have {names}")
            op["layer"] = names.index(op["layer"])
    order = [op["layer"] for op in ops if op["op"] in _LAYER_OPS]
    facts = []
    for entry in traced:
        node = params
        for key in entry["path"]:
            node = node[key]
        if entry["input_signed"] is None:
            from cgmq_jax import cost

            entry["input_signed"] = cost.stored_input_signed(params, entry["path"])
        e_w, n_w, b_w = _quantizer_facts(node["weight_quantizer"], signed=True)
        e_in, n_in, b_in = _quantizer_facts(node["input_quantizer"], signed=entry["input_signed"])
        kernel = np.asarray(node["kernel"], np.float32)
        if entry["use_bias"]:
            bias = np.asarray(node["bias"], np.float32).astype(np.float64)
        else:
            bias = np.zeros(kernel.shape[-1], np.float64)
        facts.append((e_w, n_w, b_w, e_in, n_in, b_in, kernel, bias))
    layers, arrays = [], {}
    for i, entry in enumerate(traced):
        e_w, n_w, b_w, e_in, n_in, b_in, kernel, bias = facts[i]
        codes = np.clip(np.round(kernel.astype(np.float64) / 2.0**e_w), -n_w, n_w)
        weight = codes.astype(int_dtype_for_bits(b_w))
        e_acc = e_w + e_in
        e_bias = _bias_exponent(e_acc, facts, order, i, bias_scheme)
        scaled = bias / 2.0**e_bias  # exact: a float32 over a power of two, in float64
        # The one float -> int step of the export.
        bias_codes = np.round(scaled) if bias_scheme == "accumulator" else round_to_odd(scaled)
        bias_error = float(np.max(np.abs(bias - bias_codes * 2.0**e_bias), initial=0.0))
        bias_max = int(np.max(np.abs(bias_codes), initial=0))
        bias_bits = signed_bits(bias_max)
        fan_in = math.prod(kernel.shape[:-1])
        out_bound = (fan_in * n_w * n_in << (e_acc - e_bias)) + bias_max
        weight_key, bias_key = f"L{i}.weight", f"L{i}.bias"
        arrays[weight_key] = weight
        arrays[bias_key] = bias_codes.astype(int_dtype_for_bits(bias_bits))
        layer = {
            "name": names[i],
            "kind": entry["kind"],
            "input_shape": entry["input_shape"],
            "output_shape": entry["output_shape"],
            "kernel_shape": list(kernel.shape),
            "kernel_layout": "HWIO" if entry["kind"] == "conv" else "IO",
        }
        if entry["kind"] == "conv":
            layer.update(strides=entry["strides"], padding=entry["padding"], groups=entry["groups"])
        layer.update(
            weight_key=weight_key,
            weight_dtype=weight.dtype.name,
            weight_bits=b_w,
            weight_exponent=e_w,
            weight_levels=n_w,
            weight_signed=True,
            input_bits=b_in,
            input_exponent=e_in,
            input_levels=n_in,
            input_signed=entry["input_signed"],
            accumulator_exponent=e_acc,
            bias_key=bias_key,
            bias_dtype=arrays[bias_key].dtype.name,
            bias_bits=bias_bits,
            bias_exponent=e_bias,
            bias_rounding="half_even" if bias_scheme == "accumulator" else "odd",
            bias_rounding_max_abs_error=bias_error,
            output_bits=signed_bits(out_bound),
            macs=math.prod(entry["output_shape"]) * fan_in,
        )
        layers.append(layer)
    _check_graph(ops, layers, list(input_shape))
    last = layers[ops[-1]["layer"]]
    header: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": type(model).__name__,
        "input": {
            "shape": list(input_shape),
            "layout": "NHWC without the batch axis" if len(input_shape) == 3 else "features",
            "exponent": int(input_exponent),
            "note": "integers at 2**exponent scale (MNIST: uint8 pixels, x = uint8 / 256)",
        },
        "ops": ops,
        "layers": layers,
        "output": {
            "layer": ops[-1]["layer"],
            "exponent": last["bias_exponent"],
            "meaning": "int accumulators; logits = acc * 2**exponent; prediction = argmax",
        },
        "bias_scheme": bias_scheme,
        "macs": sum(layer["macs"] for layer in layers),
        "bops": sum(L["macs"] * L["weight_bits"] * L["input_bits"] for L in layers),
    }
    if certificate is not None:
        header["certificate"] = {
            key: certificate.get(key)
            for key in ("bops", "budget_bops", "within_budget", "layers", "selected_epoch")
            if key in certificate
        }
    if metadata is not None:
        header["metadata"] = metadata
    le = {key: value.astype(value.dtype.newbyteorder("<")) for key, value in arrays.items()}
    header["arrays"] = {
        key: {
            "dtype": value.dtype.str,
            "shape": list(value.shape),
            "sha256": _sha256(_as_bytes(value)),
        }
        for key, value in le.items()
    }
    header["payload_sha256"] = _sha256(b"".join(_as_bytes(value) for value in le.values()))
    header_bytes = json.dumps(header, indent=1).encode("utf-8")
    from cgmq_jax import files  # the writer side; the reader stays a single numpy-only file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(path, "wb") as f:
        np.savez(
            f,
            **{
                HEADER_KEY: np.frombuffer(header_bytes, np.uint8),
                HEADER_SHA_KEY: np.frombuffer(_sha256(header_bytes).encode("ascii"), np.uint8),
            },
            **le,
        )
    return path


@functools.cache
def _jitted_forward():
    """``jit(model, params, x) -> (logits, {layer: input codes})``, built once (needs JAX)."""
    import jax
    import jax.numpy as jnp
    from flax import linen

    from cgmq_jax import nn as qnn
    from cgmq_jax import quantizer

    def forward(model, params, x):
        codes = {}

        def record(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__" and isinstance(
                module, qnn.QuantConv | qnn.QuantDense
            ):
                theta = module.get_variable("params", "input_quantizer")
                d, q_max = quantizer.from_latents(theta)
                signed = module.input_signed
                if signed is None:  # decided by the data, stored with the parameters
                    signed = quantizer.is_signed_leaf(
                        module.get_variable("params", quantizer.INPUT_SIGNED)
                    )
                    code = jnp.where(
                        signed,
                        quantizer.quantize(args[0], d, q_max, signed=True)[0],
                        quantizer.quantize(args[0], d, q_max, signed=False)[0],
                    )
                else:
                    code = quantizer.quantize(args[0], d, q_max, signed=signed)[0]
                codes["/".join(module.path)] = code
            return next_fun(*args, **kwargs)

        with linen.intercept_methods(record):
            logits = model.apply({"params": params}, x)
        return logits, codes

    return jax.jit(forward, static_argnums=0)


def compare_with_model(
    path: str | os.PathLike | IntegerModel,
    params: Any,
    model: Any,
    images: np.ndarray,
    *,
    batch_size: int = 1000,
) -> dict:
    """Run the file's integer inference and the JAX fake-quant model side by side (needs JAX).

    Args:
      path: the exported file (or a loaded :class:`IntegerModel`).
      params: the quantized parameters it was exported from.
      model: the Flax model.
      images: float inputs, exact multiples of ``2**header["input"]["exponent"]``
        (MNIST: ``uint8 / 256``); the integer side gets them as integers at that exponent.
      batch_size: examples per batch.

    Returns:
      ``{"examples", "agree", "int_predictions", "jax_predictions", "code_mismatches":
      {layer: [mismatching codes, total codes, max |difference|]}, "max_logit_difference"}``:
      the layer input codes are those the JAX model's quantizers produce (intercepted),
      compared with the integer engine's; the logit difference is in float units.
    """
    import jax.numpy as jnp

    exported = path if isinstance(path, IntegerModel) else load(path)
    exponent = exported.header["input"]["exponent"]
    forward = _jitted_forward()
    images = np.asarray(images)
    scaled = images.astype(np.float64) * 2.0**-exponent
    integers = np.round(scaled)
    if not np.array_equal(integers, scaled):
        raise ValueError(f"inputs are not exact multiples of 2**{exponent}")
    integers = integers.astype(np.int64)
    int_pred, jax_pred, mismatches, max_logit = [], [], {}, 0.0
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        logits, codes = forward(model, params, jnp.asarray(images[start:stop]))
        logits = np.asarray(logits, np.float64)
        int_logits, out_exp, int_codes = run_integer(
            exported, integers[start:stop], return_codes=True
        )
        jax_pred.append(np.argmax(logits, -1))
        int_pred.append(np.argmax(int_logits, -1))
        scaled_logits = int_logits.astype(np.float64) * 2.0**out_exp
        max_logit = max(max_logit, float(np.max(np.abs(scaled_logits - logits), initial=0.0)))
        for name, ours in int_codes.items():
            theirs = np.asarray(codes[name], np.int64)
            row = mismatches.setdefault(name, [0, 0, 0])
            row[0] += int(np.sum(theirs != ours))
            row[1] += int(ours.size)
            row[2] = max(row[2], int(np.max(np.abs(theirs - ours), initial=0)))
    int_pred, jax_pred = np.concatenate(int_pred), np.concatenate(jax_pred)
    return {
        "examples": len(images),
        "agree": int(np.sum(int_pred == jax_pred)),
        "int_predictions": int_pred,
        "jax_predictions": jax_pred,
        "code_mismatches": mismatches,
        "max_logit_difference": max_logit,
    }


def export_run(
    results_dir: str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    bias_scheme: str = "odd",
) -> Path:
    """Export a run directory (``results.json`` + ``params.msgpack``) written by the trainer.

    Args:
      results_dir: the run's directory.
      path: the file to write; default ``results_dir / model_int.npz``.
      bias_scheme: see :func:`export`.

    Raises:
      ValueError: a missing, unfinished or unreadable run, params whose SHA-256 is not the
        one ``results.json`` records (each names the file), or a float (unquantized) run.
    """
    from cgmq_jax import models, report, rundir

    results_dir = Path(results_dir)
    results, _ = rundir.load_run(results_dir)  # verifies the params against results.json
    config = results.get("config", {})
    if config.get("method") == "float":
        raise ValueError(f"{results_dir}: a float run has no quantizers to export")
    params = report.load_params(results_dir)
    model = models.get_model(config.get("model", "lenet5"), quantized=True)
    metadata = {
        "run": str(results_dir),
        "method": config.get("method"),
        "seed": results.get("seed"),
        "test_accuracy": results.get("test_accuracy"),
        "data_source": results.get("data_source"),
        "params_sha256": results.get("params_sha256"),
    }
    return export(
        params,
        model,
        path if path is not None else results_dir / DEFAULT_FILE,
        bias_scheme=bias_scheme,
        certificate=results.get("certificate"),
        metadata=metadata,
    )
