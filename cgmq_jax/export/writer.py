"""Deprecated alias of :mod:`cgmq_jax.lowering` (and, for the check against the model and
run directories, of :mod:`cgmq_jax.model_check` and :mod:`cgmq_jax.runs.export_run`).

The JAX side of the export moved out of the numpy-only :mod:`cgmq_jax.export` package:
``export``, ``build``, ``differences``, ``round_to_odd``, ... are :mod:`cgmq_jax.lowering`'s;
``compare_with_model`` and ``layer_inputs`` are :mod:`cgmq_jax.model_check`'s (the lowering
re-exports them); ``export_run``, ``derive_run`` and ``read_results`` (which read a
trainer's run directory) are :mod:`cgmq_jax.runs.export_run`'s. ``writer.X`` still
resolves every one of them, and setting ``writer.X`` (``monkeypatch.setattr``) sets it on
the module that owns it, so code calling through either name sees the change.
"""

import importlib as _importlib
import sys as _sys
import types as _types

#: The names that live in :mod:`cgmq_jax.runs.export_run` (imported on first use).
_RUN_NAMES = frozenset({"export_run", "derive_run", "read_results", "open_run", "RunExport"})
#: The names that live in :mod:`cgmq_jax.model_check` (the lowering re-exports them).
_CHECK_NAMES = frozenset({"compare_with_model", "layer_inputs"})


def _owner(name: str) -> _types.ModuleType:
    if name in _RUN_NAMES:
        module = "cgmq_jax.runs.export_run"
    elif name in _CHECK_NAMES:
        module = "cgmq_jax.model_check"
    else:
        module = "cgmq_jax.lowering"
    return _importlib.import_module(module)


def _forward(name: str) -> property:
    """``writer.<name>``: read, set and deleted on the module that owns ``name``. A data
    descriptor, so ``monkeypatch.setattr(writer, name, ...)`` saves and restores the
    owner's value through it."""

    def get(self):
        return getattr(_owner(name), name)

    def put(self, value) -> None:
        setattr(_owner(name), name, value)

    def delete(self) -> None:
        delattr(_owner(name), name)

    return property(get, put, delete)


class _Alias(_types.ModuleType):
    """A module whose attributes are those of the modules that own them."""

    def __getattr__(self, name: str):  # a name the owner gained after this alias was made
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_owner(name), name)

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("__") or hasattr(type(self), name):
            super().__setattr__(name, value)  # a dunder, or through the forwarding property
        else:
            setattr(_owner(name), name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(_owner(""))) | _RUN_NAMES)


for _name in [*dir(_owner("")), *_RUN_NAMES]:
    if not _name.startswith("__"):
        setattr(_Alias, _name, _forward(_name))
_sys.modules[__name__].__class__ = _Alias
