"""Attribution-driven KD (AD-KD; Wu et al., ACL 2023), adapted to ViT patch tokens: methods.md §7.

The student learns which tokens the teacher's decision rests on: integrated gradients of
``F_c = −log softmax(z)_c`` with respect to the token embeddings entering the first block give a
per-token attribution for each model, and the student's (L2-normalised) attributions are pulled
towards the teacher's. The student's gradients are taken with ``create_graph=True``, so training
back-propagates through them (second order); the teacher's are a constant target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import Tensor, nn

from shd_vision.config import at_least, greater_than
from shd_vision.distill.base import Method, Needs, TermConfig, register, upcast
from shd_vision.distill.mapping import align_tokens, select_tokens
from shd_vision.errors import UserError
from shd_vision.models.taps import Capture, token_layout, vit_blocks

VIEWS = ("gold", "topk")


def token_norms(ig: Tensor, top_k: Optional[int] = None) -> Tensor:
    """``‖TopK_j |IG|‖₂`` per token: ``[B, N, D]`` to ``[B, N]`` (``top_k`` None: all dimensions)."""
    magnitude = ig.abs()
    if top_k is not None and top_k < ig.shape[-1]:
        magnitude = magnitude.topk(top_k, dim=-1).values
    return torch.linalg.vector_norm(magnitude, dim=-1)


def token_attribution(ig: Tensor, top_k: Optional[int] = None) -> Tensor:
    """Per-token attributions, L2-normalised over the tokens (methods.md §7).

    Args:
        ig: ``[B, N, D]`` integrated gradients of the token embeddings.
        top_k: keep each token's ``top_k`` largest ``|IG|`` dimensions (the teacher's; None: all).

    Returns:
        ``[B, N]``, each row of unit L2 norm (or zero).
    """
    return F.normalize(token_norms(ig, top_k), dim=-1)


def attribution_loss(student_attr: Tensor, teacher_attr: Tensor) -> Tensor:
    """``Σ_{b,i} (â_s − â_t)² / #{â_t ≠ 0}`` for normalised attributions ``[B, N]``."""
    return (student_attr - teacher_attr.detach()).pow(2).sum() / (teacher_attr != 0).sum().clamp_min(1)


def logits_from_tokens(model: nn.Module, tokens: Tensor) -> Tensor:
    """What a timm ViT predicts from the token sequence entering its first block, ``[B, C]`` (a
    distilled DeiT in distilled training gives its class-token head)."""
    out = model.forward_head(model.norm(model.blocks(tokens)))
    return out[0] if isinstance(out, tuple) else out


def integrated_gradients(logits_fn: Callable[[Tensor], Tensor], tokens: Tensor, classes: Tensor, steps: int,
                         create_graph: bool = False, logits: Optional[Tensor] = None) -> Tensor:
    """Integrated gradients of ``F_c = −log softmax(z)_c`` along the path from 0 to ``tokens``.

    ``IG = E ⊙ (1/m) Σ_{k=1..m} ∂F_c(α_k E)/∂(α_k E)`` with ``α_k = k/m`` (a right Riemann sum;
    ``m = 1`` is gradient × input).

    Args:
        logits_fn: tokens ``[B, N, D]`` to logits ``[B, C]``.
        tokens: ``E`` ``[B, N, D]``, part of a graph to ``logits`` if those are given.
        classes: ``[B]`` the class ``c`` of each sample.
        steps: ``m``.
        create_graph: keep the graph of the gradients (the student's, for second-order training).
        logits: ``logits_fn(tokens)`` when already computed (saves the ``α = 1`` forward).

    Returns:
        ``[B, N, D]``.
    """
    total = torch.zeros_like(tokens)
    with torch.enable_grad():
        for k in range(1, steps + 1):
            if k == steps and logits is not None:
                x, z = tokens, logits
            else:
                x = tokens * (k / steps)
                if not x.requires_grad:  # tokens outside any graph: differentiate at the point
                    x.requires_grad_(True)
                z = logits_fn(x)
            f = -F.log_softmax(upcast(z), dim=-1).gather(1, classes[:, None]).sum()
            (grad,) = torch.autograd.grad(f, x, create_graph=create_graph, retain_graph=True)
            total = total + grad
    return tokens * total / steps


@dataclass
class ADKDConfig(TermConfig):
    steps: int = at_least(1)  # m, the integrated-gradient steps (1: gradient x input)
    top_k: Optional[int] = greater_than(0, None)  # teacher dimensions kept per token; null: all
    views: List[str] = MISSING  # gold (the label) and/or topk (the teacher's top classes)
    top_classes: int = greater_than(0)  # K of the topk view


@register("adkd")
class ADKD(Method):
    """Sum over views of ``attribution_loss`` between the student's and the teacher's token
    attributions; a view is one class per sample (the label, or one of the teacher's top K)."""

    Config = ADKDConfig

    def __init__(self, cfg, student, teacher):
        super().__init__(cfg, student, teacher)
        bad = [v for v in cfg.views if v not in VIEWS]
        if bad or not cfg.views:
            raise UserError(f"kd.terms.adkd.views={list(cfg.views)} must be a non-empty list of: "
                            f"{', '.join(VIEWS)}.")
        for model, role in ((student, "student"), (teacher, "teacher")):
            vit_blocks(model, role)  # attributions are taken on ViT token embeddings
        self.student_layout, self.teacher_layout = token_layout(student), token_layout(teacher)

    def needs(self) -> Needs:
        return Needs(student=Capture(tokens=True), teacher_capture=Capture(tokens=True), teacher_token_grad=True,
                     second_order=True)

    def _view_classes(self, batch, teacher) -> List[Tensor]:
        classes = []
        if "gold" in self.cfg.views:
            classes.append(batch.labels)
        if "topk" in self.cfg.views:
            k = min(self.cfg.top_classes, teacher.logits.shape[-1])
            classes += list(teacher.logits.detach().topk(k, dim=-1).indices.unbind(-1))
        return classes

    def forward(self, batch, student, teacher):
        cfg, losses = self.cfg, []
        s_tokens, t_tokens = student.record.tokens, teacher.record.tokens
        for classes in self._view_classes(batch, teacher):
            ig_t = integrated_gradients(lambda x: logits_from_tokens(teacher.model, x), t_tokens, classes,
                                            cfg.steps, logits=teacher.logits)
            a_t = F.normalize(align_tokens(token_norms(ig_t.detach(), cfg.top_k), self.teacher_layout,
                                           self.student_layout), dim=-1)
            ig_s = integrated_gradients(lambda x: logits_from_tokens(student.model, x), s_tokens, classes,
                                        cfg.steps, create_graph=True, logits=student.logits)
            a_s = F.normalize(select_tokens(token_norms(ig_s), self.student_layout, self.teacher_layout, (1,)),
                              dim=-1)
            losses.append(attribution_loss(a_s, a_t))
        return torch.stack(losses).sum(), {}
