"""Entry-point plumbing: a user's mistake becomes one paragraph on stderr and exit code 2."""

from __future__ import annotations

import os
import sys
import textwrap
from typing import Any, Callable, NoReturn

from hydra.errors import MissingConfigException
from omegaconf import DictConfig

import shd_vision.config  # noqa: F401  (registers the schemas and resolvers Hydra composes with)
from shd_vision.data.datasets import UnreadableImage, unreadable_message
from shd_vision.errors import UserError

_task_started = False


def fail(message: str) -> NoReturn:
    """Print ``message`` as one wrapped paragraph and exit with status 2."""
    text = " ".join(message.split())
    sys.stderr.write(textwrap.fill(f"error: {text}", width=100, break_on_hyphens=False, break_long_words=False) + "\n")
    sys.exit(2)


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """The body of a ``@hydra.main`` function: run ``task``, reporting user errors."""
    global _task_started
    _task_started = True
    try:
        return task(cfg)
    except UnreadableImage as e:  # outside training (eval.py); a worker's copy carries its traceback
        fail(f"{unreadable_message(e)}. Replace or delete it, or set data.skip_bad_images=true; "
             "python -m shd_vision.data.check lists every unreadable file of a data set.")
    except UserError as e:
        fail(str(e))


def _describe(e: BaseException) -> str:
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group, _, name = e.missing_cfg_file.rpartition("/")
        return (f"{group}={name}: there is no conf/{group}/{name}.yaml; available: "
                f"{', '.join(sorted(e.options))}.")
    parts = [str(e)] + ([str(e.__cause__)] if e.__cause__ is not None else [])
    text = " ".join(" ".join(p.split()) for p in parts if p)
    if "Got NoneType" in text:
        text += " (to leave a config group out, write ~group on the command line, e.g. ~teacher)."
    return text


def main(entry: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` entry point; errors in the command line or config files (before the
    task starts) are reported like user errors instead of as Hydra tracebacks."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let them reach us instead of Hydra's exit(1)
    try:
        entry()
    except Exception as e:
        if _task_started:  # a failure inside the run itself keeps its traceback
            raise
        fail(_describe(e))
