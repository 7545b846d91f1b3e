"""What a newcomer types first: every student against the embedded default's teacher (grey,
28 px, 6 heads, 6 blocks, a 7x7 patch grid), the paper's ImageNet settings on synthetic data.
Each run finishes or stops with a deliberate one-paragraph error, never a traceback."""

import pytest
import torch

from conftest import PROJECT_ROOT, debug_args, run_cli

MODELS = sorted(p.stem for p in (PROJECT_ROOT / "conf/model").glob("*.yaml"))
# one step on four images of a tiny subset: the point is that the pairing works, not the numbers
SHORT = ["data.batch_size=4", "data.train_size=8", "data.val_size=8", "trainer.max_steps=1",
         "trainer.eval_teacher=false", "trainer.attention_images=0"]
RUNS = ([(m, "shd") for m in MODELS] + [(m, "deit") for m in MODELS if m.endswith("_distilled")])


def finished(result):
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("model,kd", RUNS, ids=[f"model={m},kd={k}" for m, k in RUNS])
def test_every_student_runs_with_the_default_teacher(model, kd, tmp_path):
    finished(run_cli("train.py", *debug_args(tmp_path, f"model={model}", f"kd={kd}", *SHORT)))
    log = (tmp_path / "run/train.log").read_text()
    assert "run summary" in log and (tmp_path / "run/summary.json").is_file()
    assert "teacher vit_tiny_patch16_224 [6 blocks, width 96, 6 heads, patch 4" in log


@pytest.mark.slow
def test_the_design_cards_pairing_maps_12_blocks_and_a_14x14_grid_onto_the_teacher(tmp_path):
    """``model=deit_tiny kd=shd``: 12 student blocks from 6 teacher blocks, 196 patches from 49,
    RGB 224-px images from a grey 28-px teacher."""
    from shd_vision.config import compose_train
    from shd_vision.distill.mapping import layer_pairs
    from shd_vision.engine.train import train

    cfg = compose_train(debug_args(tmp_path, "model=deit_tiny", "kd=shd", *SHORT, "trainer.attention_images=1"))
    summary, objects = train(cfg)
    shd = objects["distiller"].methods["shd"]
    assert shd.pairs == layer_pairs(12, 6) and shd.pairs[0] == (0, 0) and shd.pairs[-1] == (11, 5)
    assert shd.student_layout.grid == (14, 14) and shd.teacher_layout.grid == (7, 7)
    teacher = objects["teacher"]
    x = torch.zeros(2, 3, 224, 224)
    assert teacher.adapt(x).shape == (2, 1, 28, 28)
    assert summary["terms"] == {"ce": 1.0, "logit": 1.0, "shd": 1.0}
    assert (tmp_path / "run/attention/attention_image0.png").is_file()  # 14x14 maps beside 7x7 ones


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["imagenet_deit_s_to_ti", "imagenet_deit_b_to_s"])
def test_the_papers_imagenet_settings_run_on_synthetic_data(experiment, tmp_path):
    """DeiT's recipe as composed (300 epochs, EMA, DeiT augmentation); the data swapped for
    synthetic images and the run cut to one step on a CPU."""
    from shd_vision.config import compose_train

    cfg = compose_train([f"experiment={experiment}", "kd=shd", f"paths.log_dir={tmp_path}"])
    assert cfg.trainer.epochs == 300 and cfg.trainer.ema.enabled and cfg.data.repeated_aug == 3
    assert cfg.data.aug.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.mixup.cutmix_alpha == 1.0
    assert cfg.optim.lr_base == 5e-4 and cfg.optim.lr_base_size == 512 and cfg.sched.warmup_epochs == 5
    finished(run_cli("train.py", *debug_args(tmp_path, f"experiment={experiment}", "kd=shd", "data=synthetic",
                                             "trainer.device=cpu", "trainer.precision=32", *SHORT),
                     env={"HF_HUB_OFFLINE": "1"}))  # no hub here: fail fast to debug=fast's random teacher
    assert "run summary" in (tmp_path / "run/train.log").read_text()
