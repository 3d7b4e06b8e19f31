"""TensorFlow Datasets: reading a prepared dataset, and writing one offline.

TFDS is optional (``pip install -r requirements-tfds.txt``) and slow to import, so it is
imported only when a TFDS source is used. None of the three datasets has a TFDS
validation split: it is carved from the END of TFDS ``train`` (10,000 for MNIST and
Fashion-MNIST, 5,000 for CIFAR-10). :func:`write` stores arrays as a TFDS dataset with
the features TFDS registers for that name, file order kept, so ``tfds.load`` works
offline afterwards.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from cgmq_jax.data.core import (
    NUM_CLASSES,
    DataError,
    Dataset,
    check_uint8_split,
    finish,
    one_line,
    with_validation,
)

REQUIREMENTS_HINT = "pip install -r requirements-tfds.txt"


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
    """A TFDS dataset this package reads, and how.

    Attributes:
        name: The TFDS name, e.g. ``"mnist"``; also the dataset's name here.
        version: The version prepared copies are looked for (and written) at.
        image_shape: ``(H, W, C)`` of the ``image`` feature.
        validation_size: Examples carved from the end of ``train`` as validation.
        ids: Whether TFDS registers a text ``id`` feature for it (CIFAR-10 does).
    """

    name: str
    version: str
    image_shape: tuple[int, int, int]
    validation_size: int
    ids: bool = False


MNIST = TfdsDataset("mnist", "3.0.1", (28, 28, 1), 10_000)
FASHION_MNIST = TfdsDataset("fashion_mnist", "3.0.1", (28, 28, 1), 10_000)
CIFAR10 = TfdsDataset("cifar10", "3.0.2", (32, 32, 3), 5_000, ids=True)


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """TFDS's data directory rule without importing TFDS: ``path``, else
    ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("TFDS_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / "tensorflow_datasets"


def installed() -> bool:
    """Whether ``tensorflow_datasets`` can be found (it is not imported)."""
    try:
        return importlib.util.find_spec("tensorflow_datasets") is not None
    except (ImportError, ValueError):
        return False


def prepared_dir(root: Path, spec: TfdsDataset) -> Path:
    """Where TFDS keeps ``spec``'s prepared copy under ``root``: ``root/name/version``."""
    return root / spec.name / spec.version


def is_prepared(root: Path, spec: TfdsDataset) -> bool:
    """Whether :func:`prepared_dir` holds a prepared copy (its ``dataset_info.json``)."""
    return (prepared_dir(root, spec) / "dataset_info.json").is_file()


def import_tfds() -> Any:
    """Imports tensorflow_datasets (slow and optional); a one-line error if unusable."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # silence TensorFlow's C++ banner
    try:
        import tensorflow_datasets as tfds
    except Exception as err:  # ImportError or a broken TF install
        raise DataError(
            f"tensorflow_datasets is not usable ({one_line(err)}); "
            f"run `{REQUIREMENTS_HINT}` or use another source"
        ) from None
    return tfds


def choose(root: Path, spec: TfdsDataset) -> str:
    """Why TFDS can't serve ``spec`` from ``root`` without a download ("" if it can).

    The directory is checked before importing TFDS, which is slow.
    """
    if not installed():
        return "tensorflow_datasets not installed"
    if not is_prepared(root, spec):
        return f"no prepared TFDS {spec.name}/{spec.version} in {root}"
    try:
        import_tfds()
    except DataError as err:
        return str(err).split(";")[0]
    return ""


def load(
    spec: TfdsDataset, path: str | os.PathLike[str] | None = None, *, download: bool = False
) -> Dataset:
    """Reads ``spec`` with ``tfds.load`` (no download unless asked) and carves validation."""
    root = data_dir(path)
    tfds = import_tfds()
    if not download and not is_prepared(root, spec):
        raise DataError(
            f"TFDS {spec.name}/{spec.version} is not prepared in {root}; run "
            f"`python -m cgmq_jax.data prepare-tfds --dataset {spec.name} --data_dir {root}` "
            "(offline) or pass download=True"
        )
    out = {}
    for split in ("train", "test"):
        try:
            ds = tfds.load(
                spec.name,
                split=split,
                data_dir=str(root),
                download=download,
                batch_size=-1,
                shuffle_files=False,
            )
            arrays = tfds.as_numpy(ds)
        except Exception as err:  # TFDS raises many kinds
            raise DataError(
                f"tfds.load({spec.name!r}, split={split!r}) from {root} failed "
                f"({one_line(err)}); re-run `python -m cgmq_jax.data prepare-tfds --dataset "
                f"{spec.name} --data_dir {root}` into an empty directory"
            ) from None
        out[split] = check_uint8_split(
            arrays["image"], arrays["label"], spec.image_shape, f"TFDS {spec.name} {split}"
        )
    splits = with_validation(out, spec.validation_size, what=f"TFDS {spec.name} in {root}")
    return finish(splits, spec.image_shape, source="tfds", name=spec.name)


def write(
    spec: TfdsDataset,
    root: Path,
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    *,
    description: str,
) -> Path:
    """Stores uint8 ``{"train", "test"}`` arrays as TFDS ``spec.name``/``spec.version``.

    Features are those TFDS registers for the name (``image``, ``label``, and for CIFAR-10
    ``id`` as TFDS numbers them, ``train_00000``...), written with
    ``tfds.dataset_builders.store_as_tfds_dataset``, file order kept.

    Returns:
        The prepared directory ``root/name/version``.
    """
    arrays = {}
    for split in ("train", "test"):
        if split not in images or split not in labels:
            raise DataError("prepare_tfds images/labels need keys 'train' and 'test'")
        arrays[split] = check_uint8_split(
            images[split], labels[split], spec.image_shape, f"prepare_tfds {split}"
        )
    tfds = import_tfds()
    features = {
        "image": tfds.features.Image(shape=spec.image_shape),
        "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
    }
    if spec.ids:
        features["id"] = tfds.features.Text()

    def examples(split: str) -> list[tuple[int, dict[str, Any]]]:
        x, y = arrays[split]
        x = x.reshape(len(x), *spec.image_shape)
        rows = []
        for i in range(len(x)):
            row = {"image": x[i], "label": int(y[i])}
            if spec.ids:
                row["id"] = f"{split}_{i:05d}"
            rows.append((i, row))
        return rows

    try:
        root.mkdir(parents=True, exist_ok=True)
        tfds.dataset_builders.store_as_tfds_dataset(
            name=spec.name,
            version=spec.version,
            features=tfds.features.FeaturesDict(features),
            split_datasets={split: examples(split) for split in arrays},
            data_dir=str(root),
            description=description,
            disable_shuffling=True,
        )
    except Exception as err:  # turned into a one-line DataError
        raise DataError(f"writing TFDS {spec.name} to {root} failed: {one_line(err)}") from None
    return prepared_dir(root, spec)
