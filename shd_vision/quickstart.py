"""The embedded default end to end: ``python -m shd_vision.quickstart``.

Trains the tiny Fashion-MNIST teacher unless its checkpoint is already cached, distils one
student per method in ``conf/quickstart.yaml``, and ends with a comparison table, a plot of all
validation curves and the paths of every picture. Each run is an ordinary ``train.py`` run,
composed from the same configs: the plan's overrides plus the quickstart's own command line
(``python -m shd_vision.quickstart debug=fast`` makes every run a debug run).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from shd_vision import cli
from shd_vision.config import compose_train
from shd_vision.engine.logbook import format_duration, read_jsonl
from shd_vision.engine.train import train
from shd_vision.viz.plots import curves_png

log = logging.getLogger("shd_vision.quickstart")


def comparison_table(rows: List[Dict[str, Any]]) -> str:
    """Markdown table: one row per run, best top-1 first."""
    lines = ["| method | loss terms | top-1 (%) | best top-1 (%) | train images/s | time |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        terms = " + ".join(f"{w:g}·{n}" for n, w in r["terms"].items())
        lines.append(f"| {r['label']} | {terms} | {r['top1']:.2f} | {r['best_top1']:.2f} | "
                     f"{r['train_samples_per_s']:.0f} | {format_duration(r['wall_time_s'])} |")
    return "\n".join(lines)


def shared_overrides(task_overrides: List[str]) -> List[str]:
    """The command-line overrides that apply to every run: all but the quickstart's own keys."""
    own = ("quickstart.", "hydra.", "task_name=", "run_name=")
    return [o for o in task_overrides if not o.lstrip("+~").startswith(own)]


def quickstart(cfg: DictConfig, overrides: List[str]) -> Dict[str, Any]:
    """Run the plan in ``cfg.quickstart``; ``overrides`` (train.py overrides) apply to every run."""
    out_dir = Path(cfg.paths.output_dir)
    plan, common = cfg.quickstart, list(overrides)
    probe = compose_train(list(plan.students) + common + [f"kd={plan.methods[0]}"])
    checkpoint = Path(probe.teacher.checkpoint)
    if checkpoint.is_file():
        log.info("reusing the cached teacher %s", checkpoint)
    else:
        log.info("no teacher at %s yet: training it first (cached for later runs)", checkpoint)
        train(compose_train(list(plan.teacher) + common + ["trainer.resume=auto"]))
    teacher_summary = checkpoint.parent.parent / "summary.json"
    rows = []
    for method in plan.methods:
        log.info("=== student with kd=%s ===", method)
        extra = list(plan.method_overrides.get(method, []))
        run = compose_train(list(plan.students) + extra + common + [f"kd={method}", f"hydra.run.dir={out_dir / method}"])
        rows.append({**train(run)[0], "label": f"kd={method}"})
    rows.sort(key=lambda r: -r["top1"])
    if teacher_summary.is_file():
        rows.append({**json.loads(teacher_summary.read_text()), "label": "teacher"})
    table = comparison_table(rows)
    curves = curves_png({r["label"]: read_jsonl(Path(r["run_dir"]) / "metrics.jsonl") for r in rows},
                        out_dir / "comparison.png", "Fashion-MNIST quickstart: students and teacher")
    (out_dir / "comparison.md").write_text(table + "\n")
    (out_dir / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    pictures = [str(curves)] + [p for r in rows for p in r["pictures"]]
    log.info("quickstart comparison (validation top-1 on Fashion-MNIST's test split):\n%s\n\n"
             "pictures:\n  %s\nfiles: %s (comparison.md, comparison.json)", table, "\n  ".join(pictures), out_dir)
    return {"rows": rows, "table": table, "pictures": pictures, "out_dir": str(out_dir)}


@hydra.main(version_base="1.3", config_path="../conf", config_name="quickstart")
def main(cfg: DictConfig) -> None:
    overrides = shared_overrides(list(HydraConfig.get().overrides.task))
    cli.run_task(lambda c: quickstart(c, overrides), cfg)


if __name__ == "__main__":
    cli.main(main)
