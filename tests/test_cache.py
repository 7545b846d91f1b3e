"""The teacher cache (methods.md §10): the reconstruction against hand cases and float64, exact
replay of the live teacher (mixup, workers, resume, torchrun), and every refusal."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import THREADS, compose, debug_args, run_cli
from shd_vision.cache import dense_logits, sparse_logits, write_cache
from shd_vision.config import compose_train
from shd_vision.distill.logit import kd_loss
from shd_vision.engine.train import train
from shd_vision.errors import UserError
from shd_vision.report import find_runs, markdown, summarise
from test_distributed import torchrun

# The shipped teacher on 256 Fashion-MNIST images, 2 epochs of 8 batches of 32, mixup and cutmix,
# 2 loader workers: every source of randomness a cache must replay.
PLAN = ["data.train_size=256", "data.val_size=64", "data.num_workers=2", "trainer.max_steps=null",
        "trainer.epochs=2", "data.mixup.mixup_alpha=0.8", "data.mixup.cutmix_alpha=1.0",
        "data.aug.scale=[0.5,1.0]"]
COMBO = ["model=vit_fmnist_student_distilled", "kd=deit", "kd.terms.logit.weight=1"]  # hard DeiT + logit KD


def write(tmp, *overrides, name="cache"):
    cfg = compose_train(["debug=fast", f"paths.log_dir={tmp}/logs", f"trainer.threads={THREADS}", f"cache.dir={tmp}/{name}",
                         *overrides], config_name="cache")
    return write_cache(cfg)


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- reconstruction
def test_all_classes_in_float32_are_the_logits_themselves():
    logits = torch.randn(5, 7) * 4
    assert torch.equal(dense_logits(*sparse_logits(logits, 7), 7), logits)


def test_one_kept_class_and_equal_others_rebuild_the_logits():
    """z = [2, 0, 0, 0]: the three others hold 3/(e²+3) equally, i.e. logit 0 each."""
    z = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    values, indices, lse = sparse_logits(z, 1)
    assert indices.tolist() == [[0]] and lse.item() == pytest.approx(math.log(math.exp(2) + 3), rel=1e-6)
    torch.testing.assert_close(dense_logits(values, indices, lse, 4), z, atol=1e-5, rtol=0)


def test_kept_probabilities_are_exact_and_the_rest_is_shared_equally():
    """Against float64: softmax of the rebuilt logits keeps each kept class's probability and
    gives each other class (1 - kept mass) / (C - K)."""
    torch.manual_seed(0)
    z = torch.randn(6, 10, dtype=torch.float64) * 3
    p = z.softmax(-1)
    values, indices, lse = sparse_logits(z.float(), 3)
    q = dense_logits(values, indices, lse, 10).double().softmax(-1)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, indices.long(), True)
    torch.testing.assert_close(q[kept], p[kept], rtol=1e-5, atol=1e-7)
    rest = (1 - (p * kept).sum(-1, keepdim=True)) / 7
    torch.testing.assert_close(q[~kept].view(6, 7), rest.expand(6, 7), rtol=1e-5, atol=1e-7)


def test_no_mass_left_gives_the_others_none_and_stays_finite_at_any_temperature():
    z = torch.tensor([[0.0, 0.0, -200.0, -300.0]])  # float32 puts all mass on the first two
    values, indices, lse = sparse_logits(z, 2)
    rebuilt = dense_logits(values, indices, lse, 4)
    assert torch.isfinite(rebuilt).all()
    assert rebuilt.softmax(-1)[0, 2:].sum().item() < 1e-30
    student = torch.randn(1, 4)
    for t in (0.5, 1.0, 4.0):
        assert torch.isfinite(kd_loss(student, rebuilt, t))
        torch.testing.assert_close(kd_loss(student, rebuilt, t), kd_loss(student, z, t), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- exact replay
@pytest.mark.slow
def test_a_cached_run_is_the_live_run_bit_for_bit_and_across_a_resume(tmp_path):
    summary = write(tmp_path, *PLAN, *COMBO, "cache.top_k=10", "cache.dtype=float32")
    assert summary["status"] == "finished" and summary["rows"] == 2 * 8 * 32 and summary["parts"] == 2
    assert summary["bytes"] == sum(p.stat().st_size for p in (tmp_path / "cache").glob("*.pt"))
    live, _ = train(compose(tmp_path, *PLAN, *COMBO, run="live"))
    cache = [f"teacher.cache={tmp_path}/cache"]
    cached, objects = train(compose(tmp_path, *PLAN, *COMBO, *cache, run="cached"))
    assert objects["teacher"].header["top_k"] == 10 and cached["teacher_cache"]["dtype"] == "float32"
    assert identical(weights(tmp_path / "live"), weights(tmp_path / "cached"))
    assert cached["top1"] == live["top1"] and cached["teacher_top1"] == live["teacher_top1"]
    assert cached["teacher_cache"]["dir"] == str(tmp_path / "cache") and live["teacher_cache"] is None
    # stopped in the middle of epoch 2, resumed: the same weights again
    train(compose(tmp_path, *PLAN, *COMBO, *cache, "trainer.max_steps=11", run="resumed"))
    train(compose(tmp_path, *PLAN, *COMBO, *cache, "trainer.resume=auto", run="resumed"))
    assert identical(weights(tmp_path / "live"), weights(tmp_path / "resumed"))


@pytest.mark.slow
def test_under_torchrun_each_process_writes_its_parts_and_replays_them_exactly(tmp_path):
    common = debug_args(tmp_path, *PLAN, "data.num_workers=0", "trainer.threads=1", "kd=logit")
    cache = ["cache.top_k=10", "cache.dtype=float32"]
    written = torchrun("-m", "shd_vision.cache", *common, *cache, f"cache.dir={tmp_path}/cache")
    assert written.returncode == 0, written.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.pt")) == [
        f"epoch-000{e}.rank-{r}.pt" for e in (0, 1) for r in (0, 1)]
    # one process writing the same 2-process plan gives the same logits
    single = write(tmp_path, *PLAN, "data.num_workers=0", "kd=logit", *cache, "cache.processes=2", name="single")
    assert single["train_command"].startswith("torchrun --nproc_per_node=2 train.py ")  # the plan's launch
    for part in (tmp_path / "cache").glob("*.pt"):
        a, b = (torch.load(d / part.name, weights_only=True) for d in (tmp_path / "cache", tmp_path / "single"))
        assert all(torch.equal(a[k], b[k]) for k in ("values", "indices", "lse"))
    for name, extra in (("live", []), ("cached", [f"teacher.cache={tmp_path}/cache"])):
        result = torchrun("train.py", *common, *extra, f"hydra.run.dir={tmp_path}/{name}")
        assert result.returncode == 0, result.stderr[-3000:]
    assert identical(weights(tmp_path / "live"), weights(tmp_path / "cached"))
    assert "process(es)" in (tmp_path / "cache" / "cache.log").read_text()


@pytest.mark.parametrize("plan", [["data.holdout=64"], ["data.repeated_aug=2"]], ids=["holdout", "repeated-aug"])
def test_held_out_validation_and_repeated_augmentation_replay_exactly(tmp_path, plan):
    run = [*PLAN, "data.num_workers=0", "trainer.epochs=1", "kd=logit", *plan]
    write(tmp_path, *run, "cache.top_k=10", "cache.dtype=float32")
    live, _ = train(compose(tmp_path, *run, run="live"))
    cached, _ = train(compose(tmp_path, *run, f"teacher.cache={tmp_path}/cache", run="cached"))
    assert identical(weights(tmp_path / "live"), weights(tmp_path / "cached"))
    assert cached["teacher_top1"] == live["teacher_top1"]  # on the held-out images, measured by the writer


# ---------------------------------------------------------------- what a cache refuses
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    write(tmp, *PLAN, "data.num_workers=0", "cache.top_k=3")
    return tmp / "cache"


def test_a_run_defined_differently_is_refused_naming_each_difference(cache_dir, tmp_path):
    with pytest.raises(UserError) as e:
        train(compose(tmp_path, *PLAN, "data.num_workers=0", f"teacher.cache={cache_dir}", "seed=1",
                      "data.batch_size=16", "data.mixup.cutmix_alpha=0"))
    text = str(e.value)
    for key in ("seed (0 in the cache, 1 now)", "data.batch_size (32 in the cache, 16 now)",
                "data.mixup.cutmix_alpha (1.0 in the cache, 0.0 now)", "run.global_batch (32 in the cache, 16 now)"):
        assert key in text, text
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_workers_and_validation_settings_do_not_matter(cache_dir, tmp_path):
    summary, _ = train(compose(tmp_path, *PLAN, "data.num_workers=1", "data.val_size=32", "trainer.max_steps=2",
                               f"teacher.cache={cache_dir}"))
    assert summary["steps"] == 2 and summary["teacher_top1"] is None  # measured on other images


def test_an_epoch_the_cache_lacks_is_refused(cache_dir, tmp_path):
    with pytest.raises(UserError, match=r"this run trains epochs 1 to 3, and the cache has no epoch 3 \(process 0"):
        train(compose(tmp_path, *PLAN, "data.num_workers=0", "trainer.epochs=3", f"teacher.cache={cache_dir}"))


@pytest.mark.parametrize("kd", ["shd", "minilm", "fitnet", "manifold", "adkd"])
def test_terms_that_read_more_than_logits_are_refused(cache_dir, tmp_path, kd):
    with pytest.raises(UserError, match=f"the term\\(s\\) {kd} read the teacher's attention, features or gradients"):
        train(compose(tmp_path, *PLAN, f"kd={kd}", f"teacher.cache={cache_dir}"))


def test_a_damaged_part_is_named_and_the_run_keeps_its_checkpoint(cache_dir, tmp_path):
    cache = tmp_path / "copy"
    cache.mkdir()
    for f in cache_dir.iterdir():
        if f.is_file():
            (cache / f.name).write_bytes(f.read_bytes())
    run = [*PLAN, "data.num_workers=0", f"teacher.cache={cache}"]
    train(compose(tmp_path, *run, "trainer.max_steps=8"))  # epoch 1 done
    last = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    part = cache / "epoch-0001.rank-0.pt"
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(UserError, match=f"{part} has .* bytes, its record .* \\(truncated or overwritten\\)"):
        train(compose(tmp_path, *run, "trainer.resume=auto"))
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == last
    data = bytearray(cache_dir.joinpath(part.name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its recorded SHA-256"):
        train(compose(tmp_path, *run, "trainer.resume=auto"))


def test_a_killed_writer_is_completed_and_a_finished_cache_never_overwritten(tmp_path):
    write(tmp_path, *PLAN, "data.num_workers=0", "cache.top_k=2")
    kept = (tmp_path / "cache" / "epoch-0000.rank-0.pt").stat().st_mtime_ns
    (tmp_path / "cache" / "epoch-0001.rank-0.json").unlink()  # as if killed before its record
    with pytest.raises(UserError, match="holds a teacher cache already, which is never overwritten"):
        write(tmp_path, *PLAN, "data.num_workers=0", "cache.top_k=2")
    with pytest.raises(UserError, match=r"another plan, differing in 1 key\(s\): top_k \(2 in the cache, 3 now\)"):
        write(tmp_path, *PLAN, "data.num_workers=0", "cache.top_k=3", "cache.resume=auto")
    summary = write(tmp_path, *PLAN, "data.num_workers=0", "cache.top_k=2", "cache.resume=auto")
    assert summary["status"] == "finished" and summary["rows_written"] == 8 * 32  # one part rewritten
    assert (tmp_path / "cache" / "epoch-0000.rank-0.pt").stat().st_mtime_ns == kept
    assert json.loads((tmp_path / "cache" / "summary.json").read_text())["parts"] == 2


def test_a_cache_from_before_the_data_content_ids_is_completed_without_rewriting_its_parts(tmp_path):
    """A cache.json whose fingerprint predates run.train_data (and parts whose records name that
    plan): cache.resume=auto writes only the missing part, keeps the old fingerprint, and a run
    trains from it."""
    from shd_vision.cache import plan_id

    run = [*PLAN, "data.num_workers=0", "kd=logit"]
    write(tmp_path, *run, "cache.top_k=2")
    cache = tmp_path / "cache"
    header = json.loads((cache / "cache.json").read_text())
    del header["fingerprint"]["run.train_data"]
    old = plan_id(header)
    (cache / "cache.json").write_text(json.dumps(header))
    for record in cache.glob("epoch-*.json"):
        record.write_text(json.dumps(json.loads(record.read_text()) | {"plan": old}))
    kept = (cache / "epoch-0000.rank-0.pt").stat().st_mtime_ns
    (cache / "epoch-0001.rank-0.json").unlink()  # as if killed before its record
    summary = write(tmp_path, *run, "cache.top_k=2", "cache.resume=auto")
    assert summary["rows_written"] == 8 * 32 and (cache / "epoch-0000.rank-0.pt").stat().st_mtime_ns == kept
    assert "run.train_data" not in json.loads((cache / "cache.json").read_text())["fingerprint"]
    assert train(compose(tmp_path, *run, f"teacher.cache={cache}"))[0]["status"] == "finished"


def test_parts_are_only_ever_read_as_the_cache_they_were_written_for(tmp_path):
    """A cache whose cache.json is lost is not adopted by a writer of another plan, and a part
    moved into another cache is refused by the run, not replayed."""
    run = [*PLAN, "data.num_workers=0", "trainer.epochs=1", "kd=logit"]
    write(tmp_path, *run, "cache.top_k=10", "cache.dtype=float32", name="seed0")
    write(tmp_path, *run, "seed=1", "cache.top_k=10", "cache.dtype=float32", name="seed1")
    (tmp_path / "seed0" / "cache.json").unlink()
    with pytest.raises(UserError, match="holds cache parts .* but no readable cache.json"):
        write(tmp_path, *run, "seed=1", "cache.top_k=10", "cache.dtype=float32", name="seed0")
    summary = write(tmp_path, *run, "seed=1", "cache.top_k=10", "cache.dtype=float32", "cache.resume=auto",
                    name="seed0")
    assert summary["rows_written"] == 8 * 32  # the seed-0 part was not taken for seed 1's: rewritten
    part = "epoch-0000.rank-0"
    assert (tmp_path / "seed0" / f"{part}.pt").read_bytes() == (tmp_path / "seed1" / f"{part}.pt").read_bytes()
    write(tmp_path, *run, "seed=2", "cache.top_k=10", "cache.dtype=float32", name="seed2")
    for suffix in (".pt", ".json"):  # seed 2's part, with its record, in seed 1's cache
        (tmp_path / "seed1" / f"{part}{suffix}").write_bytes((tmp_path / "seed2" / f"{part}{suffix}").read_bytes())
    with pytest.raises(UserError, match=f"{part}.pt belongs to another cache"):
        train(compose(tmp_path, *run, "seed=1", f"teacher.cache={tmp_path}/seed1"))


def test_the_report_names_the_rows_a_cache_taught(tmp_path):
    for name, cache in (("logit", None), ("logit_k1", {"top_k": 1, "dtype": "float16"})):
        for seed in (0, 1):
            run = tmp_path / f"{name}-{seed}"
            run.mkdir()
            path = None if cache is None else f"/caches/k1/seed{seed}"  # one cache per seed
            (run / "config.yaml").write_text(OmegaConf.to_yaml(
                {"seed": seed, "kd": {"name": name}, "teacher": {"name": "t", "cache": path}}))
            (run / "summary.json").write_text(json.dumps(
                {"top1": 80.0 + seed + (cache is None), "train_samples_per_s": 1.0, "wall_time_s": 1.0,
                 "teacher": "t", "teacher_cache": cache and {**cache, "dir": path}}))
    keys, rows = summarise(find_runs(tmp_path))
    assert keys == ["kd.name"]  # the per-seed cache paths are not a setting
    assert {r["kd.name"]: r["teacher"] for r in rows} == {"logit": "live", "logit_k1": "cache top-1 float16"}
    assert "| kd.name | teacher | top-1 (%) |" in markdown(keys, rows)
    # one name for both: a live teacher and a cache are still two rows, never one of 4 runs
    for run in tmp_path.glob("logit_k1-*"):
        config = OmegaConf.load(run / "config.yaml")
        config.kd.name = "logit"
        (run / "config.yaml").write_text(OmegaConf.to_yaml(config))
    keys, rows = summarise(find_runs(tmp_path), by=["kd.name"])
    assert keys == ["kd.name", "teacher"] and sorted(r["teacher"] for r in rows) == ["cache top-1 float16", "live"]
    assert all(r["seeds"] == 2 and not r["repeated_seeds"] for r in rows)


def test_the_cli_refuses_more_classes_than_the_data_has_in_one_paragraph(tmp_path):
    result = run_cli("-m shd_vision.cache", *debug_args(tmp_path, "cache.top_k=11", f"cache.dir={tmp_path}/c"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: cache.top_k=11 is more than the 10 classes") and "Traceback" not in result.stderr
