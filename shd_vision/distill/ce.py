"""Cross-entropy with the labels: ``kd=none``, and the label term of every other method."""

from __future__ import annotations

import torch.nn.functional as F

from shd_vision.distill.base import Method, Needs, register, upcast


@register("ce")
class CrossEntropy(Method):
    """``CE(z_s, y)``; ``y`` is a class index or, under mixup/label smoothing, a distribution.

    For a distilled DeiT student trained with its distillation token, ``z_s`` is the
    class-token head (methods.md §2).
    """

    uses_teacher = False

    def needs(self) -> Needs:
        return Needs()

    def forward(self, batch, student, teacher):
        return F.cross_entropy(upcast(student.logits), batch.targets), {}
