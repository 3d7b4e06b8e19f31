"""The export's layering: ``cgmq_jax.export`` (format, engine, C) is numpy-only, the
lowering (``cgmq_jax.lowering``) and the check against the model (``cgmq_jax.model_check``)
are core and never reach the run harness, and the old names (``cgmq_jax.export.writer``,
``cgmq_jax.export.export_run``, ``cgmq_jax.lowering.compare_with_model``) still resolve.

The import checks run in a subprocess whose ``sys.meta_path`` refuses the blocked
packages, so an import of one anywhere (at module level or lazily) raises ImportError.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPORT = REPO / "cgmq_jax" / "export"
#: The run harness: the core (and the numpy-only export) imports none of it.
HARNESS = ("runs", "data", "report", "rundir", "train", "checkpoint", "sweep", "parallel")
#: The numpy-only modules of cgmq_jax.export (writer.py is the deprecated alias of the
#: lowering, and __init__.py maps lazy names to it).
NUMPY_ONLY = sorted(p.stem for p in EXPORT.glob("*.py") if p.stem not in ("__init__", "writer"))

_BLOCKER = """
import importlib.abc, json, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"blocked: {{name}}")
        return None
sys.meta_path.insert(0, Blocker())
"""


def _run(blocked: list[str], body: str) -> dict:
    script = _BLOCKER.format(blocked=blocked) + body
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_export_package_imports_with_jax_blocked():
    """format, engine, C and their parts import with JAX, Flax, Optax and the harness
    refused, and load nothing of cgmq_jax outside the package."""
    got = _run(
        ["jax", "jaxlib", "flax", "optax", *(f"cgmq_jax.{name}" for name in HARNESS)],
        f"""
import importlib
for name in {NUMPY_ONLY!r}:
    importlib.import_module("cgmq_jax.export." + name)
import cgmq_jax.export as ex
assert callable(ex.load) and callable(ex.run_integer) and callable(ex.emit_c)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "optax", "cgmq_jax"))
print(json.dumps({{"loaded": loaded}}))
""",
    )
    expected = {"cgmq_jax", "cgmq_jax.export"}
    expected |= {f"cgmq_jax.export.{name}" for name in NUMPY_ONLY}
    assert set(got["loaded"]) <= expected, set(got["loaded"]) - expected


def test_the_lowering_imports_with_the_harness_blocked():
    """``cgmq_jax.lowering``, ``cgmq_jax.model_check`` (and the writer alias of them) import
    without the harness."""
    got = _run(
        [f"cgmq_jax.{name}" for name in HARNESS],
        """
import cgmq_jax.model_check as model_check
import cgmq_jax.lowering as lowering
from cgmq_jax.export import writer
assert writer.build is lowering.build and writer.export is lowering.export
assert writer.compare_with_model is lowering.compare_with_model is model_check.compare_with_model
print(json.dumps({"loaded": sorted(m for m in sys.modules if m.startswith("cgmq_jax"))}))
""",
    )
    assert not [m for m in got["loaded"] if m.count(".") and m.split(".")[1] in HARNESS]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_no_import_runs_upward():
    """Read, not run: the numpy-only modules import numpy, the standard library, each other
    and ``cgmq_jax.files``; the lowering and the check against the model import no harness
    module, even lazily."""
    for name in NUMPY_ONLY:
        ours = {m for m in _imports(EXPORT / f"{name}.py") if m.startswith("cgmq_jax.")}
        outside = {m for m in ours if not m.startswith(("cgmq_jax.export", "cgmq_jax.files"))}
        assert not outside, (name, outside)
        assert not {m for m in _imports(EXPORT / f"{name}.py") if m.split(".")[0] in (
            "jax", "flax", "optax")}, name  # fmt: skip
    for name in ("lowering", "model_check"):
        core = _imports(REPO / "cgmq_jax" / f"{name}.py")
        upward = {m for m in core if m.startswith("cgmq_jax.") and m.split(".")[1] in HARNESS}
        assert not upward, (name, upward)


def test_old_names_resolve_to_their_new_homes(monkeypatch):
    import cgmq_jax.export as ex
    import cgmq_jax.lowering as lowering
    import cgmq_jax.model_check as model_check
    import cgmq_jax.runs.export_run as export_run
    from cgmq_jax.export import writer

    for name in ("export", "build", "differences", "compare_with_model", "round_to_odd"):
        assert getattr(writer, name) is getattr(lowering, name)
    for name in ("export_run", "derive_run", "read_results"):
        assert getattr(writer, name) is getattr(export_run, name)
    assert ex.export is lowering.export and ex.export_run is export_run.export_run
    assert ex.compare_with_model is lowering.compare_with_model
    for name in ("compare_with_model", "layer_inputs"):  # moved to model_check, kept here
        assert getattr(lowering, name) is getattr(model_check, name) is getattr(writer, name)
    assert ex.compare_with_model is model_check.compare_with_model
    monkeypatch.setattr(writer, "build", "patched")  # set on the module that owns it
    monkeypatch.setattr(writer, "layer_inputs", "patched")
    assert lowering.build == "patched" and model_check.layer_inputs == "patched"
    monkeypatch.undo()
    assert callable(lowering.build) and callable(model_check.layer_inputs)


def test_the_certificates_old_names_warn_and_resolve_to_their_new_homes():
    """``certify``'s limits and repair moved to :mod:`cgmq_jax.limits` and
    :mod:`cgmq_jax.repair`; the old names still work, with a warning that names the new one."""
    from cgmq_jax import certify, limits, repair

    for module, names in ((limits, ("InfeasibleBudgetError", "LIMIT_FLAGS", "limits_of",
            "limits_from_flags", "check_budget", "require_feasible")), (repair, ("greedy_repair",
            "greedy_fill", "MAX_FILL_BITS", "one_more_bit_bops"))):  # fmt: skip
        for name in names:
            with pytest.warns(DeprecationWarning, match=f"use {module.__name__}.{name}"):
                assert getattr(certify, name) is getattr(module, name)
    with pytest.raises(AttributeError, match="no attribute 'greedy_rapair'"):
        certify.greedy_rapair  # noqa: B018


def test_the_chains_old_names_warn_and_resolve_to_their_new_home():
    """The optax chains moved from :mod:`cgmq_jax.constraint` to :mod:`cgmq_jax.optimizers`;
    the old names still work, with a warning that names the new one."""
    from cgmq_jax import constraint, optimizers

    for name in ("fixed_bitwidths", "partitioned_adam", "cgmq_optimizer"):
        with pytest.warns(DeprecationWarning, match=f"use cgmq_jax.optimizers.{name}"):
            assert getattr(constraint, name) is getattr(optimizers, name)
    with pytest.raises(AttributeError, match="no attribute 'cgmq_optimiser'"):
        constraint.cgmq_optimiser  # noqa: B018


def test_the_readers_limit_names_are_the_costs():
    """The numpy-only reader keeps its own copy of the cost names (it cannot import JAX)."""
    from cgmq_jax import cost
    from cgmq_jax.export import format as fmt
    from cgmq_jax.limits import LIMIT_FLAGS

    assert tuple(fmt.LIMIT_NAMES) == tuple(cost.COSTS) == tuple(LIMIT_FLAGS)
