"""Where a run executes: the device, the process group (torchrun or SLURM), seeds, precision."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from submitit.helpers import TorchDistributedEnvironment

from shd_vision.errors import UserError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"trainer.device={name} but this machine has no usable CUDA GPU "
                            f"(torch {torch.__version__}); use trainer.device=cpu or auto.")
        if name == "cuda":
            return torch.device("cuda", local_rank)
        index = int(name.split(":")[1]) if name.split(":")[1].isdigit() else -1
        if not 0 <= index < torch.cuda.device_count():
            raise UserError(f"trainer.device={name}: this machine has {torch.cuda.device_count()} "
                            "GPU(s); use cuda, auto or cuda:N with N below that.")
        return torch.device("cuda", index)
    raise UserError(f"trainer.device={name} is not a device; use auto, cpu, cuda or cuda:N.")


def cluster_env() -> Dict[str, str]:
    """The ``env://`` variables of ``torch.distributed`` for a task that SLURM or submitit started
    (torchrun sets them itself). Read through submitit, which knows both; empty for one task."""
    if "WORLD_SIZE" in os.environ:
        return {}
    if "SUBMITIT_EXECUTOR" in os.environ:
        env = TorchDistributedEnvironment()
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        with _environ(SUBMITIT_EXECUTOR="slurm"):  # a plain srun task: read the job as submitit would
            env = TorchDistributedEnvironment()
    else:
        return {}
    if env.world_size <= 1:
        return {}
    return {"MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port), "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.local_world_size)}


@contextlib.contextmanager
def _environ(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A step frees and allocates the same large tensors every time; by default glibc unmaps or trims
    them on free, so the next step faults their pages in again, zeroed by the kernel. SHD's N×N maps
    paid ~20% of a CPU step for it (docs/performance.md). Allocations up to 32 MiB (glibc's cap)
    come from the heap; peak memory is unchanged. Nothing to do on other C libraries."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)


def setup(trainer: DictConfig) -> Runtime:
    """The device and, for several processes (torchrun, SLURM, submitit), the process group.

    NCCL on GPUs and gloo on CPUs unless ``trainer.dist_backend`` says otherwise.
    """
    keep_freed_memory()
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    os.environ.update(cluster_env())
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(trainer.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = trainer.tf32
    if world > 1 and not dist.is_initialized():
        backend = trainer.dist_backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(minutes=30)
        kwargs: Dict[str, Any] = {}
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's store outlives restarts of its workers: without a prefix per attempt a
            # restarted group can read the addresses its dead predecessors published there and
            # never connect (seen with gloo in torch 2.14).
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=False, timeout=timeout)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            kwargs = {"store": dist.PrefixStore(f"shd-vision/attempt-{attempt}", store), "rank": rank,
                      "world_size": world}
        dist.init_process_group(backend, timeout=timeout, device_id=device if backend == "nccl" else None,
                                **kwargs)
    return Runtime(device, rank, world, local_rank)


def teardown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(precision: str) -> Optional[torch.dtype]:
    return {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(rt: Runtime, precision: str):
    dtype = amp_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=rt.device.type, dtype=dtype)


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum a tensor over all processes (in place; a no-op in a single process)."""
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(value: Any, rt: Runtime) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not rt.distributed:
        return value
    box: List[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()
