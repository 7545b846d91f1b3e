"""Logit KD (Hinton et al., 2015): methods.md §1."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from shd_vision.config import greater_than
from shd_vision.distill.base import Method, Needs, TermConfig, register, upcast


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``T² · mean_b KL(softmax(z_t/T) ‖ softmax(z_s/T))`` (methods.md §1).

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]``; no gradient flows into them.
        temperature: ``T > 0``.

    Returns:
        A scalar: the KL summed over classes, averaged over the batch (``batchmean``), times T².
    """
    t = temperature
    log_p_s = F.log_softmax(upcast(student_logits) / t, dim=-1)
    log_p_t = F.log_softmax(upcast(teacher_logits.detach()) / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


@dataclass
class LogitConfig(TermConfig):
    temperature: float = greater_than(0.0)


@register("logit")
class LogitKD(Method):
    """``kd_loss`` between the student's logits and the teacher's."""

    Config = LogitConfig
    teacher_logits_only = True

    def needs(self) -> Needs:
        return Needs()

    def forward(self, batch, student, teacher):
        return kd_loss(student.logits, teacher.logits, self.cfg.temperature), {}


