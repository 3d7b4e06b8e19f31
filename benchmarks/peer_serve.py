"""How ``benchmarks/train_step.py`` times a peer (PyTorch, Qwix) in its own Python.

A peer script builds its step, warms it up (compiles it, for Qwix), then calls :func:`serve`:
one process per peer and network for the whole benchmark, so that neither its start nor its
compile is timed, and its rounds interleave with ours as our own configurations do. Each
line ``N`` on stdin times N steps and answers one JSON line on stdout; end of input ends it.
Without ``--serve`` a peer times ``--steps`` once and prints that line (by hand).

Standard library only: it runs in the peers' venv, which has no cgmq_jax.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable


def time_steps(
    step: Callable[[int], object], sync: Callable[[object], None], steps: int, batch_size: int
) -> float:
    """Samples per second of ``steps`` calls of ``step(i)``; ``sync`` waits for the last."""
    start = time.perf_counter()
    out = None
    for i in range(steps):
        out = step(i)
    sync(out)
    return steps * batch_size / (time.perf_counter() - start)


def serve(step, sync, batch_size: int, info: dict, *, once: int | None = None) -> None:
    """Answer ``{"samples_per_second", "steps", **info}`` per request (see the module).

    ``once``: time that many steps, print the answer, return (no stdin).
    """
    requests = [str(once)] if once is not None else sys.stdin
    if once is None:
        print(json.dumps({"ready": True, **info}), flush=True)
    for line in requests:
        if not line.strip():
            continue
        steps = int(line)
        rate = time_steps(step, sync, steps, batch_size)
        print(json.dumps({"samples_per_second": rate, "steps": steps, **info}), flush=True)
