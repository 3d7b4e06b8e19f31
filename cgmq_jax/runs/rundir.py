"""A run directory that is consistent or absent: a lock, checkpoints, an atomic publish.

Layout of ``OUT/`` (the CLI's ``--out``):

* ``results.json``: written last, atomically; it is the run's commit record. It holds the
  SHA-256 of ``params.msgpack``, so a reader can tell that the two belong together
  (:func:`load_run` checks it). A directory without it holds no finished run.
* ``params.msgpack``, ``training.png``: written atomically before ``results.json``.
* ``checkpoints/``: Orbax checkpoints of the full training state (and the run's flags,
  so that ``--resume`` can refuse different ones) while the run is unfinished (see
  :mod:`cgmq_jax.runs.checkpoint`); removed once the run is published.
* ``.lock``: ``flock``-ed by the live run (the kernel releases it when the process dies,
  even by SIGKILL), so a second run into the same directory is refused.

``OUT`` must be new, empty, or a run directory (holding one of :data:`RUN_MARKERS`): an
empty ``--out`` (which would mean the current directory) and a directory of other files
(``--out .`` in a source tree) are refused. A checkpoint is verified against the SHA-256
digests recorded when it was written (:mod:`cgmq_jax.runs.checkpoint`) before it is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cgmq_jax import files

PARAMS_FILE = "params.msgpack"
RESULTS_FILE = "results.json"
PLOT_FILE = "training.png"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"


def changed_flags(stored: dict | None, flags: dict | None) -> list[str]:
    """The flags whose values differ between a checkpoint and a resume (sorted).

    A flag missing on one side counts as ``None`` there, so a checkpoint written before a
    flag existed resumes with that flag unset.
    """
    if stored is None or flags is None:
        return []
    return sorted(k for k in stored.keys() | flags.keys() if stored.get(k) != flags.get(k))


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message says why and what to do."""


def strict_json(value: Any) -> str:
    """``json.dumps`` that refuses NaN and infinities (strict JSON readers reject them)."""
    try:
        return json.dumps(value, indent=2, allow_nan=False)
    except ValueError as error:
        raise ValueError(f"refusing to write non-finite numbers into JSON: {error}") from None


RUN_MARKERS = (RESULTS_FILE, CHECKPOINT_DIR, LOCK_FILE)


def _check_out(path: str | os.PathLike) -> None:
    """Refuse an ``--out`` that is empty, a file, or a directory holding other things.

    A directory that is not empty must hold a run (one of :data:`RUN_MARKERS`): a run is
    never written among unrelated files (``--out .`` in a source tree, say).
    """
    if not str(path).strip():
        raise RunDirError("--out is empty; name a directory for the run (e.g. --out runs/mnist)")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {path} is an existing file, not a directory; pick another")
    try:
        names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    except OSError:
        return  # unreadable: reported as "cannot be written" below
    if names and not any(name in names for name in RUN_MARKERS):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise RunDirError(
            f"--out {path} is a directory that holds no run but other files ({shown}); "
            "pick a new or empty directory"
        )


class RunDir:
    """An output directory held by this process. Use :meth:`open`; close it when done."""

    def __init__(self, path: Path, lock_fd: int, *, created: bool = False):
        self.path = path
        self._lock_fd = lock_fd
        self._created = created

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        flags: dict | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> RunDir:
        """Create (or reuse) ``path``, check it is writable, lock it, and check its state.

        Args:
          path: the directory.
          flags: the run's settings; ``resume`` refuses others than the checkpoint's.
          resume: continue the unfinished run in ``path`` from its last checkpoint.
          overwrite: discard whatever ``path`` holds (a finished or unfinished run).

        Raises:
          RunDirError: ``path`` is empty, a file, a directory holding files but no run,
            cannot be created or written, is held by another
            live run, holds a finished run (and not ``overwrite``), holds an unfinished one
            (and neither ``resume`` nor ``overwrite``), ``resume`` finds nothing to resume
            or different flags, or its latest checkpoint fails its digests
            (:class:`cgmq_jax.runs.checkpoint.CheckpointCorrupt`, naming the fix).
        """
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite exclude each other; pick one")
        _check_out(path)
        path = Path(path)
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
            lock_fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            reason = error.strerror or error.__class__.__name__
            raise RunDirError(f"--out {path} cannot be written ({reason}); pick another") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(lock_fd)
            raise RunDirError(
                f"--out {path} is in use by another live run (pid {holder}); wait for it or "
                "pick another --out"
            ) from None
        run = cls(path, lock_fd, created=created)
        try:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, str(os.getpid()).encode(), 0)
            run._check_state(flags, resume=resume, overwrite=overwrite)
        except BaseException:
            run.close()
            raise
        return run

    def _check_state(self, flags: dict | None, *, resume: bool, overwrite: bool) -> None:
        files.remove_stale_temporaries(self.path)
        if overwrite:
            # Un-publish first: from here on the directory holds no finished run.
            (self.path / RESULTS_FILE).unlink(missing_ok=True)
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        finished = (self.path / RESULTS_FILE).exists()
        if finished:
            advice = "nothing to resume" if resume else "pass --overwrite to replace it"
            raise RunDirError(
                f"{self.path} already holds a finished run; {advice} (or pick another --out)"
            )
        meta = self.checkpointer.latest_meta() if self.checkpoint_dir.exists() else None
        if meta is None:
            # Killed before its first checkpoint, or new: nothing to keep.
            self._drop_checkpoints()
            return
        if not resume:
            raise RunDirError(
                f"{self.path} holds an unfinished run (checkpoint at {meta.get('position')}); "
                "pass --resume to continue it or --overwrite to start over"
            )
        stored = meta.get("flags")
        changed = changed_flags(stored, flags)
        if changed:
            details = ", ".join(f"--{k} {stored.get(k)!r} -> {flags.get(k)!r}" for k in changed)
            raise RunDirError(
                f"--resume needs the flags of the run in {self.path}; these differ: {details}"
            )

    @property
    def checkpoint_dir(self) -> Path:
        """The run's checkpoint directory, ``<run>/checkpoints``."""
        return self.path / CHECKPOINT_DIR

    @functools.cached_property
    def checkpointer(self):
        """The :class:`cgmq_jax.runs.checkpoint.Checkpointer` of ``checkpoints/``."""
        from cgmq_jax.runs import checkpoint

        return checkpoint.Checkpointer(self.checkpoint_dir)

    def publish(self, params_bytes: bytes, results: dict, write_plot) -> None:
        """Write the params and the plot, then ``results.json`` (with the params' SHA-256)
        last, each atomically; then drop the checkpoints and ``flags.json``.

        ``write_plot(file_object)`` writes the PNG.
        """
        files.write_bytes(self.path / PARAMS_FILE, params_bytes)
        with files.atomic_write(self.path / PLOT_FILE, "wb") as f:
            write_plot(f)
        results = {**results, "params_file": PARAMS_FILE}
        results["params_sha256"] = files.sha256_file(self.path / PARAMS_FILE)
        files.write_text(self.path / RESULTS_FILE, strict_json(results))
        self._drop_checkpoints()

    def _drop_checkpoints(self) -> None:
        if "checkpointer" in self.__dict__:
            self.checkpointer.close()
            del self.__dict__["checkpointer"]
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def close(self) -> None:
        """Release the lock; a directory left holding nothing but it is removed again."""
        if "checkpointer" in self.__dict__:
            self.checkpointer.close()
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            if {p.name for p in self.path.iterdir()} <= {LOCK_FILE, CHECKPOINT_DIR}:
                if self.checkpoint_dir.exists() and any(self.checkpoint_dir.iterdir()):
                    raise OSError("checkpoints to keep")
                shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
                (self.path / LOCK_FILE).unlink()  # still locked: nobody else holds it now
                if self._created:
                    self.path.rmdir()
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_run(path: str | os.PathLike, *, restore: bool = False) -> tuple[dict, Any]:
    """A finished run's ``results.json`` (parsed) and its params, verified: the one way to
    read a run (one read and one SHA-256 of each file).

    Args:
      path: the run directory (the CLI's ``--out``).
      restore: return the params as a nested dict of numpy arrays, not the file's bytes.

    Returns:
      ``(results, params)``: ``params`` the params file's bytes, or with ``restore`` the
      parameter tree (``report.load_params`` is the deprecated shorthand for this).

    Raises:
      RunDirError: no finished run in ``path``, an unreadable ``results.json``, a params
        file whose SHA-256 is not the one ``results.json`` records, or (``restore``) one
        that is not a params file (each names the file).
    """
    path = Path(path)
    results_file, params_file = path / RESULTS_FILE, path / PARAMS_FILE
    if not results_file.is_file():
        state = "an unfinished run" if (path / CHECKPOINT_DIR).exists() else "no finished run"
        raise RunDirError(f"{path}: {state} (no {RESULTS_FILE}); is this a run directory?")
    try:
        results = json.loads(results_file.read_text(), parse_constant=_refuse_constant)
    except (OSError, ValueError) as error:
        raise RunDirError(f"{results_file}: unreadable ({error})") from None
    if not isinstance(results, dict):
        raise RunDirError(f"{results_file}: not a results object")
    try:
        payload = params_file.read_bytes()
    except OSError as error:
        raise RunDirError(f"{params_file}: unreadable ({error.strerror})") from None
    expected = results.get("params_sha256")
    if expected is None:
        raise RunDirError(f"{results_file}: records no params_sha256 (written by an old version?)")
    actual = files.sha256_digest(payload)
    if actual != expected:
        raise RunDirError(
            f"{params_file}: SHA-256 {actual[:12]}... is not the {expected[:12]}... that "
            f"{results_file.name} records; the directory does not hold the model it describes"
        )
    if not restore:
        return results, payload
    import flax.serialization  # only here: reading a run's JSON does not load Flax

    try:
        return results, flax.serialization.msgpack_restore(payload)
    except Exception as error:  # msgpack raises several unrelated types
        raise RunDirError(f"{params_file}: not a params file ({error})") from None


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name}")
