"""Manifold distillation (Hao et al., NeurIPS 2022): methods.md §9.

Relation-based feature KD for ViTs: instead of projecting student features onto the teacher's,
compare the two models' token-similarity structure (Gram matrices of L2-normalised patch
features) within each image, across the batch at each patch position, and over a random sample
of all the batch's tokens. Widths never meet, so no projector is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import Tensor

from shd_vision.config import at_least
from shd_vision.distill.base import Method, Needs, TermConfig, register, upcast
from shd_vision.distill.mapping import method_pairs, patch_tokens
from shd_vision.models.taps import Capture, token_layout

__all__ = ["manifold_relations", "random_relation", "Manifold"]


def _gram_gap(a: Tensor, b: Tensor) -> Tensor:
    """``mean (a aᵀ − b bᵀ)²`` over the last two axes of the Gram matrices and any leading ones."""
    return (a @ a.transpose(-2, -1) - b @ b.transpose(-2, -1)).pow(2).mean()


def manifold_relations(student_f: Tensor, teacher_f: Tensor) -> Tuple[Tensor, Tensor]:
    """Intra- and inter-image relation gaps of normalised features.

    Args:
        student_f: ``[B, N, Ds]`` the student's patch tokens.
        teacher_f: ``[B, N, Dt]`` the teacher's, on the same grid; no gradient flows into them.

    Returns:
        ``(intra, inter)``: ``mean (G_s − G_t)²`` with ``G = F Fᵀ`` per image ``[B, N, N]`` and per
        patch position across the batch ``[N, B, B]``, every token L2-normalised first.
    """
    s = F.normalize(upcast(student_f), dim=-1)
    t = F.normalize(upcast(teacher_f.detach()), dim=-1)
    return _gram_gap(s, t), _gram_gap(s.transpose(0, 1), t.transpose(0, 1))


def random_relation(student_f: Tensor, teacher_f: Tensor, index: Tensor) -> Tensor:
    """``mean (G_s − G_t)²`` over the tokens ``index`` ``[K]`` of the flattened batch ``[B·N]``."""
    s = F.normalize(upcast(student_f).flatten(0, 1)[index], dim=-1)
    t = F.normalize(upcast(teacher_f.detach()).flatten(0, 1)[index], dim=-1)
    return _gram_gap(s, t)


@dataclass
class ManifoldConfig(TermConfig):
    intra: float = at_least(0.0)  # w_intra
    inter: float = at_least(0.0)  # w_inter
    random: float = at_least(0.0)  # w_rand
    samples: int = at_least(1)  # K, tokens in the random relation (all of them when B·N is fewer)
    layers: Any = MISSING  # uniform, last, or [[student_block, teacher_block], ...]


@register("manifold")
class Manifold(Method):
    """``w_intra·intra + w_inter·inter + w_rand·rand`` on block outputs, averaged over the pairs.

    The random relation's tokens are drawn with the default generator of the features' device,
    which the checkpoint saves and restores, so a resumed run draws the same tokens (ours).
    """

    Config = ManifoldConfig

    def __init__(self, cfg: Any, student, teacher):
        super().__init__(cfg, student, teacher)
        self.pairs = method_pairs(cfg.layers, student, teacher, "kd.terms.manifold.layers")
        self.student_layout, self.teacher_layout = token_layout(student), token_layout(teacher)

    def needs(self) -> Needs:
        return Needs(student=Capture(features=frozenset(s for s, _ in self.pairs)),
                     teacher_capture=Capture(features=frozenset(t for _, t in self.pairs)))

    def forward(self, batch, student, teacher):
        cfg, losses, logs = self.cfg, [], {}
        for s, t in self.pairs:
            f_s = patch_tokens(student.record.features[s], self.student_layout, self.student_layout)
            with torch.no_grad():
                f_t = patch_tokens(teacher.record.features[t], self.teacher_layout, self.student_layout)
            intra, inter = manifold_relations(f_s, f_t)
            loss = cfg.intra * intra + cfg.inter * inter
            if cfg.random > 0:
                total = f_s.shape[0] * f_s.shape[1]
                index = torch.randperm(total, device=f_s.device)[:cfg.samples]
                rand = random_relation(f_s, f_t, index)
                loss = loss + cfg.random * rand
                logs[f"layer{s}_rand"] = rand.detach()
            logs[f"layer{s}_intra"], logs[f"layer{s}_inter"] = intra.detach(), inter.detach()
            losses.append(loss)
        return torch.stack(losses).mean(), logs
