"""``facediffuser make-model``: write a seeded random SD checkpoint (the test bed's base model).

Registration imports argparse only; torch is imported when the command runs.
"""

from __future__ import annotations

import argparse

ARCHS = ("sd15", "sd2", "sd2-v")  # kept in step with make_model.ARCHS (a test checks)
SIZES = ("full", "tiny")
DTYPES = ("fp16", "fp32", "bf16")


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``make-model`` parser."""
    p = subparsers.add_parser(
        "make-model",
        help="Write a seeded random SD1.5/SD2 checkpoint in the original single-file layout.",
        description=(
            "Write a Stable Diffusion checkpoint with seeded random weights, in the original single-file "
            "(LDM) layout that ComfyUI, A1111 and diffusers' from_single_file read. 'full' is exactly the "
            "released architecture (SD1.5: ~2.1 GB in fp16); 'tiny' keeps every block and name with tiny "
            "widths, for tests. Same arguments, same bytes."
        ),
    )
    p.add_argument("--arch", choices=ARCHS, default="sd15",
                   help="sd15; sd2 (512 epsilon); sd2-v (same tensors as sd2, marked v-prediction in the metadata). Default: sd15.")
    p.add_argument("--size", choices=SIZES, default="full", help="full (the released architecture) or tiny. Default: full.")
    p.add_argument("--dtype", choices=DTYPES, default="fp16", help="dtype of the weights in the file. Default: fp16.")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="Seed of the random weights. Default: 0.")
    p.add_argument("--out", required=True, metavar="FILE", help="Where to write the checkpoint (.safetensors).")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import time

    from .make_model import make_checkpoint

    start = time.perf_counter()
    out = make_checkpoint(args.out, arch=args.arch, size=args.size, dtype=args.dtype, seed=args.seed)
    size_mb = out.stat().st_size / 2**20
    print(f"wrote {out} ({args.arch}, {args.size}, {args.dtype}, seed {args.seed}; {size_mb:.1f} MiB in {time.perf_counter() - start:.1f} s)")
    return 0
