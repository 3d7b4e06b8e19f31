"""Atomic file writes and checksums: the one way the package writes a file another reads.

A file is written to a temporary name in its own directory, flushed and fsynced, then
renamed over the target (``os.replace`` is atomic on POSIX), so a reader sees the old file
or the new one, never a part. On any failure (a full disk, an exception, Ctrl-C) the
temporary file is removed; only SIGKILL can leave one, and :func:`remove_stale_temporaries`
clears those (their names start with ``.`` and end with :data:`TMP_SUFFIX`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".partial"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

    Examples:
      >>> import pathlib, tempfile
      >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
      >>> with atomic_write(target, "w") as f:
      ...     _ = f.write("hello")
      >>> target.read_text()
      'hello'
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; these files are not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """``Path.write_bytes``, atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(payload)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``Path.write_text`` (UTF-8), atomically (see :func:`atomic_write`)."""
    write_bytes(path, text.encode("utf-8"))


def sha256_digest(payload: bytes) -> str:
    """The hex SHA-256 of some bytes."""
    return hashlib.sha256(payload).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed writer left in ``directory``; return them."""
    stale = [p for p in Path(directory).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
