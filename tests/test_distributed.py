"""Several processes: torchrun with gloo on CPU, restarts after a killed rank, SLURM and
submitit environments, and stop signals."""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import THREADS, debug_args, run_cli
from shd_vision.config import PROJECT_ROOT, _process_start_time, run_stamp
from shd_vision.engine.guards import StopSignals
from shd_vision.engine.runtime import cluster_env

SYNTHETIC = ["data=synthetic", "data.train_size=128", "data.val_size=32", "trainer.threads=1", "kd=none",
             "trainer.eval_teacher=false"]


def torchrun(*args, nproc=2, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra, *args]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def sigterm_once_logged(cmd, log, text, sig=signal.SIGTERM, group=False):
    """Start ``cmd``, send its process ``sig`` once ``log`` shows ``text`` (``group``: to every
    process it started as well, as a terminal's Ctrl-C does); its output when it ends."""
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=group)
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and text in log.read_text()):
        time.sleep(0.05)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    return proc, proc.communicate(timeout=120)[0]


def weights(path):
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_two_gloo_processes_write_one_run_directory(tmp_path):
    args = [f"paths.log_dir={tmp_path}", "debug=fast", *SYNTHETIC, "trainer.max_steps=3", "data.batch_size=8"]
    result = torchrun("train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # both ranks named the same directory
    names = sorted(p.name for p in runs[0].iterdir())
    assert names == [".lock", "checkpoints", "config.yaml", "confusion.png", "curves.png", "metrics.csv",
                     "metrics.jsonl", "summary.json", "train.log"]
    log = (runs[0] / "train.log").read_text()
    assert "2 process(es)" in log and "global batch 16 (8 per process x 2 processes" in log
    assert log.count("run summary") == 1


@pytest.mark.slow
@pytest.mark.parametrize("kd", [["kd=none"], ["kd=minilm", "kd.terms.ce.weight=0", "kd.terms.logit.weight=0"]],
                         ids=["ce", "minilm-alone"])
def test_ranks_agree_and_match_a_single_process_with_the_same_global_batch(tmp_path, kd):
    """Also with terms that leave parameters without gradients (MiniLMv2's relations alone: the
    head and the last block's output side), which DDP used to stop on at step 2."""
    # SGD: an update linear in the gradient, so float rounding stays rounding (Adam divides it by ~0)
    common = ["debug=fast", *[a for a in SYNTHETIC if a != "kd=none"], *kd, "trainer.max_steps=4", "optim=sgd",
              "optim.lr=0.1", f"paths.log_dir={tmp_path}"]
    (tmp_path / "two").mkdir(), (tmp_path / "one").mkdir()
    two = torchrun("tests/ddp_worker.py", str(tmp_path / "two"), *common, "data.batch_size=8",
                   f"hydra.run.dir={tmp_path}/run2")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli("tests/ddp_worker.py", str(tmp_path / "one"), *common, "data.batch_size=16",
                  f"hydra.run.dir={tmp_path}/run1")
    assert one.returncode == 0, one.stderr[-3000:]
    r0, r1, single = (weights(tmp_path / p) for p in ("two/rank0.pt", "two/rank1.pt", "one/rank0.pt"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    for k in r0:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5)
    if "kd=minilm" in kd:
        assert "are frozen: student.blocks.3." in (tmp_path / "run2/train.log").read_text()
        assert torch.equal(r0["head.weight"], single["head.weight"])  # untouched by either


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid):
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e.split(b"=")[1]) for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.slow
def test_torchrun_restarts_after_a_killed_rank_and_resumes_exactly(tmp_path):
    common = ["debug=fast", *SYNTHETIC, "trainer.max_steps=40", "trainer.epochs=5", "trainer.ckpt_every_steps=4",
              "data.batch_size=8", "trainer.resume=auto", f"paths.log_dir={tmp_path}"]
    straight = torchrun("train.py", *common, f"hydra.run.dir={tmp_path}/straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "train.py", *common, f"hydra.run.dir={tmp_path}/killed"]
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = tmp_path / "killed/checkpoints/last.pt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    victim = next((p for p in _children(proc.pid) if _rank_of(p) == 1), None)
    assert victim is not None, "no rank-1 worker found"
    os.kill(victim, signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    log = (tmp_path / "killed/train.log").read_text()
    assert "resumed from" in log
    a = weights(tmp_path / "straight/checkpoints/last.pt")
    b = weights(tmp_path / "killed/checkpoints/last.pt")
    assert a["state"] == b["state"] and a["state"]["step"] == 40
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_slurm_task_maps_to_torch_distributed(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR",
                "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    env = cluster_env()
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == \
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07"}
    assert env["MASTER_PORT"] == cluster_env()["MASTER_PORT"]  # every task derives the same port
    assert 20000 <= int(env["MASTER_PORT"]) <= 60000
    assert run_stamp() == "slurm-4242"
    assert "SUBMITIT_EXECUTOR" not in os.environ  # read, not changed
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert cluster_env() == {}  # one task: no process group
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cluster_env() == {}  # torchrun inside an allocation sets its own


def test_a_multi_node_torchrun_launch_is_named_by_its_rendezvous_id(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "exp7")
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert run_stamp() == "torchrun-exp7"  # the same on every node
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # one node: the agent's start time and pid
    assert run_stamp() == f"{_process_start_time(os.getppid()):%Y-%m-%d_%H-%M-%S}_{os.getppid()}"


@pytest.mark.slow
def test_a_sweep_through_submitit_local_with_two_tasks_per_job(tmp_path):
    result = run_cli("train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                     "hydra.launcher.timeout_min=10", "debug=fast", *SYNTHETIC, "data.batch_size=8",
                     "trainer.max_steps=2", "seed=0,1", f"paths.log_dir={tmp_path}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    for job in ("0", "1"):
        log = (sweeps[0] / job / "train.log").read_text()
        assert "2 process(es)" in log and (sweeps[0] / job / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["sigterm", "ctrl-c"])
def test_sigterm_saves_and_a_resumed_run_ends_where_an_uninterrupted_one_does(sig, group, tmp_path):
    common = [*debug_args(tmp_path), *SYNTHETIC, "trainer.max_steps=60", "trainer.epochs=10", "data.batch_size=8"]
    straight = run_cli("train.py", *common, f"hydra.run.dir={tmp_path}/straight")
    assert straight.returncode == 0, straight.stderr[-2000:]
    # with loader workers. SIGTERM goes to the main process (a group-wide one, as SLURM sends, can
    # kill a worker first and crash the loader: see docs/reliability.md); Ctrl-C to every process
    cmd = [sys.executable, "train.py", *common, f"hydra.run.dir={tmp_path}/stopped", "data.num_workers=2"]
    proc, output = sigterm_once_logged(cmd, tmp_path / "stopped/train.log", "step 3/60", sig, group)
    assert proc.returncode == 0, output[-2000:]
    assert f"stopped by {sig.name}" in output and "trainer.resume=auto" in output and "Traceback" not in output
    stopped = weights(tmp_path / "stopped/checkpoints/last.pt")
    assert 3 <= stopped["state"]["step"] < 60
    command = output.split("Continue it (under the same launcher, if any) with:\n")[1].splitlines()[0]
    assert command.endswith("trainer.resume=auto") and "data.num_workers=2" in command
    resumed = run_cli(*shlex.split(command)[1:])  # the printed command, as a user would paste it
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "straight/checkpoints/last.pt"), weights(tmp_path / "stopped/checkpoints/last.pt")
    assert b["state"]["step"] == 60 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_second_ctrl_c_interrupts_at_once():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGINT)
        assert signals.received == "SIGINT"  # the first one asks for a stop at the next step
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_sigterm_ends_a_local_sweep_not_only_its_current_job(tmp_path):
    """With Hydra's basic launcher one process runs every job of a -m sweep: a stop signal saves
    the running job and ends the sweep (exit 143) instead of starting the next job."""
    cmd = [sys.executable, "train.py", "-m", "seed=0,1", "debug=fast", *SYNTHETIC, "trainer.max_steps=200",
           "trainer.epochs=30", "data.batch_size=8", f"trainer.threads={THREADS}", f"paths.log_dir={tmp_path}", "run_name=sw"]
    proc, output = sigterm_once_logged(cmd, tmp_path / "train/multiruns/sw/0/train.log", "step 3/200")
    assert proc.returncode == 143, output[-2000:]
    assert "stopped by SIGTERM" in output and "the sweep stops here" in output
    assert not (tmp_path / "train/multiruns/sw/1").exists()
    # the printed command resumes job 0, runs job 1, and a second time skips both
    command = output.split("finished ones are skipped) with:\n")[1].splitlines()[0]
    assert command.startswith("python train.py -m seed=0,1 ") and command.endswith("run_name=sw trainer.resume=auto")
    args = shlex.split(command)[2:]
    stopped_at = weights(tmp_path / "train/multiruns/sw/0/checkpoints/last.pt")["state"]["step"]
    continued = run_cli("train.py", *args)
    assert continued.returncode == 0, continued.stderr[-2000:]
    assert f"at step {stopped_at} " in continued.stdout and "Launching 2 jobs" in continued.stdout
    for job in ("0", "1"):
        assert weights(tmp_path / f"train/multiruns/sw/{job}/checkpoints/last.pt")["state"]["step"] == 200
    again = run_cli("train.py", *args)
    assert again.returncode == 0 and again.stdout.count("finished already (step 200 of 200)") == 2
