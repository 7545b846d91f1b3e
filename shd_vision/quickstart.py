"""The embedded default end to end: ``python -m shd_vision.quickstart``.

Distils one student per method in ``conf/quickstart.yaml`` from the shipped Fashion-MNIST
teacher (or one it trains first, with ``quickstart.retrain_teacher=true``) and ends with a
comparison table, a plot of all validation curves and the paths of every picture. Each run is
an ordinary ``train.py`` run, composed from the same configs: the plan's overrides plus the
quickstart's own command line (``python -m shd_vision.quickstart debug=fast`` makes every run a
debug run).

One seed's top-1 moves by a point or more from seed to seed at this budget, so the table shows,
next to each number, the mean ± std over three seeds of the same plan: a run of
``quickstart.seeds=[0,1,2]`` shipped as ``quickstart.reference``.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from shd_vision import cli
from shd_vision.config import compose_train
from shd_vision.engine.logbook import format_duration, read_jsonl, run_logging
from shd_vision.engine.train import train
from shd_vision.viz.plots import curves_png

log = logging.getLogger("shd_vision.quickstart")

# overrides that change where and how fast a run goes, not what it computes
NEUTRAL = ("seed=", "paths.", "trainer.threads=", "trainer.device=", "logger", "trainer.resume=")


def mean_std(values: List[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def comparison_table(rows: List[Dict[str, Any]], reference: Optional[Dict[str, Any]]) -> str:
    """Markdown table, one row per method: top-1 of this run's seeds, and the reference's spread."""
    ref = {r["label"]: r for r in (reference or {}).get("rows", [])}
    n = max(len(r["top1s"]) for r in rows)
    head = f"top-1 (%), {'mean ± std of ' + str(n) + ' seeds' if n > 1 else 'this run'}"
    ref_head = f"reference: {len(reference['seeds'])} seeds, mean ± std" if reference else "reference"
    lines = [f"| method | loss terms | {head} | {ref_head} | train images/s | time per run |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        terms = " + ".join(f"{w:g}·{name}" for name, w in r["terms"].items())
        noise = mean_std(ref[r["label"]]["top1s"]) if r["label"] in ref else "–"
        lines.append(f"| {r['label']} | {terms} | {mean_std(r['top1s'])} | {noise} | "
                     f"{r['train_samples_per_s']:.0f} | {format_duration(r['wall_time_s'])} |")
    return "\n".join(lines)


def shared_overrides(task_overrides: List[str]) -> List[str]:
    """The command-line overrides that apply to every run: all but the quickstart's own keys."""
    own = ("quickstart.", "hydra.", "task_name=", "run_name=")
    return [o for o in task_overrides if not o.lstrip("+~").startswith(own)]


def plan_key(plan: DictConfig, common: List[str]) -> List[str]:
    """What decides the numbers: the students' overrides and the command line's, less the neutral."""
    return list(plan.students) + [o for o in common if not o.lstrip("+~").startswith(NEUTRAL)]


def read_reference(path: Optional[str], key: List[str]) -> Optional[Dict[str, Any]]:
    """The shipped multi-seed comparison when it measured this plan, else None (with a note)."""
    if not path or not Path(path).is_file():
        return None
    reference = json.loads(Path(path).read_text())
    if reference.get("plan") != key:
        log.info("the reference %s measured the plan %s, not this one (%s): no noise column", path,
                 reference.get("plan"), key)
        return None
    return reference


def aggregate(label: str, runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One table row from a method's runs (one per seed)."""
    top1s = [r["top1"] for r in runs]
    return {"label": label, "terms": runs[0]["terms"], "top1s": top1s, "top1": statistics.mean(top1s),
            "train_samples_per_s": statistics.median(r["train_samples_per_s"] for r in runs),
            "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs),
            "run_dirs": [r["run_dir"] for r in runs], "pictures": runs[0]["pictures"]}


def teacher_row(checkpoint: Path) -> Optional[Dict[str, Any]]:
    """The teacher's training summary: beside its exported weights, or in the run that wrote them."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for candidate in (folder / "summary.json", folder.parent / "summary.json"):
        if candidate.is_file():
            summary = json.loads(candidate.read_text())
            return aggregate("teacher", [{**summary, "pictures": [], "run_dir": str(candidate.parent)}])
    return None


def quickstart(cfg: DictConfig, overrides: List[str]) -> Dict[str, Any]:
    """Run the plan in ``cfg.quickstart``; ``overrides`` (train.py overrides) apply to every run."""
    out_dir = Path(cfg.paths.output_dir)
    plan, common = cfg.quickstart, list(overrides)
    if plan.retrain_teacher:
        teacher_cfg = compose_train(list(plan.teacher) + common + ["trainer.resume=auto", "trainer.export=true"])
        checkpoint = Path(teacher_cfg.paths.output_dir) / "export"
        if (checkpoint / "model.safetensors").is_file():
            log.info("reusing the teacher trained earlier, %s", checkpoint)
        else:
            log.info("training the teacher first (cached for later runs in %s)", checkpoint.parent)
            train(teacher_cfg)
        common = common + [f"teacher.checkpoint={checkpoint}"]
    else:
        probe = compose_train(list(plan.students) + common + [f"kd={plan.methods[0]}"])
        checkpoint = Path(probe.teacher.checkpoint)
        log.info("teacher: %s", checkpoint)
    reference = read_reference(plan.reference, plan_key(plan, common)) if len(plan.seeds) == 1 else None
    runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in plan.methods}
    for seed in plan.seeds:
        for method in plan.methods:
            log.info("=== student with kd=%s, seed %d ===", method, seed)
            run_dir = out_dir / method / (f"seed{seed}" if len(plan.seeds) > 1 else "")
            extra = list(plan.method_overrides.get(method, []))
            run = compose_train(list(plan.students) + extra + common +
                                [f"kd={method}", f"seed={seed}", f"hydra.run.dir={run_dir}"])
            runs[method].append(train(run)[0])
    rows = sorted((aggregate(f"kd={m}", runs[m]) for m in plan.methods), key=lambda r: -r["top1"])
    teacher = teacher_row(checkpoint)
    table = comparison_table(rows + ([teacher] if teacher else []), reference)
    # the students only: their epochs are passes over their subset, the teacher's over 60k images
    curves = curves_png({r["label"]: read_jsonl(Path(r["run_dirs"][0]) / "metrics.jsonl") for r in rows},
                        out_dir / "comparison.png", f"Fashion-MNIST quickstart students, seed {plan.seeds[0]}")
    (out_dir / "comparison.md").write_text(table + "\n")
    result = {"plan": plan_key(plan, common), "seeds": list(plan.seeds), "rows": rows, "teacher": teacher}
    (out_dir / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    pictures = [str(curves)] + [p for r in rows for p in r["pictures"]]
    note = ("" if reference else "\n(no reference spread for this plan: compare only differences larger "
            "than the seed-to-seed spread docs/results.md reports)")
    log.info("quickstart comparison (validation top-1 on Fashion-MNIST's 10k test images):\n%s%s\n\n"
             "pictures:\n  %s\nfiles: %s (comparison.md, comparison.json)", table, note,
             "\n  ".join(pictures), out_dir)
    return {**result, "table": table, "pictures": pictures, "out_dir": str(out_dir)}


@hydra.main(version_base="1.3", config_path="../conf", config_name="quickstart")
def main(cfg: DictConfig) -> None:
    overrides = shared_overrides(list(HydraConfig.get().overrides.task))
    with run_logging(Path(cfg.paths.output_dir), True, "quickstart.log"):  # the console's lines, students' too
        cli.run_task(lambda c: quickstart(c, overrides), cfg)


if __name__ == "__main__":
    cli.main(main)
