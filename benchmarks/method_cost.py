"""Per-step time and peak memory of every distillation method, relative to logit KD.

Each method runs in its own fresh process (so peak memory is its own), in rounds that alternate
the methods (so drift in machine speed hits all of them alike); the table gives medians.

    python benchmarks/method_cost.py                      # the tiny Fashion-MNIST pair, this machine
    python benchmarks/method_cost.py --preset deit_s_ti   # DeiT-S -> DeiT-Ti at 224 (meant for a GPU)
    python benchmarks/method_cost.py --methods logit shd  # a subset
    python benchmarks/method_cost.py --model model.num_heads=1  # the student changed for every method
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHED, DISTILLED, PRESETS, build_step, machine, peak_mb, reset_peak, run_isolated, table, time_it  # noqa: E402

METHODS = {
    "none (CE)": ["kd=none"],
    "logit": ["kd=logit"],
    "logit from cache": ["kd=logit", CACHED],
    "deit hard": ["kd=deit", DISTILLED],
    "deit soft": ["kd=deit", "kd.terms.deit.mode=soft", DISTILLED],
    "fitnet": ["kd=fitnet"],
    "shd progressive": ["kd=shd"],
    "shd group": ["kd=shd", "kd.terms.shd.merge=group"],
    "shd mean": ["kd=shd", "kd.terms.shd.merge=mean"],
    "shd last layer": ["kd=shd", "kd.terms.shd.layers=last"],
    "shd select": ["kd=shd", "kd.terms.shd.merge=select"],
    "shd mse": ["kd=shd", "kd.terms.shd.loss=mse"],
    "minilm": ["kd=minilm"],
    "manifold": ["kd=manifold"],
    "adkd": ["kd=adkd"],
    "adkd topk3 m=4": ["kd=adkd", "kd.terms.adkd.views=[topk]", "kd.terms.adkd.steps=4"],
    "shd + adkd": ["kd=shd", "kd.terms.adkd.weight=1"],
}


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    step, teacher_forward = build_step(args.preset, METHODS[args.method], device, args.batch, args.precision,
                                       model_overrides=args.model, keep_freed=not args.glibc_defaults)
    seconds = time_it(step, device, args.steps, args.warmup)
    reset_peak(device)
    step()
    peak = peak_mb(device)
    teacher_seconds = time_it(teacher_forward, device, args.steps, 1) if teacher_forward else None
    print(json.dumps({"step_s": seconds, "peak_mb": peak, "teacher_s": teacher_seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's for the device")
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", nargs="+", default=[], metavar="OVERRIDE",
                        help="student overrides for every method, e.g. model.num_heads=1")
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave glibc's malloc returning freed memory to the kernel (train.py keeps it)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or PRESETS[args.preset]["batch"][torch.device(args.device).type]
    if args.worker:
        return worker(args)
    if "logit" not in args.methods:
        args.methods.insert(0, "logit")
    common = ["--preset", args.preset, "--device", args.device, "--batch", str(args.batch), "--precision",
              args.precision, "--steps", str(args.steps), "--warmup", str(args.warmup)] + \
             (["--glibc-defaults"] if args.glibc_defaults else []) + (["--model", *args.model] if args.model else [])
    runs = {m: [] for m in args.methods}
    for r in range(args.rounds):
        for m in args.methods:
            if runs[m] and "error" in runs[m][-1]:
                continue  # it did not fit in memory: another round will not either
            runs[m].append(run_isolated(Path(__file__), [*common, "--method", m]))
            x = runs[m][-1]
            print(f"round {r + 1}/{args.rounds} {m}: " + (x["error"] if "error" in x else f"{x['step_s'] * 1e3:.1f} ms/step"),
                  file=sys.stderr)
    med = {m: ({"error": v[0]["error"]} if "error" in v[0] else
               {k: (statistics.median(x[k] for x in v) if v[0][k] is not None else None) for k in v[0]})
           for m, v in runs.items()}
    base = med["logit"]
    rows = []
    for m, v in med.items():
        overrides = " ".join(METHODS[m]).replace(DISTILLED, PRESETS[args.preset]["distilled"]).replace(
            CACHED, "teacher.cache=DIR (top-10 float16)")
        if "error" in v:
            rows.append([m, overrides, f"{v['error']} at batch {args.batch}", *["-"] * 5])
            continue
        rows.append([m, overrides, f"{v['step_s'] * 1e3:.1f}", f"{v['step_s'] / base['step_s']:.2f}",
                     f"{args.batch / v['step_s']:.0f}", f"{v['peak_mb']:.0f}", f"{v['peak_mb'] / base['peak_mb']:.2f}",
                     f"{100 * v['teacher_s'] / v['step_s']:.0f}%" if v["teacher_s"] else "-"])
    print(f"\n{args.preset} preset" + (f" with {' '.join(args.model)}" if args.model else "") + f", batch {args.batch}, precision {args.precision}, {machine(torch.device(args.device))}; "
          f"median of {args.rounds} rounds x {args.steps} steps" + (", glibc's malloc defaults" if args.glibc_defaults
                                                                    else "") + "\n")
    print(table(["method", "overrides", "ms/step", "x logit", "images/s", "peak MB", "x logit",
                 "teacher share"], rows))
    if "none (CE)" in med and "error" not in med.get("logit from cache", {"error": 1}):
        print(f"\nlogit KD from the cache trains at {med['none (CE)']['step_s'] / med['logit from cache']['step_s']:.2f}x "
              f"CE's images/s; live logit KD at {med['none (CE)']['step_s'] / base['step_s']:.2f}x.")
    print("\npeak MB: CUDA allocations on a GPU; on a CPU the process's peak resident memory, models "
          "included. teacher share: the teacher's forward (from the cache: the replay) alone, over the whole step.")


if __name__ == "__main__":
    main()
