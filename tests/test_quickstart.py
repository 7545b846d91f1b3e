"""The README's first command, shrunk: students from the shipped teacher, a retrained and cached
teacher on request, and the seed-noise column from a multi-seed run of the same plan."""

import json
import statistics

import pytest

from conftest import run_cli
from shd_vision.config import PROJECT_ROOT


@pytest.mark.slow
def test_quickstart_compares_students_from_the_shipped_teacher_with_a_noise_column(tmp_path):
    common = ["debug=fast", f"paths.log_dir={tmp_path}", "quickstart.methods=[none,shd]"]
    several = run_cli("-m shd_vision.quickstart", *common, "quickstart.seeds=[0,1]", "run_name=seeds")
    assert several.returncode == 0, several.stderr[-3000:]
    shipped = PROJECT_ROOT / "shd_vision/assets/vit_fmnist_teacher"
    assert f"teacher: {shipped}" in several.stdout
    reference = tmp_path / "quickstart/runs/seeds/comparison.json"
    measured = json.loads(reference.read_text())
    assert measured["seeds"] == [0, 1] and measured["plan"] == ["experiment=fmnist_student", "debug=fast"]
    rows = {r["label"]: r for r in measured["rows"]}
    assert set(rows) == {"kd=none", "kd=shd"} and all(len(r["top1s"]) == 2 for r in rows.values())
    assert measured["teacher"]["top1"] == json.loads((shipped / "summary.json").read_text())["top1"]
    for label, row in rows.items():  # each seed's own run directory and summary
        seeds = [json.loads((tmp_path / f"quickstart/runs/seeds/{label[3:]}/seed{s}/summary.json").read_text())
                 for s in (0, 1)]
        assert row["top1s"] == [s["top1"] for s in seeds]
    assert "mean ± std of 2 seeds" in (tmp_path / "quickstart/runs/seeds/comparison.md").read_text()

    single = run_cli("-m shd_vision.quickstart", *common, f"quickstart.reference={reference}",
                     "trainer.threads=1", "run_name=one")  # a neutral override keeps the plan
    assert single.returncode == 0, single.stderr[-3000:]
    out = tmp_path / "quickstart/runs/one"
    table = (out / "comparison.md").read_text()
    assert "reference: 2 seeds, mean ± std" in table
    spread = statistics.stdev(rows["kd=shd"]["top1s"])
    assert f"| {statistics.mean(rows['kd=shd']['top1s']):.2f} ± {spread:.2f} |" in table
    assert "| teacher | 1·ce |" in table and (out / "comparison.png").is_file()
    for name in ("squeeze_weights", "head_redundancy", "attention_image0", "attention_full_image0"):
        picture = out / "shd" / "attention" / f"{name}.png"
        assert picture.is_file() and str(picture) in single.stdout
    assert "quickstart comparison" in single.stdout and str(out / "comparison.png") in single.stdout
    log = (out / "quickstart.log").read_text()  # the console's record: the table and the students' runs
    assert table.strip() in log and "=== student with kd=shd, seed 0 ===" in log and "run summary" in log

    other = run_cli("-m shd_vision.quickstart", *common, f"quickstart.reference={reference}",
                    "quickstart.methods=[none]", "optim.lr=0.001", "run_name=other")
    assert other.returncode == 0 and "no noise column" in other.stdout


@pytest.mark.slow
def test_quickstart_retrains_the_teacher_once_on_request(tmp_path):
    args = ["debug=fast", f"paths.log_dir={tmp_path}", "quickstart.methods=[none]", "quickstart.retrain_teacher=true"]
    first = run_cli("-m shd_vision.quickstart", *args, "run_name=first")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "training the teacher first" in first.stdout
    export = tmp_path / "teachers/vit_fmnist_teacher/export"
    stamp = (export / "model.safetensors").stat().st_mtime_ns
    student = (tmp_path / "quickstart/runs/first/none/config.yaml").read_text()
    assert f"checkpoint: {export}" in student

    second = run_cli("-m shd_vision.quickstart", *args, "run_name=second")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the teacher trained earlier" in second.stdout
    assert (export / "model.safetensors").stat().st_mtime_ns == stamp
