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

The emitter is split by job: this module (the public :func:`emit_c`,
:func:`compile_and_run`, :func:`input_type` and the two files' assembly),
:mod:`cgmq_jax.export.c_memory` (packed weights, liveness, buffers, value ranges),
:mod:`cgmq_jax.export.c_ops` (one loop nest per op) and :mod:`cgmq_jax.export.c_text` (the
fixed C text). They import numpy, the standard library and :mod:`cgmq_jax.export.format`
only.
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

from cgmq_jax.export.c_memory import _CTYPES, _needed
from cgmq_jax.export.c_ops import _Emitter
from cgmq_jax.export.c_text import (
    HARNESS,
    INT64_MAX,
    INT64_MIN,
    MODEL_H,
    PREDICT,
    RDIV,
    UNPACK,
    _comment,
    _limit,
)
from cgmq_jax.export.format import LAYER_OPS, IntegerModel, load

#: The flags :func:`compile_and_run` compiles with (the generated code is clean under them).
CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Werror")
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


def _raw_range(layer: dict, exponent: int) -> tuple[int, int]:
    """The input values at ``2**exponent`` that layer's quantizer maps to distinct codes.

    ``hi`` is the smallest value whose code is the top level ``n`` (every larger value
    saturates to it): ``code = round(v / 2**shift)``, halves to even, so with ``shift >= 1``
    the value ``n * 2**shift - 2**(shift - 1)`` already rounds to ``n`` when ``n`` is even
    and one more is needed when it is odd. MNIST's pixels (0..255) at a quantizer whose top
    level is 1.0 (``n * 2**shift == 256``) thus still fit ``uint8_t``.
    """
    levels, shift = int(layer["input_levels"]), int(layer["input_exponent"]) - exponent
    if shift >= 1:
        hi = (levels << shift) - (1 << (shift - 1)) + (levels & 1)
    else:
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
    kind = input_type(model)
    full = next((lo, hi) for c, _, lo, hi in _INPUT_TYPES if c == kind.ctype)
    em = _Emitter(model, prefix, kind, full)
    body = em.emit_body()
    facts = model.facts
    out_t = model.header["output"]["tensor"]
    program = CProgram(
        out_dir=out_dir,
        header=out_dir / "model.h",
        source=out_dir / "model.c",
        harness=out_dir / "main.c",
        weight_bits=em.weight_bits,
        weight_bytes=len(em.packed),
        activation_bits=facts.activation_bits,
        buffer_bytes=sum(slot.size for slot in em.slots),
        input_size=math.prod(facts.tensors[0].shape),
        num_outputs=math.prod(facts.tensors[out_t].shape),
        prefix=prefix,
        input=kind,
    )
    texts = {
        "model.h": _model_h(model, program),
        "model.c": _model_c(model, program, em, body),
        "main.c": HARNESS.format(p=prefix, P=prefix.upper(), ctype=kind.ctype, source="model.c"),
    }
    _write_all(out_dir, texts)
    return program


def _model_h(model: IntegerModel, program: CProgram) -> str:
    """``model.h``: the API, the sizes and costs as ``#define``s, the per-layer table."""
    p, P, kind, facts = program.prefix, program.prefix.upper(), program.input, model.facts
    rows = ["layer  name                 kind   MACs          weight bits      input bits"]
    for i, row in enumerate(facts.rows):
        bits = row.weight_bits
        bits = f"{min(bits)}..{max(bits)}/channel" if isinstance(bits, tuple) else str(bits)
        rows.append(
            f"{i:<6d} {_comment(row.layer)[:20]:<20s} {row.kind:<6s} {row.macs:<13d} "
            f"{bits[:16]:<16s} {row.input_bits}"
        )
    output = facts.tensors[model.header["output"]["tensor"]]
    defines = {
        "INPUT_SIZE": program.input_size,
        "INPUT_MIN": _limit(kind.lo),
        "INPUT_MAX": _limit(kind.hi),
        "INPUT_EXPONENT": f"({facts.tensors[0].exponent})",
        "NUM_OUTPUTS": program.num_outputs,
        "OUTPUT_EXPONENT": f"({output.exponent})",
        "OUTPUT_DIVISOR": output.divisor,
        "WEIGHT_BITS": program.weight_bits,
        "WEIGHT_BYTES": program.weight_bytes,
        "ACTIVATION_BITS": facts.activation_bits,
        "BUFFER_BYTES": program.buffer_bytes,
        "BOPS": sum(row.bops for row in facts.rows),
        "MACS": sum(row.macs for row in facts.rows),
    }
    return MODEL_H.format(
        p=p,
        P=P,
        path=_comment(model.path),
        model=_comment(model.header.get("model", "?")),
        sha=_comment(model.header.get("payload_sha256", "?")),
        ctype=kind.ctype,
        in_shape=list(facts.tensors[0].shape),
        reason=_comment(kind.reason),
        table="\n".join(f" *   {r}" for r in rows),
        defines="\n".join(f"#define {P}_{name} {value}" for name, value in defines.items()),
    )


def _model_c(model: IntegerModel, program: CProgram, em: _Emitter, body: list[str]) -> str:
    """``model.c``: the packed weights, tables, helpers, buffers and the two functions."""
    p, P, ctype = program.prefix, program.prefix.upper(), program.input.ctype
    c = [
        f"/* Generated by cgmq_jax.export.c from {_comment(model.path.name)}: see model.h. */",
        "#include <stdint.h>",
        "#include <string.h>",
        "",
        '#include "model.h"',
        "",
    ]
    c += [f"/* WARNING: {_comment(warning)} */" for warning in em.warnings]
    if program.weight_bytes:
        c.append(
            f"/* All weights and biases, {program.weight_bits} bits: per layer, the kernel "
            "channel by channel (each output channel's fan-in in kernel order), then the bias. */"
        )
        c.append(f"static const uint8_t {p}_weights[{P}_WEIGHT_BYTES] = {{")
        data = em.packed
        for start in range(0, len(data), 16):
            c.append("    " + ", ".join(f"0x{v:02x}" for v in data[start : start + 16]) + ",")
        c += ["};", ""]
    c += [*em.tables, ""] if em.tables else []
    c += [UNPACK.format(p=p)] if "code" in em.helpers else []
    c += [RDIV.format(p=p)] if "rdiv" in em.helpers else []
    c += _buffers(em, p, P)
    c.append(f"void {p}_logits(const {ctype} *input, int64_t *logits)")
    c.append("{")
    out_t = model.header["output"]["tensor"]
    read = {t for j, op in enumerate(em.ops) if em.needed[j + 1] for t in op["inputs"]} | {out_t}
    if not any(em.storage_of[t] == 0 for t in read):
        c.append("    (void)input;")
    c += [*body, "}", "", PREDICT.format(p=p, P=P, ctype=ctype)]
    source = "\n".join(c) + "\n"
    if re.search(r"\b(float|double)\b", source):
        raise AssertionError("floating point in the generated C")
    return source


def _buffers(em: _Emitter, p: str, P: str) -> list[str]:
    """The static buffers (unions), their size checked at compile time, and a blank line."""
    lines = []
    for i, slot in enumerate(em.slots):
        members = " ".join(
            f"{_CTYPES[m][0]} {_CTYPES[m][1]}[{slot.size // _CTYPES[m][2]}];"
            for m in sorted(slot.members)
        )
        lines.append(f"static union {{ {members} }} {p}_buf{i};")
    if em.slots:
        total = " + ".join(f"sizeof {p}_buf{i}" for i in range(len(em.slots)))
        lines.append(
            f"typedef char {p}_check_buffer_bytes[({total}) == {P}_BUFFER_BYTES ? 1 : -1];"
        )
    return [*lines, ""]


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
