"""Data parallel training on a device mesh: 4 devices match 1 device, the certificate holds.

The host CPU is split into 4 devices with ``XLA_FLAGS`` (which must be set before JAX
starts, hence a subprocess; ``parallel.split_cpu`` and ``--devices N`` do the same with
``jax_num_cpu_devices``). Speed is measured in ``benchmarks/train_step.py``. Two
processes with ``jax.distributed.initialize`` and CPU collectives (gloo) train the same
run over a 2-process mesh.

On several devices of one CPU, ``fit`` waits for each step before the next (XLA:CPU can
otherwise stall in a collective, see ``parallel.steps_must_not_overlap``). Should a
subprocess still stall, it is stopped with SIGABRT, which makes it print every thread's
Python stack, and is started once more; the first attempt's stacks are shown as a
warning. A wrong result is never retried.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import pytest
from conftest import JAX_CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]

# 512 training examples, batch 32: one epoch is the first 16 steps, of the MLP (the smallest
# library model to compile). A wrong all-reduce or sharding shows at the first step; more steps
# only cost time (this was 100 steps of LeNet-5, about four minutes of the suite).
RUN = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from cgmq_jax import data, train

    def run(method, devices, **kwargs):
        tiny = data.synthetic(train=512, validation=128, test=128)
        config = train.TrainConfig(
            method=method, budget_bops=2e6 if method == "cgmq" else None, epochs=1,
            pretrain_epochs=0, batch_size=32, devices=devices, model="mlp",
            **kwargs
        )
        return train.fit(config, tiny, log=lambda _: None)

    def summary(result):
        leaves = jax.tree_util.tree_flatten_with_path(result.params)[0]
        return {
            "params": {jax.tree_util.keystr(k): np.asarray(v).tolist() for k, v in leaves},
            "within_budget": result.certificate.get("within_budget"),
            "bops": result.certificate.get("bops"),
            "accuracy": result.test_accuracy,
        }
    """
)

# cgmq without the fill's epoch of weight training: every comparison covers 16 steps.
ARGS = {"float": {}, "cgmq": {"fill_epochs": 0}}


def _compare(methods=("float", "cgmq"), devices=(1, 4)) -> str:
    """A script printing ``RESULT{method: {devices: summary}}``."""
    return RUN + textwrap.dedent(
        f"""
        out = {{}}
        for method in {methods!r}:
            kwargs = {ARGS!r}[method]
            out[method] = {{n: summary(run(method, n, **kwargs)) for n in {devices!r}}}
        print("RESULT" + json.dumps(out))
        """
    )


# Every subprocess prints its threads' Python stacks on SIGABRT (see _result).
STACKS = "import faulthandler; faulthandler.enable()\n"


class Stalled(Exception):
    """A subprocess that did not finish in time; the message holds its stacks."""


def _python(script: str, env: dict, args=()):
    """Start ``python -c script``; its output goes to files (processes that wait for each
    other must never block on a full pipe)."""
    environ = {**os.environ, **JAX_CACHE_ENV, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    environ.update(env)
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-c", STACKS + script, *args],
        env=environ,
        stdout=out,
        stderr=err,
        text=True,
    )
    process.files = (out, err)
    return process


def _result(process, timeout=400) -> dict:
    """The ``RESULT`` line of a finished subprocess; :class:`Stalled` (with its stacks) if it
    runs past ``timeout`` seconds."""
    out, err = process.files
    with out, err:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            process.wait(timeout=60)
            err.seek(0)
            stacks = err.read()[-6000:]
            raise Stalled(f"no result after {timeout} s; its stacks:\n{stacks}") from None
        out.seek(0), err.seek(0)
        assert process.returncode == 0, err.read()[-3000:]
        line = next(line for line in out.read().splitlines() if line.startswith("RESULT"))
        return json.loads(line[len("RESULT") :])


def _run_once_more_if_stalled(start):
    """``start()`` -> processes; their results, started once more if one stalled."""
    processes = start()
    try:
        return [_result(p) for p in processes]
    except Stalled as stalled:
        for p in processes:
            p.kill()
            p.wait()
            for file in p.files:
                file.close()
        warnings.warn(f"a subprocess stalled and was started again: {stalled}", stacklevel=2)
        return [_result(p) for p in start()]


def _max_difference(a: dict, b: dict) -> float:
    import numpy as np

    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(np.subtract(a[k], b[k])))) for k in a)


@pytest.mark.slow
def test_four_devices_match_one_device_for_the_first_16_steps():
    flags = {"XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=4"}
    (out,) = _run_once_more_if_stalled(lambda: [_python(_compare(), flags)])
    for method in ("float", "cgmq"):
        one, four = out[method]["1"], out[method]["4"]
        assert _max_difference(one["params"], four["params"]) < 1e-4, method
        assert abs(one["accuracy"] - four["accuracy"]) <= 1 / 128
    cgmq_one, cgmq_four = out["cgmq"]["1"], out["cgmq"]["4"]
    assert cgmq_one["within_budget"] and cgmq_four["within_budget"]
    assert cgmq_one["bops"] == cgmq_four["bops"] <= 2e6


def test_steps_over_several_devices_of_one_cpu_do_not_overlap():
    from types import SimpleNamespace

    from cgmq_jax import parallel

    def devices(n, platform="cpu", process=0):
        return [SimpleNamespace(platform=platform, process_index=process) for _ in range(n)]

    assert parallel.steps_must_not_overlap(devices(4))
    assert not parallel.steps_must_not_overlap(devices(1))
    assert not parallel.steps_must_not_overlap(devices(4, "gpu"))
    assert not parallel.steps_must_not_overlap(devices(4, process=1))  # another process's
    assert not parallel.Placement(parallel.data_parallel_mesh(1)).synchronous


def test_devices_beyond_the_machine_are_a_clear_error():
    from cgmq_jax import data, train

    config = train.TrainConfig(method="float", epochs=1, pretrain_epochs=0, devices=64)
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=64"):
        train.fit(config, data.synthetic(), log=lambda _: None)
    with pytest.raises(ValueError, match="multiple of the number of devices"):
        train.TrainConfig(batch_size=30, devices=4).validate()


def test_cli_refuses_more_devices_before_writing_anything(tmp_path, capsys):
    import runpy

    main = runpy.run_path(str(ROOT / "experiments" / "mnist.py"))["main"]
    assert main(["--devices", "64", "--out", str(tmp_path / "run")]) == 2
    assert "xla_force_host_platform_device_count=64" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["--coordinator", "localhost:1", "--resume", "--out", str(tmp_path)]) == 2


def test_cli_splits_the_cpu_into_the_devices_asked_for(tmp_path, capsys, monkeypatch):
    import runpy

    from cgmq_jax.runs import parallel

    asked = []
    monkeypatch.setattr(parallel, "usable_cpus", lambda: 2)
    monkeypatch.setattr(parallel, "split_cpu", lambda n: asked.append(n) or False)
    main = runpy.run_path(str(ROOT / "experiments" / "mnist.py"))["main"]
    # This process's backend is up (one device), so the split cannot happen here: the run
    # stops with the mesh's message before writing anything.
    assert main(["--devices", "2", "--out", str(tmp_path / "run")]) == 2
    assert asked == [2] and "cgmq_jax.runs.parallel.split_cpu(2)" in capsys.readouterr().err
    assert main(["--devices", "3", "--out", str(tmp_path / "run")]) == 2
    assert asked == [2], "more devices than usable CPUs: no split"
    assert not (tmp_path / "run").exists()


def test_split_cpu_makes_devices_before_the_backend_starts_only():
    script = textwrap.dedent(
        """
        import json
        import jax
        from cgmq_jax.runs import parallel
        first = parallel.split_cpu(2)
        count = jax.device_count()
        print("RESULT" + json.dumps([first, count, parallel.split_cpu(3), jax.device_count()]))
        """
    )
    assert _result(_python(script, {}), timeout=120) == [True, 2, False, 2]


# jax.distributed.initialize comes before anything (cgmq_jax included) starts a backend.
MULTIHOST = (
    textwrap.dedent(
        """
    import sys, jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, process = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process)
    """
    )
    + RUN
    + f'print("RESULT" + json.dumps(summary(run("cgmq", 2, **{ARGS["cgmq"]!r}))))\n'
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_as_one_two_device_run():
    """``jax.distributed.initialize`` on this machine: 2 processes x 1 CPU device each."""

    def start():
        port = str(_free_port())
        return [_python(MULTIHOST, {}, args=(port, str(i))) for i in range(2)]

    results = _run_once_more_if_stalled(start)
    flags = {"XLA_FLAGS": f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=2"}
    script = _compare(methods=("cgmq",), devices=(2,))
    (single,) = _run_once_more_if_stalled(lambda: [_python(script, flags)])
    single = single["cgmq"]["2"]
    for result in results:
        assert _max_difference(result["params"], single["params"]) < 1e-4
        assert result["within_budget"] and result["bops"] == single["bops"]
