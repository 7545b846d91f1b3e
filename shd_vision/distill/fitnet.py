"""Token-level feature-projector KD (FitNets, Romero et al., 2015): methods.md §3.

One ``Linear(D_s, D_t)`` per mapped block pair projects the student's block output onto the
teacher's; the loss is the MSE over the compared tokens (§6), averaged over the pairs. The
projectors train with the student and live in the checkpoint, not in the exported student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn

from shd_vision.distill.base import Method, Needs, TermConfig, register, upcast
from shd_vision.distill.mapping import align_tokens, method_pairs, select_tokens
from shd_vision.models.taps import Capture, token_layout


@dataclass
class FitNetConfig(TermConfig):
    layers: Any = MISSING  # uniform, last, or [[student_block, teacher_block], ...]


@register("fitnet")
class FitNet(Method):
    """``mean_pairs MSE(proj(F_s), F_t)`` on block outputs ``[B, N, D]``."""

    Config = FitNetConfig

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        self.pairs = method_pairs(cfg.layers, student, teacher, "kd.terms.fitnet.layers")
        self.projectors = nn.ModuleList(nn.Linear(student.embed_dim, teacher.embed_dim) for _ in self.pairs)
        self.student_layout, self.teacher_layout = token_layout(student), token_layout(teacher)

    def needs(self) -> Needs:
        return Needs(student=Capture(features=frozenset(s for s, _ in self.pairs)),
                     teacher_capture=Capture(features=frozenset(t for _, t in self.pairs)))

    def forward(self, batch, student, teacher):
        losses, logs = [], {}
        for (s, t), proj in zip(self.pairs, self.projectors):
            f_s = select_tokens(student.record.features[s], self.student_layout, self.teacher_layout, (1,))
            with torch.no_grad():
                f_t = align_tokens(upcast(teacher.record.features[t]), self.teacher_layout, self.student_layout)
            loss = F.mse_loss(upcast(proj(f_s)), f_t)
            losses.append(loss)
            logs[f"layer{s}"] = loss.detach()
        return torch.stack(losses).mean(), logs
