"""A truncated JPEG among good ones: a named stop by default, a deterministic stand-in with
data.skip_bad_images=true, and the scanner that lists it before a run."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import debug_args, run_cli


@pytest.fixture
def folder(tmp_path):
    """An ImageNet-layout folder of 2 x 8 JPEGs per split; returns it and a spoiler of one file."""
    root = tmp_path / "images"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(8):
                pixels = np.random.RandomState(i + 10 * (c == "b")).randint(0, 255, (32, 32, 3), np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg", quality=90)
    bad = root / "train" / "a" / "3.jpg"

    def spoil():
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])

    return root, bad, spoil


def args(tmp, root, *extra):
    return debug_args(tmp, "data=imagefolder", f"data.root={root}", "kd=none", "model=vit_fmnist_student",
                      "model.in_chans=3", "data.batch_size=4", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
                      "trainer.attention_images=0", *extra)


def last_state(tmp):
    return torch.load(tmp / "run/checkpoints/last.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_truncated_jpeg_stops_the_run_by_name_and_keeps_the_last_checkpoint(tmp_path, folder):
    root, bad, spoil = folder
    assert run_cli("train.py", *args(tmp_path, root, "trainer.epochs=2")).returncode == 0  # epoch 1 of 2: 4 steps
    before = (tmp_path / "run/checkpoints/last.pt").read_bytes()
    spoil()
    result = run_cli("train.py", *args(tmp_path, root, "trainer.epochs=2", "trainer.max_steps=8",
                                       "trainer.resume=auto", "data.num_workers=2"))
    text = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: unreadable image file " + str(bad) in text and "\n\n" not in result.stderr
    assert re.search(r"training stopped at step [4-7] of 8", text) and "trainer.resume=auto" in text
    assert "data.skip_bad_images=true" in text and "python -m shd_vision.data.check" in text
    assert (tmp_path / "run/checkpoints/last.pt").read_bytes() == before


@pytest.mark.slow
def test_skipping_bad_images_is_deterministic_logged_once_and_counted(tmp_path, folder):
    root, bad, spoil = folder
    spoil()
    skip = ["data.skip_bad_images=true", "trainer.epochs=2"]
    straight = run_cli("train.py", *args(tmp_path / "a", root, *skip, "trainer.max_steps=8"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    summary = json.loads((tmp_path / "a/run/summary.json").read_text())
    assert len(summary["bad_images"]) == 1 and summary["bad_images"][0].startswith(f"unreadable image file {bad} (")
    log = (tmp_path / "a/run/train.log").read_text()
    assert log.count(f"skipped an unreadable image file {bad}") == 1  # two epochs, one process: once
    assert "skipped    1 unreadable image(s)" in log
    # stopped after epoch 1 and resumed: the same stand-in, the same weights
    half = run_cli("train.py", *args(tmp_path / "b", root, *skip, "trainer.max_steps=4"))
    resumed = run_cli("train.py", *args(tmp_path / "b", root, *skip, "trainer.max_steps=8", "trainer.resume=auto"))
    assert half.returncode == 0 and resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = last_state(tmp_path / "a"), last_state(tmp_path / "b")
    assert a["state"]["step"] == b["state"]["step"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_scanner_lists_every_unreadable_file(tmp_path, folder):
    root, bad, spoil = folder
    clean = run_cli("-m shd_vision.data.check", "data=imagefolder", f"data.root={root}", f"hydra.run.dir={tmp_path}/c1",
                    "data.num_workers=2")
    assert clean.returncode == 0 and "every image of imagefolder reads" in clean.stdout, clean.stderr[-2000:]
    spoil()
    (root / "val" / "b" / "junk.png").write_bytes(b"not an image at all")
    found = run_cli("-m shd_vision.data.check", "data=imagefolder", f"data.root={root}", f"hydra.run.dir={tmp_path}/c2",
                    "data.num_workers=2")
    assert found.returncode == 1 and "Traceback" not in found.stderr, found.stderr[-2000:]
    listed = (tmp_path / "c2/unreadable.txt").read_text().splitlines()
    assert [line.split(" (")[0] for line in listed] == [f"unreadable image file {bad}",
                                                         f"unreadable image file {root}/val/b/junk.png"]
    assert "2 unreadable image file(s)" in found.stdout and "img/s" in found.stdout
