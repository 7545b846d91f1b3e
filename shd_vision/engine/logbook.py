"""Where a run's numbers go: the console and ``train.log``, ``metrics.jsonl``, ``metrics.csv``.

Only the main process writes. Every record is one JSON line with ``step``, ``epoch``,
``split`` (``train`` or ``val``) and the values; the CSV is written from them at the end.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

log = logging.getLogger("shd_vision")

_FORMAT = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def run_logging(run_dir: Path, is_main: bool, filename: str) -> Iterator[None]:
    """Send the ``shd_vision`` logger to ``run_dir/filename`` for the run; quiet other ranks."""
    logger = logging.getLogger("shd_vision")
    handler: Optional[logging.Handler] = None
    previous = logger.level
    if is_main:
        logger.setLevel(logging.INFO)
        handler = logging.FileHandler(run_dir / filename)
        handler.setFormatter(_FORMAT)
        logger.addHandler(handler)
        if not logging.getLogger().handlers:  # not under Hydra: print to the console too
            console = logging.StreamHandler()
            console.setFormatter(_FORMAT)
            logging.getLogger().addHandler(console)
    else:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(previous)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    d, h = divmod(h, 24)
    return f"{d}d {h}:{m:02d}:{s:02d}" if d else f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_rate(per_s: float) -> str:
    """Images per second: whole numbers, with two significant digits below 10 (a CPU's DeiT)."""
    return f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.2g}"


class Throughput:
    """Training samples per second and time left; the clock runs only between ``start`` and
    ``stop``, so validation and checkpoint writes do not count."""

    def __init__(self, total_steps: int, earlier: Optional[Mapping[str, float]] = None):
        self.total = total_steps
        self.samples, self.steps, self.seconds = 0, 0, 0.0
        # the run's sessions before a resume: their samples and training seconds count in mean_rate
        self.earlier = dict(earlier or {"train_samples": 0, "train_seconds": 0.0})
        self._since: Optional[float] = None
        self._window = [0, 0, 0.0]  # samples, steps, seconds since the last read

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            dt = time.perf_counter() - self._since
            self.seconds += dt
            self._window[2] += dt
            self._since = None

    def step(self, samples: int) -> None:
        self.samples += samples
        self.steps += 1
        self._window[0] += samples
        self._window[1] += 1

    def read(self, step: int) -> Dict[str, float]:
        """Rate over the steps since the last read, and the training time to the last step."""
        self.stop()
        self.start()
        samples, steps, seconds = self._window
        self._window = [0, 0, 0.0]
        seconds = max(seconds, 1e-9)
        return {"samples_per_s": samples / seconds, "eta_s": (self.total - step) * seconds / max(steps, 1)}

    def so_far(self, step: int) -> Dict[str, float]:
        """Rate and time left over every step timed so far, leaving the read window alone."""
        seconds = self.seconds + (time.perf_counter() - self._since if self._since is not None else 0.0)
        rate = self.samples / max(seconds, 1e-9)
        return {"seconds": seconds, "steps": self.steps, "samples_per_s": rate,
                "eta_s": (self.total - step) * seconds / max(self.steps, 1)}

    @property
    def totals(self) -> Dict[str, float]:
        """Training samples and seconds over every session of the run (saved in checkpoints)."""
        return {"train_samples": self.earlier["train_samples"] + self.samples,
                "train_seconds": self.earlier["train_seconds"] + self.seconds}

    @property
    def mean_rate(self) -> float:
        t = self.totals
        return t["train_samples"] / t["train_seconds"] if t["train_seconds"] > 0 else float("nan")


class Logbook:
    """Appends records to ``metrics.jsonl`` and forwards them to the extra sinks."""

    def __init__(self, run_dir: Path, enabled: bool, csv_file: bool, sinks: List[Any] = ()):
        self.path = run_dir / "metrics.jsonl"
        self.enabled, self.csv_file, self.sinks = enabled, csv_file, list(sinks)

    def write(self, split: str, step: int, epoch: float, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, "epoch": round(epoch, 4), **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log(split, step, values)

    def images(self, step: int, images: Mapping[str, Path]) -> None:
        if self.enabled:
            for sink in self.sinks:
                sink.images(step, images)

    def close(self, summary: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if self.csv_file and self.path.exists():
            write_csv(read_jsonl(self.path), self.path.with_suffix(".csv"))
        for sink in self.sinks:
            sink.finish(summary)


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_csv(records: List[Dict[str, Any]], path: Path) -> None:
    columns: List[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


class WandbSink:
    """Forwards a run's records, pictures and summary to Weights & Biases.

    Offline unless ``logger.wandb.mode=online``: nothing touches the network unless the user
    asks. Files go to ``<run_dir>/wandb``; a resumed run continues the same W&B run (its id is
    derived from the run directory).
    """

    def __init__(self, cfg: Any, run_dir: Path, config: Dict[str, Any], group: Optional[str]):
        import wandb  # imported here: only runs with logger=wandb need it

        self._wandb = wandb
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=cfg.group or group,
                              tags=list(cfg.tags), name=run_dir.name, id=run_id, resume="allow",
                              dir=str(run_dir), config=config)
        self.log_images = cfg.log_images

    def log(self, split: str, step: int, values: Mapping[str, float]) -> None:
        self.run.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def images(self, step: int, images: Mapping[str, Path]) -> None:
        if self.log_images and images:
            self.run.log({f"pictures/{name}": self._wandb.Image(str(path)) for name, path in images.items()},
                         step=step)

    def finish(self, summary: Mapping[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish()


def format_summary(s: Dict[str, Any]) -> str:
    """The end-of-run summary as a few aligned lines."""
    terms = " + ".join(f"{w:g}·{n}" for n, w in s["terms"].items())
    ema = f"; EMA {s['top1_ema']:.2f}%" if s.get("top1_ema") is not None else ""
    teacher = s["teacher"] or "none"
    if s.get("teacher_top1") is not None:
        teacher += f" (top-1 {s['teacher_top1']:.2f}%)"
    rate = s["train_samples_per_s"]
    lines = [
        "run summary",
        f"  method     kd={s['method']}: {terms}",
        f"  student    {s['student']}",
        f"  teacher    {teacher}",
        f"  top-1      {s['top1']:.2f}% (best {s['best_top1']:.2f}% after epoch {s['best_epoch']}{ema})",
        f"  top-5      {s['top5']:.2f}%    val loss {s['val_loss']:.4f}",
        f"  time       {format_duration(s['wall_time_s'])} for {s['steps']} steps, "
        f"{format_rate(rate)} training images/s" if math.isfinite(rate) else
        f"  time       {format_duration(s['wall_time_s'])} for {s['steps']} steps",
        f"  run dir    {s['run_dir']}",
        "             checkpoints/{last,best}.pt, metrics.jsonl, summary.json, curves.png, confusion.png"
        + (", attention/" if any("/attention/" in p for p in s["pictures"]) else "")
        + (", export/" if s["export"] else ""),
    ] + ([f"  skipped    {len(s['bad_images'])} unreadable image(s), listed in bad_images.txt"]
         if s.get("bad_images") else [])
    return "\n".join(lines)
