"""The teacher cache (methods.md §10): a planned run's teacher logits, written once and replayed.

``python -m shd_vision.cache <train.py overrides> cache.top_k=K`` runs the planned run's own
loaders, samplers and mixup/cutmix (every augmented, mixed batch is a function of the seed, the
epoch, the batch and the process: ``data/loaders.py``) through the teacher, and stores each
row's top-``K`` logits, their classes and the log-partition. ``python train.py <the same
overrides> teacher.cache=DIR`` then trains the methods that read only the teacher's logits
without building or running it; with ``K`` = the class count in float32 the run is the live
run, bit for bit.

A cache directory holds ``cache.json`` (the fingerprint: every value the logits depend on, and
the plan: epochs, processes, batches) and one part per (epoch, process):
``epoch-0003.rank-1.pt`` with ``values`` and ``indices`` ``[batches, B, K]`` and ``lse``
``[batches, B]``, completed by ``epoch-0003.rank-1.json`` (its SHA-256, size and rows), written
after it. A part without its record, or whose bytes differ from it, is incomplete or damaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import hydra
import torch
from omegaconf import DictConfig, open_dict
from torch import Tensor
from torch.utils.data import IterableDataset

from shd_vision import cli
from shd_vision.config import check_config
from shd_vision.data.loaders import (build_data, build_val_loader, content_ids, open_splits, random_labels,
                                     resolve_input)
from shd_vision.distill.base import METHODS
from shd_vision.engine import identity, runtime
from shd_vision.engine.checkpoint import atomic_save
from shd_vision.engine.logbook import format_duration, format_rate, run_logging
from shd_vision.engine.metrics import evaluate
from shd_vision.errors import UserError
from shd_vision.models.factory import create_student, create_teacher, describe
from shd_vision.models.taps import Outputs, Recorded
from shd_vision.models.teacher import Teacher, check_teacher_top1
from shd_vision.models.weights import read_file, state_dict_of

log = logging.getLogger("shd_vision.cache")

FORMAT = 1
HEADER = "cache.json"
# Keys a run's logits depend on: these prefixes of the run's fingerprint (identity.fingerprint),
# less what only validation reads and the teacher's file path (its weights' hash stands in).
DEPENDS = ("seed", "data.", "teacher.", "trainer.accumulate", "trainer.precision", "run.")
VALIDATION = ("data.val_split", "data.val_size")
NOT_LOGITS = ("teacher.cache", "teacher.checkpoint", "run.val_data")
PLAN = ("top_k", "dtype", "batches_per_epoch", "batch_size", "processes")  # how the logits are laid out


# ---------------------------------------------------------------- the math (methods.md §10)
def sparse_logits(logits: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """What the cache stores of a batch of teacher logits.

    Args:
        logits: ``[B, C]``.
        k: classes kept per row, ``1 <= k <= C``.

    Returns:
        ``values [B, k]`` (the largest logits, descending, in the logits' dtype), ``indices
        [B, k]`` (their classes) and ``lse [B]`` (``logsumexp`` over all ``C`` classes, float32).
    """
    values, indices = logits.topk(k, dim=-1)
    return values, indices, torch.logsumexp(logits.float(), dim=-1)


def dense_logits(values: Tensor, indices: Tensor, lse: Tensor, num_classes: int) -> Tensor:
    """The teacher's logits rebuilt from the cache (ours, methods.md §10).

    Kept classes take their stored logits; the ``C - K`` others share the mass the kept ones
    leave, ``1 - sum softmax``, equally: each gets ``log((1 - sum) / (C - K)) + lse``. A mass
    rounded to zero or below counts as the smallest normal float32 probability: the others then
    carry no mass at any temperature, and their logits stay finite (a KL over ``-inf`` is NaN).

    Args:
        values: ``[B, K]`` stored logits.
        indices: ``[B, K]`` their classes (any integer dtype).
        lse: ``[B]`` the log-partition over all classes.
        num_classes: ``C``.

    Returns:
        ``[B, C]`` float32; with ``K = C`` exactly the stored logits, in class order.
    """
    values, lse = values.float(), lse.float()
    k = values.shape[-1]
    out = values.new_empty(values.shape[0], num_classes)
    if k < num_classes:
        kept = torch.exp(values - lse[:, None]).sum(-1)
        rest = (1.0 - kept).clamp_min(torch.finfo(torch.float32).tiny)
        out.copy_((torch.log(rest / (num_classes - k)) + lse)[:, None].expand_as(out))
    return out.scatter_(1, indices.long(), values)


# ---------------------------------------------------------------- what the logits depend on
def teacher_weights_id(spec: Mapping) -> str:
    """The teacher's weights: a SHA-256 of the state dict its checkpoint holds (names, dtypes,
    shapes and bytes), or timm's name for hub weights, which a name pins."""
    checkpoint = spec.get("checkpoint")
    if not checkpoint:
        return f"timm:{spec['name']}"
    state = state_dict_of(read_file(checkpoint, "teacher.checkpoint"), bool(spec.get("use_ema")),
                          f"teacher.checkpoint={checkpoint}")
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def fingerprint(cfg: DictConfig, data_config: Mapping[str, Any], facts: Mapping[str, Any]) -> Dict[str, Any]:
    """Every value a run's teacher logits depend on (methods.md §10), as dotted keys: the data
    (set, split, subset, holdout), augmentation and mixup, seed, per-process batch, processes,
    accumulation, precision and memory format, the student's input pipeline the teacher's input
    bridge starts from, and the teacher (its config and its weights' hash)."""
    run = identity.fingerprint(cfg, facts)
    keys = {k: v for k, v in run.items()
            if k.startswith(DEPENDS) and not k.startswith(VALIDATION + NOT_LOGITS)}
    keys["trainer.channels_last"] = bool(cfg.trainer.channels_last)
    keys.update({f"input.{k}": list(v) if isinstance(v, (tuple, list)) else v for k, v in data_config.items()})
    keys["teacher.weights"] = teacher_weights_id(cfg.teacher)
    return keys


def _validation_keys(cfg: DictConfig, facts: Mapping[str, Any]) -> Dict[str, Any]:
    """What the teacher's validation top-1 recorded in a cache was measured on."""
    return {**{k: cfg.data[k.split(".")[1]] for k in VALIDATION}, "run.val_data": facts["val_data"]}


def plan_id(header: Mapping[str, Any]) -> str:
    """What a part belongs to: a hash of its cache's fingerprint and layout. Every part's record
    carries it, so a part is never taken for another cache's, whatever happened to ``cache.json``."""
    keys = {k: header[k] for k in ("fingerprint", *PLAN)}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _size(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _part_name(epoch: int, rank: int) -> str:
    return f"epoch-{epoch:04d}.rank-{rank}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(obj: Any, path: Path) -> None:
    """Atomically, like checkpoints: a killed writer leaves the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # a cache is shared: every user may read it
    os.replace(tmp, path)


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_part(cache_dir: Path, epoch: int, rank: int, plan: str) -> Optional[str]:
    """None when the part is complete, intact and of the cache ``plan`` names, else what is wrong."""
    name = _part_name(epoch, rank)
    record, part = _read_json(cache_dir / f"{name}.json"), cache_dir / f"{name}.pt"
    if record is None or not part.is_file():
        return f"{part} is missing or was never completed"
    if record.get("plan") != plan:
        return f"{part} belongs to another cache (its record names plan {record.get('plan')}, this cache is {plan})"
    size = part.stat().st_size
    if size != record["bytes"]:
        return f"{part} has {size} bytes, its record {record['bytes']} (truncated or overwritten)"
    if _sha256(part) != record["sha256"]:
        return f"{part} does not match its recorded SHA-256 (corrupted)"
    return None


# ---------------------------------------------------------------- replay
class CachedTeacher:
    """The teacher's logits of one process's training batches, read from a cache.

    Args:
        cache_dir: the cache.
        header: its ``cache.json``.
        rank: this process.
        device: where the logits go.
    """

    def __init__(self, cache_dir: Path, header: Dict[str, Any], rank: int, device: torch.device):
        self.dir, self.header, self.rank, self.device = cache_dir, header, rank, device
        self.plan = plan_id(header)
        self.num_classes = len(header["fingerprint"]["run.classes"])
        self.description = (f"cache {cache_dir} (top-{header['top_k']} {header['dtype']} logits of "
                            f"{header['teacher']})")
        self.val_top1: Optional[float] = None
        self._epoch: Optional[int] = None
        self._part: Dict[str, Tensor] = {}

    def outputs(self, images: Tensor, epoch: int, batch: int) -> Outputs:
        """The logits a live teacher gives the ``batch``-th batch of ``epoch`` (``images`` only
        sets the row count, which must match)."""
        if epoch != self._epoch:
            self._part, self._epoch = self._load(epoch), epoch
        values, indices, lse = (self._part[k][batch].to(self.device) for k in ("values", "indices", "lse"))
        if values.shape[0] != images.shape[0]:
            raise UserError(f"teacher.cache={self.dir}: batch {batch} of epoch {epoch + 1} holds {values.shape[0]} "
                            f"rows, the run's batch {images.shape[0]}; the cache belongs to another plan.")
        logits = dense_logits(values, indices, lse, self.num_classes)
        return Outputs(logits, None, Recorded(), None, None)

    def __call__(self, images: Tensor) -> Outputs:
        """Logits for an arbitrary batch, for the probe of parameters no term reaches
        (``Distiller.unreached_parameters``), which needs only the graph: zeros."""
        return Outputs(images.new_zeros(images.shape[0], self.num_classes), None, Recorded(), None, None)

    def _load(self, epoch: int) -> Dict[str, Tensor]:
        problem = _check_part(self.dir, epoch, self.rank, self.plan)
        part = self.dir / f"{_part_name(epoch, self.rank)}.pt"
        if problem is None:
            try:
                return torch.load(part, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001  (a damaged file fails anywhere in the unpickler)
                problem = f"{part} could not be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        raise UserError(f"teacher.cache={self.dir}: {problem}. Training stopped before using it; the run's "
                        "checkpoints are as they were. Rewrite the part with the cache's command (cache_command in "
                        f"{self.dir / HEADER}) plus cache.resume=auto, which keeps intact parts and rewrites the "
                        "others, then continue the run with trainer.resume=auto.")


def logits_only(terms: Mapping[str, Any], what: str) -> None:
    """Refuse terms that need more of the teacher than its logits (a cache holds nothing else).

    Raises:
        UserError: naming them and the terms a cache serves.
    """
    more = [n for n in terms if METHODS[n].uses_teacher and not METHODS[n].teacher_logits_only]
    if more:
        serves = sorted(n for n, m in METHODS.items() if m.teacher_logits_only)
        raise UserError(f"{what}: the term(s) {', '.join(more)} read the teacher's attention, features or "
                        f"gradients, which a teacher cache does not hold (it holds logits: it serves "
                        f"{', '.join(serves)} and ce). Run them with the live teacher (remove teacher.cache), "
                        "or set their weights to 0.")


def open_cache(cfg: DictConfig, data_config: Mapping[str, Any], facts: Mapping[str, Any],
               epochs: int, rank: int, device: torch.device) -> CachedTeacher:
    """``teacher.cache=DIR``: the cached teacher of this run after checking that the cache was
    written for it and holds every epoch it trains. Its ``val_top1`` is the teacher's top-1
    measured when the cache was written, None when this run validates on other images.

    Raises:
        UserError: one paragraph naming each differing key with both values, a missing epoch,
            or a missing or unreadable cache.
    """
    cache_dir = Path(cfg.teacher.cache).absolute()
    header = _read_json(cache_dir / HEADER)
    if header is None or header.get("format") != FORMAT:
        raise UserError(f"teacher.cache={cache_dir} is not a teacher cache (no readable {HEADER}); write one "
                        "with: python -m shd_vision.cache <this run's overrides> cache.dir=DIR, or remove "
                        "teacher.cache to run the teacher live.")
    diff = identity.differences(header["fingerprint"], identity.known_to(header["fingerprint"],
                                                                         fingerprint(cfg, data_config, facts)), "the cache")
    if diff:
        raise UserError(f"teacher.cache={cache_dir} holds the logits of a run defined differently from this one, "
                        f"in {len(diff)} key(s): {'; '.join(diff)}. Its logits would not be this run's teacher's. "
                        "Run with the cache's values (its cache.json lists them), write a cache for this run "
                        "(python -m shd_vision.cache with this run's overrides), or remove teacher.cache.")
    missing = [e + 1 for e in range(epochs) if not (cache_dir / f"{_part_name(e, rank)}.json").is_file()]
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise UserError(f"teacher.cache={cache_dir}: this run trains epochs 1 to {epochs}, and the cache has no "
                        f"epoch {shown} (process {rank}; it was planned for {header['epochs']} and may be unfinished). "
                        f"Complete or extend it with the cache's command (cache_command in {cache_dir / HEADER}) plus "
                        f"trainer.epochs={epochs} cache.resume=auto, or train fewer epochs.")
    teacher = CachedTeacher(cache_dir, header, rank, device)
    val = header.get("validation", {})
    teacher.val_top1 = val.get("top1") if val.get("keys") == _validation_keys(cfg, facts) else None
    return teacher


# ---------------------------------------------------------------- writing
def write_cache(cfg: DictConfig) -> Dict[str, Any]:
    """Write the teacher cache of the run ``cfg`` plans (see the module docstring).

    Returns:
        The summary (also ``summary.json`` in the cache directory).
    """
    check_config(cfg)
    with open_dict(cfg):  # the cache directory is this task's run directory, whatever hydra.run.dir says
        cfg.paths.output_dir = cfg.cache.dir
    rt = runtime.setup(cfg.trainer)
    try:
        with identity.claim_run_dir(cfg, rt) as cache_dir, run_logging(cache_dir, rt.is_main, "cache.log"):
            return _Writer(cfg, rt, cache_dir).run()
    finally:
        runtime.teardown(rt)


class _Writer:
    """The planned run's data for each process this launch writes, the teacher, and the parts."""

    def __init__(self, cfg: DictConfig, rt: runtime.Runtime, cache_dir: Path):
        self.cfg, self.rt, self.dir, self.opts = cfg, rt, cache_dir, cfg.cache
        splits = open_splits(cfg.data)
        if isinstance(splits[0], IterableDataset):
            raise UserError(f"data.name={cfg.data.name} is read as a stream (WebDataset shards), whose batches "
                            "depend on shard order and worker timing in ways a cache cannot replay exactly; "
                            "train it with the live teacher.")
        self.classes, self.val = splits[2], splits[1]
        self.processes = self.opts.processes or rt.world
        if self.processes % rt.world:
            raise UserError(f"cache.processes={self.processes} is not a multiple of this launch's {rt.world} "
                            "processes, which share the planned processes' parts equally.")
        if self.opts.top_k > len(self.classes):
            raise UserError(f"cache.top_k={self.opts.top_k} is more than the {len(self.classes)} classes of "
                            f"data.name={cfg.data.name}; use 1 to {len(self.classes)} ({len(self.classes)} "
                            "with cache.dtype=float32 replays the live teacher exactly).")
        runtime.seed_everything(cfg.seed)  # as train.py, should a model's construction draw
        self.data_config = resolve_input(cfg.data, create_student(cfg.model, len(self.classes)))
        model, norm, self.source = create_teacher(cfg.teacher, len(self.classes), allow_random=False)
        self.teacher = Teacher(model, norm, self.data_config).to(rt.device)
        self.ranks = list(range(rt.rank, self.processes, rt.world))
        self.data = {r: build_data(cfg.data, splits, self.data_config, cfg.seed, r, self.processes)
                     for r in self.ranks}
        first = self.data[self.ranks[0]]
        tr = cfg.trainer
        updates = len(first.train) // tr.accumulate
        if updates == 0:
            raise UserError(f"trainer.accumulate={tr.accumulate} is more than the {len(first.train)} batches "
                            "of an epoch; lower it or use more data.")
        self.batches = updates * tr.accumulate  # what an epoch of training reads
        self.epochs = min(tr.epochs, math.ceil(tr.max_steps / updates)) if tr.max_steps else tr.epochs
        self.facts = identity.run_facts(cfg.data.batch_size * self.processes * tr.accumulate, self.processes,
                                        first.train_images, self.classes, content_ids(cfg.data, splits))
        self.header = {
            "format": FORMAT, "fingerprint": fingerprint(cfg, self.data_config, self.facts),
            "top_k": self.opts.top_k, "dtype": self.opts.dtype, "epochs": self.epochs,
            "batches_per_epoch": self.batches, "batch_size": cfg.data.batch_size, "processes": self.processes,
            "teacher": f"{describe(model)}, weights: {self.source}",
            "cache_command": "python -m shd_vision.cache " + shlex.join(sys.argv[1:]),
        }
        self.plan = plan_id(self.header)

    def run(self) -> Dict[str, Any]:
        self._claim()
        todo = [(e, r) for e in range(self.epochs) for r in self.ranks
                if _check_part(self.dir, e, r, self.plan) is not None]
        mine = len(self.ranks) * self.epochs
        log.info("teacher %s", self.header["teacher"])
        log.info("writing %d of this launch's %d parts (epochs x processes; %d batch(es) of %d rows each) to %s: "
                 "top-%d %s logits", len(todo), mine, self.batches, self.cfg.data.batch_size, self.dir,
                 self.opts.top_k, self.opts.dtype)
        self._progress = _Progress(len(todo) * self.batches * self.cfg.data.batch_size)
        for epoch, rank in todo:
            self._write_part(epoch, rank)
        runtime.barrier(self.rt)
        return self._summary(self._progress.seconds, self._progress.rows)

    def _claim(self) -> None:
        """Check an existing cache in the directory against this one; write the header. A cache
        written before a fact was kept keeps its fingerprint, so its parts keep their plan."""
        problem = None
        if self.rt.is_main:
            found = _read_json(self.dir / HEADER)
            try:
                problem = self._refusal(found)
                if problem is None and found:
                    self.header["fingerprint"] = identity.known_to(found["fingerprint"], self.header["fingerprint"])
                if problem is None:
                    epochs = max(self.epochs, found["epochs"]) if found else self.epochs  # parts beyond stay usable
                    _write_json({**self.header, "epochs": epochs, "validation": self._validation(found)},
                                self.dir / HEADER)
            except UserError as e:  # a teacher below its floor: every process stops, none waits
                problem = str(e)
        problem, self.header["fingerprint"] = runtime.broadcast((problem, self.header["fingerprint"]), self.rt)
        self.plan = plan_id(self.header)
        if problem:
            raise UserError(problem)

    def _refusal(self, found: Optional[Dict[str, Any]]) -> Optional[str]:
        if found is None:
            parts = sorted(p.name for p in self.dir.glob("epoch-*.pt"))
            if parts and self.opts.resume != "auto":
                return (f"{self.dir} holds cache parts ({parts[0]}, ...) but no readable {HEADER}, and parts are never "
                        "overwritten: write this cache elsewhere (cache.dir=DIR), or add cache.resume=auto to rewrite "
                        "every part that cannot be shown to belong to this plan.")
            return None
        if self.opts.resume != "auto":
            return (f"{self.dir} holds a teacher cache already, which is never overwritten: complete it with "
                    "cache.resume=auto (intact parts are kept, others written), or write this one elsewhere "
                    "(cache.dir=DIR, or run_name=NAME).")
        diff = (identity.differences({k: found.get(k) for k in PLAN}, {k: self.header[k] for k in PLAN}, "the cache")
                + identity.differences(found.get("fingerprint", {}),
                                       identity.known_to(found.get("fingerprint", {}), self.header["fingerprint"]),
                                       "the cache"))
        if diff:
            return (f"cache.resume=auto: {self.dir} holds the cache of another plan, differing in {len(diff)} "
                    f"key(s): {'; '.join(diff)}. Write this one elsewhere (cache.dir=DIR), or use that plan's values.")
        return None

    def _validation(self, found: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """The teacher's top-1 on this run's validation images (its floor checked), kept from a
        cache being completed when measured on the same images."""
        keys = _validation_keys(self.cfg, self.facts)
        if found and found.get("validation", {}).get("keys") == keys:
            return found["validation"]
        val = build_val_loader(self.cfg.data, self.val, self.data_config, 0, 1)
        top1 = evaluate(self.teacher.predict, val, len(self.classes), runtime.Runtime(self.rt.device),
                        self.cfg.trainer.precision, self.cfg.trainer.channels_last, "the teacher")["top1"]
        log.info("teacher top-1 on the validation set: %.2f%%", top1)
        if not random_labels(self.val):
            check_teacher_top1(top1, len(self.classes), self.cfg.trainer.teacher_floor)
        return {"keys": keys, "top1": top1}

    @torch.no_grad()
    def _write_part(self, epoch: int, rank: int) -> None:
        """One process's epoch, through the same calls as ``Run.train_epoch``."""
        data, tr, k = self.data[rank], self.cfg.trainer, self.opts.top_k
        dtype = getattr(torch, self.opts.dtype)
        index_dtype = torch.int16 if len(self.classes) <= 2**15 else torch.int32
        values, indices, lses, correct = [], [], [], 0
        for batch, (images, labels) in enumerate(data.epoch(epoch, 0)):
            if batch == self.batches:
                break
            images, labels = images.to(self.rt.device), labels.to(self.rt.device)
            if tr.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            images, targets = data.finish(images, labels, epoch, batch)
            with runtime.autocast(self.rt, tr.precision):
                logits = self.teacher.outputs(images, epoch, batch).logits
            v, i, lse = sparse_logits(logits, k)
            values.append(v.to(dtype).cpu())
            indices.append(i.to(index_dtype).cpu())
            lses.append(lse.cpu())
            labels = targets.argmax(-1) if targets.ndim == 2 else targets
            correct += int((logits.argmax(-1) == labels).sum())
            self._progress.rows_done(len(labels), f"epoch {epoch + 1}/{self.epochs} process {rank}")
        name = _part_name(epoch, rank)
        part = self.dir / f"{name}.pt"
        (self.dir / f"{name}.json").unlink(missing_ok=True)  # incomplete until its record follows it
        atomic_save({"values": torch.stack(values), "indices": torch.stack(indices), "lse": torch.stack(lses)}, part)
        os.chmod(part, 0o644)
        rows = len(values) * self.cfg.data.batch_size
        _write_json({"plan": self.plan, "sha256": _sha256(part), "bytes": part.stat().st_size, "rows": rows,
                     "correct": correct}, self.dir / f"{name}.json")

    def _summary(self, seconds: float, rows_written: int) -> Dict[str, Any]:
        records = [_read_json(self.dir / f"{_part_name(e, r)}.json")
                   for e in range(self.epochs) for r in range(self.processes)]
        complete = [r for r in records if r is not None and r.get("plan") == self.plan]
        rows = sum(r["rows"] for r in complete)
        size = sum(r["bytes"] for r in complete)
        summary = {
            "status": "finished" if len(complete) == len(records) else "incomplete",
            "cache_dir": str(self.dir), "parts": len(complete), "parts_planned": len(records),
            "epochs": self.epochs, "processes": self.processes, "rows": rows, "bytes": size,
            "bytes_per_epoch": size / max(len(complete) / self.processes, 1),
            "top_k": self.opts.top_k, "dtype": self.opts.dtype,
            "teacher_top1_train_rows": 100.0 * sum(r["correct"] for r in complete) / max(rows, 1),
            "teacher_top1_val": _read_json(self.dir / HEADER)["validation"]["top1"],
            "rows_written": rows_written, "write_seconds": seconds,
            "mixed": bool(self.cfg.data.mixup.mixup_alpha or self.cfg.data.mixup.cutmix_alpha),
            "cache_command": self.header["cache_command"],
            "train_command": train_command(self.dir, self.processes),
        }
        if self.rt.is_main:
            _write_json(summary, self.dir / "summary.json")
            log.info("%s", _format_summary(summary))
        return summary


class _Progress:
    """Rows written, their rate and the time left: a line after 10 s, then every 30 s, and at the end."""

    def __init__(self, total: int):
        self.total, self.rows, self.t0 = total, 0, time.perf_counter()
        self.next = self.t0 + 10

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def rows_done(self, rows: int, where: str) -> None:
        self.rows += rows
        now = time.perf_counter()
        if now >= self.next or self.rows == self.total:
            rate = self.rows / max(now - self.t0, 1e-9)
            log.info("%s | %d/%d rows | %s rows/s | eta %s", where, self.rows, self.total, format_rate(rate),
                     format_duration((self.total - self.rows) / rate))
            self.next = now + 30


def train_command(cache_dir: Path, processes: int) -> str:
    """``train.py`` with this command's train.py overrides and ``teacher.cache=DIR``, launched as
    the plan's processes (``torchrun`` for several)."""
    args = [a for a in sys.argv[1:] if not a.startswith(("cache.", "run_name=", "hydra."))]
    launch = f"torchrun --nproc_per_node={processes}" if processes > 1 else "python"
    return f"{launch} " + shlex.join(["train.py", *args, f"teacher.cache={cache_dir}"])


def _format_summary(s: Mapping[str, Any]) -> str:
    state = "complete" if s["status"] == "finished" else f"INCOMPLETE ({s['parts']} of {s['parts_planned']} parts)"
    return (f"teacher cache {state}: {s['cache_dir']}\n"
            f"  {s['rows']:,} rows over {s['epochs']} epoch(s) x {s['processes']} process(es), top-{s['top_k']} "
            f"{s['dtype']} logits, {_size(s['bytes'])} ({_size(s['bytes_per_epoch'])} per epoch)\n"
            f"  teacher top-1: {s['teacher_top1_train_rows']:.2f}% on the training rows it saw (augmented"
            f"{', mixed' if s['mixed'] else ''}), {s['teacher_top1_val']:.2f}% on the validation set\n"
            f"  written this session: {s['rows_written']:,} rows in {format_duration(s['write_seconds'])}\n"
            f"  train from it with:\n  {s['train_command']}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="cache")
def main(cfg: DictConfig) -> None:
    cli.run_task(write_cache, cfg)


if __name__ == "__main__":
    cli.main(main)
