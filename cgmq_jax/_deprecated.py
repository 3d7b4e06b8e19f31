"""Names that moved to another module: the old name still resolves, with a warning."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def moved(module: str, homes: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``module``: a name in ``homes`` is imported from its new
    home (``homes[name]``, a module path) with a ``DeprecationWarning`` that names it;
    any other name raises the usual ``AttributeError``."""

    def __getattr__(name: str):
        if name in homes:
            warnings.warn(
                f"{module}.{name} is deprecated: use {homes[name]}.{name}",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(homes[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
