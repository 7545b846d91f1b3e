"""Shared fixtures: configs composed from the real conf/ tree, shrunk by debug=fast, writing under
tmp_path; and one tiny trained teacher checkpoint per session."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
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
    """Run ``python script args`` (or ``-m module``) from the repository and capture its output:
    forked from this worker's warm Python (tests/warm_python.py), or with SHD_TEST_COLD=1 in a new
    interpreter."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    argv = [*(["-m", script[3:]] if script.startswith("-m ") else [script]), *args]
    if os.environ.get("SHD_TEST_COLD") == "1":
        return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    return _warm.run(argv, cwd, env, timeout)


class _WarmPython:
    """This worker's tests/warm_python.py, started at the first command; one command at a time."""

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.lock = threading.Lock()

    def run(self, argv: List[str], cwd: Path, env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            if self.proc is None:
                self.proc = subprocess.Popen([sys.executable, "-u", str(PROJECT_ROOT / "tests/warm_python.py")],
                                             cwd=PROJECT_ROOT, env=env, stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, bufsize=0)
                atexit.register(self.proc.stdin.close)  # its request loop ends, and with it the process
            out, err = Path(tmp, "out"), Path(tmp, "err")
            out.touch(), err.touch()
            request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            pid = int(self._line(None))
            try:
                code = int(self._line(timeout))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._line(None)
                raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess([sys.executable, *argv], code, out.read_text(), err.read_text())

    def _line(self, timeout: Optional[float]) -> str:
        """The warm Python's next answer, read unbuffered so that ``select`` sees all that is pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], wait)[0]:
                raise subprocess.TimeoutExpired("warm_python", timeout)
            byte = os.read(self.proc.stdout.fileno(), 1)
            if not byte:
                raise RuntimeError(f"tests/warm_python.py ended (exit status {self.proc.wait()})")
            line += byte
        return line.decode()


_warm = _WarmPython()


def debug_args(tmp: Path, *extra: str) -> List[str]:
    """Command-line overrides of a debug=fast run under ``tmp`` (run directory ``tmp/run``)."""
    run = [] if any(e.startswith("hydra.run.dir=") for e in extra) else [f"hydra.run.dir={tmp}/run"]
    return ["debug=fast", f"paths.log_dir={tmp}/logs", f"trainer.threads={THREADS}", *run, *extra]
