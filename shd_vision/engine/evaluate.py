"""``evaluate_checkpoint(cfg)``: accuracy, per-class accuracy, confusion matrix and throughput of
a checkpoint of ours, a timm weights file, or an exported student folder."""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from shd_vision.config import check_config
from shd_vision.data.loaders import build_val_loader, open_split, resolve_input
from shd_vision.engine import runtime
from shd_vision.engine.logbook import run_logging
from shd_vision.engine.metrics import evaluate, per_class_accuracy
from shd_vision.errors import UserError
from shd_vision.models.factory import build, count_params, describe, load_weights
from shd_vision.models.weights import FORMAT_KEY, read_file
from shd_vision.viz.plots import confusion_png

log = logging.getLogger("shd_vision.eval")


def _sources(cfg: DictConfig) -> Tuple[Optional[DictConfig], DictConfig]:
    """The model config (None for an exported folder) and the data config to evaluate with:
    those stored in one of our checkpoints unless given on the command line."""
    path = Path(cfg.ckpt)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"ckpt={path} is a folder without the config.json of an exported student; "
                            "pass a checkpoint file or a run's export/ folder.")
        if cfg.data is None:
            raise UserError(f"ckpt={path} is an exported student, which does not record its data set; "
                            "name it with data=<config> (and data.root=DIR where needed).")
        return None, cfg.data
    obj = read_file(path, "ckpt")
    if FORMAT_KEY in obj:
        trained = OmegaConf.create(obj["config"])
        return (cfg.model if cfg.model is not None else trained.model,
                cfg.data if cfg.data is not None else trained.data)
    if cfg.model is None or cfg.data is None:
        raise UserError(f"ckpt={path} is a plain weights file, which records neither its model nor its "
                        "data; name both, e.g. model=deit_tiny data=imagenet data.root=DIR.")
    return cfg.model, cfg.data


@torch.no_grad()
def model_throughput(model: nn.Module, input_size: Tuple[int, int, int], batch: int, rt: runtime.Runtime,
                     precision: str, iters: int = 10) -> float:
    """Images per second of the model alone on a fixed random batch (after warm-up)."""
    x = torch.randn(batch, *input_size, device=rt.device)
    for _ in range(3):
        with runtime.autocast(rt, precision):
            model(x)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        with runtime.autocast(rt, precision):
            model(x)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    return iters * batch / (time.perf_counter() - t)


def evaluate_checkpoint(cfg: DictConfig) -> Dict[str, Any]:
    """Evaluate ``cfg.ckpt``; returns the report also written to ``eval.json``."""
    check_config(cfg)
    rt = runtime.setup(cfg.trainer)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with run_logging(out_dir, rt.is_main, "eval.log"):
            return _evaluate(cfg, rt, out_dir)
    finally:
        runtime.teardown(rt)


def _evaluate(cfg: DictConfig, rt: runtime.Runtime, out_dir: Path) -> Dict[str, Any]:
    spec, data = _sources(cfg)
    val_set = open_split(data, data.val_split)
    classes = list(val_set.classes)
    path = Path(cfg.ckpt)
    if spec is None:
        model = timm.create_model(f"local-dir:{path}", pretrained=True)
        if model.num_classes != len(classes):
            raise UserError(f"ckpt={path} predicts {model.num_classes} classes but data={data.name} has "
                            f"{len(classes)}; evaluate it on the data it was trained on.")
    else:
        model = build(spec, len(classes), "model")
        trained = load_weights(model, path, "ckpt", use_ema=cfg.use_ema).get("classes")
        if trained is not None and list(trained) != classes:  # the count matched: names or order differ
            wrong = [f"{i}: {a} in the checkpoint, {b} here" for i, (a, b) in enumerate(zip(trained, classes)) if a != b]
            raise UserError(f"ckpt={path} was trained on classes the data names differently or in another order "
                            f"({'; '.join(wrong[:3])}{f' and {len(wrong) - 3} more' if len(wrong) > 3 else ''}), so "
                            "each output would be scored against another class. Evaluate it on its own data, or give "
                            "data.class_map=FILE listing the checkpoint's classes in its order.")
    data_config = resolve_input(data, model)
    loader = build_val_loader(data, val_set, data_config, rt.rank, rt.world)
    model.to(rt.device).eval()
    precision = cfg.trainer.precision
    t = time.perf_counter()
    metrics = evaluate(model, loader, len(classes), rt, precision, cfg.trainer.channels_last, f"ckpt={path}")
    end_to_end = metrics["samples"] / (time.perf_counter() - t)
    model_rate = model_throughput(model, data_config["input_size"], loader.batch_size, rt, precision)
    per_class = per_class_accuracy(metrics["confusion"]).tolist()
    report = {
        "ckpt": str(path), "model": model.pretrained_cfg.get("architecture"), "params": count_params(model),
        "data": data.name, "split": data.val_split, "samples": metrics["samples"],  # samples: what was read
        "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
        "per_class_top1": {c: None if math.isnan(a) else a for c, a in zip(classes, per_class)},  # null: no images
        "images_per_s_model": model_rate, "images_per_s_end_to_end": end_to_end,
        "batch_size": loader.batch_size, "precision": precision, "device": str(rt.device),
        "out_dir": str(out_dir),
    }
    if rt.is_main:
        (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        with (out_dir / "per_class.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "top1", "images"])
            for name, acc, n in zip(classes, per_class, metrics["confusion"].sum(1).tolist()):
                writer.writerow([name, "" if math.isnan(acc) else f"{acc:.2f}", n])
        confusion_png(metrics["confusion"], classes, out_dir / "confusion.png", f"{path.name} on {data.name}")
        worst = sorted((a, c) for a, c in zip(per_class, classes) if not math.isnan(a))[:3]
        log.info("evaluation of %s\n  model       %s\n  data        %s/%s, %d images\n"
                 "  top-1       %.2f%%   top-5 %.2f%%   loss %.4f\n"
                 "  worst       %s\n"
                 "  throughput  %.0f images/s model alone (batch %d, precision %s, %s); %.0f images/s end to end\n"
                 "  files       %s: eval.json, per_class.csv, confusion.png",
                 path, describe(model), data.name, data.val_split + (
                     f" (the fixed subset data.val_size={data.val_size})" if data.get("val_size") and not
                     str(data.name).startswith("wds/") else ""), metrics["samples"],
                 metrics["top1"], metrics["top5"], metrics["loss"],
                 ", ".join(f"{c} {a:.1f}%" for a, c in worst),
                 model_rate, loader.batch_size, precision, rt.device, end_to_end, out_dir)
    return report
