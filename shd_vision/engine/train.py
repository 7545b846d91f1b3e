"""``train(cfg)``: one distillation run, from a composed config to a summary.

Reading order: :func:`train` sets up the process and the run directory; :class:`Run` builds
the models, data, optimiser and schedule (``__init__``), restores a checkpoint
(``restore``), and trains (``fit``: epochs of ``train_epoch`` steps, each epoch ending in
``validate_and_save``), then writes the summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from shd_vision.cache import CachedTeacher, logits_only, open_cache
from shd_vision.config import check_config
from shd_vision.data.loaders import (bad_images, build_data, content_ids, open_splits, random_labels,
                                     resolve_input)
from shd_vision.distill import Batch, Distiller
from shd_vision.distill.base import active_terms, uses_teacher
from shd_vision.engine import identity, runtime
from shd_vision.engine.guards import LossWatch, Stop, StopSignals
from shd_vision.engine.checkpoint import (FORMAT_VERSION, Checkpoints, export_student, init_student,
                                          rng_state, set_rng_state)
from shd_vision.engine.logbook import (Logbook, Throughput, WandbSink, format_duration, format_rate,
                                      format_summary, read_jsonl, run_logging)
from shd_vision.engine.metrics import evaluate
from shd_vision.errors import COMMAND, UnreadableImage, UserError, unreadable_message
from shd_vision.models.factory import create_student, create_teacher, describe
from shd_vision.models.teacher import Teacher, check_teacher_top1
from shd_vision.models.weights import FORMAT_KEY
from shd_vision.viz.attention import render
from shd_vision.viz.plots import confusion_png, curves_png

log = logging.getLogger("shd_vision.train")


@dataclass
class TrainState:
    step: int = 0  # optimiser steps taken
    epoch: int = 0  # the epoch in progress (0-based)
    epoch_batches: int = 0  # batches of that epoch already trained on
    best_top1: float = -1.0
    best_epoch: int = -1


def train(cfg: DictConfig) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Train the student ``cfg`` describes.

    Returns:
        The summary (also in ``summary.json``) and the run's objects (``student``, ``distiller``,
        ``teacher``, ``optimizer``, ``data``), as they are after the last step.
    """
    check_config(cfg)
    rt = runtime.setup(cfg.trainer)
    try:
        with identity.claim_run_dir(cfg, rt) as run_dir, run_logging(run_dir, rt.is_main, "train.log"):
            run = Run(cfg, rt, run_dir)
            summary = run.fit()
        objects = {"student": run.student, "distiller": run.distiller, "teacher": run.teacher,
                   "optimizer": run.optimizer, "data": run.data}
        return summary, objects
    finally:
        runtime.teardown(rt)


def _sweep_name() -> Optional[str]:
    """The multirun directory's name when Hydra runs a sweep (it groups the sweep's W&B runs)."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def _scaled_lr(optim: DictConfig, global_batch: int) -> float:
    ratio = global_batch / optim.lr_base_size
    return optim.lr_base * (ratio if optim.lr_base_scale == "linear" else math.sqrt(ratio))


class Run:
    """The objects of one training run and the loop over them."""

    def __init__(self, cfg: DictConfig, rt: runtime.Runtime, run_dir: Path):
        self.cfg, self.rt, self.run_dir = cfg, rt, run_dir
        tr = cfg.trainer
        self.t0 = time.perf_counter()
        terms = active_terms(cfg.kd)
        runtime.seed_everything(cfg.seed)  # identical initial weights on every rank

        splits = open_splits(cfg.data)
        self.classes = splits[2]
        self.random_labels = random_labels(splits[1])
        self.student = create_student(cfg.model, len(self.classes))
        self.init_from: Optional[Dict[str, Any]] = None  # trainer.init_from's record, set by restore()
        self.data_config = resolve_input(cfg.data, self.student)
        teacher_model = norm = None
        self.teacher_source: Optional[str] = None
        cached = False
        if uses_teacher(terms):
            if cfg.teacher is None:
                raise UserError(f"kd={cfg.kd.name} distils from a teacher (terms: {', '.join(terms)}) "
                                "but teacher is null; pick one, e.g. teacher=deit_small, or use kd=none.")
            cached = bool(cfg.teacher.get("cache"))
            if cached:  # opened once the run's facts are known
                logits_only(terms, f"teacher.cache={cfg.teacher.cache}")
            else:
                teacher_model, norm, self.teacher_source = create_teacher(cfg.teacher, len(self.classes),
                                                                          tr.allow_random_teacher)
        self.distiller = Distiller(self.student, terms, teacher_model)
        needs = self.distiller.needs
        self.teacher = None if teacher_model is None else Teacher(
            teacher_model, norm, self.data_config, needs.teacher_capture, needs.teacher_token_grad)

        self.bad_record = run_dir / "bad_images.txt"  # what data.skip_bad_images=true skipped
        self.data = build_data(cfg.data, splits, self.data_config, cfg.seed, rt.rank, rt.world, self.bad_record)
        self.distiller.to(rt.device)
        if self.teacher is not None:
            self.teacher.to(rt.device)
        if tr.channels_last:
            self.student.to(memory_format=torch.channels_last)
        if tr.compile:
            self.student.compile()
            if self.teacher is not None:
                self.teacher.model.compile()

        self.global_batch = cfg.data.batch_size * rt.world * tr.accumulate
        self.lr = cfg.optim.lr or _scaled_lr(cfg.optim, self.global_batch)
        self.optimizer = self._optimizer()
        self.updates_per_epoch = len(self.data.train) // tr.accumulate
        if self.updates_per_epoch == 0:
            raise UserError(f"trainer.accumulate={tr.accumulate} is more than the {len(self.data.train)} "
                            "batches of an epoch; lower it or use more data.")
        s = cfg.sched
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=s.sched, num_epochs=tr.epochs, updates_per_epoch=self.updates_per_epoch,
            warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr, min_lr=s.min_lr,
            decay_epochs=s.decay_epochs, decay_milestones=list(s.decay_milestones), decay_rate=s.decay_rate,
            step_on_epochs=False)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=tr.precision == "fp16")
        self.ema = ModelEmaV3(self.student, decay=tr.ema.decay, use_warmup=tr.ema.warmup) if tr.ema.enabled else None
        self.total_steps = tr.epochs * self.updates_per_epoch
        if tr.max_steps:
            self.total_steps = min(self.total_steps, tr.max_steps)
        self.facts = identity.run_facts(self.global_batch, rt.world, self.data.train_images, self.classes,
                                        content_ids(cfg.data, splits), self.data.stream_workers)
        if cached:
            self.teacher = open_cache(cfg, self.data_config, self.facts,
                                      math.ceil(self.total_steps / self.updates_per_epoch), rt.rank, rt.device)
            self.teacher_source = self.teacher.description
        if rt.distributed:
            self._freeze_unreached()
        self.model = (DistributedDataParallel(self.distiller, device_ids=[rt.device.index]
                                              if rt.device.type == "cuda" else None)
                      if rt.distributed else self.distiller)
        self.throughput = Throughput(self.total_steps)  # restore() adds the earlier sessions of a resumed run
        self.checkpoints = Checkpoints(run_dir)
        self.loss_watch = LossWatch(rt.device)
        self._told_eta = False
        self.state = TrainState()
        self.last_val: Dict[str, Any] = {}
        self.teacher_top1: Optional[float] = None
        sinks = []
        if cfg.logger.wandb is not None and rt.is_main:
            sinks.append(WandbSink(cfg.logger.wandb, run_dir, OmegaConf.to_container(cfg, resolve=True),
                                   _sweep_name()))
        self.logbook = Logbook(run_dir, rt.is_main, cfg.logger.csv, sinks)

    @property
    def cached(self) -> bool:
        """Whether the teacher's logits come from a cache (``teacher.cache``)."""
        return isinstance(self.teacher, CachedTeacher)

    def _freeze_unreached(self) -> None:
        """Freeze what no active term trains, so DDP (which waits for every parameter's gradient)
        runs any combination of term weights without unused-parameter detection on every step.
        One process leaves their gradients empty and the optimiser skips them: the same run."""
        names = self.distiller.unreached_parameters(self.teacher, self.data_config["input_size"],
                                                    len(self.classes), self.rt.device)
        params = dict(self.distiller.named_parameters())
        for name in names:
            params[name].requires_grad_(False)
        if names:
            log.info("%d parameter tensor(s) that no active term trains are frozen: %s", len(names),
                     ", ".join(names[:6]) + (" ..." if len(names) > 6 else ""))

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        extra = {k: (tuple(v) if k == "betas" else v) for k, v in (("betas", o.betas), ("eps", o.eps))
                 if v is not None}
        try:
            optimizer = create_optimizer_v2(self.student, opt=o.opt, lr=self.lr, weight_decay=o.weight_decay,
                                            momentum=o.momentum, layer_decay=o.layer_decay, **extra)
        except (ValueError, AssertionError, KeyError, TypeError) as e:
            raise UserError(f"optim.opt={o.opt} could not be built by timm ({e}); common choices: adamw, "
                            "sgd, lamb, lion, adopt (timm.optim.list_optimizers() lists all).") from None
        own = [p for p in self.distiller.methods.parameters() if p.requires_grad]
        if own:  # e.g. FitNet's projectors train with the student
            optimizer.add_param_group({"params": own, "weight_decay": o.weight_decay})
        return optimizer

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        rngs = [None] * self.rt.world
        if self.rt.distributed:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        ckpt = {
            FORMAT_KEY: FORMAT_VERSION,
            "model": self.student.state_dict(),
            "methods": self.distiller.methods.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": asdict(self.state),
            "rng": rngs,
            "config": OmegaConf.to_yaml(self.cfg, resolve=True),
            "facts": self.facts,
            "init_from": self.init_from,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
            "classes": list(self.classes),
            "metrics": {k: v for k, v in self.last_val.items() if k != "confusion"},
            # over every session, so that a resumed run reports its whole rate and time
            "timing": {**self.throughput.totals, "wall_seconds": time.perf_counter() - self.t0},
        }
        if self.ema is not None:
            ckpt["model_ema"] = self.ema.module.state_dict()
        return ckpt

    def save(self, is_best: bool) -> None:
        self._check_loss()
        ckpt = self.state_dict()  # every rank joins the RNG gather
        if self.rt.is_main:
            self.checkpoints.save(ckpt, is_best)
        runtime.barrier(self.rt)

    def restore(self) -> None:
        """Continue from ``trainer.resume`` (``auto``: this run's newest readable checkpoint), or
        start from ``trainer.init_from``'s student weights (a resumed run has its own)."""
        found = identity.checkpoint_to_resume(self.cfg, self.checkpoints, self.rt, self.facts)
        if found is None:
            if self.cfg.trainer.init_from:
                self.init_from = init_student(self.student, self.cfg.trainer.init_from, self.cfg.model.name)
                if self.ema is not None:  # the EMA starts from those weights too
                    self.ema.module.load_state_dict(self.student.state_dict())
            return
        path, ckpt = found
        self.student.load_state_dict(ckpt["model"])
        self.distiller.methods.load_state_dict(ckpt["methods"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and "model_ema" in ckpt:
            self.ema.module.load_state_dict(ckpt["model_ema"])
        self.state = TrainState(**ckpt["state"])
        self.init_from = ckpt.get("init_from")
        self.last_val = dict(ckpt.get("metrics", {}))
        timing = ckpt.get("timing", {"train_samples": 0, "train_seconds": 0.0, "wall_seconds": 0.0})
        self.throughput = Throughput(self.total_steps, timing)
        self.t0 -= timing["wall_seconds"]
        set_rng_state(ckpt["rng"][self.rt.rank])  # check_resume made sure the process count is the same
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step,
                 self.state.epoch + 1, self.state.epoch_batches)

    # ---------------------------------------------------------------- training
    def fit(self) -> Dict[str, Any]:
        runtime.seed_everything(self.cfg.seed + self.rt.rank)  # per-rank streams for dropout, mixup
        self.restore()
        if self.state.step >= self.total_steps or self.state.epoch >= self.cfg.trainer.epochs:
            summary = identity.finished_summary(self.run_dir, self.state.step, self.total_steps)
        else:  # nothing resumed: a finished run may still stand as its record alone
            summary = None if self.state.step else identity.finished_record(
                self.cfg, self.run_dir, identity.fingerprint(self.cfg, self.facts), self.total_steps)
        if summary is not None:  # resume=auto on a finished run (a sweep continued): nothing to do
            return summary
        self._write_config()
        self._log_start()
        try:
            return self._fit()
        except UnreadableImage as e:
            raise UserError(self._unreadable(e)) from None

    def _unreadable(self, e: UnreadableImage) -> str:
        """A bad file, named, with the way on; nothing was saved after the last good step."""
        last = self.checkpoints.last
        kept = (f"the last checkpoint, {last}, is kept" if last.exists() else "no checkpoint had been written yet")
        return (f"{unreadable_message(e)}, so training stopped at step {self.state.step} of {self.total_steps}; "
                f"{kept}. Replace or delete the file (python -m shd_vision.data.check with this run's data "
                "settings lists every unreadable one) and continue with the command below, or add "
                "data.skip_bad_images=true to it to stand the next readable image in for each bad one (each is "
                f"logged once and counted in summary.json).{COMMAND}{identity.continue_command(self.cfg.run_name)}")

    def _fit(self) -> Dict[str, Any]:
        tr = self.cfg.trainer
        if self.teacher is not None and tr.eval_teacher:
            if self.cached:
                self.teacher_top1 = self.teacher.val_top1
            else:
                log.info("measuring the teacher's top-1 on the validation images first (trainer.eval_teacher=false "
                         "skips it)")
                self.teacher_top1 = self._validate(self.teacher.predict, "the teacher")["top1"]
            if self.teacher_top1 is None:
                log.info("teacher top-1 on the validation set: not known (its cache was measured on other images)")
            else:
                log.info("teacher top-1 on the validation set: %.2f%%", self.teacher_top1)
            if not (self.teacher_top1 is None or self.random_labels or self.teacher_source.startswith("random")):
                check_teacher_top1(self.teacher_top1, len(self.classes), tr.teacher_floor)
        throughput = self.throughput
        with StopSignals() as signals:
            try:
                while self.state.step < self.total_steps and self.state.epoch < tr.epochs:
                    throughput.start()
                    self.train_epoch(throughput, signals)
                    throughput.stop()
                    self.validate_and_save()
            except Stop as stop:
                return self.stopped(str(stop), throughput)
        if "confusion" not in self.last_val:  # resumed a run that had already finished
            self.validate_and_save()
        return self.finish(throughput)

    def stopped(self, reason: str, throughput: Throughput) -> Dict[str, Any]:
        """Save the state after the last finished step and report how to continue."""
        throughput.stop()
        self.save(is_best=False)
        summary = {"status": "stopped", "reason": reason, "steps": self.state.step, "total_steps": self.total_steps,
                   "checkpoint": str(self.checkpoints.last), "run_dir": str(self.run_dir),
                   "top1": self.last_val.get("top1"), "train_samples_per_s": throughput.mean_rate}
        if self.rt.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            log.warning("stopped by %s after step %d of %d; the state is saved in %s.%s", reason, self.state.step,
                        self.total_steps, self.checkpoints.last, "" if _sweep_name() else
                        f" Continue it (under the same launcher, if any) with:\n{identity.continue_command(self.cfg.run_name)}")
        return summary

    def train_epoch(self, throughput: Throughput, signals: StopSignals) -> None:
        """Train until the epoch ends or the step budget is spent."""
        tr, st = self.cfg.trainer, self.state
        self.distiller.train()
        batches_per_epoch = self.updates_per_epoch * tr.accumulate
        sums: Dict[str, torch.Tensor] = {}
        count = 0
        for images, labels in self.data.epoch(st.epoch, st.epoch_batches):
            images = images.to(self.rt.device, non_blocking=True)
            labels = labels.to(self.rt.device, non_blocking=True)
            if tr.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            images, targets = self.data.finish(images, labels, st.epoch, st.epoch_batches)
            batch = Batch(images, targets, targets.argmax(-1) if targets.ndim == 2 else targets)
            with runtime.autocast(self.rt, tr.precision):
                teacher_out = (self.teacher.outputs(images, st.epoch, st.epoch_batches)
                               if self.teacher is not None else None)
            st.epoch_batches += 1
            update = st.epoch_batches % tr.accumulate == 0
            sync = contextlib.nullcontext() if update or not self.rt.distributed else self.model.no_sync()
            with sync:
                with runtime.autocast(self.rt, tr.precision):
                    terms, extra, _ = self.model(batch, teacher_out)
                    loss = sum(terms.values())
                self.loss_watch.record(st.step + 1, loss, terms)
                self.scaler.scale(loss / tr.accumulate).backward()
            for k, v in {"loss": loss, **{f"loss/{n}": t for n, t in terms.items()}, **extra}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            count += 1
            if not update:
                continue
            if tr.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.distiller.parameters(), tr.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            st.step += 1
            self.scheduler.step_update(num_updates=st.step)
            if self.ema is not None:
                self.ema.update(self.student, step=st.step)
            throughput.step(self.global_batch)
            log_now = st.step % tr.log_every == 0 or st.step == self.total_steps
            if log_now:
                self._check_loss()
                self._log_train(self._mean_over_ranks(sums, count), throughput.read(st.step))
                sums, count = {}, 0
            elif not self._told_eta:
                self._early_estimate(throughput)
            if tr.ckpt_every_steps and st.step % tr.ckpt_every_steps == 0:
                throughput.stop()
                self.save(is_best=False)
                throughput.start()
            if log_now or not self.rt.distributed:  # ranks agree on a stop at log lines only
                signals.check(self.rt)
            if st.step >= self.total_steps or st.epoch_batches >= batches_per_epoch:
                break
        self._check_loss()
        if st.epoch_batches >= batches_per_epoch:
            st.epoch, st.epoch_batches = st.epoch + 1, 0

    def _mean_over_ranks(self, sums: Dict[str, torch.Tensor], count: int) -> Dict[str, float]:
        """The logged values averaged over the steps since the last log line and over the ranks."""
        values = torch.stack([sums[k] for k in sorted(sums)]) / (count * self.rt.world)
        runtime.all_reduce_sum(values, self.rt)
        return dict(zip(sorted(sums), values.tolist()))

    def _check_loss(self) -> None:
        """Stop with the first non-finite loss since the run started; before every log line and
        checkpoint, so a bad state is never saved over the last good one."""
        bad = self.loss_watch.first_bad(self.rt)
        if bad is None:
            return
        step, loss, terms = bad
        last = self.checkpoints.last
        kept = (f"the last good checkpoint, {last}, is kept" if last.exists()
                else "no checkpoint had been written yet")
        named = ", ".join(f"{n}={v:.4g}" for n, v in terms.items())
        raise UserError(f"the loss became {loss} at step {step} (terms: {named}), so training stopped; "
                        f"{kept}. Lower optim.lr, set trainer.grad_clip, or use trainer.precision=32 or bf16.")

    def validate_and_save(self) -> None:
        tr = self.cfg.trainer
        epoch = self.state.epoch + self.state.epoch_batches / (self.updates_per_epoch * tr.accumulate)
        self.student.eval()
        val = self._validate(self.student, "the student")
        record = {k: v for k, v in val.items() if k in ("top1", "top5", "loss", "samples")}
        if self.ema is not None:
            ema_val = self._validate(self.ema.module, "the student's EMA")
            record.update({f"ema_{k}": ema_val[k] for k in ("top1", "top5", "loss")})
        self.student.train()
        is_best = val["top1"] > self.state.best_top1
        if is_best:
            self.state.best_top1, self.state.best_epoch = val["top1"], math.ceil(epoch)
        self.last_val = {**val, **record}
        self.logbook.write("val", self.state.step, epoch, record)
        log.info("validation after epoch %.2f: top-1 %.2f%%  top-5 %.2f%%  loss %.4f%s%s", epoch,
                 val["top1"], val["top5"], val["loss"],
                 f"  (EMA top-1 {record['ema_top1']:.2f}%)" if "ema_top1" in record else "",
                 "  new best" if is_best else "")
        self.save(is_best)

    def _validate(self, predict, name: str) -> Dict[str, Any]:
        """:func:`evaluate` on this run's validation images (``name``: whose logits, for errors)."""
        tr = self.cfg.trainer
        return evaluate(predict, self.data.val, len(self.classes), self.rt, tr.precision, tr.channels_last, name)

    def _attention_pictures(self) -> List[Path]:
        """``python -m shd_vision.viz``'s pictures of this run's last checkpoint."""
        viz = OmegaConf.create({"ckpt": str(self.checkpoints.last), "teacher_checkpoint": None,
                                "images": self.cfg.trainer.attention_images, "batch": 64, "layers": None,
                                "merge": None, "temperature": None})
        out_dir = self.run_dir / "attention"
        out_dir.mkdir(exist_ok=True)
        return render(viz, out_dir, self.rt.device)

    # ---------------------------------------------------------------- reporting
    def _write_config(self) -> None:
        """The checked, resolved config as ``config.yaml`` (a resumed run adds its own copy)."""
        if not self.rt.is_main:
            return
        fresh = self.state.step == 0 or not (self.run_dir / "config.yaml").exists()  # resume=PATH elsewhere
        name = "config.yaml" if fresh else f"config.resumed-at-step-{self.state.step}.yaml"
        (self.run_dir / name).write_text(OmegaConf.to_yaml(self.cfg, resolve=True))

    def _log_start(self) -> None:
        cfg, rt = self.cfg, self.rt
        terms = " + ".join(f"{w:g}·{n}" for n, w in self.distiller.weights.items())
        log.info("run directory: %s", self.run_dir)
        log.info("student %s", describe(self.student))
        log.info("teacher %s", "none" if self.teacher is None else self.teacher_source if self.cached else
                 f"{self.teacher.description}, weights: {self.teacher_source}")
        log.info("kd=%s: %s", cfg.kd.name, terms)
        log.info("data %s: %d train / %d val images, %d classes, input %s | %d process(es) on %s",
                 cfg.data.name, self.data.train_images, self.data.val_images, len(self.classes),
                 "x".join(map(str, self.data_config["input_size"])), rt.world, rt.device)
        log.info("global batch %d (%d per process x %d processes x %d accumulation) | lr %.3g%s | "
                 "%d steps (%d per epoch, %d epochs%s)", self.global_batch, cfg.data.batch_size, rt.world,
                 cfg.trainer.accumulate, self.lr,
                 "" if cfg.optim.lr else f" (= {cfg.optim.lr_base:g} x {self.global_batch}/{cfg.optim.lr_base_size},"
                                         f" {cfg.optim.lr_base_scale} scaling)",
                 self.total_steps, self.updates_per_epoch, cfg.trainer.epochs,
                 f", capped by trainer.max_steps={cfg.trainer.max_steps}" if cfg.trainer.max_steps else "")

    def _early_estimate(self, throughput: Throughput) -> None:
        """A slow run's rate and time left after its first 20 s, before its first log line."""
        speed = throughput.so_far(self.state.step)
        if speed["seconds"] >= 20:
            log.info("first %d steps: %s img/s | eta %s", speed["steps"], format_rate(speed["samples_per_s"]),
                     format_duration(speed["eta_s"]))
            self._tell_eta(speed["eta_s"])

    def _tell_eta(self, eta_s: float) -> None:
        """Say once, early, when the run will take hours, and what shortens it."""
        self._told_eta = True
        if eta_s >= 3600:
            log.warning("at this rate the run needs %s more on %s. trainer.max_steps=N stops after N steps "
                        "(lower trainer.epochs too for a complete short schedule), data.train_size=N trains "
                        "on a subset, and a GPU (trainer=gpu) is far faster.", format_duration(eta_s),
                        self.rt.device)

    def _log_train(self, means: Dict[str, float], speed: Dict[str, float]) -> None:
        st, tr = self.state, self.cfg.trainer
        lr = self.optimizer.param_groups[0]["lr"]
        epoch = st.epoch + st.epoch_batches / (self.updates_per_epoch * tr.accumulate)
        terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in means.items() if k.startswith("loss/"))
        log.info("epoch %d/%d step %d/%d | loss %.4f (%s) | lr %.3g | %s img/s | eta %s",
                 st.epoch + 1, tr.epochs, st.step, self.total_steps, means["loss"], terms, lr,
                 format_rate(speed["samples_per_s"]), format_duration(speed["eta_s"]))
        if not self._told_eta:
            self._tell_eta(speed["eta_s"])
        self.logbook.write("train", st.step, epoch, {**means, "lr": lr, "samples_per_s": speed["samples_per_s"]})

    def finish(self, throughput: Throughput) -> Dict[str, Any]:
        cfg, rt = self.cfg, self.rt
        pictures: List[Path] = []
        export = None
        if rt.is_main:
            records = read_jsonl(self.logbook.path) if self.logbook.path.exists() else []
            title = f"kd={cfg.kd.name} ({self.run_dir.name})"
            pictures.append(curves_png({cfg.kd.name: records}, self.run_dir / "curves.png", title))
            pictures.append(confusion_png(self.last_val["confusion"], self.classes,
                                          self.run_dir / "confusion.png", f"{title}: validation"))
            if "shd" in self.distiller.weights and cfg.trainer.attention_images:
                pictures += self._attention_pictures()
            self.logbook.images(self.state.step, {p.stem: p for p in pictures})
            if cfg.trainer.export:
                export = str(export_student(self.student, self.run_dir / "export", self.data_config))
        summary = {
            "status": "finished",
            "facts": self.facts,
            "method": cfg.kd.name,
            "terms": dict(self.distiller.weights),
            "model": cfg.model.name,
            "student": describe(self.student),
            "teacher": self.teacher.description if self.teacher is not None else None,
            "teacher_cache": ({k: self.teacher.header[k] for k in ("top_k", "dtype")} | {"dir": str(self.teacher.dir)}
                              if self.cached else None),
            "top1": self.last_val["top1"],
            "top5": self.last_val["top5"],
            "val_loss": self.last_val["loss"],
            "best_top1": self.state.best_top1,
            "best_epoch": self.state.best_epoch,
            "top1_ema": self.last_val.get("ema_top1"),
            "teacher_top1": self.teacher_top1,
            "train_samples_per_s": throughput.mean_rate,
            "wall_time_s": time.perf_counter() - self.t0,
            "steps": self.state.step,
            "global_batch": self.global_batch,
            "lr": self.lr,
            "init_from": self.init_from,
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.checkpoints.last),
            "best_checkpoint": str(self.checkpoints.best) if self.checkpoints.best.exists() else None,
            "export": export,
            "pictures": [str(p) for p in pictures],
            "bad_images": bad_images(self.bad_record),
        }
        if rt.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            self.logbook.close(summary)
            log.info("%s", format_summary(summary))
        return summary
