"""OpenCV warps in place of Pillow's for the geometric ops of timm's RandAugment/AutoAugment
(``data.aug.affine=opencv``).

Pillow's ``Image.transform(AFFINE)`` filters every output pixel through a generic 2-D kernel:
1.4-2.2 ms per 224x224 image for Rotate, ShearX/Y and TranslateX/YRel, three quarters of
RandAugment's cost (docs/performance.md). ``cv2.warpAffine`` does the same warp in a tenth of
that. timm still draws every op, magnitude and interpolation; only the resampling is OpenCV's,
with the same geometry (Pillow's pixel-centre convention carried over), the same fill colour and
the same interpolation family. They differ from Pillow's by OpenCV's sub-pixel steps (1/32 of a
pixel), its bicubic kernel (a = -0.75 against Pillow's -0.5) and at the border, where OpenCV
blends the fill colour in: about half a grey level on average per warped pixel (tests/test_data.py;
benchmarks/loader_worker.py measures whole pipelines).
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Dict, Sequence

import numpy as np
from PIL import Image

_INTERPOLATION = {Image.NEAREST: 0, Image.BILINEAR: 1, Image.BICUBIC: 2}  # cv2.INTER_NEAREST, _LINEAR, _CUBIC


def cv2_matrix(matrix: Sequence[float]) -> np.ndarray:
    """Pillow's AFFINE data ``(a, b, c, d, e, f)`` as OpenCV's inverse map ``[2, 3]``.

    Pillow maps an output pixel's centre ``(x + 0.5, y + 0.5)`` to input coordinates whose pixel
    centres sit at ``+ 0.5`` too; OpenCV maps pixel indices to pixel indices."""
    a, b, c, d, e, f = matrix
    return np.array([[a, b, c + 0.5 * (a + b - 1)], [d, e, f + 0.5 * (d + e - 1)]], dtype=np.float64)


def warp(img: Image.Image, matrix: Sequence[float], fillcolor: Any = None, resample: Any = Image.BICUBIC
         ) -> Image.Image:
    """``img.transform(img.size, Image.AFFINE, matrix, resample, fillcolor=fillcolor)`` by OpenCV;
    ``resample`` a list or tuple: one drawn at random, as timm does."""
    import cv2

    if isinstance(resample, (list, tuple)):
        resample = random.choice(resample)
    fill = fillcolor if isinstance(fillcolor, (list, tuple)) else (fillcolor or 0,) * 3
    out = cv2.warpAffine(np.asarray(img), cv2_matrix(matrix), img.size,
                         flags=_INTERPOLATION[resample] | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(float(v) for v in fill))
    return Image.fromarray(out, img.mode)


def rotation(size: Sequence[int], degrees: float) -> list:
    """Pillow's ``rotate`` matrix (about the centre, the same size, counter-clockwise)."""
    w, h = size
    angle = -math.radians(degrees % 360.0)
    m = [round(math.cos(angle), 15), round(math.sin(angle), 15), 0.0,
         round(-math.sin(angle), 15), round(math.cos(angle), 15), 0.0]
    m[2] = m[0] * (-w / 2) + m[1] * (-h / 2) + w / 2
    m[5] = m[3] * (-w / 2) + m[4] * (-h / 2) + h / 2
    return m


OPS: Dict[str, Callable[..., Image.Image]] = {  # timm's op names and signatures (img, level, **kwargs)
    "Rotate": lambda img, degrees, **kw: warp(img, rotation(img.size, degrees), **kw),
    "ShearX": lambda img, factor, **kw: warp(img, (1, factor, 0, 0, 1, 0), **kw),
    "ShearY": lambda img, factor, **kw: warp(img, (1, 0, 0, factor, 1, 0), **kw),
    "TranslateX": lambda img, pixels, **kw: warp(img, (1, 0, pixels, 0, 1, 0), **kw),
    "TranslateY": lambda img, pixels, **kw: warp(img, (1, 0, 0, 0, 1, pixels), **kw),
    "TranslateXRel": lambda img, pct, **kw: warp(img, (1, 0, pct * img.size[0], 0, 1, 0), **kw),
    "TranslateYRel": lambda img, pct, **kw: warp(img, (1, 0, 0, 0, 1, pct * img.size[1]), **kw),
}


def use_opencv(transform: Any) -> int:
    """Swap the geometric ops of every RandAugment/AutoAugment inside ``transform`` (a torchvision
    Compose) for :data:`OPS`; the number swapped."""
    import cv2

    cv2.setNumThreads(1)  # the warps run in loader workers, one per core
    count = 0
    for t in getattr(transform, "transforms", [transform]):
        ops = list(getattr(t, "ops", [])) + [op for sub in getattr(t, "policy", []) for op in sub]
        for op in ops:
            if getattr(op, "name", None) in OPS:
                op.aug_fn = OPS[op.name]
                count += 1
    return count
