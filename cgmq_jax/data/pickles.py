"""Reading pickled datasets safely: an unpickler that only rebuilds numpy arrays.

MNIST's bundled copy and CIFAR-10's official batches are pickles. A pickle can name any
importable callable, so ``pickle.load`` on a downloaded file runs whatever it says;
:func:`restricted_loads` admits only what array reconstruction needs and refuses every
other global with a one-line :class:`~cgmq_jax.data.DataError`.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import Any

import numpy as np

from cgmq_jax.data.core import DataError, one_line


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and dtypes (and protocol-2 bytes); refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        # numpy.core is a deprecated alias of numpy._core in numpy 2; resolve it directly.
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np._core.multiarray._reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":  # how Python 3 writes bytes at protocol 2
            return codecs.encode
        raise DataError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def restricted_loads(data: bytes, *, encoding: str = "latin1") -> Any:
    """Unpickles ``data`` admitting only numpy arrays, dtypes and plain Python values.

    Args:
        data: The pickle's bytes.
        encoding: How Python 2 ``str`` objects are decoded: ``"latin1"`` (strings) or
            ``"bytes"`` (kept as bytes, as CIFAR-10's dictionaries need).

    Raises:
        DataError: The pickle names a global other than numpy array reconstruction, or
            it is truncated or malformed.

    Example:
        >>> import pickle
        >>> restricted_loads(pickle.dumps({"x": np.arange(3)}))["x"].tolist()
        [0, 1, 2]
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except DataError:
        raise
    except Exception as err:  # truncated / malformed pickle
        raise DataError(f"malformed pickle ({one_line(err)})") from None
