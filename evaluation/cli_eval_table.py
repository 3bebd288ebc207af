"""``facediffuser eval table``: base vs fine-tuned vs held-out real (FID, KID, noise floor).

Registered into the ``eval`` sub-parsers by :mod:`.cli_eval`. Registration imports argparse only;
the work (:mod:`.table`) is imported when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

_EPILOG = """\
examples:
  facediffuser eval table --model sd15.safetensors --lora face.safetensors --real heldout/ --n 1000 --out eval/
  facediffuser eval table ... --prompts prompts.txt --steps 30 --cfg 7.5 --sampler ddim --seed 0
"""


def add_sampler_arguments(parser: argparse.ArgumentParser, *, size_default: int | None = 512) -> None:
    """Flags of :class:`.generation.SamplerSettings` (shared with ``facediffuser generate``)."""
    from .generation import SAMPLERS  # light: no torch at import time

    parser.add_argument("--steps", type=int, default=30, metavar="S", help="Sampler steps, the same for both models (default: 30).")
    parser.add_argument("--cfg", type=float, default=7.5, metavar="G", help="Classifier-free guidance scale (default: 7.5).")
    parser.add_argument("--seed", type=int, default=0, metavar="X", help="Image i uses seed X+i (default: 0).")
    parser.add_argument("--size", type=int, default=size_default, metavar="PX", help=f"Image size in pixels (default: {size_default}).")
    parser.add_argument("--sampler", choices=tuple(SAMPLERS), default="ddim", help="Sampler (default: ddim, deterministic).")
    parser.add_argument("--negative-prompt", default="", metavar="TEXT", help="Negative prompt (default: none).")
    parser.add_argument("--batch-size", type=int, default=4, metavar="B", help="Images per sampler batch (default: 4).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="Model dtype (default: float16 on CUDA, float32 on CPU).")


def register(subparsers: Any) -> argparse.ArgumentParser:
    from .cli_eval import add_kid_arguments, add_resize_argument

    p = subparsers.add_parser(
        "table", help="Generate with base and base+LoRA (same prompts, seeds, sampler) and compare both to held-out reals.",
        description="Generates N images with the base model and N with base+LoRA under identical settings, then reports "
                    "FID and KID (mean ± std) with N for Real vs Base, Real vs Fine-tuned, Base vs Fine-tuned and Real vs "
                    "Real (noise floor). Writes results.json, table.md, fid_bar_chart.png and samples_grid.png.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="Base checkpoint (.safetensors or diffusers folder).")
    p.add_argument("--lora", required=True, metavar="LORA", help="kohya-format LoRA (.safetensors).")
    p.add_argument("--lora-scale", type=float, default=1.0, metavar="S", help="LoRA strength for the fine-tuned run (default: 1).")
    p.add_argument("--real", required=True, metavar="DIR", help="Held-out real images (NOT the training folder).")
    p.add_argument("--prompts", metavar="FILE", help="One prompt per line (default: the held-out images' .txt captions, "
                   "else the LoRA's trigger word + 'a photo of a face').")
    p.add_argument("--n", type=int, default=100, metavar="N", help="Images per model (default: 100; >= 1000 for numbers worth quoting).")
    add_sampler_arguments(p)
    p.add_argument("--inception", metavar="FILE", help="FID Inception weights (default: $FACEDIFFUSER_INCEPTION, then $TORCH_HOME/hub/checkpoints).")
    add_resize_argument(p)
    p.add_argument("--allow-overlap", action="store_true", help="Measure even if real images were training images (warns loudly).")
    p.add_argument("--no-face-metrics", action="store_true", help="Skip face detection rate and framing statistics.")
    add_kid_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR", help="Output folder.")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(func=run)
    return p


def settings_from_args(args: argparse.Namespace):
    from .generation import SamplerSettings

    return SamplerSettings(steps=args.steps, cfg=args.cfg, size=args.size, sampler=args.sampler, seed=args.seed,
                           negative_prompt=args.negative_prompt).validate()


def run(args: argparse.Namespace) -> int:
    from .report import summary_lines
    from .table import TableConfig, run_table

    cfg = TableConfig(
        model=args.model, lora=args.lora, real=args.real, out=args.out, n=args.n, settings=settings_from_args(args),
        prompts_file=args.prompts, lora_scale=args.lora_scale, allow_overlap=args.allow_overlap,
        device=args.device, dtype=args.dtype, batch_size=args.batch_size, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size, face_metrics=not args.no_face_metrics, progress=not args.quiet,
    )

    def make_extractor():  # the FID Inception, found as --inception / $FACEDIFFUSER_INCEPTION / $TORCH_HOME say
        from .inception import InceptionFeatures

        return InceptionFeatures(args.inception, device=args.device, resize=args.resize, progress=not args.quiet)

    results = run_table(cfg, make_extractor)
    for line in summary_lines(results):
        print(line)
    print(f"wrote {args.out}/results.json, table.md, fid_bar_chart.png, samples_grid.png")
    return 0
