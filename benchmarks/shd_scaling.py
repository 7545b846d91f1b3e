"""How SHD's cost grows with the number of tokens N and of heads H.

Part 1 times one mapped layer of the SHD term alone (squeeze the teacher's maps, soften them,
KL against the student's scores, backward) on random attention of DeiT shapes, for
N = 50 (112 px), 197 (224 px) and 577 (384 px) and teacher -> student heads 6 -> 3, 12 -> 6,
12 -> 3, per merge mode. Part 2 runs the whole DeiT-S -> DeiT-Ti training step at those image
sizes and gives SHD's step time over logit KD's, measured side by side.

    python benchmarks/shd_scaling.py                   # both parts on this machine
    python benchmarks/shd_scaling.py --no-full-step    # part 1 only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_step, machine, peak_mb, reset_peak, run_isolated, table, time_it  # noqa: E402

TOKENS = {50: 112, 197: 224, 577: 384}  # N (patches of 16 + class token) -> image size
HEADS = [(6, 3, 384), (12, 6, 768), (12, 3, 768)]  # teacher heads, student heads, teacher width
MERGES = ["progressive", "group", "mean"]


def layer_term(batch: int, n: int, ht: int, hs: int, width: int, merge: str, device: torch.device):
    """One layer of the SHD term on random DeiT-shaped attention: the callable and its inputs."""
    from shd_vision.distill.shd import attention_kl, squeezed_targets
    from shd_vision.models.taps import AttentionRecord, TokenLayout

    d = width // ht
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(batch, ht, n, d, generator=g).to(device) for _ in range(3))
    record = AttentionRecord(q, k, v, d ** -0.5, torch.randn(width, width, generator=g).to(device) / width ** 0.5)
    scores = torch.randn(batch, hs, n, n, generator=g).to(device).requires_grad_()
    layout = TokenLayout(num_prefix=1, has_class=True, grid=(int((n - 1) ** 0.5),) * 2)

    def term() -> None:
        target, _ = squeezed_targets(record, hs, merge, 1.0, layout, layout)
        attention_kl(scores, target, 1.0).backward()

    return term


def worker(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.kind == "layer":
        ht, hs, width = HEADS[args.heads]
        fn = layer_term(args.batch, args.tokens, ht, hs, width, args.merge, device)
    else:
        size = TOKENS[args.tokens]
        fn, _ = build_step("deit_s_ti", [f"kd={args.method}"], device, args.batch,
                           model_overrides=[f"+model.img_size={size}", f"+teacher.img_size={size}"])
    seconds = time_it(fn, device, args.steps, args.warmup)
    reset_peak(device)
    fn()
    print(json.dumps({"s": seconds, "peak_mb": peak_mb(device)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on a GPU, 4 on a CPU")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS), choices=list(TOKENS))
    parser.add_argument("--no-full-step", action="store_true", help="skip part 2 (the DeiT training step)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--heads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--merge", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.batch = args.batch or (64 if device.type == "cuda" else 4)
    if args.worker:
        args.tokens = args.tokens[0]
        return worker(args)
    common = ["--device", args.device, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
              str(args.warmup)]
    rows = []
    for n in args.tokens:
        for i, (ht, hs, width) in enumerate(HEADS):
            cells = []
            for merge in MERGES:
                r = run_isolated(Path(__file__), [*common, "--kind", "layer", "--tokens", str(n), "--heads", str(i),
                                                  "--merge", merge])
                cells.append(r)
                print(f"layer N={n} {ht}->{hs} {merge}: {r['s'] * 1e3:.2f} ms", file=sys.stderr)
            rows.append([n, f"{ht} -> {hs}", *(f"{r['s'] * 1e3:.2f}" for r in cells),
                         f"{1e6 * cells[0]['s'] / args.batch / n ** 2:.3f}", f"{cells[0]['peak_mb']:.0f}"])
    print(f"\nSHD term, one mapped layer, forward + backward; batch {args.batch}, {machine(device)}; "
          f"median of {args.steps} calls\n")
    print(table(["N", "heads", "progressive ms", "group ms", "mean ms", "progressive µs per image per N²",
                 "peak MB (progressive)"], rows))
    if args.no_full_step:
        return
    rows = []
    for n in args.tokens:
        t = {m: run_isolated(Path(__file__), [*common, "--kind", "step", "--tokens", str(n), "--method", m])
             for m in ("logit", "shd")}
        print(f"step N={n}: logit {t['logit']['s'] * 1e3:.0f} ms, shd {t['shd']['s'] * 1e3:.0f} ms", file=sys.stderr)
        rows.append([n, TOKENS[n], f"{t['logit']['s'] * 1e3:.0f}", f"{t['shd']['s'] * 1e3:.0f}",
                     f"{t['shd']['s'] / t['logit']['s']:.2f}", f"{t['logit']['peak_mb']:.0f}",
                     f"{t['shd']['peak_mb']:.0f}"])
    print(f"\nDeiT-S -> DeiT-Ti training step (kd=shd: progressive, all 12 blocks mapped); batch {args.batch}, "
          f"{machine(device)}\n")
    print(table(["N", "image px", "logit ms/step", "shd ms/step", "shd / logit", "logit peak MB", "shd peak MB"], rows))


if __name__ == "__main__":
    main()
