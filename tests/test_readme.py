"""The README's example code runs, and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import jax

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_constrained_update_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"):  # optax.adam, see conftest.py
        exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    specs, params = namespace["specs"], namespace["params"]
    assert namespace["cost"].exact_bops(params, specs) <= 2e6
