"""The README's first command, shrunk: teacher, students, comparison, and a cached teacher."""

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_quickstart_trains_the_teacher_once_and_compares_students(tmp_path):
    args = ["debug=fast", f"paths.log_dir={tmp_path}", "quickstart.methods=[none,shd]"]
    first = run_cli("-m shd_vision.quickstart", *args, "run_name=first")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "training it first" in first.stdout
    teacher = tmp_path / "teachers/vit_fmnist_teacher/checkpoints/best.pt"
    stamp = teacher.stat().st_mtime_ns
    out = tmp_path / "quickstart/runs/first"
    rows = json.loads((out / "comparison.json").read_text())
    assert [r["label"] for r in rows][-1] == "teacher" and {r["label"] for r in rows[:2]} == {"kd=none", "kd=shd"}
    table = (out / "comparison.md").read_text()
    assert "| kd=shd | 1·ce + 1·logit + 1·shd |" in table and (out / "comparison.png").is_file()
    for name in ("squeeze_weights", "head_redundancy", "attention_image0", "attention_full_image0"):
        picture = out / "shd" / "attention" / f"{name}.png"
        assert picture.is_file() and str(picture) in first.stdout
    assert "quickstart comparison" in first.stdout and str(out / "comparison.png") in first.stdout

    second = run_cli("-m shd_vision.quickstart", *args, "run_name=second")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the cached teacher" in second.stdout
    assert teacher.stat().st_mtime_ns == stamp
