"""What differs between a loaded ``cgmq-int-npz`` file and a re-derived ``(header, arrays)``
(:func:`cgmq_jax.lowering.build` of the params it claims to come from): ``--check`` reports
these lines. Numpy and the standard library only.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from cgmq_jax.export.format import IntegerModel

#: Header fields that are informative only and not compared by :func:`differences`:
#: where the run directory was when the file was written.
INFORMATIVE = (("metadata", "run"),)


def differences(model: IntegerModel, header: dict, arrays: dict, *, limit: int = 8) -> list[str]:
    """What differs between a loaded file and a re-derived ``(header, arrays)``.

    Every header field is compared (after a JSON round trip, as the file stores it), except
    the checksums that :func:`~cgmq_jax.export.format.save` computes from the arrays and
    :data:`INFORMATIVE`; every array by dtype, shape and value. Returns at most ``limit``
    one-line descriptions (empty: the file is the derivation).
    """
    derived = json.loads(json.dumps({"format": model.header.get("format"), **header}))
    derived.setdefault("version", model.header.get("version"))
    found = {k: v for k, v in model.header.items() if k not in ("arrays", "payload_sha256")}
    for where in INFORMATIVE:
        for tree in (derived, found):
            node = tree
            for key in where[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(where[-1], None)
    out = _array_differences(model, arrays)
    _tree_differences("header", found, derived, out)
    return out[:limit]


def _tree_differences(where: str, found: Any, derived: Any, out: list[str]) -> None:
    if isinstance(found, dict) and isinstance(derived, dict):
        for key in sorted(found.keys() | derived.keys(), key=str):
            if key not in derived:
                out.append(f"{where}.{key}: in the file, not in the re-derived model")
            elif key not in found:
                out.append(f"{where}.{key}: missing from the file")
            else:
                _tree_differences(f"{where}.{key}", found[key], derived[key], out)
    elif isinstance(found, list) and isinstance(derived, list) and len(found) == len(derived):
        for i, (a, b) in enumerate(zip(found, derived, strict=True)):
            _tree_differences(f"{where}[{i}]", a, b, out)
    elif found != derived or type(found) is not type(derived):
        out.append(
            f"{where}: the file says {_short(found)}, the run's params give {_short(derived)}"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _array_differences(model: IntegerModel, arrays: dict) -> list[str]:
    names = {}
    for i, layer in enumerate(model.layers):
        for part in ("weight", "bias"):
            key = layer.get(f"{part}_key") if isinstance(layer, dict) else None
            names[key] = f"layer {i} ({layer.get('name')!r}) {part} ({key})"
    out = []
    for key in sorted(model.arrays.keys() | arrays.keys()):
        what = names.get(key, f"array {key!r}")
        if key not in arrays:
            out.append(f"{what}: in the file, not in the re-derived model")
            continue
        if key not in model.arrays:
            out.append(f"{what}: missing from the file")
            continue
        ours, theirs = np.asarray(model.arrays[key]), np.asarray(arrays[key])
        if ours.dtype.newbyteorder("=") != theirs.dtype.newbyteorder("=") or (
            ours.shape != theirs.shape
        ):
            out.append(
                f"{what}: {ours.dtype} {list(ours.shape)} in the file, "
                f"{theirs.dtype} {list(theirs.shape)} from the run's params"
            )
            continue
        bad = ours != theirs
        if bad.any():
            worst = int(np.max(np.abs(ours.astype(object) - theirs.astype(object))[bad]))
            out.append(
                f"{what} differs in {int(bad.sum()):,} of {ours.size:,} entries "
                f"(max |difference| {worst:,})"
            )
    return out
