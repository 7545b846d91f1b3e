"""``python -m shd_vision.report dir=DIR``: a results table from a sweep.

Reads every run under ``DIR`` (a ``train.py -m`` multirun directory, a quickstart directory, or
any folder of run directories), finds the config values that differ between runs, and groups the
runs by them (or by the keys in ``by``), seeds aside: each row is one setting with its validation
top-1 as mean ± std over seeds, how much it still gained over the last quarter of training (is it
converged?), and the median of its runs' training throughput and time. ``paired=[...]`` adds
every row's difference to the named rows, seed by seed (same seed: same initialisation and data
order), with a 95% confidence interval. Writes ``results.md``, ``results.csv`` (one line per run
too), ``curves.png`` (validation top-1 per epoch, mean over seeds, a band of ± one std) and
``best_overrides.txt`` (the best row as command-line overrides, for a sweep's next stage);
``x=KEY`` adds ``trend.png``, top-1 against that key, one line per value of the others. A
best value at the smallest or largest value a numeric key tried is flagged (results.md and
stderr), and ``extend=[keys]`` writes ``extend.txt``: the sweeps that take those keys' grids one
step past such an edge, x3 or /3 (``key:2``: x2 or /2), which ``scripts/study.sh`` runs until
every chosen value is interior.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import hydra
import matplotlib.pyplot as plt
from omegaconf import DictConfig, OmegaConf

import shd_vision.viz  # noqa: F401  (matplotlib without a display)
from shd_vision import cli
from shd_vision.config import inside_project, resumable
from shd_vision.engine.logbook import format_duration, read_jsonl
from shd_vision.errors import UserError

log = logging.getLogger("shd_vision.report")

# Keys that differ between runs without being a setting: where files go, how a run was named.
IGNORED = ("paths.", "run_name", "hydra.", "trainer.resume", "trainer.threads",
           "teacher.cache")  # a cache's path differs per seed; the table's teacher column says what it held


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


def last_quarter_gain(run: Run) -> Optional[float]:
    """Validation top-1 at the end minus at 75% of training (points); None without 4 evaluations."""
    val = [(r["epoch"], r["top1"]) for r in run.records if r.get("split") == "val"]
    if len(val) < 4:
        return None
    end = val[-1][0]
    before = [top1 for epoch, top1 in val if epoch <= 0.75 * end + 1e-9]
    return val[-1][1] - before[-1] if before else None


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (normal beyond)
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
       2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042]


def paired_difference(runs: List[Run], reference: List[Run], seed_key: str = "seed") -> Optional[Dict[str, Any]]:
    """Mean top-1 difference over the seeds both rows ran, with a t-based 95% confidence interval
    (``pairs`` says over how many; ``unpaired`` how many runs of either row had no partner). None
    without a common seed, or when either row holds a seed twice (which run would pair is a guess)."""
    seeds, ref_seeds = [r.config.get(seed_key) for r in runs], [r.config.get(seed_key) for r in reference]
    if len(set(seeds)) < len(seeds) or len(set(ref_seeds)) < len(ref_seeds):
        return None
    ref = {r.config.get(seed_key): r.summary["top1"] for r in reference}
    diffs = [r.summary["top1"] - ref[r.config.get(seed_key)] for r in runs if r.config.get(seed_key) in ref]
    if not diffs:
        return None
    mean, unpaired = statistics.fmean(diffs), len(runs) + len(reference) - 2 * len(diffs)
    if len(diffs) < 2:
        return {"diff": mean, "ci": None, "pairs": 1, "unpaired": unpaired}
    half = (T95[len(diffs) - 2] if len(diffs) <= 31 else 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"diff": mean, "ci": (mean - half, mean + half), "pairs": len(diffs), "unpaired": unpaired}


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:12] + "..." + text[-25:]  # two long paths differ at their ends


def mixed_keys(members: List[Run], keys: List[str], seed_key: str = "seed") -> List[str]:
    """``key (value: n runs, ...)`` for every run-defining value on which runs meant for one row
    differ: their configs (paths inside a project relative to it: the same shipped teacher in two
    clones), the facts of their summaries and the steps they ran (``run.steps``: a run stopped
    early by ``trainer.max_steps`` is another result). Not compared: ``keys``, the seed, the keys
    a run may change between sessions, and a key some runs lack (recorded before it existed)."""
    views = [{**{k: inside_project(v, str(r.config.get("paths.root_dir") or "").rstrip("/"))
                 for k, v in r.config.items()},
              **{f"run.{k}": v for k, v in (r.summary.get("facts") or {}).items()},
              **({"run.steps": r.summary["steps"]} if "steps" in r.summary else {})} for r in members]
    shared = set.intersection(*(set(v) for v in views))
    out = []
    for key in sorted(shared):
        if key in keys or key == seed_key or key.startswith(IGNORED) or resumable(key):
            continue
        counts: Dict[str, int] = {}
        for view in views:
            counts[_shown(view[key])] = counts.get(_shown(view[key]), 0) + 1
        if len(counts) > 1:
            out.append(f"{key} ({', '.join(f'{v}: {n} run(s)' for v, n in counts.items())})")
    return out


def teacher_source(runs: List[Run]) -> str:
    """Where a row's teacher logits came from: ``live``, ``cache top-K dtype`` (teacher.cache), or
    ``none``; rows that mixed them list each."""
    kinds = set()
    for r in runs:
        cache = r.summary.get("teacher_cache")
        kinds.add("none" if r.summary.get("teacher") is None else
                  f"cache top-{cache['top_k']} {cache['dtype']}" if cache else "live")
    return " + ".join(sorted(kinds))


def row_label(keys: List[str], row: Dict[str, Any]) -> str:
    return ", ".join(str(row[k]) if len(keys) == 1 else f"{k.split('.')[-1]}={row[k]}" for k in keys) or "runs"


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
    if any(len({teacher_source([r]) for r in members} - {"none"}) > 1 for members in groups.values()):
        # a live teacher and a cache of K logits are different settings: never one row
        groups = {}
        for run in runs:
            groups.setdefault(tuple(run.config.get(k) for k in keys) + (teacher_source([run]),), []).append(run)
        keys = keys + ["teacher"]
    for members in groups.values():
        mixed = mixed_keys(members, keys, seed_key)
        if mixed:
            raise UserError(f"the row {row_label(keys, {k: members[0].config.get(k) for k in keys})} would mix "
                            f"runs defined differently, in {'; '.join(mixed)}. Add the key(s) to by=[...] to "
                            "give each setting its own row, or report each set of runs on its own (dir=...).")
    rows = []
    for values, members in groups.items():
        top1, top1_std = _mean_std([r.summary["top1"] for r in members])
        # medians: one run slowed by a busy machine should not move a setting's cost
        rate = statistics.median(r.summary["train_samples_per_s"] for r in members)
        seconds = statistics.median(r.summary["wall_time_s"] for r in members)
        gains = [g for g in map(last_quarter_gain, members) if g is not None]
        seeds = [r.config.get(seed_key) for r in members]
        rows.append({"teacher": teacher_source(members), **dict(zip(keys, values)), "top1": top1,
                     "top1_std": top1_std, "seeds": len(members),
                     "repeated_seeds": sorted({s for s in seeds if seeds.count(s) > 1}, key=str),
                     "gain": statistics.fmean(gains) if gains else None,
                     "samples_per_s": rate, "wall_time_s": seconds, "runs": members,
                     "val_loss": statistics.fmean(r.summary.get("val_loss", math.inf) for r in members)})
    # ties on top-1 (one seed per trial on a few thousand images moves in steps of 0.02) go to the
    # lower validation loss, never to the order the directories were read in
    rows.sort(key=lambda r: (-round(r["top1"], 6), r["val_loss"]))
    return keys, rows


def add_paired(keys: List[str], rows: List[Dict[str, Any]], references: List[str]) -> None:
    """``row["vs"][ref]``: each row's paired difference to its reference row: the row labelled
    ``ref`` or, in a table of several keys, the row that has this row's values on every key but
    the one taking the value ``ref`` (``by=[model.num_heads,kd.name] paired=[minilm]`` pairs each
    row with MiniLMv2 at its own head count; ``key=value`` names the key where the value alone
    would be ambiguous). None where that row is missing."""
    labels = {row_label(keys, r): r for r in rows}
    for r in rows:
        r["vs"], r["is_reference"] = {}, set()
    for ref in references:
        named, _, text = ref.partition("=")
        if text and named in keys:  # paired=[key=value]
            key, value = named, text
        else:
            owners = [] if ref in labels else [k for k in keys if any(str(r[k]) == ref for r in rows)]
            if len(owners) > 1:
                raise UserError(f"paired={ref} is a value of {' and of '.join(owners)}; name the key, e.g. "
                                f"paired=['{owners[-1]}={ref}'] (quoted for Hydra).")
            key, value = (owners or [None])[0], ref
        if ref not in labels and (key is None or not any(str(r[key]) == value for r in rows)):
            raise UserError(f"paired={ref} is not a row of this table; its rows are: {', '.join(labels)}.")
        for r in rows:
            if (row_label(keys, r) == ref) if key is None else str(r[key]) == value:
                r["is_reference"].add(ref)
                continue
            match = labels.get(ref) if key is None else next(
                (o for o in rows if str(o[key]) == value and all(o[k] == r[k] for k in keys if k != key)), None)
            r["vs"][ref] = None if match is None else paired_difference(r["runs"], match["runs"])


def _diff(d: Optional[Dict[str, Any]]) -> str:
    """A paired cell: the mean difference and its interval; how many seeds paired where some runs
    had no partner, and a single pair says it has no interval."""
    if d is None:
        return "–"
    if d["ci"] is None:
        return f"{d['diff']:+.2f} (1 pair, no CI)"
    count = f" ({d['pairs']} pairs)" if d["unpaired"] else ""
    return f"{d['diff']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]{count}"


def markdown(keys: List[str], rows: List[Dict[str, Any]], references: List[str] = ()) -> str:
    # the column only where a row used a cache and the rows are not told apart by it already
    cached = "teacher" not in keys and any(r["teacher"].startswith("cache") for r in rows)
    head = keys + ["teacher"] * cached + ["top-1 (%)", "seeds", "last-quarter gain"]
    head += [f"vs {ref} (95% CI)" for ref in references] + ["train images/s", "time"]
    seeds = per_seed(rows)
    head += [seeds[0]] if seeds else []
    lines = ["| " + " | ".join(head) + " |",
             "|" + "---|" * len(keys) + "---:|" * (len(head) - len(keys) - bool(seeds)) + "---|" * bool(seeds)]
    for i, r in enumerate(rows):
        cells = [str(r[k]) for k in keys] + [r["teacher"]] * cached
        cells += [f"{r['top1']:.2f} ± {r['top1_std']:.2f}" if r["seeds"] > 1 else f"{r['top1']:.2f}", str(r["seeds"]),
                  "–" if r["gain"] is None else f"{r['gain']:+.2f}"]
        cells += ["" if ref in r["is_reference"] else _diff(r["vs"][ref]) for ref in references]
        cells += [f"{r['samples_per_s']:.0f}", format_duration(r["wall_time_s"])] + ([seeds[1][i]] if seeds else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed(rows: List[Dict[str, Any]], seed_key: str = "seed") -> Optional[Tuple[str, List[str]]]:
    """The table's last column where a row holds several runs: each row's top-1 seed by seed (a
    reader checks a paired difference against it), the seeds named once in the header where every
    row ran the same ones; None where every row is one run."""
    if all(len(r["runs"]) < 2 for r in rows):
        return None
    values = []
    for r in rows:
        by_seed: Dict[Any, List[float]] = {}
        for run in r["runs"]:
            by_seed.setdefault(run.config.get(seed_key), []).append(run.summary["top1"])
        values.append(by_seed)
    orders = [_ordered(set(v)) for v in values]
    same = all(o == orders[0] for o in orders)
    cells = [", ".join(("" if same else f"{s}: ") + " / ".join(f"{x:.2f}" for x in v[s]) for s in order)
             for order, v in zip(orders, values)]
    return (f"per seed ({', '.join(map(str, orders[0]))})" if same else "per seed"), cells


def validated_on(runs: List[Run]) -> str:
    """Which images the table's top-1 is measured on (each kind, where runs differ), counted as
    the runs' last validation counted them (a stream ignores data.val_size; a holdout can be cut
    by it); the config's sizes for records without counts."""
    def where(run: Run) -> str:
        holdout, split, size, name = (run.config.get(f"data.{k}") for k in ("holdout", "val_split", "val_size", "name"))
        counted = [int(r["samples"]) for r in run.records if r.get("split") == "val" and "samples" in r]
        count = counted[-1] if counted else None if str(name).startswith("wds/") else min(
            (n for n in (holdout, size) if n), default=None)
        if holdout:
            return f"{count} held-out training images (data.holdout)"
        return f"{count} images of the {split} split" if count else f"the {split} split"
    return "validation top-1 on " + " / ".join(sorted({where(r) for r in runs}))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def edge_optima(keys: List[str], rows: List[Dict[str, Any]], studied: Optional[str] = None
                ) -> Dict[str, Tuple[Any, str, List[Any]]]:
    """``{key: (best value, "smallest" | "largest", values tried)}`` for every numeric key swept
    through the best row (rows equal to it on every other key take two or more of its values)
    whose best value lies at an end of them: the optimum may lie beyond the grid, so a choice
    made there is incomplete. A key that only differs between methods (each method's own weight
    in a comparison) is not swept; ``studied`` (the report's ``x``) is varied on purpose, not
    chosen, and is never flagged."""
    best, edges = rows[0], {}
    for key in keys:
        if key == studied:
            continue
        line = [r for r in rows if all(r[k] == best[k] for k in keys if k != key)]
        tried = sorted({r[key] for r in line if _number(r[key])})
        if len(tried) > 1 and _number(best[key]) and best[key] in (tried[0], tried[-1]):
            edges[key] = (best[key], "smallest" if best[key] == tried[0] else "largest", tried)
    return edges


def _ordered(values: set) -> List[Any]:
    return sorted(values) if all(_number(v) for v in values) else sorted(values, key=str)


def _beyond(value: float, side: str, factor: float, count: bool = False) -> Optional[Any]:
    """The next grid value past an edge: ``x factor`` above, ``/ factor`` below; None where a
    multiplicative step cannot go: a value <= 0, or a ``count`` (relation heads) that would leave
    the whole numbers >= 1. Four significant digits, snapped to a whole number within 0.1% (so
    0.3333 x 3 is 1.0 again, not 0.9999); ints stay ints."""
    if value <= 0:
        return None
    new = value * factor if side == "largest" else value / factor
    whole = round(new)
    if count:
        return int(new) if float(new).is_integer() and new >= 1 else None
    if whole and abs(new / whole - 1) < 1e-3:
        return whole if isinstance(value, int) else float(whole)
    return float(f"{new:.4g}")


def _step(item: str) -> Tuple[str, float]:
    """``key`` or ``key:factor`` of ``extend=[...]`` as (key, factor), 3 by default."""
    key, _, text = item.partition(":")
    try:
        factor = float(text or 3)
    except ValueError:
        factor = 0.0
    if not 1 < factor < math.inf:
        raise UserError(f"extend=[{item}]: the step factor after ':' is '{text}'; give a number above 1 "
                        "(e.g. kd.terms.minilm.relation_heads:2), or the key alone to step x3 and /3.")
    return key, factor


def beyond_edges(keys: List[str], rows: List[Dict[str, Any]], extendable: List[str], studied: Optional[str] = None
                 ) -> Dict[str, Optional[Any]]:
    """``{key: its next value past its edge, or None where no step can go}`` for every edge key in
    ``extendable`` (``key`` or ``key:factor``). A key given with its own factor whose runs hold
    whole numbers is a count (relation heads); a plain key is not, even when its grid was written
    as whole numbers (``temperature=1,2,4``: 1 / 3 is a valid temperature)."""
    edges = edge_optima(keys, rows, studied)
    factors = dict(_step(item) for item in extendable)
    unknown = [k for k in factors if k not in keys]
    if unknown:  # a misspelt key would silently leave its edge unextended
        raise UserError(f"extend=[{','.join(extendable)}]: {', '.join(unknown)} is not one of the table's keys "
                        f"(by=...): {', '.join(keys)}.")
    explicit = {item.partition(":")[0] for item in extendable if ":" in item}
    count = {k: k in explicit and all(isinstance(r[k], int) and _number(r[k]) for r in rows) for k in factors}
    return {k: _beyond(edges[k][0], edges[k][1], factors[k], count[k]) for k in keys if k in edges and k in factors}


def extension(keys: List[str], rows: List[Dict[str, Any]], extendable: List[str], studied: Optional[str] = None
              ) -> List[str]:
    """The sweeps that extend a grid past its edge optima, as Hydra override lines, one product
    grid each: every edge key in ``extendable`` (``key`` or ``key:factor``) gains one value beyond
    its edge, ``x`` or ``/`` the factor (3 by default; 2 suits a count such as relation heads), and
    the lines cover exactly the points of the extended grid that were not run (the union, over the
    extended keys, of new values of that key x extended values of the keys before it x the old
    values of the keys after it). Empty when every chosen value of ``extendable`` is interior or
    can go no further (:func:`_beyond`)."""
    new = {k: [v] for k, v in beyond_edges(keys, rows, extendable, studied).items() if v is not None}
    old = {k: _ordered({r[k] for r in rows}) for k in keys}
    lines = []
    for i, key in enumerate(keys):
        if key not in new:
            continue
        grid = {k: old[k] + new.get(k, []) for k in keys[:i]}
        grid.update({key: new[key]}, **{k: old[k] for k in keys[i + 1:]})
        lines.append(" ".join(f"{k}={','.join(str(v) for v in grid[k])}" for k in keys))
    return lines


def around(choice: str, extendable: List[str]) -> str:
    """The grid one step either side of a chosen point (``k=v ...``, as best_overrides.txt) for its
    keys in ``extendable`` (``key`` or ``key:factor``, as ``extension``), the others as chosen: a
    sweep of a neighbouring setting (the next head ratio) starts where the last one ended. A
    whole number under ``key:factor`` is a count (best_overrides.txt writes a float 2.0 as 2, so
    the explicit factor tells): its steps stay whole numbers >= 1."""
    factors, parts = dict(_step(item) for item in extendable), []
    explicit = {item.partition(":")[0] for item in extendable if ":" in item}
    for item in choice.split():
        key, _, text = item.partition("=")
        value = int(text) if text.lstrip("-").isdigit() else float(text)
        count = key in explicit and isinstance(value, int)  # key:2 on a whole number: a count, as relation heads
        grid = [_beyond(value, "smallest", factors[key], count), value, _beyond(value, "largest", factors[key], count)] \
            if key in factors else [value]
        grid = [v for v in grid if v is not None]
        parts.append(f"{key}={','.join(map(str, grid))}")
    return " ".join(parts)


def best_overrides(keys: List[str], row: Dict[str, Any]) -> str:
    """The row as Hydra overrides, ``key=value ...``."""
    return " ".join(f"{k}={row[k]}" for k in keys)


def write_csv(keys: List[str], rows: List[Dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        extra = [] if "teacher" in keys else ["teacher"]
        writer.writerow(["kind", *keys, *extra, "seed", "top1", "top1_std", "seeds", "samples_per_s", "wall_time_s",
                         "run_dir"])
        for r in rows:
            cells = [r[k] for k in keys + extra]
            writer.writerow(["mean", *cells, "", f"{r['top1']:.4f}", f"{r['top1_std']:.4f}", r["seeds"],
                             f"{r['samples_per_s']:.1f}", f"{r['wall_time_s']:.1f}", ""])
            for run in r["runs"]:
                s = run.summary
                writer.writerow(["run", *cells, run.config.get("seed"), f"{s['top1']:.4f}", "", 1,
                                 f"{s['train_samples_per_s']:.1f}", f"{s['wall_time_s']:.1f}", run.path])


def curves(keys: List[str], rows: List[Dict[str, Any]], path: Path, title: str) -> Path:
    """Validation top-1 per epoch for every row: the mean over its seeds and a ± std band, the whole
    run and (right) its second half zoomed, where converged rows differ by a few tenths. Ten colours,
    then the same colours dashed, so that a 13-row study has no two rows alike."""
    fig, (whole, end) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    colours, styles = plt.get_cmap("tab10").colors, ["-", "--", ":"]
    bands = []  # (epoch, mean - std, mean + std) of every row
    for i, r in enumerate(rows):
        per_epoch: Dict[float, List[float]] = {}
        for run in r["runs"]:
            for rec in run.records:
                if rec.get("split") == "val":
                    per_epoch.setdefault(rec["epoch"], []).append(rec["top1"])
        epochs = sorted(per_epoch)
        stats = [_mean_std(per_epoch[e]) for e in epochs]
        mean, low, high = [m for m, _ in stats], [m - s for m, s in stats], [m + s for m, s in stats]
        style = dict(color=colours[i % 10], ls=styles[i // 10 % 3])
        for ax in (whole, end):
            ax.plot(epochs, mean, marker="o", ms=2.5, label=row_label(keys, r), **style)
            ax.fill_between(epochs, low, high, color=style["color"], alpha=0.12)
        bands += zip(epochs, low, high)
    if bands:
        last = max(e for e, _, _ in bands)
        late = [(lo, hi) for e, lo, hi in bands if e >= last / 2]
        end.set_xlim(last / 2, last * 1.01)
        end.set_ylim(min(lo for lo, _ in late) - 0.5, max(hi for _, hi in late) + 0.5)
    whole.set(xlabel="epoch", ylabel="validation top-1 (%)", title=title)
    end.set(xlabel="epoch", title="second half, zoomed")
    return _save(fig, (whole, end), path, legend_size=7)


def _save(fig: plt.Figure, axes: Tuple[plt.Axes, ...], path: Path, legend_size: int) -> Path:
    """Grid every panel, put the legend right of the last, write the PNG."""
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=legend_size, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def x_positions(values: List[Any]) -> Dict[Any, float]:
    """Where each x value goes on trend.png's axis: numbers at their value, anything else at its
    rank among all values, so every line shares one ordered axis (matplotlib would place string
    categories in the order it first meets them, line by line)."""
    union = sorted(set(values), key=lambda v: (not _number(v), v if _number(v) else str(v)))
    if all(_number(v) for v in union):
        return {v: float(v) for v in union}
    return {v: float(i) for i, v in enumerate(union)}


def dodge(positions: List[float], lines: int, log_x: bool) -> List[float]:
    """Each line's horizontal offset (in decades on a log axis), so that methods with nearly
    equal top-1 at one x keep their error bars apart: together the lines span a quarter of the
    narrowest gap between two x values (of 1 with a single x)."""
    axis = [math.log10(p) for p in positions] if log_x else positions
    gaps = [b - a for a, b in zip(axis, axis[1:])]
    width = 0.25 * (min(gaps) if gaps else 1.0)
    return [0.0] * lines if lines < 2 else [width * (i / (lines - 1) - 0.5) for i in range(lines)]


def trend(keys: List[str], rows: List[Dict[str, Any]], x: str, path: Path, title: str,
          x_label: Optional[str] = None, y_label: str = "top-1") -> Path:
    """Top-1 against the key ``x``: one line per value of the other keys (mean over seeds, ± one
    std as error bars), e.g. each method against the student's head count."""
    if x not in keys:
        raise UserError(f"x={x} must be one of the table's keys (by=...): {', '.join(keys)}.")
    others = [k for k in keys if k != x]
    lines: Dict[str, List[Tuple[Any, float, float]]] = {}
    for r in rows:
        lines.setdefault(row_label(others, r), []).append((r[x], r["top1"], r["top1_std"]))
    at = x_positions([r[x] for r in rows])
    log_x = all(_number(v) and v > 0 for v in at) and max(at) >= 10 * min(at)  # a sweep's steps (1, 3, 9, 27)
    shifts = dodge(sorted(at.values()), len(lines), log_x)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("tab10").colors
    for i, (label, points) in enumerate(sorted(lines.items())):
        points.sort(key=lambda p: at[p[0]])
        xs = [at[p[0]] * 10 ** shifts[i] if log_x else at[p[0]] + shifts[i] for p in points]
        ax.errorbar(xs, [p[1] for p in points], yerr=[p[2] for p in points],
                    marker="o", capsize=3, color=colours[i % 10], label=label)
    if log_x:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(list(at.values()), [str(v) for v in at])
    ax.set(xlabel=x_label or x, ylabel="\n".join([*textwrap.wrap(f"{y_label} (%)", 44), "mean ± std over seeds"]), title=title)
    return _save(fig, (ax,), path, legend_size=8)


def report(cfg: DictConfig) -> Dict[str, Any]:
    root = Path(cfg.dir)
    if not root.is_dir():
        raise UserError(f"dir={root} is not a directory; give a multirun directory such as "
                        "logs/train/multiruns/<time>, or any folder holding run directories.")
    runs = find_runs(root)
    if not runs:
        raise UserError(f"dir={root} holds no finished run (a folder with summary.json and config.yaml).")
    keys, rows = summarise(runs, list(cfg.by) if cfg.by else None)
    references = list(cfg.paired)
    add_paired(keys, rows, references)
    out = Path(cfg.out) if cfg.out else root
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(keys, rows, references)
    notes = [f"{validated_on(runs)}; mean ± sample standard deviation (n − 1) over seeds; last-quarter gain: "
             "top-1 at the end minus at 75% of training (mean over seeds); train images/s and time: medians "
             "over seeds"]
    if any(r["teacher"].startswith("cache") for r in rows):
        notes.append("teacher: live (the teacher ran in every step) or cache top-K (its K largest logits per row "
                     "replayed from python -m shd_vision.cache; with K = the classes in float32, exactly the live run); a cached "
                     "row's images/s and time leave out building its cache, which the teacher paid once")
    if references:
        notes.append("vs: this row's top-1 minus the reference row's, paired by seed, mean and t-based 95% "
                     "confidence interval; '(k pairs)' where only k seeds are in both rows; – where a row "
                     "lacks its reference or holds a seed twice")
    edges, extend = edge_optima(keys, rows, cfg.x), extension(keys, rows, list(cfg.extend), cfg.x)
    stuck = [k for k, v in beyond_edges(keys, rows, list(cfg.extend), cfg.x).items() if v is None]
    flags = [f"REPEATED SEEDS: row {row_label(keys, r)} holds seed(s) {', '.join(map(str, r['repeated_seeds']))} "
             "more than once (the same setting and seed in two run directories): its mean counts each, and "
             "it is paired with nothing" for r in rows if r["repeated_seeds"]]
    flags += [f"EDGE: the best {key}={value} is the {side} value tried ({', '.join(map(str, tried))}); the "
              "optimum may lie beyond the grid" + ("; no step can go past it (a count stays a whole number >= 1, a "
                                                   "multiplicative step needs a value above 0)" if key in stuck else "")
              for key, (value, side, tried) in edges.items()]
    tied = [r for r in rows[1:] if round(r["top1"], 6) == round(rows[0]["top1"], 6)]
    if tied:
        how = ("the lowest validation loss chose" if math.isfinite(rows[0]["val_loss"]) else
               "the records hold no validation loss, so the order they were read in chose")
        flags.append(f"TIE: the best top-1 ({rows[0]['top1']:.2f}) is shared by {row_label(keys, rows[0])} and "
                     f"{'; '.join(row_label(keys, r) for r in tied)}; {how} {row_label(keys, rows[0])}")
    for flag in flags:
        notes.append(flag)
        sys.stderr.write(f"report: {flag} ({root})\n")
    (out / "results.md").write_text(table + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    (out / "best_overrides.txt").write_text(best_overrides(keys, rows[0]) + "\n")
    (out / "extend.txt").write_text("".join(line + "\n" for line in extend))
    write_csv(keys, rows, out / "results.csv")
    pictures = [curves(keys, rows, out / "curves.png", f"{root.name}: {len(runs)} runs")]
    if cfg.x:
        pictures.append(trend(keys, rows, cfg.x, out / "trend.png", f"{root.name}: top-1 against {cfg.x}",
                              cfg.x_label, validated_on(runs)))
    log.info("%d runs in %s, %d settings (mean ± std over seeds):\n%s\n\nfiles: %s", len(runs), root,
             len(rows), table, ", ".join(map(str, [out / "results.md", out / "results.csv", *pictures])))
    return {"keys": keys, "rows": [{k: v for k, v in r.items() if k != "runs"} for r in rows], "table": table,
            "best": best_overrides(keys, rows[0]), "edges": edges}


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    cli.run_task(report, cfg)


if __name__ == "__main__":
    cli.main(main)
