"""The ``cgmq-int-npz`` file: its constants, its numpy-only reader and its validator.

Nothing here imports JAX (``import cgmq_jax.export.format`` works on a machine with numpy
alone; ``cgmq_jax/__init__.py`` imports its submodules lazily). :func:`load` trusts no claim
of a file it can recompute: it reads only listed, size-checked members, verifies every
checksum, then follows the graph of ops from the input shape and recomputes every shape,
MAC count, bit-width, exponent and memory figure (:func:`validate`). The semantics of the
ops are in ``docs/export.md`` and :mod:`cgmq_jax.export.engine`.

What the reader refuses, beyond a broken file: JSON with a duplicate key, ``NaN`` /
``Infinity`` or an integer beyond int64 (:func:`parse_json`); a field of the wrong type or
one the schema does not know (:func:`check_header_types`; the format is not extensible
outside ``metadata``); an array no layer uses, or arrays over :data:`MAX_TOTAL_BYTES`,
both before any array is read; a graph any of whose values, accumulators or requantize
intermediates can leave int64 (:func:`prove_ranges`: exact worst cases in Python
integers, for inputs in :data:`INPUT_RANGE`); a certificate whose limits are not positive
or whose ``within`` / ``within_budget`` are not what the recounted costs give against its
limits; a ``macs`` / ``bops`` total other than the recount.

Checked claims that no computation reads: ``kernel_layout`` (the one layout per kind),
``weight_dtype`` / ``bias_dtype`` (the stored arrays'), ``bias_rounding`` (the one of
``bias_scheme``; ``"accumulator"`` also fixes each ``bias_exponent``), ``input.layout``,
``output_bits`` (2 to 64).

Informative, typed but excluded from every verdict: ``metadata`` (free-form scalars;
``test_accuracy``, ``params_sha256``, ``run``, ``seed``: claims about the run that only the
run can check, and a missing ``params_sha256`` is a file that makes no such claim),
``certificate.selected_epoch``, ``certificate.limits.*.minimum``, each layer's
``output_bits`` beyond its range (the writer's storage hint: the proven ranges are what the
engine and C rely on) and ``bias_rounding_max_abs_error``, ``model``, ``input.note``,
``output.meaning``, the ops' ``module`` and the layer names (labels). The certificate's
costs are compared with the recount by :func:`count_bops` (``matches_certificate``), whose
``within_budget`` is always the recount's against the certificate's limits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "cgmq-int-npz"
VERSION = 2
HEADER_KEY = "header.json"
HEADER_SHA_KEY = "header.sha256"
DEFAULT_FILE = "model_int.npz"
#: The exponent of MNIST pixels: images are ``uint8 / 256`` exactly (``cgmq_jax.data``).
PIXEL_EXPONENT = -8
#: The width every bias is stored at: an int32 at a power-of-two scale finer than (or equal
#: to) its accumulator's. The weight memory (``cgmq_jax.cost.weight_memory``) counts it.
BIAS_BITS = 32
#: The ops that run a quantized layer (``"layer": i``).
LAYER_OPS = ("conv", "dense")
#: Every op of the graph (``docs/export.md``, "Integer semantics").
OPS = (*LAYER_OPS, "relu", "clip", "maxpool", "sumpool", "sum", "div", "add", "concat", "reshape")
_INT_DTYPES = ((8, np.int8), (16, np.int16), (32, np.int32), (64, np.int64))


class ExportError(ValueError):
    """A file that is not a valid, intact ``cgmq-int-npz`` model (one-line message)."""


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


# --------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One quantized layer's cost facts: the row ``count_bops``, the certificate and the
    table print. ``weight_bits`` is a tuple (one per output channel) when per-channel."""

    layer: str
    macs: int
    weight_bits: int | tuple[int, ...]
    input_bits: int
    kind: str = ""  # "conv" / "dense" where known
    weights: int = 0  # kernel elements
    biases: int = 0  # bias elements
    bias_bits: int = 0
    input_elements: int = 0  # elements of the layer's quantized input, per example

    @property
    def bops(self) -> int:
        """``MACs * b_w * b_in`` (per channel: each channel's MACs at its own bits)."""
        if isinstance(self.weight_bits, tuple):
            return self.macs // len(self.weight_bits) * sum(self.weight_bits) * self.input_bits
        return self.macs * self.weight_bits * self.input_bits

    @property
    def weight_memory_bits(self) -> int:
        """Kernel codes at their bit-width(s) plus the bias at its stored width."""
        if isinstance(self.weight_bits, tuple):
            per = self.weights // len(self.weight_bits)
            return per * sum(self.weight_bits) + self.biases * self.bias_bits
        return self.weights * self.weight_bits + self.biases * self.bias_bits

    @property
    def activation_bits(self) -> int:
        """The layer's quantized input, per example, in bits."""
        return self.input_elements * self.input_bits

    def as_dict(self) -> dict:
        bits = self.weight_bits
        kind = {"kind": self.kind} if self.kind else {}
        return {
            "layer": self.layer,
            **kind,
            "macs": self.macs,
            "weight_bits": list(bits) if isinstance(bits, tuple) else bits,
            "input_bits": self.input_bits,
            "bops": self.bops,
        }


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A tensor of the graph: shape (no batch axis), exponent, divisor: ``t * 2**e / k``."""

    shape: tuple[int, ...]
    exponent: int
    divisor: int = 1


@dataclasses.dataclass(frozen=True)
class Validated:
    """What :func:`validate` recomputed from a file: every tensor and every layer's row."""

    tensors: tuple[Tensor, ...]
    rows: tuple[LayerRow, ...]
    #: Every tensor's proven value range ``(low, high)`` over inputs in :data:`INPUT_RANGE`.
    ranges: tuple[tuple[int, int], ...] = ()
    #: The input range the proof needs (:data:`INPUT_RANGE`), or ``None``: any int64 input.
    input_range: tuple[int, int] | None = None

    @property
    def weight_memory_bits(self) -> int:
        return sum(row.weight_memory_bits for row in self.rows)

    @property
    def activation_bits(self) -> int:
        """The largest quantized layer input, per example, in bits (DQ's "largest activation")."""
        return max((row.activation_bits for row in self.rows), default=0)


@dataclasses.dataclass(frozen=True)
class IntegerModel:
    """A loaded, verified ``cgmq-int-npz`` file: its header, integer arrays and recounted facts."""

    path: Path
    header: dict
    arrays: dict[str, np.ndarray]
    facts: Validated

    @property
    def layers(self) -> list[dict]:
        """The per-layer header records, in network order."""
        return self.header["layers"]

    @property
    def ops(self) -> list[dict]:
        return self.header["ops"]

    def weight(self, index: int) -> np.ndarray:
        """Integer weight codes of layer ``index``."""
        return self.arrays[self.layers[index]["weight_key"]]

    def bias(self, index: int) -> np.ndarray:
        """Integer bias of layer ``index`` (at exponent ``bias_exponent``)."""
        return self.arrays[self.layers[index]["bias_key"]]


# --------------------------------------------------------------------------- reading


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _as_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def _fail(path: os.PathLike | str, problem: str) -> ExportError:
    message = f"{path}: {problem}"
    return ExportError(message.replace("\r", "\\r").replace("\n", "\\n"))


#: The dtypes an array of the file may have (little-endian signed integers).
_ARRAY_DTYPES = ("|i1", "<i2", "<i4", "<i8")
#: The largest ``header.json`` member accepted, in bytes (a real header is a few KiB to a
#: few tens of KiB; parsed, 1 MiB of JSON costs at most some tens of MB of Python objects).
MAX_HEADER_BYTES = 1 << 20
#: The largest ``.npy`` preamble (magic, version, header dict, padding) accepted, in bytes.
_NPY_PREAMBLE_MAX = 4096
#: The most elements one array of the file may declare (2**25: 32 Mi; LeNet5BB's largest
#: kernel has a few hundred thousand).
MAX_ARRAY_ELEMENTS = 1 << 25
#: The most bytes all arrays of a file may declare together, checked from the header before
#: any array is read (64 MiB: two orders of magnitude above the largest model here).
MAX_TOTAL_BYTES = 1 << 26
#: The most elements one tensor of the graph may have, per example (16 Mi).
MAX_TENSOR_ELEMENTS = 1 << 24
#: The network input values the overflow proof assumes (:func:`validate`); the engine
#: refuses inputs outside it (C feeds ``uint8``, inside it).
INPUT_RANGE = (-(1 << 31), (1 << 31) - 1)
#: The largest exponent magnitude and bias shift (``accumulator - bias`` exponent) accepted.
MAX_EXPONENT = 1024
MAX_BIAS_SHIFT = 62

_LAYER_FIELDS = (
    "name",
    "per_channel",
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
_CONV_FIELDS = ("strides", "padding", "groups", "kernel_dilation", "input_dilation")
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


# --------------------------------------------------------------------------- strict JSON

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    table: dict = {}
    for key, value in pairs:
        if key in table:
            raise ValueError(f"duplicate key {key!r}")
        table[key] = value
    return table


def _json_int(text: str) -> int:
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is beyond int64")
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]} is beyond a float")
    return value


def _json_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON number")


def parse_json(data: bytes | str) -> Any:
    """Strict JSON: no duplicate keys, no ``NaN`` / ``Infinity``, integers within int64.

    The reader parses every JSON it reads with this (a duplicate key would let two readers
    see two different files; a non-finite budget would pass every comparison).

    Raises:
      ValueError: (``json.JSONDecodeError`` too) naming the first problem.

    >>> parse_json('{"a": 1, "a": 2}')
    Traceback (most recent call last):
    ...
    ValueError: duplicate key 'a'
    """
    if isinstance(data, bytes):
        data = data.decode("utf-8")
    return json.loads(
        data,
        object_pairs_hook=_unique_keys,
        parse_int=_json_int,
        parse_float=_json_float,
        parse_constant=_json_constant,
    )


# --------------------------------------------------------------------------- header schema


@dataclasses.dataclass(frozen=True)
class _Object:
    """A JSON object: its required and optional fields; any other key is refused."""

    required: dict
    optional: dict = dataclasses.field(default_factory=dict)
    extra: Any = None  # the spec of any other key's value (``None``: other keys refused)


_TYPE_NAMES = {
    "int": "an integer",
    "number": "a finite number",
    "str": "a string",
    "bool": "true or false",
    "sha256": "a SHA-256 (64 lowercase hex digits)",
    "scalar": "a JSON string, number, boolean or null",
    "json": "any JSON value",
}


def _describe(spec: Any) -> str:
    if isinstance(spec, str):
        return _TYPE_NAMES[spec]
    if isinstance(spec, _Object):
        return "a JSON object"
    kind, arg = spec
    if kind == "list":
        return "a JSON list"
    if kind == "null":
        return f"null or {_describe(arg)}"
    if kind == "enum":
        return f"one of {', '.join(map(repr, arg))}"
    return " or ".join(_describe(s) for s in arg)  # either


def _is_scalar(value: Any, kind: str) -> bool:
    if kind == "int":
        return _is_int(value)
    if kind == "number":
        real = isinstance(value, float | np.floating) and math.isfinite(value)
        return _is_int(value) or real
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "sha256":
        return isinstance(value, str) and len(value) == 64 and set(value) <= set("0123456789abcdef")
    if kind == "scalar":
        return value is None or any(_is_scalar(value, k) for k in ("number", "str", "bool"))
    return True  # json


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mismatch(where: str, value: Any, spec: Any) -> str | None:
    """The first way ``value`` departs from ``spec`` (a line naming the field), or None."""
    if isinstance(spec, _Object):
        if not isinstance(value, dict):
            return f"{where} must be a JSON object, got {type(value).__name__}"
        missing = [key for key in spec.required if key not in value]
        if missing:
            return f"{where} is missing {', '.join(missing)}"
        for key, item in value.items():
            sub = spec.required.get(key, spec.optional.get(key, spec.extra))
            if sub is None:
                return f"{where} has an unknown field {_shown(key)}"
            problem = _mismatch(f"{where}.{key}", item, sub)
            if problem:
                return problem
        return None
    if isinstance(spec, str):
        ok = _is_scalar(value, spec)
        return None if ok else f"{where} must be {_TYPE_NAMES[spec]}, got {_shown(value)}"
    kind, arg = spec
    if kind == "list":
        if not isinstance(value, list):
            return f"{where} must be a JSON list, got {type(value).__name__}"
        for i, item in enumerate(value):
            problem = _mismatch(f"{where}[{i}]", item, arg)
            if problem:
                return problem
        return None
    if kind == "null":
        return None if value is None else _mismatch(where, value, arg)
    if kind == "enum":
        ok = any(value == v and type(value) is type(v) for v in arg)
        return None if ok else f"{where} must be {_describe(spec)}, got {_shown(value)}"
    problems = [_mismatch(where, value, s) for s in arg]  # either: the closest alternative
    if all(problems):
        return problems[1] if isinstance(value, list) and len(problems) > 1 else problems[0]
    return None


def _list(item: Any) -> tuple:
    return ("list", item)


def _null(spec: Any) -> tuple:
    return ("null", spec)


def _enum(*values: Any) -> tuple:
    return ("enum", values)


_INTS = _list("int")
_INT_OR_INTS = ("either", ("int", _INTS))
_DTYPE_NAMES = _enum("int8", "int16", "int32", "int64")
#: The kernel layouts the reader runs (``kernel_layout``, by kind).
KERNEL_LAYOUTS = {"conv": "(*window, in / groups, out)", "dense": "(in, out)"}
#: The input layout the reader runs (``input.layout``).
INPUT_LAYOUT = "channels last, no batch axis"
#: How a bias was rounded, by ``bias_scheme`` (``bias_rounding`` of every layer).
BIAS_ROUNDING = {"accumulator": "half_even", "odd": "odd"}
#: The cost names a certificate may limit (:data:`cgmq_jax.cost.COSTS`).
LIMIT_NAMES = ("bops", "weight_memory_bits", "activation_bits")

_LAYER_SCHEMA = _Object(
    required={
        "name": "str",
        "kind": _enum(*LAYER_OPS),
        "per_channel": "bool",
        **{key: _INTS for key in ("input_shape", "output_shape", "kernel_shape")},
        "weight_key": "str",
        "bias_key": "str",
        **{key: _INT_OR_INTS for key in ("weight_bits", "weight_exponent", "weight_levels")},
        **{key: "int" for key in ("input_bits", "input_exponent", "input_levels")},
        "input_signed": "bool",
        "accumulator_exponent": _INT_OR_INTS,
        **{key: "int" for key in ("bias_exponent", "output_bits", "bias_bits", "macs")},
    },
    optional={
        **{key: _INTS for key in ("strides", "kernel_dilation", "input_dilation")},
        "padding": _list(_INTS),
        "groups": "int",
        "kernel_layout": _enum(*KERNEL_LAYOUTS.values()),
        "weight_signed": _enum(True),
        "weight_dtype": _DTYPE_NAMES,
        "bias_dtype": _DTYPE_NAMES,
        "bias_rounding": _enum(*BIAS_ROUNDING.values()),
        "bias_rounding_max_abs_error": "number",
    },
)
#: The fields of each op besides ``op``, ``inputs`` and ``module`` (all required).
OP_FIELDS = {
    "conv": ("layer",),
    "dense": ("layer",),
    "relu": (),
    "clip": ("min", "max"),
    "maxpool": ("window", "strides", "padding"),
    "sumpool": ("window", "strides", "padding"),
    "sum": ("axes",),
    "div": ("by",),
    "add": (),
    "concat": ("axis",),
    "reshape": ("shape",),
}
_OP_SCHEMA = _Object(
    required={"op": "str"},
    optional={
        "inputs": _INTS,  # its absence is reported by the graph walk, with the op's name
        "module": "str",
        **{key: "int" for key in ("layer", "by", "axis")},
        **{key: _INTS for key in ("window", "strides", "axes", "shape")},
        "padding": _list(_INTS),
        "min": _null(_INTS),
        "max": _null(_INTS),
    },
)
_LIMIT_SCHEMA = _Object(
    required={"limit": "number", "cost": "int"}, optional={"minimum": "int", "within": "bool"}
)
_CERTIFICATE_ROW = _Object(
    required={"layer": "str", "macs": "int", "weight_bits": _INT_OR_INTS, "input_bits": "int"},
    optional={
        "kind": _enum(*LAYER_OPS),
        **{key: "int" for key in ("bops", "weight_memory_bits", "activation_bits")},
        "float": "bool",
    },
)
_CERTIFICATE_SCHEMA = _Object(
    required={},
    optional={
        "bops": "int",
        "budget_bops": _null("number"),
        "within_budget": "bool",
        "weight_memory_bits": "int",
        "activation_bits": "int",
        "limits": _Object(required={}, optional={name: _LIMIT_SCHEMA for name in LIMIT_NAMES}),
        "layers": _list(_CERTIFICATE_ROW),
        "selected_epoch": _null("int"),
    },
)
_METADATA_SCHEMA = _Object(
    required={},
    optional={
        "run": "str",
        "method": _null("str"),
        "seed": _null("int"),
        "test_accuracy": _null("number"),
        "dataset": _null("str"),
        "data_source": _null("str"),
        "params_sha256": _null("sha256"),
    },
    extra="scalar",
)
_HEADER_SCHEMA = _Object(
    required={
        "format": _enum(FORMAT),
        "version": _enum(VERSION),
        "input": _Object(
            required={"shape": _INTS, "exponent": "int"},
            optional={"layout": _enum(INPUT_LAYOUT), "note": "str"},
        ),
        "ops": _list("json"),  # each op: _OP_SCHEMA, named by its index and kind
        "layers": _list("json"),  # each layer: _LAYER_SCHEMA, named by its index and name
        "output": _Object(
            required={"tensor": "int", "exponent": "int", "divisor": "int"},
            optional={"meaning": "str"},
        ),
        "arrays": "json",  # checked member by member by the reader
        "payload_sha256": "sha256",
    },
    optional={
        "model": "str",
        "bias_scheme": _enum(*BIAS_ROUNDING),
        "macs": "int",
        "bops": "int",
        "certificate": _CERTIFICATE_SCHEMA,
        "metadata": _METADATA_SCHEMA,
    },
)


def check_header_types(check: _Checker, header: Any) -> None:
    """Every field of ``header`` of its schema's type, and no unknown field (one line each).

    Ranges and agreements between fields are :func:`validate`'s; this only ensures that
    every later check reads values of the types it expects.
    """
    problem = _mismatch("header", header, _HEADER_SCHEMA)
    for i, layer in enumerate(header["layers"] if not problem else ()):
        name = layer.get("name") if isinstance(layer, dict) else None
        where = f"layer {i} ({name})" if isinstance(name, str) else f"layer {i}"
        problem = _mismatch(where, layer, _LAYER_SCHEMA)
        if problem:
            break
    for j, op in enumerate(header["ops"] if not problem else ()):
        kind = op.get("op") if isinstance(op, dict) else None
        problem = _mismatch(f"op {j} ({kind})", op, _OP_SCHEMA)
        if problem:
            break
    if problem:
        raise check.fail(problem.removeprefix("header."))


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
    raw = bytearray(info.file_size + 1)
    with archive.open(info) as stream:
        size = 0
        while size < len(raw) and (got := stream.readinto(memoryview(raw)[size:])):
            size += got
    if size != info.file_size:
        raise check.fail(f"member {name!r} holds {size:,} bytes, not {info.file_size:,}")
    del raw[size:]
    found, found_shape, offset = _parse_npy(check, name, bytes(raw[:_NPY_PREAMBLE_MAX]))
    if found.str != dtype or (shape is not None and found_shape != shape):
        raise check.fail(
            f"array {name[:-4]!r} is {found.str}{found_shape}, header says {dtype}{shape}"
        )
    count = math.prod(found_shape)
    if len(raw) - offset != count * itemsize:
        raise check.fail(f"member {name!r}: {len(raw) - offset:,} data bytes for {found_shape}")
    return np.frombuffer(raw, found, count=count, offset=offset).reshape(found_shape)


def _read_header(check: _Checker, archive: zipfile.ZipFile, names: list[str]) -> dict:
    """The ``header.json`` member: size-capped, its SHA-256 verified, strict JSON, typed."""
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
    return _parse_header(check, header_bytes)


def _parse_header(check: _Checker, header_bytes: bytes) -> dict:
    """The header from its bytes: strict JSON (:func:`parse_json`), format, version, types."""
    try:
        header = parse_json(header_bytes)
    except (ValueError, RecursionError) as error:
        problem = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise check.fail(f"header.json is not valid JSON: {problem}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise check.fail(f"wrong format {_shown(found)}, expected {FORMAT!r}")
    if header.get("version") != VERSION or not _is_int(header.get("version")):
        raise check.fail(
            f"unsupported {FORMAT} version {_shown(header.get('version'))} (reader: {VERSION}; "
            "re-export the run with this version of cgmq_jax)"
        )
    missing = [key for key in _HEADER_FIELDS if key not in header]
    if missing:
        raise check.fail(f"header is missing {', '.join(missing)}")
    if not isinstance(header["arrays"], dict):
        kind = type(header["arrays"]).__name__
        raise check.fail(f"malformed header: arrays must be a table, got {kind}")
    check_header_types(check, header)
    return header


def _array_table(check: _Checker, header: dict, names: list[str]) -> dict:
    """The ``arrays`` table, checked against the layers and the caps before any array is read.

    Every array must be a layer's weight or bias, every archive member listed, and the
    declared sizes, each and together, within :data:`MAX_ARRAY_ELEMENTS` and
    :data:`MAX_TOTAL_BYTES`.
    """
    table = header["arrays"]
    used: set[str] = set()
    for i, layer in enumerate(header["layers"]):
        for field in ("weight_key", "bias_key"):
            if layer[field] not in table or layer[field] in used:
                raise check.fail(
                    f"layer {i} {field} {_shown(layer[field])} names no array, or a used one"
                )
            used.add(layer[field])
    listed = {HEADER_KEY + ".npy", HEADER_SHA_KEY + ".npy"}
    total = 0
    for key, meta in table.items():
        where = f"arrays[{_shown(key)}]"
        if key not in used:
            raise check.fail(f"array {_shown(key)} belongs to no layer (refused, not read)")
        check.dict(where, meta)
        for field in ("dtype", "shape", "sha256"):
            if field not in meta:
                raise check.fail(f"malformed header: {where} has no {field}")
        unknown = sorted(set(meta) - {"dtype", "shape", "sha256"})
        if unknown:
            raise check.fail(f"{where} has an unknown field {_shown(unknown[0])}")
        if meta["dtype"] not in _ARRAY_DTYPES:
            raise check.fail(f"{where}.dtype {_shown(meta['dtype'])} is not one of {_ARRAY_DTYPES}")
        shape = check.list(f"{where}.shape", meta["shape"])
        for i, n in enumerate(shape):
            check.int(f"{where}.shape[{i}]", n, 0, MAX_ARRAY_ELEMENTS)
        if math.prod(shape) > MAX_ARRAY_ELEMENTS:
            raise check.fail(f"{where}.shape {shape} has over {MAX_ARRAY_ELEMENTS:,} elements")
        check.str(f"{where}.sha256", meta["sha256"])
        if key + ".npy" in listed:
            raise check.fail(f"array {key!r} is listed twice")
        listed.add(key + ".npy")
        total += math.prod(shape) * np.dtype(meta["dtype"]).itemsize
    if total > MAX_TOTAL_BYTES:
        raise check.fail(
            f"the arrays declare {total:,} bytes, over the reader's cap of {MAX_TOTAL_BYTES:,} "
            "(refused before reading)"
        )
    unlisted = [name for name in names if name not in listed]
    if unlisted:
        raise check.fail(f"unlisted archive member {unlisted[0]!r} (not read)")
    return table


def _read_archive(check: _Checker, archive: zipfile.ZipFile) -> tuple[dict, dict]:
    """``(header, arrays)``: the header verified, then only the listed arrays, size-checked."""
    names = archive.namelist()
    if len(set(names)) != len(names):
        raise check.fail("duplicate archive members")
    header = _read_header(check, archive, names)
    table = _array_table(check, header, names)
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


def _window_out(
    check: _Checker,
    where: str,
    size: int,
    window: int,
    stride: int,
    pad,
    *,
    input_dilation: int = 1,
    window_dilation: int = 1,
) -> int:
    """Output length of a (possibly dilated, padded) window sliding over one axis."""
    dilated = (size - 1) * input_dilation + 1
    span = (window - 1) * window_dilation + 1
    padded = dilated + pad[0] + pad[1]
    if padded < span:
        raise check.fail(f"{where}: window {span} is larger than the padded input {padded}")
    return (padded - span) // stride + 1


def _pairs(check: _Checker, where: str, value: Any, count: int) -> list[list[int]]:
    pairs = check.list(where, value)
    if len(pairs) != count:
        raise check.fail(f"{where} must hold {count} [low, high] pairs, got {len(pairs)}")
    return [check.ints(f"{where}[{i}]", p, 2, lo=0) for i, p in enumerate(pairs)]


def _exponents(check: _Checker, where: str, value: Any, channels: int | None) -> list[int]:
    """One exponent, or one per channel (``channels`` given: a per-channel layer)."""
    if channels is None:
        return [check.exponent(where, value)]
    values = check.list(where, value)
    if len(values) != channels:
        raise check.fail(f"{where} must list {channels} per-channel values")
    return [check.exponent(f"{where}[{i}]", v) for i, v in enumerate(values)]


def _layer(check: _Checker, index: int, layer: dict, shape: tuple[int, ...], arrays) -> tuple:
    """``(output shape, LayerRow, bias exponent)`` of layer ``index`` on an input of
    ``shape``, every field checked."""
    where = f"layer {index} ({layer['name']})"
    kind = layer["kind"]
    claimed = check.ints(f"{where}.input_shape", layer["input_shape"])
    if tuple(claimed) != shape:
        raise check.fail(
            f"{where}.input_shape {claimed!r} does not follow from the graph, which gives "
            f"{list(shape)}"
        )
    kernel = check.ints(f"{where}.kernel_shape", layer["kernel_shape"])
    weight, bias = arrays[layer["weight_key"]], arrays[layer["bias_key"]]
    if list(weight.shape) != kernel:
        raise check.fail(f"{where}: weight array shape {list(weight.shape)} != kernel_shape")
    if kind == "conv":
        rank = len(shape) - 1
        if not 1 <= rank <= 3 or len(kernel) != rank + 2:
            raise check.fail(f"{where}: kernel {kernel} does not fit the conv input {list(shape)}")
        strides = check.ints(f"{where}.strides", layer["strides"], rank)
        padding = _pairs(check, f"{where}.padding", layer["padding"], rank)
        rhs = check.ints(f"{where}.kernel_dilation", layer["kernel_dilation"], rank)
        lhs = check.ints(f"{where}.input_dilation", layer["input_dilation"], rank)
        groups = check.int(f"{where}.groups", layer["groups"], 1)
        cin_g, cout = kernel[-2], kernel[-1]
        if cin_g * groups != shape[-1] or cout % groups:
            raise check.fail(
                f"{where}.kernel_shape {kernel} with groups {groups} does not fit input "
                f"channels {shape[-1]}"
            )
        spatial = [
            _window_out(check, where, n, k, s, p, input_dilation=a, window_dilation=b)
            for n, k, s, p, a, b in zip(
                shape[:-1], kernel[:-2], strides, padding, lhs, rhs, strict=True
            )
        ]
        out = (*spatial, cout)
        fan_in = math.prod(kernel[:-1])
    else:
        if len(kernel) != 2 or kernel[0] != shape[-1]:
            raise check.fail(
                f"{where}.kernel_shape {kernel} does not fit the dense input {list(shape)}"
            )
        out, fan_in = (*shape[:-1], kernel[1]), kernel[0]
    macs = math.prod(out) * fan_in
    if list(bias.shape) != [out[-1]]:
        raise check.fail(f"{where}: bias array shape {list(bias.shape)} != [{out[-1]}]")
    if check.ints(f"{where}.output_shape", layer["output_shape"]) != list(out):
        raise check.fail(
            f"{where}.output_shape {layer['output_shape']!r} disagrees with its shapes, "
            f"which give {list(out)}"
        )
    if not _is_int(layer["macs"]) or layer["macs"] != macs:
        raise check.fail(
            f"{where}.macs {layer['macs']!r} disagrees with its shapes, which give {macs}"
        )
    per_channel = check.bool(f"{where}.per_channel", layer["per_channel"])
    channels = out[-1] if per_channel else None
    n_w = [
        check.int(f"{where}.weight_levels", n, 1, 1 << 62)
        for n in (
            layer["weight_levels"]
            if per_channel and isinstance(layer["weight_levels"], list)
            else [layer["weight_levels"]]
        )
    ]
    if len(n_w) != (channels or 1):
        raise check.fail(f"{where}.weight_levels must list {channels} per-channel values")
    e_w = _exponents(check, f"{where}.weight_exponent", layer["weight_exponent"], channels)
    e_acc = _exponents(
        check, f"{where}.accumulator_exponent", layer["accumulator_exponent"], channels
    )
    n_in = check.int(f"{where}.input_levels", layer["input_levels"], 1, 1 << 62)
    signed = check.bool(f"{where}.input_signed", layer["input_signed"])
    if layer.get("weight_signed", True) is not True:
        raise check.fail(f"{where}.weight_signed must be true")
    e_in = check.exponent(f"{where}.input_exponent", layer["input_exponent"])
    e_b = check.exponent(f"{where}.bias_exponent", layer["bias_exponent"])
    if e_acc != [e + e_in for e in e_w]:
        raise check.fail(f"{where}.accumulator_exponent {e_acc} != weight + input exponent")
    if not all(0 <= e - e_b <= MAX_BIAS_SHIFT for e in e_acc):
        raise check.fail(
            f"{where}: bias_exponent {e_b} above an accumulator_exponent {e_acc} or more "
            f"than {MAX_BIAS_SHIFT} below it"
        )
    weight_bits = [bits_for_levels(n, signed=True) for n in n_w]
    input_bits = bits_for_levels(n_in, signed=signed)
    stated_w = layer["weight_bits"]
    stated_w = stated_w if isinstance(stated_w, list) else [stated_w]
    if not all(map(_is_int, [*stated_w, layer["input_bits"]])) or (
        stated_w != weight_bits or layer["input_bits"] != input_bits
    ):
        raise check.fail(f"{where}: stated bit-widths disagree with the levels")
    if weight.size:  # per output channel (the last axis), against its own levels
        reach = np.abs(weight.astype(np.int64)).reshape(-1, kernel[-1]).max(axis=0)
        if np.any(reach > np.asarray(n_w)):
            raise check.fail(f"{where}: weight codes exceed their levels")
    bias_bits = check.int(f"{where}.bias_bits", layer["bias_bits"], 1, bias.dtype.itemsize * 8)
    if bias.size and signed_bits(int(np.abs(bias.astype(np.int64)).max())) > bias_bits:
        raise check.fail(f"{where}: bias values exceed bias_bits {bias_bits}")
    row = LayerRow(
        layer=check.str(f"layer {index} name", layer["name"]),
        kind=kind,
        macs=macs,
        weight_bits=tuple(weight_bits) if per_channel else weight_bits[0],
        input_bits=input_bits,
        weights=math.prod(kernel),
        biases=out[-1],
        bias_bits=bias_bits,
        input_elements=math.prod(shape),
    )
    return tuple(out), row, e_b


def _clip_bound(check: _Checker, where: str, value: Any, tensor: Tensor) -> None:
    if value is None:
        return
    m, x = check.ints(where, value, 2, lo=-(1 << 62))
    check.exponent(f"{where}[1]", x)
    scaled = m * tensor.divisor
    if x < tensor.exponent and scaled % (1 << (tensor.exponent - x)):
        raise check.fail(
            f"{where} {value} is not an integer at the tensor's scale 2**{tensor.exponent}"
        )


def _pool(check: _Checker, where: str, op: dict, shape: tuple[int, ...], *, needs_real: bool):
    rank = len(shape)
    window = check.ints(f"{where}.window", op.get("window"), rank)
    strides = check.ints(f"{where}.strides", op.get("strides"), rank)
    padding = _pairs(check, f"{where}.padding", op.get("padding"), rank)
    out = []
    for n, w, s, (lo, hi) in zip(shape, window, strides, padding, strict=True):
        size = _window_out(check, where, n, w, s, (lo, hi))
        if needs_real and (lo >= w or (size - 1) * s - lo >= n):
            raise check.fail(f"{where}: a window covers padding only")
        out.append(size)
    return tuple(out)


def validate(path: os.PathLike | str, header: dict, arrays: dict[str, np.ndarray]) -> Validated:
    """Follow the graph from the input shape; every tensor and layer recomputed and checked.

    Returns every tensor's shape, exponent and divisor, and every layer's :class:`LayerRow`
    (MACs and bit-widths recomputed from the validated shapes and levels; the header's
    ``macs`` and ``*_bits`` must equal them).
    """
    check = _Checker(Path(path))
    check_header_types(check, header)
    layers = check.list("layers", header["layers"])
    ops = check.list("ops", header["ops"])
    entry = check.dict("input", header["input"])
    if "shape" not in entry or "exponent" not in entry:
        raise check.fail("input needs shape and exponent")
    shape = tuple(check.ints("input.shape", entry["shape"]))
    if len(shape) > 4:
        raise check.fail(f"input.shape {list(shape)} has more than 4 axes")
    keys: set[str] = set()
    for i, layer in enumerate(layers):
        check.dict(f"layer {i}", layer)
        kind = layer.get("kind")
        if kind not in LAYER_OPS:
            raise check.fail(f"header layer {i}: unknown kind {kind!r}")
        needed = _LAYER_FIELDS + (_CONV_FIELDS if kind == "conv" else ())
        missing = [key for key in needed if key not in layer]
        if missing:
            raise check.fail(f"header layer {i} is missing {', '.join(missing)}")
        if kind == "dense" and any(key in layer for key in _CONV_FIELDS):
            raise check.fail(f"header layer {i}: a dense layer with conv geometry")
        check.str(f"layer {i} name", layer["name"])
        for field in ("weight_key", "bias_key"):
            key = check.str(f"layer {i} {field}", layer[field])
            if key not in arrays or key in keys:
                raise check.fail(f"layer {i} {field} {key!r} names no array, or a used one")
            keys.add(key)
    if keys != set(arrays):
        raise check.fail(f"arrays {sorted(set(arrays) - keys)} belong to no layer")
    tensors = [Tensor(shape, check.exponent("input.exponent", entry["exponent"]))]
    rows: list[LayerRow] = []
    for j, op in enumerate(ops):
        check.dict(f"op {j}", op)
        kind = op.get("op")
        where = f"op {j} ({kind})"
        if kind not in OPS:
            raise check.fail(f"op {j}: unknown op {_shown(kind)}")
        fields = set(OP_FIELDS[kind])
        if not fields <= set(op) or set(op) - fields - {"op", "inputs", "module"}:
            unknown = sorted(set(op) - fields - {"op", "inputs", "module"})
            missing = sorted(fields - set(op))
            raise check.fail(f"{where}: missing fields {missing} or unknown fields {unknown}")
        names = check.list(f"{where}.inputs", op.get("inputs"))
        arity = {"add": 2, "concat": None}.get(kind, 1)
        if (arity is not None and len(names) != arity) or not names:
            raise check.fail(f"{where} takes {arity or 'one or more'} inputs, got {len(names)}")
        ins = [tensors[check.int(f"{where}.inputs[{i}]", t, 0, j)] for i, t in enumerate(names)]
        x = ins[0]
        if kind in LAYER_OPS:
            index = check.int(f"{where}.layer", op.get("layer"), 0, len(layers) - 1)
            if index != len(rows):
                raise check.fail(f"op {j} visits layer {index}; layers go once each, in order")
            layer = layers[index]
            if layer["kind"] != kind:
                raise check.fail(f"op {j} runs layer {index}, a {layer['kind']}, as {kind}")
            out, row, e_b = _layer(check, index, layer, x.shape, arrays)
            if abs(x.exponent - layer["input_exponent"]) > MAX_BIAS_SHIFT:
                raise check.fail(
                    f"op {j}: requantizing from exponent {x.exponent} to "
                    f"{layer['input_exponent']} shifts by more than {MAX_BIAS_SHIFT} bits"
                )
            rows.append(row)
            result = Tensor(out, e_b)
        elif kind == "relu":
            result = x
        elif kind == "clip":
            _clip_bound(check, f"{where}.min", op.get("min"), x)
            _clip_bound(check, f"{where}.max", op.get("max"), x)
            result = x
        elif kind in ("maxpool", "sumpool"):
            result = Tensor(
                _pool(check, where, op, x.shape, needs_real=kind == "maxpool"),
                x.exponent,
                x.divisor,
            )
        elif kind == "sum":
            axes = check.ints(f"{where}.axes", op.get("axes"), lo=0)
            if len(set(axes)) != len(axes) or max(axes) >= len(x.shape):
                raise check.fail(f"{where}.axes {axes} do not fit the input {list(x.shape)}")
            kept = tuple(n for i, n in enumerate(x.shape) if i not in axes)
            result = Tensor(kept, x.exponent, x.divisor)
        elif kind == "div":
            by = check.int(f"{where}.by", op.get("by"), 1, 1 << 24)
            result = Tensor(
                x.shape, x.exponent, check.int(f"{where} divisor", x.divisor * by, 1, 1 << 31)
            )
        elif kind in ("add", "concat"):
            if len({t.divisor for t in ins}) != 1:
                raise check.fail(f"{where}: its inputs have different divisors")
            exponent = min(t.exponent for t in ins)
            if max(t.exponent for t in ins) - exponent > MAX_BIAS_SHIFT:
                raise check.fail(f"{where}: input exponents more than {MAX_BIAS_SHIFT} apart")
            if kind == "add":
                if ins[0].shape != ins[1].shape:
                    raise check.fail(f"{where}: shapes {[list(t.shape) for t in ins]} differ")
                out = x.shape
            else:
                axis = check.int(f"{where}.axis", op.get("axis"), 0, len(x.shape) - 1)
                rest = {t.shape[:axis] + t.shape[axis + 1 :] for t in ins}
                if len(rest) != 1 or any(len(t.shape) != len(x.shape) for t in ins):
                    raise check.fail(
                        f"{where}: shapes {[list(t.shape) for t in ins]} do not concatenate"
                    )
                out = x.shape[:axis] + (sum(t.shape[axis] for t in ins),) + x.shape[axis + 1 :]
            result = Tensor(out, exponent, x.divisor)
        else:  # reshape
            out = tuple(check.ints(f"{where}.shape", op.get("shape")))
            if math.prod(out) != math.prod(x.shape):
                raise check.fail(f"{where}: cannot reshape {list(x.shape)} to {list(out)}")
            result = Tensor(out, x.exponent, x.divisor)
        if math.prod(result.shape) > MAX_TENSOR_ELEMENTS:
            raise check.fail(
                f"{where}: its output {list(result.shape)} has over {MAX_TENSOR_ELEMENTS:,} "
                "elements per example"
            )
        tensors.append(result)
    if len(rows) != len(layers):
        raise check.fail(f"the ops visit {len(rows)} of {len(layers)} layers")
    output = check.dict("output", header["output"])
    index = check.int("output.tensor", output.get("tensor"), 1, len(tensors) - 1)
    if index != len(tensors) - 1:
        raise check.fail(f"output.tensor {index} is not the last op's ({len(tensors) - 1})")
    logits = tensors[index]
    stated = (
        check.int("output.exponent", output.get("exponent")),
        check.int("output.divisor", output.get("divisor")),
    )
    if stated != (logits.exponent, logits.divisor):
        raise check.fail(
            f"output exponent / divisor {output.get('exponent')!r} / {output.get('divisor')!r} "
            f"disagree with the graph's {logits.exponent} / {logits.divisor}"
        )
    ranges, matters = prove_ranges(check, header, arrays, tensors)
    facts = Validated(tuple(tensors), tuple(rows), tuple(ranges), INPUT_RANGE if matters else None)
    _check_layer_claims(check, header, arrays)
    _check_totals(check, header, facts)
    _check_certificate(check, header, facts)
    return facts


# --------------------------------------------------------------------------- proofs and claims


def _beyond_int64(lo: int, hi: int) -> bool:
    return lo < INT64_MIN or hi > INT64_MAX


def _requantize_fits(check: _Checker, where: str, layer: dict, x: Tensor) -> None:
    """The engine's requantize intermediates of a divided tensor fit int64 (C's too)."""
    levels, k = layer["input_levels"], x.divisor
    shift = x.exponent - layer["input_exponent"]
    if k == 1:
        return  # clipped before any left shift; a right shift cannot overflow
    needed = ((levels + 1) * k) << shift if shift > 0 else 2 * (k << -shift)
    if needed > INT64_MAX:
        raise check.fail(
            f"{where}: requantizing its input (divisor {k}, shift {shift}) needs integers up "
            f"to {needed:,}, beyond int64 ({INT64_MAX:,})"
        )


def _channel_sums(kernel: np.ndarray, levels: int) -> tuple[list[int], list[int]]:
    """Per output channel: the sums of the positive and of the negative weight codes."""
    flat = kernel.reshape(-1, kernel.shape[-1])
    wide = levels * max(flat.shape[0], 1) >= 1 << 62
    flat = flat.astype(object if wide else np.int64)
    pos = np.where(flat > 0, flat, 0).sum(axis=0)
    neg = np.where(flat < 0, flat, 0).sum(axis=0)
    return [int(v) for v in pos], [int(v) for v in neg]


def _layer_range(check: _Checker, index: int, layer: dict, x: Tensor, arrays) -> tuple[int, int]:
    """The exact worst-case output range of a layer over every input, every step in int64.

    Per channel: the accumulator ``sum(w * code)`` lies in ``[P * lo + N * n, P * n + N * lo]``
    (``P``, ``N`` the sums of its positive and negative weight codes, codes in ``[lo, n]``),
    and so does every partial sum; then ``acc << (e_acc - e_b)`` and ``+ bias``.
    """
    where = f"layer {index} ({layer['name']})"
    _requantize_fits(check, where, layer, x)
    levels = layer["input_levels"]
    lo_code = -levels if layer["input_signed"] else 0
    kernel, bias = arrays[layer["weight_key"]], arrays[layer["bias_key"]]
    cout = kernel.shape[-1]
    n_w = np.atleast_1d(layer["weight_levels"])
    pos, neg = _channel_sums(kernel, int(n_w.max()))
    accumulators = np.broadcast_to(np.asarray(layer["accumulator_exponent"]), (cout,))
    lows, highs = [], []
    for c in range(cout):
        shift = int(accumulators[c]) - layer["bias_exponent"]
        acc = (pos[c] * lo_code + neg[c] * levels, pos[c] * levels + neg[c] * lo_code)
        shifted = (acc[0] << shift, acc[1] << shift)
        for what, (lo, hi) in (("accumulator", acc), (f"accumulator << {shift}", shifted)):
            if _beyond_int64(lo, hi):
                raise check.fail(
                    f"{where}: its {what} may reach {max(-lo, hi):,} in magnitude (channel "
                    f"{c}), beyond int64 ({INT64_MAX:,}), the engine's and C's integer type"
                )
        lows.append(shifted[0] + int(bias[c]))
        highs.append(shifted[1] + int(bias[c]))
    return min(lows, default=0), max(highs, default=0)


def _clip_range(op: dict, x: Tensor, lo: int, hi: int) -> tuple[int, int]:
    bounds = []
    for bound in (op["min"], op["max"]):
        if bound is None:
            bounds.append(None)
            continue
        scaled, shift = bound[0] * x.divisor, bound[1] - x.exponent
        bounds.append(scaled << shift if shift >= 0 else scaled >> -shift)

    def clip(v: int) -> int:  # numpy's clip: min(max(v, low), high)
        v = v if bounds[0] is None else max(v, bounds[0])
        return v if bounds[1] is None else min(v, bounds[1])

    return clip(lo), clip(hi)


def _aligned(check: _Checker, where: str, op: dict, tensors, ranges, out: Tensor) -> list:
    """The ranges of an add's or concat's inputs shifted to the output exponent."""
    shifted = []
    for i in op["inputs"]:
        s = tensors[i].exponent - out.exponent
        lo, hi = ranges[i][0] << s, ranges[i][1] << s
        if _beyond_int64(lo, hi):
            raise check.fail(f"{where}: input {i} shifted by {s} bits is beyond int64")
        shifted.append((lo, hi))
    return shifted


def prove_ranges(
    check: _Checker, header: dict, arrays, tensors
) -> tuple[list[tuple[int, int]], bool]:
    """Every tensor's exact worst-case value range, in Python integers; a graph any of whose
    values (or the intermediates that compute them) can leave int64 is refused.

    The network input is assumed in :data:`INPUT_RANGE`; the ranges hold for every input
    there. Ops as in :mod:`cgmq_jax.export.engine` (and the C emitter, which proves the
    same ranges for its input type).

    Returns the ranges and whether any of them depends on the input's range: only when a
    sum, pool, add or concat reads the input (through reshapes, max-pools, ReLUs, clips and
    divisions); a quantizer saturates any int64 input exactly.
    """
    ranges = [INPUT_RANGE]
    raw = [True]  # the tensor holds the input's values as they are (or a pool's, a clip's)
    matters = False
    for j, op in enumerate(header["ops"]):
        kind, where = op["op"], f"op {j} ({op['op']})"
        first, out = op["inputs"][0], tensors[j + 1]
        lo, hi = ranges[first]
        widening = kind in ("sumpool", "sum", "add", "concat")
        matters = matters or (widening and any(raw[i] for i in op["inputs"]))
        raw.append(kind not in LAYER_OPS and not widening and raw[first])
        if kind in LAYER_OPS:
            lo, hi = _layer_range(check, op["layer"], header["layers"][op["layer"]],
                                  tensors[first], arrays)  # fmt: skip
        elif kind == "relu":
            lo, hi = max(lo, 0), max(hi, 0)
        elif kind == "clip":
            lo, hi = _clip_range(op, tensors[first], lo, hi)
        elif kind == "sumpool":  # padding adds zeros
            n = math.prod(op["window"])
            lo, hi = min(lo, 0) * n, max(hi, 0) * n
        elif kind == "sum":
            n = math.prod(tensors[first].shape[a] for a in op["axes"])
            lo, hi = lo * n, hi * n
        elif kind in ("add", "concat"):
            shifted = _aligned(check, where, op, tensors, ranges, out)
            if kind == "add":
                lo, hi = sum(r[0] for r in shifted), sum(r[1] for r in shifted)
            else:
                lo, hi = min(r[0] for r in shifted), max(r[1] for r in shifted)
        if _beyond_int64(lo, hi):  # maxpool, div and reshape keep their input's range
            raise check.fail(
                f"{where}: its values may reach [{lo:,}, {hi:,}], beyond int64 "
                f"([{INT64_MIN:,}, {INT64_MAX:,}]), the engine's and C's integer type"
            )
        ranges.append((lo, hi))
    return ranges, matters


def _check_layer_claims(check: _Checker, header: dict, arrays) -> None:
    """The layer fields no computation reads: each a supported value that agrees with the
    file (``kernel_layout``, ``*_dtype``, ``bias_rounding`` and ``bias_scheme``)."""
    scheme = header.get("bias_scheme")
    for i, layer in enumerate(header["layers"]):
        where = f"layer {i} ({layer['name']})"
        layout = layer.get("kernel_layout", KERNEL_LAYOUTS[layer["kind"]])
        if layout != KERNEL_LAYOUTS[layer["kind"]]:
            raise check.fail(f"{where}.kernel_layout {layout!r} is not a {layer['kind']}'s")
        for field, key in (("weight_dtype", "weight_key"), ("bias_dtype", "bias_key")):
            stored = arrays[layer[key]].dtype.name
            if layer.get(field, stored) != stored:
                raise check.fail(f"{where}.{field} {layer[field]!r}, the array is {stored}")
        rounding = layer.get("bias_rounding")
        if scheme is not None and rounding not in (None, BIAS_ROUNDING[scheme]):
            raise check.fail(f"{where}.bias_rounding {rounding!r} with bias_scheme {scheme!r}")
        accumulators = np.atleast_1d(layer["accumulator_exponent"])
        if scheme == "accumulator" and layer["bias_exponent"] != int(accumulators.min()):
            raise check.fail(f"{where}: bias_exponent is not the accumulator's (bias_scheme)")
        check.int(f"{where}.output_bits", layer["output_bits"], 2, 64)
        error = layer.get("bias_rounding_max_abs_error", 0)
        if error < 0:
            raise check.fail(f"{where}.bias_rounding_max_abs_error {error} is negative")


def _recount(facts: Validated) -> dict[str, int]:
    return {
        "bops": sum(row.bops for row in facts.rows),
        "weight_memory_bits": facts.weight_memory_bits,
        "activation_bits": facts.activation_bits,
    }


def stated_limits(certificate: dict) -> dict[str, float]:
    """``{cost name: limit}`` of a certificate: its ``limits``, else ``{"bops": budget_bops}``
    (empty without a budget)."""
    if certificate.get("limits") is not None:
        return {name: entry["limit"] for name, entry in certificate["limits"].items()}
    budget = certificate.get("budget_bops")
    return {} if budget is None else {"bops": budget}


def _check_certificate(check: _Checker, header: dict, facts: Validated) -> None:
    """The certificate's verdicts recomputed from the recount: every limit positive,
    ``budget_bops`` the BOP limit, each ``within`` and ``within_budget`` what the recounted
    costs give against the limits. (Its costs are compared by :func:`count_bops`.)"""
    certificate = header.get("certificate")
    if certificate is None:
        return
    limits = stated_limits(certificate)
    for name, limit in limits.items():
        if not limit > 0:
            raise check.fail(f"certificate limit {name} = {limit!r} is not a positive number")
    budget = certificate.get("budget_bops")
    if certificate.get("limits") is not None and budget != limits.get("bops"):
        raise check.fail(
            f"certificate.budget_bops {budget!r} is not its BOP limit {limits.get('bops')!r}"
        )
    recount = _recount(facts)
    verdicts = {name: recount[name] <= limit for name, limit in limits.items()}
    for name, entry in (certificate.get("limits") or {}).items():
        if entry.get("within", verdicts[name]) != verdicts[name]:
            raise check.fail(
                f"certificate.limits.{name}.within is {entry['within']}, the recount "
                f"{recount[name]:,} against {limits[name]!r} gives {verdicts[name]}"
            )
    verdict = bool(limits) and all(verdicts.values())
    if certificate.get("within_budget", verdict) != verdict:
        raise check.fail(
            f"certificate.within_budget is {certificate['within_budget']}, the recount "
            f"{recount} against the limits {limits} gives {verdict}"
        )


def _check_totals(check: _Checker, header: dict, facts: Validated) -> None:
    """The header's ``macs`` and ``bops``, when stated, equal the recount."""
    totals = {"macs": sum(row.macs for row in facts.rows), "bops": _recount(facts)["bops"]}
    for name, total in totals.items():
        if header.get(name, total) != total:
            unit = "BOPs" if name == "bops" else "MACs"
            raise check.fail(f"header states {header[name]} {unit}, its layers give {total}")


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
    SHA-256, and the payload SHA-256; then the graph (:func:`validate`): shapes, exponents
    and divisors are followed from ``input`` through every op, each layer's
    ``input_shape`` must be the shape the graph brings it, its ``output_shape`` and
    ``macs`` those its kernel and geometry give, every exponent an integer, its bit-widths
    those of its levels and its weight codes within them.

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
        facts = validate(path, header, arrays)
    except ExportError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError, OverflowError) as error:
        raise _fail(path, f"malformed header ({type(error).__name__}: {error})") from None
    return IntegerModel(path=path, header=header, arrays=arrays, facts=facts)


def count_bops(path: str | os.PathLike | IntegerModel) -> dict:
    """Recount MACs, BOPs and memory from the file alone (shapes, geometry, levels).

    Per layer: MACs from shapes (conv: output positions x output channels x kernel window x
    input channels / groups; dense: output elements x inputs), bit-widths from the
    quantizer levels (``bit_length(n)``, +1 signed), ``BOPs = MACs * b_w * b_in``;
    weight memory ``sum(#weights * b_w + #biases * bias_bits)`` and activation memory
    ``max(#input elements * b_in)``, in bits. Compares with the trainer's certificate.

    Returns:
      ``{"layers": [{layer, kind, macs, weight_bits, input_bits, bops}], "macs", "bops",
      "weight_memory_bits", "activation_bits", "certificate_bops", "budget_bops",
      "matches_certificate", "within_budget"}``; the last four are ``None`` when the file
      carries no certificate. ``matches_certificate`` needs the totals equal and, when the
      certificate lists its layers, every layer's name, MACs, bit-widths and BOPs equal too.

    Raises:
      ExportError: an unreadable file, or a header that contradicts itself.
    """
    model = path if isinstance(path, IntegerModel) else load(path)
    rows = [row.as_dict() for row in model.facts.rows]
    recount = _recount(model.facts)
    total = recount["bops"]
    _check_totals(_Checker(model.path), model.header, model.facts)
    certificate = model.header.get("certificate") or {}
    certified = certificate.get("bops")
    budget = certificate.get("budget_bops")
    limits = stated_limits(certificate)
    matches = None if certified is None else total == certified
    for name, entry in (certificate.get("limits") or {}).items():
        if matches and entry["cost"] != recount[name]:
            matches = False
    if matches and certificate.get("layers") is not None:
        keys = ("layer", "macs", "weight_bits", "input_bits", "bops")
        ours = [tuple(row[k] for k in keys) for row in rows]
        matches = ours == [tuple(row.get(k) for k in keys) for row in certificate["layers"]]
    for name, ours in (
        ("weight_memory_bits", model.facts.weight_memory_bits),
        ("activation_bits", model.facts.activation_bits),
    ):  # certificates that state a memory cost must agree with the file's
        if matches and _is_int(certificate.get(name)) and certificate[name] != ours:
            matches = False
    return {
        "layers": rows,
        "macs": sum(row["macs"] for row in rows),
        "bops": total,
        "weight_memory_bits": model.facts.weight_memory_bits,
        "activation_bits": model.facts.activation_bits,
        "certificate_limits": certificate.get("limits"),
        "certificate_bops": certified,
        "budget_bops": budget,
        "matches_certificate": matches,
        # from the recount against the limits, never from the file's claim
        "within_budget": None if not limits else all(recount[n] <= v for n, v in limits.items()),
    }


def save(path: str | os.PathLike, header: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``header`` and integer ``arrays`` as a ``cgmq-int-npz`` file, atomically.

    Fills in ``format``, ``version``, the ``arrays`` table (dtype, shape, SHA-256 of each
    little-endian array), ``payload_sha256`` and ``header.sha256``; checks the header and
    arrays through :func:`validate` first, so a header that contradicts itself is never
    written.
    """
    le = {
        key: np.ascontiguousarray(value.astype(value.dtype.newbyteorder("<")))
        for key, value in arrays.items()
    }
    header = {"format": FORMAT, "version": VERSION, **header}
    header["arrays"] = {
        key: {
            "dtype": value.dtype.str,
            "shape": list(value.shape),
            "sha256": _sha256(_as_bytes(value)),
        }
        for key, value in le.items()
    }
    header["payload_sha256"] = _sha256(b"".join(_as_bytes(value) for value in le.values()))
    check = _Checker(Path(path))
    total = sum(value.nbytes for value in le.values())
    if total > MAX_TOTAL_BYTES or any(value.size > MAX_ARRAY_ELEMENTS for value in le.values()):
        raise check.fail(
            f"the arrays hold {total:,} bytes, over the reader's caps ({MAX_TOTAL_BYTES:,} "
            f"bytes, {MAX_ARRAY_ELEMENTS:,} elements an array)"
        )
    try:
        header_bytes = json.dumps(header, indent=1, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise check.fail(f"the header is not JSON: {error}") from None
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise check.fail(f"the header has {len(header_bytes):,} bytes, over {MAX_HEADER_BYTES:,}")
    # what load will read, checked as load checks it: a file load refuses is never written
    validate(path, _parse_header(check, header_bytes), le)
    from cgmq_jax import files  # standard library only

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
