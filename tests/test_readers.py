"""timm's dataset readers (methods of ``timm.data.create_dataset``): image folders, tar archives,
Hugging Face datasets and WebDataset shards, written on the fly from scikit-learn's digits, read
the same images, train and evaluate with 1 and 2 processes, and resume."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import debug_args, run_cli
from shd_vision.cache import write_cache
from shd_vision.config import compose_train
from shd_vision.data import datasets
from shd_vision.data.loaders import build_data, open_splits

CLASSES = [str(c) for c in range(10)]
SPLITS = {"train": 64, "validation": 32}


def digit_images(split, n):
    """``n`` digits of ``split`` as 16x16 RGB PNG bytes; pixel (0, 0) carries the sample's number."""
    ds = datasets.digits("train" if split == "train" else "test")
    out = []
    for i in range(n):
        rgb = np.repeat(np.array(Image.fromarray(ds.images[i]).resize((16, 16)))[..., None], 3, -1)
        rgb[0, 0] = (i % 256, i // 256, 7)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="PNG")
        out.append((f"{split}-{i:04d}", int(ds.labels[i]), buf.getvalue()))
    return out


def write_folder(root):
    for split, n in SPLITS.items():
        for key, label, png in digit_images(split, n):
            (root / split / str(label)).mkdir(parents=True, exist_ok=True)
            (root / split / str(label) / f"{key}.png").write_bytes(png)


def write_tars(root):
    root.mkdir(parents=True)
    for split, n in SPLITS.items():
        with tarfile.open(root / f"{split}.tar", "w") as tar:
            for key, label, png in digit_images(split, n):
                info = tarfile.TarInfo(f"{label}/{key}.png")
                info.size = len(png)
                tar.addfile(info, io.BytesIO(png))


def write_hf(root):
    from datasets import ClassLabel, Dataset, Features, Image as HFImage

    root.mkdir(parents=True)
    for split, n in SPLITS.items():
        items = sorted(digit_images(split, n), key=lambda item: (str(item[1]), item[0]))  # the folder's order
        data = {"image": [{"bytes": png, "path": f"{key}.png"} for key, _, png in items],
                "label": [label for _, label, _ in items]}
        features = Features({"image": HFImage(), "label": ClassLabel(names=CLASSES)})
        Dataset.from_dict(data, features=features).to_parquet(str(root / f"{split}-00000-of-00001.parquet"))


def write_shards(root, shards=None, broken=()):
    """WebDataset shards: 4 train shards of 16 samples, 2 validation shards, and _info.json; the
    samples numbered in ``broken`` hold bytes no image decoder reads."""
    root.mkdir(parents=True)
    info = {"name": "digits", "classes": CLASSES, "splits": {}}
    for split, n in SPLITS.items():
        count = shards or (4 if split == "train" else 2)
        names = [f"{split}-{s:04d}.tar" for s in range(count)]
        items = digit_images(split, n)
        for s, name in enumerate(names):
            with tarfile.open(root / name, "w") as tar:
                for key, label, png in items[s::count]:
                    png = b"not an image" if int(key.split("-")[1]) in broken else png
                    for ext, payload in (("png", png), ("cls", str(label).encode())):
                        member = tarfile.TarInfo(f"{key}.{ext}")
                        member.size = len(payload)
                        tar.addfile(member, io.BytesIO(payload))
        info["splits"][split] = {"name": split, "num_samples": n, "filenames": names,
                                 "shard_lengths": [len(items[s::count]) for s in range(count)]}
    (root / "_info.json").write_text(json.dumps(info))


READERS = {
    "folder": (write_folder, ["data=imagefolder", "data.val_split=validation"]),
    "tar": (write_tars, ["data=imagefolder", "data.val_split=validation"]),
    "hfds": (write_hf, ["data=hfds"]),
    "wds": (write_shards, ["data=wds", "data.name=wds/digits"]),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("readers")
    for name, (write, _) in READERS.items():
        write(root / name)
    return root


def reader_cfg(written, name, **kw):
    args = READERS[name][1]
    cfg = OmegaConf.load("conf/data/imagefolder.yaml")
    if "data=hfds" in args:
        cfg = OmegaConf.merge(cfg, OmegaConf.load("conf/data/hfds.yaml"))
        cfg.name, cfg.root = f"hfds/{written / 'hfds'}", str(written / "hf-cache")
    elif "data=wds" in args:
        cfg = OmegaConf.merge(cfg, OmegaConf.load("conf/data/wds.yaml"))
        cfg.name, cfg.root = "wds/digits", str(written / "wds")
    else:
        cfg.val_split, cfg.root = "validation", str(written / name)
    cfg.pop("defaults", None)
    return OmegaConf.merge(cfg, kw)


def pixels(image):
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("name", ["tar", "hfds"])
def test_map_style_readers_give_the_folders_images_and_labels(written, name, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder_train, folder_val, classes = open_splits(reader_cfg(written, "folder"))
    train, val, other_classes = open_splits(reader_cfg(written, name))
    assert classes == other_classes == CLASSES
    for a, b in ((folder_train, train), (folder_val, val)):
        assert len(a) == len(b) == {64: 64, 32: 32}[len(a)]
        for i in range(len(a)):
            (x, y), (u, v) = a[i], b[i]
            assert y == v and np.array_equal(pixels(x), pixels(u)), (name, i)


def raw(image):
    """Untransformed pixels (in place of the training transform), to read the samples' numbers."""
    return torch.from_numpy(np.asarray(image).copy())


def sample_ids(batch_images):
    """The sample numbers written into pixel (0, 0), from untransformed uint8 tensors."""
    return [int(img[0, 0, 0]) + 256 * int(img[0, 0, 1]) for img in batch_images]


def test_webdataset_epoch_sees_each_sample_once_and_replays_by_seed(written):
    cfg = reader_cfg(written, "wds", batch_size=8, num_workers=2)
    splits = open_splits(cfg)
    data_cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
                "crop_pct": 1.0}
    data = build_data(cfg, splits, data_cfg, seed=3)
    data.train.dataset.transform = raw
    assert len(data.train) == 8

    def epoch(e, done=0):
        return [i for images, _ in data.epoch(e, done) for i in sample_ids(images)]

    first, second = epoch(0), epoch(1)
    assert sorted(first) == sorted(second) == list(range(64)) and first != second
    assert epoch(0) == first  # an epoch is a function of (seed, epoch)
    assert epoch(1, done=3) == second[24:]  # a resumed epoch continues where it stopped


def spawn_ranks(rank, world, port, cfg_yaml, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = OmegaConf.create(cfg_yaml)
    data_cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
                "crop_pct": 1.0}
    data = build_data(cfg, open_splits(cfg), data_cfg, seed=0, rank=rank, world=world)
    data.train.dataset.transform = raw
    seen = [i for images, _ in data.epoch(0, 0) for i in sample_ids(images)]
    torch.save({"seen": seen, "batches": len(data.train)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_share_the_shards_of_an_epoch_without_overlap(written, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = OmegaConf.to_container(reader_cfg(written, "wds", batch_size=8, num_workers=1))
    mp.spawn(spawn_ranks, args=(2, port, cfg, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["batches"] for r in ranks] == [4, 4]
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(64))


@pytest.mark.parametrize("name", list(READERS))
def test_train_and_evaluate_on_each_reader(written, tmp_path, name):
    """train.py then eval.py: the same student, teacher (the shipped grey one), transforms and
    mixup as the folder; the whole validation split is counted."""
    data = [*READERS[name][1], "data.batch_size=8", "data.num_workers=1", "data.val_size=null"]
    if name == "hfds":
        data += [f"data.name=hfds/{written / 'hfds'}", f"data.root={tmp_path / 'cache'}"]
    else:
        data += [f"data.root={written / name}"]
    args = [*data, "model=vit_fmnist_student", "kd=logit", "data.mixup.mixup_alpha=0.4", "data.train_size=null",
            "trainer.max_steps=null", "trainer.epochs=1", "data.img_size=16", "model.img_size=16",
            "trainer.teacher_floor=0"]  # the Fashion-MNIST teacher is near chance on digits, as it should be
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = run_cli("train.py", *debug_args(tmp_path, *args), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "64 train / 32 val images" in log and "8 steps (8 per epoch" in log, log[:3000]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and 0 <= summary["top1"] <= 100
    evaluation = run_cli("eval.py", f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", *data,
                         f"hydra.run.dir={tmp_path}/eval", env=env)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "32 images" in evaluation.stdout or "32 images" in evaluation.stderr, evaluation.stdout[-2000:]


def shard_args(written, tmp_path, *extra):
    return debug_args(tmp_path, "data=wds", "data.name=wds/digits", f"data.root={written / 'wds'}", "data.batch_size=8",
                      "data.num_workers=1", "data.train_size=null", "data.val_size=null", "model=vit_fmnist_student",
                      "kd=logit", "data.img_size=16", "model.img_size=16", "+model.drop_rate=0.1",
                      "trainer.max_steps=null", "trainer.epochs=2", "trainer.eval_teacher=false", *extra)


def test_a_resumed_webdataset_run_ends_with_the_uninterrupted_weights(written, tmp_path):
    """Stopped mid-way through its second epoch and resumed, a run on shards replays that epoch's
    stream (same shard order, worker seeds and augmentations), drops the batches it trained on and
    ends bit-identical to an uninterrupted one."""
    straight = run_cli("train.py", *shard_args(written, tmp_path, f"hydra.run.dir={tmp_path}/straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = run_cli("train.py", *shard_args(written, tmp_path, f"hydra.run.dir={tmp_path}/resumed", "trainer.max_steps=11"))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = run_cli("train.py", *shard_args(written, tmp_path, f"hydra.run.dir={tmp_path}/resumed", "trainer.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (torch.load(tmp_path / run / "checkpoints/last.pt", weights_only=True) for run in ("straight", "resumed"))
    assert a["state"]["step"] == b["state"]["step"] == 16
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wds", "tar"])
def test_two_processes_train_and_evaluate_on_shards_and_archives(written, tmp_path, name):
    import os
    import subprocess
    import sys

    from shd_vision.config import PROJECT_ROOT

    data = ([f"data.root={written / 'wds'}", "data=wds", "data.name=wds/digits"] if name == "wds"
            else [f"data.root={written / 'tar'}", "data=imagefolder", "data.val_split=validation"])
    args = [*debug_args(tmp_path, *data, "data.batch_size=8", "data.num_workers=1", "data.train_size=null",
                        "data.val_size=null", "model=vit_fmnist_student", "kd=logit", "data.img_size=16",
                        "model.img_size=16", "trainer.max_steps=null", "trainer.epochs=1", "trainer.threads=1",
                        "trainer.teacher_floor=0")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]
    result = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "2 process(es)" in log and "4 steps (4 per epoch" in log, log[:3000]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in records if r["split"] == "val"] == [32]  # both ranks' shards, each image once


# ---------------------------------------------------------------- every sample counted once
DATA_CFG = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
            "crop_pct": 1.0}


def count_validation(rank, world, port, cfgs, out):
    """One process's validation passes over each config's shards: the sample numbers it read and
    the sample count of the record (``evaluate``, summed over the processes)."""
    import torch.distributed as dist

    from shd_vision.data.loaders import build_val_loader
    from shd_vision.engine.metrics import evaluate
    from shd_vision.engine.runtime import Runtime

    if world > 1:
        torch.multiprocessing.set_start_method("fork", force=True)  # loader workers as under torchrun
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    for cfg_yaml in cfgs:
        cfg = OmegaConf.create(cfg_yaml)
        _, val, classes = open_splits(cfg)
        loader = build_val_loader(cfg, val, DATA_CFG, rank, world)
        loader.dataset.transform = raw
        seen = [i for images, _ in loader for i in sample_ids(images)]
        record = evaluate(lambda x: torch.zeros(len(x), len(classes)), loader, len(classes),
                          Runtime(torch.device("cpu"), rank, world))
        results.append({"seen": seen, "samples": record["samples"]})
    torch.save(results, f"{out}/rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.parametrize("processes", [1, 2])
def test_validation_on_shards_counts_each_sample_once(tmp_path, processes):
    """32 validation samples in 1, 2 or 3 shards, 1 or 2 processes with 2 loader workers each (so
    down to 1 shard for 4 workers): the record counts 32, and each sample was read once. With an
    undecodable sample (timm skips it) the record counts the other 31, each once (under two
    processes timm's stream used to restart a short worker's shards: a sample twice)."""
    import socket

    import torch.multiprocessing as mp

    cfgs = []
    for shards in (1, 2, 3):
        write_shards(tmp_path / f"wds{shards}", shards=shards)
        cfgs.append(OmegaConf.to_container(reader_cfg(tmp_path, "wds", batch_size=4, num_workers=2,
                                                      root=str(tmp_path / f"wds{shards}"))))
    write_shards(tmp_path / "broken", shards=4, broken=(5,))
    cfgs.append(OmegaConf.to_container(reader_cfg(tmp_path, "wds", batch_size=4, num_workers=2,
                                                  root=str(tmp_path / "broken"))))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if processes == 1:
        count_validation(0, 1, port, cfgs, str(tmp_path))
    else:
        mp.spawn(count_validation, args=(processes, port, cfgs, str(tmp_path)), nprocs=processes)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(processes)]
    for shards in (0, 1, 2):
        assert [r[shards]["samples"] for r in ranks] == [32] * processes, shards + 1
        assert sorted(i for r in ranks for i in r[shards]["seen"]) == list(range(32)), shards + 1
    assert [r[3]["samples"] for r in ranks] == [31] * processes
    assert sorted(i for r in ranks for i in r[3]["seen"]) == [i for i in range(32) if i != 5]


def test_a_stream_epoch_is_capped_at_its_split_and_never_repeats_a_sample(tmp_path, caplog):
    """The issue's example: data.train_size=256 on 64 samples made timm repeat the stream four
    times; now the epoch is the 64 samples, each once. Shards that do not split evenly over the
    workers give a shorter epoch (said once), never a repeated sample; too few shards are refused."""
    write_shards(tmp_path / "four")
    data = build_data(reader_cfg(tmp_path, "wds", batch_size=8, num_workers=2, train_size=256,
                                 root=str(tmp_path / "four")), open_splits(reader_cfg(
                                     tmp_path, "wds", root=str(tmp_path / "four"))), DATA_CFG, seed=0)
    data.train.dataset.transform = raw
    assert data.train_images == 64 and "data.train_size=256 is more than the 64 samples" in caplog.text
    assert sorted(i for images, _ in data.epoch(0, 0) for i in sample_ids(images)) == list(range(64))

    write_shards(tmp_path / "three", shards=3)  # 22, 21 and 21 samples over 2 workers
    cfg = reader_cfg(tmp_path, "wds", batch_size=8, num_workers=2, train_size=None, root=str(tmp_path / "three"))
    data = build_data(cfg, open_splits(cfg), DATA_CFG, seed=0)
    data.train.dataset.transform = raw
    for epoch in (0, 1):
        seen = [i for images, _ in data.epoch(epoch, 0) for i in sample_ids(images)]
        assert len(seen) == data.train_images == 32 and len(set(seen)) == 32  # 16 a worker: 21 at least, whole batches
    assert "trains on 32 of its 64 samples" in caplog.text

    write_shards(tmp_path / "one", shards=1)
    cfg = reader_cfg(tmp_path, "wds", batch_size=8, num_workers=2, root=str(tmp_path / "one"))
    with pytest.raises(datasets.UserError, match=r"1 shard\(s\), fewer than the 2 loader workers"):
        build_data(cfg, open_splits(cfg), DATA_CFG, seed=0)


def test_a_map_style_subset_larger_than_its_split_is_capped_and_said(tmp_path, written, caplog):
    cfg = reader_cfg(written, "folder", batch_size=8, num_workers=0, train_size=100, val_size=1000)
    data = build_data(cfg, open_splits(cfg), DATA_CFG, seed=0)
    assert (data.train_images, data.val_images) == (64, 32)
    assert "data.train_size=100 is more than the 64 images" in caplog.text
    assert "data.val_size=1000 is more than the 32 images" in caplog.text


# ---------------------------------------------------------------- class order and class counts
def test_a_class_map_sets_the_class_order_of_a_folder(tmp_path):
    """Folders 1..10: timm orders them naturally; a class map in torchvision's string order (1, 10,
    2, ...) gives each image the index of its folder in that file."""
    for split, n in SPLITS.items():
        for key, label, png in digit_images(split, n):
            (tmp_path / "f" / split / str(label + 1)).mkdir(parents=True, exist_ok=True)
            (tmp_path / "f" / split / str(label + 1) / f"{key}.png").write_bytes(png)
    natural = [str(c) for c in range(1, 11)]
    string_order = sorted(natural)
    assert string_order[:3] == ["1", "10", "2"]
    (tmp_path / "map.txt").write_text("\n".join(string_order) + "\n")
    assert open_splits(reader_cfg(tmp_path, "folder", root=str(tmp_path / "f")))[2] == natural
    train, _, classes = open_splits(reader_cfg(tmp_path, "folder", root=str(tmp_path / "f"),
                                               class_map=str(tmp_path / "map.txt")))
    assert classes == string_order
    for i in range(len(train)):
        folder = train.reader.filename(i, absolute=True).split("/")[-2]
        assert train[i][1] == string_order.index(folder)
    (tmp_path / "short.txt").write_text("\n".join(string_order[:8]) + "\n")
    with pytest.raises(datasets.UserError, match="does not list the class folders 8, 9 of"):
        open_splits(reader_cfg(tmp_path, "folder", root=str(tmp_path / "f"), class_map=str(tmp_path / "short.txt")))
    for split in SPLITS:  # the same folders as tar archives: timm's tar reader drops unlisted classes silently too
        with tarfile.open(tmp_path / f"{split}.tar", "w") as tar:
            tar.add(tmp_path / "f" / split, arcname=".")
    (tmp_path / "t").mkdir()
    for split in SPLITS:
        (tmp_path / f"{split}.tar").rename(tmp_path / "t" / f"{split}.tar")
    assert open_splits(reader_cfg(tmp_path, "folder", root=str(tmp_path / "t"), class_map=str(tmp_path / "map.txt")))[2] \
        == string_order
    with pytest.raises(datasets.UserError, match=r"does not list the class folders 8, 9 of .*train.tar"):
        open_splits(reader_cfg(tmp_path, "folder", root=str(tmp_path / "t"), class_map=str(tmp_path / "short.txt")))
    (tmp_path / "n").mkdir()  # ImageNet's train archive: one inner archive per class
    for split in SPLITS:
        with tarfile.open(tmp_path / "n" / f"{split}.tar", "w") as outer:
            for folder in sorted((tmp_path / "f" / split).iterdir()):
                with tarfile.open(tmp_path / f"{folder.name}.tar", "w") as inner:
                    for image in sorted(folder.iterdir()):
                        inner.add(image, arcname=image.name)
                outer.add(tmp_path / f"{folder.name}.tar", arcname=f"{folder.name}.tar")
    with pytest.raises(datasets.UserError, match=r"does not list the class folders 8, 9 of .*n/train.tar"):
        open_splits(reader_cfg(tmp_path, "folder", root=str(tmp_path / "n"), class_map=str(tmp_path / "short.txt")))
    with pytest.raises(datasets.UserError, match="data.num_classes=9 but the data has 10 classes"):
        open_splits(reader_cfg(tmp_path, "folder", root=str(tmp_path / "f"), num_classes=9, holdout=20))
    with pytest.raises(datasets.UserError, match="data.class_map=.*missing.txt is not a file"):
        open_splits(reader_cfg(tmp_path, "folder", root=str(tmp_path / "f"), class_map=str(tmp_path / "missing.txt")))
    fashion = OmegaConf.merge(OmegaConf.load("conf/data/fashion_mnist.yaml"), {"class_map": "map.txt"})
    with pytest.raises(datasets.UserError, match="has a fixed class order"):
        open_splits(fashion)


def write_plain_label_parquet(root, label_type):
    """A Hugging Face dataset whose labels are plain values (no ClassLabel), as after a parquet round trip."""
    from datasets import Dataset, Features, Image as HFImage, Value

    root.mkdir(parents=True)
    for split, n in SPLITS.items():
        items = digit_images(split, n)
        labels = [label if label_type == "int64" else f"digit {label}" for _, label, _ in items]
        features = Features({"image": HFImage(), "label": Value(label_type)})
        Dataset.from_dict({"image": [{"bytes": png, "path": f"{key}.png"} for key, _, png in items],
                           "label": labels}, features=features).to_parquet(
            str(root / f"{split}-00000-of-00001.parquet"))


def test_plain_integer_labels_give_the_class_count(tmp_path, monkeypatch):
    """The issue's example: integer labels without names gave 0 classes (and timm an Identity head)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_plain_label_parquet(tmp_path / "ints", "int64")
    name = f"hfds/{tmp_path / 'ints'}"
    cfg = OmegaConf.merge(reader_cfg(tmp_path, "hfds"), {"name": name, "root": str(tmp_path / "cache")})
    train, val, classes = open_splits(cfg)
    labels = {train[i][1] for i in range(len(train))}
    assert classes == [str(c) for c in range(max(labels) + 1)] == CLASSES
    assert open_splits(OmegaConf.merge(cfg, {"num_classes": 12}))[2] == [str(c) for c in range(12)]
    with pytest.raises(datasets.UserError, match="data.num_classes=5 but the label column 'label'.*holds label 9"):
        open_splits(OmegaConf.merge(cfg, {"num_classes": 5}))
    write_plain_label_parquet(tmp_path / "words", "string")
    with pytest.raises(datasets.UserError, match=r"label column 'label' holds Value\(.*string.*cast_column"):
        open_splits(OmegaConf.merge(cfg, {"name": f"hfds/{tmp_path / 'words'}"}))
    args = ["data=hfds", f"data.name={name}", f"data.root={tmp_path / 'cache'}", "data.batch_size=8",
            "data.num_workers=0", "model=vit_fmnist_student", "kd=none", "data.img_size=16", "model.img_size=16"]
    result = run_cli("train.py", *debug_args(tmp_path, *args), env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "64 train / 32 val images, 10 classes" in (tmp_path / "run" / "train.log").read_text()


def test_the_teacher_cache_refuses_a_stream(written, tmp_path):
    cfg = compose_train([*shard_args(written, tmp_path), f"cache.dir={tmp_path}/cache"], config_name="cache")
    with pytest.raises(datasets.UserError, match="is read as a stream .* a cache cannot replay exactly"):
        write_cache(cfg)
    assert not list((tmp_path / "cache").glob("epoch-*"))


def first_batch(cfg):
    """The first training batch of the folder reader (in-process), with its ``(index, seed)`` items."""
    data_cfg = {"input_size": (3, 16, 16), "mean": (0.4, 0.5, 0.6), "std": (0.2, 0.25, 0.3),
                "interpolation": "bicubic", "crop_pct": 0.875}
    data = build_data(cfg, open_splits(cfg), data_cfg, seed=0)
    data.sampler.set_epoch(0)
    items = list(data.sampler)[:cfg.batch_size]
    images, labels = next(iter(data.train))
    return data, data_cfg, items, images, labels


def test_uint8_images_normalised_on_the_device_are_timms_stock_pipeline(written):
    """Speed-ups off (data.normalize_on_device=false, data.aug.affine=pil) is timm's create_transform,
    pixel for pixel (RandAugment m9,
    bicubic crops); true ships the same crops and ops as uint8, normalised in BatchFinish to the
    same floats, with random erasing drawn per batch: replayable, and the global RNGs untouched."""
    import random as pyrandom

    from timm.data import create_transform

    aug = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.0, "color_jitter": None, "affine": "pil"}
    off = reader_cfg(written, "folder", batch_size=8, num_workers=0, normalize_on_device=False, aug=aug)
    data, data_cfg, items, floats, labels = first_batch(off)
    assert floats.dtype == torch.float32
    stock = create_transform(16, is_training=True, auto_augment=aug["auto_augment"], interpolation="bicubic",
                             mean=data_cfg["mean"], std=data_cfg["std"], crop_pct=0.875)
    reader = data.train.dataset.dataset
    reader.transform = None
    for (index, seed), image in zip(items, floats):
        pyrandom.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        assert torch.equal(stock(reader[index][0]), image)
    on = OmegaConf.merge(off, {"normalize_on_device": True})
    data, _, _, uint8, same_labels = first_batch(on)
    assert uint8.dtype == torch.uint8 and torch.equal(labels, same_labels)
    finished, _ = data.finish(uint8, labels, 0, 0)
    torch.testing.assert_close(finished, floats, rtol=0, atol=1e-5)
    # erasing (const: a rectangle of zeros in normalised space) in every image at p=1, the same on a replay
    erase = OmegaConf.merge(on, {"aug": {"re_prob": 1.0, "re_mode": "const"}})
    data, _, _, uint8, labels = first_batch(erase)
    states = pyrandom.getstate(), torch.get_rng_state()
    erased, _ = data.finish(uint8, labels, 0, 0)
    again, _ = data.finish(uint8, labels, 0, 0)
    other, _ = data.finish(uint8, labels, 0, 1)
    assert (pyrandom.getstate(), torch.get_rng_state().tolist()) == (states[0], states[1].tolist())
    assert torch.equal(erased, again) and not torch.equal(erased, other)
    zeros = (erased == 0).all(1).flatten(1).sum(1)
    assert (zeros >= 0.02 * 16 * 16).all() and (zeros <= 16 * 16 / 3 + 16).all()
    assert ((erased != 0) == (finished != 0)).flatten(1).float().mean(1).lt(1).all()


def test_pack_writes_shuffled_resized_shards_that_the_stream_reader_trains_on(written, tmp_path):
    """python -m shd_vision.data.pack: every image once, with its label, its shorter side at
    pack.size (antialiased, re-encoded), shuffled over equal shards; timm's stream reader reads them
    and a run trains on them; a second pack into the same directory is refused, the shards kept."""
    out = tmp_path / "packed"
    args = ["data=imagefolder", f"data.root={written / 'folder'}", "data.val_split=validation", "data.num_workers=2",
            f"pack.out={out}", "pack.size=12", "pack.shard_images=16"]
    packed = run_cli("-m shd_vision.data.pack", *args)
    assert packed.returncode == 0, packed.stderr[-3000:]
    info = json.loads((out / "_info.json").read_text())
    assert info["classes"] == CLASSES
    train = info["splits"]["train"]
    assert train["num_samples"] == 64 and train["shard_lengths"] == [16] * 4
    folder = datasets.image_folder(str(written / "folder"), "train")
    seen, labels_in_first_shard = [], set()
    for s, name in enumerate(train["filenames"]):
        with tarfile.open(out / name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted(k[:-4] for k in members if k.endswith(".jpg")):
            i = int(key)
            image, label = folder[i]
            assert int(members[f"{key}.cls"]) == label
            labels_in_first_shard |= {label} if s == 0 else set()
            stored = Image.open(io.BytesIO(members[f"{key}.jpg"]))
            assert stored.format == "JPEG" and stored.size == (12, 12)
            expected = np.asarray(image.resize((12, 12), Image.BICUBIC), dtype=float)
            assert np.abs(np.asarray(stored.convert("RGB"), dtype=float) - expected).mean() < 6  # JPEG's loss
            seen.append(i)
    assert sorted(seen) == list(range(64)) and seen != sorted(seen) and len(labels_in_first_shard) > 3
    stream = reader_cfg(written, "wds", batch_size=8, num_workers=2, root=str(out), val_split="validation")
    _, val, classes = open_splits(stream)
    assert classes == CLASSES and len(val) == 32
    trained = run_cli("train.py", *debug_args(tmp_path, "data=wds", "data.name=wds/packed", f"data.root={out}",
                                              "data.val_split=validation", "data.batch_size=8", "data.num_workers=2",
                                              "data.train_size=null", "data.val_size=null", "model=vit_fmnist_student",
                                              "kd=none", "data.img_size=12", "model.img_size=12", "model.patch_size=4",
                                              "trainer.max_steps=4", "trainer.eval_teacher=false"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    again = run_cli("-m shd_vision.data.pack", *args)
    assert again.returncode == 2 and "holds packed shards already" in " ".join(again.stderr.split())
    assert "Traceback" not in again.stderr
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    bad = run_cli("-m shd_vision.data.pack", *args[:-3], f"pack.out={tmp_path}/other", "pack.quality=0")
    assert bad.returncode == 2 and "pack.quality=0 is out of range" in bad.stderr and "Traceback" not in bad.stderr


def altered_digits(split, n, digits=digit_images):
    """The digits with one marker pixel changed in the image a folder lists first (lowest class,
    then name): a file the content id reads."""
    out = digits(split, n)
    first = min(range(n), key=lambda i: (str(out[i][1]), out[i][0]))
    rgb = np.array(Image.open(io.BytesIO(out[first][2])))
    rgb[0, 1] = (255, 255, 255)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    out[first] = (out[first][0], out[first][1], buf.getvalue())
    return out


@pytest.mark.parametrize("name", list(READERS))
def test_a_moved_copy_keeps_the_content_id_and_one_changed_image_changes_it(written, tmp_path, name, monkeypatch):
    """What a resume and a teacher cache compare (run.train_data): a moved data.root is the same
    data; the same names and labels with one image re-encoded are not."""
    import shutil
    import sys

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def ids(root):
        cfg = reader_cfg(written, name)
        if name == "hfds":
            cfg.name, cfg.root = f"hfds/{root}", str(tmp_path / f"cache-{root.name}")
        else:
            cfg.root = str(root)
        train, val, _ = open_splits(cfg)
        return datasets.content_id(train), datasets.content_id(val)

    here = ids(written / name)
    assert here[0] != here[1] and len(here[0]) == 16
    shutil.copytree(written / name, tmp_path / "moved")
    assert ids(tmp_path / "moved") == here
    monkeypatch.setattr(sys.modules[__name__], "digit_images", altered_digits)  # the first image of each split
    READERS[name][0](tmp_path / "altered")
    altered = ids(tmp_path / "altered")
    assert altered[0] != here[0] and altered[1] != here[1]


def test_a_resume_on_other_images_is_refused_and_on_a_moved_copy_continues(written, tmp_path, monkeypatch):
    """The same names, labels and count are not enough: a data.root whose images differ is
    another run (run.train_data), named in the refusal; the same files elsewhere resume."""
    import shutil
    import sys

    from conftest import compose
    from shd_vision.engine.train import train
    from shd_vision.errors import UserError

    shutil.copytree(written / "folder", tmp_path / "moved")
    monkeypatch.setattr(sys.modules[__name__], "digit_images", altered_digits)
    write_folder(tmp_path / "altered")

    def run(root, steps):
        return train(compose(tmp_path, "data=imagefolder", "data.val_split=validation", f"data.root={root}",
                             "model=vit_fmnist_student", "data.img_size=16", "model.img_size=16", "kd=none",
                             "data.batch_size=8", "data.train_size=null", "data.val_size=null",
                             f"trainer.max_steps={steps}", "trainer.resume=auto"))[0]

    assert run(written / "folder", 2)["steps"] == 2
    with pytest.raises(UserError) as refused:
        run(tmp_path / "altered", 4)
    said = " ".join(str(refused.value).split())
    assert "in 2 key(s): run.train_data (" in said and "run.val_data (" in said
    assert run(tmp_path / "moved", 4)["steps"] == 4
