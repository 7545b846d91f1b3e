"""Which run a directory and a checkpoint belong to.

A run directory is held by one run at a time (an OS lock that dies with its process), and a
checkpoint is resumed only by a run whose config defines the same run: the keys of
:data:`~shd_vision.config.RESUMABLE` may change between sessions (how a run is executed, logged or stopped), every
other key and the facts of :func:`run_facts` must be equal, or the resume is refused naming
each difference. The same fingerprint identifies a run wherever one is needed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from shd_vision.config import RESUMABLE, inside_project, resumable
from shd_vision.engine import runtime
from shd_vision.engine.checkpoint import Checkpoints, load
from shd_vision.errors import UserError

log = logging.getLogger("shd_vision.train")

LOCK_NAME = ".lock"


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, Mapping):
        flat: Dict[str, Any] = {}
        for k, v in node.items():
            flat.update(_flatten(v, f"{prefix}{k}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def fingerprint(cfg: DictConfig | Mapping, facts: Mapping[str, Any]) -> Dict[str, Any]:
    """Every run-defining value: the config's keys outside ``RESUMABLE`` (dotted, resolved;
    paths inside the project relative to it) plus ``facts`` (:func:`run_facts`) under ``run.``."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    root = str(tree.get("paths", {}).get("root_dir") or "").rstrip("/")
    flat = {k: inside_project(v, root) for k, v in _flatten(tree).items() if not resumable(k)}
    flat.update({f"run.{k}": v for k, v in facts.items()})
    return flat


def run_facts(global_batch: int, processes: int, train_images: int, classes: List[str],
              contents: Tuple[str, str], stream_workers: Optional[int] = None) -> Dict[str, Any]:
    """What defines a run beyond its config: the global batch, the process count (each process
    has its own random streams), the data actually found (a moved ``data.root`` must hold the
    same images and classes: ``contents`` are the train and validation sets'
    :func:`~shd_vision.data.datasets.content_id`) and, for a stream, its loader workers (they
    split its shards). A fact a record predates is not compared with it."""
    facts = {"global_batch": global_batch, "processes": processes, "train_images": train_images,
             "classes": list(classes), "train_data": contents[0], "val_data": contents[1]}
    if stream_workers is not None:
        facts["stream_workers"] = stream_workers
    return facts


def known_to(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> Dict[str, Any]:
    """``now`` less the facts (``run.*``) that ``recorded`` predates: a record written before a
    fact was kept is compared on the facts it has."""
    return {k: v for k, v in now.items() if not k.startswith("run.") or k in recorded}


def differences(recorded: Mapping[str, Any], now: Mapping[str, Any], where: str = "the checkpoint") -> List[str]:
    """``key (A in <where>, B now)`` for every key whose values differ; a key one side lacks
    counts as null there (a key added to the config later, with its old behaviour as null)."""
    out = []
    for key in sorted(set(recorded) | set(now)):
        a, b = recorded.get(key), now.get(key)
        if a != b:
            out.append(f"{key} ({_show(a)} in {where}, {_show(b)} now)")
    return out


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_resume(path: Path, ckpt: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose run differs from this one in any run-defining value.

    Raises:
        UserError: one paragraph listing every differing key with both values.
    """
    # checkpoints written before they recorded their facts still show their process count
    recorded = fingerprint(OmegaConf.create(ckpt["config"]), ckpt.get("facts") or {"processes": len(ckpt["rng"])})
    diff = differences(recorded, known_to(recorded, now))
    if diff:
        raise UserError(
            f"trainer.resume: {path} belongs to a run defined differently from this one, in "
            f"{len(diff)} key(s): {'; '.join(diff)}. A resume continues the same run, so these must "
            "match (the checkpoint's full config is in its run directory's config.yaml). To change the "
            f"run on purpose, start a new run from its weights with trainer.init_from={path} (a fresh "
            "optimiser, schedule and EMA) in another run directory. Keys that may change on resume: "
            f"{', '.join(RESUMABLE)}.")


def continue_command(run_name: str) -> str:
    """The command that continues this run (or sweep): ``python train.py`` with its own arguments,
    its run name (which names its directory) and ``trainer.resume=auto``, which resumes an
    unfinished run and leaves a finished one as it is."""
    if not sys.argv[0].endswith("train.py"):  # train() called from another program (the quickstart)
        return f"the same command plus run_name={run_name} trainer.resume=auto"
    args = [a for a in sys.argv[1:] if not a.startswith(("run_name=", "trainer.resume="))]
    return "python " + shlex.join([sys.argv[0], *args, f"run_name={run_name}", "trainer.resume=auto"])


def checkpoint_to_resume(cfg: DictConfig, checkpoints: Checkpoints, rt: runtime.Runtime,
                         facts: Mapping[str, Any]) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """The checkpoint ``trainer.resume`` names (``auto``: this run's newest readable one) and its
    contents, after :func:`check_resume`; None when there is nothing to resume."""
    resume = cfg.trainer.resume
    if not resume:
        return None
    if resume == "auto":
        found = checkpoints.newest_readable() if rt.is_main else None
        path = runtime.broadcast(found[0] if found else None, rt)
        if path is None:
            log.info("trainer.resume=auto: no checkpoint in %s yet, starting from scratch", checkpoints.dir.parent)
            return None
    else:
        path = Path(resume)
    ckpt = load(path, "trainer.resume")
    check_resume(path, ckpt, fingerprint(cfg, facts))
    return path, ckpt


def finished_summary(run_dir: Path, step: int, total_steps: int) -> Optional[Dict[str, Any]]:
    """The summary of a run whose resumed state is already at its end, if that run had finished
    (not stopped): ``trainer.resume=auto`` then leaves it as it is, which is how a continued
    sweep skips its finished jobs."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if summary.get("status") != "finished":
        return None
    log.info("%s finished already (step %d of %d); its summary.json stands, nothing to do", run_dir, step,
             total_steps)
    return summary


def finished_record(cfg: DictConfig, run_dir: Path, now: Mapping[str, Any], total_steps: int
                    ) -> Optional[Dict[str, Any]]:
    """The summary of a finished run whose checkpoints are gone (a study's committed records on
    a fresh machine keep ``summary.json``, ``config.yaml`` and ``metrics.jsonl`` only), when
    ``trainer.resume=auto`` finds no checkpoint: the record stands if it defines the same run as
    ``now`` (:func:`fingerprint`) and went as far as this run's ``total_steps``; None when there
    is no finished record.

    Raises:
        UserError: the record belongs to a run defined differently, or ended earlier (at
            ``trainer.max_steps``, which may change between sessions) and cannot be continued
            without its checkpoints; retraining would overwrite it.
    """
    summary_file, config_file = run_dir / "summary.json", run_dir / "config.yaml"
    if cfg.trainer.resume != "auto" or not (summary_file.is_file() and config_file.is_file()):
        return None
    summary = json.loads(summary_file.read_text())
    if summary.get("status") != "finished":
        return None
    recorded = fingerprint(OmegaConf.load(config_file), summary.get("facts") or {})
    diff = differences(recorded, known_to(recorded, now), where="the record")
    if diff:
        raise UserError(
            f"trainer.resume=auto: {run_dir} holds a finished run without checkpoints, defined "
            f"differently from this one in {len(diff)} key(s): {'; '.join(diff)}. Training here would "
            "overwrite its record; give this run another run_name, or move that directory away to "
            "train it again.")
    steps = summary.get("steps", total_steps)
    if steps < total_steps:
        capped = OmegaConf.load(config_file).trainer.get("max_steps") == steps
        raise UserError(
            f"trainer.resume=auto: {run_dir} holds a run that ended at step {steps}"
            f"{f' (trainer.max_steps={steps})' if capped else ''}, while this one plans {total_steps} steps, "
            "and without its checkpoints it cannot be continued. Its record is not this run's: "
            f"{f'set trainer.max_steps={steps} to keep it as it is, or ' if capped else ''}give this run another "
            "run_name, or move that directory away to train it in full.")
    log.info("%s finished already (its checkpoints are not here; summary.json and config.yaml are): "
             "its record stands, nothing to do", run_dir)
    return summary


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``, recording the holder's pid and host.

    The kernel releases it when the process ends, however it ends, so a crashed run leaves no
    stale lock. (On network file systems this needs working ``flock``, as NFS and Lustre with
    ``-o flock`` give.)
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(
                f"the run directory {self.path.parent} is in use by another run ({self.holder()}), which "
                "holds its lock until it ends; two runs never write into one directory. Start this one "
                "elsewhere (run_name=NAME, or leave run_name unset for a new timestamped directory), or "
                "wait for that run to end.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "pid unknown"
        except OSError:
            return "pid unknown"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock; the file stays for the next holder
            self.fd = None


@contextlib.contextmanager
def claim_run_dir(cfg: DictConfig, rt: runtime.Runtime) -> Iterator[Path]:
    """The run directory, created and locked by rank 0 for the whole run (every rank of a
    multi-process run shares it), after refusing to start a new run over another's checkpoints."""
    run_dir, problem, lock = Path(cfg.paths.output_dir).absolute(), None, None
    if rt.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir)
            lock.acquire()
        except OSError as e:
            problem = (f"the run directory {run_dir} is not writable ({e.strerror or e}); set "
                       "paths.log_dir=DIR (or hydra.run.dir=DIR) to a writable place.")
        except UserError as e:
            problem = str(e)
        existing = [] if problem else Checkpoints(run_dir).existing()
        if existing and not cfg.trainer.resume:
            problem = (f"{run_dir} already holds checkpoints ({', '.join(p.name for p in existing)}) of "
                       "an earlier run, and they are never overwritten: continue that run with "
                       "trainer.resume=auto, or start a new one elsewhere (run_name=NAME or hydra.run.dir=DIR).")
    run_dir, problem = runtime.broadcast((run_dir, problem), rt)
    try:
        if problem:
            raise UserError(problem)
        yield run_dir
    finally:
        if lock is not None:
            lock.release()
