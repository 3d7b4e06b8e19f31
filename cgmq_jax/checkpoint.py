"""Checkpoints of the full training state with Orbax, for resuming a run bit for bit.

A checkpoint has two items: ``state``, a pytree of arrays (the train state's params, the
optimizer state, including :class:`cgmq_jax.constraint.ConstrainedUpdateState`, the step
counter, and the best feasible params so far), saved with ``orbax.checkpoint``'s
``StandardSave``; and ``meta``, JSON (phase, epoch, position in the epoch, history, the
losses of a partial epoch). Orbax writes each checkpoint into a temporary directory and
renames it when complete, so a checkpoint interrupted by a kill is never restored.
Checkpoints are numbered by the global batch count; only the latest is kept.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

_STATE = "state"
_META = "meta"


class Checkpointer:
    """Save and restore ``(arrays, meta)`` pairs in ``directory``; only the latest is kept."""

    def __init__(self, directory: str | os.PathLike):
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                enable_async_checkpointing=False,
                create=True,
                cleanup_tmp_directories=True,
            ),
            item_names=(_STATE, _META),
        )

    def save(self, index: int, arrays: Any, meta: dict) -> None:
        """Save checkpoint number ``index`` (increasing) and wait until it is on disk."""
        self._manager.save(
            index,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(arrays), _META: ocp.args.JsonSave(meta)}
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def latest_meta(self) -> dict | None:
        """The ``meta`` of the latest complete checkpoint, or None if there is none."""
        index = self._manager.latest_step()
        if index is None:
            return None
        restored = self._manager.restore(
            index, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        )
        return restored[_META]

    def restore_arrays(self, like: Any) -> Any:
        """The latest checkpoint's arrays, in the structure (and dtypes) of ``like``."""
        index = self._manager.latest_step()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            index, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)})
        )
        return restored[_STATE]

    def close(self) -> None:
        self._manager.close()
