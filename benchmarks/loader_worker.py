"""Images per second from ONE loader worker: timm's stock training pipeline against ours, on
photograph-like 500x375 JPEGs (quality 90) with DeiT's augmentation (data=imagenet: bicubic
RandomResizedCrop, flip, RandAugment m9, random erasing 0.25), side by side in one run.

Each arm is a subprocess with one DataLoader worker, batch 64, alternating over rounds (median):
  timm stock          timm.data.create_dataset + create_transform + a DataLoader, stock Pillow
  ours, speed-ups off our loader with data.normalize_on_device=false, stock Pillow (pixel-identical
                      to timm's transform: tests/test_readers.py)
  ours, uint8         data.normalize_on_device=true (workers ship uint8; the device normalises), stock Pillow
  ours, OpenCV warps  data.aug.affine=opencv (RandAugment's rotate/shear/translate), stock Pillow
  ours, pillow-simd   speed-ups off, pillow-simd
  ours (all three)    the default for image folders where install.sh built pillow-simd
  ..., packed 256     the same on the folder packed by python -m shd_vision.data.pack (shorter side 256),
                      read as WebDataset shards: other source images (see pack.py), so not the same law
Stock Pillow comes from .venv/pillow-stock (install.sh puts it there when it installs pillow-simd).
Then the augmented uint8 images of "ours, uint8" and "ours (all three)" on the same crops and ops
(same seeds): their mean absolute difference per pixel, in grey levels.

    python benchmarks/loader_worker.py [--images 1600] [--rounds 2] [--arms NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STOCK = HERE.parent / ".venv" / "pillow-stock"
AUG = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", color_jitter=0.3,
           interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875)
ARMS = {  # name: (pillow, loader, data.normalize_on_device, data.aug.affine)
    "timm stock": ("stock", "timm", None, None),
    "ours, speed-ups off": ("stock", "ours", False, "pil"),
    "ours, uint8": ("stock", "ours", True, "pil"),
    "ours, OpenCV warps": ("stock", "ours", False, "opencv"),
    "ours, pillow-simd": ("simd", "ours", False, "pil"),
    "ours (all three)": ("simd", "ours", True, "opencv"),
    "ours (all three), packed 256": ("simd", "packed", True, "opencv"),
}


def timm_loader(root: str, batch: int):
    import torch
    from timm.data import create_dataset, create_transform

    ds = create_dataset("", root=root, split="train", is_training=True)
    ds.transform = create_transform(224, is_training=True, **AUG)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=1, drop_last=True)


def our_loader(root: str, batch: int, on_device: bool, affine: str, packed: bool = False):
    from shd_vision.config import compose_train
    from shd_vision.data.loaders import build_data, open_splits

    stream = ["data=wds", "data.name=wds/bench", "data.val_split=val", "data.train_size=null"] if packed else []
    cfg = compose_train(["data=imagenet", *stream, f"data.root={root}", "data.num_classes=10", "data.repeated_aug=0",
                         f"data.batch_size={batch}", "data.num_workers=1", f"data.normalize_on_device={on_device}",
                         f"data.aug.affine={affine}", "data.pin_memory=false"])
    data_cfg = {"input_size": (3, 224, 224), "mean": AUG["mean"], "std": AUG["std"], "interpolation": "bicubic",
                "crop_pct": AUG["crop_pct"]}
    data = build_data(cfg.data, open_splits(cfg.data), data_cfg, seed=0)
    data.sampler.set_epoch(0)
    return data.train


def arm(args) -> None:
    """One arm, in this process: its rate as JSON on stdout (and its first batch, with --dump)."""
    import PIL

    loader = timm_loader(args.root, args.batch) if args.loader == "timm" else our_loader(
        args.root, args.batch, args.on_device == "true", args.affine, packed=args.loader == "packed")
    it = iter(loader)
    first = next(it)[0]  # the worker's start-up and its prefetched batches are not timed
    for _ in range(2):
        next(it)
    t, n = time.perf_counter(), 0
    for images, _ in it:
        n += len(images)
    rate = n / (time.perf_counter() - t)
    if args.dump:
        np.save(args.dump, first.numpy())
    print(json.dumps({"rate": rate, "pillow": PIL.__version__, "dtype": str(first.dtype)}))


def run_arm(name: str, root: Path, batch: int, dump: str = "") -> dict:
    pillow, loader, on_device, affine = ARMS[name]
    env = dict(os.environ)
    if pillow == "stock":
        env["PYTHONPATH"] = os.pathsep.join([str(STOCK), env.get("PYTHONPATH", "")])
    root = root.parent / "packed" if loader == "packed" else root
    cmd = [sys.executable, __file__, "--arm", "--root", str(root), "--batch", str(batch), "--loader", loader,
           "--on-device", str(on_device).lower(), "--affine", str(affine), "--dump", dump]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
    if out.returncode:
        raise SystemExit(f"arm {name!r} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{name}: {result['rate']:.0f} images/s (Pillow {result['pillow']})", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1600, help="training JPEGs written (one pass is timed)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                        help="the pipelines to time (all by default)")
    parser.add_argument("--arm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--loader", help=argparse.SUPPRESS)
    parser.add_argument("--on-device", help=argparse.SUPPRESS)
    parser.add_argument("--affine", help=argparse.SUPPRESS)
    parser.add_argument("--dump", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        return arm(args)
    sys.path.insert(0, str(HERE))
    from common import table
    from loader import jpeg_folder

    import PIL
    simd = ".post" in PIL.__version__
    arms = [a for a in args.arms if ARMS[a][0] == "stock" or simd]
    if not STOCK.is_dir():
        arms = [a for a in arms if ARMS[a][0] == "simd"] if simd else arms
        if simd:
            print(f"no stock Pillow in {STOCK}: the stock arms are skipped (run scripts/install.sh)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        root = jpeg_folder(Path(tmp) / "folder", args.images)
        sizes = [p.stat().st_size for p in (root / "train").rglob("*.jpg")]
        packing = None
        if any(ARMS[a][1] == "packed" for a in arms):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "shd_vision.data.pack", "data=imagefolder", f"data.root={root}",
                            f"pack.out={root.parent / 'packed'}", "pack.size=256",
                            f"pack.shard_images={args.images // 8}", "data.num_workers=1"],
                           cwd=HERE.parent, check=True, capture_output=True)
            rate = (args.images + 10) / (time.perf_counter() - t)
            kb = sum(p.stat().st_size for p in (root.parent / "packed").glob("train-*.tar")) / args.images / 1e3
            packing = (f"Packing (one process, start-up included): {rate:.0f} images/s; {kb:.0f} KB per packed "
                       "image (tar headers included)")
        rates = {a: [] for a in arms}
        for _ in range(args.rounds):
            for a in arms:
                rates[a].append(run_arm(a, root, args.batch)["rate"])
        same = None
        if simd and STOCK.is_dir():  # the same crops and ops through both Pillow builds, uint8 out of the workers
            run_arm("ours, uint8", root, args.batch, dump=str(Path(tmp) / "stock.npy"))
            run_arm("ours (all three)", root, args.batch, dump=str(Path(tmp) / "simd.npy"))
            a, b = (np.load(Path(tmp) / f).astype(np.int16) for f in ("stock.npy", "simd.npy"))
            d = np.abs(a - b)
            same = (f"{d.mean():.3f} grey levels on average (max {d.max()}; {100 * (d > 0).mean():.2f}% of "
                    f"values differ), mean pixel {a.mean():.2f} (stock) vs {b.mean():.2f} (pillow-simd), "
                    f"{len(a)} images")
    base = rates.get("timm stock")
    rows = []
    for a in arms:
        # each round's ratio pairs two arms timed seconds apart, so the VM's drifting speed cancels
        ratios = [x / b for x, b in zip(rates[a], base)] if base else []
        rows.append([a, ARMS[a][0], " ".join(f"{x:.0f}" for x in rates[a]), f"{statistics.median(rates[a]):.0f}",
                     f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"])
    print(f"\nOne loader worker, batch {args.batch}, {args.images} photograph-like JPEGs (mean "
          f"{statistics.fmean(sizes) / 1e3:.0f} KB), DeiT augmentation; {os.cpu_count()} cores, rounds alternating\n")
    print(table(["pipeline", "Pillow", "images/s per round", "median", "vs timm stock: median of rounds (range)"],
                rows))
    if packing:
        print(f"\n{packing}")
    if same:
        print(f"\nAll three speed-ups against none (uint8 both) on the same crops and ops: {same}")


if __name__ == "__main__":
    main()
