"""Checkpoints of the full training state with Orbax, for resuming a run bit for bit.

A checkpoint has two items: ``state``, a pytree of arrays (the train state's params, the
optimizer state, including :class:`cgmq_jax.constraint.ConstrainedUpdateState`, the step
counter, the best feasible params so far, and in the float phase of a model with
BatchNorm its ``batch_stats``), saved with ``orbax.checkpoint``'s
``StandardSave``; and ``meta``, JSON (phase, epoch, position in the epoch, history, the
losses of a partial epoch). Orbax writes each checkpoint into a temporary directory and
renames it when complete, so a checkpoint interrupted by a kill is never restored.
Checkpoints are numbered by the global batch count; the latest two are kept.

Integrity: every checkpoint's ``meta`` carries, under the key ``_integrity``, the SHA-256
of each array of ``state`` (its dtype, shape and bytes, keyed by its path in the pytree)
and the SHA-256 of the rest of ``meta`` (canonical JSON). They are computed from the
arrays in memory before the save and written in the same atomic Orbax step as the data
they describe, so a kill never leaves a checkpoint without its digests. Reading the meta
(:meth:`Checkpointer.latest_meta`) checks its digest; restoring the arrays
(:meth:`Checkpointer.restore_arrays`) recomputes and compares every array's digest
before handing them out. A flipped bit, an edited field, a truncated or missing file is
one :class:`CheckpointCorrupt` (a :class:`cgmq_jax.runs.rundir.RunDirError`) naming the
checkpoint and the fix: the previous checkpoint (if kept) or ``--overwrite``. A
checkpoint without digests (written before they existed) is refused the same way.
The digests detect damage, not a forger who recomputes them (nothing here is secret).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cgmq_jax.runs.rundir import RunDirError

_STATE = "state"
_META = "meta"
_INTEGRITY = "_integrity"
_FORMAT = 1
_KEEP = 2  # the latest and the previous one: a fallback when the latest is damaged
_TMP = ocp.path.atomicity.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp": a save being written


def _quiet(args) -> None:
    del args


class CheckpointError(OSError):
    """A checkpoint could not be written; the message names the directory and the cause."""


class CheckpointCorrupt(RunDirError):
    """A checkpoint that cannot be trusted (damaged, partial, or without digests)."""


def _array_sha256(value: Any) -> str:
    array = np.asarray(value)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def array_digests(arrays: Any) -> dict[str, str]:
    """``{path in the pytree: SHA-256 of the leaf's dtype, shape and bytes}``."""
    leaves = jax.tree_util.tree_flatten_with_path(arrays)[0]
    return {jax.tree_util.keystr(path): _array_sha256(leaf) for path, leaf in leaves}


def meta_digest(meta: dict) -> str:
    """The SHA-256 of ``meta`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _with_integrity(arrays: Any, meta: dict) -> dict:
    meta = json.loads(json.dumps(meta))  # as it will read back (tuples become lists)
    integrity = {"format": _FORMAT, "meta_sha256": meta_digest(meta)}
    integrity["arrays_sha256"] = array_digests(arrays)
    return {**meta, _INTEGRITY: integrity}


class Checkpointer:
    """Save and restore ``(arrays, meta)`` pairs in ``directory``, verified by their digests.

    The latest two checkpoints are kept: when the latest is damaged, deleting it resumes
    from the previous one.
    """

    def __init__(self, directory: str | os.PathLike):
        # Orbax logs every save at INFO, and a failed write at ERROR before it raises (the
        # error is reported as a CheckpointError).
        logging.getLogger("absl").setLevel(logging.CRITICAL)
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=_KEEP,
                enable_async_checkpointing=False,
                create=True,
                cleanup_tmp_directories=True,
            ),
            item_names=(_STATE, _META),
        )

    def save(self, index: int, arrays: Any, meta: dict) -> None:
        """Save checkpoint number ``index`` (increasing) with its digests; wait until on disk.

        Raises:
          CheckpointError: it could not be written (a full disk, say); its partial files
            are removed and the previous checkpoint stays the latest.
        """
        meta = _with_integrity(arrays, meta)
        # Orbax's writer threads print their own tracebacks when a write fails; the failure
        # is reported once, below, as a CheckpointError. After a failure they stay quiet
        # (their event loops are torn down as the run stops).
        hook, threading.excepthook = threading.excepthook, _quiet
        _silence_closed_loop_callbacks()
        for attempt in (1, 2):
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
                return
            except Exception as error:  # orbax and tensorstore raise several types
                logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # its orphaned tasks
                for partial in self.directory.glob(f"{index}{_TMP}*"):
                    shutil.rmtree(partial, ignore_errors=True)
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                full = "No space left on device" in reason
                # Twice in CI runs (under load, rarely), Orbax 0.12.8 lost a file of
                # the save's own temporary directory mid-write: "[Errno 2] No such file or
                # directory: '.../meta.orbax-checkpoint-tmp'", and "No ArrayMetadata found
                # ... in the checkpoint directory: .../1.orbax-checkpoint-tmp/...". A failure
                # that names that directory is tried again once from scratch; a full disk,
                # or anything else, is reported at once.
                if attempt == 1 and _TMP in reason and not full:
                    continue
                if full:
                    reason = "No space left on device"
                raise CheckpointError(
                    f"cannot write a checkpoint into {self.directory} ({reason[:200]})"
                ) from None

    def latest_meta(self) -> dict | None:
        """The ``meta`` of the latest complete checkpoint (verified), or None if there is none.

        Raises:
          CheckpointCorrupt: its meta is missing, unreadable, edited, or has no digests, or
            its ``state`` directory is missing.
        """
        index = self._manager.latest_step()
        if index is None:
            return None
        meta, _ = self._verified_meta(index)
        return meta

    def restore_arrays(self, like: Any) -> Any:
        """The latest checkpoint's arrays, in the structure (and dtypes) of ``like``.

        Every array's SHA-256 is recomputed and compared with the one recorded at the save.

        Raises:
          CheckpointCorrupt: a file is missing, truncated or unreadable, or an array differs
            from the one that was saved.
        """
        index = self._manager.latest_step()
        _, integrity = self._verified_meta(index)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self._manager.restore(
                index, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(abstract)})
            )[_STATE]
        except Exception as error:  # orbax and tensorstore raise several types
            _silence_orphaned_reads()
            raise self._corrupt(index, f"{_STATE}/ unreadable: {_reason(error)}") from None
        recorded, actual = integrity["arrays_sha256"], array_digests(restored)
        if recorded.keys() != actual.keys():
            raise self._corrupt(index, f"{_STATE}/ holds other arrays than were saved")
        for path, digest in actual.items():
            if digest != recorded[path]:
                raise self._corrupt(index, f"{_STATE}/ array {path} differs from the one saved")
        return restored

    def _verified_meta(self, index: int) -> tuple[dict, dict]:
        """``(meta without its digests, the digests)`` of checkpoint ``index``, checked."""
        step = self.directory / str(index)
        if not (step / _STATE).is_dir():
            raise self._corrupt(index, f"{_STATE}/ is missing")
        if not (step / _META / "metadata").is_file():
            raise self._corrupt(index, f"{_META}/metadata is missing")
        try:
            meta = self._manager.restore(
                index, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )[_META]
        except Exception as error:  # orbax raises several types
            raise self._corrupt(index, f"{_META}/metadata unreadable: {_reason(error)}") from None
        integrity = meta.pop(_INTEGRITY, None) if isinstance(meta, dict) else None
        if not isinstance(integrity, dict) or integrity.get("format") != _FORMAT:
            raise self._corrupt(index, "it records no digests (written by an older cgmq-jax?)")
        if not isinstance(integrity.get("arrays_sha256"), dict):
            raise self._corrupt(index, f"{_META}/metadata records no array digests")
        if meta_digest(meta) != integrity.get("meta_sha256"):
            raise self._corrupt(index, f"{_META}/metadata differs from the one saved")
        return meta, integrity

    def _corrupt(self, index: int, what: str) -> CheckpointCorrupt:
        step = self.directory / str(index)
        earlier = [i for i in self._manager.all_steps() if i < index]
        advice = "pass --overwrite to start over"
        if earlier:
            previous = self.directory / str(max(earlier))
            advice = f"delete {step} to resume from the previous checkpoint {previous}, or {advice}"
        return CheckpointCorrupt(f"checkpoint {step} cannot be used: {what}; {advice}")

    def close(self) -> None:
        """Closes the Orbax checkpoint manager (waits for its pending writes)."""
        self._manager.close()


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    reason = text[0] if text else type(error).__name__
    return reason.split(" See full TensorStore details")[0].rstrip(". ")[:160]


def _closed_loop_callback(unraisable) -> bool:
    """An orphaned TensorStore write's callback into Orbax's already closed event loop."""
    exc, tb = unraisable.exc_value, unraisable.exc_traceback
    if not isinstance(exc, RuntimeError) or str(exc) != "Event loop is closed":
        return False
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "asyncio" in tb.tb_frame.f_code.co_filename


def _silence_closed_loop_callbacks() -> None:
    """Drop the closed-loop callbacks of a failed write; installed once, by the first save.

    After a failed write (a full disk), TensorStore still completes the write's other
    chunks and calls back into Orbax's event loop, closed by then; each callback's
    ``RuntimeError: Event loop is closed`` reaches ``sys.unraisablehook`` (seen: up to 42
    tracebacks around the one-line error). The failure is reported once, as a
    :class:`CheckpointError`: drop exactly those, pass everything else on.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_cgmq_closed_loop_filter", False):
        return

    def hook(unraisable) -> None:
        if not _closed_loop_callback(unraisable):
            previous(unraisable)

    hook._cgmq_closed_loop_filter = True
    sys.unraisablehook = hook


def _silence_orphaned_reads() -> None:
    """After a failed restore, Orbax's other reads of the same checkpoint fail too, in
    coroutines nobody awaits; Python would print each one's traceback when it is collected.
    The failure is reported once, as a :class:`CheckpointCorrupt`: drop those."""
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        where = unraisable.exc_traceback
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        if where is None or "orbax" not in where.tb_frame.f_code.co_filename:
            previous(unraisable)

    sys.unraisablehook = hook
    gc.collect()
