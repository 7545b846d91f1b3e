"""What AMP, channels_last and torch.compile do to a distillation step (trainer.precision,
trainer.channels_last, trainer.compile), for logit KD and SHD.

Each variant runs in its own fresh process, in rounds that alternate the variants; compilation
happens in the warm-up steps and is not timed (its one-off cost is reported apart).

    python benchmarks/speedups.py                      # tiny pair, this machine
    python benchmarks/speedups.py --preset deit_s_ti   # DeiT-S -> DeiT-Ti at 224 (meant for a GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESETS, build_step, machine, peak_mb, reset_peak, run_isolated, table, time_it  # noqa: E402

METHODS = {"logit": ["kd=logit"], "shd": ["kd=shd"]}
VARIANTS = {  # name: (precision, channels_last, compile, tf32)
    "fp32": ("32", False, False, False),
    "tf32": ("32", False, False, True),
    "bf16 autocast": ("bf16", False, False, False),
    "bf16 + tf32": ("bf16", False, False, True),
    "fp16 autocast": ("fp16", False, False, False),
    "channels_last": ("32", True, False, False),
    "torch.compile": ("32", False, True, False),
    "bf16 + tf32 + compile": ("bf16", False, True, True),
}


def available(variant: str, device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return not (variant.startswith("fp16") or "tf32" in variant)  # CPU autocast is bf16; no TF32


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    precision, channels_last, compile_models, tf32 = VARIANTS[args.variant]
    step, _ = build_step(args.preset, METHODS[args.method], device, args.batch, precision, channels_last,
                         compile_models, tf32=tf32)
    t = time.perf_counter()
    step()  # the first step compiles
    first = time.perf_counter() - t
    seconds = time_it(step, device, args.steps, args.warmup)
    reset_peak(device)
    step()
    print(json.dumps({"step_s": seconds, "first_s": first, "peak_mb": peak_mb(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's for the device")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.batch = args.batch or PRESETS[args.preset]["batch"][device.type]
    if args.worker:
        return worker(args)
    variants = [v for v in dict.fromkeys(["fp32", *args.variants]) if available(v, device)]
    common = ["--preset", args.preset, "--device", args.device, "--batch", str(args.batch), "--steps",
              str(args.steps), "--warmup", str(args.warmup)]
    runs = {(m, v): [] for m in METHODS for v in variants}
    for r in range(args.rounds):
        for m, v in runs:
            runs[m, v].append(run_isolated(Path(__file__), [*common, "--method", m, "--variant", v]))
            last = runs[m, v][-1]  # every figure of the table, in case a time limit cuts the run before it prints
            print(f"round {r + 1}/{args.rounds} {m} {v}: {last['step_s'] * 1e3:.1f} ms/step, first step "
                  f"{last['first_s']:.1f} s, peak {last['peak_mb']:.0f} MB", file=sys.stderr)
    med = {k: {f: statistics.median(x[f] for x in xs) for f in xs[0]} for k, xs in runs.items()}
    rows = []
    for (m, v), x in med.items():
        base = med[m, "fp32"]
        rows.append([m, v, f"{x['step_s'] * 1e3:.1f}", f"{args.batch / x['step_s']:.0f}",
                     f"{base['step_s'] / x['step_s']:.2f}", f"{x['peak_mb']:.0f}", f"{x['first_s']:.1f}"])
    print(f"\n{args.preset} preset, batch {args.batch}, {machine(device)}; median of {args.rounds} rounds x "
          f"{args.steps} steps\n")
    print(table(["method", "variant", "ms/step", "images/s", "speed-up vs fp32", "peak MB", "first step s"], rows))
    print("\nfirst step s: the first step alone, which includes compilation where torch.compile is on. "
          "fp16 and TF32 run on CUDA only (CPU autocast is bf16); fp16 here has no gradient scaler. "
          "tf32: float32 matmuls on TF32 tensor cores (trainer.tf32); without it, float32 work "
          "inside bf16 autocast (SHD's squeeze) runs at full float32 cost.")


if __name__ == "__main__":
    main()
