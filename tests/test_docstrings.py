"""Every public symbol of ``cgmq_jax`` has a docstring (the API reference is built from them).

Read from the source with :mod:`ast` (nothing is imported, so no JAX): every module, every
top-level public function and class, and every public method (properties included) of a
public class. Public: the name does not start with ``_``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cgmq_jax"
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def missing_docstrings(source: str, where: str) -> list[str]:
    """The public symbols of one module's ``source`` without a docstring, as ``where:line name``."""
    tree = ast.parse(source)
    missing = [] if ast.get_docstring(tree) else [f"{where}: module docstring"]
    for node in tree.body:
        if not isinstance(node, _DEFS) or node.name.startswith("_"):
            continue
        if not ast.get_docstring(node):
            missing.append(f"{where}:{node.lineno} {node.name}")
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, _DEFS) and not sub.name.startswith("_"):
                    if not ast.get_docstring(sub):
                        missing.append(f"{where}:{sub.lineno} {node.name}.{sub.name}")
    return missing


def test_every_public_symbol_has_a_docstring():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, files  # the walk found the package
    missing = [
        line
        for path in files
        for line in missing_docstrings(
            path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent))
        )
    ]
    assert not missing, "public symbols without a docstring:\n" + "\n".join(missing)


def test_the_walk_finds_what_is_missing():
    source = '''"""A module."""

def public(): pass

def _private(): pass

class Public:
    """Documented."""

    @property
    def prop(self): return 1

    def _helper(self): pass

    def __call__(self): pass

class _Private:
    def method(self): pass
'''
    assert missing_docstrings(source, "m.py") == ["m.py:3 public", "m.py:11 Public.prop"]
    assert missing_docstrings("x = 1\n", "n.py") == ["n.py: module docstring"]
