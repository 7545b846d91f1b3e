"""MiniLMv2 attention-relation distillation (Wang et al., 2021): methods.md §8.

The projector-free answer to different head counts that SHD is measured against: both models'
queries, keys and values (heads concatenated) are re-split into the same number of relation
heads, each model with its own head width, and the student's scaled dot-product relations
``softmax(X_a X_aᵀ / √d_r)`` are pulled to the teacher's with KL.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd, sqrt
from typing import Any, List

import torch
from omegaconf import MISSING
from torch import Tensor

from shd_vision.config import at_least
from shd_vision.distill.base import Method, Needs, TermConfig, register, upcast
from shd_vision.distill.mapping import align_maps, method_pairs, select_tokens
from shd_vision.distill.shd import attention_kl_rows
from shd_vision.errors import UserError
from shd_vision.models.taps import Capture, token_layout

__all__ = ["relation_kl", "relation_scores", "MiniLM"]

RELATIONS = {"qq": 0, "kk": 1, "vv": 2}  # which third of a block's qkv output the relation reads


def relation_scores(x: Tensor, relation_heads: int) -> Tensor:
    """Scaled dot products ``X_a X_aᵀ / √d_r`` of ``x`` ``[B, N, D]`` re-split into ``A_r`` heads of
    width ``d_r = D / A_r``: ``[B, A_r, N, N]`` (pre-softmax)."""
    b, n, d = x.shape
    xa = upcast(x).reshape(b, n, relation_heads, d // relation_heads).transpose(1, 2)
    return (xa / sqrt(d // relation_heads)) @ xa.transpose(-2, -1)


def relation_kl(student_x: Tensor, teacher_x: Tensor, relation_heads: int) -> Tensor:
    """``(1/(A_r·N)) Σ_a Σ_rows KL(R^t_a,row ‖ R^s_a,row)``, averaged over the batch.

    Args:
        student_x: ``[B, N, Ds]`` the student's queries, keys or values (heads concatenated).
        teacher_x: ``[B, N, Dt]`` the teacher's, on the same tokens.
        relation_heads: ``A_r``; must divide ``Ds`` and ``Dt``.

    Returns:
        A scalar; gradients reach ``student_x`` only.
    """
    check_relation_heads(relation_heads, student_x.shape[-1], teacher_x.shape[-1])
    with torch.no_grad():
        target = relation_scores(teacher_x, relation_heads).softmax(-1)
    return attention_kl_rows(relation_scores(student_x, relation_heads), target, 1.0).mean()


def check_relation_heads(relation_heads: int, student_width: int, teacher_width: int) -> None:
    if student_width % relation_heads or teacher_width % relation_heads:
        common = gcd(student_width, teacher_width)
        valid = [a for a in range(1, common + 1) if common % a == 0]
        raise UserError(f"kd.terms.minilm.relation_heads={relation_heads} must divide both widths it "
                        f"re-splits, the student's {student_width} and the teacher's {teacher_width}; "
                        f"valid values: {', '.join(map(str, valid))}.")


@dataclass
class MiniLMConfig(TermConfig):
    relations: List[str] = MISSING  # any of qq, kk, vv
    relation_heads: int = at_least(1)
    layers: Any = MISSING  # last (MiniLMv2's choice), uniform, or [[student_block, teacher_block], ...]


@register("minilm")
class MiniLM(Method):
    """``Σ_relations relation_kl`` per mapped block pair, averaged over the pairs; prefix tokens and
    patch grids as methods.md §6 (the teacher's relation maps aligned like attention maps)."""

    Config = MiniLMConfig

    def __init__(self, cfg: Any, student, teacher):
        super().__init__(cfg, student, teacher)
        bad = [r for r in cfg.relations if r not in RELATIONS]
        if bad or not cfg.relations:
            raise UserError(f"kd.terms.minilm.relations={list(cfg.relations)} is invalid; give a "
                            f"non-empty list drawn from {', '.join(RELATIONS)}.")
        self.pairs = method_pairs(cfg.layers, student, teacher, "kd.terms.minilm.layers")
        check_relation_heads(cfg.relation_heads, student.embed_dim, teacher.embed_dim)
        self.student_layout, self.teacher_layout = token_layout(student), token_layout(teacher)

    def needs(self) -> Needs:
        return Needs(student=Capture(attention=frozenset(s for s, _ in self.pairs)),
                     teacher_capture=Capture(attention=frozenset(t for _, t in self.pairs)))

    def forward(self, batch, student, teacher):
        a_r, losses, logs = self.cfg.relation_heads, [], {}
        for s, t in self.pairs:
            qkv_s, qkv_t = student.record.attention[s].qkv, teacher.record.attention[t].qkv
            loss = 0.0
            for relation in self.cfg.relations:
                i = RELATIONS[relation]
                x_s, x_t = qkv_s.chunk(3, -1)[i], qkv_t.chunk(3, -1)[i]
                with torch.no_grad():
                    target = align_maps(relation_scores(x_t, a_r).softmax(-1), self.teacher_layout,
                                        self.student_layout)
                # dropping a student's key columns before the softmax renormalises its rows
                scores = select_tokens(relation_scores(x_s, a_r), self.student_layout,
                                       self.teacher_layout, dims=(-2, -1))
                part = attention_kl_rows(scores, target, 1.0).mean()
                logs[f"layer{s}_{relation}"] = part.detach()
                loss = loss + part
            losses.append(loss)
        return torch.stack(losses).mean(), logs
