"""Confusion matrices and training curves as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import matplotlib.pyplot as plt
import torch


def confusion_png(confusion: torch.Tensor, classes: Sequence[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix (rows: true class) with per-class recall on the y labels."""
    counts = confusion.double()
    rows = counts.sum(1, keepdim=True)
    rates = counts / rows.clamp(min=1)
    n = len(classes)
    size = max(5.0, 0.45 * n + 2) if n <= 40 else 12.0
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ticks = range(n)
        ax.set_xticks(ticks, [str(c) for c in classes], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(ticks, [f"{c} ({100 * rates[i, i]:.0f}%)" if rows[i] else f"{c} (no images)"
                              for i, c in enumerate(classes)], fontsize=8)
        for i in range(n):
            for j in range(n):
                if counts[i, j] > 0:
                    ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (recall)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _series(records: List[Dict[str, Any]], split: str, key: str):
    rows = [r for r in records if r.get("split") == split and key in r]
    return [r["epoch"] for r in rows], [r[key] for r in rows]


def curves_png(runs: Mapping[str, List[Dict[str, Any]]], path: Path, title: str) -> Path:
    """Training loss and validation top-1 against epochs, one line per run."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in runs.items():
        ax_loss.plot(*_series(records, "train", "loss"), label=name, lw=1)
        ax_acc.plot(*_series(records, "val", "top1"), marker="o", ms=3, label=name)
    ax_loss.set(xlabel="epoch", ylabel="training loss (sum of weighted terms)", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
