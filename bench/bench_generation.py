"""Generation for the FID table: LoRA merged into the weights vs peft's runtime adapters, and batching.

One pipeline (``evaluation.generation.load_generation_pipeline``), the same prompts, seeds,
sampler, steps and CFG for every variant, interleaved in rounds so that the machine's load hits
all alike:

* ``base``     no adapter;
* ``merged``   ``lora_loaded(..., merge=True)``: W + scale * ΔW in the weights for the block, the
               original weight tensors put back after (checked here: same objects, equal bits);
* ``runtime``  ``lora_loaded(..., merge=False)``: peft's adapter layers run on every call.

The LoRA is a random kohya file with the trainer's 192 UNet modules (rank ``--rank``), written
here (its values do not change the speed). ``--batch-sizes`` also times the base at several
generation batch sizes (images per pipeline call; CFG doubles the UNet batch).

  python bench/bench_generation.py --size 256 --n 4 --steps 4 --rounds 2 --json bench/results/gen-256.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def random_lora(model: str, path: Path, rank: int, seed: int = 0) -> Path:
    """A kohya LoRA file with random up/down weights on kohya's UNet modules of ``model``."""
    import torch

    from bench_train import _meta_models
    from facediffuser.trainer.kohya_format import peft_to_kohya, save_kohya_lora
    from facediffuser.trainer.lora_targets import unet_target_modules

    unet, _, _ = _meta_models(model)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    modules = dict(unet.named_modules())
    for name in unet_target_modules(unet):
        w = modules[name].weight
        tail = tuple(w.shape[2:])
        sd[f"{name}.lora_A.weight"] = torch.randn((rank, w.shape[1], *tail), generator=g) / w.shape[1] ** 0.5
        sd[f"{name}.lora_B.weight"] = torch.randn((w.shape[0], rank, *((1,) * len(tail))), generator=g) * 0.01
    tensors = peft_to_kohya(sd, unet_alpha=float(rank))
    save_kohya_lora(path, tensors, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                    "ss_network_alpha": str(rank)}, dtype="fp16")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: the full-size random SD1.5 file (--size-model tiny: the tiny one)")
    p.add_argument("--size-model", choices=("full", "tiny"), default="full")
    p.add_argument("--cache", default=os.environ.get("FACEDIFFUSER_TEST_CACHE", ".cache/tests"))
    p.add_argument("--size", type=int, default=256, help="image size (px)")
    p.add_argument("--n", type=int, default=4, help="images per variant and round")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4, help="images per pipeline call")
    p.add_argument("--batch-sizes", default="", help="also time the base at these batch sizes, e.g. 1,4")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    import torch

    from facediffuser.evaluation.generation import SamplerSettings, generate, load_generation_pipeline, lora_loaded

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.model:
        from bench_peers import _default_model

        ns = argparse.Namespace(size=args.size_model, cache=args.cache)
        args.model = _default_model(ns)
    work = Path(tempfile.mkdtemp(prefix="fd-bench-gen-"))
    lora = random_lora(args.model, work / "random.safetensors", args.rank)
    pipe = load_generation_pipeline(args.model, sampler="ddim", device=args.device)
    dev = pipe.device.type
    s = SamplerSettings(steps=args.steps, cfg=7.5, size=args.size, seed=0)
    prompts = ["a photo of a face", "a close-up portrait photo of a person"]
    snapshot = {n: (p.data_ptr(), p.detach().clone()) for n, p in pipe.unet.named_parameters()}

    def run(variant: str, batch: int) -> float:
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        if variant == "base":
            generate(pipe, prompts, s, args.n, batch_size=batch)
        else:
            with lora_loaded(pipe, lora, 1.0, merge=variant == "merged"):
                generate(pipe, prompts, s, args.n, batch_size=batch)
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    variants = ["base", "merged", "runtime"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    run("base", args.batch)  # warm-up
    for r in range(args.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            times[v].append(run(v, args.batch))
        print(f"round {r}: " + ", ".join(f"{v} {times[v][-1]:.2f} s" for v in variants) + f" (load {os.getloadavg()[0]:.1f})",
              file=sys.stderr, flush=True)
    batches: dict[int, list[float]] = {}
    for b in [int(x) for x in args.batch_sizes.split(",") if x]:
        batches[b] = [run("base", b) for _ in range(args.rounds)]
    # the merged path must have left the base weights exactly as they were (objects and bits)
    after = {n.replace(".base_layer", ""): p for n, p in pipe.unet.named_parameters()}
    exact = all(after[n].data_ptr() == ptr and torch.equal(after[n].detach(), v) for n, (ptr, v) in snapshot.items())
    med = {v: statistics.median(x) for v, x in times.items()}
    lora_cost_runtime = med["runtime"] - med["base"]
    lora_cost_merged = med["merged"] - med["base"]
    print(f"\n{args.n} images, {args.size} px, {args.steps} DDIM steps, CFG 7.5, batch {args.batch}, {dev}, rank {args.rank}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    for v in variants:
        print(f"  {v:<8} median {med[v]:.2f} s ({args.n / med[v]:.3f} img/s)  [{', '.join(f'{x:.2f}' for x in times[v])}]")
    print(f"  merged / runtime: {med['runtime'] / med['merged']:.3f}x faster; LoRA cost over base: runtime "
          f"{lora_cost_runtime:+.2f} s, merged {lora_cost_merged:+.2f} s (merge + restore included)")
    for b, ts in batches.items():
        print(f"  base at batch {b}: median {statistics.median(ts):.2f} s ({args.n / statistics.median(ts):.3f} img/s)")
    print(f"  base weights after the merged runs: {'bit-identical, same tensors' if exact else 'CHANGED'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                               "model": args.model, "device": dev, "size": args.size, "n": args.n,
                                               "steps": args.steps, "batch": args.batch, "rank": args.rank,
                                               "threads": torch.get_num_threads(), "times": times, "median": med,
                                               "batch_sizes": batches, "restored_exactly": exact,
                                               "loadavg_end": os.getloadavg()}, indent=1) + "\n")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
