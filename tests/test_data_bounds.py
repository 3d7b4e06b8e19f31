"""Bounded data readers and meaningful evaluation splits (issue 24).

An IDX gzip bomb reached 3.4 GB of memory before "too long"; the IDX reader now reads the
header first and decompresses at most one byte more than it announces (and refuses a header
that announces more than ``MAX_ARRAY_BYTES``); the npz cache reader checks each member's
``.npy`` header before decompressing anything. A 7-image test split published a test
accuracy; validation and test splits under ``--min_eval_examples`` (100) are refused.
"""

from __future__ import annotations

import gzip
import io
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import load_cli

from cgmq_jax import data
from cgmq_jax.data import core, idx

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
RSS_BOUND_MIB = 400  # generous: the measured peak is far below (see the report of issue 24)


def _idx_header(magic: int, dims: tuple[int, ...]) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)


def _gzip_bomb(path: Path, header: bytes, gib: float) -> Path:
    """``header`` then ``gib`` GiB of zeros, as concatenated gzip members (a few MB)."""
    block = gzip.compress(bytes(64 * MIB), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(header))
        for _ in range(int(gib * 16)):
            f.write(block)
    return path


def _peak_rss_mib(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; its peak RSS (MiB) and its stdout."""
    probe = textwrap.dedent(
        f"""
        import resource, subprocess, sys
        child = subprocess.run([sys.executable, "-c", {code!r}], capture_output=True, text=True)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(peak, child.stdout.strip(), child.stderr.strip()[-300:], sep="\\n")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    peak, out, *_ = done.stdout.split("\n", 2)
    return float(peak), out


def _other_idx_files(directory: Path) -> Path:
    """The three files besides the training images, valid and small."""
    (directory / "train-labels-idx1-ubyte").write_bytes(_idx_header(2049, (10,)) + bytes(10))
    (directory / "t10k-images-idx3-ubyte").write_bytes(_idx_header(2051, (1, 28, 28)) + bytes(784))
    (directory / "t10k-labels-idx1-ubyte").write_bytes(_idx_header(2049, (1,)) + bytes(1))
    return directory


READ = """
from pathlib import Path
from cgmq_jax.data import DataError, idx
try:
    idx.read_directory(Path({directory!r}))
except DataError as error:
    print(error)
"""


def test_an_idx_gzip_bomb_is_refused_in_bounded_memory(tmp_path):
    # The header of MNIST's training images (47 MB), then 3.4 GB of zeros.
    _gzip_bomb(tmp_path / "train-images-idx3-ubyte.gz", _idx_header(2051, (60000, 28, 28)), 3.4)
    peak, message = _peak_rss_mib(READ.format(directory=str(_other_idx_files(tmp_path))))
    assert "train-images-idx3-ubyte.gz is too long: more than the 47040016 bytes" in message
    assert peak < RSS_BOUND_MIB, f"peak RSS {peak:.0f} MiB"


def test_an_idx_header_announcing_too_much_is_refused_before_reading(tmp_path):
    _gzip_bomb(tmp_path / "train-images-idx3-ubyte.gz", _idx_header(2051, (10**6, 280, 28)), 1)
    peak, message = _peak_rss_mib(READ.format(directory=str(_other_idx_files(tmp_path))))
    assert "announces 7,840,000,000 bytes (dims (1000000, 280, 28)), more than" in message
    assert peak < RSS_BOUND_MIB, f"peak RSS {peak:.0f} MiB"


def test_a_raw_idx_file_longer_than_its_header_is_read_only_that_far(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(_idx_header(2049, (3,)) + bytes(3 + 10 * MIB))
    raw = idx.read_bytes(path)
    assert len(raw) == 8 + 3 + 1  # the header, its 3 bytes, and one to tell "too long"
    with pytest.raises(data.DataError, match="labels is too long: more than the 11 bytes"):
        idx.parse(raw, idx.LABELS_MAGIC, path=path)
    path.write_bytes(_idx_header(2049, (3,)) + bytes([7, 0, 9]))  # exact: read as before
    assert idx.parse(idx.read_bytes(path), idx.LABELS_MAGIC, path=path).tolist() == [7, 0, 9]


def _npy_header(shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    out = io.BytesIO()
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue()  # the magic, the version and the header


def _cache_with(path: Path, member: str, payload: bytes) -> Path:
    """A valid uint8 cache (10 images per split) whose ``member`` is replaced."""
    arrays = {}
    for prefix in ("train", "val", "test"):
        arrays[f"{prefix}_x"] = np.zeros((10, 28, 28), np.uint8)
        arrays[f"{prefix}_y"] = np.arange(10, dtype=np.int32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            body = payload if info.filename == f"{member}.npy" else source.read(info)
            target.writestr(info.filename, body, zipfile.ZIP_DEFLATED)
    return path


@pytest.mark.parametrize(
    "shape, dtype, fragment",
    [
        ((5_000_000, 28, 28), "|u1", "announces 3,920,000,000 bytes"),
        ((10,), "|O", "has dtype object"),
        ((10,), "<f4", "has dtype float32"),
    ],
)
def test_a_cache_member_is_checked_from_its_header_before_loading(tmp_path, shape, dtype, fragment):
    cache = _cache_with(tmp_path / "mnist.npz", "train_x", _npy_header(shape, dtype) + bytes(64))
    with pytest.raises(data.DataError, match=fragment) as caught:
        core.read_cache(cache, (28, 28, 1), what="test cache", hint="make it")
    assert len(str(caught.value).splitlines()) == 1


def test_a_cache_bomb_is_refused_in_bounded_memory(tmp_path):
    # A member announcing 3.9 GB of uint8 images, with 1 GiB of zeros actually stored.
    header = _npy_header((5_000_000, 28, 28))
    # Deflate level 1: the same archive of zeros, written in half the time of the default.
    bomb = zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED, compresslevel=1)
    with bomb as target:
        with target.open("train_x.npy", "w", force_zip64=True) as member:
            member.write(header)
            for _ in range(16):
                member.write(bytes(64 * MIB))
    code = (
        "from pathlib import Path\nfrom cgmq_jax.data import DataError, core\ntry:\n"
        f"    core.read_cache(Path({str(tmp_path / 'bomb.npz')!r}), (28, 28, 1), "
        "what='cache', hint='x')\nexcept DataError as error:\n    print(error)\n"
    )
    peak, message = _peak_rss_mib(code)
    assert "announces 3,920,000,000 bytes" in message
    assert peak < RSS_BOUND_MIB, f"peak RSS {peak:.0f} MiB"


# Evaluation splits too small to mean anything -------------------------------------------


def test_a_seven_image_test_split_publishes_no_accuracy(tmp_path, tiny_mnist, monkeypatch, capsys):
    small = data.Dataset(
        tiny_mnist.train,
        tiny_mnist.validation,
        tuple(a[:7] for a in tiny_mnist.test),
        "idx",
        "mnist",
    )
    monkeypatch.setattr(data, "load", lambda *a, **k: small)
    out = tmp_path / "run"
    assert load_cli("mnist").main(["--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: the test split of idx has 7 examples, fewer than 100: its accuracy would mean "
        "nothing; use more data (or lower --min_eval_examples)"
    )
    assert not (out / "results.json").exists()
    with pytest.raises(data.DataError, match="validation split of idx has 50 examples"):
        data.check_eval_splits(
            data.Dataset(small.train, tuple(a[:50] for a in small.validation), small.train, "idx")
        )
    data.check_eval_splits(small, minimum=7)  # an explicit, lower minimum is the user's call


def test_min_eval_examples_must_be_positive(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "load", pytest.fail)
    assert load_cli("mnist").main(["--min_eval_examples", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--min_eval_examples must be at least 1" in capsys.readouterr().err


# --out that is not a run directory ---------------------------------------------------------


@pytest.mark.parametrize("out", ["", " "])
def test_an_empty_out_is_refused(out, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "load", pytest.fail)
    assert load_cli("mnist").main(["--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --out is empty; name a directory for the run (e.g. --out runs/mnist)"
    assert list(tmp_path.iterdir()) == []


def test_a_directory_with_other_files_is_not_a_run_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "load", pytest.fail)
    for out in (".", str(tmp_path)):
        assert load_cli("mnist").main(["--out", out, "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert "is a directory that holds no run but other files (notes.txt)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
