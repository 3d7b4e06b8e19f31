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

import hashlib
import io
import json
import math
import os
import struct
import zipfile
from pathlib import Path

import numpy as np

from cgmq_jax.export.base import (  # noqa: F401  (the format's names, re-exported)
    _ARRAY_DTYPES,
    _INT_DTYPES,
    _NPY_PREAMBLE_MAX,
    BIAS_BITS,
    DEFAULT_FILE,
    FORMAT,
    HEADER_KEY,
    HEADER_SHA_KEY,
    INPUT_RANGE,
    INT64_MAX,
    INT64_MIN,
    LAYER_OPS,
    MAX_ARRAY_ELEMENTS,
    MAX_BIAS_SHIFT,
    MAX_EXPONENT,
    MAX_HEADER_BYTES,
    MAX_TENSOR_ELEMENTS,
    MAX_TOTAL_BYTES,
    OPS,
    PIXEL_EXPONENT,
    VERSION,
    ExportError,
    IntegerModel,
    LayerRow,
    Tensor,
    Validated,
    _as_bytes,
    _Checker,
    _fail,
    _is_int,
    _sha256,
    bits_for_levels,
    int_dtype_for_bits,
    signed_bits,
)
from cgmq_jax.export.ranges import prove_ranges  # noqa: F401
from cgmq_jax.export.schema import (  # noqa: F401
    _HEADER_FIELDS,
    BIAS_ROUNDING,
    INPUT_LAYOUT,
    KERNEL_LAYOUTS,
    LIMIT_NAMES,
    OP_FIELDS,
    _shown,
    check_header_types,
    parse_json,
)
from cgmq_jax.export.validate import (  # noqa: F401
    _check_totals,
    _recount,
    stated_limits,
    validate,
)


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

    Examples:
      A model exported by :func:`cgmq_jax.lowering.export` (needs JAX; loading does not):

      >>> import pathlib, tempfile, jax
      >>> from cgmq_jax import lowering, models
      >>> from cgmq_jax.export import load
      >>> model = models.MLP(hidden=(), num_classes=4)  # one dense layer, 16 -> 4
      >>> params = model.init(jax.random.key(0), jax.numpy.ones((1, 4, 4, 1)))["params"]
      >>> folder = pathlib.Path(tempfile.mkdtemp())
      >>> path = lowering.export(params, model, folder / "m.npz", input_shape=(4, 4, 1))
      >>> integer = load(path)
      >>> [(layer["name"], layer["weight_bits"], layer["input_bits"]) for layer in integer.layers]
      [('fc1', 8, 8)]
      >>> [op["op"] for op in integer.ops]
      ['reshape', 'dense']
      >>> _ = (folder / "broken.npz").write_bytes(b"not a zip")
      >>> load(folder / "broken.npz")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      cgmq_jax.export.base.ExportError: ...broken.npz: not a readable .npz archive ...
      >>> import shutil; shutil.rmtree(folder)
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

    Examples:
      The recount of a file exported with its certificate (:func:`cgmq_jax.certify.certify`):

      >>> import pathlib, tempfile, jax
      >>> from cgmq_jax import certify, cost, lowering, models
      >>> from cgmq_jax.export import count_bops
      >>> model = models.MLP(hidden=(), num_classes=4)  # one dense layer, 16 -> 4
      >>> x = jax.numpy.ones((1, 4, 4, 1))
      >>> params = model.init(jax.random.key(0), x)["params"]
      >>> certificate = certify.certify(params, cost.layer_specs(model, x), 5000)
      >>> folder = pathlib.Path(tempfile.mkdtemp())
      >>> path = folder / "m.npz"
      >>> _ = lowering.export(params, model, path, input_shape=(4, 4, 1), certificate=certificate)
      >>> counted = count_bops(path)
      >>> counted["macs"], counted["bops"], counted["budget_bops"], counted["matches_certificate"]
      (64, 4096, 5000, True)
      >>> counted["layers"]  # doctest: +NORMALIZE_WHITESPACE
      [{'layer': 'fc1', 'kind': 'dense', 'macs': 64, 'weight_bits': 8, 'input_bits': 8,
        'bops': 4096}]
      >>> import shutil; shutil.rmtree(folder)
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
