"""Where a training step's time goes, and what each speed change buys, measured in one process.

Three measurements on the same model (default: the full-size random SD1.5 file), batch 1, rank 4 =
alpha, kohya's 192 modules, fp32 unless asked:

``--ab``  interleaved A/B/C... of UNet forward + backward (the loss of ``_diffusion_loss``) on
          one model, so a change in the machine's load hits every variant alike:
            peft      peft's LoRA layers as they are (diffusers ``add_adapter``);
            lean      the same layers with :func:`facediffuser.trainer.lora_forward.lean_lora_forward`;
            base      the adapters disabled, input gradients on: the frozen UNet's own forward +
                      backward, i.e. what a LoRA step cannot go below (its overhead = peft - base);
            sdpa-math the lean path with SDPA forced to the math backend (vs torch's CPU flash kernel);
            bf16      the lean path under ``torch.autocast("cpu", bfloat16)`` with the frozen UNet
                      weights cast to bfloat16 in place at the end (so it runs last, on its own
                      rounds; the LoRA stays float32, as in the trainer);
``--overhead``  the per-step work outside the UNet, each part timed over many repetitions:
          noise + timesteps + ``add_noise``, ``clip_grad_norm_`` over the LoRA tensors, the fused
          AdamW step, ``zero_grad``, the loss read-back, tqdm's ``set_postfix``;
``--layers``    one LoRA Linear and one LoRA 1x1 conv per UNet level, peft vs the fused forward;
``--profile``   ``torch.profiler`` of one step of one variant: the top ops by self CPU time.

``--unet-peer DIR --sd-overlay DIR`` times sd-scripts' own UNet (``library/original_unet.py`` with
``--sdpa``) and its LoRA network (``networks/lora.py``, the same 192 modules) on the same weights
and input, in a subprocess under sd-scripts' pinned packages, alternating with ours.

  python bench/bench_step.py --ab --rounds 3 --json bench/results/step-ab-256.json
  python bench/bench_step.py --profile lean --resolution 256
  python bench/bench_step.py --unet-peer $BENCH_TMP/peers/sd-scripts --sd-overlay $BENCH_TMP/sd-overlay --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _setup(args: argparse.Namespace):
    import torch

    from facediffuser.trainer import training_loop as tl
    from facediffuser.trainer.config import TrainConfig

    cfg = TrainConfig(model=args.model, data="-", output="-.safetensors", rank=4, alpha=4, resolution=args.resolution,
                      batch_size=args.batch, seed=0)
    models = tl._load_models(cfg, torch.device("cpu"), torch.float32)
    named = tl._add_lora_adapters(cfg, models)
    models.unet.train()
    lat = args.resolution // 8
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(args.batch, 4, lat, lat, generator=g),
             "encoder_hidden_states": torch.randn(args.batch, 77, models.unet.config.cross_attention_dim, generator=g)}
    return cfg, models, named, batch


def _variant(name: str, models, stack: ExitStack):
    """Enter the variant's contexts on ``stack``."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from facediffuser.trainer.lora_forward import lean_lora_forward

    if name in ("lean", "sdpa-math", "bf16"):
        stack.enter_context(lean_lora_forward(models.unet))
    if name == "sdpa-math":
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    if name == "bf16":
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    if name == "base":
        models.unet.disable_adapters()
        stack.callback(models.unet.enable_adapters)


def _step(cfg, models, named, batch, name: str) -> float:
    import torch

    from facediffuser.trainer import training_loop as tl

    params = list(named.values())
    with ExitStack() as stack:
        _variant(name, models, stack)
        b = dict(batch)
        if name == "base":  # no trainable tensor: make the backward run through the whole UNet anyway
            b["latents"] = b["latents"].clone().requires_grad_(True)
        t = time.perf_counter()
        loss = tl._diffusion_loss(cfg, models, b, torch.Generator().manual_seed(1), "epsilon", torch.device("cpu"))
        loss.backward()
        dt = time.perf_counter() - t
    for p in params:
        p.grad = None
    return dt


def _ab(args: argparse.Namespace) -> dict:
    import torch

    cfg, models, named, batch = _setup(args)
    variants = [v for v in args.variants.split(",") if v]
    fp32 = [v for v in variants if v != "bf16"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    loads = []
    for v in fp32:
        _step(cfg, models, named, batch, v)  # one untimed warm-up each
    import resource

    faults: dict[str, list[int]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = fp32 if r % 2 == 0 else fp32[::-1]
        for v in order:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times[v].append(_step(cfg, models, named, batch, v))
            faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        loads.append(os.getloadavg()[0])
        print(f"round {r}: " + ", ".join(f"{v} {times[v][-1]:.3f}" for v in fp32) + f" (load {loads[-1]:.1f})", file=sys.stderr, flush=True)
    if "bf16" in variants:
        for p in models.unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        _step(cfg, models, named, batch, "bf16")
        for _ in range(args.rounds):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times["bf16"].append(_step(cfg, models, named, batch, "bf16"))
            faults["bf16"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        print("bf16: " + ", ".join(f"{x:.3f}" for x in times["bf16"]), file=sys.stderr)
    med = {v: statistics.median(x) for v, x in times.items() if x}
    ref = med.get("peft")
    print(f"\nUNet forward+backward, {args.resolution} px, batch {args.batch}, rank 4, {torch.get_num_threads()} threads, "
          f"{args.rounds} interleaved rounds")
    for v, m in med.items():
        extra = f"  ({ref / m:.3f}x vs peft)" if ref and v != "peft" else ""
        print(f"  {v:<10} median {m:.3f} s  [{', '.join(f'{x:.2f}' for x in times[v])}]{extra}  "
              f"minor page faults/step {statistics.median(faults[v]) if faults[v] else 0:.0f}")
    if "base" in med and ref:
        print(f"  LoRA overhead (peft - base): {ref - med['base']:.3f} s = {100 * (ref - med['base']) / ref:.1f} % of the step; "
              f"lean - base: {med.get('lean', float('nan')) - med['base']:.3f} s")
    return {"times": times, "median": med, "minor_faults": faults, "loadavg": loads}


def _compile_ab(args: argparse.Namespace) -> dict:
    """torch.compile (inductor) of the UNet vs eager (lean LoRA forward), same model, same inputs:
    the first compiled call's time (compile + one step; cold or warm inductor cache, as the
    environment has it), then interleaved steady-state steps, and the loss of each path."""
    import torch

    from facediffuser.trainer import training_loop as tl
    from facediffuser.trainer.lora_forward import lean_lora_forward

    cfg, models, named, batch = _setup(args)
    params = list(named.values())
    eager_unet = models.unet

    def step(use_compiled: bool) -> tuple[float, float]:
        with (nullcontext() if use_compiled else lean_lora_forward(eager_unet)):
            models.unet = compiled if use_compiled else eager_unet
            t = time.perf_counter()
            loss = tl._diffusion_loss(cfg, models, batch, torch.Generator().manual_seed(1), "epsilon", torch.device("cpu"))
            loss.backward()
            dt = time.perf_counter() - t
            models.unet = eager_unet
        for p in params:
            p.grad = None
        return dt, float(loss)

    compiled = None
    step(False)
    compiled = torch.compile(eager_unet, mode=args.compile_mode)
    first, loss_c = step(True)
    print(f"compile + first step: {first:.1f} s", file=sys.stderr, flush=True)
    times: dict[str, list[float]] = {"eager-lean": [], "compiled": []}
    losses: dict[str, float] = {}
    for r in range(args.rounds):
        for name in (("eager-lean", "compiled") if r % 2 == 0 else ("compiled", "eager-lean")):
            dt, losses[name] = step(name == "compiled")
            times[name].append(dt)
        print(f"round {r}: eager {times['eager-lean'][-1]:.3f}, compiled {times['compiled'][-1]:.3f} (load {os.getloadavg()[0]:.1f})",
              file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    gain = med["eager-lean"] - med["compiled"]
    print(f"\ntorch.compile ({args.compile_mode}), {args.resolution} px: first call {first:.1f} s; steady state eager "
          f"{med['eager-lean']:.3f} s vs compiled {med['compiled']:.3f} s ({med['eager-lean'] / med['compiled']:.3f}x); "
          f"loss eager {losses['eager-lean']:.6f} compiled {losses['compiled']:.6f}; "
          + (f"break-even after {(first - med['compiled']) / gain:.0f} steps" if gain > 0 else "never breaks even"))
    return {"first_call_s": first, "times": times, "median": med, "losses": losses, "mode": args.compile_mode,
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}


def _layers(args: argparse.Namespace) -> dict:
    """One peft LoRA Linear and one LoRA 1x1 conv of SD1.5's shapes at each UNet level (channels x
    tokens at ``--resolution``), forward + backward, peft vs the fused forward, interleaved: where
    the fused path gains and where it does not (the base layer's own cost is inside both)."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    from facediffuser.trainer.lora_forward import lean_lora_forward

    class Pair(torch.nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.lin, self.conv = torch.nn.Linear(c, c), torch.nn.Conv2d(c, c, 1)

        def forward(self, x, y, kind):
            return self.lin(x).square().mean() if kind == "linear" else self.conv(y).square().mean()

    lat = args.resolution // 8
    out = {}
    for c, side in ((320, lat), (640, lat // 2), (1280, lat // 4)):
        torch.manual_seed(0)
        m = Pair(c).requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["lin", "conv"]), m)
        x, y = torch.randn(args.batch, side * side, c), torch.randn(args.batch, c, side, side)
        for kind in ("linear", "conv1x1"):
            t: dict[str, list[float]] = {"peft": [], "lean": []}
            for r in range(args.reps):
                for v in (("peft", "lean") if r % 2 == 0 else ("lean", "peft")):
                    with (lean_lora_forward(m) if v == "lean" else nullcontext()):
                        t0 = time.perf_counter()
                        m(x, y, kind).backward()
                        t[v].append(time.perf_counter() - t0)
                    for p_ in m.parameters():
                        p_.grad = None
            mp, ml = statistics.median(t["peft"][2:]), statistics.median(t["lean"][2:])
            key = f"{kind} c={c} tokens={side * side}"
            out[key] = {"peft_s": mp, "lean_s": ml, "peft_over_lean": mp / ml, "loadavg": os.getloadavg()[0]}
            print(f"  {key:<28} peft {mp * 1e3:7.2f} ms  lean {ml * 1e3:7.2f} ms  {mp / ml:.3f}x  (load {os.getloadavg()[0]:.1f})")
    return out


def _overhead(args: argparse.Namespace) -> dict:
    """The per-step work besides the UNet, each timed alone (median of ``reps``)."""
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from facediffuser.trainer import training_loop as tl

    cfg, models, named, batch = _setup(args)
    params = list(named.values())
    opt, _ = tl._make_optimizer(cfg, named, 100)
    acc = Accelerator(cpu=True)
    gen = torch.Generator().manual_seed(0)
    sched = models.noise_scheduler
    lat = batch["latents"]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    bar = tqdm(total=10**9, disable=False, file=open(os.devnull, "w"))
    loss = torch.tensor(0.123)

    def noise():
        n = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, 1000, (lat.shape[0],), generator=gen)
        return sched.add_noise(lat, n, t)

    parts = {
        "noise+timesteps+add_noise": noise,
        "clip_grad_norm_": lambda: acc.clip_grad_norm_(params, 1.0),
        "AdamW step (fused)": opt.step,
        "loss gather + float()": lambda: float(acc.gather(loss.detach().reshape(1)).mean()),
        "tqdm update + set_postfix": lambda: (bar.update(1), bar.set_postfix(loss="0.1234", lr="1.00e-04")),
    }
    out = {}
    for name, fn in parts.items():
        for _ in range(3):
            fn()
        ts = []
        for _ in range(args.reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        out[name] = statistics.median(ts)
    ts = []
    for _ in range(args.reps):  # zero_grad needs grads to clear
        for p in params:
            p.grad = torch.zeros_like(p)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        ts.append(time.perf_counter() - t)
    out["zero_grad(set_to_none)"] = statistics.median(ts)
    print(f"\nper-step work outside the UNet ({len(params)} LoRA tensors, {sum(p.numel() for p in params) / 1e6:.2f} M params), "
          f"median of {args.reps}:")
    for k, v in out.items():
        print(f"  {k:<28} {v * 1e3:8.3f} ms")
    print(f"  total {sum(out.values()) * 1e3:.2f} ms")
    return out


def _profile(args: argparse.Namespace) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cfg, models, named, batch = _setup(args)
    _step(cfg, models, named, batch, args.profile)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dt = _step(cfg, models, named, batch, args.profile)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    print(f"\nprofile of one '{args.profile}' step ({dt:.2f} s with the profiler on):\n{table}")
    rows = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]]
    return {"variant": args.profile, "step_s_profiled": dt, "top": rows}


# --- UNet alone: ours vs sd-scripts' on the same weights ------------------------------------------

def _unet_child(args: argparse.Namespace) -> None:
    """K timed forward+backward passes of one UNet implementation; prints a JSON line."""
    import torch

    torch.manual_seed(0)
    lat = args.resolution // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, lat, lat, generator=g)
    c = torch.randn(args.batch, 77, 768, generator=g)
    t = torch.tensor([500] * args.batch)
    target = torch.randn(x.shape, generator=g)
    if args.unet_child == "sd-scripts":
        sys.path.insert(0, args.unet_peer)
        from library import model_util, train_util  # type: ignore[import-not-found]
        import networks.lora as kohya_lora  # type: ignore[import-not-found]

        te, vae, unet = model_util.load_models_from_stable_diffusion_checkpoint(False, args.model, "cpu", torch.float32)
        train_util.replace_unet_modules(unet, False, False, True)  # --sdpa
        unet.requires_grad_(False)
        net = kohya_lora.create_network(1.0, 4, 4, vae, te, unet)
        net.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
        params = [p for p in net.parameters() if p.requires_grad]
        modules = len(net.unet_loras)
        unet.to(torch.float32).train()
        fwd = lambda: unet(x, t, c).sample  # noqa: E731
    else:
        from facediffuser.trainer import training_loop as tl
        from facediffuser.trainer.config import TrainConfig
        from facediffuser.trainer.lora_forward import lean_lora_forward

        cfg = TrainConfig(model=args.model, data="-", output="-.safetensors", rank=4, alpha=4, seed=0)
        models = tl._load_models(cfg, torch.device("cpu"), torch.float32)
        named = tl._add_lora_adapters(cfg, models)
        params = list(named.values())
        modules = len(params) // 2
        unet = models.unet.train()
        stack = ExitStack()
        if args.unet_child == "ours-lean":
            stack.enter_context(lean_lora_forward(unet))
        fwd = lambda: unet(x, t, c, return_dict=False)[0]  # noqa: E731
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        torch.nn.functional.mse_loss(fwd().float(), target).backward()
        for p in params:
            p.grad = None
        if i:
            times.append(time.perf_counter() - t0)
    print("UNET " + json.dumps({"impl": args.unet_child, "times": times, "lora_modules": modules,
                                "lora_params": sum(p.numel() for p in params), "loadavg": os.getloadavg()[0]}), flush=True)


def _unet_peer(args: argparse.Namespace) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results: dict[str, list[float]] = {}
    meta = {}
    for r in range(args.rounds):
        for impl in ("ours-peft", "ours-lean", "sd-scripts"):
            e = dict(env)
            if impl == "sd-scripts":
                e["PYTHONPATH"] = os.pathsep.join([str(Path(args.sd_overlay).resolve()), env.get("PYTHONPATH", "")])
            cmd = [sys.executable, __file__, "--unet-child", impl, "--model", args.model, "--resolution", str(args.resolution),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
            if args.unet_peer:
                cmd += ["--unet-peer", args.unet_peer]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=e)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("UNET ")), None)
            if proc.returncode or line is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"UNet run {impl} failed (exit {proc.returncode})")
            res = json.loads(line[5:])
            results.setdefault(impl, []).extend(res["times"])
            meta[impl] = {"lora_modules": res["lora_modules"], "lora_params": res["lora_params"]}
            print(f"round {r} {impl}: {', '.join(f'{x:.2f}' for x in res['times'])} s (load {res['loadavg']:.1f})",
                  file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nUNet forward+backward alone, same weights and input, {args.resolution} px, batch {args.batch}:")
    for k, v in med.items():
        print(f"  {k:<11} median {v:.3f} s over {len(results[k])} passes, {meta[k]['lora_modules']} LoRA modules, "
              f"{meta[k]['lora_params']} params" + (f"  ({v / med['sd-scripts']:.3f}x sd-scripts)" if k != "sd-scripts" else ""))
    return {"times": results, "median": med, "meta": meta}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="default: the full-size random SD1.5 file in --cache")
    p.add_argument("--cache", default=os.environ.get("FACEDIFFUSER_TEST_CACHE", ".cache/tests"))
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ab", action="store_true")
    p.add_argument("--variants", default="peft,lean,base,sdpa-math,bf16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--overhead", action="store_true")
    p.add_argument("--layers", action="store_true", help="peft vs the fused forward per layer shape (see _layers); uses --reps.")
    p.add_argument("--compile", action="store_true", help="torch.compile of the UNet vs eager (see _compile_ab).")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--profile", metavar="VARIANT")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--unet-peer", metavar="SD_SCRIPTS_DIR")
    p.add_argument("--sd-overlay", metavar="DIR")
    p.add_argument("--steps", type=int, default=3, help="timed passes per UNet process")
    p.add_argument("--unet-child", help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.model:
        from bench_peers import _default_model

        args.model = _default_model(args)
    if args.unet_child:
        _unet_child(args)
        return 0
    report = {"argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "model": args.model,
              "resolution": args.resolution, "batch": args.batch, "threads": torch.get_num_threads(),
              "loadavg_start": os.getloadavg()}
    if args.ab:
        report["ab"] = _ab(args)
    if args.compile:
        report["compile"] = _compile_ab(args)
    if args.overhead:
        report["overhead_s"] = _overhead(args)
    if args.layers:
        report["layers"] = _layers(args)
    if args.profile:
        report["profile"] = _profile(args)
    if args.unet_peer:
        if not args.sd_overlay:
            p.error("--unet-peer needs --sd-overlay")
        report["unet_peer"] = _unet_peer(args)
    report["loadavg_end"] = os.getloadavg()
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
