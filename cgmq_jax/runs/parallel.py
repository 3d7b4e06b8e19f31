"""Where training runs: a 1-D data-parallel mesh over devices, and several processes.

One code path for one device and for many: :class:`Placement` holds the mesh, and
``train.make_train_step`` jits the step with its shardings (the batch split, everything
else replicated); XLA inserts the all-reduce of the gradients (``jax.sharding``'s automatic
SPMD). :func:`start_processes` joins a run over several processes (``jax.distributed``);
:func:`use_compilation_cache` keeps compiled steps across processes.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_parallel_mesh(devices: int = 1) -> Mesh:
    """A 1-D mesh (axis ``"batch"``) over the first ``devices`` of ``jax.devices()``.

    With several processes (``jax.distributed.initialize``) the devices are all processes'
    devices, and each process must hold the same number of them in the mesh.

    Raises:
      ValueError: more devices asked for than there are (the message says how to get more
        on a CPU), or a mesh that leaves a process out unevenly.
    """
    available = jax.devices()
    if devices > len(available):
        raise ValueError(
            f"--devices {devices}: only {len(available)} device(s) available "
            f"({available[0].platform}). On a CPU, split it into {devices} devices before "
            f"JAX computes anything: cgmq_jax.runs.parallel.split_cpu({devices}) right after "
            f"`import jax` (jax.config.update('jax_num_cpu_devices', {devices})) or "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}; "
            f"experiments/mnist.py --devices N does it for N up to the {usable_cpus()} CPUs "
            "this process may use"
        )
    chosen = available[:devices]
    per_process = {}
    for device in chosen:
        per_process[device.process_index] = per_process.get(device.process_index, 0) + 1
    if len(per_process) != jax.process_count() or len(set(per_process.values())) != 1:
        raise ValueError(
            f"--devices {devices} must take the same number of devices from each of the "
            f"{jax.process_count()} processes (they have {len(available)} in all)"
        )
    return Mesh(np.asarray(chosen), ("batch",))


def split_cpu(devices: int) -> bool:
    """Split the host CPU into ``devices`` JAX devices, so that a data-parallel run
    (:func:`data_parallel_mesh`, ``--devices N``) works on the cores side by side.

    XLA:CPU runs many of a step's operations (its convolutions among them) on one thread,
    so on a 2-core machine one device leaves a core idle for much of a step; two devices
    each take half the batch. Measured on that machine, CGMQ's step on 2 devices against
    1, paired per round in one process: ``lenet5_bb`` 1.22x, the DS-CNN 1.07x, LeNet-5
    0.99x (docs/performance.md). The gradient is then the mean of the devices' means:
    the same up to float rounding, so a run's trajectory is not the one-device run's.

    Uses ``jax.config.update("jax_num_cpu_devices", devices)``, which only takes effect
    before JAX starts its backends and changes nothing on an accelerator's devices.

    Returns:
      Whether the CPU is now split so: ``False`` once JAX has computed anything (start a
      new process, or set it right after ``import jax``).
    """
    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError:  # the backends are up: the split can no longer change
        return False
    return True


def usable_cpus() -> int:
    """The number of CPUs this process may run on (its affinity: ``taskset`` narrows it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def use_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache in ``<data cache>/xla/cpus-N``
    (``$CGMQ_CACHE_DIR``, else ``~/.cache/cgmq_jax``; ``N`` = :func:`usable_cpus`), so that
    a run after the first loads its compiled steps instead of compiling them (LeNet-5's QAT
    step: about 13 s to compile on a 2-core CPU; docs/performance.md). What a cached step
    computes is what a compiled one does.

    One directory per CPU count: XLA:CPU splits a program's loops for the threads it has
    when it compiles, and JAX's cache key does not hold that number, so a step compiled in
    a process pinned to one core (``taskset -c 0``) and loaded by one with two ran on one
    thread: LeNet-5's cgmq step 4,200 samples/s against 9,200 compiled afresh, and
    ``make demo`` 155-172 s against 84-91 s (docs/performance.md).

    The scripts call it first; ``JAX_COMPILATION_CACHE_DIR`` (another directory, used as
    given) or ``JAX_ENABLE_COMPILATION_CACHE=false`` (off) in the environment take
    precedence. Returns the directory, or ``None`` when the cache is off.
    """
    from cgmq_jax.data import default_cache_dir

    if not jax.config.jax_enable_compilation_cache:
        return None
    if not jax.config.jax_compilation_cache_dir:
        directory = default_cache_dir() / "xla" / f"cpus-{usable_cpus()}"
        jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    return jax.config.jax_compilation_cache_dir


def start_processes(coordinator: str, num_processes: int, process_id: int) -> None:
    """Join a data-parallel run over several processes (hosts): ``jax.distributed``.

    Call it in every process, before any JAX computation, with the same ``coordinator``
    (``host:port`` of process 0) and ``num_processes``; then ``jax.devices()`` lists every
    process's devices and ``fit`` with ``devices=jax.device_count()`` trains over all of
    them. On CPUs the collectives go through gloo.
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process_id {process_id} must be in [0, {num_processes}) (--num_processes)"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a train step runs: a mesh, the batch split over it, everything else replicated.

    One code path for one device and for many: the step is jitted with these shardings and
    XLA inserts the all-reduce of the gradients (``jax.sharding``'s automatic SPMD).
    """

    mesh: Mesh

    @property
    def replicated(self) -> NamedSharding:
        """A whole copy on every device of the mesh (params, optimizer state)."""
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch(self) -> NamedSharding:
        """The leading (batch) axis split over the mesh's ``"batch"`` axis."""
        return NamedSharding(self.mesh, PartitionSpec("batch"))

    def put_batch(self, *arrays: np.ndarray):
        """A global batch (the same on every process) as arrays split over the mesh: each
        process hands over only its own rows."""
        processes, index = jax.process_count(), jax.process_index()
        out = []
        for array in arrays:
            rows = len(array) // processes
            local = array[index * rows : (index + 1) * rows]
            out.append(jax.make_array_from_process_local_data(self.batch, local, array.shape))
        return tuple(out)

    @property
    def synchronous(self) -> bool:
        """Whether each step must finish before the next is dispatched: see
        :func:`steps_must_not_overlap`."""
        return steps_must_not_overlap(self.mesh.devices.flat)

    def replicate(self, tree):
        """A copy of ``tree`` on every device of the mesh (a copy: the step donates it)."""
        return jax.device_put(tree, self.replicated, may_alias=False)


def steps_must_not_overlap(devices) -> bool:
    """Whether ``devices`` are several devices of one CPU in this process.

    XLA:CPU (jaxlib 0.10.2) then sometimes waits forever in a step's first all-reduce for
    devices whose part of the step never starts, when steps are dispatched ahead of the
    running one. Measured with ten 1-epoch trainings per process on 4 forced devices of
    this machine's 2 cores: stalls in 7 of 11 processes with steps overlapping (also with
    single-threaded Eigen); none in 6 processes (60 trainings) when each step waits.
    The split CPU's speed (:func:`split_cpu`) is measured with each step waiting.
    """
    local = [d for d in devices if d.process_index == jax.process_index()]
    return len(local) > 1 and local[0].platform == "cpu"


def local_copy(tree):
    """A pytree of (replicated) arrays as NumPy arrays of this process (no collective)."""

    def copy(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(leaf.addressable_shards[0].data)
        return np.asarray(leaf) if isinstance(leaf, jax.Array) else leaf

    return jax.tree.map(copy, tree)
