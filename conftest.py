"""Root pytest configuration: what ``--doctest-modules`` must not collect.

The old module paths of the run harness (``cgmq_jax/train.py`` and the others below) are
deprecated aliases: each replaces itself in ``sys.modules`` by its ``cgmq_jax.runs``
module, so importing the file by path gives another module than the one its name resolves
to ("import file mismatch"). Their doctests run once, in ``cgmq_jax/runs/``.
"""

collect_ignore = [
    f"cgmq_jax/{name}.py"
    for name in ("checkpoint", "parallel", "report", "rundir", "sweep", "train")
]
