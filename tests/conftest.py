"""Shared test configuration: compilation cache, strict dtype promotion, hypothesis, fixtures."""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, settings

REPO = pathlib.Path(__file__).resolve().parent.parent

# XLA:CPU compiles with its backend (LLVM) optimizations off and its older elemental emitter
# for fusions in the tests: most of a test's time is compiling small programs (every eager op
# is one) that then run a few steps. The optimization level halves the compile time of the
# compile-heavy tests; the emitter nearly halves it again for small programs (three eager
# ops on a new shape: 68 -> 39 ms; the suite 557 -> 423 s on 2 cores). Neither changes what the
# program computes (no fast-math either way), only how fast it runs. Set before JAX starts
# its backend; the subprocesses the tests start inherit it. An ``XLA_FLAGS`` already in the
# environment is kept as it is (``XLA_FLAGS= make test`` runs the suite at XLA's defaults).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", TEST_XLA_FLAGS)

# Persistent compilation cache (``.jax_cache/`` is git-ignored). The thresholds are lowered so
# that the many small programs of the test suite are cached too.
jax.config.update("jax_compilation_cache_dir", str(REPO / ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The same for the Python subprocesses that the tests start (JAX reads these flags from the
# environment): a subprocess that trains otherwise compiles every program afresh.
JAX_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": str(REPO / ".jax_cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}

# Strict dtype promotion and no implicit rank promotion, as in equinox's tests/conftest.py:
# the core (cgmq_jax) passes under both (nn.py reshapes the bias before adding it).
#
# They are set per test by the autouse fixture ``_strict_promotion`` below (and around the
# shared model fixtures), not with a global ``jax.config.update``: a global setting would
# also reach the doctests of cgmq_jax/, which run in the same pytest process (testpaths)
# and use optax.adam. optax 0.2.8 does not pass strict dtype promotion:
# ``optax.tree.bias_correction`` computes ``1 - decay**count`` with an int32 ``count``. Tests
# that run Adam wrap it in ``jax.numpy_dtype_promotion("standard")`` (``standard_promotion``).
STRICT_DTYPE_PROMOTION = "strict"
STRICT_RANK_PROMOTION = "raise"


@contextlib.contextmanager
def strict_promotion():
    with (
        jax.numpy_dtype_promotion(STRICT_DTYPE_PROMOTION),
        jax.numpy_rank_promotion(STRICT_RANK_PROMOTION),
    ):
        yield


standard_promotion = functools.partial(jax.numpy_dtype_promotion, "standard")


@pytest.fixture(autouse=True)
def _strict_promotion():
    """Every test under tests/ runs with strict dtype promotion and rank promotion errors."""
    with strict_promotion():
        yield


settings.register_profile(
    "cgmq",
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("cgmq")


@pytest.fixture(scope="session")
def sample_input():
    """A single zero image: enough for shapes (MACs are per example)."""
    return jnp.zeros((1, 28, 28, 1), jnp.float32)


@pytest.fixture(scope="session")
def calibration_batch():
    """A seeded random batch of images in [0, 1)."""
    return jax.random.uniform(jax.random.key(1), (16, 28, 28, 1), jnp.float32)


def _model_bundle(model_cls, sample, batch):
    from cgmq_jax import cost
    from cgmq_jax import nn as cnn

    model = model_cls()
    float_model = model_cls(quantized=False)
    # Eager, not jitted: XLA:CPU takes seconds to compile a jitted init (the random
    # initialisers), and an init or a calibration pass is never persistently cached (the
    # unsigned-input check is a host callback); its eager ops are cached.
    with strict_promotion():  # session fixtures are set up outside the autouse fixture
        float_params = float_model.init(jax.random.key(0), sample)["params"]
        params8 = cnn.init_quantizers(model, float_params, batch)
        specs = cost.layer_specs(model, sample)
    return {
        "model": model,
        "float_model": float_model,
        "float_params": float_params,
        "params8": params8,
        "specs": specs,
    }


@pytest.fixture(scope="session")
def lenet(sample_input, calibration_batch):
    """LeNet-5: model, float params, quantized params at 8 bits (calibrated), layer specs."""
    from cgmq_jax import models

    return _model_bundle(models.LeNet5, sample_input, calibration_batch)


@pytest.fixture(scope="session")
def mlp(sample_input, calibration_batch):
    """The 784-300-100-10 MLP: as :func:`lenet`."""
    from cgmq_jax import models

    return _model_bundle(models.MLP, sample_input, calibration_batch)


@pytest.fixture(scope="session")
def lenet_init_params(sample_input):
    """``LeNet5().init(key(0), one zero image)["params"]``, once per session (eager: see
    ``_model_bundle``): 8 bits everywhere, uncalibrated."""
    from cgmq_jax import models

    with strict_promotion():
        return models.LeNet5().init(jax.random.key(0), sample_input)["params"]


def _set_bits(params, specs, weight_bits, input_bits):
    """Every quantizer of ``params`` at the given bit-widths, keeping its ``q_max``.

    ``weight_bits`` / ``input_bits``: an int for every layer, or a dict ``{layer name: int}``.
    Each quantizer leaf becomes ``latents(*init_at_bits(q_max, bits, signed=...))``.
    """
    from cgmq_jax import quantizer

    def pick(bits, spec):
        return bits[spec.name] if isinstance(bits, dict) else bits

    params = jax.tree.map(lambda x: x, params)  # a fresh copy of the dict structure
    for spec in specs:
        layer = params
        for key in spec.path:
            layer = layer[key]
        for name, signed, bits in (
            ("weight_quantizer", spec.weight_signed, pick(weight_bits, spec)),
            ("input_quantizer", spec.input_signed, pick(input_bits, spec)),
        ):
            _, q_max = quantizer.from_latents(layer[name])
            layer[name] = quantizer.latents(*quantizer.init_at_bits(q_max, bits, signed=signed))
    return params


@pytest.fixture(scope="session")
def set_bits():
    """``set_bits(params, specs, weight_bits, input_bits) -> params`` (see ``_set_bits``)."""
    return _set_bits


@pytest.fixture(scope="session")
def tiny_mnist():
    """A tiny synthetic MNIST (ten noisy prototypes), for end-to-end runs in seconds."""
    from cgmq_jax import data

    return data.synthetic()


# The flags of the shared finished run (``finished_run``): LeNet-5 on ``tiny_mnist`` that
# learns (about 87% on the synthetic test split) in 5 epochs of 12 steps.
FINISHED_RUN_FLAGS = [
    "--epochs", "2", "--pretrain_epochs", "3", "--batch_size", "32", "--lr", "3e-3",
    "--budget_bops", "2e6",
]  # fmt: skip

# Tests that read ``finished_run`` carry this mark. (``--dist loadgroup`` would keep them on one
# worker, but pytest-xdist 3.8's loadgroup does not group under pytest 9.2, which no longer
# reads ``item._nodeid``; the file lock in ``finished_run`` shares the run across workers.)
FINISHED_RUN = pytest.mark.xdist_group("finished_run")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_mnist):
    """A finished LeNet-5 run directory (``experiments/mnist.py`` with ``FINISHED_RUN_FLAGS``
    on ``tiny_mnist``), trained once per test session and shared by every pytest-xdist worker
    (the first trains it under a file lock, the others wait and reuse it): READ ONLY, copy it
    (``shutil.copytree``) before changing or exporting anything in it."""
    import fcntl

    from cgmq_jax import data

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the basetemp every worker's basetemp is made in
    run = shared / "finished_run" / "lenet5"
    with open(shared / "finished_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (run / "results.json").is_file():
            shutil.rmtree(run.parent, ignore_errors=True)  # a worker that failed half-way
            with pytest.MonkeyPatch.context() as patch, standard_promotion():  # optax.adam
                patch.setattr(data, "load", lambda *a, **k: tiny_mnist)
                assert load_cli("mnist").main([*FINISHED_RUN_FLAGS, "--out", str(run)]) == 0
    return run


def load_cli(name: str):
    """An ``experiments/NAME.py`` script as a module (they are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"{name}_cli", REPO / "experiments" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def standard_promotion_fixture():
    """Standard dtype promotion for a test that runs optax.adam (see the note above)."""
    with standard_promotion():
        yield
