"""``facediffuser generate``: images from a checkpoint, optionally with a LoRA, settings recorded.

A thin front end over :mod:`.evaluation.generation`; registration imports argparse only.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> argparse.ArgumentParser:
    from .cli_eval_table import add_sampler_arguments

    p = subparsers.add_parser(
        "generate", help="Generate images from a checkpoint (+ LoRA) with recorded prompts, seeds and sampler.",
        description="Image i uses prompt i mod len(prompts) and seed X+i; generation.json beside the images records "
                    "model, LoRA, scale and every sampler setting.",
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="Checkpoint (.safetensors or diffusers folder).")
    p.add_argument("--lora", metavar="FILE", help="kohya-format LoRA to apply.")
    p.add_argument("--lora-scale", type=float, default=1.0, metavar="S", help="LoRA strength (default: 1).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="One prompt for every image.")
    src.add_argument("--prompts", metavar="FILE", help="One prompt per line, used in turn.")
    p.add_argument("--n", type=int, default=4, metavar="N", help="Number of images (default: 4).")
    add_sampler_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="Output folder (00000.png ... + generation.json).")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .cli_eval_table import settings_from_args
    from ..sd.prompts import read_prompts
    from .generation import generate_to_folder, load_generation_pipeline

    settings = settings_from_args(args)
    prompts = read_prompts(args.prompts) if args.prompts else [" ".join(args.prompt.split())]
    pipe = load_generation_pipeline(args.model, sampler=settings.sampler, device=args.device, dtype=args.dtype)
    paths = generate_to_folder(pipe, args.out, prompts, settings, args.n, model=args.model, lora=args.lora,
                               lora_scale=args.lora_scale, batch_size=args.batch_size, progress=not args.quiet)
    print(f"wrote {len(paths)} images and generation.json to {args.out}")
    return 0
