"""Every user mistake the project knows, table-driven (docs/reliability.md lists them): one
paragraph naming the value and what is valid, exit code 2, no traceback, nothing written touched."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import PROJECT_ROOT, debug_args, paragraph, run_cli


def bad_input_cases(tmp, teacher_ckpt):
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "a_file").write_text("x")
    (tmp / "garbage.pt").write_bytes(b"\x00not a checkpoint")
    return {
        "unknown model": (["model.name=deit_tiny_patch16_244"], "deit_tiny_patch16_224"),
        "unknown config": (["model=deit_tinyy"], "available: deit_base"),
        "data.root missing": (["data=imagefolder"], "data.root is not set"),
        "data.root malformed": (["data=imagefolder", f"data.root={tmp}/a_file"], "ImageNet layout"),
        "fashion-mnist missing": ([f"data.root={tmp}/empty"], "apt-get install dataset-fashion-mnist"),
        "teacher missing": ([f"teacher.checkpoint={tmp}/nope.pt", "trainer.allow_random_teacher=false"],
                            "nope.pt does not exist"),
        "teacher corrupt": ([f"teacher.checkpoint={tmp}/garbage.pt"], "could not be read as a checkpoint"),
        "teacher classes": ([f"teacher.checkpoint={teacher_ckpt}", "data=synthetic", "data.num_classes=5"],
                            "trained for 10 classes but the data has 5"),
        "lr": (["optim.lr=0"], "optim.lr=0.0 is out of range: it must be greater than 0"),
        "lr type": (["optim.lr=fast"], "error: optim.lr=fast: Value 'fast' of type 'str' could not be converted to Float"),
        "epochs": (["trainer.epochs=0"], "trainer.epochs=0 is out of range"),
        "temperature": (["kd.terms.logit.temperature=-1"], "kd.terms.logit.temperature=-1.0 is out of range"),
        "cuda": (["trainer.device=cuda"], "trainer.device=cuda but this machine has no usable CUDA GPU"),
        "unwritable": ([f"hydra.run.dir={tmp}/a_file/run"], "a_file"),
        "unknown term": (["+kd.terms.magic.weight=1"], "no distillation method 'magic'"),
        "unknown term key": (["+kd.terms.shd.tau=2"], "Key 'tau' not in 'SHDConfig'"),
        "unknown key": (["trainer.epoch=3"], "trainer.epoch=3: there is no key 'epoch' to set (Key 'epoch' not in "
                        "'TrainerConfig'); close: trainer.epochs, trainer.export. python train.py --help lists"),
        "unknown study row": (["study=shd_median"], "study=shd_median: there is no conf/study/shd_median.yaml"),
        "batch size": (["data.batch_size=0"], "data.batch_size=0 is out of range"),
        "negative weight": (["kd.terms.logit.weight=-1"], "kd.terms.logit.weight=-1.0 is out of range"),
        "no positive weight": (["kd=none", "kd.terms.ce.weight=0"], "kd=none has no term with a weight above 0"),
        "head divisor": (["model.num_heads=5"], "rejected the settings of model (img_size=28, patch_size=4, in_chans=1, "
                         "embed_dim=48, depth=4, num_heads=5, num_classes=10): dim should be divisible by num_heads"),
        "head count": (["kd=shd", f"teacher.checkpoint={teacher_ckpt}", "model.num_heads=8"],
                       "SHD cannot map 6 teacher heads to 8 student heads"),
        "layer pair": (["kd=shd", "kd.terms.shd.layers=[[0,9]]"],
                       "pair [0, 9] is out of range: the student has blocks 0..3 and the teacher 0..5"),
        "layer mapping": (["kd=fitnet", "kd.terms.fitnet.layers=first"], "layers=first is not a layer mapping"),
        "merge": (["kd=shd", "kd.terms.shd.merge=median"], "merge=median is not a valid choice"),
        "shd on a cnn": (["kd=shd", "teacher.name=resnet10t", f"teacher.checkpoint={tmp}/none.pt", *[f"~teacher.{k}" for k in
                          ("patch_size", "embed_dim", "depth", "num_heads", "img_size")]],
                         "(ResNet) has no ViT-style global attention blocks"),
        "deit without token": (["kd=deit"], "has none. Use a distilled DeiT: model=deit_tiny_distilled"),
        "adkd view": (["kd=adkd", "kd.terms.adkd.views=[silver]"], "views=['silver'] must be a non-empty list"),
        "resume missing": ([f"trainer.resume={tmp}/nope.pt"], "trainer.resume=" + f"{tmp}/nope.pt does not exist"),
        "resume corrupt": ([f"trainer.resume={tmp}/garbage.pt"], "garbage.pt could not be read as a checkpoint"),
        "resume other run": ([f"trainer.resume={teacher_ckpt}"], "belongs to a run defined differently from this one"),
        "affine": (["data.aug.affine=cv2"], "data.aug.affine=cv2 is not a valid choice; use one of: None, pil, opencv"),
    }


NAMES = ["unknown model", "unknown config", "data.root missing", "data.root malformed", "fashion-mnist missing",
         "teacher missing", "teacher corrupt", "teacher classes", "lr", "lr type", "epochs", "temperature",
         "cuda", "unwritable", "unknown term", "unknown term key", "unknown key", "unknown study row", "batch size",
         "negative weight", "no positive weight", "head divisor", "head count", "layer pair", "layer mapping", "merge",
         "shd on a cnn", "deit without token", "adkd view", "resume missing", "resume corrupt", "resume other run", "affine"]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, teacher_ckpt):
    """Every case's command, run three at a time (each one is mostly interpreter start-up)."""
    cases = bad_input_cases(tmp_path_factory.mktemp("bad"), teacher_ckpt)
    assert list(cases) == NAMES

    def run(name):  # in the default run directory, named by the launch's time stamp
        args, expected = cases[name]
        logs = tmp_path_factory.mktemp("run") / "logs"
        return name, expected, run_cli("train.py", "debug=fast", f"paths.log_dir={logs}", *args), logs / "train/runs"

    with ThreadPoolExecutor(3) as pool:
        return {name: (expected, result, run_dir) for name, expected, result, run_dir in pool.map(run, NAMES)}


@pytest.mark.parametrize("case", NAMES)
def test_bad_input_exits_2_with_one_paragraph(case, outcomes):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    expected, result, runs = outcomes[case]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert paragraph(result.stderr).startswith("error: ")
    assert expected in paragraph(result.stderr)
    assert "\n\n" not in result.stderr.strip()
    assert "full_key" not in result.stderr and "reference_type" not in result.stderr  # no omegaconf internals
    left = sorted(runs.glob("*")) if runs.is_dir() else []
    if case == "shd on a cnn":  # refused after the log recorded the debug teacher's warning: kept
        assert len(left) == 1 and "RANDOMLY INITIALISED TEACHER" in (left[0] / "train.log").read_text()
    elif case != "unwritable":  # refused before anything was written: no empty run directory is left behind
        assert left == [], sorted(str(p.relative_to(runs)) for p in runs.rglob("*"))


def test_a_refused_launch_keeps_a_run_directory_it_did_not_name(tmp_path):
    """Only a directory named by the launch's own time stamp is removed: a run_name the user
    chose, or a directory that existed before (with files of its own), stays as it was."""
    named = run_cli("train.py", f"paths.log_dir={tmp_path}", "run_name=mine", "optim.lr=-1")
    assert named.returncode == 2 and (tmp_path / "train/runs/mine").is_dir()
    made = tmp_path / "made"
    made.mkdir()
    (made / ".gitkeep").touch()
    again = run_cli("train.py", f"paths.log_dir={tmp_path}", f"hydra.run.dir={made}", "optim.lr=-1")
    assert again.returncode == 2 and (made / ".gitkeep").is_file()


@pytest.mark.parametrize("script,value", [("train.py", "optim.lr=-1"), ("eval.py", "trainer.precision=16")])
def test_a_value_out_of_range_is_told_before_torch_loads(script, value, tmp_path):
    """Half a second instead of six: the schema's ranges are checked before the task imports torch."""
    args = [value, f"paths.log_dir={tmp_path}", *(["ckpt=none.pt"] if script == "eval.py" else [])]
    cmd = [sys.executable, "-X", "importtime", script, *args]
    result = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    told = paragraph(result.stderr[result.stderr.index("error:"):])
    assert result.returncode == 2 and told.startswith(f"error: {value}"), result.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "hydra" in imported and "torch" not in imported and "timm" not in imported


@pytest.mark.parametrize("script,key", [("eval.py", "ckpt"), ("-m shd_vision.viz", "ckpt"),
                                        ("-m shd_vision.report", "dir")])
def test_a_required_value_left_out_is_named_with_the_command_that_lists_the_options(script, key, tmp_path):
    result = run_cli(script, f"paths.log_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert paragraph(result.stderr) == f"error: {key} must be given: add {key}=... to the command (python {script} --help lists every option)."
    assert not any(tmp_path.rglob("*.log"))  # and no empty run directory is left


def test_pack_without_its_output_folder_names_it(tmp_path):
    """pack.out is also the run directory: Hydra met it unset before the task could say so."""
    result = run_cli("-m shd_vision.data.pack", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert paragraph(result.stderr) == "error: pack.out must be given: add pack.out=DIR to the command (the folder it writes)."


def test_a_data_value_without_a_data_config_says_to_name_one(tmp_path, teacher_ckpt):
    """eval.py takes data from the checkpoint: data.val_size=100 alone met a null group (Hydra's
    'Unexpected type for root: NoneType')."""
    result = run_cli("eval.py", f"ckpt={teacher_ckpt}", "data.val_size=100", f"paths.log_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert paragraph(result.stderr).startswith("error: data.val_size=100: data is not set by this command")
    assert "data=<name> data.val_size=100" in paragraph(result.stderr)


def test_eval_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = run_cli("eval.py", f"ckpt={tmp_path}/notes.txt", f"paths.log_dir={tmp_path}/logs")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "notes.txt could not be read as a checkpoint" in " ".join(result.stderr.split())


def test_a_rejected_resume_leaves_the_run_untouched(tmp_path):
    assert run_cli("train.py", *debug_args(tmp_path, "kd=none")).returncode == 0
    files = sorted(p for p in (tmp_path / "run").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    result = run_cli("train.py", *debug_args(tmp_path, "kd=none", "trainer.resume=auto", "optim.lr=-1"))
    assert result.returncode == 2 and "optim.lr=-1.0" in result.stderr
    assert sorted(p for p in (tmp_path / "run").rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == data for p, data in before.items())


@pytest.mark.parametrize("resolve", [False, True])
def test_print_config(resolve):
    """Hydra's ``--cfg job [--resolve]``; resolving must not trip over the run directory, which
    Hydra names only when a job starts."""
    result = run_cli("train.py", "--cfg", "job", *(["--resolve"] if resolve else []), "kd=logit", "trainer.epochs=3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "epochs: 3" in result.stdout and "temperature: 4.0" in result.stdout
    assert ("output_dir: null" in result.stdout) == resolve
    assert ("${" in result.stdout) != resolve
