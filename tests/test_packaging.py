"""The wheel holds every subpackage: what ``pip install`` gives is what the repository has."""

from __future__ import annotations

import pathlib
import tomllib

import setuptools

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_every_subpackage_is_in_the_wheel():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    find = config.get("packages", {})
    if isinstance(find, list):  # an explicit list: exactly these and nothing below them
        packaged = set(find)
    else:
        packaged = set(setuptools.find_packages(str(REPO), **find.get("find", find)))
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "cgmq_jax").rglob("__init__.py")
    }
    assert on_disk - packaged == set(), f"subpackages missing from the wheel: {on_disk - packaged}"
    assert {"cgmq_jax.export", "cgmq_jax.data"} <= on_disk
