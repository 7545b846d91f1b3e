"""Hydra multirun sweeps, the report tool, the Optuna search config, and W&B logging (offline)."""

import csv
import json
import shutil

import pytest
import yaml

from conftest import PROJECT_ROOT, THREADS, paragraph, run_cli
from shd_vision.errors import UserError
from shd_vision.report import (around, dodge, edge_optima, extension, find_runs, summarise, swept_keys,
                               x_positions)
from wandb_records import history, records, run_record

FAST = ["debug=fast", "data=synthetic", "data.train_size=64", "data.val_size=32", "data.batch_size=16",
        "trainer.max_steps=2", f"trainer.threads={THREADS}", "trainer.eval_teacher=false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """kd=none,logit x seed=0,1 as one multirun (4 runs)."""
    tmp = tmp_path_factory.mktemp("sweep")
    result = run_cli("train.py", "-m", "kd=none,logit", "seed=0,1", *FAST, f"paths.log_dir={tmp}", "run_name=s1")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "train" / "multiruns" / "s1"


def test_each_sweep_point_gets_its_own_run_directory(sweep):
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2", "3"]
    configs = [yaml.safe_load((sweep / j / "config.yaml").read_text()) for j in jobs]
    assert [(c["kd"]["name"], c["seed"]) for c in configs] == [("none", 0), ("none", 1), ("logit", 0), ("logit", 1)]


def test_report_groups_runs_by_swept_values_and_averages_seeds(sweep, tmp_path):
    result = run_cli("-m shd_vision.report", f"dir={sweep}", f"out={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    runs = find_runs(sweep)
    assert swept_keys(runs) == ["seed", "kd.name", "kd.terms.logit.weight"]
    keys, rows = summarise(runs)
    by_method = {r["kd.name"]: r for r in rows}
    for method, row in by_method.items():
        top1 = [r.summary["top1"] for r in runs if r.config["kd.name"] == method]
        mean = sum(top1) / 2
        assert row["top1"] == pytest.approx(mean) and row["seeds"] == 2
        assert row["top1_std"] == pytest.approx((sum((t - mean) ** 2 for t in top1)) ** 0.5)  # n-1 = 1
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("| kd.name | kd.terms.logit.weight | top-1 (%) | seeds | last-quarter gain |")
    assert table.split("\n\n")[0].count("\n") == 3 and "validation top-1 on 32 images of the val split" in table
    lines = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert sorted(line["kind"] for line in lines) == ["mean", "mean", "run", "run", "run", "run"]
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert "results.md" in result.stdout


def test_report_rows_by_chosen_keys(sweep):
    runs = find_runs(sweep)
    keys, rows = summarise(runs, by=["kd.name"])
    assert keys == ["kd.name"] and sorted(r["kd.name"] for r in rows) == ["logit", "none"]
    with pytest.raises(UserError, match="by=kd.nam is not a config key of the runs; give keys such as seed"):
        summarise(runs, by=["kd.nam"])


def test_a_row_never_mixes_runs_defined_differently(sweep, tmp_path):
    """Rows average seeds only: by=[...] leaving out a key the runs differ in is refused, naming it."""
    with pytest.raises(UserError) as mixed:
        summarise(find_runs(sweep), by=["seed"])
    assert "the row 0 would mix runs defined differently, in kd.name (none: 1 run(s), logit: 1 run(s)); " \
           "kd.terms.logit.weight (" in paragraph(str(mixed.value))
    for name, change in {"a": {}, "b": {"data": {"num_workers": 3}, "trainer": {"device": "cuda"}},  # how, not what
                         "c": {"trainer": {"max_steps": 1}}}.items():  # stopped earlier: another result
        shutil.copytree(sweep / "0", tmp_path / name)
        config = yaml.safe_load((tmp_path / name / "config.yaml").read_text())
        for group, values in change.items():
            config[group].update(values)
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "b" / "config.yaml").write_text((tmp_path / "b" / "config.yaml").read_text().replace(
        str(PROJECT_ROOT), "/elsewhere/shd-vision"))  # another clone's paths.root_dir and the paths inside it
    (tmp_path / "c" / "summary.json").write_text(json.dumps(json.loads((tmp_path / "c" / "summary.json").read_text())
                                                            | {"steps": 1}))
    keys, rows = summarise([r for r in find_runs(tmp_path) if r.path.name != "c"], by=["kd.name"])
    assert [r["seeds"] for r in rows] == [2] and rows[0]["repeated_seeds"] == [0]
    result = run_cli("-m shd_vision.report", f"dir={tmp_path}", "by=[kd.name]", f"out={tmp_path / 'out'}")
    assert result.returncode == 2 and "in run.steps (2: 2 run(s), 1: 1 run(s))" in paragraph(result.stderr)
    (tmp_path / "b" / "config.yaml").write_text((tmp_path / "b" / "config.yaml").read_text().replace(
        "max_steps: 2", "max_steps: 99"))  # another cap, the same 2 steps run: the same result
    assert "max_steps: 99" in (tmp_path / "b" / "config.yaml").read_text()
    assert summarise([r for r in find_runs(tmp_path) if r.path.name != "c"], by=["kd.name"])[1][0]["seeds"] == 2
    shutil.rmtree(tmp_path / "c")
    result = run_cli("-m shd_vision.report", f"dir={tmp_path}", "by=[kd.name]", f"out={tmp_path / 'out'}")
    assert result.returncode == 0 and "REPEATED SEEDS: row none holds seed(s) 0 more than once" in paragraph(result.stderr)


def test_report_pairs_rows_by_seed_with_a_t_interval(sweep, tmp_path):
    result = run_cli("-m shd_vision.report", f"dir={sweep}", f"out={tmp_path}", "by=[kd.name]", "paired=[none]")
    assert result.returncode == 0, result.stderr[-2000:]
    runs = find_runs(sweep)
    top1 = {(r.config["kd.name"], r.config["seed"]): r.summary["top1"] for r in runs}
    d = [top1["logit", s] - top1["none", s] for s in (0, 1)]
    mean, half = (d[0] + d[1]) / 2, 12.706 * abs(d[0] - d[1]) / 2 ** 0.5 / 2 ** 0.5  # t(1 df), sd/√n
    logit_row = next(line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| logit"))
    assert f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]" in logit_row
    assert (tmp_path / "best_overrides.txt").read_text().split("=")[0] == "kd.name"
    bad = run_cli("-m shd_vision.report", f"dir={sweep}", f"out={tmp_path}", "by=[kd.name]", "paired=[minilm]")
    assert bad.returncode == 2 and "paired=minilm is not a row of this table; its rows are:" in bad.stderr


def test_last_quarter_gain_reads_the_validation_curve():
    from pathlib import Path

    from shd_vision.report import Run, last_quarter_gain

    records = [{"split": "val", "epoch": e, "top1": t} for e, t in zip(range(1, 9), [10, 20, 30, 40, 50, 60, 70.5, 71])]
    records.insert(3, {"split": "train", "epoch": 3.5, "loss": 1.0})
    assert last_quarter_gain(Run(Path("."), {}, {}, records)) == pytest.approx(71 - 60)  # epoch 8 minus epoch 6
    assert last_quarter_gain(Run(Path("."), {}, {}, records[:3])) is None


def test_a_list_given_without_brackets_is_told_how_to_write_it(tmp_path):
    result = run_cli("-m shd_vision.report", f"dir={tmp_path}", "by=kd.name")
    assert result.returncode == 2 and paragraph(result.stderr).endswith("Write a list in brackets, e.g. by=[kd.name].")


def test_report_of_a_folder_without_runs_is_a_user_error(tmp_path):
    result = run_cli("-m shd_vision.report", f"dir={tmp_path}")
    assert result.returncode == 2 and "holds no finished run" in paragraph(result.stderr)


@pytest.mark.slow
def test_optuna_search_runs_trials_and_writes_its_best_value(tmp_path, teacher_ckpt):
    result = run_cli("train.py", "hparams_search=shd_optuna", "hydra.sweeper.n_trials=2", *FAST,
                     "model=vit_fmnist_student", f"teacher.checkpoint={teacher_ckpt}", "data=fashion_mnist",
                     "data.train_size=64", "data.val_size=32", f"paths.log_dir={tmp_path}", "run_name=opt")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "train" / "multiruns" / "opt"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"kd.terms.shd.weight", "kd.terms.shd.temperature"}
    trials = [yaml.safe_load((sweep / j / "config.yaml").read_text())["kd"]["terms"]["shd"] for j in ("0", "1")]
    assert all(0.1 <= t["weight"] <= 10 and 0.5 <= t["temperature"] <= 4 for t in trials)
    summaries = [json.loads((sweep / j / "summary.json").read_text())["top1"] for j in ("0", "1")]
    assert best["best_value"] == pytest.approx(max(summaries))


def test_wandb_offline_logs_config_terms_pictures_and_summary(tmp_path, teacher_ckpt):
    result = run_cli("train.py", "logger=wandb", "kd=shd", "debug=fast", f"teacher.checkpoint={teacher_ckpt}",
                     f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run", f"trainer.threads={THREADS}",
                     env={"WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    (log_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    recs = records(log_file)
    rows = history(recs)
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 4
    assert {"train/loss/ce", "train/loss/logit", "train/loss/shd", "train/shd/w_eff", "train/lr",
            "train/samples_per_s"} <= set(train_rows[0])
    assert any("val/top1" in r for r in rows)
    images = {k.split("/")[1] for r in rows for k, v in r.items() if k.endswith("/_type") and v == "image-file"}
    assert {"curves", "confusion", "attention_image0", "squeeze_weights"} <= images
    config = {i.key: json.loads(i.value_json) for i in run_record(recs).config.update}
    assert config["kd"]["name"] == "shd" and config["kd"]["terms"]["shd"]["weight"] == 1.0
    summary = {i.key: json.loads(i.value_json) for r in recs if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update if i.key}
    assert summary["top1"] == json.loads((tmp_path / "run" / "summary.json").read_text())["top1"]


def test_wandb_groups_the_runs_of_a_sweep(tmp_path):
    result = run_cli("train.py", "-m", "logger=wandb", "seed=0,1", *FAST, "kd=none", f"paths.log_dir={tmp_path}",
                     "run_name=g1", env={"WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    groups = {run_record(records(f)).run_group for f in (tmp_path / "train/multiruns/g1").glob("*/wandb/*/run-*.wandb")}
    assert groups == {"g1"}


def fake_sweep(root, top1):
    """Run directories of a grid ``{(tau, weight): top-1}``, as find_runs reads them."""
    for i, ((tau, weight), value) in enumerate(top1.items()):
        run = root / str(i)
        run.mkdir(parents=True)
        config = {"seed": 0, "kd": {"name": "shd", "terms": {"shd": {"temperature": tau, "weight": weight}}}}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run / "summary.json").write_text(json.dumps({"top1": value, "train_samples_per_s": 1.0, "wall_time_s": 1.0}))
    return root


TAU, WEIGHT = "kd.terms.shd.temperature", "kd.terms.shd.weight"


@pytest.mark.parametrize("best, edges", [
    ((1.0, 3), {WEIGHT: (3, "largest", [1, 3])} | {TAU: (1.0, "smallest", [1.0, 2.0])}),
    ((2.0, 1), {WEIGHT: (1, "smallest", [1, 3])} | {TAU: (2.0, "largest", [1.0, 2.0])}),
], ids=["largest-weight", "smallest-weight"])
def test_best_values_at_either_end_of_a_grid_are_flagged(tmp_path, best, edges):
    grid = {(t, w): 80.0 for t in (1.0, 2.0) for w in (1, 3)} | {best: 84.0}
    keys, rows = summarise(find_runs(fake_sweep(tmp_path, grid)), by=[TAU, WEIGHT])
    assert edge_optima(keys, rows) == edges


def test_an_interior_best_is_not_flagged_and_extend_covers_only_new_points(tmp_path):
    grid = {(t, w): 80.0 + (w == 3) + (t == 1.0) for t in (1.0, 2.0) for w in (1, 3, 9)}  # best: tau 1, weight 3
    keys, rows = summarise(find_runs(fake_sweep(tmp_path, grid)), by=[TAU, WEIGHT])
    assert edge_optima(keys, rows) == {TAU: (1.0, "smallest", [1.0, 2.0])}  # the weight's 3 is interior
    assert extension(keys, rows, [WEIGHT]) == []  # only the weight may be extended, and it need not be
    assert extension(keys, rows, [TAU, WEIGHT]) == [f"{TAU}=0.3333 {WEIGHT}=1,3,9"]


def test_extending_two_edge_keys_runs_every_new_point_once(tmp_path):
    grid = {(t, w): 80.0 + 2 * (w == 3) + (t == 2.0) for t in (1.0, 2.0) for w in (1, 3)}  # best: tau 2, weight 3
    keys, rows = summarise(find_runs(fake_sweep(tmp_path / "runs", grid)), by=[TAU, WEIGHT])
    lines = extension(keys, rows, [TAU, WEIGHT])
    assert lines == [f"{TAU}=6.0 {WEIGHT}=1,3", f"{TAU}=1.0,2.0,6.0 {WEIGHT}=9"]
    points = [(t, w) for line in lines for t in line.split()[0].split("=")[1].split(",")
              for w in line.split()[1].split("=")[1].split(",")]
    extended = {(t, w) for t in ("1.0", "2.0", "6.0") for w in ("1", "3", "9")}
    assert sorted(points) == sorted(extended - {(t, w) for t in ("1.0", "2.0") for w in ("1", "3")})  # once each
    result = run_cli("-m shd_vision.report", f"dir={tmp_path / 'runs'}", f"by=[{TAU},{WEIGHT}]", f"extend=[{WEIGHT}]")
    assert result.returncode == 0, result.stderr
    assert f"EDGE: the best {WEIGHT}=3 is the largest value tried (1, 3)" in paragraph(result.stderr)
    assert f"EDGE: the best {WEIGHT}=3 is the largest value tried (1, 3)" in (tmp_path / "runs/results.md").read_text()
    assert (tmp_path / "runs/extend.txt").read_text() == f"{TAU}=1.0,2.0 {WEIGHT}=9\n"


def test_a_count_steps_by_its_own_factor_and_a_bad_factor_is_refused_before_writing(tmp_path):
    """extend=[key:2]: relation heads 4 at the low edge step to 2 (not 4/3), the weight by 3."""
    grid = {(t, w): 80.0 + (w == 3) + (t == 4) for t in (4, 12) for w in (1, 3)}  # best: 4 heads, weight 3
    keys, rows = summarise(find_runs(fake_sweep(tmp_path / "runs", grid)), by=[TAU, WEIGHT])
    assert extension(keys, rows, [f"{TAU}:2", WEIGHT]) == [f"{TAU}=2 {WEIGHT}=1,3", f"{TAU}=4,12,2 {WEIGHT}=9"]
    assert extension(keys, rows, [f"{TAU}:2.5"]) == []  # key:factor on ints is a count: 1.6 heads cannot run
    assert extension(keys, rows, [TAU]) == [f"{TAU}=1.333 {WEIGHT}=1,3"]  # a plain key written as ints is not

    result = run_cli("-m shd_vision.report", f"dir={tmp_path / 'runs'}", f"by=[{TAU},{WEIGHT}]", f"extend=[{TAU}:1]")
    assert result.returncode == 2
    assert f"extend=[{TAU}:1]: the step factor after ':' is '1'; give a number above 1" in paragraph(result.stderr)
    assert not (tmp_path / "runs/results.md").exists() and not (tmp_path / "runs/extend.txt").exists()
    with pytest.raises(UserError, match=rf"extend=\[{TAU}:2,kd.terms.shd.wieght\]: kd.terms.shd.wieght is not one"):
        extension(keys, rows, [f"{TAU}:2", "kd.terms.shd.wieght"])  # misspelt: its edge would stay unextended


def test_a_temperature_grid_written_as_whole_numbers_still_steps_below_one(tmp_path):
    keys, rows = summarise(find_runs(fake_sweep(tmp_path, {(t, 1): 80.0 - t for t in (1, 2)})), by=[TAU, WEIGHT])
    assert extension(keys, rows, [TAU, WEIGHT]) == [f"{TAU}=0.3333 {WEIGHT}=1"]


def test_a_sweep_around_a_choice_takes_one_step_either_side_of_each_extendable_key():
    assert around(f"{TAU}=2 {WEIGHT}=27", [TAU, WEIGHT]) == f"{TAU}=0.6667,2,6 {WEIGHT}=9,27,81"
    assert around(f"{TAU}=0.5 {WEIGHT}=4", [f"{WEIGHT}:2"]) == f"{TAU}=0.5 {WEIGHT}=2,4,8"  # tau as chosen
    assert around(f"{TAU}=0.3333 {WEIGHT}=0", [TAU, WEIGHT]) == f"{TAU}=0.1111,0.3333,1.0 {WEIGHT}=0"  # 1.0, not 0.9999
    assert around(f"{TAU}=1 {WEIGHT}=3", [f"{TAU}:2", WEIGHT]) == f"{TAU}=1,2 {WEIGHT}=1,3,9"  # no half a relation head


def test_a_grid_edge_where_no_step_can_go_is_flagged_and_not_extended(tmp_path):
    grid = {(t, w): 80.0 + (t == 1) + (w == 3) for t in (1, 2) for w in (0.0, 3.0)}  # best: 1 relation head, weight 3
    keys, rows = summarise(find_runs(fake_sweep(tmp_path / "runs", grid)), by=[TAU, WEIGHT])
    assert extension(keys, rows, [f"{TAU}:2", WEIGHT]) == [f"{TAU}=1,2 {WEIGHT}=9.0"]  # the weight only
    grid = {(t, w): 80.0 + (t == 1) + (w == 0) for t in (1, 2) for w in (0.0, 3.0)}  # best: 1 head, weight 0
    keys, rows = summarise(find_runs(fake_sweep(tmp_path / "zero", grid)), by=[TAU, WEIGHT])
    assert extension(keys, rows, [f"{TAU}:2", WEIGHT]) == []
    result = run_cli("-m shd_vision.report", f"dir={tmp_path / 'zero'}", f"by=[{TAU},{WEIGHT}]", f"extend=[{TAU}:2,{WEIGHT}]")
    assert result.returncode == 0 and (tmp_path / "zero/extend.txt").read_text() == ""
    for key, value, side in ((TAU, 1, "smallest"), (WEIGHT, 0.0, "smallest")):
        assert f"EDGE: the best {key}={value} is the {side} value tried" in paragraph(result.stderr)
    assert paragraph(result.stderr).count("no step can go past it") == 2


def test_ties_go_to_the_lower_validation_loss_and_are_flagged(tmp_path):
    fake_sweep(tmp_path, {(1.0, 1): 85.34, (2.0, 1): 85.34, (6.0, 1): 80.0})
    for run, loss in zip(sorted(tmp_path.iterdir()), (0.52, 0.48, 0.6)):
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps(summary | {"val_loss": loss}))
    keys, rows = summarise(find_runs(tmp_path), by=[TAU])
    assert [r[TAU] for r in rows] == [2.0, 1.0, 6.0]  # not the order the directories were read in
    assert edge_optima(keys, rows) == {}
    result = run_cli("-m shd_vision.report", f"dir={tmp_path}", f"by=[{TAU}]")
    assert "TIE: the best top-1 (85.34) is shared by 2.0 and 1.0; the lowest validation loss chose 2.0" in \
        paragraph(result.stderr)


def test_rows_of_several_keys_pair_with_the_reference_at_their_own_value(tmp_path):
    """by=[model.num_heads,kd.name] paired=[minilm]: SHD at each head count against MiniLMv2 at it."""
    top1 = {(h, m, s): 70 + 5 * h + (2 if m == "shd" else 0) + s * (1 + h) for h in (1, 3) for m in ("minilm", "shd")
            for s in (0, 1)}
    for i, ((h, m, s), value) in enumerate(top1.items()):
        run = tmp_path / "runs" / str(i)
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"seed": s, "model": {"num_heads": h}, "kd": {"name": m}}))
        (run / "summary.json").write_text(json.dumps({"top1": value, "train_samples_per_s": 1.0, "wall_time_s": 1.0}))
    result = run_cli("-m shd_vision.report", f"dir={tmp_path / 'runs'}", "by=[model.num_heads,kd.name]",
                     "paired=[minilm]", "x=model.num_heads")
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "runs/results.md").read_text()
    for h in (1, 3):  # differences are +2 on both seeds: a zero-width interval
        assert f"| {h} | shd | {70 + 5 * h + 2 + (1 + h) / 2:.2f} ± " in table
        assert next(line for line in table.splitlines() if line.startswith(f"| {h} | shd")).count("+2.00 [+2.00, +2.00]") == 1
    assert "| time | per seed (0, 1) |" in table  # the same seeds in every row: named once
    assert f"| {70 + 5 * 3 + 2:.2f}, {70 + 5 * 3 + 2 + 4:.2f} |" in table
    assert (tmp_path / "runs/trend.png").stat().st_size > 10_000
    assert "EDGE" not in table and "EDGE" not in result.stderr  # the study's x is varied on purpose, not chosen


def test_paired_cells_say_how_many_seeds_paired_and_refuse_a_repeated_one(tmp_path):
    """The reviewer's example: shd seeds {0: 81, 1: 83} against logit {0: 80, 1: 81, 2: 82}."""
    runs = {("shd", 0): 81.0, ("shd", 1): 83.0, ("logit", 0): 80.0, ("logit", 1): 81.0, ("logit", 2): 82.0,
            ("fitnet", 2): 84.0, ("ce", 0): 79.0, ("ce", 0, "again"): 79.5}
    for i, (key, value) in enumerate(runs.items()):
        run = tmp_path / "runs" / str(i)
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"seed": key[1], "kd": {"name": key[0]}}))
        (run / "summary.json").write_text(json.dumps({"top1": value, "train_samples_per_s": 1.0, "wall_time_s": 1.0}))
    result = run_cli("-m shd_vision.report", f"dir={tmp_path / 'runs'}", "by=[kd.name]", "paired=[logit]")
    assert result.returncode == 0, result.stderr
    cells = {line.split(" | ")[0][2:]: line.split(" | ") for line in (tmp_path / "runs/results.md").read_text().splitlines()
             if line.startswith("| ") and "---" not in line and "kd.name" not in line}
    assert cells["shd"][1:3] == ["82.00 ± 1.41", "2"] and cells["shd"][4] == "+1.50 [−4.85, +7.85] (2 pairs)".replace("−", "-")
    assert cells["fitnet"][1] == "84.00" and cells["fitnet"][4] == "+2.00 (1 pair, no CI)"  # one seed: no spread
    assert cells["ce"][4] == "–" and "REPEATED SEEDS: row ce holds seed(s) 0 more than once" in paragraph(result.stderr)
    assert cells["logit"][4] == ""
    # seed by seed, each value under its seed where rows ran different seeds; a repeated seed shows both runs
    assert "| per seed |" in (tmp_path / "runs/results.md").read_text()
    assert [cells[m][-1] for m in ("shd", "logit", "fitnet", "ce")] == [
        "0: 81.00, 1: 83.00 |", "0: 80.00, 1: 81.00, 2: 82.00 |", "2: 84.00 |", "0: 79.00 / 79.50 |"]


def test_a_reference_value_shared_by_another_key_does_not_blank_a_row(tmp_path):
    """paired=[4] is ambiguous (4 heads or 4 relation heads) and refused; named, the row with 4
    student heads still gets its difference."""
    for i, (heads, relation, seed) in enumerate((h, r, s) for h in (2, 4) for r in (4, 12) for s in (0, 1)):
        run = tmp_path / "runs" / str(i)
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "model": {"num_heads": heads},
                                                         "kd": {"terms": {"minilm": {"relation_heads": relation}}}}))
        (run / "summary.json").write_text(json.dumps({"top1": 80.0 + heads + relation / 4 + seed, "train_samples_per_s": 1.0,
                                                      "wall_time_s": 1.0}))
    by = "by=[model.num_heads,kd.terms.minilm.relation_heads]"
    result = run_cli("-m shd_vision.report", f"dir={tmp_path / 'runs'}", by, "paired=[4]")
    assert result.returncode == 2 and "paired=4 is a value of model.num_heads and of kd.terms.minilm.relation_heads; " \
        "name the key, e.g. paired=['kd.terms.minilm.relation_heads=4'] (quoted for Hydra)" in paragraph(result.stderr)
    result = run_cli("-m shd_vision.report", f"dir={tmp_path / 'runs'}", by, "paired=['kd.terms.minilm.relation_heads=4']")
    assert result.returncode == 0, result.stderr
    rows = {tuple(line.split(" | ")[:2]): line.split(" | ") for line in (tmp_path / "runs/results.md").read_text().splitlines()
            if line.startswith("| ") and "---" not in line and "num_heads" not in line}
    assert rows["| 2", "12"][5] == "+2.00 [+2.00, +2.00]" and rows["| 4", "12"][5] == "+2.00 [+2.00, +2.00]"
    assert rows["| 2", "4"][5] == "" and rows["| 4", "4"][5] == ""


def test_trend_lines_share_one_ordered_axis():
    """A line that lacks the smallest value must not push it to the end of the axis (matplotlib
    orders string categories as it first meets them)."""
    assert x_positions([3, 2, 1, 2, 3]) == {1: 1.0, 2: 2.0, 3: 3.0}  # numbers at their value
    assert x_positions([0.5, 4]) == {0.5: 0.5, 4: 4.0}
    assert list(x_positions(["vit_small", "deit_tiny", "vit_small"]).items()) == [("deit_tiny", 0.0), ("vit_small", 1.0)]


def test_trend_lines_are_dodged_within_a_quarter_of_the_narrowest_gap():
    assert dodge([1.0, 2.0, 3.0], 3, log_x=False) == pytest.approx([-0.125, 0.0, 0.125])
    assert dodge([1.0, 2.0, 6.0], 2, log_x=False) == pytest.approx([-0.125, 0.125])  # the 1..2 gap
    assert dodge([1.0, 10.0, 100.0], 5, log_x=True) == pytest.approx([-0.125, -0.0625, 0.0, 0.0625, 0.125])  # decades
    assert dodge([3.0], 2, log_x=False) == pytest.approx([-0.125, 0.125])  # one x: a unit-wide axis
    assert dodge([1.0, 2.0], 1, log_x=False) == [0.0]


def test_a_key_that_only_tells_methods_apart_is_not_an_edge(tmp_path):
    """A comparison (kd.name with each method's own weight) has nothing swept to extend; a weight
    swept within one method is flagged along that method's line."""
    rows = {("none", 0.0, 0.0): 70.0, ("logit", 1.0, 0.0): 72.0, ("shd", 1.0, 1.0): 75.0, ("shd", 1.0, 3.0): 76.0}
    for i, ((name, logit, shd), value) in enumerate(rows.items()):
        run = tmp_path / str(i)
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "kd": {"name": name, "terms": {
            "logit": {"weight": logit}, "shd": {"weight": shd}}}}))
        (run / "summary.json").write_text(json.dumps({"top1": value, "train_samples_per_s": 1.0, "wall_time_s": 1.0}))
    keys, rows = summarise(find_runs(tmp_path))
    assert keys == ["kd.name", "kd.terms.logit.weight", WEIGHT]
    assert edge_optima(keys, rows) == {WEIGHT: (3.0, "largest", [1.0, 3.0])}  # not logit's weight, nor shd's 0 of none


def test_the_table_says_which_images_each_kind_of_run_was_validated_on():
    from pathlib import Path

    from shd_vision.report import Run, validated_on

    def run(**data):
        return Run(Path("."), {f"data.{k}": v for k, v in {"val_split": "test", "val_size": None, "holdout": None,
                                                           **data}.items()}, {})
    assert validated_on([run()]) == "validation top-1 on the test split"
    assert validated_on([run(val_size=5000)]) == "validation top-1 on 5000 images of the test split"
    assert validated_on([run(val_size=5000, holdout=5000), run(val_size=5000)]) == (
        "validation top-1 on 5000 held-out training images (data.holdout) / 5000 images of the test split")
    assert validated_on([run(val_size=1000, holdout=5000)]) == (  # val_size cuts the held-out images too
        "validation top-1 on 1000 held-out training images (data.holdout)")
    stream = run(name="wds/imagenet", val_size=1000)
    assert validated_on([stream]) == "validation top-1 on the test split"  # a stream takes no val_size
    stream.records = [{"split": "val", "samples": 50000}]
    assert validated_on([stream]) == "validation top-1 on 50000 images of the test split"


def test_cached_teacher_rows_are_told_apart_and_their_cost_is_qualified(tmp_path):
    for i, cache in enumerate([None, {"top_k": 10, "dtype": "float32"}]):
        run = tmp_path / str(i)
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "kd": {"name": "logit"}}))
        (run / "summary.json").write_text(json.dumps({"top1": 80.0 + i, "train_samples_per_s": 1.0, "wall_time_s": 1.0,
                                                      "teacher": "vit", "teacher_cache": cache}))
    result = run_cli("-m shd_vision.report", f"dir={tmp_path}", "by=[kd.name]")
    assert result.returncode == 0, result.stderr
    notes = " ".join((tmp_path / "results.md").read_text().split())
    assert "| logit | cache top-10 float32 | 81.00 |" in notes and "| logit | live | 80.00 |" in notes
    assert "a cached row's images/s and time leave out building its cache" in notes
