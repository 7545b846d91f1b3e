"""DeiT token distillation (Touvron et al., 2021): methods.md §2.

The distilled DeiT student learns the labels through its class token (the ``ce`` term) and the
teacher through its distillation token (this term). ``kd=deit`` weighs them ``1 − α`` and ``α``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from shd_vision.config import greater_than, one_of
from shd_vision.distill.base import Method, Needs, TermConfig, register, upcast
from shd_vision.distill.logit import kd_loss
from shd_vision.errors import UserError


@dataclass
class DeiTConfig(TermConfig):
    mode: str = one_of("hard", "soft", default="hard")  # hard: CE with the teacher's argmax
    temperature: float = greater_than(0.0)  # soft mode only


@register("deit")
class DeiTDistillation(Method):
    """Hard: ``CE(dist_logits, argmax z_t)``; soft: ``kd_loss(dist_logits, z_t, T)``."""

    Config = DeiTConfig
    teacher_logits_only = True

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        if not hasattr(student, "set_distilled_training"):
            raise UserError(
                f"kd.terms.deit trains the student's distillation token, but the student "
                f"({student.pretrained_cfg.get('architecture')}) has none. Use a distilled DeiT: "
                "model=deit_tiny_distilled, deit_small_distilled or deit_base_distilled, or "
                "model=vit_fmnist_student_distilled on the embedded default.")

    def needs(self) -> Needs:
        return Needs(dist_token=True)

    def forward(self, batch, student, teacher):
        if self.cfg.mode == "hard":
            return F.cross_entropy(upcast(student.dist_logits), teacher.logits.argmax(-1)), {}
        return kd_loss(student.dist_logits, teacher.logits, self.cfg.temperature), {}
