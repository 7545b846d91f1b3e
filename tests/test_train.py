"""train(cfg) end to end on tiny configs: artefacts, exact resume, no overwriting, export,
divergence, EMA and mixup."""

import json

import pytest
import timm
import torch

from shd_vision.distill import ce
from shd_vision.engine import checkpoint as ck
from shd_vision.engine.train import train
from shd_vision.errors import UserError


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_a_run_writes_checkpoints_metrics_pictures_and_summary(make_cfg, teacher_ckpt, tmp_path):
    summary, _ = train(make_cfg("kd=logit", f"teacher.checkpoint={teacher_ckpt}", "trainer.export=true"))
    run = tmp_path / "run"
    for name in ("train.log", "metrics.jsonl", "metrics.csv", "summary.json", "curves.png", "confusion.png",
                 "checkpoints/last.pt", "checkpoints/best.pt", "export/model.safetensors", "export/config.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "summary.json").read_text())["top1"] == summary["top1"]
    assert {"top1", "top5", "train_samples_per_s"} <= set(summary) and summary["steps"] == 4
    assert summary["terms"] == {"ce": 1.0, "logit": 1.0} and summary["teacher_top1"] is not None
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert train_rows[0]["loss"] == pytest.approx(train_rows[0]["loss/ce"] + train_rows[0]["loss/logit"], rel=1e-5)
    assert [r for r in records if r["split"] == "val"][-1]["top1"] == summary["top1"]
    log = (run / "train.log").read_text()
    assert "img/s" in log and "eta" in log and "run summary" in log
    ckpt = ck.load(run / "checkpoints" / "last.pt", "x")  # weights_only=True
    assert ckpt["state"]["step"] == 4 and "kd:" in ckpt["config"] and ckpt["classes"][0] == "T-shirt/top"
    assert (run / "config.yaml").read_text() == ckpt["config"]


def test_export_is_loadable_by_timm_alone(make_cfg, tmp_path):
    train(make_cfg("kd=none", "trainer.export=true"))
    export = tmp_path / "run" / "export"
    state = weights(tmp_path / "run" / "checkpoints" / "last.pt")
    by_folder = timm.create_model(f"local-dir:{export}", pretrained=True)
    args = json.loads((export / "config.json").read_text())["model_args"]
    by_file = timm.create_model("vit_tiny_patch16_224", pretrained=True, **args,
                                pretrained_cfg_overlay=dict(file=str(export / "model.safetensors"),
                                                            num_classes=args["num_classes"]))
    x = torch.randn(2, 1, 28, 28)
    for model in (by_folder, by_file):
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert list(by_folder.pretrained_cfg["mean"]) == [0.286]
    torch.testing.assert_close(by_folder.eval()(x), by_file.eval()(x))


@pytest.mark.parametrize("workers,kd", [(0, "logit"), pytest.param(2, "logit", marks=pytest.mark.slow), (0, "manifold")])
def test_resume_inside_an_epoch_reproduces_the_uninterrupted_run(make_cfg, teacher_ckpt, tmp_path, workers, kd):
    # dropout, drop path, augmentation, mixup and manifold KD's token sample all draw random numbers
    common = [f"kd={kd}", f"teacher.checkpoint={teacher_ckpt}", "trainer.epochs=2", f"data.num_workers={workers}",
              "+model.drop_rate=0.1", "+model.drop_path_rate=0.1", "data.mixup.mixup_alpha=0.4",
              "trainer.ema.enabled=true", "trainer.eval_teacher=false"]
    train(make_cfg(*common, "trainer.max_steps=11", run="straight"))
    train(make_cfg(*common, "trainer.max_steps=5", run="resumed"))
    train(make_cfg(*common, "trainer.max_steps=11", "trainer.resume=auto", run="resumed"))
    straight = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)
    assert straight["state"] == resumed["state"] and straight["state"]["step"] == 11
    for key in ("model", "model_ema"):
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key]), key
    # the resumed run started at step 5, mid-way through the first 8-step epoch
    assert "resumed from" in (tmp_path / "resumed/train.log").read_text()


def test_an_existing_run_is_never_overwritten(make_cfg, tmp_path):
    train(make_cfg("kd=none"))
    before = (tmp_path / "run/checkpoints/last.pt").read_bytes()
    with pytest.raises(UserError, match="never overwritten.*trainer.resume=auto"):
        train(make_cfg("kd=none"))
    assert (tmp_path / "run/checkpoints/last.pt").read_bytes() == before


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(make_cfg, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = ce.CrossEntropy.forward

    def poisoned(self, batch, student, teacher):
        calls["n"] += 1
        loss, logs = forward(self, batch, student, teacher)
        return (loss * float("nan") if calls["n"] == 4 else loss), logs

    monkeypatch.setattr(ce.CrossEntropy, "forward", poisoned)
    with pytest.raises(UserError, match=r"loss became nan at step 4.*last good checkpoint.*is kept"):
        train(make_cfg("kd=none", "trainer.ckpt_every_steps=2", "trainer.max_steps=6"))
    kept = ck.load(tmp_path / "run/checkpoints/last.pt", "x")
    assert kept["state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values())


def test_ema_mixup_and_label_smoothing_run(make_cfg):
    summary, _ = train(make_cfg("kd=none", "trainer.ema.enabled=true", "trainer.ema.decay=0.5",
                             "data.mixup.mixup_alpha=0.8", "data.mixup.cutmix_alpha=1.0",
                             "data.mixup.label_smoothing=0.1"))
    assert summary["top1_ema"] is not None and 0 <= summary["top1_ema"] <= 100


def test_kd_none_needs_no_teacher_checkpoint(make_cfg, tmp_path):
    summary, _ = train(make_cfg("kd=none", f"teacher.checkpoint={tmp_path}/missing.pt",
                             "trainer.allow_random_teacher=false"))
    assert summary["teacher"] is None


def test_a_run_of_hours_says_so_once_before_its_first_log_line(make_cfg, tmp_path, monkeypatch):
    """A slow step (here: a clock that advances 50 min per step) gets a rate and ETA line after
    its first 20 s, and one warning naming what shortens the run, not one per log line."""
    from types import SimpleNamespace

    from shd_vision.engine import logbook

    clock = {"t": 0.0}

    def slow_clock():
        clock["t"] += 3000.0
        return clock["t"]

    monkeypatch.setattr(logbook, "time", SimpleNamespace(perf_counter=slow_clock))
    train(make_cfg("kd=none", "trainer.log_every=3", "trainer.max_steps=6"))
    text = (tmp_path / "run/train.log").read_text()
    assert text.count("at this rate the run needs") == 1 and "trainer.max_steps=N" in text
    early = text.index("first 1 steps:")
    assert early < text.index("at this rate the run needs 4:10:00 more") < text.index("step 3/6")
    assert "img/s | eta 4:10:00" in text[early:early + 80]


def test_a_resumed_run_reports_the_rate_and_time_of_all_its_sessions(make_cfg, tmp_path):
    """summary.json of a run resumed after it stopped, or after it had finished, keeps the training
    images/s and wall time of the whole run, not only of the last session."""
    train(make_cfg("kd=none", "trainer.max_steps=2"))
    ckpt = ck.load(tmp_path / "run/checkpoints/last.pt", "x")
    assert ckpt["state"]["step"] == 2 and ckpt["timing"]["wall_seconds"] > 0
    batch = ckpt["timing"]["train_samples"] // 2
    summary, _ = train(make_cfg("kd=none", "trainer.resume=auto"))
    timing = ck.load(tmp_path / "run/checkpoints/last.pt", "x")["timing"]
    assert summary["steps"] == 4 and timing["train_samples"] == 4 * batch == 4 * summary["global_batch"]
    assert summary["train_samples_per_s"] == pytest.approx(timing["train_samples"] / timing["train_seconds"])
    assert summary["wall_time_s"] >= timing["wall_seconds"] > ckpt["timing"]["wall_seconds"]
    again, _ = train(make_cfg("kd=none", "trainer.resume=auto"))  # already finished
    assert again["train_samples_per_s"] == pytest.approx(summary["train_samples_per_s"])
    assert again["wall_time_s"] >= summary["wall_time_s"]
