"""Attention pictures of a distilled student beside its teacher.

For a student checkpoint of ours (its config names the teacher and the data), on validation
images: the teacher's heads, the squeezed teacher maps SHD trains on, and the student's heads
(class-token rows over the patch grid on top of the image, and full N×N maps); how the squeeze
weights are spread per layer over a batch (the SHD paper's Figure 3 analogue); and how similar
the teacher's heads are to each other (its Figure 1 analogue).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import matplotlib.pyplot as plt
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from shd_vision.data.loaders import build_val_loader, open_split, resolve_input
from shd_vision.distill.base import term_config
from shd_vision.distill.mapping import align_maps, resolve_pairs, select_tokens
from shd_vision.distill.shd import soften, squeeze_record
from shd_vision.engine.checkpoint import load
from shd_vision.errors import UserError
from shd_vision.models.factory import build, create_teacher
from shd_vision.models.taps import Capture, Tap, TokenLayout, token_layout, vit_blocks
from shd_vision.models.teacher import Teacher

log = logging.getLogger("shd_vision.viz")


@dataclass
class LayerMaps:
    """One student/teacher block pair on the first images, on the student's tokens."""

    student_block: int
    teacher_block: int
    teacher: Tensor  # [n, Ht, N', N'] each teacher head, softened with τ
    squeezed: Tensor  # [n, Hs, N', N'] the SHD targets
    student: Tensor  # [n, Hs, N', N'] softened with τ
    weights: Tensor  # [n, Hs, Ht]


@dataclass
class BatchStats:
    """What the batch-wide pictures show: the squeeze weights of every block pair
    ``[B, Hs, Ht]`` and the similarity of each mapped teacher block's heads ``[Ht, Ht]``."""

    weights: Dict[Tuple[int, int], Tensor]
    similarity: Dict[int, Tensor]


def shd_settings(trained: DictConfig, cfg: DictConfig) -> Dict[str, Any]:
    """Temperature, merge and layers: the command line's, else those of the run's SHD term,
    else SHD's defaults."""
    terms = trained.kd.terms
    shd = term_config("shd", terms.shd) if "shd" in terms else None
    defaults = {"temperature": 1.0, "merge": "progressive", "layers": "uniform"}

    def pick(key: str) -> Any:
        if cfg[key] is not None:
            return cfg[key]
        return shd[key] if shd is not None else defaults[key]

    layers = pick("layers")
    return {"temperature": float(pick("temperature")), "merge": pick("merge"),
            "layers": layers if isinstance(layers, str) else OmegaConf.to_container(layers)}


@torch.no_grad()
def collect(student, teacher: Teacher, images: Tensor, pairs: List[Tuple[int, int]], shown: List[Tuple[int, int]],
            count: int, temperature: float, merge: str) -> Tuple[BatchStats, List[LayerMaps]]:
    """The squeeze weights and head similarities of every block pair over ``images``, and the
    maps of the ``shown`` pairs on the first ``count`` images (the teacher must capture the
    pairs' teacher blocks). Only the maps a picture draws are kept: a DeiT pair's 197×197 maps
    of every block and image took seconds to align and gigabytes to hold."""
    s_layout, t_layout = token_layout(student), teacher.layout
    t_rec = teacher(images).record.attention
    s_tap = Tap(student, Capture(attention=frozenset(s for s, _ in shown)), "student")
    with s_tap.recording_on():
        student(images[:count])
    s_rec = s_tap.pop().attention
    s_tap.remove()
    blocks = vit_blocks(student, "student")
    stats, out = BatchStats({}, {}), []
    for s, t in pairs:
        maps, w = squeeze_record(t_rec[t], blocks[s].attn.num_heads, merge)
        stats.weights[(s, t)] = w
        if t not in stats.similarity:
            stats.similarity[t] = head_similarity(maps)
        if (s, t) in shown:  # T_g = Σ_h W[g, h] softmax(Z_t,h / τ) (squeezed_targets), with the batch's W
            soft = soften(maps[:count], temperature)
            squeezed = torch.einsum("bgh,bhqk->bgqk", w[:count], soft)
            student_maps = (select_tokens(s_rec[s].scores().float(), s_layout, t_layout, (-2, -1)) / temperature).softmax(-1)
            out.append(LayerMaps(s, t, align_maps(soft, t_layout, s_layout), align_maps(squeezed, t_layout, s_layout),
                                 student_maps, w[:count]))
    return stats, out


def _cls_rows(maps: Tensor, layout: TokenLayout, has_cls: bool) -> Tensor:
    """``[..., gh, gw]``: the class token's row over the patches, or (no class token) the mean
    attention each patch receives."""
    n_cls = 1 if has_cls else 0
    rows = maps[..., 0, n_cls:] if has_cls else maps[..., :, n_cls:].mean(-2)
    return rows.reshape(*rows.shape[:-1], *layout.grid)


def _show_image(ax, image: Tensor, mean, std) -> None:
    img = (image.cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)).clamp(0, 1)
    ax.imshow((img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy(), cmap="gray")


def attention_figure(layers: List[LayerMaps], index: int, image: Tensor, data_config: Dict[str, Any],
                     layout: TokenLayout, has_cls: bool, path: Path, title: str) -> Path:
    """Class-token attention of teacher heads, squeezed maps and student heads for one image."""
    hs, ht = layers[0].student.shape[1], layers[0].teacher.shape[1]
    cols = max(hs, ht) + 1
    fig, axes = plt.subplots(3 * len(layers), cols, figsize=(1.7 * cols, 1.8 * 3 * len(layers)), squeeze=False)
    size = image.shape[-2:]
    for li, lm in enumerate(layers):
        for ri, (label, maps) in enumerate((("teacher", lm.teacher), ("squeezed", lm.squeezed), ("student", lm.student))):
            row = axes[3 * li + ri]
            grids = _cls_rows(maps[index], layout, has_cls)
            _show_image(row[0], image, data_config["mean"], data_config["std"])
            block = lm.teacher_block if label == "teacher" else lm.student_block
            row[0].set_ylabel(f"{label}\nblock {block}", fontsize=8)
            for h in range(cols - 1):
                ax = row[h + 1]
                if h >= grids.shape[0]:
                    ax.axis("off")
                    continue
                up = torch.nn.functional.interpolate(grids[h][None, None], size=size, mode="nearest")[0, 0]
                _show_image(ax, image, data_config["mean"], data_config["std"])
                ax.imshow(up.cpu().numpy(), cmap="inferno", alpha=0.6)
                name = f"head {h}"
                if label == "squeezed":
                    group = (lm.weights[index, h] > 1e-3).nonzero().flatten().tolist()
                    name = "+".join(f"{lm.weights[index, h, j]:.2f}·t{j}" for j in group)
                ax.set_title(name, fontsize=6)
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle(f"{title}: class-token attention, image {index}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def full_maps_figure(lm: LayerMaps, index: int, path: Path, title: str) -> Path:
    """Full N×N maps (query rows, key columns) of one block pair for one image."""
    hs, ht = lm.student.shape[1], lm.teacher.shape[1]
    cols = max(hs, ht)
    fig, axes = plt.subplots(3, cols, figsize=(2.2 * cols, 6.6), squeeze=False)
    for ri, (label, maps) in enumerate((("teacher", lm.teacher), ("squeezed", lm.squeezed), ("student", lm.student))):
        for h in range(cols):
            ax = axes[ri][h]
            if h >= maps.shape[1]:
                ax.axis("off")
                continue
            ax.imshow(maps[index, h].cpu().numpy(), cmap="viridis")
            ax.set_title(f"{label} head {h}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{title}: full attention maps, student block {lm.student_block} / teacher block "
                 f"{lm.teacher_block}, image {index}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def weights_figure(weights: Dict[Tuple[int, int], Tensor], path: Path, title: str) -> Path:
    """Per block pair: the batch-mean squeeze weights, and the spread of each weight over the batch."""
    fig, axes = plt.subplots(2, len(weights), figsize=(3.2 * len(weights), 6), squeeze=False)
    for li, ((s, t), w) in enumerate(weights.items()):
        w = w.cpu()
        mean = w.mean(0)
        ax = axes[0][li]
        ax.imshow(mean.numpy(), cmap="Blues", vmin=0, vmax=1)
        for g in range(mean.shape[0]):
            for h in range(mean.shape[1]):
                if mean[g, h] > 0:
                    ax.text(h, g, f"{mean[g, h]:.2f}", ha="center", va="center", fontsize=6)
        ax.set(title=f"student {s} / teacher {t}", xlabel="teacher head", ylabel="student head",
               xticks=range(mean.shape[1]), yticks=range(mean.shape[0]))
        entries = [(g, h) for g in range(w.shape[1]) for h in range(w.shape[2]) if (w[:, g, h] > 0).any()]
        axes[1][li].boxplot([w[:, g, h].numpy() for g, h in entries], showfliers=False)
        axes[1][li].set_xticks(range(1, len(entries) + 1), [f"s{g}:t{h}" for g, h in entries], rotation=90, fontsize=6)
        axes[1][li].set(ylim=(-0.02, 1.02), ylabel="weight over the batch")
    fig.suptitle(f"{title}: squeeze weights over {w.shape[0]} images", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def head_similarity(maps: Tensor) -> Tensor:
    """Mean cosine similarity between every two heads' maps, ``[H, H]``, from ``[B, H, N, N]``."""
    flat = torch.nn.functional.normalize(maps.flatten(2), dim=-1)
    return (flat @ flat.transpose(1, 2)).mean(0)


def redundancy_figure(similarity: Dict[int, Tensor], path: Path, title: str) -> Path:
    """How alike the teacher's heads are in each mapped block (cosine similarity of their maps)."""
    fig, axes = plt.subplots(1, len(similarity), figsize=(3.2 * len(similarity), 3.2), squeeze=False)
    for ax, (block, sim) in zip(axes[0], sorted(similarity.items())):
        sim = sim.cpu()
        ax.imshow(sim.numpy(), cmap="magma", vmin=0, vmax=1)
        for i in range(sim.shape[0]):
            for j in range(sim.shape[1]):
                ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if sim[i, j] > 0.5 else "white")
        ax.set(title=f"teacher block {block}", xlabel="head", ylabel="head")
    fig.suptitle(f"{title}: similarity of the teacher's heads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pick(pairs: List[Tuple[int, int]], most: int) -> List[Tuple[int, int]]:
    """At most ``most`` pairs for the per-image figures, evenly spread, first and last included."""
    if len(pairs) <= most:
        return pairs
    return [pairs[round(i * (len(pairs) - 1) / (most - 1))] for i in range(most)]


def render(cfg: DictConfig, out_dir: Path, device: torch.device) -> List[Path]:
    """Every attention picture for ``cfg.ckpt`` (a ``conf/viz.yaml`` config); returns the files."""
    ckpt = load(Path(cfg.ckpt), "ckpt")
    trained = OmegaConf.create(ckpt["config"])
    if trained.teacher is None:
        raise UserError(f"ckpt={cfg.ckpt} was trained without a teacher (kd={trained.kd.name}); the "
                        "attention pictures compare a student with its teacher.")
    teacher_spec = trained.teacher if cfg.teacher_checkpoint is None else OmegaConf.merge(
        trained.teacher, {"checkpoint": cfg.teacher_checkpoint})
    classes = ckpt["classes"]
    student = build(trained.model, len(classes), "model")
    student.load_state_dict(ckpt["model"])
    teacher_model, norm, _ = create_teacher(teacher_spec, len(classes), allow_random=trained.trainer.allow_random_teacher)
    data_config = resolve_input(trained.data, student)
    settings = shd_settings(trained, cfg)
    pairs = resolve_pairs(settings["layers"], len(vit_blocks(student, "student")),
                          len(vit_blocks(teacher_model, "teacher")), "layers")
    teacher = Teacher(teacher_model, norm, data_config, Capture(attention=frozenset(t for _, t in pairs)))
    student.to(device).eval()
    teacher.to(device)
    whole = {} if trained.data.name == "synthetic" else {"val_size": None}  # synthetic sets are sized by it
    data = OmegaConf.merge(trained.data, {**whole, "eval_batch_size": cfg.batch, "num_workers": 0})
    images, _ = next(iter(build_val_loader(data, open_split(data, data.val_split), data_config)))
    images = images.to(device)
    count = min(cfg.images, images.shape[0])
    stats, shown = collect(student, teacher, images, pairs, _pick(pairs, 3), count, settings["temperature"],
                           settings["merge"])
    s_layout = token_layout(student)
    has_cls = s_layout.has_class and teacher.layout.has_class
    title = f"kd={trained.kd.name}, τ={settings['temperature']:g}, {settings['merge']} merge"
    files = [weights_figure(stats.weights, out_dir / "squeeze_weights.png", title),
             redundancy_figure(stats.similarity, out_dir / "head_redundancy.png", title)]
    for i in range(count):
        files.append(attention_figure(shown, i, images[i], data_config, s_layout, has_cls,
                                      out_dir / f"attention_image{i}.png", title))
        files.append(full_maps_figure(shown[-1], i, out_dir / f"attention_full_image{i}.png", title))
    return files
