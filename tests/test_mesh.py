"""Data parallel training on a device mesh: 4 devices match 1 device, the certificate holds.

The host CPU is split into 4 devices with ``XLA_FLAGS`` (which must be set before JAX
starts, hence a subprocess). Throughput on such devices is not a speed claim: they share
the same cores. Two processes with ``jax.distributed.initialize`` and CPU collectives
(gloo) train the same run over a 2-process mesh.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# 3,200 training examples, batch 32: one epoch is the first 100 steps.
RUN = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from cgmq_jax import data, train

    def run(method, devices, **kwargs):
        tiny = data.synthetic(train=3200, validation=128, test=128)
        config = train.TrainConfig(
            method=method, budget_bops=2e6 if method == "cgmq" else None, epochs=1,
            pretrain_epochs=0, batch_size=32, devices=devices, **kwargs
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

COMPARE = RUN + textwrap.dedent(
    """
    out = {}
    for method in ("float", "cgmq"):
        out[method] = {n: summary(run(method, n)) for n in (1, 4)}
    print("RESULT" + json.dumps(out))
    """
)


# XLA:CPU aborts a collective whose devices do not all arrive within 40 s; on 2 shared,
# busy cores a device's thread can lag that long (seen once under load), so wait longer.
PATIENT = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
    "--xla_cpu_collective_timeout_seconds=900"
)


def _python(script: str, env: dict, args=()):
    """Start ``python -c script``; its output goes to files (processes that wait for each
    other must never block on a full pipe)."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **env}
    environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {PATIENT}".strip()
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args], env=environ, stdout=out, stderr=err, text=True
    )
    process.files = (out, err)
    return process


def _result(process, timeout=600) -> dict:
    process.wait(timeout=timeout)
    out, err = process.files
    out.seek(0), err.seek(0)
    assert process.returncode == 0, err.read()[-3000:]
    line = next(line for line in out.read().splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def _max_difference(a: dict, b: dict) -> float:
    import numpy as np

    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(np.subtract(a[k], b[k])))) for k in a)


def test_four_devices_match_one_device_for_the_first_100_steps():
    flags = "--xla_force_host_platform_device_count=4"
    out = _result(_python(COMPARE, {"XLA_FLAGS": flags}))
    for method in ("float", "cgmq"):
        one, four = out[method]["1"], out[method]["4"]
        assert _max_difference(one["params"], four["params"]) < 1e-4, method
        assert abs(one["accuracy"] - four["accuracy"]) <= 1 / 128
    cgmq_one, cgmq_four = out["cgmq"]["1"], out["cgmq"]["4"]
    assert cgmq_one["within_budget"] and cgmq_four["within_budget"]
    assert cgmq_one["bops"] == cgmq_four["bops"] <= 2e6


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
    + 'print("RESULT" + json.dumps(summary(run("cgmq", 2))))\n'
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_as_one_two_device_run():
    """``jax.distributed.initialize`` on this machine: 2 processes x 1 CPU device each."""
    port = str(_free_port())
    processes = [_python(MULTIHOST, {}, args=(port, str(i))) for i in range(2)]
    results = [_result(p) for p in processes]
    single = _result(
        _python(
            COMPARE.replace('("float", "cgmq")', '("cgmq",)').replace("(1, 4)", "(2,)"),
            {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        )
    )["cgmq"]["2"]
    for result in results:
        assert _max_difference(result["params"], single["params"]) < 1e-4
        assert result["within_budget"] and result["bops"] == single["bops"]
