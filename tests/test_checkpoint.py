"""Atomic checkpoint writes, the last/prev/best rotation, and weights_only loading."""

import errno

import numpy as np
import pytest
import torch

from shd_vision.engine import checkpoint as ck
from shd_vision.errors import UserError
from shd_vision.models.weights import FORMAT_KEY, read_file


def state(step):
    return {FORMAT_KEY: ck.FORMAT_VERSION, "model": {"w": torch.full((3,), float(step))}, "step": step}


def test_rotation_keeps_previous_and_best(tmp_path):
    cps = ck.Checkpoints(tmp_path)
    cps.save(state(1), is_best=True)
    cps.save(state(2), is_best=False)
    cps.save(state(3), is_best=False)
    steps = {p.name: ck.load(p, "x")["step"] for p in cps.existing()}
    assert steps == {"last.pt": 3, "prev.pt": 2, "best.pt": 1}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt", "prev.pt"]


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    cps = ck.Checkpoints(tmp_path)
    cps.save(state(1), is_best=True)

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device.*previous file, if any, is intact"):
        cps.save(state(2), is_best=True)
    monkeypatch.undo()
    assert ck.load(cps.last, "x")["step"] == 1 and ck.load(cps.best, "x")["step"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_a_truncated_last_checkpoint_falls_back_to_prev(tmp_path):
    cps = ck.Checkpoints(tmp_path)
    cps.save(state(1), is_best=False)
    cps.save(state(2), is_best=False)
    data = cps.last.read_bytes()
    cps.last.unlink()  # last.pt and prev.pt are separate files, not links, after this
    cps.last.write_bytes(data[: len(data) // 2])
    path, loaded = cps.newest_readable()
    assert path.name == "prev.pt" and loaded["step"] == 1
    with pytest.raises(UserError, match="truncated"):
        ck.load(cps.last, "trainer.resume")


def test_non_checkpoints_are_refused_with_a_message(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="could not be read as a checkpoint"):
        read_file(tmp_path / "notes.pt", "ckpt")
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "timm.pth")
    with pytest.raises(UserError, match="not an shd-vision training checkpoint"):
        ck.load(tmp_path / "timm.pth", "trainer.resume")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(1)
    ck.atomic_save({"rng": ck.rng_state()}, tmp_path / "rng.pt")
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(2), np.random.seed(2)
    ck.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    torch.testing.assert_close(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
