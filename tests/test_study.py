"""scripts/study.sh's sweeps (study_lib.sh's tune) with a stand-in for train.py: a sweep that is
interrupted anywhere, even in its last round, ends with the same trials as one that was not."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PROJECT_ROOT

TAU, WEIGHT = "kd.terms.shd.temperature", "kd.terms.shd.weight"

# train.py -m as study.sh calls it: the product of the comma lists, run i of it in
# <log_dir>/fmnist_study/multiruns/<run_name>/<i>; a finished run is skipped. Held-out top-1 peaks
# at tau = 2, weight = 27. FAKE_BUDGET=<file>: the number of runs left before this "machine" stops.
FAKE_TRAIN = '''
import itertools, json, math, os, sys
from pathlib import Path
import yaml
args = dict(a.split("=", 1) for a in sys.argv[1:] if a != "-m")
root = Path(args.pop("paths.log_dir")) / "fmnist_study/multiruns" / args.pop("run_name")
grid = [[(k, v) for v in value.split(",")] for k, value in args.items()]
for i, point in enumerate(itertools.product(*grid)):
    run = root / str(i)
    if (run / "summary.json").exists():
        continue
    budget = Path(os.environ["FAKE_BUDGET"]) if "FAKE_BUDGET" in os.environ else None
    if budget is not None:
        left = int(budget.read_text())
        if left == 0:
            sys.exit("fake train.py: interrupted")
        budget.write_text(str(left - 1))
    config = {}
    for key, value in point:
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    tau, weight = config["kd"]["terms"]["shd"]["temperature"], config["kd"]["terms"]["shd"]["weight"]
    top1 = 90 - (math.log(weight, 3) - 3) ** 2 - math.log(tau / 2, 3) ** 2
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "summary.json").write_text(json.dumps({"status": "finished", "top1": round(top1, 2),
                                                  "train_samples_per_s": 1.0, "wall_time_s": 1.0}))
'''


def tune(tmp: Path, budget: int = -1) -> subprocess.CompletedProcess:
    """One call of study.sh's tune on the SHD grid, as study.sh makes it, on this "machine"."""
    (tmp / "fake_train.py").write_text(FAKE_TRAIN)
    wrapper = tmp / "py"
    wrapper.write_text(f'#!/bin/bash\nif [ "$1" = train.py ]; then shift; exec {sys.executable} {tmp}/fake_train.py "$@"; '
                       f'fi\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ}
    if budget >= 0:
        (tmp / "budget").write_text(str(budget))
        env["FAKE_BUDGET"] = str(tmp / "budget")
    script = f"""set -euo pipefail
py={wrapper} logs={tmp}/logs prefix=fmnist records={tmp}/records sweep="seed=0 data.holdout=50" sweeps=sweep scope=sweep
root=$logs/fmnist_study/multiruns
source scripts/study_lib.sh
keep "$records" "$root"
best=$(tune shd {TAU},{WEIGHT} "{TAU}=1,2 {WEIGHT}=1,3" {TAU},{WEIGHT} study=shd_logit)
echo "chosen: $best"
"""
    return subprocess.run(["bash", "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def trials(records: Path):
    """{(tau, weight)} of every finished run in the records."""
    out = set()
    for summary in records.glob("sweep/shd/*/*/summary.json"):
        shd = yaml.safe_load((summary.parent / "config.yaml").read_text())["kd"]["terms"]["shd"]
        out.add((shd["temperature"], shd["weight"]))
    return out


# Uninterrupted: r0 {1,2} x {1,3}; r1 tau 6 and weight 9; r2 weight 27; r3 weight 81, where 27 is
# interior: 3 taus x 5 weights.
EXPECTED = {(t, w) for t in (1, 2, 6) for w in (1, 3, 9, 27, 81)}


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [6, 13], ids=["in-round-1", "in-the-last-round"])
def test_an_interrupted_sweep_ends_with_the_trials_of_an_uninterrupted_one(tmp_path, stop_after):
    first = tune(tmp_path, budget=stop_after)
    assert first.returncode != 0 and "fake train.py: interrupted" in first.stderr  # a failed run stops the study
    assert "chosen:" not in first.stdout
    assert len(trials(tmp_path / "records")) == stop_after
    # A fresh machine: only the committed records come along.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    os.rename(tmp_path / "records", fresh / "records")
    second = tune(fresh)
    assert second.returncode == 0, second.stderr[-3000:]
    assert trials(fresh / "records") == EXPECTED
    assert len(list((fresh / "records/sweep/shd").glob("*/*/summary.json"))) == len(EXPECTED)  # no point twice
    assert sorted(p.name for p in (fresh / "records/sweep/shd").glob("r*.txt")) == ["r1.txt", "r2.txt", "r3.txt"]
    assert "sweep shd, 3 extension round(s) (cap STUDY_EXTEND=3): every chosen value is interior" in second.stderr
    assert second.stdout.strip() == f"chosen: {TAU}=2 {WEIGHT}=27"


def test_a_sweep_whose_report_refuses_its_runs_stops_the_study(tmp_path):
    """A failing report must not let tune read an earlier round's best_overrides.txt (it used to
    end the extension loop silently and print a stale choice)."""
    stray = tmp_path / "records/sweep/shd/r0/9"  # a trial of another study row at a point of the grid
    stray.mkdir(parents=True)
    (stray / "config.yaml").write_text(yaml.safe_dump({"kd": {"terms": {"shd": {"temperature": 1, "weight": 1}}},
                                                       "study": "shd_logit_select", "seed": 0}))
    (stray / "summary.json").write_text('{"status": "finished", "top1": 99.0, "train_samples_per_s": 1.0, '
                                        '"wall_time_s": 1.0}')
    earlier = tmp_path / "logs/fmnist_study/multiruns/sweep/shd"  # an earlier session's report, on this machine
    earlier.mkdir(parents=True)
    (earlier / "best_overrides.txt").write_text(f"{TAU}=6 {WEIGHT}=81\n")
    out = tune(tmp_path)
    assert out.returncode != 0 and "chosen:" not in out.stdout
    assert "would mix runs defined differently, in study (shd_logit: 1 run(s), shd_logit_select: 1 run(s))" in \
        " ".join(out.stderr.split()), out.stderr[-2000:]


def test_a_sweep_stopped_by_the_cap_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDY_EXTEND", "1")
    out = tune(tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (f"sweep shd, 1 extension round(s) (cap STUDY_EXTEND=1): stopped at the cap, still on an edge: EDGE: the "
            f"best {WEIGHT}=9 is the largest value tried (1, 3, 9)") in " ".join(out.stderr.split())
    assert out.stdout.strip() == f"chosen: {TAU}=2 {WEIGHT}=9"
    # before each multirun, how far the study is: r0's 4 trials, then r1's (tau 6; weight 9)
    progress = re.findall(r"\[study [-\d]+ [:\d]+, \d+:\d\d in\] (\d+) run\(s\) of this study finished; next: (\S+)",
                          out.stderr)
    assert progress == [("0", "sweep/shd/r0"), ("4", "sweep/shd/r1-0"), ("6", "sweep/shd/r1-1")]
