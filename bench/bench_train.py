"""Training throughput of the shipped trainer: samples/s and peak memory, three modes in one run.

Modes (same model, data, resolution, batch, rank, seed; each runs the real ``train()``):
  cached   -- our trainer as shipped: VAE latents and text embeddings cached before the loop;
  no_cache -- ``no_cache=True``: VAE encode + text encoder + UNet every step (what diffusers'
              train_text_to_image_lora.py does);
  ckpt     -- cached + gradient checkpointing.
Each (mode, batch size) runs in its own subprocess, so peak memory is that run's alone. Reported per run:

* ``s/step`` and ``samples/s`` over the steps after ``--warmup`` (the first steps include lazy
  initialisation); ``cpu s/step``: process CPU time (all threads) over the same steps -- on a shared
  machine this is the figure that other processes disturb least;
* ``load s`` (checkpoint -> components) and ``data s`` (``build_train_data``: on a cold cache this is
  the cache build: VAE-encode every image, text-encode every caption), timed by wrapping those two
  functions; ``cached`` and ``ckpt`` share one cache folder, so ``cached`` (run first) builds it and
  ``ckpt`` only reads it;
* memory: on CPU the process's peak RSS (``getrusage``; includes loading the checkpoint) and the
  peak RSS sampled (psutil, every 50 ms) during the timed steps; on GPU
  ``torch.cuda.max_memory_allocated``.

FLOPs per sample (printed; used for "% of peak" on GPU): counted with
``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy of the model's UNet / VAE encoder /
text encoder (configs from the checkpoint's shapes; no weights needed, so it is the same on any
device). A LoRA step on a frozen base costs ``2 x F_unet`` (forward + the backward's activation
gradients; the base needs no weight-gradient GEMMs and the LoRA's are < 1 %); gradient checkpointing
adds one more forward (``3 x F_unet``); ``no_cache`` adds the VAE-encoder and text-encoder forwards.
The "% of peak" column uses ``2 x F_unet`` per sample for every mode (useful work only).

``--knobs`` instead measures, in one process on the same per-step code, the speed options of
``trainer/training_loop.py``: the UNet in ``channels_last`` vs contiguous (a full train step,
interleaved A/B), and the AdamW implementations (for-loop, foreach, fused) on the real LoRA
parameters.

  python bench/bench_train.py --size tiny --resolution 64 --steps 2                 # smoke run
  python bench/bench_train.py --resolution 512 --batch-sizes 1 --steps 2 --images 4 --threads 1 --json bench/results/cpu-512-1thread.json
  python bench/bench_train.py --knobs --resolution 256 --steps 3 --threads 1 --json bench/results/knobs-256-1thread.json
  python bench/bench_train.py --device cuda --mixed-precision bf16 --resolution 512 --batch-sizes 1,8,16 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODES = {"cached": {}, "no_cache": {"no_cache": True}, "ckpt": {"gradient_checkpointing": True}}


# --- machine ------------------------------------------------------------------------------------

def _machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except (OSError, subprocess.SubprocessError):
        pass
    info = {"platform": platform.platform(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    try:
        import diffusers
        import peft

        info.update(diffusers=diffusers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class _RssSampler:
    """Samples this process's RSS every ``interval`` s; ``peak(t0, t1)`` is the max within a window."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.proc.memory_info().rss))
            self._stop.wait(self.interval)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, t0: float, t1: float) -> int:
        return max((r for t, r in self.samples if t0 <= t <= t1), default=0)


# --- one (mode, batch) run ------------------------------------------------------------------------

def _data_folder(work: Path, n_img: int, resolution: int) -> Path:
    from facediffuser.demo.toy_faces import write_toy_faces

    data = work / f"data-{n_img}-{resolution}"
    if not data.is_dir():
        write_toy_faces(data, n_img, size=resolution)
    return data


def _one(args: argparse.Namespace) -> dict:
    """One (mode, batch) run of the real ``train()`` in this process; prints a JSON line."""
    import resource

    import torch

    import facediffuser.trainer.caching as caching
    import facediffuser.sd.model_loading as model_loading
    from facediffuser.trainer.config import TrainConfig
    from facediffuser.trainer.training_loop import TrainCallbacks, train

    mode, batch = args.one_mode, args.one_batch
    work = Path(args.workdir)
    data = _data_folder(work, args.images or max(8, batch * 2), args.resolution)
    phases: dict[str, float] = {}

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    # the loop imports these inside its stages, so wrapping the module attributes times the real calls
    model_loading.load_components = timed("load_s", model_loading.load_components)
    caching.build_train_data = timed("data_s", caching.build_train_data)

    cuda = args.device == "cuda"
    wall: list[float] = []
    cpu: list[float] = []

    def on_step(step: int, total: int, loss: float) -> None:
        if cuda:
            torch.cuda.synchronize()
        wall.append(time.perf_counter())
        cpu.append(time.process_time())

    cfg = TrainConfig(model=args.model, data=str(data), output=str(work / f"{mode}-{batch}.safetensors"),
                      cache_dir=str(work / f"cache-{batch}"), steps=args.warmup + args.steps, batch_size=batch,
                      rank=args.rank, resolution=args.resolution, mixed_precision=args.mixed_precision, seed=0,
                      dataloader_workers=args.workers, **MODES[mode])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with _RssSampler() as rss:
        train(cfg, callbacks=TrainCallbacks(on_step=on_step))
    total = time.perf_counter() - t0
    w0, c0 = wall[args.warmup - 1], cpu[args.warmup - 1]
    n = len(wall) - args.warmup
    dt = wall[-1] - w0
    out = {"mode": mode, "batch": batch, "steps_timed": n, "seconds_per_step": dt / n,
           "cpu_seconds_per_step": (cpu[-1] - c0) / n, "samples_per_s": batch * n / dt,
           "first_steps_s": w0 - t0 - phases.get("load_s", 0.0) - phases.get("data_s", 0.0),
           "load_s": phases.get("load_s"), "data_s": phases.get("data_s"), "wall_s": total,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
           "loop_peak_rss_gb": rss.peak(w0, wall[-1]) / 2**30,
           "loadavg_before": load_before[0], "loadavg_after": os.getloadavg()[0]}
    if cuda:
        out["peak_gpu_alloc_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print("BENCH " + json.dumps(out), flush=True)
    return out


# --- FLOPs ----------------------------------------------------------------------------------------

def _meta_models(model: str) -> tuple:
    """UNet, VAE and text encoder of the checkpoint's architecture on the meta device (no weights)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from facediffuser.sd import model_loading as ml

    src = ml._open_single_file(Path(model), with_tensors=False)
    fam = ml._family_of(src, None, None)
    names = ml._normalise_keys(src.shapes)
    configs = ml._infer_configs({names[k]: v for k, v in src.shapes.items()}, fam.base, fam.family, src.name)
    if fam.full_size:
        configs = {c: ml._shipped(fam.family, c) for c in ("unet", "vae", "text_encoder")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}))
    return unet, vae, te


def count_flops(model: str, resolution: int) -> dict:
    """Forward FLOPs for one sample (FlopCounterMode on meta tensors)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, vae, te = _meta_models(model)
    lat = resolution // 8
    out = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            unet(torch.zeros(1, unet.config.in_channels, lat, lat, device="meta"), torch.tensor([500], device="meta"),
                 torch.zeros(1, 77, unet.config.cross_attention_dim, device="meta"))
        out["unet_forward"] = float(fc.get_total_flops())
        with FlopCounterMode(display=False) as fc:
            vae.encode(torch.zeros(1, 3, resolution, resolution, device="meta"))
        out["vae_encoder"] = float(fc.get_total_flops())
        with FlopCounterMode(display=False) as fc:
            te(torch.zeros(1, 77, dtype=torch.long, device="meta"))
        out["text_encoder"] = float(fc.get_total_flops())
    out["attention_processor"] = type(next(iter(unet.attn_processors.values()))).__name__
    return out


# --- knobs: channels_last and the AdamW implementation, on the same per-step code -----------------

def _knobs(args: argparse.Namespace) -> dict:
    import torch

    from facediffuser.trainer import training_loop as tl
    from facediffuser.trainer.config import TrainConfig

    device = torch.device(args.device)
    cfg = TrainConfig(model=args.model, data="-", output="-.safetensors", rank=args.rank, resolution=args.resolution,
                      batch_size=int(args.batch_sizes.split(",")[0]), mixed_precision=args.mixed_precision, seed=0)
    models = tl._load_models(cfg, device, tl._weight_dtype(cfg))
    named = tl._add_lora_adapters(cfg, models)
    params = list(named.values())
    unet = models.unet.train()
    lat = cfg.resolution // 8
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(cfg.batch_size, 4, lat, lat, generator=g),
             "encoder_hidden_states": torch.randn(cfg.batch_size, 77, unet.config.cross_attention_dim, generator=g)}
    pt = tl._prediction_type(cfg, models)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> float:
        sync()
        t = time.perf_counter()
        loss = tl._diffusion_loss(cfg, models, batch, torch.Generator().manual_seed(1), pt, device)
        loss.backward()
        sync()
        for p in params:
            p.grad = None
        return time.perf_counter() - t

    # A/B/A/B... so that a change in the machine's load hits both sides alike
    times: dict[str, list[float]] = {"contiguous": [], "channels_last": []}
    for fmt in ("contiguous", "channels_last"):  # one untimed warm-up step each
        unet.to(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
        step()
    for _ in range(args.steps):
        for fmt in ("contiguous", "channels_last"):
            unet.to(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)
            times[fmt].append(step())
    unet.to(memory_format=torch.contiguous_format)

    # the optimizer alone, on the real LoRA parameters with fixed gradients
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(p.shape, generator=gen).to(p.device) * 1e-3 for p in params]
    opt_times: dict[str, float] = {}
    impls = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    for name, kw in impls.items():
        try:
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, **kw)
        except (RuntimeError, TypeError, ValueError) as exc:
            opt_times[name] = float("nan")
            print(f"AdamW {name}: unavailable ({exc})", file=sys.stderr)
            continue
        reps = 30
        for i in range(reps + 3):
            if i == 3:
                sync()
                t = time.perf_counter()
            for p, gr in zip(params, grads):
                p.grad = gr
            opt.step()
        sync()
        opt_times[name] = (time.perf_counter() - t) / reps
        for p in params:
            p.grad = None
    n_params = sum(p.numel() for p in params)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    report = {"step_s": times, "step_s_median": med, "channels_last_speedup": med["contiguous"] / med["channels_last"],
              "adamw_step_s": opt_times, "lora_tensors": len(params), "lora_params": n_params}
    print(f"\nknobs | {args.model} | {args.resolution} px | batch {cfg.batch_size} | rank {args.rank} | {args.device}")
    for k, v in times.items():
        print(f"train step (loss + backward), UNet {k:<13}: " + ", ".join(f"{x:.2f}" for x in v) + f" s  (median {med[k]:.2f})")
    print(f"channels_last speed-up: {report['channels_last_speedup']:.3f}x")
    for k, v in opt_times.items():
        print(f"AdamW {k:<8} step over {len(params)} LoRA tensors ({n_params / 1e6:.2f} M params): {v * 1e3:.2f} ms")
    return report


# --- the driver -----------------------------------------------------------------------------------

def _default_model(args: argparse.Namespace) -> str:
    from facediffuser.sd.make_model import make_checkpoint

    dtype = "fp16" if args.size == "full" else "fp32"
    cache = Path(args.cache) / "models"
    for name in (f"sd15-{args.size}-seed0-{dtype}-layout1.safetensors", f"bench-sd15-{args.size}-seed0-{dtype}.safetensors"):
        if (cache / name).is_file():  # the test suite's copy, when it exists (same maker, same seed)
            return str(cache / name)
    path = cache / f"bench-sd15-{args.size}-seed0-{dtype}.safetensors"
    make_checkpoint(path, arch="sd15", size=args.size, dtype=dtype, seed=0)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Checkpoint (default: the SD1.5-shaped random model of --size, made once into --cache).")
    p.add_argument("--size", choices=("full", "tiny"), default="full", help="Model made when --model is not given.")
    p.add_argument("--cache", default=os.environ.get("FACEDIFFUSER_TEST_CACHE", ".cache/tests"), help="Where the made model is kept.")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="Timed steps per run.")
    p.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    p.add_argument("--images", type=int, default=0, help="Training images (default: max(8, 2 x batch)).")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (the trainer's --dataloader-workers).")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per run (OMP_NUM_THREADS and torch.set_num_threads; default: torch's choice). On a "
                        "shared machine 1 thread avoids OpenMP threads spinning while a sibling is descheduled, so that "
                        "'cpu s/step' measures the work and not the contention.")
    p.add_argument("--modes", default="cached,no_cache,ckpt")
    p.add_argument("--knobs", action="store_true", help="Measure channels_last and the AdamW implementations instead.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="Dense bf16 peak of the GPU (H100/H200 SXM: 989).")
    p.add_argument("--json", metavar="FILE", help="Also write the results as JSON.")
    p.add_argument("--one-mode", help=argparse.SUPPRESS)
    p.add_argument("--one-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step includes lazy initialisation)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.one_mode:
        _one(args)
        return 0
    if not args.model:
        args.model = _default_model(args)

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report = {"argv": sys.argv[1:], "date": started, "machine": _machine(), "model": args.model,
              "resolution": args.resolution, "rank": args.rank, "device": args.device,
              "mixed_precision": args.mixed_precision}
    flops = count_flops(args.model, args.resolution)
    report["flops_per_sample"] = flops
    if args.knobs:
        report["knobs"] = _knobs(args)
    else:
        report.update(_modes(args, flops))
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    m = report["machine"]
    print(f"machine: {m['cpu_model']} ({m['cpu_count']} CPUs, torch {m['torch']}, {m['torch_threads']} threads)"
          + (f", {m['gpu']}" if "gpu" in m else "") + f" | {started} .. {report['finished']}")
    print(f"forward GFLOP/sample at {args.resolution} px: UNet {flops['unet_forward'] / 1e9:.1f}, VAE encoder "
          f"{flops['vae_encoder'] / 1e9:.1f}, text encoder {flops['text_encoder'] / 1e9:.1f} "
          f"(attention: {flops['attention_processor']})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _modes(args: argparse.Namespace, flops: dict) -> dict:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fd-bench-") as work:
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            for mode in args.modes.split(","):
                cmd = [sys.executable, __file__, "--model", args.model, "--resolution", str(args.resolution), "--rank", str(args.rank),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device,
                       "--images", str(args.images), "--workers", str(args.workers), "--threads", str(args.threads),
                       "--mixed-precision", args.mixed_precision, "--one-mode", mode, "--one-batch", str(batch), "--workdir", work]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH ")), None)
                if proc.returncode or line is None:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"run {mode} batch {batch} failed (exit {proc.returncode})")
                rows.append(json.loads(line[6:]))
                r = rows[-1]
                print(f"  {mode:<9} batch {batch:>3}: {r['seconds_per_step']:.3f} s/step, {r['samples_per_s']:.4f} samples/s "
                      f"(load avg {r['loadavg_before']:.1f} -> {r['loadavg_after']:.1f})", file=sys.stderr, flush=True)
    useful = 2 * flops["unet_forward"]
    gpu = args.device == "cuda"
    by = {(r["mode"], r["batch"]): r for r in rows}
    print(f"\nmodel {args.model} | {args.resolution} px | rank {args.rank} | device {args.device} | precision {args.mixed_precision}")
    head = f"{'mode':<9} {'batch':>5} {'s/step':>8} {'cpu s/step':>10} {'samples/s':>10} {'load s':>7} {'data s':>7}"
    head += " peak GPU GB  %peak" if gpu else f" {'peak RSS GB':>11} {'loop RSS GB':>11}"
    print(head)
    for r in rows:
        line = (f"{r['mode']:<9} {r['batch']:>5} {r['seconds_per_step']:>8.3f} {r['cpu_seconds_per_step']:>10.3f} "
                f"{r['samples_per_s']:>10.4f} {r['load_s']:>7.1f} {r['data_s']:>7.1f}")
        if gpu:
            line += f" {r['peak_gpu_alloc_gb']:>11.2f} {100 * r['samples_per_s'] * useful / (args.peak_tflops * 1e12):>5.1f}%"
        else:
            line += f" {r['peak_rss_gb']:>11.2f} {r['loop_peak_rss_gb']:>11.2f}"
        print(line)
    ratios = {}
    for batch in sorted({r["batch"] for r in rows}):
        a = by.get(("cached", batch))
        for other in ("no_cache", "ckpt"):
            o = by.get((other, batch))
            if a and o:
                ratios[f"cached/{other}@{batch}"] = a["samples_per_s"] / o["samples_per_s"]
                ratios[f"cached/{other}@{batch} (cpu time)"] = o["cpu_seconds_per_step"] / a["cpu_seconds_per_step"]
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}x")
    return {"rows": rows, "ratios": ratios, "train_flops_per_sample": useful,
            "flops_assumption": "2 x FlopCounterMode UNet forward FLOPs at this resolution (forward + activation-gradient "
                                "backward on a frozen base; LoRA weight gradients neglected)",
            "peak_tflops": args.peak_tflops if gpu else None}


if __name__ == "__main__":
    sys.exit(main())
