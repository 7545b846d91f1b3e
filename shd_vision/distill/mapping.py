"""How a teacher lines up with a student: which blocks meet (methods.md §5) and which tokens are
compared (§6). Shared by SHD, FitNet and AD-KD.

Tokens (ours): the class token (when both models have one) and the patch tokens are compared;
other prefix tokens (a DeiT distillation token, registers) are dropped. When the patch grids
differ, the teacher's side is resampled to the student's grid, by area averaging when it
shrinks and bilinearly when it grows; attention rows are renormalised to sum to 1 afterwards.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from shd_vision.errors import UserError
from shd_vision.models.taps import TokenLayout, vit_blocks


def layer_pairs(student_depth: int, teacher_depth: int, mode: str = "uniform") -> List[Tuple[int, int]]:
    """Student/teacher block pairs (0-based), methods.md §5.

    ``uniform`` maps student block ``i`` to teacher block ``⌊(i+1)·Lt/Ls⌋ − 1`` (equal depths map
    one to one, the last blocks always meet; a student deeper than its teacher maps its first
    blocks to teacher block 0 (ours)). ``last`` is ``[(Ls−1, Lt−1)]``.
    """
    if mode == "uniform":
        return [(i, max((i + 1) * teacher_depth // student_depth - 1, 0)) for i in range(student_depth)]
    if mode == "last":
        return [(student_depth - 1, teacher_depth - 1)]
    raise UserError(f"layer mapping '{mode}' is unknown; use uniform, last, or a list of [student, "
                    "teacher] block pairs.")


def resolve_pairs(spec: Any, student_depth: int, teacher_depth: int, key: str) -> List[Tuple[int, int]]:
    """``uniform``, ``last`` or explicit ``[[s, t], ...]`` pairs, checked against both depths."""
    if isinstance(spec, str):
        if spec not in ("uniform", "last"):
            raise UserError(f"{key}={spec} is not a layer mapping; use uniform, last, or a list of "
                            "[student_block, teacher_block] pairs such as [[3,5],[1,2]].")
        return layer_pairs(student_depth, teacher_depth, spec)
    try:
        pairs = [(int(s), int(t)) for s, t in spec]
    except (TypeError, ValueError):
        raise UserError(f"{key}={list(spec) if spec is not None else spec} is not a list of "
                        "[student_block, teacher_block] pairs, e.g. [[3,5]].") from None
    for s, t in pairs:
        if not (0 <= s < student_depth and 0 <= t < teacher_depth):
            raise UserError(f"{key} pair [{s}, {t}] is out of range: the student has blocks "
                            f"0..{student_depth - 1} and the teacher 0..{teacher_depth - 1}.")
    if not pairs:
        raise UserError(f"{key} is an empty list; give at least one [student_block, teacher_block] pair.")
    return pairs


def method_pairs(layers: Any, student: Any, teacher: Any, key: str) -> List[Tuple[int, int]]:
    """The block pairs a method's ``layers`` setting names, checked against both ViTs' depths."""
    spec = layers if isinstance(layers, str) else list(layers)
    return resolve_pairs(spec, len(vit_blocks(student, "student")), len(vit_blocks(teacher, "teacher")), key)


def kept_tokens(layout: TokenLayout, other: TokenLayout) -> Optional[Tensor]:
    """Indices of the tokens of ``layout`` that are compared with a model laid out as ``other``:
    the class token when both have one, then every patch token. None when that is every token."""
    cls = [0] if layout.has_class and other.has_class else []
    if layout.num_prefix == len(cls):
        return None
    return torch.tensor(cls + list(range(layout.num_prefix, layout.num_tokens)))


def _keep(x: Tensor, keep: Optional[Tensor], dims: Sequence[int]) -> Tensor:
    if keep is None:
        return x
    keep = keep.to(x.device)
    for d in dims:
        x = x.index_select(d, keep)
    return x


def _resample_patches(x: Tensor, src: Tuple[int, int], dst: Tuple[int, int]) -> Tensor:
    """Resample the last axis of ``x`` (``src`` grid cells, row-major) to the ``dst`` grid."""
    lead = x.shape[:-1]
    grid = x.reshape(-1, 1, *src)
    if dst[0] <= src[0] and dst[1] <= src[1]:
        grid = F.interpolate(grid, size=dst, mode="area")
    else:
        grid = F.interpolate(grid, size=dst, mode="bilinear", align_corners=False)
    return grid.reshape(*lead, dst[0] * dst[1])


def _resample_axis(x: Tensor, dim: int, n_cls: int, src: Tuple[int, int], dst: Tuple[int, int]) -> Tensor:
    """Resample the patch part of axis ``dim`` (after ``n_cls`` class entries), keeping the rest."""
    x = x.movedim(dim, -1)
    x = torch.cat([x[..., :n_cls], _resample_patches(x[..., n_cls:], src, dst)], dim=-1)
    return x.movedim(-1, dim)


def align_maps(maps: Tensor, src: TokenLayout, dst: TokenLayout) -> Tensor:
    """Teacher attention maps on the student's tokens, rows renormalised.

    Args:
        maps: ``[B, H, N_src, N_src]`` row-stochastic maps laid out as ``src``.
        src: the layout of ``maps`` (the teacher's).
        dst: the layout to compare with (the student's).

    Returns:
        ``[B, H, N', N']`` with ``N'`` the compared tokens of ``dst`` (:func:`kept_tokens`);
        ``maps`` itself when that is every token on the same grid.
    """
    keep = kept_tokens(src, dst)
    if keep is None and src.grid == dst.grid:
        return maps
    maps = _keep(maps, keep, (-2, -1))
    if src.grid != dst.grid:
        n_cls = 1 if src.has_class and dst.has_class else 0
        maps = _resample_axis(_resample_axis(maps, -1, n_cls, src.grid, dst.grid), -2, n_cls, src.grid, dst.grid)
    return maps / maps.sum(-1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)


def align_tokens(x: Tensor, src: TokenLayout, dst: TokenLayout) -> Tensor:
    """Per-token values ``[B, N_src, ...]`` (features ``[B, N, D]``, attributions ``[B, N]``) on the
    compared tokens of ``dst``: prefix tokens dropped, the patch grid resampled."""
    x = _keep(x, kept_tokens(src, dst), (1,))
    if src.grid != dst.grid:
        n_cls = 1 if src.has_class and dst.has_class else 0
        x = _resample_axis(x, 1, n_cls, src.grid, dst.grid)
    return x


def select_tokens(x: Tensor, layout: TokenLayout, other: TokenLayout, dims: Sequence[int]) -> Tensor:
    """The compared tokens of the student's own tensors along ``dims`` (no resampling)."""
    return _keep(x, kept_tokens(layout, other), dims)


def patch_tokens(x: Tensor, src: TokenLayout, dst: TokenLayout) -> Tensor:
    """The patch tokens of ``x`` ``[B, N_src, ...]`` (every prefix token dropped) on ``dst``'s grid."""
    x = x[:, src.num_prefix:]
    return x if src.grid == dst.grid else _resample_axis(x, 1, 0, src.grid, dst.grid)
