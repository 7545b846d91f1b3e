"""The teacher cache end to end: training images/s of CE, live logit KD and logit KD from a cache,
each a whole ``train.py`` run in its own process (the loader, the loop and the allocator as a user
gets them), in alternating rounds; and the cache's size and write time per epoch.

    python benchmarks/cache.py                      # the embedded default (Fashion-MNIST), this machine
    python benchmarks/cache.py --images 12800 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, table  # noqa: E402


def run(*args: str) -> None:
    cmd = [sys.executable, *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6400, help="training images per epoch")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shd-cache-bench-"))
    plan = ["experiment=fmnist_student", f"data.train_size={args.images}", "trainer.epochs=1", "trainer.export=false",
            f"paths.log_dir={tmp}", "trainer.device=cpu" if not torch.cuda.is_available() else "trainer.device=auto"]
    run("-m", "shd_vision.cache", *plan, f"cache.top_k={args.top_k}", f"cache.dtype={args.dtype}",
        f"cache.dir={tmp}/cache")
    written = json.loads((tmp / "cache" / "summary.json").read_text())
    rows = {"CE (kd=none)": ["kd=none"], "logit KD, live teacher": ["kd=logit"],
            f"logit KD from the cache (top-{args.top_k} {args.dtype})": ["kd=logit", f"teacher.cache={tmp}/cache"]}
    rates = {name: [] for name in rows}
    for r in range(args.rounds):
        for i, (name, overrides) in enumerate(rows.items()):
            run_dir = tmp / f"round{r}-row{i}"
            run("train.py", *plan, *overrides, f"hydra.run.dir={run_dir}")
            rates[name].append(json.loads((run_dir / "summary.json").read_text())["train_samples_per_s"])
            print(f"round {r + 1}/{args.rounds} {name}: {rates[name][-1]:.0f} images/s", file=sys.stderr)
    ce = statistics.median(rates["CE (kd=none)"])
    print(f"Fashion-MNIST embedded default (3-head student, 6-head teacher), {args.images} training images, batch 64, "
          f"one epoch per run; {machine(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))}; "
          f"median of {args.rounds} alternating rounds\n")
    print(table(["run", "training images/s", "x CE"],
                [[name, f"{statistics.median(v):.0f}", f"{statistics.median(v) / ce:.2f}"] for name, v in rates.items()]))
    per_row = written["bytes_per_epoch"] / args.images
    print(f"\nThe cache: {written['bytes_per_epoch'] / 2**20:.2f} MiB per epoch ({per_row:.1f} bytes per row with the "
          f"file's framing; the values alone {args.top_k} x ({2 if args.dtype == 'float16' else 4} + 2) + 4 = "
          f"{args.top_k * ((2 if args.dtype == 'float16' else 4) + 2) + 4} bytes), written in "
          f"{written['write_seconds']:.1f} s ({args.images / written['write_seconds']:.0f} rows/s, the teacher's "
          "forward over the augmented images). ImageNet-1k by methods.md §10: 1.28M rows x 300 epochs x 44 bytes "
          "(K = 10, float16 values, int16 indices) = 16.9 GB.")


if __name__ == "__main__":
    main()
