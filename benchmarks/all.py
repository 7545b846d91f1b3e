"""Every benchmark in one run, as one Markdown document (docs/performance.md quotes it).

For each preset: every method's cost relative to logit KD (method_cost.py), AMP /
channels_last / torch.compile (speedups.py) and loader against step throughput (loader.py);
with a DeiT preset, one loader worker against timm's stock pipeline (loader_worker.py); then SHD's growth with tokens and heads (shd_scaling.py) and the teacher cache against CE and a
live teacher (cache.py). The DeiT presets are meant for a GPU.

    python benchmarks/all.py --out benchmarks/results/cpu.md                 # tiny pair (CPU default)
    python benchmarks/all.py --presets tiny deit_s_ti deit_b_s --out benchmarks/results/h100.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESETS, machine  # noqa: E402

HERE = Path(__file__).resolve().parent


def section(title: str, script: str, *args: str) -> str:
    t = time.perf_counter()
    print(f"== {title}: {script} {' '.join(args)}", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, text=True, check=True)
    return (f"## {title}\n\n`python benchmarks/{script} {' '.join(args)}` "
            f"({time.perf_counter() - t:.0f} s)\n\n{out.stdout.strip()}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS),
                        default=["tiny", "deit_s_ti", "deit_b_s"] if gpu else ["tiny"])
    parser.add_argument("--workers", nargs="+", default=["0", "4", "8", "16"] if gpu else ["0", "2"])
    parser.add_argument("--out", type=Path, help="also write the document here")
    args = parser.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    parts = [f"# shd-vision benchmarks on {machine(device)}\n\ntorch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M')}\n"]
    for preset in args.presets:
        parts.append(section(f"{preset}: every method against logit KD", "method_cost.py", "--preset", preset))
        parts.append(section(f"{preset}: AMP, channels_last, torch.compile", "speedups.py", "--preset", preset))
        parts.append(section(f"{preset}: loader against step", "loader.py", "--preset", preset,
                             "--workers", *args.workers))
    if any(p != "tiny" for p in args.presets):
        parts.append(section("One loader worker: timm's stock pipeline against ours", "loader_worker.py"))
    parts.append(section("SHD against tokens N and heads H", "shd_scaling.py"))
    parts.append(section("The teacher cache end to end (embedded default)", "cache.py"))
    document = "\n".join(parts)
    print(document)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(document)


if __name__ == "__main__":
    main()
