"""What glibc's default malloc costs a CPU training step, and what ``allocator.keep_freed_memory`` buys.

SD1.5's largest 3x3 convolutions, float32, forward (oneDNN, torch's default) and forward + input
gradient, timed per call with the minor page faults per call, in two fresh processes one after the
other: glibc as it comes, then after :func:`facediffuser.allocator.keep_freed_memory` (what
``facediffuser train`` does before its first step). oneDNN reorders the weight into a new buffer on
every call; with the default allocator that buffer is a fresh mmap whose pages fault in again.

  python bench/bench_alloc.py --threads 2 --json bench/results/alloc.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# (in, out, feature map): the UNet's 1280-channel convolutions at 256 px, and two 320/640 ones
SHAPES = [(2560, 1280, 8), (1280, 1280, 8), (1920, 1280, 8), (1280, 1280, 16), (640, 640, 16), (320, 320, 32)]


def _child(args: argparse.Namespace) -> None:
    import resource

    import torch
    import torch.nn.functional as F

    did = "glibc default"
    if args.child == "kept":
        from facediffuser.allocator import keep_freed_memory

        did = keep_freed_memory()
    torch.set_num_threads(args.threads)
    rows = []
    for ci, co, s in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, ci, s, s, generator=g)
        w = torch.randn(co, ci, 3, 3, generator=g) * 0.01
        b = torch.randn(co, generator=g)
        row = {"in": ci, "out": co, "size": s, "gflop": 2 * ci * co * 9 * s * s / 1e9}
        for name, backward in (("fwd", False), ("fwd_bwd", True)):
            def once() -> None:
                xi = x.detach().requires_grad_(backward)
                y = F.conv2d(xi, w, b, padding=1)
                if backward:
                    torch.autograd.grad(y, xi, torch.ones_like(y))
            once()
            f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            for _ in range(args.reps):
                once()
            row[f"{name}_ms"] = 1e3 * (time.perf_counter() - t0) / args.reps
            row[f"{name}_faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / args.reps
        rows.append(row)
    print(json.dumps({"allocator": did, "rows": rows}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--child", choices=("default", "kept"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_start": os.getloadavg(), "threads": args.threads}
    for mode in ("default", "kept"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--threads", str(args.threads), "--reps", str(args.reps)],
                             capture_output=True, text=True, env=env, check=True)
        report[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    report["loadavg_end"] = os.getloadavg()
    print(f"float32 3x3 convolutions (oneDNN), batch 1, {args.threads} threads, {args.reps} calls each; "
          f"default = glibc as it comes, kept = {report['kept']['allocator']}")
    print("| in -> out @ size | fwd ms default / kept | faults per call default / kept | fwd+bwd ms default / kept | speed-up fwd, fwd+bwd |")
    print("|---|---|---|---|---|")
    for d, k in zip(report["default"]["rows"], report["kept"]["rows"]):
        print(f"| {d['in']} -> {d['out']} @ {d['size']} | {d['fwd_ms']:.1f} / {k['fwd_ms']:.1f} | "
              f"{d['fwd_faults']:.0f} / {k['fwd_faults']:.0f} | {d['fwd_bwd_ms']:.1f} / {k['fwd_bwd_ms']:.1f} | "
              f"{d['fwd_ms'] / k['fwd_ms']:.2f}x, {d['fwd_bwd_ms'] / k['fwd_bwd_ms']:.2f}x |")
    print(f"load average {report['loadavg_start'][0]:.2f} -> {report['loadavg_end'][0]:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
