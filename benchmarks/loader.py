"""Does data loading keep up with the training step? Loader throughput (decode, augment, collate)
beside the step throughput of logit KD and SHD, for the same input size and batch.

The tiny preset reads the Debian Fashion-MNIST files; the DeiT presets write photograph-like JPEGs
(500x375 at quality 90, like ImageNet's median image) as an ImageNet-style folder and as WebDataset shards, and
read both through timm's readers with the data=imagenet augmentation (RandAugment, random
erasing; no repeated augmentation, which a stream cannot do).

    python benchmarks/loader.py                                  # tiny pair, workers 0 and 2
    python benchmarks/loader.py --preset deit_s_ti --workers 1 2 --gpu-shd-rate 2300
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tarfile
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESETS, build_step, machine, table, time_it  # noqa: E402


def photo(rng: np.random.Generator, sources: list) -> Image.Image:
    """A photograph-like 500x375 (or 375x500) image: a random crop of one of scikit-learn's sample
    photographs, flipped at random. Re-encoded at quality 90 they average ~52 KB, like ImageNet's
    median JPEG; random noise would overstate decoding (it does not compress)."""
    src = sources[rng.integers(len(sources))]
    w, h = src.size
    s = rng.uniform(0.55, 1.0)
    cw, ch = int(w * s), int(h * s)
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    size = (500, 375) if rng.random() < 0.7 else (375, 500)
    image = src.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def jpeg_folder(root: Path, images: int, classes: int = 10) -> Path:
    """An ImageNet-style folder (train/ and val/, ``classes`` class folders) of :func:`photo` JPEGs."""
    from sklearn.datasets import load_sample_images

    sources = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", classes)):
        for i in range(count):
            d = root / split / f"class{i % classes:02d}"
            d.mkdir(parents=True, exist_ok=True)
            photo(rng, sources).save(d / f"{i}.jpg", quality=90)
    return root


def shards(folder: Path, root: Path, count: int = 16) -> Path:
    """The folder's training JPEGs as ``count`` WebDataset shards (``<key>.jpg`` + ``<key>.cls``)."""
    root.mkdir(parents=True)
    files = sorted((folder / "train").rglob("*.jpg"))
    classes = sorted(p.name for p in (folder / "train").iterdir())
    names, lengths = [], []
    for s in range(count):
        names.append(f"train-{s:04d}.tar")
        part = files[s::count]
        lengths.append(len(part))
        with tarfile.open(root / names[-1], "w") as tar:
            for f in part:
                for name, payload in ((f"{f.stem}.jpg", f.read_bytes()), (f"{f.stem}.cls", str(classes.index(f.parent.name)).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    split = {"name": "train", "num_samples": len(files), "filenames": names, "shard_lengths": lengths}
    (root / "_info.json").write_text(json.dumps({"classes": classes, "splits": {"train": split, "val": split}}))
    return root


PREFETCH = 2  # torch's DataLoader default prefetch_factor


def loader_rate(data_overrides, preset: str, workers: int, batch: int, batches: int) -> float:
    """Steady-state training images per second out of the real train loader: the batches the
    workers prefetched while the first one was made are drained before the clock starts (timing
    them measured a 16-worker loader at 3.7k images/s on a 16-core machine whose workers make
    about 100 each)."""
    from shd_vision.config import compose_train
    from shd_vision.data.loaders import batches as iterate, build_data, open_splits, resolve_input
    from shd_vision.models.factory import build

    cfg = compose_train([*PRESETS[preset]["overrides"], *data_overrides, f"data.num_workers={workers}",
                         f"data.batch_size={batch}"])
    student = build(cfg.model, cfg.data.num_classes, "model")
    data = build_data(cfg.data, open_splits(cfg.data), resolve_input(cfg.data, student), cfg.seed)
    it = iterate(data.train)
    for _ in range(1 + workers * PREFETCH):
        next(it)
    t, n = time.perf_counter(), 0
    for _ in range(batches):
        x = next(it, None)
        if x is None:
            break
        n += len(x[0])
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's for the device")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per loader")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gpu-shd-rate", type=float, default=None,
                        help="an SHD step's images/s measured on a GPU: adds the workers it would need")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or PRESETS[args.preset]["batch"][device.type]
    steps = {}
    for method in ("logit", "shd"):
        step, _ = build_step(args.preset, [f"kd={method}"], device, batch)
        steps[method] = batch / time_it(step, device, args.steps, 2)
    with tempfile.TemporaryDirectory() as tmp:
        if args.preset == "tiny":
            sources = {"Fashion-MNIST (Debian files)": ["data=fashion_mnist"]}
        else:
            root = jpeg_folder(Path(tmp) / "folder", batch * (args.batches + 1 + max(args.workers) * PREFETCH) + 8)
            common = ["data=imagenet", "data.num_classes=10", "data.repeated_aug=0"]
            sources = {"JPEG folder (timm folder reader)": [*common, f"data.root={root}"],
                       "WebDataset shards (timm wds reader)": [*common, "data.name=wds/bench", "data.val_split=val",
                                                               f"data.root={shards(root, Path(tmp) / 'wds')}"]}
        rows = []
        for source, overrides in sources.items():
            for w in args.workers:
                if w == 0 and "WebDataset" in source:
                    continue  # streams need loader workers
                rate = statistics.median(loader_rate(overrides, args.preset, w, batch, args.batches) for _ in range(2))
                per_worker = rate / max(w, 1)
                row = [source, w, f"{rate:.1f}", f"{per_worker:.1f}", f"{steps['logit']:.1f}", f"{steps['shd']:.1f}",
                       f"{rate / steps['shd']:.2f}", math.ceil(steps["shd"] / per_worker)]
                if args.gpu_shd_rate:
                    row.append(math.ceil(args.gpu_shd_rate / per_worker))
                rows.append(row)
                print(f"{source}, workers {w}: {rate:.0f} images/s", file=sys.stderr)
    print(f"\n{args.preset} preset, batch {batch}, steps on {machine(device)}; loaders on {torch.get_num_threads()} "
          f"threads + workers\n")
    head = ["data", "loader workers", "loader images/s", "per worker", "logit step images/s",
            "shd step images/s", "loader / shd step", "workers an SHD step needs"]
    if args.gpu_shd_rate:
        head.append(f"workers a GPU SHD step at {args.gpu_shd_rate:.0f} images/s needs")
    print(table(head, rows))
    print("\nloader / shd step above 1: loading keeps up with SHD training at that worker count "
          "(with workers, loading overlaps the step; with 0 it adds to it). Workers an SHD step "
          "needs: the SHD step's rate over this row's rate per worker (one core each).")


if __name__ == "__main__":
    main()
