"""Records a reviewer can trust: one run per directory, resume only of the same run, sweeps that
survive a failing job, and a teacher checked before it teaches (docs/reliability.md, "Integrity")."""

import json
import re
import shlex
import subprocess
import sys

import pytest
import timm
import torch
from omegaconf import OmegaConf

from conftest import FMNIST, THREADS, debug_args, paragraph, run_cli
from shd_vision.config import PROJECT_ROOT, RESUMABLE, compose_train
from shd_vision.data.datasets import content_id, fashion_mnist
from shd_vision.engine import checkpoint as ck
from shd_vision.engine.train import train
from shd_vision.errors import UserError
from shd_vision.models.factory import build, pretrained_tag


def files_of(run_dir, skip=(".lock",)):
    """The bytes of a run's files, except the lock (it names its latest holder)."""
    return {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name not in skip}


# ---------------------------------------------------------------- one run per directory
def test_two_launches_into_one_run_name_never_mix_their_records(tmp_path):
    """The issue's example: kd=none and kd=logit started together with the same run_name."""
    args = [f"paths.log_dir={tmp_path}", "debug=fast", "run_name=same", "trainer.threads=1", "trainer.max_steps=8",
            "trainer.epochs=2"]
    procs = [subprocess.Popen([sys.executable, "train.py", *args, f"kd={kd}"], cwd=PROJECT_ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for kd in ("none", "logit")]
    outs = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in outs)
    assert codes == [0, 2], [o[2][-2000:] for o in outs]
    refused = next(err for rc, _, err in outs if rc == 2)
    run_dir = tmp_path / "train" / "runs" / "same"
    assert f"the run directory {run_dir} is in use by another run (pid" in paragraph(refused), refused
    assert "Traceback" not in refused
    winner, loser = (kd for _, kd in sorted(zip([rc for rc, _, _ in outs], ("none", "logit"))))
    log = (run_dir / "train.log").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    train_records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                     if json.loads(line)["split"] == "train"]
    assert summary["method"] == winner and f"kd={winner}:" in log and f"kd={loser}" not in log
    assert [r["step"] for r in train_records] == list(range(1, 9))  # one run's steps, once each


def test_a_held_directory_is_refused_naming_its_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from shd_vision.engine.identity import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)", str(run_dir)],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    refused = run_cli("train.py", *debug_args(tmp_path, "kd=none"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"in use by another run (pid {holder.pid} on" in paragraph(refused.stderr), refused.stderr
    holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
    holder.wait()
    again = run_cli("train.py", *debug_args(tmp_path, "kd=none"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "pin_memory" not in again.stderr  # a CPU run asks for no pinned memory


def test_launches_without_a_run_name_in_the_same_second_get_their_own_names():
    code = "from shd_vision.config import run_stamp; print(run_stamp())"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    names = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert len(set(names)) == 4, names
    assert all(re.fullmatch(rf"\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_{p.pid}", n) for p, n in zip(procs, names)), names


# ---------------------------------------------------------------- resume only the same run
def test_a_resume_that_changes_the_run_is_refused_naming_every_difference(make_cfg, tmp_path):
    """The issue's example: a finished 2-epoch run resumed with trainer.epochs=4 trained on at the
    schedule's minimum learning rate; now it is refused, with every differing key and both values."""
    finished = ["kd=none", "trainer.epochs=2", "trainer.max_steps=null"]
    summary, _ = train(make_cfg(*finished))
    assert summary["steps"] == 16
    before = files_of(tmp_path / "run")
    with pytest.raises(UserError) as refused:
        train(make_cfg("kd=none", "trainer.epochs=4", "trainer.max_steps=null", "seed=1", "optim.weight_decay=0.1",
                       "trainer.resume=auto", "trainer.log_every=2"))  # log_every may change
    text = str(refused.value)
    assert "in 3 key(s)" in text
    for diff in ("optim.weight_decay (0.05 in the checkpoint, 0.1 now)", "seed (0 in the checkpoint, 1 now)",
                 "trainer.epochs (2 in the checkpoint, 4 now)"):
        assert diff in text
    assert "trainer.init_from=" in text and "trainer.log_every" in text.split("may change on resume:")[1]
    assert files_of(tmp_path / "run") == before
    # the same through the command line: exit 2, one paragraph; then the unchanged command skips the finished run
    cli = run_cli("train.py", *debug_args(tmp_path, "kd=none", "trainer.epochs=4", "trainer.max_steps=null",
                                          "trainer.resume=auto"))
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert "trainer.epochs (2 in the checkpoint, 4 now)" in paragraph(cli.stderr)
    same = run_cli("train.py", *debug_args(tmp_path, *finished, "trainer.resume=auto"))
    assert same.returncode == 0 and "finished already (step 16 of 16)" in same.stdout
    skip = (".lock", "train.log")  # the log gains the line above; checkpoints, metrics and summary stay
    assert files_of(tmp_path / "run", skip) == {p: b for p, b in before.items() if p.name not in skip}


def test_a_finished_record_without_checkpoints_stands_and_a_different_run_is_refused(make_cfg, tmp_path):
    """A study's committed records (summary.json, config.yaml, metrics.jsonl) on a fresh machine:
    resume=auto skips the same run, refuses a differently defined one, and a stopped record retrains."""
    finished = ["kd=none", "trainer.max_steps=4"]
    summary, _ = train(make_cfg(*finished))
    assert summary["facts"]["processes"] == 1 and summary["facts"]["train_images"] == 256
    run = tmp_path / "run"
    for p in sorted(run.iterdir()):  # keep only what a study commits
        if p.name not in ("summary.json", "config.yaml", "metrics.jsonl"):
            subprocess.run(["rm", "-rf", str(p)], check=True)
    before = files_of(run)
    skip = (".lock", "train.log")  # the log gains the line that says so
    again, _ = train(make_cfg(*finished, "trainer.resume=auto", "trainer.log_every=3"))  # a resumable key differs
    assert again == summary and files_of(run, skip) == before
    with pytest.raises(UserError) as refused:
        train(make_cfg("kd=none", "trainer.max_steps=4", "seed=3", "trainer.resume=auto"))
    assert "seed (0 in the record, 3 now)" in paragraph(str(refused.value)) and files_of(run, skip) == before
    for longer in (["trainer.max_steps=6"], ["trainer.max_steps=null"]):  # a smoke run's record is not the full run's
        with pytest.raises(UserError) as refused:
            train(make_cfg("kd=none", *longer, "trainer.resume=auto"))
        assert "ended at step 4 (trainer.max_steps=4), while this one plans" in paragraph(str(refused.value))
        assert files_of(run, skip) == before
    stopped = json.loads((run / "summary.json").read_text()) | {"status": "stopped"}
    (run / "summary.json").write_text(json.dumps(stopped))
    retrained, _ = train(make_cfg(*finished, "trainer.resume=auto"))
    assert retrained["status"] == "finished" and (run / "checkpoints/last.pt").is_file()


def test_a_resume_with_another_process_count_is_refused(make_cfg, tmp_path):
    train(make_cfg("kd=none", "trainer.max_steps=2"))
    last = tmp_path / "run/checkpoints/last.pt"
    ckpt = ck.load(last, "x")
    assert ckpt["facts"] == {"global_batch": 32, "processes": 1, "train_images": 256, "classes": ckpt["classes"],
                             "train_data": content_id(fashion_mnist(FMNIST, "train")),
                             "val_data": content_id(fashion_mnist(FMNIST, "test"))}
    assert ckpt["facts"]["train_data"] != ckpt["facts"]["val_data"]
    ckpt["facts"]["processes"], ckpt["rng"] = 2, ckpt["rng"] * 2  # as if two processes had written it
    ck.atomic_save(ckpt, last)
    with pytest.raises(UserError, match=r"run\.processes \(2 in the checkpoint, 1 now\)"):
        train(make_cfg("kd=none", "trainer.max_steps=4", "trainer.resume=auto"))


def test_a_checkpoint_from_before_facts_were_recorded_is_checked_on_what_it_shows():
    from shd_vision.engine.identity import check_resume, fingerprint, run_facts

    cfg = compose_train(["debug=fast", "hydra.run.dir=/tmp/unused"])
    old = {"config": OmegaConf.to_yaml(cfg, resolve=True), "rng": [{}, {}]}  # two processes, no facts
    now = fingerprint(cfg, run_facts(32, 1, 256, ["a"], ("train id", "val id")))
    with pytest.raises(UserError, match=r"in 1 key\(s\): run\.processes \(2 in the checkpoint, 1 now\)"):
        check_resume("old.pt", old, now)
    check_resume("old.pt", {**old, "rng": [{}]}, now)  # the same process count: nothing else to compare
    facts = {"global_batch": 32, "processes": 1, "train_images": 256, "classes": ["a"]}  # before the content ids
    check_resume("old.pt", {**old, "rng": [{}], "facts": facts}, now)
    with pytest.raises(UserError, match=r"in 1 key\(s\): run\.train_data \(other id in the checkpoint, train id now\)"):
        check_resume("new.pt", {**old, "facts": facts | {"train_data": "other id", "val_data": "val id"}}, now)


def test_a_run_from_another_clone_of_the_project_is_the_same_run():
    """The shipped teacher's path differs between clones; a teacher elsewhere is another run."""
    from shd_vision.engine.identity import differences, fingerprint

    def cfg(root, teacher):
        return OmegaConf.create({"paths": {"root_dir": root, "log_dir": f"{root}/logs"}, "seed": 0,
                                 "teacher": {"checkpoint": teacher}})

    here = fingerprint(cfg("/work/a", "/work/a/shd_vision/assets/t"), {})
    assert here["teacher.checkpoint"] == "${paths.root_dir}/shd_vision/assets/t"
    assert fingerprint(cfg("/srv/b/", "/srv/b/shd_vision/assets/t"), {}) == here
    assert differences(here, fingerprint(cfg("/srv/b", "/work/a/shd_vision/assets/t"), {})) == [
        "teacher.checkpoint (${paths.root_dir}/shd_vision/assets/t in the checkpoint, /work/a/shd_vision/assets/t now)"]


def test_a_run_named_by_slurm_is_guarded_the_same_way(tmp_path):
    env = {"SLURM_JOB_ID": "777", "SLURM_NTASKS": "1"}
    args = ["debug=fast", f"paths.log_dir={tmp_path}", "kd=none", f"trainer.threads={THREADS}"]
    first = run_cli("train.py", *args, "trainer.max_steps=2", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert (tmp_path / "train/runs/slurm-777/checkpoints/last.pt").is_file()
    requeued = run_cli("train.py", *args, "trainer.resume=auto", "data.batch_size=16", env=env)
    assert requeued.returncode == 2
    assert "data.batch_size (32 in the checkpoint, 16 now)" in paragraph(requeued.stderr)
    assert "run.global_batch (32 in the checkpoint, 16 now)" in paragraph(requeued.stderr)


def test_init_from_starts_a_new_run_from_the_students_weights(make_cfg, tmp_path):
    from shd_vision.engine import runtime
    from shd_vision.engine.train import Run

    train(make_cfg("kd=none", run="a"))
    source = tmp_path / "a/checkpoints/last.pt"
    a = ck.load(source, "x")
    b_cfg = make_cfg("kd=none", f"trainer.init_from={source}", "trainer.ema.enabled=true", run="b")
    (tmp_path / "b").mkdir()
    start = Run(b_cfg, runtime.Runtime(torch.device("cpu")), tmp_path / "b")
    start.restore()  # no checkpoint of its own: it takes init_from's weights
    for model in (start.student, start.ema.module):  # the student and its EMA start from the weights
        assert all(torch.equal(a["model"][k], v) for k, v in model.state_dict().items())
    assert start.optimizer.state_dict()["state"] == {}  # a fresh optimiser
    summary, _ = train(b_cfg)
    b = ck.load(tmp_path / "b/checkpoints/last.pt", "x")
    assert not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # it trained from there
    assert summary["init_from"] == {"path": str(source), "step": 4} and b["state"]["step"] == 4
    lrs = [[json.loads(line)["lr"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"] for run in ("a", "b")]
    assert lrs[0] == lrs[1]  # a fresh schedule: the same learning rates from step 1
    with pytest.raises(UserError, match="does not fit model.name"):
        train(make_cfg("kd=none", f"trainer.init_from={source}", "model=vit_fmnist_teacher", run="c"))
    # a stopped run started from weights resumes from its own checkpoint, even once the source is gone
    copy = tmp_path / "source.pt"
    copy.write_bytes(source.read_bytes())
    train(make_cfg("kd=none", f"trainer.init_from={copy}", "trainer.max_steps=2", run="d"))
    copy.unlink()
    resumed, _ = train(make_cfg("kd=none", f"trainer.init_from={copy}", "trainer.resume=auto", run="d"))
    assert resumed["steps"] == 4 and resumed["init_from"] == {"path": str(copy), "step": 4}


def test_resuming_a_checkpoint_into_a_new_directory_writes_a_true_record(make_cfg, tmp_path):
    train(make_cfg("kd=none", "trainer.max_steps=2", run="a"))
    summary, _ = train(make_cfg("kd=none", f"trainer.resume={tmp_path}/a/checkpoints/last.pt", run="b"))
    assert summary["steps"] == 4 and (tmp_path / "b/config.yaml").is_file()
    assert summary["best_checkpoint"] is None or (tmp_path / "b/checkpoints/best.pt").is_file()


def test_the_keys_that_may_change_on_resume_are_listed_in_the_readme():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert all(f"`{key}`" in readme for key in RESUMABLE), [k for k in RESUMABLE if f"`{k}`" not in readme]


# ---------------------------------------------------------------- sweeps
def test_a_failing_job_does_not_end_a_sweep_and_the_printed_command_continues_it(tmp_path):
    """The issue's example: kd=deit on the default (undistilled) student is a user error in job 0;
    job 1 runs, the end names job 0, and the printed command skips job 1 when run again."""
    args = ["-m", "kd=deit,logit", "debug=fast", f"paths.log_dir={tmp_path}", f"trainer.threads={THREADS}"]
    result = run_cli("train.py", *args)
    assert result.returncode == 2, result.stderr[-3000:]
    sweep = next((tmp_path / "train" / "multiruns").iterdir())
    assert json.loads((sweep / "1" / "summary.json").read_text())["method"] == "logit"
    text = paragraph(result.stderr)
    assert "1 of 2 sweep jobs failed" in text and "job 0 (kd=deit): kd.terms.deit trains the student's" in text
    assert "needs a new sweep" in text
    command = result.stderr.strip().splitlines()[-1].strip()  # on its own line, unwrapped: it pastes whole
    assert command.startswith("python train.py -m kd=deit,logit") and f"run_name={sweep.name}" in command
    assert command.endswith("trainer.resume=auto")
    summary_before = (sweep / "1" / "summary.json").read_bytes()
    again = run_cli(*shlex.split(command)[1:])
    assert again.returncode == 2 and "job 0 (kd=deit)" in paragraph(again.stderr)
    assert "finished already (step 4 of 4)" in again.stdout
    assert (sweep / "1" / "summary.json").read_bytes() == summary_before
    assert sorted(p.name for p in (tmp_path / "train" / "multiruns").iterdir()) == [sweep.name]


@pytest.mark.slow
def test_an_optuna_search_records_failed_trials_and_goes_on(tmp_path):
    result = run_cli("train.py", "-m", "hparams_search=shd_optuna", "hydra.sweeper.n_trials=2", "debug=fast",
                     f"trainer.threads={THREADS}", f"paths.log_dir={tmp_path}", "run_name=opt", "optim.lr=-1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("error in sweep job") == 2  # the second trial ran after the first failed
    assert "2 of 2 sweep jobs failed" in paragraph(result.stderr) and "optim.lr=-1.0" in result.stderr


# ---------------------------------------------------------------- the teacher
def test_a_teacher_near_chance_stops_the_run_before_training(tmp_path):
    """The shipped Fashion-MNIST teacher on digits: near chance, so the run stops naming its top-1,
    chance and both likely causes; trainer.teacher_floor=0 goes on."""
    result = run_cli("train.py", *debug_args(tmp_path, "data=digits", "kd=logit"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    text = paragraph(result.stderr)
    top1 = float(re.search(r"top-1 on the validation set is ([\d.]+)%", text).group(1))
    assert top1 < 20 and "near chance for 10 classes (10.00%" in text
    assert "another data set" in text and "1, 10, 2" in text and "data.class_map=FILE" in text
    assert "trainer.teacher_floor=0" in text and not (tmp_path / "run/checkpoints").exists()
    anyway = run_cli("train.py", *debug_args(tmp_path, "data=digits", "kd=logit", "trainer.teacher_floor=0",
                                             "hydra.run.dir=" + str(tmp_path / "anyway")))
    assert anyway.returncode == 0, anyway.stderr[-2000:]
    assert "weights: file " in (tmp_path / "anyway/train.log").read_text()


def test_pretrained_teachers_name_the_weights_they_take():
    expected = {"regnety_160": "regnety_160.deit_in1k", "deit_small": "deit_small_patch16_224.fb_in1k",
                "deit_base": "deit_base_patch16_224.fb_in1k"}
    for teacher, tag in expected.items():
        cfg = compose_train([f"teacher={teacher}", "hydra.run.dir=/tmp/unused"])
        spec = OmegaConf.to_container(cfg.teacher)
        assert spec["pretrained"] is True
        assert pretrained_tag(build(spec, None, "teacher")) == tag
    assert timm.create_model("regnety_160", pretrained=False).pretrained_cfg["tag"] != "deit_in1k"  # why it is pinned


# ---------------------------------------------------------------- one process and many
def test_the_parameters_no_term_reaches_are_found_without_changing_the_run(make_cfg, tmp_path):
    from shd_vision.engine import runtime
    from shd_vision.engine.train import Run

    cfg = make_cfg("data=synthetic", "kd=minilm", "kd.terms.ce.weight=0", "kd.terms.logit.weight=0",
                   "trainer.allow_random_teacher=true")
    run_dir = tmp_path / "probe"
    run_dir.mkdir()
    run = Run(cfg, runtime.Runtime(torch.device("cpu")), run_dir)
    before = {k: v.clone() for k, v in run.student.state_dict().items()}
    state = torch.get_rng_state()
    names = run.distiller.unreached_parameters(run.teacher, run.data_config["input_size"], 10, torch.device("cpu"))
    # MiniLMv2 relates the last student block's queries, keys and values: its attention output
    # projection, MLP, final norm and head get no gradient
    assert "student.head.weight" in names and "student.norm.weight" in names
    assert "student.blocks.3.attn.proj.weight" in names and "student.blocks.3.attn.qkv.weight" not in names
    assert torch.equal(torch.get_rng_state(), state) and all(p.grad is None for p in run.distiller.parameters())
    assert all(torch.equal(before[k], v) for k, v in run.student.state_dict().items())
    full = Run(make_cfg("data=synthetic", "kd=minilm", "trainer.allow_random_teacher=true"),
               runtime.Runtime(torch.device("cpu")), run_dir)
    assert full.distiller.unreached_parameters(full.teacher, full.data_config["input_size"], 10,
                                               torch.device("cpu")) == []
