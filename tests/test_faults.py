"""Faults a long run must survive (docs/reliability.md): kill -9 at random steps, a checkpoint
truncated on disk, a full disk while saving. A non-finite loss: tests/test_train.py."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import debug_args
from shd_vision.config import PROJECT_ROOT
from shd_vision.engine import checkpoint as ck
from shd_vision.engine.train import train
from shd_vision.errors import UserError

STEPS = 30


def run_args(tmp, teacher_ckpt, run):
    # 8 steps per epoch, so the kills land in training, in validation or in a checkpoint write
    return debug_args(tmp, f"hydra.run.dir={tmp}/{run}", "kd=logit", f"teacher.checkpoint={teacher_ckpt}",
                      "trainer.epochs=4", f"trainer.max_steps={STEPS}", "trainer.ckpt_every_steps=1",
                      "trainer.resume=auto", "+model.drop_path_rate=0.1", "data.mixup.mixup_alpha=0.4",
                      "trainer.eval_teacher=false", "trainer.attention_images=0")


def last_step(metrics):
    if not metrics.exists():
        return 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def start(args):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def final_state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["state"], ckpt["model"]


@pytest.mark.slow
def test_kill_9_at_random_steps_then_resume_gives_the_uninterrupted_weights(tmp_path, teacher_ckpt):
    seed = time.time_ns() % 10_000
    kills = sorted(random.Random(seed).sample(range(2, STEPS - 2), 2))
    note = f"(kill steps {kills}, seed {seed})"
    straight = start(run_args(tmp_path, teacher_ckpt, "straight"))
    assert straight.wait(300) == 0, straight.stderr.read()[-2000:]

    metrics = tmp_path / "killed" / "metrics.jsonl"
    for k in kills:
        proc = start(run_args(tmp_path, teacher_ckpt, "killed"))
        while last_step(metrics) < k and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before step {k} {note}: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(60)
    # and the newest checkpoint damaged on disk: resume falls back to prev.pt
    last = tmp_path / "killed/checkpoints/last.pt"
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data[: len(data) // 3])

    resumed = start(run_args(tmp_path, teacher_ckpt, "killed"))
    assert resumed.wait(300) == 0, resumed.stderr.read()[-2000:]
    log = (tmp_path / "killed/train.log").read_text()
    assert "Not resuming from" in log and "truncated" in log and "prev.pt" in log, note
    a_state, a = final_state(tmp_path / "straight/checkpoints/last.pt")
    b_state, b = final_state(last)
    assert a_state == b_state and a_state["step"] == STEPS, note
    assert all(torch.equal(a[k], b[k]) for k in a), note


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_resumes(make_cfg, teacher_ckpt, tmp_path,
                                                                           monkeypatch):
    common = ["kd=logit", f"teacher.checkpoint={teacher_ckpt}", "trainer.max_steps=6", "trainer.ckpt_every_steps=1",
              "trainer.eval_teacher=false", "trainer.attention_images=0", "trainer.resume=auto"]
    train(make_cfg(*common, run="straight"))
    saves = {"n": 0}
    save = torch.save

    def disk_full_on_the_fourth_save(obj, f, *a, **k):
        saves["n"] += 1
        if saves["n"] == 4:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", disk_full_on_the_fourth_save)
    with pytest.raises(UserError, match="No space left on device.*previous file, if any, is intact"):
        train(make_cfg(*common, run="full"))
    monkeypatch.undo()
    kept = ck.Checkpoints(tmp_path / "full")
    assert {"last.pt", "prev.pt"} <= {p.name for p in kept.existing()}
    assert ck.load(kept.last, "x")["state"]["step"] == 3
    assert not [p for p in kept.dir.iterdir() if p.name.startswith(".")]  # no temp files left behind
    train(make_cfg(*common, run="full"))
    a_state, a = final_state(tmp_path / "straight/checkpoints/last.pt")
    b_state, b = final_state(kept.last)
    assert a_state == b_state and all(torch.equal(a[k], b[k]) for k in a)
