"""Squeezing-Heads Distillation (SHD; Bing, Li, Liang, 2025): methods.md §4.

Groups of teacher heads are squeezed into one attention map per student head by a
data-dependent convex combination (:func:`squeeze_weights`), and the student's
temperature-softened attention is pulled towards it with KL (:func:`attention_kl`). No projector,
no change to either model.

Circuits are kept in factored form inside the squeeze: head ``h``'s circuit is
``X_h = V_h W_O,hᵀ`` with ``V_h`` ``[N, d_h]``, so a merged head's circuit is a concatenation of
factors of rank ``k·d_h`` and every ``M X`` product costs ``N²·k·d_h`` instead of ``N²·D``. The
public :func:`squeeze_weights` takes full circuits and runs the same merge code (ours).

The squeeze and the loss take any leading dimensions (``...`` below). On a GPU, SHD stacks all
the block pairs of one shape and runs them as one batch, since a loop over 12 pairs launched
thousands of small kernels and left a GPU idle for half of a DeiT step; on a CPU, where launches
are cheap, the copies into the stack cost more than they save and the pairs run one by one
(docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import Tensor

from shd_vision.config import greater_than, one_of
from shd_vision.distill.base import Method, Needs, TermConfig, register, upcast
from shd_vision.distill.mapping import align_maps, layer_pairs, method_pairs, select_tokens
from shd_vision.errors import UserError
from shd_vision.models.taps import AttentionRecord, Capture, TokenLayout, token_layout, vit_blocks

__all__ = ["attention_kl", "attention_kl_rows", "attention_mse", "layer_pairs", "soften", "squeeze_record",
           "squeeze_weights", "squeezed_targets", "SHD"]

MERGES = ("progressive", "group", "mean", "select")
LOSSES = ("kl", "mse")


@dataclass
class _Circuit:
    """A circuit ``X = V Wᵀ`` in factors ``V`` ``[..., N, r]`` and ``W`` ``[..., D, r]`` (leading
    dimensions broadcast); ``W`` None means ``X = V`` (full circuits)."""

    v: Tensor
    w: Optional[Tensor]

    def __add__(self, other: "_Circuit") -> "_Circuit":
        if self.w is None:
            return _Circuit(self.v + other.v, None)
        return _Circuit(torch.cat([self.v, other.v], -1), torch.cat([self.w, other.w], -1))

    def left(self, m: Tensor) -> "_Circuit":
        """``M X`` for maps ``M`` ``[..., N, N]``."""
        return _Circuit(m @ self.v, self.w)

    def __neg__(self) -> "_Circuit":
        return _Circuit(-self.v, self.w)


def _inner(a: _Circuit, b: _Circuit) -> Tensor:
    """Frobenius inner products ``⟨A, B⟩`` per sample, ``[...]``."""
    if a.w is None:
        return (a.v * b.v).sum((-2, -1))
    return ((a.v.transpose(-2, -1) @ b.v) * (a.w.transpose(-2, -1) @ b.w)).sum((-2, -1))


def _pair_inners(u: _Circuit, v: _Circuit, both: _Circuit, delta: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``⟨Δ X_u, Δ X_u⟩``, ``⟨Δ X_u, Δ X_v⟩`` and ``⟨Δ X_v, Δ X_v⟩`` per sample, given ``both = u + v``;
    in factors, all three are blocks of one Gram matrix of ``Δ [V_u V_v]`` and ``[W_u W_v]``, the
    factors of ``both`` (two products, not six)."""
    if u.w is None:
        d_u, d_v = u.left(delta), v.left(delta)
        return _inner(d_u, d_u), _inner(d_u, d_v), _inner(d_v, d_v)
    r = u.v.shape[-1]
    dv = delta @ both.v
    g = (dv.transpose(-2, -1) @ dv) * (both.w.transpose(-2, -1) @ both.w)  # [..., r_u + r_v, r_u + r_v]
    return g[..., :r, :r].sum((-2, -1)), g[..., :r, r:].sum((-2, -1)), g[..., r:, r:].sum((-2, -1))


@dataclass
class _Head:
    map: Optional[Tensor]  # [..., N, N], a convex combination of teacher maps (None: not needed)
    circuit: Optional[_Circuit]
    weights: Tensor  # [..., Ht], that combination


def _merge_pair(u: _Head, v: _Head, weights_only: bool = False) -> _Head:
    """Merge two heads with the least-squares ``α`` of methods.md §4.

    With ``Δ = M_u − M_v`` and ``S = X_u + X_v``: ``Y − P_v = Δ X_u`` and ``P_u − P_v = Δ S``, so
    ``α* = ⟨Δ X_u, Δ S⟩ / ‖Δ S‖²``, clamped to ``[0, 1]``; 0.5 when ``‖Δ S‖`` is negligible next to
    ``‖Δ X_u‖ + ‖Δ X_v‖`` (ours). Both come from the three products of ``Δ X_u`` and ``Δ X_v``
    (:func:`_pair_inners`).
    ``weights_only``: the last round, whose merged maps and circuits nothing reads.
    """
    delta = u.map - v.map
    both = u.circuit + v.circuit  # the merged head's circuit X_u + X_v
    uu, uv, vv = _pair_inners(u.circuit, v.circuit, both, delta)
    num, den = uu + uv, uu + 2 * uv + vv
    alpha = torch.where(den > 1e-9 * (uu + vv), num / den.clamp_min(torch.finfo(den.dtype).tiny),
                        torch.full_like(den, 0.5)).clamp(0.0, 1.0)
    a = alpha[..., None]
    weights = v.weights + a * (u.weights - v.weights)
    if weights_only:
        return _Head(None, None, weights)
    return _Head(v.map + a[..., None] * delta, both, weights)


def _progressive(heads: List[_Head], num_student_heads: int) -> List[_Head]:
    """Rounds of adjacent-pair merges; each merges ``min(H − Hs, ⌊H/2⌋)`` leading pairs."""
    while len(heads) > num_student_heads:
        n = min(len(heads) - num_student_heads, len(heads) // 2)
        last = len(heads) - n == num_student_heads
        heads = [_merge_pair(heads[2 * i], heads[2 * i + 1], last) for i in range(n)] + heads[2 * n:]
    return heads


def balanced_groups(num_teacher_heads: int, num_student_heads: int) -> List[List[int]]:
    """Contiguous groups of teacher heads whose sizes differ by at most one, larger first."""
    q, rem = divmod(num_teacher_heads, num_student_heads)
    sizes = [q + 1] * rem + [q] * (num_student_heads - rem)
    starts = [sum(sizes[:g]) for g in range(num_student_heads)]
    return [list(range(a, a + n)) for a, n in zip(starts, sizes)]


def _group_weights(heads: List[_Head]) -> Tensor:
    """Weights ``w`` (``Σ w = 1``) minimising ``‖Σ_h A_h X_h − (Σ_h w_h A_h)(Σ_h X_h)‖²``.

    With the last head as reference, ``w_k = 1 − Σ_{i<k} w_i`` and the residual is
    ``F − Σ_{i<k} w_i E_i`` with ``E_i = (A_i − A_k) S`` and ``F = Σ_{i<k} (A_i − A_k) X_i``: an
    unconstrained least-squares problem (the KKT solution). A ridge towards equal weights, of
    relative size 1e-9, makes degenerate groups (identical maps) equal-weighted (ours). Negative
    weights are then set to 0 and the rest renormalised (ours).

    Returns:
        ``[..., k]``.
    """
    k = len(heads)
    if k == 1:
        return torch.ones_like(heads[0].map[..., 0, :1])
    ref = heads[-1]
    s = heads[0].circuit
    for h in heads[1:]:
        s = s + h.circuit
    deltas = [h.map - ref.map for h in heads[:-1]]
    e = [s.left(d) for d in deltas]
    f = heads[0].circuit.left(deltas[0])
    for h, d in zip(heads[1:-1], deltas[1:]):
        f = f + h.circuit.left(d)
    gram = torch.stack([torch.stack([_inner(a, b) for b in e], -1) for a in e], -2)  # [..., k-1, k-1]
    rhs = torch.stack([_inner(a, f) for a in e], -1)  # [..., k-1]
    eye = torch.eye(k - 1, dtype=gram.dtype, device=gram.device)
    ridge = 1e-9 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)[..., None, None]
    w = torch.linalg.solve(gram + ridge * eye, (rhs + ridge[..., 0] / k)[..., None])[..., 0]
    w = torch.cat([w, 1 - w.sum(-1, keepdim=True)], -1).clamp_min(0)
    total = w.sum(-1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(torch.finfo(w.dtype).tiny), torch.full_like(w, 1 / k))


def _select(heads: List[_Head]) -> Tensor:
    """One-hot weights ``[..., k]`` on the head whose map alone best explains the group: per sample,
    ``argmin_h ‖Σ_j A_j X_j − A_h S‖²`` with ``S = Σ_j X_j`` (ties: the lowest index).

    Factored circuits are multiplied out once the group's rank ``k·r`` reaches ``D``: each
    residual's rank is ``2k·r``, so its inner product in factors costs ``k²`` times a head's
    (with a group of 6 the training step took 1.5x progressive squeezing's)."""
    circuits = [h.circuit for h in heads]
    c = circuits[0]
    if c.w is not None and len(heads) * c.v.shape[-1] >= c.w.shape[-2]:
        circuits = [_Circuit(x.v @ x.w.transpose(-2, -1), None) for x in circuits]
    s, y = circuits[0], circuits[0].left(heads[0].map)
    for h, x in zip(heads[1:], circuits[1:]):
        s, y = s + x, y + x.left(h.map)
    residuals = []
    for h in heads:
        r = y + -s.left(h.map)
        residuals.append(_inner(r, r))
    best = torch.stack(residuals, -1).argmin(-1)  # argmin returns the first of equal minima
    return F.one_hot(best, len(heads)).to(heads[0].map.dtype)


def check_head_counts(num_student_heads: int, num_teacher_heads: int, where: str = "") -> None:
    """A student with more heads than its teacher needs a whole multiple of them."""
    if num_student_heads > num_teacher_heads and num_student_heads % num_teacher_heads:
        raise UserError(f"SHD cannot map {num_teacher_heads} teacher heads to {num_student_heads} "
                        f"student heads{where}: a student with more heads than its teacher needs a "
                        f"multiple of the teacher's count ({num_teacher_heads}, {2 * num_teacher_heads}, "
                        "...); with fewer heads any count works.")


def _squeeze(attn: Tensor, circuits: List[_Circuit], num_student_heads: int, merge: str) -> Tensor:
    """``W`` ``[..., Hs, Ht]`` for maps ``attn`` ``[..., Ht, N, N]`` and one circuit per head."""
    lead, ht = attn.shape[:-3], attn.shape[-3]
    check_head_counts(num_student_heads, ht)
    if merge not in MERGES:
        raise UserError(f"merge={merge} is unknown; use one of: {', '.join(MERGES)}.")
    eye = torch.eye(ht, dtype=attn.dtype, device=attn.device)
    if num_student_heads >= ht:  # teacher head j supervises student heads j·r … j·r+r−1
        r = num_student_heads // ht
        return eye.repeat_interleave(r, dim=0).expand(*lead, -1, -1).clone()
    heads = [_Head(attn[..., h, :, :], circuits[h], eye[h].expand(*lead, -1)) for h in range(ht)]
    if merge == "progressive":
        return torch.stack([h.weights for h in _progressive(heads, num_student_heads)], -2)
    w = torch.zeros(*lead, num_student_heads, ht, dtype=attn.dtype, device=attn.device)
    for g, group in enumerate(balanced_groups(ht, num_student_heads)):
        if merge == "mean":
            w[..., g, group] = 1.0 / len(group)
        elif merge == "select":
            w[..., g, group] = _select([heads[h] for h in group])
        else:
            w[..., g, group] = _group_weights([heads[h] for h in group])
    return w


@torch.no_grad()
def squeeze_weights(attn: Tensor, circuits: Tensor, num_student_heads: int, merge: str = "progressive") -> Tensor:
    """How each student head's target map combines the teacher's heads (methods.md §4).

    Args:
        attn: ``[B, Ht, N, N]`` teacher attention maps (softmax of the scores, not softened).
        circuits: ``[B, Ht, N, D]`` per-head circuits ``X_h = V_h W_O,hᵀ``.
        num_student_heads: ``Hs``; more than ``Ht`` only as a whole multiple of it.
        merge: ``progressive`` (rounds of adjacent-pair merges), ``group`` (balanced groups,
            least-squares weights), ``mean`` (balanced groups, equal weights) or ``select``
            (balanced groups, the one head that best explains its group; the paper's "hard
            selection" ablation).

    Returns:
        ``W`` ``[B, Hs, Ht]``: rows on the simplex, zero outside each student head's group.
    """
    return _squeeze(attn, [_Circuit(circuits[:, h], None) for h in range(attn.shape[1])],
                    num_student_heads, merge)


def attention_kl(student_scores: Tensor, teacher_maps: Tensor, temperature: float) -> Tensor:
    """``τ² · mean_{b, g, rows} KL(T_g,row ‖ softmax(Z_s,g,row / τ))``, KL summed over keys.

    Args:
        student_scores: ``[B, H, N, N]`` pre-softmax scores ``q kᵀ · scale`` of the student.
        teacher_maps: ``[B, H, N, N]`` target maps ``T_g`` (rows sum to 1; already softened).
        temperature: ``τ > 0``.

    Returns:
        A scalar; gradients reach the student's scores only.
    """
    return attention_kl_rows(student_scores, teacher_maps, temperature).mean()


def attention_mse(student_scores: Tensor, teacher_maps: Tensor, temperature: float) -> Tensor:
    """The ``loss=mse`` ablation: ``(softmax(Z_s / τ) − T)²`` per row and key, ``[..., N, N]`` (no ``τ²``)."""
    scores = upcast(student_scores)
    q = (scores if temperature == 1 else scores / temperature).softmax(-1)
    return (q - upcast(teacher_maps.detach())).pow(2)


def attention_kl_rows(student_scores: Tensor, teacher_maps: Tensor, temperature: float) -> Tensor:
    """:func:`attention_kl` before the mean: ``τ² · KL`` per row, ``[..., N]`` for ``[..., N, N]``."""
    return _AttentionKL.apply(upcast(student_scores), upcast(teacher_maps.detach()), temperature)


class _AttentionKL(torch.autograd.Function):
    """``τ² · KL(p ‖ softmax(z / τ))`` per row with its gradient ``τ (softmax(z / τ) Σp − p)``
    computed in the forward (ours): the backward keeps one ``N×N`` map per call instead of the
    target and ``log q``, so the targets are freed as soon as each block pair's loss is known
    (autograd's graph kept both for every pair until the backward)."""

    @staticmethod
    def forward(ctx, scores: Tensor, p: Tensor, temperature: float) -> Tensor:
        log_q = F.log_softmax(scores if temperature == 1 else scores / temperature, dim=-1)
        # p log p with 0 log 0 = 0, as xlogy, which on CPUs runs ~10x slower than a clamped log
        rows = p.clamp_min(torch.finfo(p.dtype).tiny).log_().sub_(log_q).mul_(p).sum(-1)
        grad = log_q.exp_().mul_(p.sum(-1, keepdim=True)).sub_(p)
        ctx.save_for_backward(grad.mul_(temperature) if temperature != 1 else grad)
        return rows.mul_(temperature ** 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_rows.unsqueeze(-1), None, None


def soften(maps: Tensor, temperature: float) -> Tensor:
    """``softmax(Z / τ)`` from ``p = softmax(Z)`` ``[..., N]``: ``p^(1/τ) / Σ p^(1/τ)``, since the
    normaliser of ``Z`` cancels (a plain division by the row sum: F.normalize took ~10x longer on CPUs)."""
    if temperature == 1:
        return maps
    soft = maps.pow(1 / temperature)
    return soft.div_(soft.sum(-1, keepdim=True))


@torch.no_grad()
def squeeze_record(record: AttentionRecord, num_student_heads: int, merge: str) -> Tuple[Tensor, Tensor]:
    """A teacher block's maps ``softmax(Z_t)`` ``[..., B, Ht, N, N]`` (float32 at least) and its
    squeeze weights ``W`` ``[..., B, Hs, Ht]``, from the record's factored circuits."""
    with torch.autocast(record.q.device.type, enabled=False):  # the least squares need float32
        maps = upcast(record.maps())
        h, d_h = record.v.shape[-3], record.v.shape[-1]
        v, w_o = upcast(record.v), upcast(record.proj_weight)
        circuits = [_Circuit(v[..., i, :, :], w_o[..., i * d_h:(i + 1) * d_h]) for i in range(h)]
        return maps, _squeeze(maps, circuits, num_student_heads, merge)


@torch.no_grad()
def squeezed_targets(record: AttentionRecord, num_student_heads: int, merge: str, temperature: float,
                     teacher_layout: TokenLayout, student_layout: TokenLayout) -> Tuple[Tensor, Tensor]:
    """A teacher block's squeezed, softened maps on the student's tokens; a stacked record
    (:meth:`AttentionRecord.stack`) gives every block of the stack at once.

    Returns:
        ``T`` ``[..., B, Hs, N', N']`` (``T_g = Σ_h W[g, h] softmax(Z_t,h / τ)``, then the tokens
        of methods.md §6) and the squeeze weights ``W`` ``[..., B, Hs, Ht]``.
    """
    with torch.autocast(record.q.device.type, enabled=False):  # float32, as the weights
        maps, w = squeeze_record(record, num_student_heads, merge)
        target = torch.einsum("...gh,...hqk->...gqk", w, soften(maps, temperature))
        return align_maps(target, teacher_layout, student_layout), w


@dataclass
class SHDConfig(TermConfig):
    temperature: float = greater_than(0.0)
    merge: str = one_of(*MERGES, default="progressive")
    loss: str = one_of(*LOSSES, default="kl")  # mse: the paper's ablation
    layers: Any = MISSING  # uniform, last, or [[student_block, teacher_block], ...]


@register("shd")
class SHD(Method):
    """KL between each mapped student block's attention and the teacher's squeezed maps,
    averaged over the block pairs; logs each pair's loss and how the squeeze weights spread."""

    Config = SHDConfig
    stack_pairs: Optional[bool] = None  # stack the block pairs of one shape; None: on GPUs only

    def __init__(self, cfg: Any, student, teacher):
        super().__init__(cfg, student, teacher)
        s_blocks, t_blocks = vit_blocks(student, "student"), vit_blocks(teacher, "teacher")
        self.pairs = method_pairs(cfg.layers, student, teacher, "kd.terms.shd.layers")
        self.heads = {}
        for s, t in self.pairs:
            hs, ht = s_blocks[s].attn.num_heads, t_blocks[t].attn.num_heads
            check_head_counts(hs, ht, f" (student block {s}, teacher block {t})")
            self.heads[s] = hs
        self.student_layout, self.teacher_layout = token_layout(student), token_layout(teacher)

    def needs(self) -> Needs:
        return Needs(student=Capture(attention=frozenset(s for s, _ in self.pairs)),
                     teacher_capture=Capture(attention=frozenset(t for _, t in self.pairs)))

    def forward(self, batch, student, teacher):
        cfg = self.cfg
        stack = self.stack_pairs
        if stack is None:
            stack = teacher.record.attention[self.pairs[0][1]].v.device.type == "cuda"
        groups: Dict[Tuple, List[Tuple[int, int]]] = {}  # pairs run as one batch
        for s, t in self.pairs:
            t_rec, s_rec = teacher.record.attention[t], student.record.attention[s]
            key = (t_rec.v.shape, t_rec.proj_weight.shape, s_rec.q.shape, s_rec.scale) if stack else (s, t)
            groups.setdefault(key, []).append((s, t))
        losses, w_max, w_eff, logs = [], [], [], {}
        for pairs in groups.values():
            t_rec = AttentionRecord.stack([teacher.record.attention[t] for _, t in pairs])
            s_rec = AttentionRecord.stack([student.record.attention[s] for s, _ in pairs])
            target, w = squeezed_targets(t_rec, self.heads[pairs[0][0]], cfg.merge, cfg.temperature,
                                         self.teacher_layout, self.student_layout)  # [P, B, Hs, N', N']
            scores = select_tokens(s_rec.scores(), self.student_layout, self.teacher_layout, dims=(-2, -1))
            per_row = attention_kl_rows if cfg.loss == "kl" else attention_mse
            loss = per_row(scores, target, cfg.temperature).flatten(1).mean(1)  # [P]
            losses.append(loss)
            logs.update({f"layer{s}": x for (s, _), x in zip(pairs, loss.detach())})
            w_max.append(w.max(-1).values.flatten(1).mean(1))
            w_eff.append((1 / w.pow(2).sum(-1)).flatten(1).mean(1))
        # w_max: mean largest weight per student head (1: one teacher head dominates);
        # w_eff: effective number of teacher heads per student head (the group size when balanced)
        logs["w_max"] = torch.cat(w_max).mean()
        logs["w_eff"] = torch.cat(w_eff).mean()
        return torch.cat(losses).mean(), logs
