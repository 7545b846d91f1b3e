"""Shared fixtures: configs composed from the real conf/ tree, shrunk by debug=fast, writing under
tmp_path; and one tiny trained teacher checkpoint per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
from omegaconf import DictConfig

from shd_vision.config import PROJECT_ROOT, compose_train

FMNIST = Path("/usr/share/datasets/fashion-mnist")
# scripts/test.sh runs the suite in pytest-xdist workers, one per core: each run in a worker then
# gets one torch thread, since two 2-thread pools on 2 cores spin-wait each other many times slower.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if THREADS == 1:
    os.environ["OMP_NUM_THREADS"] = "1"  # subprocesses and this worker's own torch


def compose(tmp: Path, *overrides: str, run: str = "run") -> DictConfig:
    """A debug=fast train config whose files all go under ``tmp``."""
    return compose_train(["debug=fast", f"paths.log_dir={tmp}/logs", f"hydra.run.dir={tmp}/{run}",
                          f"trainer.threads={THREADS}", *overrides])


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    return lambda *overrides, run="run": compose(tmp_path, *overrides, run=run)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Fashion-MNIST teacher (the quickstart architecture) trained for a few steps."""
    from shd_vision.engine.train import train

    tmp = tmp_path_factory.mktemp("teacher")
    cfg = compose(tmp, "experiment=fmnist_teacher", "trainer.max_steps=3", run="teacher")
    train(cfg)
    return tmp / "teacher" / "checkpoints" / "best.pt"


def paragraph(text: str) -> str:
    """Text with its line breaks undone: errors wrap at 100 columns, wherever a path's length puts them."""
    return " ".join(text.split())


def run_cli(script: str, *args: str, cwd: Path = PROJECT_ROOT, timeout: int = 300,
            env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``python script args`` (or ``-m module``) from the repository and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, *(["-m", script[3:]] if script.startswith("-m ") else [script]), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def debug_args(tmp: Path, *extra: str) -> List[str]:
    """Command-line overrides of a debug=fast run under ``tmp`` (run directory ``tmp/run``)."""
    run = [] if any(e.startswith("hydra.run.dir=") for e in extra) else [f"hydra.run.dir={tmp}/run"]
    return ["debug=fast", f"paths.log_dir={tmp}/logs", f"trainer.threads={THREADS}", *run, *extra]
