"""Every config option composes against the schema, passes the range checks and builds."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shd_vision.config import CONF_DIR, check_config, compose_train
from shd_vision.data.loaders import open_splits
from shd_vision.distill.base import Distiller, active_terms
from shd_vision.errors import UserError
from shd_vision.models.factory import build

GROUPS = ["model", "teacher", "data", "kd", "optim", "sched", "trainer", "logger", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / c / "0.png")
    return root


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_checks_and_builds(group, option, image_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = compose_train([f"{group}={option}", "debug=fast", f"paths.log_dir={tmp_path}",
                         *([f"data.root={image_root}", "data.num_classes=null"] if option in ("imagefolder", "imagenet")
                           or option.startswith("imagenet_") else [])])
    check_config(cfg)
    if group in ("model", "teacher"):
        spec = cfg[group]
        kwargs = {k: v for k, v in spec.items() if k not in ("pretrained", "checkpoint", "use_ema", "mean", "std")}
        model = build(kwargs, 10, group)
        assert model.num_classes == 10
    elif group == "data" and option in ("hfds", "wds"):  # read in test_readers.py, from data written there
        with pytest.raises(UserError, match="Hugging Face dataset could not be read|has no _info.json"):
            open_splits(cfg.data)
    elif group == "data" and option != "synthetic":
        train, val, classes = open_splits(cfg.data)
        assert len(train) > 0 and len(val) > 0 and len(classes) == len(train.classes)
    elif group == "kd":
        tiny = {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 24, "depth": 2}
        student = build({"name": "deit_tiny_distilled_patch16_224", "num_heads": 2, **tiny}, 10, "model")
        teacher = build({"name": "vit_tiny_patch16_224", "num_heads": 4, **tiny}, 10, "teacher")
        assert Distiller(student, active_terms(cfg.kd), teacher).weights


def test_optimisers_and_schedules_build_with_timm(tmp_path):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    for optim in sorted(p.stem for p in (CONF_DIR / "optim").glob("*.yaml")):
        for sched in sorted(p.stem for p in (CONF_DIR / "sched").glob("*.yaml")):
            cfg = compose_train([f"optim={optim}", f"sched={sched}", f"paths.log_dir={tmp_path}"])
            opt = create_optimizer_v2(torch.nn.Linear(2, 2), opt=cfg.optim.opt, lr=0.1,
                                      weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum)
            s = cfg.sched
            scheduler, _ = create_scheduler_v2(opt, sched=s.sched, num_epochs=3, updates_per_epoch=4,
                                               warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr,
                                               min_lr=s.min_lr, decay_epochs=s.decay_epochs,
                                               decay_milestones=list(s.decay_milestones),
                                               decay_rate=s.decay_rate, step_on_epochs=False)
            scheduler.step_update(5)
            assert opt.param_groups[0]["lr"] > 0


def test_experiments_name_their_run_directories(tmp_path):
    cfg = compose_train(["experiment=fmnist_teacher", f"paths.log_dir={tmp_path}"])
    assert Path(cfg.paths.output_dir) == tmp_path / "teachers" / "vit_fmnist_teacher"
    assert cfg.teacher is None and cfg.model.embed_dim == 96
