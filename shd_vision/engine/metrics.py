"""Validation: top-1, top-5, loss and the confusion matrix, summed over all processes."""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from shd_vision.engine.runtime import Runtime, all_reduce_sum, autocast
from shd_vision.errors import UserError


@torch.no_grad()
def evaluate(predict: Callable[[Tensor], Tensor], loader: DataLoader, num_classes: int, rt: Runtime,
             precision: str = "32", channels_last: bool = False, name: str = "the model") -> Dict[str, Any]:
    """Accuracy of ``predict`` (images to logits; a model in eval mode) on every image of
    ``loader``, sharded over the ranks so each image counts once.

    Returns:
        ``top1``, ``top5`` (percent), ``loss`` (mean CE), ``samples``, and ``confusion``
        ``[C, C]`` (rows: true class, columns: predicted).

    Raises:
        UserError: some logits were not finite (NaN's argmax is class 0: a plausible top-1);
            ``name`` says whose (the student, its EMA, the teacher, a checkpoint).
    """
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=rt.device)
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss, top-k hits, samples, non-finite rows
    for images, labels in loader:
        images = images.to(rt.device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(rt.device, non_blocking=True)
        with autocast(rt, precision):
            logits = predict(images).float()
        top = logits.topk(k, dim=-1).indices  # top-1 is its first column, so top-1 <= top-5 always
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (top == labels[:, None]).any(-1).sum()
        sums[2] += labels.numel()
        sums[3] += (~logits.isfinite().all(-1)).sum()
        confusion.view(-1).index_add_(0, labels * num_classes + top[:, 0], torch.ones_like(labels))
    all_reduce_sum(sums, rt)
    all_reduce_sum(confusion, rt)
    n = max(sums[2].item(), 1.0)
    if sums[3].item():
        raise UserError(f"{name} gave non-finite logits (NaN or inf) for {int(sums[3].item())} of {int(n)} "
                        "validation images, so its accuracy would be meaningless: the weights hold NaN or inf, "
                        "or the precision overflows (try trainer.precision=32 or bf16).")
    return {"top1": 100.0 * confusion.diag().sum().item() / n, "top5": 100.0 * sums[1].item() / n,
            "loss": sums[0].item() / n, "samples": int(sums[2].item()), "confusion": confusion.cpu()}


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Recall of each class, in percent, from a confusion matrix (rows: true class); NaN for a
    class without validation images (0% would read as a class the model always misses)."""
    counts = confusion.sum(1).double()
    return torch.where(counts > 0, 100.0 * confusion.diag().double() / counts.clamp(min=1), torch.nan)
