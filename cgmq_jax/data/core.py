"""What every source shares: the :class:`Dataset` container, the error, the uint8 cache.

Every source ends the same way: uint8 images and integer labels are checked
(:func:`check_uint8_split`), the validation split is carved from the end of ``train`` when
the dataset has none of its own (:func:`carve_validation`), and :func:`finish` turns them
into float32 ``uint8 / 256`` images (NHWC) and int32 labels. Sources that fetch something
cache it once as a compressed uint8 ``.npz`` (:func:`write_cache`, :func:`read_cache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cgmq_jax import files

NUM_CLASSES = 10
SPLITS = ("train", "validation", "test")
_CACHE_KEYS = {"train": "train", "validation": "val", "test": "test"}

Split = tuple[np.ndarray, np.ndarray]

#: The most bytes one decoded array (an IDX file, a cache member) may hold: 256 MiB, room
#: for CIFAR-10's training images (153.6 MB) and MNIST's (47 MB). Checked from the header
#: before anything is decompressed, so a decompression bomb is refused cheaply.
MAX_ARRAY_BYTES = 1 << 28

#: The fewest examples a validation or test split may have: an accuracy on fewer means
#: nothing (one example moves it by more than 1%). :func:`check_eval_splits`.
MIN_EVAL_EXAMPLES = 100


class DataError(ValueError):
    """A data problem the user can fix; the message is one line saying how."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An image classification dataset as numpy arrays.

    Attributes:
        train: ``(images, labels)``; images float32 ``(N, H, W, C)`` equal to
            ``uint8 / 256`` (MNIST and Fashion-MNIST ``(N, 28, 28, 1)``, CIFAR-10
            ``(N, 32, 32, 3)``), labels int32 ``(N,)`` in ``0..9``.
        validation: Same layout as ``train``.
        test: Same layout as ``train``.
        source: Which source produced the arrays, e.g. ``"bundled"``, ``"tfds"``, ``"idx"``.
        name: Which dataset: ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"synthetic"``.
    """

    train: Split
    validation: Split
    test: Split
    source: str
    name: str = "mnist"

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One example's shape, ``(H, W, C)``."""
        return tuple(self.train[0].shape[1:])


#: The name this container had when there was only MNIST; kept for its users.
MnistData = Dataset


def default_cache_dir() -> Path:
    """Returns the cache directory: ``$CGMQ_CACHE_DIR``, else ``~/.cache/cgmq_jax``."""
    env = os.environ.get("CGMQ_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cgmq_jax"


def cache_dir_or_default(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` as a ``Path`` (``~`` expanded), else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def say(message: str) -> None:
    """One progress line on stderr, prefixed like every line of this package."""
    print(f"cgmq_jax.data: {message}", file=sys.stderr, flush=True)


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``, for one-line :class:`DataError` messages."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def sha256(data: bytes) -> str:
    """The SHA-256 digest of ``data``, as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def stored_shape(image_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The uint8 shape kept on disk: grayscale without its channel axis (as MNIST ships)."""
    return image_shape[:2] if image_shape[-1] == 1 else image_shape


def check_uint8_split(
    images: Any, labels: Any, image_shape: tuple[int, ...], what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Checks uint8 images of ``image_shape`` (channel axis optional if 1) and labels 0..9.

    Returns:
        Images in :func:`stored_shape` and int32 labels.
    """
    x, y = np.asarray(images), np.asarray(labels)
    shapes = {tuple(image_shape), stored_shape(tuple(image_shape))}
    if x.dtype != np.uint8 or x.shape[1:] not in shapes:
        want = " or ".join(str(s) for s in sorted(shapes, key=len))
        raise DataError(f"{what}: images must be uint8 (N, *{want}), got {x.dtype} {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what}: labels must be integers of shape ({len(x)},), got {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(f"{what}: labels must lie in 0..{NUM_CLASSES - 1}")
    return x.reshape(len(x), *stored_shape(tuple(image_shape))), y.astype(np.int32)


def check_class_counts(labels: np.ndarray, per_class: int, what: str) -> None:
    """Raises unless every class 0..9 occurs exactly ``per_class`` times."""
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    if len(labels) != per_class * NUM_CLASSES or not np.all(counts == per_class):
        raise DataError(
            f"{what}: expected {per_class:,} examples of each of the {NUM_CLASSES} classes, "
            f"found {len(labels):,} with per-class counts {counts.tolist()}"
        )


def carve_validation(
    images: np.ndarray, labels: np.ndarray, size: int, *, what: str
) -> tuple[Split, Split]:
    """Splits the validation set off the END of ``train``.

    Rule: the last ``size`` examples if train has more than ``size``, else (tiny test
    data) the last ``len(train) // 6``. For MNIST's 60,000 and ``size=10_000`` both rules
    agree.

    Example:
        >>> y = np.arange(60_000)
        >>> (_, train), (_, val) = carve_validation(y, y, 10_000, what="doc")
        >>> len(train), int(val[0]), int(val[-1])
        (50000, 50000, 59999)
    """
    n = len(labels)
    n_val = size if n > size else n // 6
    if n_val == 0:
        raise DataError(f"{what}: train has only {n} examples; need at least 6 to carve validation")
    cut = n - n_val
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def with_validation(splits: dict[str, Split], size: int, *, what: str) -> dict[str, Split]:
    """``{"train", "validation", "test"}`` from ``{"train", "test"}``, the validation split
    carved off the end of train (:func:`carve_validation`)."""
    train, validation = carve_validation(*splits["train"], size, what=what)
    return {"train": train, "validation": validation, "test": splits["test"]}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images equal to ``k / 256`` -> uint8 ``k`` exactly (same shape).

    Raises:
        DataError: A value is not a multiple of 1/256 in ``[0, 255/256]``.
    """
    scaled = np.asarray(images, dtype=np.float64) * 256.0
    if not (np.all(scaled == np.round(scaled)) and scaled.min(initial=0) >= 0):
        raise DataError("images are not exact multiples of 1/256; refusing to quantize them")
    if scaled.max(initial=0) > 255:
        raise DataError("images exceed 255/256; expected uint8/256 values")
    return scaled.astype(np.uint8)


def to_float(images_u8: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """uint8 images -> float32 ``(N, *image_shape)`` equal to ``uint8 / 256`` exactly."""
    out = images_u8.reshape(len(images_u8), *image_shape).astype(np.float32)
    out /= np.float32(256.0)  # exact: division by a power of two
    return out


def finish(
    splits: dict[str, Split], image_shape: tuple[int, ...], *, source: str, name: str
) -> Dataset:
    """uint8 ``{"train", "validation", "test"}`` splits -> a float32 :class:`Dataset`."""

    def convert(split: Split) -> Split:
        return to_float(split[0], image_shape), np.asarray(split[1]).astype(np.int32)

    return Dataset(*(convert(splits[s]) for s in SPLITS), source=source, name=name)


def write_cache(path: Path, splits: dict[str, Split]) -> None:
    """Writes uint8 splits as one compressed ``.npz``, atomically."""
    arrays = {}
    for split, prefix in _CACHE_KEYS.items():
        arrays[f"{prefix}_x"], arrays[f"{prefix}_y"] = splits[split]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_write(path, "wb") as f:
            np.savez_compressed(f, **arrays)
    except OSError as err:
        raise DataError(
            f"cannot write cache {path} ({one_line(err)}); set CGMQ_CACHE_DIR or pass --cache_dir"
        ) from None


def build_cache(
    path: Path,
    read: Callable[[Path], dict[str, Split]],
    build: Callable[[], dict[str, Split]],
    *,
    what: str,
    force: bool = False,
    verbose: bool = True,
) -> Path:
    """Writes ``build()`` to ``path`` unless a cache that ``read`` accepts is there already
    (or ``force``); returns ``path``. ``what`` names the cache in progress lines."""
    if path.exists() and not force:
        try:
            read(path)
        except DataError:
            if verbose:
                say(f"existing cache {path} does not load; rebuilding it")
        else:
            if verbose:
                say(f"{what} already present and valid: {path}")
            return path
    write_cache(path, build())
    if verbose:
        say(f"wrote {what} {path}")
    return path


def check_eval_splits(dataset: Dataset, minimum: int = MIN_EVAL_EXAMPLES) -> None:
    """Raises :class:`DataError` if the validation or test split has fewer than ``minimum``
    examples: no accuracy is selected on, or published for, a handful of images."""
    for name, (_, labels) in (("validation", dataset.validation), ("test", dataset.test)):
        if len(labels) < minimum:
            raise DataError(
                f"the {name} split of {dataset.source} has {len(labels)} examples, fewer than "
                f"{minimum}: its accuracy would mean nothing; use more data (or lower "
                "--min_eval_examples)"
            )


_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _check_npz_members(path: Path, names: list[str]) -> None:
    """Each ``.npy`` member's header (read before any data is decompressed): a plain dtype
    and at most :data:`MAX_ARRAY_BYTES`; all members together at most twice that."""
    import zipfile

    total = 0
    with zipfile.ZipFile(path) as archive:
        for name in names:
            with archive.open(f"{name}.npy") as member:
                version = np.lib.format.read_magic(member)
                if version not in _NPY_HEADERS:
                    raise ValueError(f"member {name} is .npy version {version}")
                shape, _, dtype = _NPY_HEADERS[version](member)
            if dtype.hasobject or dtype.kind not in "iub":
                raise ValueError(f"member {name} has dtype {dtype}, not integers")
            size = math.prod(shape) * dtype.itemsize
            total += size
            if size > MAX_ARRAY_BYTES or total > 2 * MAX_ARRAY_BYTES:
                raise ValueError(f"member {name} announces {size:,} bytes {shape}, too many")


def read_cache(
    path: Path, image_shape: tuple[int, ...], *, what: str, hint: str
) -> dict[str, Split]:
    """Reads and validates a uint8 cache; any problem is a one-line :class:`DataError`.

    Args:
        path: The ``.npz`` written by :func:`write_cache`.
        image_shape: ``(H, W, C)`` of one example.
        what: Names the cache in messages, e.g. ``"bundled MNIST cache"``.
        hint: The command that (re)builds it, e.g. ``python -m cgmq_jax.data fetch``.
    """
    names = [f"{prefix}_{xy}" for prefix in _CACHE_KEYS.values() for xy in "xy"]
    try:
        _check_npz_members(path, names)
        with np.load(path, allow_pickle=False) as npz:
            arrays = {
                split: (npz[f"{prefix}_x"], npz[f"{prefix}_y"])
                for split, prefix in _CACHE_KEYS.items()
            }
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found; run `{hint}`") from None
    except Exception as err:  # corrupt zip, missing key, ...
        raise DataError(
            f"{what} {path} is unreadable ({one_line(err)}); delete it and run `{hint}` "
            "(or pass --cache_dir)"
        ) from None
    splits = {}
    for split, (x, y) in arrays.items():
        try:
            splits[split] = check_uint8_split(x, y, image_shape, f"{what} {path}, {split}")
        except DataError as err:
            raise DataError(f"{err}; delete it and run `{hint}`") from None
    return splits
