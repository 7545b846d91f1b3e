"""Reading weight files: our checkpoints, timm's ``.pth``/``.pt`` and ``.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file as load_safetensors
from timm.models import clean_state_dict

from shd_vision.errors import UserError

# Our checkpoints mark themselves with this key (see engine/checkpoint.py).
FORMAT_KEY = "shd_vision_format"
# timm's save_for_hf layout: the weights beside a config.json with the data settings.
EXPORTED_WEIGHTS = "model.safetensors"


def read_file(path: str | Path, what: str) -> Dict[str, Any]:
    """Load a ``.pt``/``.pth`` (``weights_only=True``) or ``.safetensors`` file on the CPU; a folder
    in timm's ``save_for_hf`` layout (a run's ``export/``) stands for its ``model.safetensors``.

    Args:
        path: the file.
        what: how the file was named in the config, e.g. ``teacher.checkpoint``, for messages.

    Raises:
        UserError: the file is missing, unreadable, or not a weights file.
    """
    path = Path(path)
    if path.is_dir() and (path / EXPORTED_WEIGHTS).is_file():
        path = path / EXPORTED_WEIGHTS
    if not path.is_file():
        found = (f"is a folder without {EXPORTED_WEIGHTS} (an exported student's weights)" if path.is_dir()
                 else "does not exist")
        raise UserError(f"{what}={path} {found}; give the path of a checkpoint file (.pt or .pth from "
                        f"shd-vision or timm, or .safetensors) or of a folder holding {EXPORTED_WEIGHTS}, "
                        "such as a run's export/.")
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


def exported_config(path: str | Path) -> Optional[Dict[str, Any]]:
    """The ``config.json`` of timm's ``save_for_hf`` layout that ``path`` (the folder, or its
    ``model.safetensors``) belongs to, or None: it records the data settings of the weights."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent if path.name == EXPORTED_WEIGHTS else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder / 'config.json'} could not be read as timm's exported config "
                        f"({_first_line(e)}); export the weights again or delete it.") from None
