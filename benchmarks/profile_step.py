"""Where a distillation step spends its time: torch.profiler over a few steps of a preset, the
operators sorted by device time (CUDA) or CPU time.

    python benchmarks/profile_step.py --preset deit_s_ti --precision bf16 kd=shd
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESETS, build_step, machine, sync  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", default=["kd=shd"], help="train.py overrides (kd=...)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's for the device")
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or PRESETS[args.preset]["batch"][device.type]
    step, _ = build_step(args.preset, args.overrides, device, batch, args.precision)
    for _ in range(3):
        step()
    sync(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(args.steps):
            step()
        sync(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"{args.preset} preset, {' '.join(args.overrides)}, batch {batch}, precision {args.precision}, "
          f"{machine(device)}; {args.steps} steps\n")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
