"""The ``cgmq-int-npz`` format's shared pieces: its constants, its error, the records the
reader recomputes (:class:`LayerRow`, :class:`Tensor`, :class:`Validated`,
:class:`IntegerModel`), the reader's caps, and the checker every part of the reader uses.

A leaf module (numpy and the standard library only); :mod:`cgmq_jax.export.format`
re-exports every public name, and is where users import them from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
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
    """The bit-width of a quantizer with ``levels`` positive levels (docs/method.md section 1).

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
    # A pruned layer's MACs and kernel elements per live output channel (its tuple of
    # weight bits then holds 0 for each removed channel); None: macs / weights per entry.
    channel_macs: int | None = None
    channel_weights: int | None = None

    @property
    def bops(self) -> int:
        """``MACs * b_w * b_in`` (per channel: each channel's MACs at its own bits)."""
        if isinstance(self.weight_bits, tuple):
            per = self.channel_macs
            per = self.macs // len(self.weight_bits) if per is None else per
            return per * sum(self.weight_bits) * self.input_bits
        return self.macs * self.weight_bits * self.input_bits

    @property
    def weight_memory_bits(self) -> int:
        """Kernel codes at their bit-width(s) plus the bias at its stored width."""
        if isinstance(self.weight_bits, tuple):
            per = self.channel_weights
            per = self.weights // len(self.weight_bits) if per is None else per
            return per * sum(self.weight_bits) + self.biases * self.bias_bits
        return self.weights * self.weight_bits + self.biases * self.bias_bits

    @property
    def activation_bits(self) -> int:
        """The layer's quantized input, per example, in bits."""
        return self.input_elements * self.input_bits

    def as_dict(self) -> dict:
        """The row as a JSON-ready dict: layer, kind (if known), MACs, bits and BOPs
        (per-channel weight bits as a list)."""
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
        """Every layer's kernel codes and biases together, in bits (sum of the rows)."""
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
        """The header's op records, in the order the engine runs them."""
        return self.header["ops"]

    def weight(self, index: int) -> np.ndarray:
        """Integer weight codes of layer ``index``."""
        return self.arrays[self.layers[index]["weight_key"]]

    def bias(self, index: int) -> np.ndarray:
        """Integer bias of layer ``index`` (at exponent ``bias_exponent``)."""
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

# --------------------------------------------------------------------------- int64

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


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
