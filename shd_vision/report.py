"""``python -m shd_vision.report dir=DIR``: a results table from a sweep.

Reads every run under ``DIR`` (a ``train.py -m`` multirun directory, a quickstart directory, or
any folder of run directories), finds the config values that differ between runs, and groups the
runs by them (or by the keys in ``by``), seeds aside: each row is one setting with its validation
top-1 as mean ± std over seeds, and the median of its runs' training throughput and time. Writes
``results.md``, ``results.csv`` (one line per run too) and ``curves.png`` (validation top-1 per
epoch, mean over seeds, a band of ± one std).
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import hydra
import matplotlib.pyplot as plt
from omegaconf import DictConfig, OmegaConf

import shd_vision.viz  # noqa: F401  (matplotlib without a display)
from shd_vision import cli
from shd_vision.engine.logbook import format_duration, read_jsonl
from shd_vision.errors import UserError

log = logging.getLogger("shd_vision.report")

# Keys that differ between runs without being a setting: where files go, how a run was named.
IGNORED = ("paths.", "run_name", "hydra.", "trainer.resume", "trainer.threads")


@dataclass
class Run:
    path: Path
    config: Dict[str, Any]
    summary: Dict[str, Any]
    records: List[Dict[str, Any]] = field(default_factory=list)


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(node) if isinstance(node, list) else node}


def find_runs(root: Path) -> List[Run]:
    """Every finished run below ``root`` (a directory with ``summary.json`` and ``config.yaml``)."""
    runs = []
    for summary_file in sorted(root.rglob("summary.json")):
        run_dir = summary_file.parent
        if not (run_dir / "config.yaml").is_file():
            continue
        summary = json.loads(summary_file.read_text())
        if summary.get("status") == "stopped":
            log.warning("skipping %s: it was stopped before the end", run_dir)
            continue
        config = _flatten(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))
        metrics = run_dir / "metrics.jsonl"
        runs.append(Run(run_dir, config, summary, read_jsonl(metrics) if metrics.is_file() else []))
    return runs


def swept_keys(runs: List[Run]) -> List[str]:
    """Config keys whose values differ between runs, in config order."""
    keys: List[str] = []
    for run in runs:
        keys += [k for k in run.config if k not in keys]
    return [k for k in keys if not k.startswith(IGNORED)
            and len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1]


def _mean_std(values: List[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: List[Run], by: Optional[List[str]] = None,
              seed_key: str = "seed") -> Tuple[List[str], List[Dict[str, Any]]]:
    """Rows of the results table, best mean top-1 first, and the keys that tell them apart
    (``by``, or every key that differs between runs)."""
    keys = list(by) if by else [k for k in swept_keys(runs) if k != seed_key]
    for key in keys:
        if all(key not in r.config for r in runs):
            raise UserError(f"by={key} is not a config key of the runs; give keys such as "
                            f"{', '.join(swept_keys(runs)[:6]) or 'kd.name, seed'}.")
    groups: Dict[Tuple, List[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.config.get(k) for k in keys), []).append(run)
    rows = []
    for values, members in groups.items():
        top1, top1_std = _mean_std([r.summary["top1"] for r in members])
        # medians: one run slowed by a busy machine should not move a setting's cost
        rate = statistics.median(r.summary["train_samples_per_s"] for r in members)
        seconds = statistics.median(r.summary["wall_time_s"] for r in members)
        rows.append({**dict(zip(keys, values)), "top1": top1, "top1_std": top1_std, "seeds": len(members),
                     "samples_per_s": rate, "wall_time_s": seconds, "runs": members})
    rows.sort(key=lambda r: -r["top1"])
    return keys, rows


def markdown(keys: List[str], rows: List[Dict[str, Any]]) -> str:
    head = keys + ["top-1 (%)", "seeds", "train images/s", "time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(keys) + "---:|---:|---:|---:|"]
    for r in rows:
        cells = [str(r[k]) for k in keys]
        cells += [f"{r['top1']:.2f} ± {r['top1_std']:.2f}", str(r["seeds"]), f"{r['samples_per_s']:.0f}",
                  format_duration(r["wall_time_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(keys: List[str], rows: List[Dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", *keys, "seed", "top1", "top1_std", "seeds", "samples_per_s", "wall_time_s", "run_dir"])
        for r in rows:
            cells = [r[k] for k in keys]
            writer.writerow(["mean", *cells, "", f"{r['top1']:.4f}", f"{r['top1_std']:.4f}", r["seeds"],
                             f"{r['samples_per_s']:.1f}", f"{r['wall_time_s']:.1f}", ""])
            for run in r["runs"]:
                s = run.summary
                writer.writerow(["run", *cells, run.config.get("seed"), f"{s['top1']:.4f}", "", 1,
                                 f"{s['train_samples_per_s']:.1f}", f"{s['wall_time_s']:.1f}", run.path])


def curves(keys: List[str], rows: List[Dict[str, Any]], path: Path, title: str) -> Path:
    """Validation top-1 per epoch for every row: the mean over its seeds and a ± std band."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        per_epoch: Dict[float, List[float]] = {}
        for run in r["runs"]:
            for rec in run.records:
                if rec.get("split") == "val":
                    per_epoch.setdefault(rec["epoch"], []).append(rec["top1"])
        epochs = sorted(per_epoch)
        stats = [_mean_std(per_epoch[e]) for e in epochs]
        label = ", ".join(f"{k.split('.')[-1] if len(keys) > 1 else k}={r[k]}" for k in keys) or "runs"
        line, = ax.plot(epochs, [m for m, _ in stats], marker="o", ms=3, label=label)
        ax.fill_between(epochs, [m - s for m, s in stats], [m + s for m, s in stats], color=line.get_color(), alpha=0.15)
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(cfg: DictConfig) -> Dict[str, Any]:
    root = Path(cfg.dir)
    if not root.is_dir():
        raise UserError(f"dir={root} is not a directory; give a multirun directory such as "
                        "logs/train/multiruns/<time>, or any folder holding run directories.")
    runs = find_runs(root)
    if not runs:
        raise UserError(f"dir={root} holds no finished run (a folder with summary.json and config.yaml).")
    keys, rows = summarise(runs, list(cfg.by) if cfg.by else None)
    out = Path(cfg.out) if cfg.out else root
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(keys, rows)
    (out / "results.md").write_text(table + "\n")
    write_csv(keys, rows, out / "results.csv")
    picture = curves(keys, rows, out / "curves.png", f"{root.name}: {len(runs)} runs")
    log.info("%d runs in %s, %d settings (mean ± std over seeds):\n%s\n\nfiles: %s, %s, %s", len(runs), root,
             len(rows), table, out / "results.md", out / "results.csv", picture)
    return {"keys": keys, "rows": [{k: v for k, v in r.items() if k != "runs"} for r in rows], "table": table}


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    cli.run_task(report, cfg)


if __name__ == "__main__":
    cli.main(main)
