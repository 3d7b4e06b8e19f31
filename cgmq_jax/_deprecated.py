"""Names that moved to another module: the old name still resolves, with a warning."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def moved(
    module: str, homes: dict[str, str], *, warn: bool = True, namespace: dict | None = None
) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``module``: a name in ``homes`` is imported from its new
    home (``homes[name]``, a module path) with a ``DeprecationWarning`` that names it;
    any other name raises the usual ``AttributeError``.

    ``warn=False``: a name that still belongs here but lives in a module that imports this
    one (so it cannot be imported at the top), resolved without a warning; with
    ``namespace`` (the module's ``globals()``) it is stored there once resolved, so later
    lookups (and pdoc) find it directly."""

    def __getattr__(name: str):
        if name in homes:
            if warn:
                warnings.warn(
                    f"{module}.{name} is deprecated: use {homes[name]}.{name}",
                    DeprecationWarning,
                    stacklevel=2,
                )
            value = getattr(importlib.import_module(homes[name]), name)
            if namespace is not None:
                namespace[name] = value
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
