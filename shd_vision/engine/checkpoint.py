"""Checkpoints: atomic writes, resume, and the timm-loadable export of the student.

A run directory holds ``checkpoints/last.pt`` (the newest state), ``prev.pt`` (the one before,
kept in case ``last.pt`` is damaged) and ``best.pt`` (the best validation top-1). Each is a
plain dict of tensors and Python values, so it loads with ``torch.load(weights_only=True)``:
the config is stored as YAML text and the RNG states as tensors.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
from torch import nn

from shd_vision.errors import UserError
from shd_vision.models.weights import FORMAT_KEY, read_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
NAMES = ("last.pt", "prev.pt", "best.pt")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place.

    A crash or a full disk leaves either the old file or the new one, never a partial one.

    Raises:
        UserError: the write failed; ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"could not write {path} ({e.strerror or e}); the previous file, if any, is "
                        "intact. Free disk space or set paths.log_dir to a writable disk.") from None


def _replace_with_link(src: Path, dst: Path) -> None:
    """Make ``dst`` the same file as ``src`` atomically (a hard link; a copy where links fail)."""
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


class Checkpoints:
    """The checkpoints of one run directory (only the main process writes)."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir) / "checkpoints"

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def existing(self) -> List[Path]:
        return [self.dir / n for n in NAMES if (self.dir / n).exists()]

    def save(self, state: Dict[str, Any], is_best: bool) -> None:
        """Write ``state`` as ``last.pt`` (the old one becomes ``prev.pt``), and as ``best.pt``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        new = self.dir / ".last.new"
        atomic_save(state, new)
        if self.last.exists():
            _replace_with_link(self.last, self.dir / "prev.pt")
        os.replace(new, self.last)
        if is_best:
            _replace_with_link(self.last, self.best)
        _fsync_dir(self.dir)

    def newest_readable(self) -> Optional[Tuple[Path, Dict[str, Any]]]:
        """For ``trainer.resume=auto``: the newest readable checkpoint of this run and its
        contents, or None. A damaged ``last.pt`` is reported and ``prev.pt`` used instead."""
        for path in (self.last, self.dir / "prev.pt"):
            if not path.exists():
                continue
            try:
                return path, load(path, "trainer.resume")
            except UserError as e:
                log.warning("Not resuming from %s: %s", path, e)
        return None


def load(path: Path, what: str) -> Dict[str, Any]:
    """Read an shd-vision checkpoint (``weights_only=True``), refusing other files."""
    obj = read_file(path, what)
    if obj.get(FORMAT_KEY) != FORMAT_VERSION:
        raise UserError(f"{what}={path} is not an shd-vision training checkpoint (no "
                        f"'{FORMAT_KEY}: {FORMAT_VERSION}' entry); resume needs a last.pt, prev.pt "
                        "or best.pt written by train.py.")
    return obj


def init_student(student: nn.Module, path: str, model_name: str) -> Dict[str, Any]:
    """``trainer.init_from``: load another run's student weights into a new run's ``student``
    (optimiser and schedule start fresh).

    Returns:
        What the summary records: the checkpoint's absolute path and its run's step.
    """
    ckpt = load(Path(path), "trainer.init_from")
    try:
        student.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"trainer.init_from={path} holds a student that does not fit model.name={model_name} "
                        f"({str(e).splitlines()[0]}); use a checkpoint of the same architecture.") from None
    log.info("student initialised from %s (step %d of its run); optimiser and schedule start fresh",
             path, ckpt["state"]["step"])
    return {"path": str(Path(path).absolute()), "step": ckpt["state"]["step"]}


def rng_state() -> Dict[str, Any]:
    """Every global RNG state, as tensors and plain values (loadable with ``weights_only``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_student(student: nn.Module, out_dir: Path, data_config: Dict[str, Any]) -> Path:
    """Write the student as timm's ``model.safetensors`` + ``config.json`` in ``out_dir``.

    Load it anywhere timm is installed with ``timm.create_model('local-dir:<out_dir>',
    pretrained=True)``, or with the architecture keys of ``config.json``'s ``model_args`` and
    ``pretrained_cfg_overlay=dict(file=<out_dir>/model.safetensors, num_classes=<classes>)``.
    """
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        timm.models.save_for_hf(student, str(tmp), safe_serialization=True,
                                data_config={k: data_config[k] for k in ("input_size", "mean", "std",
                                                                         "interpolation", "crop_pct")})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write the exported student to {out_dir} ({e.strerror or e}).") from None
    return out_dir
