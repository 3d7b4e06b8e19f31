"""IDX files: the format MNIST and Fashion-MNIST are published in.

A directory holding the four files (optionally gzipped) is a source of its own
(``source="idx"``); the Debian Fashion-MNIST package ships the same four files.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from cgmq_jax.data.core import MAX_ARRAY_BYTES, NUM_CLASSES, DataError, Split, one_line

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
_CHUNK = 1 << 20


def find_file(directory: Path, name: str) -> Path:
    """``directory/name`` or ``directory/name.gz``, whichever exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"missing IDX file {directory / name}[.gz]; put the four IDX files "
        f"({', '.join(FILES.values())}) in {directory}"
    )


def read_bytes(path: Path) -> bytes | bytearray:
    """The file's bytes, gunzipped if its name ends in ``.gz``; bounded by its header.

    The header (magic and dims, the first bytes) is read first; the size it announces must
    not exceed :data:`~cgmq_jax.data.core.MAX_ARRAY_BYTES`, and at most one byte more than
    it is read (and decompressed), so a gzip bomb or a huge file costs no more memory than
    the data it claims to be. :func:`parse` then refuses a file of any other length.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08":
                return head  # not unsigned-byte IDX: parse() names the problem
            head += f.read(4 * head[3])
            dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(head[3])]
            size = math.prod(dims) if len(head) == 4 + 4 * head[3] else 0
            if size > MAX_ARRAY_BYTES:
                raise DataError(
                    f"IDX file {path} announces {size:,} bytes (dims {tuple(dims)}), more than "
                    f"the {MAX_ARRAY_BYTES:,} this reader accepts; is it an IDX file of MNIST?"
                )
            return _read_into(f, head, size + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read IDX file {path} ({one_line(err)})") from None


def _read_into(f, head: bytes, limit: int) -> bytearray:
    """``head`` followed by at most ``limit`` more bytes of ``f``, in one buffer (no copies)."""
    buffer = bytearray(len(head) + limit)
    buffer[: len(head)] = head
    view, filled = memoryview(buffer), len(head)
    while filled < len(buffer):
        count = f.readinto(view[filled : filled + _CHUNK])  # gzip copies each chunk once
        if not count:
            break
        filled += count
    view.release()
    del buffer[filled:]
    return buffer


def parse(raw: bytes, magic: int, *, path: Path) -> np.ndarray:
    """Parses one IDX file of unsigned bytes, checking magic, dims and length.

    Example:
        >>> blob = (2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([7, 0, 9])
        >>> parse(blob, LABELS_MAGIC, path=Path("labels")).tolist()
        [7, 0, 9]
    """
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated (no header)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"IDX file {path} has magic number {found} (0x{found:08x}), expected {magic} "
            f"(0x{magic:08x}: unsigned bytes, {magic & 0xFF} dims)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated (incomplete header)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) < expected:
        raise DataError(
            f"IDX file {path} is truncated: {len(raw)} bytes, header {dims} says {expected}"
        )
    if len(raw) > expected:
        raise DataError(f"IDX file {path} is too long: more than the {expected} bytes of {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_splits(paths: dict[str, Path], contents: dict[str, bytes]) -> dict[str, Split]:
    """The four files' bytes -> ``{"train", "test"}``: uint8 (N, 28, 28) images, labels."""
    arrays = {
        key: parse(
            contents[key], IMAGES_MAGIC if key.endswith("images") else LABELS_MAGIC, path=paths[key]
        )
        for key in FILES
    }
    splits = {}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        images, labels = paths[f"{split}_images"], paths[f"{split}_labels"]
        if x.shape[1:] != (28, 28):
            raise DataError(f"IDX file {images} holds {x.shape[1:]} images, not 28x28")
        if len(x) != len(y):
            raise DataError(
                f"IDX files {images} and {labels} disagree: {len(x)} images vs {len(y)} labels"
            )
        if len(y) and y.max() >= NUM_CLASSES:
            raise DataError(f"IDX file {labels} has labels outside 0..9")
        splits[split] = (x, y.astype(np.int32))
    return splits


def read_directory(directory: Path) -> dict[str, Split]:
    """The ``train`` and ``test`` splits from a directory of the four IDX files."""
    if not directory.is_dir():
        raise DataError(
            f"IDX directory {directory} does not exist; pass data_dir=DIR (--data_dir DIR on "
            "the command line) holding the files"
        )
    paths = {key: find_file(directory, name) for key, name in FILES.items()}
    return read_splits(paths, {key: read_bytes(path) for key, path in paths.items()})
