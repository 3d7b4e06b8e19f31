"""The header's schema and the strict JSON every header is parsed with.

:func:`parse_json` refuses duplicate keys, ``NaN`` / ``Infinity`` and integers beyond
int64; :func:`check_header_types` checks every field of a header against its schema (type
only, and no unknown field: the format is not extensible outside ``metadata``). Ranges
and agreements between fields are :mod:`cgmq_jax.export.validate`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from cgmq_jax.export.base import (
    FORMAT,
    INT64_MAX,
    INT64_MIN,
    LAYER_OPS,
    VERSION,
    _Checker,
    _is_int,
)

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
