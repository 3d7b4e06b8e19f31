"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, fetched reproducibly.

``apt-get download`` saves the ``.deb`` (about 31 MB, no root needed) in a temporary
directory, ``dpkg-deb -x`` unpacks it, the four gunzipped IDX files are checked against
the MD5s Zalando publishes (:data:`FASHION_MNIST`), and the counts (60,000 / 10,000,
6,000 / 1,000 per class) are checked. The 60,000 / 10,000 split is cached once as uint8
in ``<cache_dir>/fashion_mnist_debian.npz``, with validation carved as the last 10,000 of
train; after that, loading reads only the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cgmq_jax.data import idx
from cgmq_jax.data.core import (
    DataError,
    Dataset,
    Split,
    build_cache,
    cache_dir_or_default,
    check_class_counts,
    finish,
    one_line,
    read_cache,
    say,
    with_validation,
)

IMAGE_SHAPE = (28, 28, 1)
VALIDATION_SIZE = 10_000
FETCH_HINT = "python -m cgmq_jax.data fetch --dataset fashion_mnist"
#: File name of the uint8 cache under the cache directory.
CACHE_NAME = "fashion_mnist_debian.npz"


@dataclasses.dataclass(frozen=True)
class DebianPackage:
    """A Debian package that ships a dataset as four IDX files, and what they must be.

    Attributes:
        package: The package name for ``apt-get download``.
        directory: Where the ``.gz`` IDX files lie inside the package.
        md5: ``{file name: MD5 of the uncompressed file}`` for the four
            :data:`cgmq_jax.data.idx.FILES`.
        per_class: ``{"train": n, "test": n}``: examples of each class in each split.
    """

    package: str
    directory: str
    md5: Mapping[str, str]
    per_class: Mapping[str, int]


#: Fashion-MNIST as Debian packages it (0.0~git20200523.55506a9-1); the MD5s are those
#: of Zalando's README, of the uncompressed files.
FASHION_MNIST = DebianPackage(
    package="dataset-fashion-mnist",
    directory="usr/share/datasets/fashion-mnist",
    md5={
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    per_class={"train": 6_000, "test": 1_000},
)


def cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the Fashion-MNIST cache lives: ``<cache_dir>/fashion_mnist_debian.npz``."""
    return cache_dir_or_default(cache_dir) / CACHE_NAME


def _manual(pinned: DebianPackage) -> str:
    return (
        f"or put the four IDX files ({', '.join(idx.FILES.values())}, .gz allowed) in a "
        f"directory and use source='idx' with data_dir=DIR (--data idx --data_dir DIR); "
        f"`apt install {pinned.package}` puts them in /{pinned.directory}"
    )


def _run(tool: str, args: list[str], cwd: Path, pinned: DebianPackage) -> None:
    path = shutil.which(tool)
    if path is None:
        raise DataError(f"{tool} not found (needed to fetch {pinned.package}); {_manual(pinned)}")
    try:
        result = subprocess.run(
            [path, *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataError(f"{tool} {args[0]} failed ({one_line(err)}); {_manual(pinned)}") from None
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise DataError(f"{tool} {args[0]} {args[1]} failed ({reason}); {_manual(pinned)}")


def download_deb(
    dest: Path, pinned: DebianPackage = FASHION_MNIST, *, verbose: bool = True
) -> Path:
    """Runs ``apt-get download PACKAGE`` in ``dest`` and returns the saved ``.deb``.

    Raises:
        DataError: apt-get is missing, fails (offline, unknown package) or saves nothing.
    """
    if verbose:
        say(f"downloading the Debian package {pinned.package} (about 31 MB) with apt-get")
    _run("apt-get", ["download", pinned.package], dest, pinned)
    debs = sorted(dest.glob(f"{pinned.package}_*.deb"))
    if not debs:
        raise DataError(f"apt-get download {pinned.package} saved no .deb; {_manual(pinned)}")
    return debs[0]


def read_deb(deb: Path, pinned: DebianPackage = FASHION_MNIST) -> dict[str, Split]:
    """Unpacks ``deb`` with ``dpkg-deb -x`` and returns its checked train and test splits."""
    if not deb.is_file():
        raise DataError(f"no Debian package at {deb}; {_manual(pinned)}")
    with tempfile.TemporaryDirectory(prefix="cgmq_deb_") as tmp:
        _run("dpkg-deb", ["-x", str(deb.resolve()), "tree"], Path(tmp), pinned)
        return read_checked(Path(tmp) / "tree" / pinned.directory, pinned)


def read_checked(directory: Path, pinned: DebianPackage = FASHION_MNIST) -> dict[str, Split]:
    """The ``train`` and ``test`` splits of the four IDX files in ``directory``, with the
    uncompressed MD5s and the per-class counts checked against ``pinned``."""
    if not directory.is_dir():
        raise DataError(f"{pinned.package} holds no {pinned.directory}; {_manual(pinned)}")
    paths = {key: idx.find_file(directory, name) for key, name in idx.FILES.items()}
    contents = {key: idx.read_bytes(path) for key, path in paths.items()}
    for key, name in idx.FILES.items():
        digest = hashlib.md5(contents[key]).hexdigest()
        if digest != pinned.md5[name]:
            raise DataError(
                f"{paths[key]} has MD5 {digest} (uncompressed), expected {pinned.md5[name]}; "
                "refusing to use it"
            )
    splits = idx.read_splits(paths, contents)
    for split, (_, labels) in splits.items():
        check_class_counts(labels, pinned.per_class[split], f"{pinned.package} {split}")
    return splits


def fetch_fashion_mnist(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    deb: str | os.PathLike[str] | None = None,
    pinned: DebianPackage = FASHION_MNIST,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Builds the Fashion-MNIST cache from the Debian package (idempotent); returns its path.

    Args:
        cache_dir: Cache directory (default :func:`~cgmq_jax.data.default_cache_dir`).
        deb: A local ``dataset-fashion-mnist_*.deb`` to use instead of ``apt-get download``.
        pinned: The package and what its files must be (default :data:`FASHION_MNIST`).
        force: Rebuild even if a valid cache exists.
        verbose: Print progress lines to stderr.

    Raises:
        DataError: apt-get or dpkg-deb is missing or fails, an MD5 or a count is wrong, or
            the cache cannot be written. The message names the manual alternative.
    """

    def build() -> dict[str, Split]:
        if deb is not None:
            splits = read_deb(Path(deb), pinned)
        else:
            with tempfile.TemporaryDirectory(prefix="cgmq_fashion_") as tmp:
                splits = read_deb(download_deb(Path(tmp), pinned, verbose=verbose), pinned)
        return with_validation(splits, VALIDATION_SIZE, what=f"{pinned.package} train")

    return build_cache(
        cache_path(cache_dir),
        read_fashion_cache,
        build,
        what="Fashion-MNIST cache",
        force=force,
        verbose=verbose,
    )


def read_fashion_cache(path: Path) -> dict[str, Split]:
    """The validated uint8 splits of a Fashion-MNIST cache file."""
    return read_cache(path, IMAGE_SHAPE, what="Fashion-MNIST cache", hint=FETCH_HINT)


def load_debian(
    cache_dir: str | os.PathLike[str] | None = None, *, verbose: bool = True
) -> Dataset:
    """Fashion-MNIST from the cache, fetching the Debian package first if it is missing."""
    path = cache_path(cache_dir)
    if not path.exists():
        if verbose:
            say(f"Fashion-MNIST cache {path} missing; fetching {FASHION_MNIST.package}")
        fetch_fashion_mnist(cache_dir, verbose=False)
    splits = read_fashion_cache(path)
    return finish(splits, IMAGE_SHAPE, source="debian", name="fashion_mnist")
