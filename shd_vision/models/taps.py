"""Reading a timm ViT's internals during its normal forward: attention, block outputs, tokens.

Hooks sit only on the blocks a method asks for. For a student, attention is read from the output
of the block's ``attn.qkv`` projection, so the block keeps timm's fused
``scaled_dot_product_attention``; the scores ``q kᵀ · scale`` are then formed once, on demand and
with gradient, for the loss (methods.md §4, Cost). They are the very scores the forward attends
with: same ``q``/``k`` tensors, same ``q_norm``/``k_norm``, before masking and dropout.

A frozen teacher's maps are needed whole anyway (the squeeze reads them), so its captured blocks
take timm's unfused path and their softmax output is recorded as it is computed, instead of being
computed a second time from ``q`` and ``k``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
from timm.layers import Attention
from torch import Tensor, nn

from shd_vision.errors import UserError


@dataclass(frozen=True)
class Capture:
    """What to record from one model during a forward."""

    attention: FrozenSet[int] = frozenset()  # blocks whose q, k, v (and W_O) are kept
    features: FrozenSet[int] = frozenset()  # blocks whose outputs [B, N, D] are kept
    tokens: bool = False  # the token sequence entering the first block, [B, N, D]

    def __or__(self, other: "Capture") -> "Capture":
        return Capture(self.attention | other.attention, self.features | other.features,
                       self.tokens or other.tokens)


@dataclass(frozen=True)
class TokenLayout:
    """How a ViT's token sequence is laid out: prefix tokens, then a row-major patch grid."""

    num_prefix: int  # class, distillation and register tokens, in that order
    has_class: bool  # the first prefix token is a class token
    grid: Tuple[int, int]  # patch rows, columns

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.grid[0] * self.grid[1]


@dataclass
class AttentionRecord:
    """One block's attention as its forward computed it.

    Shapes: ``q``, ``k``, ``v`` ``[B, H, N, d_h]``; ``proj_weight`` ``[D, H·d_h]`` (``W_O``);
    ``qkv`` ``[B, N, 3·H·d_h]``, the projection's output before ``q_norm``/``k_norm`` (queries,
    keys, values, each with the heads concatenated: what MiniLMv2 re-splits).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    proj_weight: Tensor
    qkv: Optional[Tensor] = None

    @staticmethod
    def stack(records: List["AttentionRecord"]) -> "AttentionRecord":
        """Records of blocks with equal shapes as one, with a leading block axis: ``q``, ``k``,
        ``v`` ``[P, B, H, N, d_h]`` and ``proj_weight`` ``[P, 1, D, H·d_h]``, so that every
        block's math runs as one batch."""
        def stack(ts: List[Tensor]) -> Tensor:
            return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)

        return AttentionRecord(stack([r.q for r in records]), stack([r.k for r in records]),
                               stack([r.v for r in records]), records[0].scale,
                               stack([r.proj_weight for r in records]).unsqueeze(1))

    def scores(self) -> Tensor:
        """Pre-softmax scores ``q kᵀ · scale``, ``[B, H, N, N]``."""
        return (self.q * self.scale) @ self.k.transpose(-2, -1)

    def maps(self) -> Tensor:
        """Attention maps (softmax of the scores), ``[B, H, N, N]``: computed again, since the fused
        attention kernel of the forward never materialises them, and recording them from timm's
        unfused path cost more on CPUs (docs/performance.md). The softmax runs in float32 at least
        (its ``dtype`` argument only where it casts: the CPU kernel with it is ~3x slower)."""
        scores = self.scores()
        dtype = torch.promote_types(scores.dtype, torch.float32)
        return scores.softmax(-1) if dtype == scores.dtype else scores.softmax(-1, dtype=dtype)

    def circuits(self) -> Tensor:
        """Per-head circuits ``X_h = V_h W_O,hᵀ``, ``[B, H, N, D]`` (methods.md §4)."""
        b, h, n, d_h = self.v.shape
        w_o = self.proj_weight.reshape(-1, h, d_h)  # [D, H, d_h]
        return torch.einsum("bhnk,dhk->bhnd", self.v, w_o)


@dataclass
class Recorded:
    attention: Dict[int, AttentionRecord] = field(default_factory=dict)
    features: Dict[int, Tensor] = field(default_factory=dict)
    tokens: Optional[Tensor] = None


def vit_blocks(model: nn.Module, role: str) -> nn.Module:
    """The transformer blocks of a timm ViT, after checking they use global attention."""
    blocks = getattr(model, "blocks", None)
    ok = (blocks is not None and len(blocks) > 0 and hasattr(model, "patch_embed")
          and all(isinstance(getattr(b, "attn", None), Attention) for b in blocks))
    if not ok:
        raise UserError(
            f"The {role} ({type(model).__name__}) has no ViT-style global attention blocks (timm "
            "models whose blocks[i].attn is timm.layers.Attention: vit_*, deit_*, deit3_* and the "
            "tiny ViTs); attention and token methods (SHD, FitNet, AD-KD) need them. CNNs and "
            "windowed models (Swin) can still be distilled with kd=logit or kd=none.")
    return blocks


def token_layout(model: nn.Module) -> TokenLayout:
    """The token layout of a timm ViT (``num_prefix_tokens``, class token, patch grid)."""
    return TokenLayout(int(model.num_prefix_tokens), getattr(model, "cls_token", None) is not None,
                       tuple(model.patch_embed.grid_size))


class Tap:
    """Hooks that record a :class:`Capture` from a timm ViT on every forward.

    Args:
        model: the ViT (not a DDP or compile wrapper).
        capture: what to record.
        role: ``student`` or ``teacher``, for messages.
        token_grad: make the recorded tokens a leaf that requires grad (a frozen teacher's
            attributions need gradients with respect to its tokens).
    """

    def __init__(self, model: nn.Module, capture: Capture, role: str, token_grad: bool = False):
        self.record = Recorded()
        self.recording = False
        self._handles: List[torch.utils.hooks.RemovableHandle] = []
        if capture == Capture():
            return
        blocks = vit_blocks(model, role)
        for i in sorted(capture.attention | capture.features):
            if not 0 <= i < len(blocks):
                raise UserError(f"block {i} does not exist in the {role}, which has {len(blocks)} "
                                f"blocks (valid: 0..{len(blocks) - 1}).")
        for i in capture.attention:
            attn = blocks[i].attn
            self._handles.append(attn.qkv.register_forward_hook(self._attention_hook(i, attn)))
        for i in capture.features:
            self._handles.append(blocks[i].register_forward_hook(self._feature_hook(i)))
        if capture.tokens:
            self._handles.append(blocks[0].register_forward_pre_hook(self._token_hook(token_grad)))

    def _attention_hook(self, index: int, attn: Attention):
        def hook(module: nn.Module, args, qkv: Tensor) -> None:
            if not self.recording:
                return
            b, n, _ = qkv.shape
            q, k, v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            self.record.attention[index] = AttentionRecord(attn.q_norm(q), attn.k_norm(k), v, attn.scale,
                                                           attn.proj.weight, qkv=qkv)
        return hook

    def _feature_hook(self, index: int):
        def hook(module: nn.Module, args, out: Tensor) -> None:
            if not self.recording:
                return
            self.record.features[index] = out
        return hook

    def _token_hook(self, token_grad: bool):
        def hook(module: nn.Module, args):
            if not self.recording:
                return None
            x = args[0]
            if token_grad:
                x = x.detach().requires_grad_(True)
            self.record.tokens = x
            return (x,) + tuple(args[1:])
        return hook

    @contextlib.contextmanager
    def recording_on(self):
        """Record during the forwards inside this block only (not during validation)."""
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def pop(self) -> Recorded:
        """What the last forward recorded; the tap starts empty for the next one."""
        record, self.record = self.record, Recorded()
        return record

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class Outputs:
    """One model's forward as the distillation methods see it."""

    logits: Tensor  # [B, C]; for a distilled student in training, its class-token head
    dist_logits: Optional[Tensor]  # [B, C] distillation-token head, when a method asked for it
    record: Recorded
    layout: Optional[TokenLayout]  # None for models that are not ViTs
    model: nn.Module
