"""Reading weight files: our checkpoints, timm's ``.pth``/``.pt`` and ``.safetensors``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
from safetensors.torch import load_file as load_safetensors
from timm.models import clean_state_dict

from shd_vision.errors import UserError

# Our checkpoints mark themselves with this key (see engine/checkpoint.py).
FORMAT_KEY = "shd_vision_format"


def read_file(path: str | Path, what: str) -> Dict[str, Any]:
    """Load a ``.pt``/``.pth`` (``weights_only=True``) or ``.safetensors`` file on the CPU.

    Args:
        path: the file.
        what: how the file was named in the config, e.g. ``teacher.checkpoint``, for messages.

    Raises:
        UserError: the file is missing, unreadable, or not a weights file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}={path} does not exist; give the path of a checkpoint file "
                        "(.pt or .pth from shd-vision or timm, or .safetensors).")
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file fails anywhere in the unpickler
        raise UserError(f"{what}={path} could not be read as a checkpoint (it may be truncated, "
                        f"corrupt, or not a weights file): {_first_line(e)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what}={path} holds a {type(obj).__name__}, not a checkpoint "
                        "(a dict of tensors, or a dict with a 'model' or 'state_dict' entry).")
    return obj


def state_dict_of(obj: Dict[str, Any], use_ema: bool, what: str) -> Dict[str, torch.Tensor]:
    """The model weights inside a loaded file, in the key conventions timm's loader uses."""
    keys = ("model_ema", "state_dict_ema") if use_ema else ("model", "state_dict")
    for key in keys:
        if isinstance(obj.get(key), dict):
            return clean_state_dict(obj[key])
    if use_ema:
        raise UserError(f"{what} has no EMA weights (no 'model_ema' or 'state_dict_ema' entry); "
                        "set use_ema=false or train with trainer.ema.enabled=true.")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return clean_state_dict(obj)
    raise UserError(f"{what} has no model weights: expected a 'model' or 'state_dict' entry or a "
                    f"plain state dict, found keys {sorted(obj)[:8]}.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
