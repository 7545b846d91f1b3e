"""Helpers shared by the benchmarks: a training step built from the real configs, timing, peak
memory, isolated runs in fresh processes, and Markdown tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DISTILLED = "<distilled student>"  # stands for the preset's student with a distillation token
CACHED = "<teacher cache>"  # the teacher's top-10 float16 logits replayed (teacher.cache), not its forward
PRESETS: Dict[str, Dict[str, Any]] = {
    # the embedded default's pair: 6-head teacher, 3-head student, 28x28 grey, patches of 4
    "tiny": {"overrides": ["model=vit_fmnist_student", "teacher=vit_fmnist_teacher"],
             "distilled": "model=vit_fmnist_student_distilled", "classes": 10, "batch": {"cpu": 64, "cuda": 256}},
    "deit_s_ti": {"overrides": ["model=deit_tiny", "teacher=deit_small"], "distilled": "model=deit_tiny_distilled",
                  "classes": 1000, "batch": {"cpu": 8, "cuda": 128}},
    "deit_b_s": {"overrides": ["model=deit_small", "teacher=deit_base"], "distilled": "model=deit_small_distilled",
                 "classes": 1000, "batch": {"cpu": 4, "cuda": 128}},
}


def build_step(preset: str, kd: List[str], device: torch.device, batch: int, precision: str = "32",
               channels_last: bool = False, compile_models: bool = False, model_overrides: Sequence[str] = (),
               tf32: bool = True, keep_freed: bool = True):
    """A full training step (teacher forward, student forward and backward, AdamW update) of
    ``preset`` with the kd overrides, on a fixed random batch. Returns ``(step, teacher_forward)``,
    the second None when the method uses no teacher. ``tf32``: float32 matmuls on TF32 tensor
    cores (CUDA), as ``trainer.tf32`` does; ``keep_freed``: glibc keeps freed memory, as
    ``runtime.setup`` makes it for train.py (False: glibc's defaults, for comparison)."""
    from shd_vision.cache import dense_logits, sparse_logits
    from shd_vision.config import compose_train
    from shd_vision.distill import Batch, Distiller
    from shd_vision.distill.base import active_terms, uses_teacher
    from shd_vision.engine.runtime import Runtime, autocast, keep_freed_memory
    from shd_vision.models.factory import build, input_size
    from shd_vision.models.taps import Outputs, Recorded
    from shd_vision.models.teacher import Teacher

    if keep_freed:
        keep_freed_memory()
    p = PRESETS[preset]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    cached = CACHED in kd
    kd = [p["distilled"] if o == DISTILLED else o for o in kd if o != CACHED]
    cfg = compose_train([*p["overrides"], *kd, *model_overrides])
    terms = active_terms(cfg.kd)
    student = build(cfg.model, p["classes"], "model")
    teacher_model = build(cfg.teacher, p["classes"], "teacher").eval().requires_grad_(False)
    distiller = Distiller(student, terms, teacher_model if uses_teacher(terms) else None)
    c, h, w = input_size(student)
    data_config = {"input_size": (c, h, w), "mean": (0.5,) * c, "std": (0.5,) * c}
    teacher = Teacher(teacher_model, ((0.5,) * input_size(teacher_model)[0],) * 2, data_config,
                      distiller.needs.teacher_capture, distiller.needs.teacher_token_grad)
    distiller.to(device).train()
    teacher.to(device)
    if channels_last:
        distiller.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    if compile_models:
        student.compile()
        teacher.model.compile()
    opt = torch.optim.AdamW(distiller.parameters(), lr=1e-4)
    x = torch.randn(batch, c, h, w, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(p["classes"], (batch,), device=device)
    rt = Runtime(device)
    use_teacher = uses_teacher(terms)
    if cached:  # what CachedTeacher does per step: a part row on the CPU, to the device, rebuilt
        with torch.no_grad(), autocast(rt, precision):
            values, indices, lse = sparse_logits(teacher(x).logits, 10)
        stored = (values.half().cpu(), indices.short().cpu(), lse.cpu())

    def teacher_outputs():
        if not cached:
            return teacher(x)
        v, i, lse_ = (t.to(device, non_blocking=True) for t in stored)
        return Outputs(dense_logits(v, i, lse_, p["classes"]), None, Recorded(), None, None)

    def step() -> None:
        with autocast(rt, precision):
            t_out = teacher_outputs() if use_teacher else None
            terms_out, _, _ = distiller(Batch(x, y, y), t_out)
            loss = sum(terms_out.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def teacher_forward() -> None:
        with autocast(rt, precision):
            teacher_outputs()

    return step, (teacher_forward if use_teacher else None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds per call over ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_mb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak`: CUDA allocations, or the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def run_isolated(script: Path, args: List[str]) -> Dict[str, Any]:
    """Run ``script --worker ARGS`` in a fresh interpreter (clean allocator and peak memory) and
    return the JSON it prints last, or ``{"error": "out of memory"}`` when the step did not fit."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0 and "OutOfMemoryError" in out.stderr:
        return {"error": "out of memory"}
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores)"
