"""What stops a run between steps: a stop signal, or a loss that stopped being finite.

Both are watched without a host-device synchronisation per step, so that a GPU's queue of
kernels never drains in the steady state: ranks agree on a stop at log lines, and a non-finite
loss is remembered on the device and read where the loop would act on it (a log line, a
checkpoint, the end of an epoch), so that a bad state is never saved.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from shd_vision.engine import runtime

log = logging.getLogger("shd_vision.train")


class Stop(Exception):
    """A stop signal arrived; the loop ends at the step boundary where this is raised."""


class StopSignals:
    """SIGTERM and SIGUSR1 (SLURM pre-emption, or ``--signal=USR1@90`` before a time limit) and a
    first Ctrl-C (SIGINT) ask the run to stop: it finishes the step in flight, saves a checkpoint
    and returns. A second Ctrl-C interrupts at once, as Python's default does."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.received == "SIGINT":
                raise KeyboardInterrupt
            log.warning("Ctrl-C: the run stops after this step with a checkpoint; press it again to interrupt at once")
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def check(self, rt: runtime.Runtime) -> None:
        """Raise :class:`Stop` on every rank once any rank has been signalled (an all-reduce when
        distributed: call it at the same steps on every rank)."""
        stop = self.received is not None
        if rt.distributed:
            flag = torch.tensor([float(stop)], device=rt.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = flag.item() > 0
        if stop:
            raise Stop(self.received or "a stop signal on another rank")


class LossWatch:
    """The first step whose loss was not finite, and its loss terms, kept on the device."""

    def __init__(self, device: torch.device) -> None:
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.values: Optional[Tensor] = None  # [1 + terms]: the loss, then each term
        self.names: List[str] = []

    def record(self, step: int, loss: Tensor, terms: Dict[str, Tensor]) -> None:
        """Remember ``step`` if its loss is the first non-finite one (device ops only)."""
        values = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values())])
        if self.values is None:
            self.values, self.names = torch.zeros_like(values), list(terms)
        first = (self.step < 0) & ~torch.isfinite(values[0])
        self.step = torch.where(first, step, self.step)
        self.values = torch.where(first, values, self.values)

    def first_bad(self, rt: runtime.Runtime) -> Optional[Tuple[int, float, Dict[str, float]]]:
        """``(step, loss, {term: value})`` of the first non-finite loss on any rank, else None (one
        synchronisation, and an all-reduce when distributed: call it on every rank)."""
        never = torch.iinfo(torch.long).max
        step = torch.where(self.step < 0, never, self.step)
        if rt.distributed:
            dist.all_reduce(step, op=dist.ReduceOp.MIN)
        first = int(step.item())
        if first == never:
            return None
        loss, *values = self.values.tolist()
        return first, loss, dict(zip(self.names, values))
