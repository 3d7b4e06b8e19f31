"""C99 emitter: a ``cgmq-int-npz`` model as self-contained, integer-only C for a device.

:func:`emit_c` writes three files into a directory:

* ``model.h``: the API (``<prefix>_logits``, ``<prefix>_predict``) and ``#define``s of the
  model's sizes and costs, with a comment naming the source file, its payload SHA-256 and
  the per-layer table;
* ``model.c``: C99 that includes only ``<stdint.h>`` and ``<string.h>``, has no floating
  point and no ``malloc``. All weights and biases of all layers are packed into one
  ``static const uint8_t`` bit stream, each code at its own bit-width (two's complement,
  LSB first), so the array holds exactly ``model.facts.weight_memory_bits`` bits (rounded
  up to a byte). Activations live in a few static buffers (``union``s of int8/16/32/64
  arrays) that are reused across ops by liveness; each tensor is stored in the narrowest
  signed type its proven value range allows (from the actual integer weights and biases).
  The code is straight-line, one loop nest per op, with every constant baked in, and is
  bit-identical to :func:`cgmq_jax.export.engine.run_integer`;
* ``main.c``: a test harness: ``./a.out N < inputs > logits`` reads ``N`` examples of
  ``<PREFIX>_INPUT_SIZE`` bytes from stdin and writes each example's logits as
  little-endian int64 (``./a.out N predict`` writes int32 class indices instead).
  :func:`compile_and_run` compiles and runs it.

The C input is one example (row-major, channels last) of integers at
``header["input"]["exponent"]`` in the narrowest C type that holds every input value the
model tells apart (:func:`input_type`): the first quantizers' signedness and range decide,
so MNIST's raw pixels are ``uint8_t`` and a model with a signed input quantizer takes
``int8_t`` (or wider). Values beyond ``<PREFIX>_INPUT_MIN .. <PREFIX>_INPUT_MAX`` give the
output of the nearer bound (the quantizer saturates them).

The generated code is not reentrant (static buffers). Integer overflow is not checked at
run time: the value ranges are proven at emit time, and a model whose proven range does not
fit int64 (where the numpy engine would wrap around too) gets a warning in ``model.c``.

This module imports numpy, the standard library and :mod:`cgmq_jax.export.format` only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from cgmq_jax.export.format import LAYER_OPS, IntegerModel, load

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
#: The flags :func:`compile_and_run` compiles with (the generated code is clean under them).
CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Werror")
#: Signed storage types, narrowest first: (C type, union member, bytes).
_CTYPES = (("int8_t", "i8", 1), ("int16_t", "i16", 2), ("int32_t", "i32", 4), ("int64_t", "i64", 8))
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
#: Input types, narrowest first: (C type, numpy dtype, smallest value, largest value).
_INPUT_TYPES = tuple(
    (f"{'u' if unsigned else ''}int{bits}_t", f"{'u' if unsigned else ''}int{bits}", lo, hi)
    for bits, unsigned in ((8, 1), (8, 0), (16, 1), (16, 0), (32, 1), (32, 0), (64, 0))
    for lo, hi in [(0, (1 << bits) - 1) if unsigned else (-(1 << bits - 1), (1 << bits - 1) - 1)]
)
#: Ops that pass the network input on to a quantizer without widening what matters of it.
_SATURATING_OPS = ("reshape", "maxpool", "relu", "clip")


@dataclasses.dataclass(frozen=True)
class CProgram:
    """What :func:`emit_c` wrote, and the model's memory figures.

    Attributes:
      out_dir, header, source, harness: the directory and ``model.h``, ``model.c``, ``main.c``.
      weight_bits: packed weight + bias bits (``model.facts.weight_memory_bits``).
      weight_bytes: bytes of the packed constant array, ``ceil(weight_bits / 8)``.
      activation_bits: the certified "largest activation" (``model.facts.activation_bits``).
      buffer_bytes: RAM of the generated code's static scratch buffers, in bytes.
      input_size, num_outputs: elements of one input example and of the logits.
      prefix: the C identifier prefix.
    """

    out_dir: Path
    header: Path
    source: Path
    harness: Path
    weight_bits: int
    weight_bytes: int
    activation_bits: int
    buffer_bytes: int
    input_size: int
    num_outputs: int
    prefix: str = "cgmq"
    input: InputType | None = None  # None: uint8_t (a program built by hand)


@dataclasses.dataclass(frozen=True)
class InputType:
    """The C type of the network input (:func:`input_type`).

    Attributes:
      ctype, dtype: the C type and the numpy dtype of the same width and signedness.
      lo, hi: the input values the model tells apart; anything beyond gives the output of
        the nearer bound (the first quantizers saturate).
      reason: why, in words.
    """

    ctype: str
    dtype: str
    lo: int
    hi: int
    reason: str


UINT8_INPUT = InputType("uint8_t", "uint8", 0, 255, "8-bit pixels")


def _needed(ops: list[dict], out: int) -> list[bool]:
    """Which tensors the output depends on."""
    needed = [False] * (len(ops) + 1)
    needed[out] = True
    for j in range(len(ops) - 1, -1, -1):
        if needed[j + 1]:
            for t in ops[j]["inputs"]:
                needed[t] = True
    return needed


def _raw_range(layer: dict, exponent: int) -> tuple[int, int]:
    """The input values at ``2**exponent`` that layer's quantizer maps to distinct codes."""
    levels, shift = int(layer["input_levels"]), int(layer["input_exponent"]) - exponent
    hi = levels << shift if shift >= 0 else -(-levels >> -shift)
    return (-hi if layer["input_signed"] else 0), hi


def input_type(model: IntegerModel) -> InputType:
    """The C input type of ``model``: it follows the quantizers that read the input.

    The input's values matter only up to where the quantizers that read it (directly, or
    through reshapes, max-pools, ReLUs and clips) saturate; the type is the narrowest that
    holds that range: ``uint8_t`` for MNIST's pixels, ``int8_t`` for a signed 8-bit input
    quantizer at the input's exponent, wider where the quantizer is. An input that feeds
    anything else (a sum, an average, an add) matters at every value: ``int32_t``, the
    range over which :func:`cgmq_jax.export.format.load` proved the accumulators exact.
    """
    ops, exponent = model.header["ops"], model.facts.tensors[0].exponent
    needed = _needed(ops, model.header["output"]["tensor"])
    lo = hi = 0
    readers, frontier, seen = [], [0], {0}
    while frontier:
        t = frontier.pop()
        for j, op in enumerate(ops):
            if t not in op["inputs"] or not needed[j + 1]:
                continue
            if op["op"] in LAYER_OPS:
                low, high = _raw_range(model.layers[op["layer"]], exponent)
                lo, hi = min(lo, low), max(hi, high)
                readers.append(model.layers[op["layer"]]["name"])
            elif op["op"] in _SATURATING_OPS and op["inputs"] == [t]:
                if j + 1 not in seen:
                    seen.add(j + 1)
                    frontier.append(j + 1)
            else:  # every value matters; the validator proved ranges for int32 inputs
                low, high = model.facts.input_range or (INT64_MIN, INT64_MAX)
                ctype = "int32_t" if model.facts.input_range else "int64_t"
                why = f"the input feeds op {j} ({op['op']}): every value in {ctype} matters"
                return InputType(ctype, ctype.removesuffix("_t"), low, high, why)
    why = f"the input quantizer{'s' if len(readers) > 1 else ''} of {', '.join(readers)}"
    for ctype, dtype, low, high in _INPUT_TYPES:
        if low <= lo and hi <= high:
            return InputType(ctype, dtype, lo, hi, why or "the input is not read")
    return InputType("int64_t", "int64", max(lo, INT64_MIN), min(hi, INT64_MAX), why)


# --------------------------------------------------------------------------- helpers


def _ctype_for(lo: int, hi: int) -> int:
    """Index in :data:`_CTYPES` of the narrowest signed type holding ``[lo, hi]``."""
    for index, (_, _, size) in enumerate(_CTYPES):
        if -(1 << (8 * size - 1)) <= lo and hi < (1 << (8 * size - 1)):
            return index
    return len(_CTYPES) - 1


def _limit(value: int) -> str:
    """A bound for a ``#define``: parenthesised, ``INT64_MIN`` / ``INT64_MAX`` at the ends."""
    return {INT64_MIN: "INT64_MIN", INT64_MAX: "INT64_MAX"}.get(value, f"({value})")


def _lit(value: int) -> str:
    """An int64 C literal."""
    if value == INT64_MIN:
        return "INT64_MIN"
    return f"INT64_C({value})"


def _index(names: list[str], shape: tuple[int, ...] | list[int]) -> str:
    """C-order linear index of the multi-index ``names`` in ``shape`` (Horner form)."""
    expr = names[0]
    for name, size in zip(names[1:], shape[1:], strict=True):
        expr = f"{_mul(expr, size)} + {name}"
    return expr


def _mul(expr: str, factor: int) -> str:
    """``expr * factor`` in C, parenthesised where needed; ``expr`` itself for 1."""
    if factor == 1:
        return expr
    return f"({expr}) * {factor}" if any(c in expr for c in "+-*") else f"{expr} * {factor}"


def _comment(text: str) -> str:
    """Text safe inside a C block comment (no ``*/``, printable ASCII only)."""
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in str(text))
    return text.replace("*/", "* /").replace("/*", "/ *")


def _bits(values: np.ndarray, width: int) -> np.ndarray:
    """The ``width``-bit two's-complement codes of ``values``, LSB first, as 0/1 bytes."""
    u = np.asarray(values, np.int64).ravel().view(np.uint64)
    if width < 64:
        u = u & np.uint64((1 << width) - 1)
    shifts = np.arange(width, dtype=np.uint64)
    return ((u[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).ravel()


class _Code:
    """Lines of C with indentation."""

    def __init__(self, indent: int = 1):
        self.lines: list[str] = []
        self.depth = indent

    def __call__(self, text: str) -> None:
        self.lines.append("    " * self.depth + text)

    def open(self, text: str) -> None:
        self(f"{text} {{" if text else "{")
        self.depth += 1

    def close(self, count: int = 1) -> None:
        for _ in range(count):
            self.depth -= 1
            self("}")


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


# --------------------------------------------------------------------------- the emitter


class _Emitter:
    def __init__(self, model: IntegerModel, prefix: str):
        self.model = model
        self.p = prefix
        self.P = prefix.upper()
        self.header = model.header
        self.facts = model.facts.tensors
        self.ops = model.header["ops"]
        self.slots: list[_Slot] = []
        self.storages: list[_Storage] = [_Storage(None, -1, [0])]
        self.storage_of: dict[int, int] = {0: 0}
        self.input = input_type(model)
        low, high = next((lo, hi) for c, _, lo, hi in _INPUT_TYPES if c == self.input.ctype)
        self.ranges: dict[int, tuple[int, int]] = {0: (low, high)}  # all the C type holds
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

    # ---- code

    def emit_body(self) -> list[str]:
        code = _Code()
        for j, op in enumerate(self.ops):
            kind = op["op"]
            t = j + 1
            if not self.needed[t]:
                code(f"/* op {j} ({kind}): its result is never used; skipped */")
                continue
            ins = op["inputs"]
            shape = self.facts[t].shape
            divisor = self.facts[t].divisor
            code(
                f"/* op {j}: {kind} of tensor{'s' if len(ins) > 1 else ''} "
                f"{', '.join(map(str, ins))} -> tensor {t} {list(shape)} at "
                f"2^{self.facts[t].exponent}{'' if divisor == 1 else f' / {divisor}'} */"
            )
            if kind in ("div", "reshape"):
                getattr(self, f"_op_{kind}")(code, j, op, t)
            else:
                code.open("")
                getattr(self, f"_op_{kind}")(code, j, op, t)
                code.close()
            # free what dies here
            for s in {self.storage_of[i] for i in ins} | {self.storage_of[t]}:
                storage = self.storages[s]
                if storage.slot is not None and self._storage_last(s) <= j:
                    self.slots[storage.slot].free = True
        out = self.header["output"]["tensor"]
        n_out = math.prod(self.facts[out].shape)
        code(f"/* the logits: tensor {out} */")
        code(f"for (int32_t i = 0; i < {n_out}; i++) logits[i] = {self._read(out, 'i')};")
        return code.lines

    def _set_range(self, t: int, lo: int, hi: int) -> int:
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

    # -- layers

    def _requantize(self, code: _Code, layer: dict, x: int) -> tuple[int, int]:
        """Emit ``v = requantize(v)`` for an int64 ``v``; returns the code range."""
        levels, signed = int(layer["input_levels"]), bool(layer["input_signed"])
        lo = -levels if signed else 0
        facts = self.facts[x]
        shift, k = facts.exponent - int(layer["input_exponent"]), facts.divisor
        if k == 1 and (shift <= -64 or (levels + 1) << max(shift, 0) > INT64_MAX):
            self.warnings.append(
                f"layer {layer['name']!r} requantizes by 2**{shift}: numpy's shifts of 64 bits or "
                "more make engine.run_integer inexact here; this code is exact"
            )
        clip = f"v = v < {_lit(lo)} ? {_lit(lo)} : (v > {_lit(levels)} ? {_lit(levels)} : v);"
        if k == 1 and shift > 0:  # v * 2**shift, clipped; exact without overflow
            top = levels >> shift
            low = _lit(lo)
            if top == 0:
                code(f"v = v > 0 ? {_lit(levels)} : (v < 0 ? {low} : 0);")
            else:
                code(f"if (v > {_lit(top)}) v = {_lit(levels)};")
                code(f"else if (v < {_lit(-top if signed else 0)}) v = {low};")
                code(f"else v = v * {_lit(1 << shift)};")
        elif k == 1 and shift == 0:
            code(clip)
        else:
            if shift > 0:
                bound = (levels + 1) * k
                if bound << shift > INT64_MAX:
                    raise ValueError(
                        f"{self.model.path}: layer {layer['name']!r}: requantizing a tensor with "
                        f"divisor {k} by 2**{shift} overflows int64 (so does the engine)"
                    )
                up, down = _lit(bound), _lit(-bound)
                code(f"v = v > {up} ? {up} : (v < {down} ? {down} : v);")
                code(f"v = {self.p}_rdiv(v * {_lit(1 << shift)}, UINT64_C({k}));")
            else:
                denominator = k << -shift
                if denominator >= 1 << 64:
                    code("v = 0; /* |v| / divisor < 1/2 */")
                else:
                    code(f"v = {self.p}_rdiv(v, UINT64_C({denominator}));")
            self.helpers.add("rdiv")
            code(clip)
        return lo, levels

    def _layer_common(self, code: _Code, j: int, op: dict, t: int):
        index = op["layer"]
        layer = self.model.layers[index]
        x = op["inputs"][0]
        n_in = math.prod(self.facts[x].shape)
        levels, signed = int(layer["input_levels"]), bool(layer["input_signed"])
        code_ctype = _ctype_for(-levels if signed else 0, levels)
        # the codes: in place when the input dies here (same type, or int8: a character type)
        s = self.storage_of[x]
        if self._dies_at(x, j) and (code_ctype == 0 or code_ctype == self.storages[s].ctype):
            codes_slot, own = self.storages[s].slot, False
            self.slots[codes_slot].members.add(code_ctype)
        else:
            codes_slot, own = self._alloc(n_in * _CTYPES[code_ctype][2], code_ctype), True
        codes = f"{self.p}_buf{codes_slot}.{_CTYPES[code_ctype][1]}"
        name = _comment(layer["name"])
        code(
            f"/* layer {index} ({name}): requantize to {layer['input_bits']}-bit "
            f"{'signed' if signed else 'unsigned'} codes at 2^{layer['input_exponent']} */"
        )
        code.open(f"for (int32_t n = 0; n < {n_in}; n++)")
        code(f"int64_t v = {self._read(x, 'n')};")
        self._requantize(code, layer, x)
        code(f"{codes}[n] = ({_CTYPES[code_ctype][0]})v;")
        code.close()
        # value range of the output, from the actual weights and biases
        pack = self.packing[index]
        kernel = np.asarray(self.model.weight(index), np.int64)
        cout = kernel.shape[-1]
        flat = kernel.reshape(-1, cout)
        pos = [int(v) for v in np.where(flat > 0, flat, 0).astype(object).sum(axis=0)]
        neg = [int(v) for v in np.where(flat < 0, flat, 0).astype(object).sum(axis=0)]
        lo_code = -levels if signed else 0
        acc = np.broadcast_to(np.asarray(layer["accumulator_exponent"]), (cout,))
        shifts = [int(a) - int(layer["bias_exponent"]) for a in acc]
        bias = [int(b) for b in self.model.bias(index)]
        terms = list(zip(pos, neg, shifts, bias, strict=True))
        his = [(p * levels + q * lo_code) * (1 << sh) + b for p, q, sh, b in terms]
        los = [(p * lo_code + q * levels) * (1 << sh) + b for p, q, sh, b in terms]
        ctype = self._set_range(t, min(los), max(his))
        self._new_storage(t, ctype)
        if own:
            self.slots[codes_slot].free = True  # after this op; the output slot is already taken
        per_channel = len(set(pack["widths"])) > 1  # else one width: no tables needed
        prefix = f"{self.p}_L{index}"
        if per_channel:
            offsets = ", ".join(f"{o}u" for o in pack["offsets"])
            widths = ", ".join(map(str, pack["widths"]))
            self.tables.append(f"static const uint32_t {prefix}_woff[{cout}] = {{{offsets}}};")
            self.tables.append(f"static const uint8_t {prefix}_wbits[{cout}] = {{{widths}}};")
        if len(set(shifts)) > 1:
            table = ", ".join(map(str, shifts))
            self.tables.append(f"static const uint8_t {prefix}_shift[{cout}] = {{{table}}};")
            shift_expr = f" * ((int64_t)1 << {prefix}_shift[co])"
        else:
            shift_expr = f" * {_lit(1 << shifts[0])}" if shifts[0] else ""
        fan_in = pack["fan_in"]
        if per_channel:
            wbase, width = f"{prefix}_woff[co]", f"(unsigned){prefix}_wbits[co]"
        else:
            w = pack["widths"][0]
            start = f"{pack['offsets'][0]}u + " if pack["offsets"][0] else ""
            wbase, width = f"{start}(uint32_t)co * {fan_in * w}u", f"{w}u"
        bias_bits = self.model.facts.rows[index].bias_bits
        bias = f"{self.p}_code({pack['bias_offset']}u + (uint32_t)co * {bias_bits}u, {bias_bits}u)"
        self.helpers.add("code")
        return layer, codes, cout, wbase, width, shift_expr, bias

    def _op_dense(self, code: _Code, j: int, op: dict, t: int) -> None:
        layer, codes, cout, wbase, width, shift_expr, bias = self._layer_common(code, j, op, t)
        x_shape = self.facts[op["inputs"][0]].shape
        n = x_shape[-1]
        positions = math.prod(x_shape[:-1])
        code(f"/* dense {n} -> {cout}, at {positions} position(s) */")
        code.open(f"for (int32_t p = 0; p < {positions}; p++)")
        code.open(f"for (int32_t co = 0; co < {cout}; co++)")
        code(f"const uint32_t wb = {wbase};")
        code(f"const int32_t xb = p * {n};")
        code("int64_t acc = 0;")
        weight = f"{self.p}_code(wb + (uint32_t)i * {width}, {width})"
        code(f"for (int32_t i = 0; i < {n}; i++) acc += (int64_t){codes}[xb + i] * {weight};")
        code(self._write(t, f"p * {cout} + co", f"acc{shift_expr} + {bias}"))
        code.close(2)

    def _op_conv(self, code: _Code, j: int, op: dict, t: int) -> None:
        layer, codes, cout, wbase, width, shift_expr, bias = self._layer_common(code, j, op, t)
        x_shape = self.facts[op["inputs"][0]].shape
        out_shape = self.facts[t].shape
        kernel_shape = self.model.weight(op["layer"]).shape
        rank = len(kernel_shape) - 2
        window, cin_g = kernel_shape[:rank], kernel_shape[-2]
        groups = int(layer["groups"])
        strides, pads = layer["strides"], [p[0] for p in layer["padding"]]
        rhs, lhs = layer["kernel_dilation"], layer["input_dilation"]
        code(
            f"/* conv window {list(window)}, strides {strides}, padding {layer['padding']}, "
            f"kernel dilation {rhs}, input dilation {lhs}, groups {groups} */"
        )
        outs = [f"o{a}" for a in range(rank)]
        for a in range(rank):
            code.open(f"for (int32_t o{a} = 0; o{a} < {out_shape[a]}; o{a}++)")
        code.open(f"for (int32_t co = 0; co < {cout}; co++)")
        code(f"const uint32_t wb = {wbase};")
        group_base = ""
        if groups > 1:
            code(f"const int32_t cb = (co / {cout // groups}) * {cin_g};")
            group_base = " + cb"
        code("int64_t acc = 0;")
        for a in range(rank):
            code.open(f"for (int32_t k{a} = 0; k{a} < {window[a]}; k{a}++)")
            position = f"{_mul(f'o{a}', strides[a])} + {_mul(f'k{a}', rhs[a])}" + (
                f" - {pads[a]}" if pads[a] else ""
            )
            code(f"const int32_t q{a} = {position};")
            checks = []
            if pads[a] > 0:
                checks.append(f"q{a} < 0")
            top = (x_shape[a] - 1) * lhs[a]
            if (out_shape[a] - 1) * strides[a] + (window[a] - 1) * rhs[a] - pads[a] > top:
                checks.append(f"q{a} > {top}")
            if lhs[a] > 1:
                checks.append(f"q{a} % {lhs[a]} != 0")
            if checks:
                code(f"if ({' || '.join(checks)}) continue;")
            code(f"const int32_t x{a} = q{a}{f' / {lhs[a]}' if lhs[a] > 1 else ''};")
        xs = [f"x{a}" for a in range(rank)]
        ks = [f"k{a}" for a in range(rank)]
        code(f"const int32_t xb = {_mul(_index(xs, x_shape[:-1]), x_shape[-1])}{group_base};")
        code(f"const uint32_t kb = wb + (uint32_t)({_mul(_index(ks, window), cin_g)}) * {width};")
        weight = f"{self.p}_code(kb + (uint32_t)ci * {width}, {width})"
        code(
            f"for (int32_t ci = 0; ci < {cin_g}; ci++) acc += (int64_t){codes}[xb + ci] * {weight};"
        )
        code.close(rank)
        out_index = f"{_mul(_index(outs, out_shape[:-1]), cout)} + co"
        code(self._write(t, out_index, f"acc{shift_expr} + {bias}"))
        code.close(rank + 1)

    # -- elementwise

    def _unary(
        self, code: _Code, j: int, op: dict, t: int, lo: int, hi: int, body: list[str]
    ) -> None:
        x = op["inputs"][0]
        ctype = self._set_range(t, lo, hi)
        if not self._elementwise_inplace(j, t, [x], ctype):
            self._new_storage(t, ctype)
        code.open(f"for (int32_t i = 0; i < {math.prod(self.facts[t].shape)}; i++)")
        code(f"int64_t v = {self._read(x, 'i')};")
        for line in body:
            code(line)
        code(self._write(t, "i", "v"))
        code.close()

    def _op_relu(self, code: _Code, j: int, op: dict, t: int) -> None:
        lo, hi = self.ranges[op["inputs"][0]]
        self._unary(code, j, op, t, max(lo, 0), max(hi, 0), ["if (v < 0) v = 0;"])

    def _op_clip(self, code: _Code, j: int, op: dict, t: int) -> None:
        x = op["inputs"][0]
        facts = self.facts[x]
        lo, hi = self.ranges[x]
        bounds = []
        for bound in (op["min"], op["max"]):
            if bound is None:
                bounds.append(None)
                continue
            m, e = int(bound[0]), int(bound[1])
            scaled, shift = m * facts.divisor, e - facts.exponent
            bounds.append(scaled << shift if shift >= 0 else scaled >> -shift)
        body = []

        def f(v: int) -> int:  # numpy's clip: min(max(v, lo), hi)
            if bounds[0] is not None:
                v = max(v, bounds[0])
            if bounds[1] is not None:
                v = min(v, bounds[1])
            return v

        for b, cmp in zip(bounds, ("<", ">"), strict=True):
            if b is not None:
                c = _lit(min(max(b, INT64_MIN), INT64_MAX))
                body.append(f"if (v {cmp} {c}) v = {c};")
        self._unary(code, j, op, t, f(lo), f(hi), body)

    def _op_add(self, code: _Code, j: int, op: dict, t: int) -> None:
        a, b = op["inputs"]
        e = self.facts[t].exponent
        (alo, ahi), (blo, bhi) = self.ranges[a], self.ranges[b]
        ma, mb = 1 << (self.facts[a].exponent - e), 1 << (self.facts[b].exponent - e)
        ctype = self._set_range(t, alo * ma + blo * mb, ahi * ma + bhi * mb)
        if not self._elementwise_inplace(j, t, [a, b], ctype):
            self._new_storage(t, ctype)
        terms = [
            self._read(a, "i") + (f" * {_lit(ma)}" if ma > 1 else ""),
            self._read(b, "i") + (f" * {_lit(mb)}" if mb > 1 else ""),
        ]
        code(
            f"for (int32_t i = 0; i < {math.prod(self.facts[t].shape)}; i++) "
            + self._write(t, "i", " + ".join(terms))
        )

    def _op_concat(self, code: _Code, j: int, op: dict, t: int) -> None:
        axis = int(op["axis"])
        e = self.facts[t].exponent
        out_shape = self.facts[t].shape
        muls = [1 << (self.facts[i].exponent - e) for i in op["inputs"]]
        lo = min(self.ranges[i][0] * m for i, m in zip(op["inputs"], muls, strict=True))
        hi = max(self.ranges[i][1] * m for i, m in zip(op["inputs"], muls, strict=True))
        self._new_storage(t, self._set_range(t, lo, hi))
        outer = math.prod(out_shape[:axis])
        row = math.prod(out_shape[axis:])
        offset = 0
        for i, m in zip(op["inputs"], muls, strict=True):
            inner = math.prod(self.facts[i].shape[axis:])
            value = self._read(i, f"a * {inner} + b") + (f" * {_lit(m)}" if m > 1 else "")
            code(
                f"for (int32_t a = 0; a < {outer}; a++) for (int32_t b = 0; b < {inner}; b++) "
                + self._write(t, f"a * {row} + {offset} + b", value)
            )
            offset += inner

    # -- pools and sums

    def _pool(self, code: _Code, j: int, op: dict, t: int, is_max: bool) -> None:
        x = op["inputs"][0]
        x_shape, out_shape = self.facts[x].shape, self.facts[t].shape
        window, strides, pads = op["window"], op["strides"], [p[0] for p in op["padding"]]
        lo, hi = self.ranges[x]
        if is_max:
            ctype = self._set_range(t, lo, hi)
        else:
            count = math.prod(window)
            ctype = self._set_range(t, count * min(lo, 0), count * max(hi, 0))
        self._new_storage(t, ctype)
        rank = len(x_shape)
        outs = [f"o{a}" for a in range(rank)]
        for a in range(rank):
            code.open(f"for (int32_t o{a} = 0; o{a} < {out_shape[a]}; o{a}++)")
        code("int64_t m = INT64_MIN;" if is_max else "int64_t m = 0;")
        loops = 0
        for a in range(rank):
            start = _mul(f"o{a}", strides[a]) + (f" - {pads[a]}" if pads[a] else "")
            if window[a] == 1 and pads[a] == 0:
                code(f"const int32_t x{a} = {start};")
                continue
            code.open(f"for (int32_t w{a} = 0; w{a} < {window[a]}; w{a}++)")
            loops += 1
            code(f"const int32_t x{a} = {start} + w{a};")
            if pads[a] > 0 or op["padding"][a][1] > 0:
                code(f"if (x{a} < 0 || x{a} >= {x_shape[a]}) continue;")
        value = self._read(x, _index([f"x{a}" for a in range(rank)], x_shape))
        if is_max:
            code(f"const int64_t v = {value};")
            code("if (v > m) m = v;")
        else:
            code(f"m += {value};")
        code.close(loops)
        code(self._write(t, _index(outs, out_shape), "m"))
        code.close(rank)

    def _op_maxpool(self, code: _Code, j: int, op: dict, t: int) -> None:
        self._pool(code, j, op, t, True)

    def _op_sumpool(self, code: _Code, j: int, op: dict, t: int) -> None:
        self._pool(code, j, op, t, False)

    def _op_sum(self, code: _Code, j: int, op: dict, t: int) -> None:
        x = op["inputs"][0]
        x_shape = self.facts[x].shape
        axes = set(op["axes"])
        count = math.prod(x_shape[a] for a in axes)
        lo, hi = self.ranges[x]
        self._new_storage(t, self._set_range(t, lo * count, hi * count))
        kept = [a for a in range(len(x_shape)) if a not in axes]
        for a in kept:
            code.open(f"for (int32_t i{a} = 0; i{a} < {x_shape[a]}; i{a}++)")
        code("int64_t s = 0;")
        for a in sorted(axes):
            code.open(f"for (int32_t i{a} = 0; i{a} < {x_shape[a]}; i{a}++)")
        code(f"s += {self._read(x, _index([f'i{a}' for a in range(len(x_shape))], x_shape))};")
        code.close(len(axes))
        out_index = _index([f"i{a}" for a in kept], [x_shape[a] for a in kept]) if kept else "0"
        code(self._write(t, out_index, "s"))
        code.close(len(kept))

    # -- bookkeeping only

    def _op_div(self, code: _Code, j: int, op: dict, t: int) -> None:
        x = op["inputs"][0]
        self.ranges[t] = self.ranges[x]
        self._join(t, self.storage_of[x])
        code(f"/* the divisor becomes {self.facts[t].divisor}: no code */")

    def _op_reshape(self, code: _Code, j: int, op: dict, t: int) -> None:
        x = op["inputs"][0]
        self.ranges[t] = self.ranges[x]
        self._join(t, self.storage_of[x])
        code("/* C order: the same buffer, no code */")


# --------------------------------------------------------------------------- files

_UNPACK = """\
/* Code of `width` bits (1..64) at bit offset `bit` of the stream: two's complement, LSB first. */
static inline int64_t {p}_code(uint32_t bit, unsigned width)
{{
    const uint8_t *b = {p}_weights + (bit >> 3);
    const unsigned shift = bit & 7u;
    const unsigned nbytes = (shift + width + 7u) >> 3;
    uint64_t u = 0;
    unsigned i;
    for (i = 0; i < nbytes && i < 8u; i++) u |= (uint64_t)b[i] << (8u * i);
    u >>= shift;
    if (nbytes > 8u) u |= (uint64_t)b[8] << (64u - shift);
    if (width < 64u) {{
        const uint64_t mask = ((uint64_t)1 << width) - 1u;
        u &= mask;
        return (u >> (width - 1u)) ? -(int64_t)(~u & mask) - 1 : (int64_t)u;
    }}
    return (u >> 63) ? -(int64_t)(~u) - 1 : (int64_t)u;
}}
"""

_RDIV = """\
/* round_half_even(v / d) for d >= 2, on the magnitude (rounding half to even is odd-symmetric). */
static inline int64_t {p}_rdiv(int64_t v, uint64_t d)
{{
    const uint64_t a = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    uint64_t q = a / d;
    const uint64_t r = a - q * d, rest = d - r;
    q += (r > rest || (r == rest && (q & 1u))) ? 1u : 0u;
    return v < 0 ? -(int64_t)q : (int64_t)q;
}}
"""

_HARNESS = """\
/* Test harness for {source}: `./a.out N < inputs > logits`.
 * Reads N examples of {P}_INPUT_SIZE {p}_input_t values ({ctype}, native byte order) from
 * stdin; writes each example's
 * {P}_NUM_OUTPUTS logits as little-endian int64 to stdout. `./a.out N predict` writes the
 * predicted class of each example as little-endian int32 instead. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

static {p}_input_t example[{P}_INPUT_SIZE];

int main(int argc, char **argv)
{{
    int64_t logits[{P}_NUM_OUTPUTS];
    unsigned char bytes[8 * {P}_NUM_OUTPUTS];
    long n, i;
    int j, k, predict;
    if (argc < 2 || argc > 3) {{
        fprintf(stderr, "usage: %s N [predict] < inputs > outputs\\n", argv[0]);
        return 2;
    }}
    n = strtol(argv[1], NULL, 10);
    predict = argc == 3 && strcmp(argv[2], "predict") == 0;
    for (i = 0; i < n; i++) {{
        if (fread(example, 1, sizeof example, stdin) != sizeof example) {{
            fprintf(stderr, "short read at example %ld\\n", i);
            return 1;
        }}
        if (predict) {{
            const uint32_t c = (uint32_t){p}_predict(example);
            for (k = 0; k < 4; k++) bytes[k] = (unsigned char)(c >> (8 * k));
            if (fwrite(bytes, 1, 4, stdout) != 4) return 1;
            continue;
        }}
        {p}_logits(example, logits);
        for (j = 0; j < {P}_NUM_OUTPUTS; j++) {{
            const uint64_t u = (uint64_t)logits[j];
            for (k = 0; k < 8; k++) bytes[8 * j + k] = (unsigned char)(u >> (8 * k));
        }}
        if (fwrite(bytes, 1, sizeof bytes, stdout) != sizeof bytes) return 1;
    }}
    return 0;
}}
"""


def emit_c(
    model: IntegerModel | str | os.PathLike, out_dir: str | os.PathLike, *, prefix: str = "cgmq"
) -> CProgram:
    """Write ``model.h``, ``model.c`` and ``main.c`` for ``model`` into ``out_dir``.

    Args:
      model: a loaded model or the path of a ``cgmq-int-npz`` file.
      out_dir: the directory to write (created if needed); the three files appear together
        or not at all (:func:`_write_all`), replacing any there.
      prefix: the C identifier prefix: functions ``<prefix>_logits`` / ``<prefix>_predict``,
        macros ``<PREFIX>_INPUT_SIZE``, ...

    Returns:
      the :class:`CProgram` (paths and memory figures).
    """
    if not _IDENT.match(prefix):
        raise ValueError(f"prefix {prefix!r} is not a C identifier")
    model = model if isinstance(model, IntegerModel) else load(model)
    out_dir = Path(os.path.abspath(out_dir))  # the compiler runs inside it
    em = _Emitter(model, prefix)
    body = em.emit_body()
    p, P = prefix, prefix.upper()
    ctype = em.input.ctype
    header = model.header
    facts = model.facts
    in_shape = list(facts.tensors[0].shape)
    input_size = math.prod(in_shape)
    out_t = header["output"]["tensor"]
    num_outputs = math.prod(facts.tensors[out_t].shape)
    weight_bits = em.weight_bits
    weight_bytes = len(em.packed)
    buffer_bytes = sum(slot.size for slot in em.slots)
    macs = sum(row.macs for row in facts.rows)
    bops = sum(row.bops for row in facts.rows)

    # ---- model.h
    rows = ["layer  name                 kind   MACs          weight bits      input bits"]
    for i, row in enumerate(facts.rows):
        bits = row.weight_bits
        bits = f"{min(bits)}..{max(bits)}/channel" if isinstance(bits, tuple) else str(bits)
        rows.append(
            f"{i:<6d} {_comment(row.layer)[:20]:<20s} {row.kind:<6s} {row.macs:<13d} "
            f"{bits[:16]:<16s} {row.input_bits}"
        )
    table = "\n".join(f" *   {r}" for r in rows)
    guard = f"{P}_MODEL_H"
    sha = _comment(header.get("payload_sha256", "?"))
    h = f"""\
/* Generated by cgmq_jax.export.c from {_comment(model.path)}
 * (model {_comment(header.get("model", "?"))}, payload SHA-256 {sha}).
 *
 * Integer-only inference (docs/export.md, "Integer semantics (format version 2)"), bit-identical
 * to cgmq_jax.export.engine.run_integer.
 *
 * Input: one example of {P}_INPUT_SIZE {ctype} values ({p}_input_t), shape {in_shape}
 * (row-major, channels last), at 2^{P}_INPUT_EXPONENT; the type follows
 * {_comment(em.input.reason)}.
 * Values below {P}_INPUT_MIN or above {P}_INPUT_MAX give the output of that bound.
 * Output: {P}_NUM_OUTPUTS int64 logits; their real value is logits * 2^{P}_OUTPUT_EXPONENT /
 * {P}_OUTPUT_DIVISOR. The prediction is the first maximum (like numpy's argmax).
 * Not reentrant: the activations live in static buffers ({P}_BUFFER_BYTES bytes).
 *
{table}
 */
#ifndef {guard}
#define {guard}

#include <stdint.h>

#define {P}_INPUT_SIZE {input_size}
#define {P}_INPUT_MIN {_limit(em.input.lo)}
#define {P}_INPUT_MAX {_limit(em.input.hi)}
#define {P}_INPUT_EXPONENT ({facts.tensors[0].exponent})
#define {P}_NUM_OUTPUTS {num_outputs}
#define {P}_OUTPUT_EXPONENT ({facts.tensors[out_t].exponent})
#define {P}_OUTPUT_DIVISOR {facts.tensors[out_t].divisor}
#define {P}_WEIGHT_BITS {weight_bits}
#define {P}_WEIGHT_BYTES {weight_bytes}
#define {P}_ACTIVATION_BITS {facts.activation_bits}
#define {P}_BUFFER_BYTES {buffer_bytes}
#define {P}_BOPS {bops}
#define {P}_MACS {macs}

typedef {ctype} {p}_input_t;

void {p}_logits(const {ctype} *input, int64_t *logits);
int {p}_predict(const {ctype} *input);

#endif /* {guard} */
"""

    # ---- model.c
    c = [
        f"/* Generated by cgmq_jax.export.c from {_comment(model.path.name)}: see model.h. */",
        "#include <stdint.h>",
        "#include <string.h>",
        "",
        '#include "model.h"',
        "",
    ]
    for warning in em.warnings:
        c.append(f"/* WARNING: {_comment(warning)} */")
    if weight_bytes:
        c.append(
            f"/* All weights and biases, {weight_bits} bits: per layer, the kernel channel by "
            "channel (each output channel's fan-in in kernel order), then the bias. */"
        )
        c.append(f"static const uint8_t {p}_weights[{P}_WEIGHT_BYTES] = {{")
        data = em.packed
        for start in range(0, len(data), 16):
            c.append("    " + ", ".join(f"0x{v:02x}" for v in data[start : start + 16]) + ",")
        c.append("};")
        c.append("")
    c.extend(em.tables)
    if em.tables:
        c.append("")
    if "code" in em.helpers:
        c.append(_UNPACK.format(p=p))
    if "rdiv" in em.helpers:
        c.append(_RDIV.format(p=p))
    for i, slot in enumerate(em.slots):
        members = " ".join(
            f"{_CTYPES[m][0]} {_CTYPES[m][1]}[{slot.size // _CTYPES[m][2]}];"
            for m in sorted(slot.members)
        )
        c.append(f"static union {{ {members} }} {p}_buf{i};")
    if em.slots:
        total = " + ".join(f"sizeof {p}_buf{i}" for i in range(len(em.slots)))
        c.append(f"typedef char {p}_check_buffer_bytes[({total}) == {P}_BUFFER_BYTES ? 1 : -1];")
    c.append("")
    read = {t for j, op in enumerate(em.ops) if em.needed[j + 1] for t in op["inputs"]} | {out_t}
    uses_input = any(em.storage_of[t] == 0 for t in read)
    c.append(f"void {p}_logits(const {ctype} *input, int64_t *logits)")
    c.append("{")
    if not uses_input:
        c.append("    (void)input;")
    c.extend(body)
    c.append("}")
    c.append("")
    c.append(f"int {p}_predict(const {ctype} *input)")
    c.append("{")
    c.append(f"    int64_t logits[{P}_NUM_OUTPUTS];")
    c.append("    int best = 0;")
    c.append(f"    {p}_logits(input, logits);")
    c.append(f"    for (int i = 1; i < {P}_NUM_OUTPUTS; i++)")
    c.append("        if (logits[i] > logits[best]) best = i;")
    c.append("    return best;")
    c.append("}")
    source = "\n".join(c) + "\n"
    if re.search(r"\b(float|double)\b", source):
        raise AssertionError("floating point in the generated C")

    paths = out_dir / "model.h", out_dir / "model.c", out_dir / "main.c"
    harness = _HARNESS.format(p=p, P=P, ctype=ctype, source="model.c")
    _write_all(out_dir, {"model.h": h, "model.c": source, "main.c": harness})
    return CProgram(
        out_dir=out_dir,
        header=paths[0],
        source=paths[1],
        harness=paths[2],
        weight_bits=weight_bits,
        weight_bytes=weight_bytes,
        activation_bits=facts.activation_bits,
        buffer_bytes=buffer_bytes,
        input_size=input_size,
        num_outputs=num_outputs,
        prefix=prefix,
        input=em.input,
    )


def _write_all(out_dir: Path, texts: dict[str, str]) -> None:
    """Write ``{name: text}`` into ``out_dir``: all the files, or none of them.

    They are written (and fsynced) into a temporary directory inside ``out_dir`` first,
    then renamed into place; on any failure (a full disk, a read-only directory) the
    temporary directory is removed, and so is ``out_dir`` if this call created it empty.
    """
    import tempfile

    from cgmq_jax import files  # standard library only

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".cgmq-c.", suffix=files.TMP_SUFFIX, dir=out_dir))
        for name, text in texts.items():
            files.write_text(tmp / name, text)
        for name in texts:
            os.replace(tmp / name, out_dir / name)
    except BaseException:
        if created and tmp is None:
            out_dir.rmdir()
        raise
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if created and not any(out_dir.iterdir()):
                out_dir.rmdir()


def compile_and_run(
    program: CProgram, inputs: np.ndarray, *, cc: str | None = None, predict: bool = False
) -> np.ndarray:
    """Compile ``model.c main.c`` (``cc -std=c99 -O2 -Wall -Wextra -Werror``) and run it.

    Args:
      program: what :func:`emit_c` returned.
      inputs: ``(N, ...)`` integers at the input exponent, ``input_size`` elements per
        example; those beyond the program's input bounds (``program.input``) are saturated to
        them first, which changes no output (the model saturates them).
      cc: the C compiler (default: ``cc`` on the ``PATH``).
      predict: return the predicted classes ``(N,)`` instead of the logits.

    Returns:
      the int64 logits ``(N, num_outputs)`` (or the int64 classes ``(N,)``).

    Raises:
      RuntimeError: no compiler, a compiler error or warning, or a failing run.
    """
    compiler = shutil.which(cc or "cc")
    if compiler is None:
        raise RuntimeError(
            f"no C compiler ({cc or 'cc'}) found on the PATH; cannot compile {program.source}"
        )
    x = np.asarray(inputs)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"compile_and_run takes integer inputs, got {x.dtype}")
    n = x.shape[0] if x.ndim else 0
    x = x.reshape(n, -1) if n else x.reshape(0, program.input_size)
    if x.shape[1] != program.input_size:
        raise ValueError(
            f"inputs hold {x.shape[1]} elements per example, the model takes {program.input_size}"
        )
    kind = program.input or UINT8_INPUT
    if x.dtype == np.uint64:
        x = np.minimum(x, np.uint64(INT64_MAX))
    x = np.clip(x.astype(np.int64), kind.lo, kind.hi).astype(kind.dtype)
    binary = Path(os.path.abspath(program.out_dir / f"{program.prefix}_run"))
    sources = [os.path.abspath(program.source), os.path.abspath(program.harness)]
    command = [compiler, *CFLAGS, "-o", str(binary), *sources]
    built = subprocess.run(command, capture_output=True, text=True, cwd=binary.parent)
    if built.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{built.stderr}")
    run = subprocess.run(
        [str(binary), str(n), *(["predict"] if predict else [])],
        input=x.tobytes(),
        capture_output=True,
    )
    if run.returncode:
        stderr = run.stderr.decode(errors="replace")
        raise RuntimeError(f"{binary} exited with {run.returncode}: {stderr}")
    if predict:
        return np.frombuffer(run.stdout, "<i4").astype(np.int64).reshape(n)
    return np.frombuffer(run.stdout, "<i8").astype(np.int64).reshape(n, program.num_outputs)
