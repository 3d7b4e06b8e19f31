"""The layering of the package: the library core imports nothing from the run harness.

Each check imports modules in a fresh interpreter whose ``sys.meta_path`` starts with a
finder that refuses the blocked packages, so an import that runs upward (core -> harness)
fails here by name, and a lazy one that has already happened cannot hide it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The run harness and what only it needs (checkpoints, progress bars, plots).
HARNESS = (
    "cgmq_jax.runs",
    "cgmq_jax.data",
    "cgmq_jax.train",
    "cgmq_jax.rundir",
    "cgmq_jax.checkpoint",
    "cgmq_jax.report",
    "cgmq_jax.sweep",
    "cgmq_jax.parallel",
    "orbax",
    "tqdm",
    "matplotlib",
)
JAX = ("jax", "jaxlib", "flax", "optax", "chex")
LOWERING = (
    "cgmq_jax.lowering"
    if (ROOT / "cgmq_jax" / "lowering.py").exists()
    else "cgmq_jax.export.writer"
)
CORE = (
    "cgmq_jax",
    "cgmq_jax.quantizer",
    "cgmq_jax.nn",
    "cgmq_jax.calibration",
    "cgmq_jax.nnx",
    "cgmq_jax.nnx_specs",
    "cgmq_jax.rules",
    "cgmq_jax.rules_nnx",
    "cgmq_jax.operands",
    "cgmq_jax.conv",
    "cgmq_jax.admission",
    "cgmq_jax.ptq",
    "cgmq_jax.trades",
    "cgmq_jax.graph",
    "cgmq_jax.specs",
    "cgmq_jax.cost",
    "cgmq_jax.constraint",
    "cgmq_jax.step_ranges",
    "cgmq_jax.certify",
    "cgmq_jax.models",
    "cgmq_jax.files",
    "cgmq_jax.export",
    "cgmq_jax.export.format",
    "cgmq_jax.export.engine",
    "cgmq_jax.export.c",
    LOWERING,
    "cgmq_jax.model_check",
    "cgmq_jax.compaction",
)
NUMPY_ONLY = (
    "cgmq_jax.export",
    "cgmq_jax.export.format",
    "cgmq_jax.export.engine",
    "cgmq_jax.export.c",
    "cgmq_jax.export.onnx",  # onnx itself is imported on first use
    "cgmq_jax.export.onnx_recount",
    "cgmq_jax.export.onnx_runtime",
)

SCRIPT = """
import importlib, importlib.abc, json, sys

BLOCKED = tuple(json.loads(sys.argv[1]))


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked: the core must not import it")
        return None


sys.meta_path.insert(0, Block())
failed = {}
for module in json.loads(sys.argv[2]):
    try:
        importlib.import_module(module)
    except Exception as error:
        failed[module] = f"{type(error).__name__}: {error}"
loaded = sorted(
    name for name in sys.modules if any(name == b or name.startswith(b + ".") for b in BLOCKED)
)
print(json.dumps({"failed": failed, "loaded": loaded}))
"""


def _import_blocked(modules, blocked) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(list(blocked)), json.dumps(list(modules))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_core_imports_without_the_harness():
    # One interpreter for all (each import is tried and reported on its own, so a failure
    # names the first core module whose import chain reaches the harness).
    outcome = _import_blocked(CORE, HARNESS)
    assert outcome == {"failed": {}, "loaded": []}, outcome


def test_the_integer_format_engine_and_c_import_without_jax():
    outcome = _import_blocked(NUMPY_ONLY, (*HARNESS, *JAX))
    assert outcome == {"failed": {}, "loaded": []}, outcome


def test_the_old_names_are_the_new_modules():
    import cgmq_jax
    from cgmq_jax import checkpoint, parallel, report, rundir, sweep, train
    from cgmq_jax.runs import checkpoint as new_checkpoint
    from cgmq_jax.runs import parallel as new_parallel
    from cgmq_jax.runs import report as new_report
    from cgmq_jax.runs import rundir as new_rundir
    from cgmq_jax.runs import sweep as new_sweep
    from cgmq_jax.runs import train as new_train

    assert train is new_train is cgmq_jax.train
    assert (rundir, checkpoint, report, sweep, parallel) == (
        new_rundir,
        new_checkpoint,
        new_report,
        new_sweep,
        new_parallel,
    )


def test_setting_a_trainer_name_reaches_the_module_that_calls_it(monkeypatch):
    from cgmq_jax import train
    from cgmq_jax.runs import fill, fit, steps

    def substitute(*args, **kwargs):
        raise AssertionError("not called here")

    monkeypatch.setattr(train, "make_train_step", substitute)
    assert steps.make_train_step is fit.make_train_step is fill.make_train_step is substitute
    monkeypatch.undo()
    assert steps.make_train_step is train.make_train_step is not substitute
