"""Checkpoints of the full training state with Orbax, for resuming a run bit for bit.

A checkpoint has two items: ``state``, a pytree of arrays (the train state's params, the
optimizer state, including :class:`cgmq_jax.constraint.ConstrainedUpdateState`, the step
counter, the best feasible params so far, and in the float phase of a model with
BatchNorm its ``batch_stats``), saved with ``orbax.checkpoint``'s
``StandardSave``; and ``meta``, JSON (phase, epoch, position in the epoch, history, the
losses of a partial epoch). Orbax writes each checkpoint into a temporary directory and
renames it when complete, so a checkpoint interrupted by a kill is never restored.
Checkpoints are numbered by the global batch count; only the latest is kept.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

_STATE = "state"
_META = "meta"


def _quiet(args) -> None:
    del args


class CheckpointError(OSError):
    """A checkpoint could not be written; the message names the directory and the cause."""


class Checkpointer:
    """Save and restore ``(arrays, meta)`` pairs in ``directory``; only the latest is kept."""

    def __init__(self, directory: str | os.PathLike):
        # Orbax logs every save at INFO, and a failed write at ERROR before it raises (the
        # error is reported as a CheckpointError).
        logging.getLogger("absl").setLevel(logging.CRITICAL)
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
        """Save checkpoint number ``index`` (increasing) and wait until it is on disk.

        Raises:
          CheckpointError: it could not be written (a full disk, say); its partial files
            are removed and the previous checkpoint stays the latest.
        """
        # Orbax's writer threads print their own tracebacks when a write fails; the failure
        # is reported once, below, as a CheckpointError. After a failure they stay quiet
        # (their event loops are torn down as the run stops).
        hook, threading.excepthook = threading.excepthook, _quiet
        try:
            self._manager.save(
                index,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardSave(arrays), _META: ocp.args.JsonSave(meta)}
                ),
                force=True,
            )
            self._manager.wait_until_finished()
            threading.excepthook = hook
        except Exception as error:  # orbax and tensorstore raise several types
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # its orphaned tasks
            for partial in self.directory.glob(f"{index}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            if "No space left on device" in reason:
                reason = "No space left on device"
            raise CheckpointError(
                f"cannot write a checkpoint into {self.directory} ({reason[:200]})"
            ) from None

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
