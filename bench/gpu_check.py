"""The GPU run, prepared: one process, a few minutes on an H100/H200, one JSON and one table.

Sub-benchmarks, in order (each in ``try``: a failure is printed loudly, recorded, and the next one
runs; the exit code is 1 when any failed):

1. **model**: the full-size random SD1.5 single file (``make_checkpoint``, fp16, seed 0), unless
   ``--model`` names one;
2. **train**: our trainer (the real ``train()``), 512 px, ``--mixed-precision bf16``, rank 16 (the
   default), latents + text embeddings cached, at batch 1, 8 and 16, then the same with gradient
   checkpointing. Per run: samples/s over the timed steps (CUDA-synchronised stamps after every
   optimizer step), ``torch.cuda.max_memory_allocated`` of the whole run, and the FLOPs of one real
   training step counted by ``torch.utils.flop_counter.FlopCounterMode`` (entered after the
   warm-up steps, left after the next optimizer step; that step is not timed). "% of peak" =
   useful FLOPs per second / ``--peak-tflops`` (989 = H100/H200 SXM dense bf16), where useful =
   the counted step without checkpointing (with checkpointing the count includes the recomputed
   forward; it is printed beside);
2b. **lora forward ab**: the UNet step with peft's LoRA layers vs the fused forward, interleaved;
3. **generation**: the eval table's sampler path (``evaluation.generation``: one pipeline, fp16,
   DDIM, CFG 7.5, batched) at 512 px: base, then the LoRA from step 2 merged into the weights,
   then the same LoRA as peft runtime adapters; images/s each;
4. **inception**: ``InceptionFeatures`` (TF1 resize) on 512x512 uint8 images, images/s, with a
   random-weight file of the real layout (the speed does not depend on the values).

A time budget (``--budget-s``, default 480 s) guards the 9-minute slot: a sub-benchmark whose
estimate no longer fits is skipped, and says so.

``--cpu-smoke`` runs the same code with tiny sizes on the CPU (a tiny model, 64 px, batch 1/2,
2 timed steps, 2 images, bf16 where the CPU has bf16 arithmetic), so the script is known to work
before a GPU is lent:

  python bench/gpu_check.py --cpu-smoke --json /tmp/gpu-smoke.json
  bench/gpu_check.sh                       # on the GPU machine (installs carried wheels first)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _section(report: dict, name: str, budget: Budget, estimate_s: float, fn, *a, **kw):
    """Run one sub-benchmark: loud on failure, skipped when the budget cannot hold it."""
    if budget.left() < estimate_s:
        msg = f"SKIPPED {name}: {budget.left():.0f} s of the budget left, needs ~{estimate_s:.0f} s"
        print(f"\n!!! {msg}", file=sys.stderr, flush=True)
        report["sections"][name] = {"status": "skipped", "reason": msg}
        return None
    t0 = time.perf_counter()
    print(f"\n=== {name} (budget left {budget.left():.0f} s)", file=sys.stderr, flush=True)
    try:
        out = fn(*a, **kw)
        report["sections"][name] = {"status": "ok", "seconds": time.perf_counter() - t0, "result": out}
        return out
    except Exception as exc:  # noqa: BLE001 - report and go on with the next sub-benchmark
        tb = traceback.format_exc()
        print(f"\n!!! FAILED {name}: {type(exc).__name__}: {exc}\n{tb}", file=sys.stderr, flush=True)
        report["sections"][name] = {"status": "failed", "seconds": time.perf_counter() - t0,
                                    "error": f"{type(exc).__name__}: {exc}", "traceback": tb[-4000:]}
        return None
    finally:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


# --- 1. model --------------------------------------------------------------------------------------

def build_model(work: Path, size: str) -> str:
    from facediffuser.sd.make_model import make_checkpoint

    dtype = "fp16" if size == "full" else "fp32"
    path = work / f"sd15-{size}-seed0-{dtype}.safetensors"
    if not path.is_file():
        make_checkpoint(path, arch="sd15", size=size, dtype=dtype, seed=0)
    return str(path)


# --- 2. training -----------------------------------------------------------------------------------

def train_run(args: argparse.Namespace, model: str, data: Path, work: Path, batch: int, ckpt: bool) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from facediffuser.trainer.config import TrainConfig
    from facediffuser.trainer.training_loop import TrainCallbacks, train

    device = args.device
    counted_step = args.warmup + 1
    total = args.warmup + 1 + args.steps
    stamps: list[float] = []
    counter: dict = {}

    def on_step(step: int, _total: int, _loss: float) -> None:
        _sync(device)
        stamps.append(time.perf_counter())
        if step == args.warmup:  # count the next step
            counter["mode"] = FlopCounterMode(display=False)
            counter["mode"].__enter__()
        elif step == counted_step and "mode" in counter:
            counter["mode"].__exit__(None, None, None)
            counter["flops"] = float(counter["mode"].get_total_flops())

    name = f"b{batch}{'-ckpt' if ckpt else ''}"
    cfg = TrainConfig(model=model, data=str(data), output=str(work / f"{name}.safetensors"), cache_dir=str(work / "cache"),
                      state_dir=str(work / f"{name}.state"), steps=total, batch_size=batch, resolution=args.resolution,
                      mixed_precision=args.mixed_precision, gradient_checkpointing=ckpt, seed=0, save_precision="fp16")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        result = train(cfg, callbacks=TrainCallbacks(on_step=on_step))
    finally:
        if "flops" not in counter and "mode" in counter:
            counter["mode"].__exit__(None, None, None)
    wall = time.perf_counter() - t0
    n = len(stamps) - counted_step  # the steps after the counted one
    dt = stamps[-1] - stamps[counted_step - 1] if n > 0 else float("nan")
    out = {"batch": batch, "gradient_checkpointing": ckpt, "steps_timed": n, "s_per_step": dt / n if n else None,
           "samples_per_s": batch * n / dt if n else None, "flops_per_step_counted": counter.get("flops"),
           "wall_s": wall, "final_loss": result.final_loss, "lora": str(result.output) if result.output else None}
    if device == "cuda":
        out["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  {name}: {out['s_per_step']:.4f} s/step, {out['samples_per_s']:.2f} samples/s, "
          f"{(out['flops_per_step_counted'] or 0) / 1e9:.1f} GFLOP/step counted", file=sys.stderr, flush=True)
    return out


# --- 2b. the fused LoRA forward vs peft's, on this device ----------------------------------------

def lora_forward_ab(args: argparse.Namespace, model: str, batch: int) -> dict:
    """UNet forward + backward of the trainer's loss with peft's LoRA layers vs the fused forward
    (``trainer/lora_forward.py``, on in ``train()``), interleaved, bf16 autocast as in training:
    whether the fused path pays on this device (on the CPU it was within noise)."""
    import statistics

    import torch

    from facediffuser.trainer import training_loop as tl
    from facediffuser.trainer.config import TrainConfig
    from facediffuser.trainer.lora_forward import lean_lora_forward

    dev = torch.device(args.device)
    bf16 = args.mixed_precision == "bf16"
    cfg = TrainConfig(model=model, data="-", output="-.safetensors", resolution=args.resolution, batch_size=batch, seed=0,
                      mixed_precision=args.mixed_precision)
    models = tl._load_models(cfg, dev, torch.bfloat16 if bf16 else torch.float32)
    named = tl._add_lora_adapters(cfg, models)
    models.unet.to(dev).train()
    lat = args.resolution // 8
    g = torch.Generator().manual_seed(0)
    b = {"latents": torch.randn(batch, 4, lat, lat, generator=g).to(dev),
         "encoder_hidden_states": torch.randn(batch, 77, models.unet.config.cross_attention_dim, generator=g).to(dev)}

    def step(lean: bool) -> float:
        from contextlib import nullcontext

        with (lean_lora_forward(models.unet) if lean else nullcontext()), \
                torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            _sync(args.device)
            t = time.perf_counter()
            loss = tl._diffusion_loss(cfg, models, b, torch.Generator().manual_seed(1), "epsilon", dev)
            loss.backward()
            _sync(args.device)
            dt = time.perf_counter() - t
        for p in named.values():
            p.grad = None
        return dt

    step(False), step(True)  # warm-up both
    times: dict[str, list[float]] = {"peft": [], "lean": []}
    for r in range(args.ab_rounds):
        for v in (("peft", "lean") if r % 2 == 0 else ("lean", "peft")):
            times[v].append(step(v == "lean"))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"  UNet fwd+bwd batch {batch}: peft {med['peft']:.4f} s, fused {med['lean']:.4f} s, "
          f"peft/fused {med['peft'] / med['lean']:.3f}x", file=sys.stderr, flush=True)
    del models
    return {"batch": batch, "times": times, "median": med, "peft_over_lean": med["peft"] / med["lean"]}


# --- 3. generation ---------------------------------------------------------------------------------

def generation(args: argparse.Namespace, model: str, lora: str | None) -> dict:
    import torch

    from facediffuser.evaluation.generation import SamplerSettings, generate, load_generation_pipeline, lora_loaded

    dtype = "float16" if args.device == "cuda" else "float32"
    pipe = load_generation_pipeline(model, sampler="ddim", device=args.device, dtype=dtype)
    s = SamplerSettings(steps=args.gen_steps, cfg=7.5, size=args.resolution, seed=0)
    prompts = ["a photo of a face", "a close-up portrait photo of a person"]
    generate(pipe, prompts, s, min(args.gen_batch, args.gen_n), batch_size=args.gen_batch)  # warm-up (kernels, cuDNN)
    out: dict = {"n": args.gen_n, "steps": args.gen_steps, "batch": args.gen_batch, "size": args.resolution, "dtype": dtype}

    def timed(label: str) -> None:
        _sync(args.device)
        t = time.perf_counter()
        generate(pipe, prompts, s, args.gen_n, batch_size=args.gen_batch)
        _sync(args.device)
        dt = time.perf_counter() - t
        out[label] = {"seconds": dt, "images_per_s": args.gen_n / dt}
        print(f"  generation {label}: {args.gen_n / dt:.2f} images/s", file=sys.stderr, flush=True)

    timed("base")
    if lora:
        with lora_loaded(pipe, lora, 1.0, merge=True):
            timed("lora_merged")
        with lora_loaded(pipe, lora, 1.0, merge=False):
            timed("lora_runtime")
    else:
        out["note"] = "no LoRA (the training runs wrote none): LoRA rows skipped"
    if args.device == "cuda":
        out["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# --- 4. inception ----------------------------------------------------------------------------------

def inception(args: argparse.Namespace, work: Path) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from fixtures_inception import build_random_inception_state_dict

    from facediffuser.evaluation.inception import InceptionFeatures

    path = work / "weights-inception-2015-12-05-6726825d.pth"
    if not path.is_file():
        torch.save(build_random_inception_state_dict(0), path)
    ext = InceptionFeatures(path, device=args.device, batch_size=args.inception_batch, progress=False)
    x = torch.randint(0, 256, (args.inception_n, 3, args.resolution, args.resolution), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    ext(x[: args.inception_batch])  # warm-up
    _sync(args.device)
    t = time.perf_counter()
    feats = ext(x)
    _sync(args.device)
    dt = time.perf_counter() - t
    assert feats.shape == (args.inception_n, 2048), feats.shape
    print(f"  inception: {args.inception_n / dt:.1f} images/s", file=sys.stderr, flush=True)
    return {"n": args.inception_n, "input_size": args.resolution, "batch": args.inception_batch, "seconds": dt,
            "images_per_s": args.inception_n / dt, "weights": "random, real layout (speed only)"}


# --- the table -------------------------------------------------------------------------------------

def _table(report: dict, args: argparse.Namespace) -> None:
    sec = report["sections"]
    print(f"\nGPU check | {report['machine'].get('gpu', 'cpu')} | torch {report['machine']['torch']} | "
          f"{args.resolution} px | {args.mixed_precision} | peak {args.peak_tflops:g} TFLOP/s")
    useful = {}
    for k, v in sec.items():
        if k.startswith("train b") and not k.endswith("ckpt") and v["status"] == "ok" and v["result"]["flops_per_step_counted"]:
            r = v["result"]
            useful[r["batch"]] = r["flops_per_step_counted"] / r["batch"]
    print("| run | status | s/step | samples/s | counted GFLOP/step | useful GFLOP/sample | % of peak | max alloc GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for k, v in sec.items():
        if not k.startswith("train"):
            continue
        if v["status"] != "ok":
            print(f"| {k} | {v['status'].upper()} | | | | | | |")
            continue
        r = v["result"]
        u = useful.get(r["batch"])
        pct = 100 * r["samples_per_s"] * u / (args.peak_tflops * 1e12) if u and r["samples_per_s"] else float("nan")
        mem = r.get("max_allocated_gib", r.get("peak_rss_gib", float("nan")))
        print(f"| {k} | ok | {r['s_per_step']:.4f} | {r['samples_per_s']:.2f} | {(r['flops_per_step_counted'] or 0) / 1e9:.1f} | "
              f"{(u or float('nan')) / 1e9:.1f} | {pct:.1f} | {mem:.2f} |")
        r["useful_flops_per_sample"] = u
        r["pct_of_peak"] = pct
    ab = sec.get("lora forward ab", {})
    if ab.get("status") == "ok":
        r = ab["result"]
        print(f"fused LoRA forward, UNet fwd+bwd batch {r['batch']}: peft {r['median']['peft']:.4f} s, fused {r['median']['lean']:.4f} s "
              f"({r['peft_over_lean']:.3f}x)")
    else:
        print(f"fused LoRA forward: {ab.get('status', 'not run').upper()}")
    g = sec.get("generation", {})
    if g.get("status") == "ok":
        r = g["result"]
        rows = [f"{k} {r[k]['images_per_s']:.2f} img/s" for k in ("base", "lora_merged", "lora_runtime") if k in r]
        print(f"generation ({r['n']} images, {r['steps']} steps, batch {r['batch']}, {r['dtype']}): " + ", ".join(rows))
        if "lora_merged" in r and "lora_runtime" in r:
            print(f"  merged / runtime adapters: {r['lora_merged']['images_per_s'] / r['lora_runtime']['images_per_s']:.3f}x")
    else:
        print(f"generation: {g.get('status', 'not run').upper()}")
    i = sec.get("inception", {})
    print(f"inception: {i['result']['images_per_s']:.1f} img/s" if i.get("status") == "ok" else f"inception: {i.get('status', 'not run').upper()}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="Tiny sizes on the CPU: proves the script runs.")
    p.add_argument("--model", help="SD1.5 single file (default: make the full-size random one, ~20 s).")
    p.add_argument("--workdir", help="Scratch folder (default: a temporary one).")
    p.add_argument("--json", metavar="FILE", help="Write the report here.")
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="Dense bf16 peak (H100/H200 SXM: 989).")
    p.add_argument("--batches", default=None, help="default: 1,8,16 (smoke: 1,2)")
    p.add_argument("--no-ckpt", action="store_true", help="Skip the gradient-checkpointing runs.")
    args = p.parse_args(argv)

    import torch

    smoke = args.cpu_smoke
    args.device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on the GPU machine, or pass --cpu-smoke")
    args.resolution = 64 if smoke else 512
    args.size = "tiny" if smoke else "full"
    args.batches = [int(b) for b in (args.batches or ("1,2" if smoke else "1,8,16")).split(",")]
    args.warmup, args.steps = (1, 2) if smoke else (3, 10)
    args.ab_rounds = 2 if smoke else 6
    args.gen_n, args.gen_steps, args.gen_batch = (2, 2, 2) if smoke else (16, 20, 8)
    args.inception_n, args.inception_batch = (4, 2) if smoke else (512, 64)
    if smoke:
        try:
            caps = torch.cpu.get_capabilities()
        except (AttributeError, RuntimeError):
            caps = {}
        args.mixed_precision = "bf16" if caps.get("avx512_bf16") or caps.get("amx_bf16") else "no"
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    else:
        args.mixed_precision = "bf16"
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 VAE and Inception; the UNet runs bf16
        torch.backends.cudnn.allow_tf32 = True

    from bench_train import _machine

    budget = Budget(args.budget_s)
    report = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": _machine(),
              "cpu_smoke": smoke, "resolution": args.resolution, "mixed_precision": args.mixed_precision,
              "peak_tflops": args.peak_tflops, "rank": 16, "sections": {}}
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="fd-gpu-check-")
        work = Path(tmp.name)

    model = args.model or _section(report, "model", budget, 30 if not smoke else 5, build_model, work, args.size)
    lora = None
    if model:
        from facediffuser.demo.toy_faces import write_toy_faces

        data = work / "data"
        if not data.is_dir():
            write_toy_faces(data, max(8, 2 * max(args.batches)), size=args.resolution)
        for ckpt in ([False] if args.no_ckpt else [False, True]):
            for b in args.batches:
                r = _section(report, f"train b{b}{'-ckpt' if ckpt else ''}", budget, 15 + 2 * b if not smoke else 5,
                             train_run, args, model, data, work, b, ckpt)
                if r and r.get("lora") and lora is None:
                    lora = r["lora"]
        _section(report, "lora forward ab", budget, 40 if not smoke else 5, lora_forward_ab, args, model, args.batches[-1])
        _section(report, "generation", budget, 90 if not smoke else 5, generation, args, model, lora)
    _section(report, "inception", budget, 30 if not smoke else 5, inception, args, work)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report["seconds"] = time.perf_counter() - budget.t0
    _table(report, args)
    failed = [k for k, v in report["sections"].items() if v["status"] != "ok"]
    print(f"\n{len(report['sections']) - len(failed)} of {len(report['sections'])} sub-benchmarks ok in {report['seconds']:.0f} s"
          + (f"; NOT OK: {', '.join(failed)}" if failed else ""))
    if args.json:
        from facediffuser.fileio import atomic_write_text

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
