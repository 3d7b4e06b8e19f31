"""CIFAR-10 from the official python tarball, for users who have it.

``cifar-10-python.tar.gz`` (:data:`CIFAR10`: its URL and MD5) holds
``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``: pickles of a dict whose
``b"data"`` is uint8 ``(10000, 3072)`` in channel-major order (1,024 red, then green, then
blue values, each a row-major 32x32 plane) and whose ``b"labels"`` is a list of ints. The
tarball is checked against its MD5 and read in memory (nothing is extracted), every batch
through :func:`~cgmq_jax.data.pickles.restricted_loads`, images become NHWC ``(N, 32, 32,
3)``, counts are checked (5,000 / 1,000 per class), validation is the last 5,000 of the
50,000 train images (CIFAR-10 has no validation split of its own), and the result is
cached once as uint8 in ``<cache_dir>/cifar10_tarball.npz``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cgmq_jax.data.core import (
    DataError,
    Dataset,
    Split,
    build_cache,
    cache_dir_or_default,
    check_class_counts,
    check_uint8_split,
    finish,
    one_line,
    read_cache,
    say,
    with_validation,
)
from cgmq_jax.data.pickles import restricted_loads

IMAGE_SHAPE = (32, 32, 3)
#: Validation examples carved from the end of the 50,000 train images (one tenth).
VALIDATION_SIZE = 5_000
#: File name of the uint8 cache under the cache directory.
CACHE_NAME = "cifar10_tarball.npz"


@dataclasses.dataclass(frozen=True)
class Tarball:
    """A dataset tarball in CIFAR's python format, and what it must be.

    Attributes:
        file_name: The tarball's file name.
        url: Where to get it.
        md5: MD5 of the whole file.
        directory: The directory inside the tarball holding the batches.
        batches: ``{"train": (batch names), "test": (batch names)}``.
        per_class: ``{"train": n, "test": n}``: examples of each class in each split.
    """

    file_name: str
    url: str
    md5: str
    directory: str
    batches: Mapping[str, tuple[str, ...]]
    per_class: Mapping[str, int]


CIFAR10 = Tarball(
    file_name="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    directory="cifar-10-batches-py",
    batches={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    per_class={"train": 5_000, "test": 1_000},
)


def cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the CIFAR-10 cache lives: ``<cache_dir>/cifar10_tarball.npz``."""
    return cache_dir_or_default(cache_dir) / CACHE_NAME


def _where_to_get(pinned: Tarball, cache_dir: str | os.PathLike[str] | None) -> str:
    return (
        f"download {pinned.url} (MD5 {pinned.md5}) and put it in "
        f"{cache_dir_or_default(cache_dir)} or pass data_dir=DIR holding it (--data_dir DIR), "
        "or use source='tfds'"
    )


def find_tarball(
    data_dir: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None = None,
    pinned: Tarball = CIFAR10,
) -> Path:
    """The tarball: ``data_dir`` itself if it is a file, else ``data_dir/FILE``, else
    ``<cache_dir>/FILE``; a one-line error saying where to get it if there is none."""
    if data_dir is not None:
        given = Path(data_dir).expanduser()
        candidates = [given] if given.is_file() else [given / pinned.file_name]
    else:
        candidates = [cache_dir_or_default(cache_dir) / pinned.file_name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"no {pinned.file_name} at {candidates[0]}; {_where_to_get(pinned, cache_dir)}")


def decode_batch(payload: bytes, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> uint8 images ``(N, 32, 32, 3)`` and int32 labels.

    Example:
        >>> import pickle
        >>> red = np.zeros((1, 3072), np.uint8); red[0, :1024] = 255
        >>> x, y = decode_batch(pickle.dumps({b"data": red, b"labels": [3]}), what="doc")
        >>> x.shape, x[0, 5, 7].tolist(), y.tolist()
        ((1, 32, 32, 3), [255, 0, 0], [3])
    """
    obj = restricted_loads(payload, encoding="bytes")
    if not isinstance(obj, dict):
        raise DataError(f"{what} is not a pickled dict with b'data' and b'labels'")
    data, labels = obj.get(b"data", obj.get("data")), obj.get(b"labels", obj.get("labels"))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{what}: b'data' must be a uint8 array (N, 3072)")
    if data.shape[1] != 3072 or not isinstance(labels, list) or len(labels) != len(data):
        raise DataError(
            f"{what}: b'data' has shape {data.shape} and b'labels' {type(labels).__name__} of "
            f"length {len(labels) if isinstance(labels, list) else '?'}; expected (N, 3072) and N"
        )
    # Channel-major rows: (N, 3, 32, 32) -> NHWC.
    images = data.reshape(len(data), 3, 32, 32).transpose(0, 2, 3, 1)
    return check_uint8_split(np.ascontiguousarray(images), np.asarray(labels), IMAGE_SHAPE, what)


def read_tarball(path: Path, pinned: Tarball = CIFAR10) -> dict[str, Split]:
    """The checked ``train`` and ``test`` splits of the tarball at ``path``."""
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path} ({one_line(err)})") from None
    digest = hashlib.md5(blob).hexdigest()
    if digest != pinned.md5:
        raise DataError(
            f"{path} has MD5 {digest}, expected {pinned.md5}; refusing to use it "
            f"(get the genuine file from {pinned.url})"
        )
    splits = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for split, names in pinned.batches.items():
                parts = []
                for name in names:
                    member = f"{pinned.directory}/{name}"
                    try:
                        payload = tar.extractfile(member)
                    except KeyError:
                        payload = None
                    if payload is None:
                        raise DataError(f"{path} has no file {member}")
                    parts.append(decode_batch(payload.read(), what=f"{member} in {path}"))
                splits[split] = tuple(np.concatenate(arrays) for arrays in zip(*parts, strict=True))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable .tar.gz ({one_line(err)})") from None
    for split, (_, labels) in splits.items():
        check_class_counts(labels, pinned.per_class[split], f"{pinned.file_name} {split}")
    return splits


def fetch_cifar10(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    tarball: str | os.PathLike[str] | None = None,
    pinned: Tarball = CIFAR10,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Builds the CIFAR-10 cache from the official tarball (idempotent); returns its path.

    Nothing is downloaded: the tarball is ``tarball``, or ``cifar-10-python.tar.gz`` in the
    cache directory.

    Args:
        cache_dir: Cache directory (default :func:`~cgmq_jax.data.default_cache_dir`).
        tarball: The tarball, or a directory holding it.
        pinned: The tarball's name, MD5, layout and counts (default :data:`CIFAR10`).
        force: Rebuild even if a valid cache exists.
        verbose: Print progress lines to stderr.

    Raises:
        DataError: No tarball (the message says where to get it and where to put it), a
            wrong MD5, a malformed or refused batch, wrong counts, or an unwritable cache.
    """

    def build() -> dict[str, Split]:
        splits = read_tarball(find_tarball(tarball, cache_dir, pinned), pinned)
        return with_validation(splits, VALIDATION_SIZE, what="CIFAR-10 train")

    return build_cache(
        cache_path(cache_dir),
        read_cifar_cache,
        build,
        what="CIFAR-10 cache",
        force=force,
        verbose=verbose,
    )


def read_cifar_cache(path: Path) -> dict[str, Split]:
    """The validated uint8 splits of a CIFAR-10 cache file."""
    hint = "python -m cgmq_jax.data fetch --dataset cifar10 --tarball PATH"
    return read_cache(path, IMAGE_SHAPE, what="CIFAR-10 cache", hint=hint)


def load_tarball(
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    verbose: bool = True,
) -> Dataset:
    """CIFAR-10 from the cache, built first from the tarball if the cache is missing.

    A ``data_dir`` (the tarball or its directory) always rebuilds from that tarball when
    the cache is missing; without one, the tarball is looked for in the cache directory.
    """
    path = cache_path(cache_dir)
    if not path.exists():
        if verbose:
            say(f"CIFAR-10 cache {path} missing; building it from {CIFAR10.file_name}")
        fetch_cifar10(cache_dir, tarball=data_dir, verbose=False)
    return finish(read_cifar_cache(path), IMAGE_SHAPE, source="tarball", name="cifar10")
