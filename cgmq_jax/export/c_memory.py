"""Where the C emitter puts things: the packed weight bit stream, tensor liveness, the
static buffers (unions reused across ops) and each tensor's proven value range and type.

Part of :mod:`cgmq_jax.export.c`: :class:`_Memory` is the base of the op emitter
(:mod:`cgmq_jax.export.c_ops`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cgmq_jax.export.c_text import INT64_MAX, INT64_MIN
from cgmq_jax.export.format import IntegerModel

#: Signed storage types, narrowest first: (C type, union member, bytes).
_CTYPES = (("int8_t", "i8", 1), ("int16_t", "i16", 2), ("int32_t", "i32", 4), ("int64_t", "i64", 8))


def _needed(ops: list[dict], out: int) -> list[bool]:
    """Which tensors the output depends on."""
    needed = [False] * (len(ops) + 1)
    needed[out] = True
    for j in range(len(ops) - 1, -1, -1):
        if needed[j + 1]:
            for t in ops[j]["inputs"]:
                needed[t] = True
    return needed


def _ctype_for(lo: int, hi: int) -> int:
    """Index in :data:`_CTYPES` of the narrowest signed type holding ``[lo, hi]``."""
    for index, (_, _, size) in enumerate(_CTYPES):
        if -(1 << (8 * size - 1)) <= lo and hi < (1 << (8 * size - 1)):
            return index
    return len(_CTYPES) - 1


def _bits(values: np.ndarray, width: int) -> np.ndarray:
    """The ``width``-bit two's-complement codes of ``values``, LSB first, as 0/1 bytes."""
    u = np.asarray(values, np.int64).ravel().view(np.uint64)
    if width < 64:
        u = u & np.uint64((1 << width) - 1)
    shifts = np.arange(width, dtype=np.uint64)
    return ((u[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).ravel()


@dataclasses.dataclass
class _Slot:
    """One static buffer: a union of typed arrays, ``size`` bytes (a multiple of 8)."""

    size: int = 0
    members: set = dataclasses.field(default_factory=set)
    free: bool = False


@dataclasses.dataclass
class _Storage:
    """Where tensors live: the input pointer (``slot is None``) or a slot, with one C type."""

    slot: int | None
    ctype: int  # index into _CTYPES; -1 for the input (its own type)
    tensors: list = dataclasses.field(default_factory=list)


class _Memory:
    """The packed weights, liveness, buffers and value ranges of one model's C code.

    Args:
      model: the validated model.
      prefix: the C identifier prefix.
      input_kind: the C input type (:func:`cgmq_jax.export.c.input_type`).
      input_range: every value that C type holds (the input tensor's range).
    """

    def __init__(self, model: IntegerModel, prefix: str, input_kind, input_range: tuple):
        self.model = model
        self.p = prefix
        self.P = prefix.upper()
        self.header = model.header
        self.facts = model.facts.tensors
        self.ops = model.header["ops"]
        self.slots: list[_Slot] = []
        self.storages: list[_Storage] = [_Storage(None, -1, [0])]
        self.storage_of: dict[int, int] = {0: 0}
        self.input = input_kind
        self.ranges: dict[int, tuple[int, int]] = {0: tuple(input_range)}  # all the C type holds
        self.tables: list[str] = []
        self.warnings: list[str] = []
        self.helpers: set[str] = set()
        for t, tensor in enumerate(self.facts):
            if math.prod(tensor.shape) >= 1 << 31:
                raise ValueError(
                    f"{model.path}: tensor {t} {list(tensor.shape)} is too large for int32 indices"
                )
        self._pack()
        self._liveness()

    # ---- weights

    def _pack(self) -> None:
        """Pack every layer's weights (channel-major) and biases into one bit stream."""
        chunks, offset = [], 0
        self.packing = []
        for index, row in enumerate(self.model.facts.rows):
            kernel = np.asarray(self.model.weight(index), np.int64)
            cout = kernel.shape[-1]
            per_channel = kernel.reshape(-1, cout).T  # (cout, fan-in): channel-major
            widths = row.weight_bits
            widths = widths if isinstance(widths, tuple) else (widths,) * cout
            offsets = []
            for channel, width in enumerate(widths):
                offsets.append(offset)
                chunks.append(_bits(per_channel[channel], width))
                offset += per_channel.shape[1] * width
            bias_offset = offset
            chunks.append(_bits(self.model.bias(index), row.bias_bits))
            offset += cout * row.bias_bits
            self.packing.append(
                dict(
                    widths=widths,
                    offsets=offsets,
                    bias_offset=bias_offset,
                    fan_in=per_channel.shape[1],
                )
            )
        self.weight_bits = offset
        if offset >= 1 << 32:
            raise ValueError(f"{self.model.path}: {offset} weight bits do not fit 32-bit offsets")
        bits = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
        self.packed = np.packbits(bits, bitorder="little")
        if offset != self.model.facts.weight_memory_bits:
            raise AssertionError("packed bits differ from the validated weight memory")

    # ---- liveness and value ranges

    def _liveness(self) -> None:
        n_ops = len(self.ops)
        out = self.header["output"]["tensor"]
        needed = self.needed = _needed(self.ops, out)
        last = [-1] * (n_ops + 1)
        for j, op in enumerate(self.ops):
            if needed[j + 1]:
                for t in op["inputs"]:
                    last[t] = j
        last[out] = n_ops  # copied into the logits at the end
        self.last = last

    def _storage_last(self, s: int) -> int:
        return max(self.last[t] for t in self.storages[s].tensors)

    # ---- buffers

    def _alloc(self, nbytes: int, ctype: int) -> int:
        nbytes = max(8, -(-nbytes // 8) * 8)
        free = [i for i, slot in enumerate(self.slots) if slot.free]
        fitting = [i for i in free if self.slots[i].size >= nbytes]
        if fitting:
            index = min(fitting, key=lambda i: self.slots[i].size)
        elif free:
            index = max(free, key=lambda i: self.slots[i].size)
        else:
            self.slots.append(_Slot())
            index = len(self.slots) - 1
        slot = self.slots[index]
        slot.size = max(slot.size, nbytes)
        slot.members.add(ctype)
        slot.free = False
        return index

    def _new_storage(self, t: int, ctype: int) -> int:
        elements = math.prod(self.facts[t].shape)
        slot = self._alloc(elements * _CTYPES[ctype][2], ctype)
        self.storages.append(_Storage(slot, ctype, [t]))
        self.storage_of[t] = len(self.storages) - 1
        return self.storage_of[t]

    def _join(self, t: int, s: int) -> None:
        self.storages[s].tensors.append(t)
        self.storage_of[t] = s

    def _dies_at(self, t: int, j: int) -> bool:
        s = self.storage_of[t]
        return self.storages[s].slot is not None and self._storage_last(s) <= j

    def _array(self, t: int) -> str:
        storage = self.storages[self.storage_of[t]]
        if storage.slot is None:
            return "input"
        return f"{self.p}_buf{storage.slot}.{_CTYPES[storage.ctype][1]}"

    def _ctype(self, t: int) -> str:
        storage = self.storages[self.storage_of[t]]
        return self.input.ctype if storage.slot is None else _CTYPES[storage.ctype][0]

    def _read(self, t: int, index: str) -> str:
        return f"(int64_t){self._array(t)}[{index}]"

    def _write(self, t: int, index: str, value: str) -> str:
        return f"{self._array(t)}[{index}] = ({self._ctype(t)})({value});"

    # ---- value ranges and in-place results

    def _set_range(self, t: int, lo: int, hi: int) -> int:
        """Record tensor ``t``'s proven range; returns the index of its C storage type."""
        self.ranges[t] = (lo, hi)
        if lo < INT64_MIN or hi > INT64_MAX:
            self.warnings.append(
                f"tensor {t} may reach [{lo}, {hi}], beyond int64: it can overflow "
                "(so can the engine)"
            )
        return _ctype_for(lo, hi)

    def _elementwise_inplace(self, j: int, t: int, candidates: list[int], ctype: int) -> bool:
        """Put tensor ``t`` into a dying input's storage if its type holds ``t``'s values."""
        for c in candidates:
            s = self.storage_of[c]
            if self._dies_at(c, j) and self.storages[s].ctype >= ctype:
                self._join(t, s)
                return True
        return False
