"""The datasets and their sources: :data:`DATASETS`, :func:`load`, :func:`prepare_tfds`.

Each dataset has one offline source that fetches and caches it (MNIST ``bundled``,
Fashion-MNIST ``debian``, CIFAR-10 ``tarball``), ``tfds``, and for the MNIST-likes
``idx``; ``auto`` takes ``tfds`` when a prepared copy is already on disk and the offline
source otherwise, never downloading through TFDS.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cgmq_jax.data import bundled, cifar, debian, idx, tfds_io
from cgmq_jax.data.core import (
    DataError,
    Dataset,
    finish,
    say,
    to_uint8,
    with_validation,
)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What this package knows about one dataset.

    Attributes:
        name: The name :func:`load` takes, e.g. ``"fashion_mnist"``.
        title: How messages write it, e.g. ``"Fashion-MNIST"``.
        image_shape: ``(H, W, C)`` of one example.
        sources: The sources :func:`load` accepts besides ``"auto"``; the first is the
            offline one that fetches and caches the data.
        tfds: How its TFDS copy is read and written.
    """

    name: str
    title: str
    image_shape: tuple[int, int, int]
    sources: tuple[str, ...]
    tfds: tfds_io.TfdsDataset

    @property
    def offline_source(self) -> str:
        """The source that fetches and caches the data without TFDS: ``sources[0]``."""
        return self.sources[0]


DATASETS: Mapping[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", "MNIST", (28, 28, 1), ("bundled", "tfds", "idx"), tfds_io.MNIST),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist",
        "Fashion-MNIST",
        (28, 28, 1),
        ("debian", "tfds", "idx"),
        tfds_io.FASHION_MNIST,
    ),
    "cifar10": DatasetInfo(
        "cifar10", "CIFAR-10", (32, 32, 3), ("tarball", "tfds"), tfds_io.CIFAR10
    ),
}
#: Every source name any dataset accepts (for command-line choices).
SOURCES = ("auto", "bundled", "debian", "tarball", "tfds", "idx")


def info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; a one-line :class:`DataError` if unknown."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]



def _holds_tarball(source: str, data_dir) -> bool:
    """Whether ``data_dir`` is (or holds) the tarball the ``"tarball"`` source reads: then
    ``source="auto"`` falling back to it reads that one (``--data_dir`` names either)."""
    if source != "tarball" or data_dir is None:
        return False
    try:
        cifar.find_tarball(data_dir)
    except DataError:
        return False
    return True


def load(
    name: str = "mnist",
    source: str = "auto",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    verbose: bool = True,
) -> Dataset:
    """Loads a dataset as numpy arrays.

    Args:
        name: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"`` (see :data:`DATASETS`).
        source: ``"auto"`` or one of the dataset's sources: MNIST ``"bundled"``,
            Fashion-MNIST ``"debian"``, CIFAR-10 ``"tarball"``; every one ``"tfds"``; the
            MNIST-likes ``"idx"``.
        data_dir: For ``"tfds"``/``"auto"``: the TFDS data directory (default
            ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). For ``"idx"``: the directory
            with the four IDX files (required). For ``"tarball"``: the tarball or its
            directory (default: the cache directory).
        cache_dir: Where caches live (default :func:`~cgmq_jax.data.default_cache_dir`).
        download: ``"tfds"`` only: let TFDS download the dataset if it is not prepared.
            Off by default because an offline download attempt hangs for minutes.
        verbose: Print one line to stderr saying which source was used (and when a cache
            is being fetched).

    Returns:
        The train / validation / test splits, the source used and the dataset's name.

    Raises:
        DataError: The dataset or source is unknown, or its data is missing, corrupt or
            unreachable.
    """
    dataset = info(name)
    if source != "auto" and source not in dataset.sources:
        raise DataError(
            f"unknown {dataset.title} source {source!r}; choose one of "
            f"{', '.join(('auto', *dataset.sources))}"
        )
    given, missing = data_dir, data_dir is not None and not Path(data_dir).exists()
    if missing and source in ("idx", "tarball"):
        raise DataError(
            f"data_dir {data_dir} does not exist; pass the "
            f"{'IDX directory' if source == 'idx' else 'tarball or its directory'} "
            "(--data_dir)"
        )
    reason = ""
    if source == "auto":
        reason = tfds_io.choose(tfds_io.data_dir(data_dir), dataset.tfds)
        source = dataset.offline_source if reason else "tfds"
        reason = reason or f"prepared TFDS {dataset.tfds.name}/{dataset.tfds.version} found"
        if source != "tfds" and not _holds_tarball(source, data_dir):
            data_dir = None  # it named the TFDS directory
    try:
        loaded, where = _read(dataset, source, data_dir, cache_dir, download, verbose)
    except DataError as error:
        if not (missing and reason):
            raise
        # auto fell back from a data_dir that is not there: its error alone would not say so
        raise DataError(
            f"data_dir {given} does not exist, so no prepared TFDS copy is there, and the "
            f"{source} source failed too: {error}"
        ) from None
    if verbose:
        note = f" ({reason})" if reason else ""
        say(
            f"using {source} {dataset.title} from {where}: train {len(loaded.train[1])}, "
            f"validation {len(loaded.validation[1])}, test {len(loaded.test[1])}{note}"
        )
    return loaded


def load_mnist(
    source: str = "auto",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = False,
    verbose: bool = True,
) -> Dataset:
    """Loads MNIST: ``load("mnist", source, ...)`` (see :func:`load`).

    ``"bundled"`` is the classic 50,000 / 10,000 / 10,000 split; ``"tfds"`` and ``"idx"``
    carve validation as the last 10,000 of their 60,000 train images.
    """
    return load(
        "mnist",
        source,
        data_dir=data_dir,
        cache_dir=cache_dir,
        download=download,
        verbose=verbose,
    )


def _read(dataset: DatasetInfo, source: str, data_dir, cache_dir, download: bool, verbose: bool):
    """``(splits, where they came from)`` of one source."""
    if source == "tfds":
        return tfds_io.load(dataset.tfds, data_dir, download=download), tfds_io.data_dir(data_dir)
    if source == "idx":
        return _load_idx(dataset, data_dir), data_dir
    if source == "bundled":
        return bundled.load_bundled(cache_dir, verbose=verbose), bundled.cache_path(cache_dir)
    if source == "debian":
        return debian.load_debian(cache_dir, verbose=verbose), debian.cache_path(cache_dir)
    return cifar.load_tarball(data_dir, cache_dir, verbose=verbose), cifar.cache_path(cache_dir)


def _load_idx(dataset: DatasetInfo, data_dir: str | os.PathLike[str] | None) -> Dataset:
    if data_dir is None:
        raise DataError(
            f"source='idx' needs data_dir=DIR (--data_dir DIR) holding "
            f"{', '.join(idx.FILES.values())}"
        )
    splits = idx.read_directory(Path(data_dir))
    splits = with_validation(splits, dataset.tfds.validation_size, what=f"IDX files in {data_dir}")
    return finish(splits, dataset.image_shape, source="idx", name=dataset.name)


def synthetic(
    train: int = 384,
    validation: int = 128,
    test: int = 128,
    *,
    seed: int = 0,
    image_shape: tuple[int, int, int] = (28, 28, 1),
) -> Dataset:
    """A tiny synthetic stand-in: ten noisy prototypes, for smoke tests in seconds.

    Images are ``uint8 / 256`` like the real sources (MNIST's shape by default; pass
    ``image_shape=(32, 32, 3)`` for CIFAR-10's), labels int32 in 0..9; the same arguments
    always give the same arrays. Not data to report accuracy on.

    Example:
        >>> tiny = synthetic(8, 2, 2, image_shape=(32, 32, 3))
        >>> tiny.train[0].shape, tiny.name
        ((8, 32, 32, 3), 'synthetic')
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(10, *image_shape))

    def split(n):
        labels = rng.integers(0, 10, size=n).astype(np.int32)
        noise = rng.integers(-40, 40, size=(n, *image_shape))
        return np.clip(prototypes[labels] + noise, 0, 255).astype(np.float32) / 256, labels

    return Dataset(split(train), split(validation), split(test), "synthetic", "synthetic")


def prepare_tfds(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    dataset: str = "mnist",
    source: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    images: Mapping[str, np.ndarray] | None = None,
    labels: Mapping[str, np.ndarray] | None = None,
    verbose: bool = True,
) -> Path:
    """Writes a dataset as its TFDS dataset (e.g. ``mnist`` version 3.0.1), offline.

    Features are those TFDS registers for it (``image``, ``label``; CIFAR-10 also ``id``),
    file order kept. Split ``train`` is the train split followed by the validation split
    (so carving the end of TFDS ``train`` gives back the same validation split); ``test``
    is the test split. Afterwards ``tfds.load(name, data_dir=data_dir, download=False)``
    works. Does nothing if the dataset is already prepared there.

    Args:
        data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
        dataset: ``"mnist"``, ``"fashion_mnist"`` or ``"cifar10"``.
        source: Where the examples come from when ``images`` is not given: the dataset's
            offline source (the default; ``"bundled"``, ``"debian"`` or ``"tarball"``).
        cache_dir: Cache directory of that source (default
            :func:`~cgmq_jax.data.default_cache_dir`).
        images: Optional ``{"train": ..., "test": ...}`` uint8 arrays of the dataset's image
            shape (the channel axis may be left out when it is 1) to write instead (e.g.
            tiny test data); ``train`` must already include the validation examples at
            its end.
        labels: ``{"train": ..., "test": ...}`` integer labels matching ``images``.
        verbose: Print progress to stderr.

    Returns:
        The prepared directory ``<data_dir>/<name>/<version>``.

    Raises:
        DataError: tensorflow_datasets is missing, the inputs are malformed, or writing fails.
    """
    spec = info(dataset)
    root = tfds_io.data_dir(data_dir)
    target = tfds_io.prepared_dir(root, spec.tfds)
    if tfds_io.is_prepared(root, spec.tfds):
        if verbose:
            say(f"TFDS {spec.tfds.name}/{spec.tfds.version} already prepared in {target}")
        return target
    if (images is None) != (labels is None):
        raise DataError("prepare_tfds needs both images= and labels= (or neither)")
    if images is None:
        if source not in (None, spec.offline_source):
            raise DataError(
                f"prepare_tfds source for {spec.name} must be {spec.offline_source!r}, "
                f"got {source!r}"
            )
        loaded = load(spec.name, spec.offline_source, cache_dir=cache_dir, verbose=verbose)
        images = {
            "train": to_uint8(np.concatenate([loaded.train[0], loaded.validation[0]])),
            "test": to_uint8(loaded.test[0]),
        }
        labels = {
            "train": np.concatenate([loaded.train[1], loaded.validation[1]]),
            "test": loaded.test[1],
        }
    assert labels is not None
    description = f"{spec.title} written by cgmq_jax.data.prepare_tfds (offline copy)."
    written = tfds_io.write(spec.tfds, root, dict(images), dict(labels), description=description)
    if verbose:
        say(f"prepared TFDS {spec.tfds.name}/{spec.tfds.version} in {written}")
    return written
