import json
import os
import random

import numpy as np
import pytest
import torch

from distrl.errors import DistrlError
from distrl.runtime.checkpoint import (
    MARKER,
    CheckpointWriteError,
    drop_files,
    latest_checkpoint,
    load_torch_state,
    prune_checkpoints,
    rng_state,
    save_torch_state,
    set_rng_state,
    verify_checkpoint,
    write_checkpoint,
)


def fill(tmp):
    (tmp / "weights.bin").write_bytes(bytes(range(256)) * 8)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "config.json").write_text('{"layers": 2}')


def save(root, step):
    return write_checkpoint(root, f"step_{step}", fill, meta={"step": step})


def test_round_trip_and_manifest(tmp_path):
    path = write_checkpoint(tmp_path, "step_3", fill, meta={"step": 3, "reward": 0.5})
    assert path == tmp_path / "step_3"
    assert verify_checkpoint(path) == {"step": 3, "reward": 0.5}
    marker = json.loads((path / MARKER).read_text())
    assert set(marker["files"]) == {"weights.bin", "sub/config.json"}
    assert marker["files"]["weights.bin"]["size"] == 2048
    assert not list(tmp_path.glob(".tmp-*"))


def test_rewriting_a_name_replaces_it(tmp_path):
    write_checkpoint(tmp_path, "best", fill, meta={"step": 1})
    write_checkpoint(tmp_path, "best", lambda tmp: (tmp / "a").write_text("x"), meta={"step": 2})
    assert verify_checkpoint(tmp_path / "best") == {"step": 2}
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["a", MARKER]
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "sub" / "config.json").unlink(), r"sub/config.json is missing"),
        (lambda p: (p / "weights.bin").write_bytes(b"\0" * 100), r"weights.bin has 100 bytes"),
        (lambda p: flip_byte(p / "weights.bin"), r"weights.bin fails its sha256"),
        (lambda p: (p / MARKER).unlink(), r"incomplete"),
        (lambda p: (p / MARKER).write_text('{"files": '), r"unreadable"),
    ],
)
def test_verify_names_the_folder_and_bad_file(tmp_path, damage, message):
    path = save(tmp_path, 1)
    damage(path)
    with pytest.raises(DistrlError, match=message) as info:
        verify_checkpoint(path)
    assert str(path) in str(info.value)


def flip_byte(file):
    data = bytearray(file.read_bytes())
    data[1000] ^= 0xFF
    file.write_bytes(bytes(data))


def test_latest_skips_a_corrupt_newest_with_a_warning(tmp_path):
    for step in (2, 10, 20):
        save(tmp_path, step)
    flip_byte(tmp_path / "step_20" / "weights.bin")
    (tmp_path / "step_x").mkdir()  # not a step folder
    with pytest.warns(UserWarning, match=r"step_20.*weights.bin"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step_10"  # numeric, not "step_2"


def test_latest_is_none_without_checkpoints(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None


def test_interrupted_write_leaves_previous_intact(tmp_path):
    save(tmp_path, 1)

    def crash(tmp):
        fill(tmp)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        write_checkpoint(tmp_path, "step_2", crash, meta={"step": 2})
    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path, "step_1", crash, meta={"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
    assert verify_checkpoint(tmp_path / "step_1") == {"step": 1}
    assert latest_checkpoint(tmp_path) == tmp_path / "step_1"


def test_a_full_disk_is_one_line_and_leaves_every_checkpoint_as_it_was(tmp_path):
    """The kernel's own ENOSPC (``/dev/full``), as a checkpoint writer on a full disk meets it."""
    save(tmp_path, 1)

    def onto_a_full_disk(tmp):
        fill(tmp)
        with open("/dev/full", "wb") as full:
            full.write(b"\0" * 4096)
            full.flush()

    for name in ("step_2", "step_1"):
        with pytest.raises(CheckpointWriteError) as refused:
            write_checkpoint(tmp_path, name, onto_a_full_disk, meta={"step": 2})
        assert str(refused.value) == (
            f"cannot write checkpoint {tmp_path / name}: No space left on device (ENOSPC)"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]  # no temporary folder left
    assert verify_checkpoint(tmp_path / "step_1") == {"step": 1}


def test_bad_meta_fails_before_writing(tmp_path):
    with pytest.raises(ValueError):
        write_checkpoint(tmp_path, "step_1", fill, meta={"loss": float("nan")})
    assert not list(tmp_path.iterdir())


def test_prune_keeps_newest_and_removes_stale_tmp(tmp_path):
    for step in (1, 2, 3, 10, 11):
        save(tmp_path, step)
    (tmp_path / ".tmp-step_12-999-abcd").mkdir()
    write_checkpoint(tmp_path, "best", fill, meta={})
    prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step_10", "step_11"]


def test_only_the_newest_kept_step_keeps_resume_only_files(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    prune_checkpoints(tmp_path, keep=2, newest_only=frozenset({"weights.bin"}))
    assert not (tmp_path / "step_1").exists()
    assert not (tmp_path / "step_2" / "weights.bin").exists()
    assert (tmp_path / "step_3" / "weights.bin").is_file()
    verify_checkpoint(tmp_path / "step_2")  # its manifest no longer lists the file
    assert json.loads((tmp_path / "step_2" / MARKER).read_text())["dropped"] == ["weights.bin"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_3"


def test_dropping_a_file_keeps_the_rest_verified(tmp_path):
    path = save(tmp_path, 1)
    drop_files(path, {"weights.bin", "not-there"})
    assert verify_checkpoint(path) == {"step": 1}
    (path / "sub" / "config.json").write_text('{"layers": 3}')
    with pytest.raises(DistrlError, match="config.json"):
        verify_checkpoint(path)


def test_dropping_a_folder_drops_all_its_files(tmp_path):
    """A sharded learner's optimizer state is a folder of files, one per rank."""
    path = save(tmp_path, 1)
    drop_files(path, {"sub"})
    assert not (path / "sub").exists() and (path / "weights.bin").is_file()
    assert json.loads((path / MARKER).read_text())["dropped"] == ["sub/config.json"]
    assert verify_checkpoint(path) == {"step": 1}


def test_a_file_dropped_while_it_is_verified_is_not_called_missing(tmp_path, monkeypatch):
    """A reader (a test, ``distrl.validate``) can read a live run's manifest just before the
    run prunes a file from it: the file is gone, and so is its line in the manifest now."""
    from distrl.runtime import checkpoint

    path = save(tmp_path, 1)
    stale = checkpoint._read_marker(path)
    drop_files(path, {"weights.bin"})
    reads = iter([stale])
    real = checkpoint._read_marker
    monkeypatch.setattr(checkpoint, "_read_marker", lambda p: next(reads, None) or real(p))
    assert verify_checkpoint(path) == {"step": 1}
    (path / "sub" / "config.json").unlink()  # still listed: a torn folder, refused
    with pytest.raises(DistrlError, match="config.json is missing"):
        verify_checkpoint(path)


def test_torch_state_loads_with_weights_only(tmp_path):
    state = {
        "weights": {"w": torch.arange(6.0).reshape(2, 3)},
        "version": 4,
        "lr": 3e-5,
        "names": ["a", "b"],
        "extra": {"prompts": {"epoch": 1, "order": [3, 1, 2]}, "best": float("-inf")},
        "rng": rng_state(),
    }
    save_torch_state(tmp_path / "state.pt", state)
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert torch.equal(loaded["weights"]["w"], state["weights"]["w"])
    assert loaded["extra"] == state["extra"] and loaded["names"] == ["a", "b"]
    assert load_torch_state(tmp_path / "state.pt")["version"] == 4


def test_load_refuses_arbitrary_objects(tmp_path):
    torch.save({"obj": object()}, tmp_path / "bad.pt")
    with pytest.raises(DistrlError, match=r"bad.pt: it holds object, which weights_only"):
        load_torch_state(tmp_path / "bad.pt")
    with pytest.raises(DistrlError, match="missing.pt"):
        load_torch_state(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(DistrlError, match="junk.pt"):
        load_torch_state(tmp_path / "junk.pt")


def draw():
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + [np.random.standard_normal()],
        torch.rand(3).tolist() + torch.randn(1).tolist(),
    )


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leave a cached gaussian in both python and numpy state
    np.random.standard_normal()
    save_torch_state(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = draw()
    draw()
    set_rng_state(load_torch_state(tmp_path / "rng.pt")["rng"])
    assert draw() == expected


def test_files_are_readable_like_any_other_whatever_wrote_them(tmp_path):
    def private(tmp):  # as safetensors leaves its file
        (tmp / "model.safetensors").write_bytes(b"w")
        (tmp / "model.safetensors").chmod(0o600)

    mask = os.umask(0o022)
    try:
        path = write_checkpoint(tmp_path, "step_1", private, meta={"step": 1})
    finally:
        os.umask(mask)
    assert (path / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (path / "distrl_checkpoint.json").stat().st_mode & 0o777 == 0o644
