"""Entry-point plumbing: a user's mistake becomes one paragraph on stderr and exit code 2.

It imports nothing heavy (torch, timm) before a task starts, so that a mistake in the command
line or the config files is reported in about a second."""

from __future__ import annotations

import difflib
import os
import re
import shutil
import socket
import sys
import textwrap
import traceback
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, List, NoReturn, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError

from shd_vision.config import check_config  # importing it registers the schemas and resolvers Hydra composes with
from shd_vision.errors import COMMAND, UnreadableImage, UserError, unreadable_message

OWN_STAMP = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_(\d+)")  # config.run_stamp's: time, then pid
_task_started = False
_sweep_jobs: List[str] = []  # "job N (overrides)" of every sweep job this process ran
_failed_jobs: List[Tuple[str, str, bool]] = []  # (job, one-line reason, whether it was the user's mistake)
_continue = ""  # the command that continues the sweep in progress


class JobFailed(Exception):
    """A sweep job's failure, handed to Hydra so that the sweep's other jobs still run."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``message`` as one wrapped paragraph and exit with status ``code``. A command after
    ``COMMAND`` (a line ``"\\n$ "``) follows on its own line, unwrapped, so that it pastes whole."""
    text, _, command = message.partition(COMMAND)
    text = " ".join(text.split())
    sys.stderr.write(textwrap.fill(f"error: {text}", width=100, break_on_hyphens=False, break_long_words=False)
                     + (f"\n  {command.strip()}" if command else "") + "\n")
    sys.exit(code)


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_task(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """The body of a ``@hydra.main`` function: run ``task``, reporting user errors. In a sweep a
    failing job (a user error or an exception) is reported and recorded, and the others run."""
    global _task_started, _continue
    _task_started = True
    job = _job_name() if in_sweep() else ""
    if job:
        from shd_vision.engine.identity import continue_command  # imports torch

        _sweep_jobs.append(job)
        _continue = continue_command(cfg.run_name)
    try:
        _check_given(cfg)
        check_config(cfg)  # before the task imports torch and timm: a value out of range is told at once
        return task(cfg)
    except UnreadableImage as e:  # outside training (eval.py); a worker's copy carries its traceback
        message, user = (f"{unreadable_message(e)}. Replace or delete it, or set data.skip_bad_images=true; "
                         "python -m shd_vision.data.check lists every unreadable file of a data set."), True
    except UserError as e:
        message, user = str(e), True
    except Exception as e:
        if not job:
            raise
        traceback.print_exc()
        message, user = f"{type(e).__name__}: {e}", False
    if not job:
        _drop_refused_run_dir(cfg)
        fail(message)
    message = message.partition(COMMAND)[0]  # a single run's continue command: the sweep prints its own
    sys.stderr.write(textwrap.fill(f"error in sweep {job}: {' '.join(message.split())}", width=100,
                                   break_on_hyphens=False, break_long_words=False) + "\n")
    _failed_jobs.append((job, _one_line(message), user))
    raise JobFailed(f"{job}: {message}")


def _check_given(cfg: DictConfig) -> None:
    """A required value (``???`` in conf/, e.g. eval.py's ``ckpt``) left out of the command."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{', '.join(missing)} must be given: add {' '.join(k + '=...' for k in missing)} to the "
                        f"command ({_program()} --help lists every option).")


def _program() -> str:
    """How this program was started: ``python train.py`` or ``python -m shd_vision.viz``."""
    path, package = Path(sys.argv[0]).resolve(), Path(__file__).resolve().parent
    if package not in path.parents:
        return f"python {path.name}"
    parts = path.relative_to(package.parent).with_suffix("").parts
    return "python -m " + ".".join(parts[:-1] if parts[-1] == "__main__" else parts)


def _drop_refused_run_dir(cfg: DictConfig) -> None:
    """Remove the run directory of a launch refused before it wrote anything, so that mistakes
    leave no empty runs behind: only a directory named by this process's own time stamp
    (``run_name`` left to ``run_stamp``), holding nothing but its empty log and this process's
    lock. Any other directory (one the user named, one with a record) is kept as it is."""
    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    stamp = OWN_STAMP.fullmatch(out.name)
    if out.name != str(cfg.get("run_name")) or not stamp or int(stamp.group(1)) != os.getpid():
        return
    try:
        entries = {p.name: p for p in out.iterdir()}
        lock, log = entries.pop(".lock", None), entries.pop(f"{hc.job.name}.log", None)
        if entries or (log is not None and log.stat().st_size) or (
                lock is not None and lock.read_text() != f"pid {os.getpid()} on {socket.gethostname()}\n"):
            return
        shutil.rmtree(out)
    except OSError:  # gone already, or not ours to remove: leave it
        pass


def _job_name() -> str:
    """``job N (the overrides that set it apart from the command line)``."""
    hc = HydraConfig.get()
    own = [o for o in hc.overrides.task if o not in sys.argv]
    return f"job {hc.job.num}" + (f" ({' '.join(own)})" if own else "")


def _one_line(message: str, limit: int = 240) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[:limit].rstrip(" .") + "..."


def _sweep_report() -> None:
    """After a sweep: one paragraph naming each failed job, and a non-zero exit (2 when every
    failure was a user error, 1 when a job crashed)."""
    listed = "; ".join(f"{job}: {reason}" for job, reason, _ in _failed_jobs)
    fail(f"{len(_failed_jobs)} of {len(_sweep_jobs)} sweep jobs failed, the others ran to their end. "
         f"Failed: {listed}. Where the cause lies outside the sweep's values (data, files, a crash), fix "
         "it and continue the sweep with the command below (failed and unfinished jobs run, finished "
         "ones are skipped); a job whose own values were wrong needs a new sweep with values that work, "
         f"since changing them would change the finished jobs too.{COMMAND}{_continue}",
         code=2 if all(user for _, _, user in _failed_jobs) else 1)


def _describe(e: BaseException) -> str:
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group, _, name = e.missing_cfg_file.rpartition("/")
        return (f"{group}={name}: there is no conf/{group}/{name}.yaml; available: "
                f"{', '.join(sorted(e.options))}.")
    if isinstance(e, AssertionError) and "Unexpected type for root: NoneType" in str(e):  # a key below a null group
        override = next((a for a in sys.argv[1:] if re.match(r"(data|model|teacher)\.", a)), "data.<key>=...")
        group = override.split(".")[0]
        return (f"{override}: {group} is not set by this command, so it has no keys to change ({_program()} "
                f"takes {group} from the checkpoint, or from {group}=<config>). Name the config too, e.g. "
                f"{group}=<name> {override}; conf/{group}/ lists the names.")
    unset = re.match(r"While dereferencing interpolation '\$\{(?:oc\.select:)?([\w.]+)[^']*': Incompatible value 'None'", str(e))
    if unset and getattr(e, "full_key", None) == "hydra.run.dir":  # pack.out: the run writes into it
        return f"{unset.group(1)} must be given: add {unset.group(1)}=DIR to the command (the folder it writes)."
    unknown = _unknown_key(e)
    if unknown:
        return unknown
    head = str(e)
    if head.startswith("Error merging override "):  # Hydra's wording for a value of the wrong type
        head = head[len("Error merging override "):] + ":"
    # omegaconf's cause ends with full_key/reference_type lines that only repeat the key
    cause = str(e.__cause__).strip().splitlines()[:1] if e.__cause__ is not None else []
    text = " ".join(" ".join(p.split()) for p in [head, *cause] if p)
    if "is not a ListConfig" in text:  # by=kd.name for by=[kd.name]
        text += " Write a list in brackets, e.g. " + head.rstrip(":").replace("=", "=[", 1) + "]."
    if "Got NoneType" in text:
        text += " (to leave a config group out, write ~group on the command line, e.g. ~teacher)."
    return text


def _unknown_key(e: BaseException) -> str:
    """A key its schema lacks (``checkpoint=`` for eval.py's ``ckpt=``): Hydra's advice to append it
    with ``+`` fails on a schema too, so name the close keys instead."""
    cause = e.__cause__
    override = re.match(r"Could not override '[\w.]+'\.\s+To append to your config use \+(\S+)", str(e))
    if not (override and isinstance(cause, ConfigAttributeError) and is_dataclass(cause.object_type)):
        return ""
    keys = [f.name for f in fields(cause.object_type)]
    prefix = cause.full_key.rpartition(".")[0]
    close = [f"{prefix}.{k}" if prefix else k for k in difflib.get_close_matches(cause.key, keys, n=3, cutoff=0.5)]
    hint = f"; close: {', '.join(close)}" if close else ""
    return (f"{override.group(1)}: there is no key '{cause.key}' to set (Key '{cause.key}' not in "
            f"'{cause.object_type.__name__}'){hint}. {_program()} --help lists every option.")


def main(entry: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` entry point; errors in the command line or config files (before the
    task starts) are reported like user errors instead of as Hydra tracebacks."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let them reach us instead of Hydra's exit(1)
    try:
        entry()
    except Exception as e:
        if _failed_jobs:  # Hydra re-raises a failed sweep job's error once every job has run
            _sweep_report()
        if _task_started:  # a failure inside the run itself keeps its traceback
            raise
        fail(_describe(e))
    if _failed_jobs:  # sweepers that record failures and go on (Optuna)
        _sweep_report()
