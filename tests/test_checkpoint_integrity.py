"""Checkpoints are verified (issue 24): every checkpoint records the SHA-256 of each array and
of its meta, and a restore recomputes them. A flipped bit, a forged field, a truncated or
missing file, or a checkpoint without digests is one clear error naming the checkpoint and
the fix (the previous checkpoint, or --overwrite), exit status 2 at the CLI: never a
different model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_cli

from cgmq_jax import checkpoint, data, rundir, train

TINY = ["--epochs", "3", "--pretrain_epochs", "1", "--batch_size", "64"]
ARRAYS = {
    "params": {"w": jnp.arange(1000, dtype=jnp.float32) / 7, "b": jnp.ones(3, jnp.float32)},
    "step": jnp.asarray(3, jnp.int32),
}
META = {"position": "QAT epoch 1, batch 0", "history": [{"val_accuracy": 0.8307}]}

pytestmark = pytest.mark.usefixtures("standard_promotion_fixture")  # optax.adam


def _largest_data_file(step: Path) -> Path:
    return max((step / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def _flip(offset_fraction: float):
    def corrupt(step: Path) -> None:
        path = _largest_data_file(step)
        blob = bytearray(path.read_bytes())
        blob[int(len(blob) * offset_fraction)] ^= 0x10
        path.write_bytes(bytes(blob))

    return corrupt


def _truncate(step: Path) -> None:
    path = _largest_data_file(step)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_meta(edit):
    def corrupt(step: Path) -> None:
        path = step / "meta" / "metadata"
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))

    return corrupt


def _forge_accuracy(meta: dict) -> None:
    history = meta["progress"]["history"] if "progress" in meta else meta["history"]
    assert history[-1]["val_accuracy"] != 0.7882
    history[-1]["val_accuracy"] = 0.7882


def _drop_digests(meta: dict) -> None:  # what the previous version wrote
    del meta["_integrity"]


CORRUPTIONS = {
    "flipped_bit": (_flip(0.5), r"state/ (array .* differs|unreadable)"),
    "truncated_state_file": (_truncate, r"state/ (array .* differs|unreadable)"),
    "forged_val_accuracy": (_edit_meta(_forge_accuracy), "meta/metadata differs"),
    "missing_meta": (
        lambda step: (step / "meta" / "metadata").unlink(),
        "meta/metadata is missing",
    ),
    "missing_state": (lambda step: shutil.rmtree(step / "state"), "state/ is missing"),
    "no_digests": (_edit_meta(_drop_digests), "records no digests"),
}


def _saved(directory: Path, indices=(1,)) -> checkpoint.Checkpointer:
    saver = checkpoint.Checkpointer(directory)
    for index in indices:
        saver.save(index, ARRAYS, META)
    return saver


def _restore(directory: Path):
    saver = checkpoint.Checkpointer(directory)
    try:
        return saver.latest_meta(), saver.restore_arrays(ARRAYS)
    finally:
        saver.close()


def test_an_intact_checkpoint_restores_exactly(tmp_path):
    _saved(tmp_path / "ck").close()
    meta, arrays = _restore(tmp_path / "ck")
    assert meta == META  # the digests are not handed out
    for name in ("w", "b"):
        np.testing.assert_array_equal(arrays["params"][name], ARRAYS["params"][name])


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_damaged_checkpoint_is_one_error_naming_it_and_the_fix(tmp_path, name):
    corrupt, fragment = CORRUPTIONS[name]
    _saved(tmp_path / "ck").close()
    corrupt(tmp_path / "ck" / "1")
    with pytest.raises(checkpoint.CheckpointCorrupt, match=fragment) as caught:
        _restore(tmp_path / "ck")
    message = str(caught.value)
    assert isinstance(caught.value, rundir.RunDirError) and len(message.splitlines()) == 1
    assert f"checkpoint {tmp_path / 'ck' / '1'} cannot be used" in message
    assert message.endswith("pass --overwrite to start over")


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_a_flipped_bit_anywhere_in_the_data_is_refused_or_harmless(tmp_path, fraction):
    _saved(tmp_path / "ck").close()
    _flip(fraction)(tmp_path / "ck" / "1")
    try:
        _, arrays = _restore(tmp_path / "ck")
    except checkpoint.CheckpointCorrupt:
        return
    for name in ("w", "b"):  # never a different model
        np.testing.assert_array_equal(arrays["params"][name], ARRAYS["params"][name])


def test_a_damaged_latest_checkpoint_offers_the_previous_one(tmp_path):
    _saved(tmp_path / "ck", indices=(6, 12)).close()
    _flip(0.5)(tmp_path / "ck" / "12")
    with pytest.raises(checkpoint.CheckpointCorrupt) as caught:
        _restore(tmp_path / "ck")
    assert f"delete {tmp_path / 'ck' / '12'} to resume from the previous checkpoint " in str(
        caught.value
    )
    shutil.rmtree(tmp_path / "ck" / "12")
    meta, arrays = _restore(tmp_path / "ck")  # as the message says
    assert meta == META
    np.testing.assert_array_equal(arrays["params"]["w"], ARRAYS["params"]["w"])


# At the CLI: an unfinished run (stopped as Ctrl-C stops it), damaged, then --resume ----------


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory, tiny_mnist):
    """An unfinished run stopped at QAT epoch 2, batch 4 (checkpoints 12 and 16 kept)."""
    out = tmp_path_factory.mktemp("unfinished") / "run"
    calls = iter(range(1, 1000))

    class StopAt16:
        def __enter__(self):
            return lambda: next(calls) == 16

        def __exit__(self, *exc):
            return False

    with pytest.MonkeyPatch.context() as patch, jnp_standard():
        patch.setattr(data, "load", lambda *a, **k: tiny_mnist)
        patch.setattr(train, "stop_on_sigint", StopAt16)
        assert load_cli("mnist").main([*TINY, "--out", str(out)]) == 130
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["12", "16"]
    return out


def jnp_standard():
    import jax

    return jax.numpy_dtype_promotion("standard")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.split("\r")[-1].strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.slow
def test_resume_from_a_damaged_checkpoint_exits_2_naming_it(
    name, unfinished, tmp_path, monkeypatch, tiny_mnist, capsys
):
    corrupt, fragment = CORRUPTIONS[name]
    out = tmp_path / "run"
    shutil.copytree(unfinished, out)
    corrupt(out / "checkpoints" / "16")
    monkeypatch.setattr(data, "load", lambda *a, **k: tiny_mnist)
    capsys.readouterr()
    assert load_cli("mnist").main([*TINY, "--out", str(out), "--resume"]) == 2
    err = _one_line_error(capsys)
    assert f"checkpoint {out / 'checkpoints' / '16'} cannot be used" in err
    assert f"delete {out / 'checkpoints' / '16'} to resume from the previous checkpoint" in err
    assert "--overwrite" in err and "Traceback" not in err
    assert not (out / "results.json").exists()


@pytest.mark.slow
def test_a_damaged_checkpoint_is_reported_without_resume_too(
    unfinished, tmp_path, no_train, capsys
):
    out = tmp_path / "run"
    shutil.copytree(unfinished, out)
    _edit_meta(_forge_accuracy)(out / "checkpoints" / "16")
    assert load_cli("mnist").main([*TINY, "--out", str(out)]) == 2
    assert "meta/metadata differs from the one saved" in _one_line_error(capsys)
    assert load_cli("mnist").main([*TINY, "--out", str(out), "--resume"]) == 2  # at open
    assert "meta/metadata differs from the one saved" in _one_line_error(capsys)


@pytest.fixture
def no_train(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the damaged meta should be refused before data or training")

    monkeypatch.setattr(data, "load", refuse)
    monkeypatch.setattr(train, "fit", refuse)


LOST_FILE = "[Errno 2] No such file or directory: '.../meta.orbax-checkpoint-tmp'"
LOST_METADATA = (
    "No ArrayMetadata found for process_index=0 in the checkpoint directory: "
    ".../1.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp. But input PyTree ..."
)
FULL_DISK = "[Errno 28] No space left on device: '.../1.orbax-checkpoint-tmp/state'"


@pytest.mark.parametrize(
    "reason, written",
    [(LOST_FILE, True), (LOST_METADATA, True), ("boom", False), (FULL_DISK, False)],
)
def test_a_save_that_lost_a_file_of_its_temporary_directory_is_written_again_once(
    tmp_path, monkeypatch, reason, written
):
    # Seen twice in CI: Orbax lost a file of the save's own temporary directory mid-write.
    # A failure naming that directory is tried again once; a full disk, or any other
    # failure, is reported at once.
    saver = checkpoint.Checkpointer(tmp_path / "ck")
    real, calls = saver._manager.save, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError(reason)
        return real(*args, **kwargs)

    monkeypatch.setattr(saver._manager, "save", flaky)
    if written:
        saver.save(1, ARRAYS, META)
        assert len(calls) == 2 and saver.latest_meta() == META
    else:
        expected = "No space left on device" if reason == FULL_DISK else "boom"
        with pytest.raises(checkpoint.CheckpointError, match=expected):
            saver.save(1, ARRAYS, META)
        assert len(calls) == 1 and saver.latest_meta() is None
    assert not list((tmp_path / "ck").glob("*.orbax-checkpoint-tmp*"))
    saver.close()


def test_a_save_that_orbax_fails_midway_is_written_again_and_the_next_one_too(
    tmp_path, monkeypatch
):
    # The CI failure itself, inside Orbax: the save's array metadata reads back as missing
    # once ("No ArrayMetadata found ... 1.orbax-checkpoint-tmp"). The retry writes it, and
    # the manager saves the next checkpoint as usual.
    from orbax.checkpoint._src.metadata import array_metadata_store

    real, calls = array_metadata_store.Store.read, []

    async def lost_once(self, checkpoint_dir, process_index=None):
        calls.append(1)
        if len(calls) == 1:
            return None
        return await real(self, checkpoint_dir, process_index=process_index)

    monkeypatch.setattr(array_metadata_store.Store, "read", lost_once)
    saver = checkpoint.Checkpointer(tmp_path / "ck")
    saver.save(1, ARRAYS, META)
    assert len(calls) >= 2 and saver.latest_meta() == META
    saver.save(2, ARRAYS, {**META, "position": "later"})
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1", "2"]
    assert saver.latest_meta()["position"] == "later"
    saver.close()
