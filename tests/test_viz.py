"""Attention pictures from the command line, and the head-similarity statistic."""

import torch

from conftest import debug_args, paragraph, run_cli
from shd_vision.viz.attention import head_similarity


def test_head_similarity_of_identical_and_disjoint_heads():
    a = torch.zeros(1, 3, 4, 4)
    a[0, 0, :, 0] = 1  # every query attends to key 0
    a[0, 1, :, 0] = 1  # the same map
    a[0, 2, :, 3] = 1  # a disjoint one
    sim = head_similarity(a)
    torch.testing.assert_close(sim, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def test_viz_writes_every_picture_for_an_shd_checkpoint(tmp_path, teacher_ckpt):
    train = run_cli("train.py", *debug_args(tmp_path, "kd=shd", f"teacher.checkpoint={teacher_ckpt}"))
    assert train.returncode == 0, train.stderr[-2000:]
    out = tmp_path / "viz"
    result = run_cli("-m shd_vision.viz", f"ckpt={tmp_path}/run/checkpoints/last.pt", "images=1", "batch=8",
                     f"hydra.run.dir={out}", "merge=group", "layers=[[3,5]]")
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("squeeze_weights", "head_redundancy", "attention_image0", "attention_full_image0"):
        assert (out / f"{name}.png").stat().st_size > 10_000


def test_viz_of_a_run_without_teacher_is_a_user_error(tmp_path):
    assert run_cli("train.py", *debug_args(tmp_path, "kd=none", "~teacher")).returncode == 0
    result = run_cli("-m shd_vision.viz", f"ckpt={tmp_path}/run/checkpoints/last.pt", f"hydra.run.dir={tmp_path}/v")
    assert result.returncode == 2 and "trained without a teacher" in paragraph(result.stderr)
