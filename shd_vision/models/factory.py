"""Students and teachers from ``timm.create_model``, weights from local files or timm's hub.

A model config is ``name`` (any timm model) plus the keys below; every other key is passed to
``timm.create_model``, so ``model.drop_path_rate=0.1`` or the architecture overrides of the tiny
Fashion-MNIST ViTs need no code.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import timm
from omegaconf import DictConfig, OmegaConf
from timm.data import resolve_input_data_config
from timm.models import get_model_input_config
from torch import nn

from shd_vision.errors import UserError
from shd_vision.models.weights import FORMAT_KEY, exported_config, read_file, state_dict_of

log = logging.getLogger(__name__)

# Keys of a model/teacher config that shd-vision reads itself; the rest go to timm.create_model.
OWN_KEYS = ("name", "pretrained", "checkpoint", "use_ema", "mean", "std", "cache")


def _as_dict(spec: Mapping | DictConfig) -> Dict[str, Any]:
    if isinstance(spec, DictConfig):
        return OmegaConf.to_container(spec, resolve=True)
    return dict(spec)


def timm_kwargs(spec: Mapping | DictConfig) -> Dict[str, Any]:
    """The keys of a model config that are passed on to ``timm.create_model``."""
    return {k: v for k, v in _as_dict(spec).items() if k not in OWN_KEYS}


def check_model_name(name: Any, key: str) -> str:
    """Return ``name`` if timm knows it, else raise naming close matches."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{key} is missing: set it to a timm model name, e.g. {key}=deit_tiny_patch16_224.")
    if timm.is_model(name):
        return name
    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    hint = f"close names: {', '.join(close)}" if close else "see timm.list_models() for the valid names"
    raise UserError(f"{key}={name} is not a timm model; {hint}.")


def build(spec: Mapping | DictConfig, num_classes: Optional[int], key: str, pretrained: bool = False
          ) -> nn.Module:
    """``timm.create_model`` for one model config, with user errors turned into messages.

    Args:
        spec: a ``model`` or ``teacher`` config.
        num_classes: classes of the data (the classifier is sized for them); None keeps the
            pretrained classifier.
        key: the config key, ``model`` or ``teacher``, for messages.
        pretrained: fetch timm's pretrained weights from the hub.
    """
    spec = _as_dict(spec)
    name = check_model_name(spec.get("name"), f"{key}.name")
    kwargs = timm_kwargs(spec)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:  # an unknown key, or values that do not fit (asserts)
        raise UserError(f"timm.create_model('{name}') rejected the settings of {key} "
                        f"({', '.join(f'{k}={v}' for k, v in kwargs.items())}): {e or type(e).__name__}. "
                        f"Change or remove the offending {key}.* value.") from None
    except Exception as e:  # the hub download: network, missing weights, auth, disk
        if not pretrained:
            raise
        raise UserError(f"{key}.pretrained=true could not fetch timm's weights for '{name}' "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). The hub "
                        f"may be unreachable: set {key}.checkpoint=FILE to load a local file instead.") from None
    _check_patch_grid(model, key)
    return model


def _check_patch_grid(model: nn.Module, key: str) -> None:
    """Refuse an image size that is not a whole number of patches: timm's strided patch
    convolution would silently drop the last rows and columns of every image (unless the model
    pads them, ``dynamic_img_pad`` with ``dynamic_img_size``)."""
    embed = getattr(model, "patch_embed", None)
    size, patch = getattr(embed, "img_size", None), getattr(embed, "patch_size", None)
    if size is None or patch is None or (getattr(embed, "dynamic_img_pad", False)
                                         and getattr(model, "dynamic_img_size", False)):
        return
    for s, p in zip(size, patch):
        if s % p:
            raise UserError(f"{key}.img_size={s if size[0] == size[1] else list(size)} is not a multiple of "
                            f"the patch size {p}: the patch embedding would silently drop the last {s % p} "
                            f"pixel rows or columns of every image. Use {key}.img_size={s - s % p} or "
                            f"{s - s % p + p}, or another {key}.patch_size.")


def load_weights(model: nn.Module, path: str | Path, key: str, use_ema: bool = False) -> Dict[str, Any]:
    """Load a weights file into ``model`` strictly, checking the class count and every tensor's
    name and shape first (PyTorch would raise on a shape even with ``strict=False``).

    Args:
        key: the config key of the model, ``model`` or ``teacher``; ``ckpt`` for eval.py's file,
            which goes into ``model``.

    Returns:
        The loaded file's dict (our checkpoints carry their config and data settings in it).
    """
    what, model_key = ("ckpt", "model") if key == "ckpt" else (f"{key}.checkpoint", key)
    obj = read_file(path, what)
    state = state_dict_of(obj, use_ema, f"{what}={path}")
    heads = model.pretrained_cfg.get("classifier", "head")
    head = (heads if isinstance(heads, str) else heads[0]) + ".weight"
    expected = model.get_classifier().weight.shape[0] if head in state else None
    if expected is not None and state[head].shape[0] != expected:
        raise UserError(f"{what}={path} was trained for {state[head].shape[0]} classes but the data "
                        f"has {expected}; use a checkpoint trained on this data set.")
    own = model.state_dict()
    wrong = {"missing": [k for k in own if k not in state], "unexpected": [k for k in state if k not in own],
             "wrong shape": [f"{k} {list(v.shape)} in the file, {list(own[k].shape)} in the model"
                             for k, v in state.items() if k in own and own[k].shape != v.shape]}
    if any(wrong.values()):
        parts = [f"{label}: {', '.join(keys[:3])}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"
                 for label, keys in wrong.items() if keys]
        raise UserError(f"{what}={path} does not fit {model_key}.name={model.pretrained_cfg.get('architecture')} "
                        f"({'; '.join(parts)}); check that {model_key} describes the model the file was "
                        "saved from, including its architecture overrides.")
    model.load_state_dict(state)
    return obj


def input_size(model: nn.Module) -> Tuple[int, int, int]:
    """The ``(C, H, W)`` a model takes."""
    return tuple(get_model_input_config(model)["input_size"])


def create_student(spec: DictConfig, num_classes: int) -> nn.Module:
    """The student: timm's model, initialised from ``model.checkpoint`` or timm's hub if asked."""
    checkpoint = spec.get("checkpoint")
    model = build(spec, num_classes, "model", pretrained=bool(spec.get("pretrained")) and not checkpoint)
    if checkpoint:
        load_weights(model, checkpoint, "model", use_ema=bool(spec.get("use_ema", False)))
    return model


def create_teacher(spec: DictConfig, num_classes: int, allow_random: bool
                   ) -> Tuple[nn.Module, Tuple[Tuple[float, ...], Tuple[float, ...]], str]:
    """The frozen teacher and the input normalisation it was trained with.

    Weights come from ``teacher.checkpoint`` (a local file) or, when that is null and
    ``teacher.pretrained`` is true, timm's hub. With ``allow_random`` (``debug=fast``) a missing
    checkpoint or an unreachable hub leaves the teacher randomly initialised, with a warning.

    Returns:
        ``(model, (mean, std), source)``; the normalisation is ``teacher.mean``/``std`` when set,
        else the one recorded in an shd-vision checkpoint, else the model's pretrained config;
        ``source`` says where the weights came from (the file, timm's ``name.tag``, or random).
    """
    checkpoint: Optional[str] = spec.get("checkpoint")
    pretrained = bool(spec.get("pretrained")) and not checkpoint
    if not checkpoint and not pretrained:
        raise UserError("teacher has neither a checkpoint nor pretrained weights: set "
                        "teacher.checkpoint=FILE or teacher.pretrained=true (needs timm's hub).")
    loaded: Dict[str, Any] = {}
    try:
        # Pretrained teachers keep their own classifier: a resized one would be random.
        model = build(spec, None if pretrained else num_classes, "teacher", pretrained=pretrained)
        if pretrained and model.num_classes != num_classes:
            raise UserError(f"timm's pretrained {spec['name']} predicts {model.num_classes} classes but "
                            f"the data has {num_classes}; fine-tune a teacher on this data and pass "
                            "it as teacher.checkpoint=FILE.")
        if checkpoint:
            loaded = load_weights(model, checkpoint, "teacher", use_ema=bool(spec.get("use_ema")))
        source = f"file {checkpoint}" if checkpoint else f"timm's pretrained {pretrained_tag(model)}"
    except UserError as e:
        missing = checkpoint and not Path(checkpoint).exists()
        if not (allow_random and (missing or pretrained)):
            raise
        log.warning("!" * 88)
        log.warning("DEBUG RUN WITH A RANDOMLY INITIALISED TEACHER: %s", e)
        log.warning("Distillation from it is meaningless; this fallback exists only for debug=fast.")
        log.warning("!" * 88)
        model = build(spec, num_classes, "teacher", pretrained=False)
        source = "random (debug fallback, no weights)"
    model.eval().requires_grad_(False)
    norm = _teacher_norm(spec, model, loaded)
    return model, norm, source


def pretrained_tag(model: nn.Module) -> str:
    """timm's ``architecture.tag`` of a model: which of a name's pretrained weights it takes."""
    cfg = model.pretrained_cfg
    return f"{cfg.get('architecture')}.{cfg['tag']}" if cfg.get("tag") else str(cfg.get("architecture"))


def _teacher_norm(spec: Mapping, model: nn.Module, loaded: Dict[str, Any]
                  ) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    if spec.get("mean") is not None and spec.get("std") is not None:
        return tuple(spec["mean"]), tuple(spec["std"])
    if FORMAT_KEY in loaded:
        data = loaded["data_config"]
        return tuple(data["mean"]), tuple(data["std"])
    exported = exported_config(spec["checkpoint"]) if loaded and spec.get("checkpoint") else None
    if exported is not None and "mean" in exported.get("pretrained_cfg", {}):
        data = exported["pretrained_cfg"]
        return tuple(data["mean"]), tuple(data["std"])
    cfg = resolve_input_data_config(model)  # timm's config, fitted to the model's channels
    return tuple(cfg["mean"]), tuple(cfg["std"])


def describe(model: nn.Module) -> str:
    """A model's timm name plus, for ViTs, its shape (the tiny ViTs override timm's)."""
    name = model.pretrained_cfg.get("architecture", type(model).__name__)
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) and hasattr(blocks[0], "attn") and hasattr(model, "patch_embed"):
        return (f"{name} [{len(blocks)} blocks, width {model.embed_dim}, {blocks[0].attn.num_heads} heads, "
                f"patch {model.patch_embed.patch_size[0]}, {count_params(model) / 1e6:.2f}M params]")
    return f"{name} [{count_params(model) / 1e6:.2f}M params]"


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model

