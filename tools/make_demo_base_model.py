"""Train the demo's base model once: a tiny SD1.5-shaped text-to-image model that draws toy scenes.

Why: ``facediffuser demo`` trains a face LoRA and shows base | fine-tuned samples side by side. For
that picture to mean something the base model must draw *something that is not a face*. This
script trains one, from scratch, on captioned, procedurally drawn scenes (``demo/toy_scenes.py``:
houses, trees, mountains, boats, flowers, shapes — never a face) and writes the UNet and VAE, fp16,
to ``demo/model_files/demo_base_model.safetensors`` (shipped as package data, see
``demo/demo_model.py`` for what is in it and why).

Recipe (all seeded; the defaults are what made the shipped file):

1. ``--images`` scenes at 64 px (scene seed ``--seed``), the last ``--heldout`` kept for checks.
2. VAE (``AutoencoderKL``, 3 levels, 4x downsampling): ``--vae-steps`` AdamW steps, batch
   ``--vae-batch``, one-cycle learning rate, loss L1 + L2 + 1e-6 KL. Then each latent channel is
   standardised (shift and scale folded into ``quant_conv`` / ``post_quant_conv``) so that SD1.5's
   ``scaling_factor`` gives unit variance.
3. UNet (make-model's tiny SD1.5 UNet): ``--unet-steps`` AdamW steps, batch ``--unet-batch``, SD1.5
   DDPM schedule, epsilon loss with Min-SNR-5 weighting, 10 % caption dropout, EMA of the weights
   (exported), conditioned on the frozen random tiny text encoder the demo rebuilds from its seed.
   The model is trained through the same loader the demo and the trainer use (a provisional
   checkpoint is written with :func:`demo_model.make_demo_checkpoint` and loaded back).
4. Checks written into the file's metadata: VAE PSNR on held-out scenes and on toy faces.

Time (2 CPU cores, ``OMP_NUM_THREADS=2``): see ``TIME_NOTE`` below (also recorded in the file).
Same seed, same torch build and thread count -> same bytes (CPU kernels are deterministic here);
other builds give a different but equivalent model.

Usage (from the repository root)::

    OMP_NUM_THREADS=2 python tools/make_demo_base_model.py [--out FILE] [--preview PNG]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TIME_NOTE = ("measured 2026-12-08 on the shared 2-core box, 2 threads, load 2.0: drawing 6000 scenes 3 s; "
             "VAE 1000 steps (batch 32 of 32 px crops) 330 s (a pip install ran beside its first 2 minutes); "
             "UNet (attention at 8x8) 5000 steps at batch 16 992 s (0.20 s/step); 22 min in all")
CHECK_SEED = 99  # scenes and faces the VAE is checked on (never trained on)
CHECK_IMAGES = 64

ROOT = Path(__file__).resolve().parent.parent


def _import_package():
    """``facediffuser`` from this checkout (the repository root is the package)."""
    try:
        import facediffuser  # noqa: F401
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("facediffuser", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["facediffuser"] = module
        spec.loader.exec_module(module)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "demo" / "model_files" / "demo_base_model.safetensors"), help="output file")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the training (default: %(default)s)")
    p.add_argument("--scene-seed", type=int, default=1, help="seed of the training scenes (default: %(default)s)")
    p.add_argument("--images", type=int, default=6000, help="training scenes drawn (default: %(default)s)")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-crop", type=int, default=32, help="random square crop the VAE trains on (default: %(default)s px)")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--unet-images", type=int, default=1200, help="of the scenes, the first N the UNet trains on")
    p.add_argument("--unet-steps", type=int, default=5000)
    p.add_argument("--unet-batch", type=int, default=16)
    p.add_argument("--unet-lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--snapshot-every", type=int, default=1000,
                   help="also write the file every N UNet steps, recorded as that many steps (the learning rate is "
                        "constant after warm-up, so a snapshot at step k equals a run with --unet-steps k)")
    p.add_argument("--vae", help="reuse this VAE (a .pt state dict saved by --save-vae) instead of training one")
    p.add_argument("--save-vae", help="also save the trained VAE state dict here (to iterate on the UNet)")
    p.add_argument("--preview", help="write a sample grid (scene and face prompts) here")
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, flush=True)


def scene_batch(n: int, seed: int, start: int = 0):
    """Scenes as float NCHW in [-1, 1] and their captions."""
    import torch

    from facediffuser.demo.toy_scenes import toy_scene_array

    arr, captions = toy_scene_array(n, seed=seed, start=start)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1, captions


def train_vae(images, *, steps: int, batch: int, crop: int, lr: float, seed: int, log_every: int):
    """AutoencoderKL on random ``crop`` px crops (it is fully convolutional; crops are cheaper)."""
    import torch
    from diffusers import AutoencoderKL

    from facediffuser.demo.demo_model import demo_vae_config

    torch.manual_seed(seed)
    cfg = demo_vae_config()
    vae = AutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    opt = torch.optim.AdamW(vae.parameters(), lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    size = images.shape[-1]
    vae.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        ox, oy = torch.randint(0, size - crop + 1, (2,), generator=g).tolist()
        x = images[idx][:, :, oy:oy + crop, ox:ox + crop]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    return vae.eval().requires_grad_(False)


def encode_all(vae, images, chunk: int = 200):
    """Posterior means and stds of ``images`` (float NCHW in [-1, 1])."""
    import torch

    with torch.no_grad():
        post = [vae.encode(images[i:i + chunk]).latent_dist for i in range(0, len(images), chunk)]
    return torch.cat([d.mean for d in post]), torch.cat([d.std for d in post])


def standardise_latents(vae, means, scaling_factor: float) -> tuple[dict, "torch.Tensor", "torch.Tensor"]:  # noqa: F821
    """Fold a per-channel shift/scale into quant_conv and post_quant_conv so that
    ``scaling_factor * latent`` has mean 0 and std 1 per channel on the latents ``means``.
    Returns the statistics and ``(k, m)``: new latent = k * (old latent - m)."""
    import torch

    with torch.no_grad():
        m = means.mean((0, 2, 3)).double()
        s = means.std((0, 2, 3)).double()
        k = 1.0 / (scaling_factor * s)  # new mean = k * (old mean - m)
        c = len(m)
        qw, qb = vae.quant_conv.weight.double(), vae.quant_conv.bias.double()
        qw[:c] *= k.view(-1, 1, 1, 1)
        qb[:c] = k * (qb[:c] - m)
        qb[c:] += 2 * torch.log(k)  # logvar of the scaled latent
        pw, pb = vae.post_quant_conv.weight.double(), vae.post_quant_conv.bias.double()
        pb = pb + (pw[:, :, 0, 0] @ m)
        pw = pw / k.view(1, -1, 1, 1)
        vae.quant_conv.weight.copy_(qw)
        vae.quant_conv.bias.copy_(qb)
        vae.post_quant_conv.weight.copy_(pw)
        vae.post_quant_conv.bias.copy_(pb)
    stats = {"latent_mean_before": [round(float(v), 4) for v in m], "latent_std_before": [round(float(v), 4) for v in s]}
    return stats, k.float().view(1, -1, 1, 1), m.float().view(1, -1, 1, 1)


def psnr(vae, images) -> float:
    """Mean PSNR (dB, images in [-1, 1]) of decode(encode(x).mean)."""
    import torch

    with torch.no_grad():
        rec = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    mse = ((rec - images) / 2).pow(2).mean((1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def train_unet(components, latents_mean, latents_std, caption_ids, hidden, *, steps: int, batch: int, lr: float,
               ema_decay: float, seed: int, log_every: int, snapshot=None, snapshot_every: int = 0,
               caption_dropout: float = 0.1, min_snr_gamma: float = 5.0, warmup: int = 50):
    """Full training of ``components.unet``; returns the EMA weights.

    The learning rate is constant after ``warmup`` steps and nothing depends on ``steps``, so
    ``snapshot(k, ema_state)`` at step k gets exactly what a run of k steps returns."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    unet, sched = components.unet, components.noise_scheduler
    unet.set_attn_processor(AttnProcessor())  # plain attention: CPU SDPA is slow at these tiny head sizes
    unet.requires_grad_(True).train()
    names = [n for n, _ in unet.named_parameters()]
    params = [p for _, p in unet.named_parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr, weight_decay=1e-2)
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ac = sched.alphas_cumprod.double()
    snr = ac / (1 - ac)
    g = torch.Generator().manual_seed(seed + 1)
    empty = hidden[-1]  # the last row is the empty caption
    sf = float(components.vae.config.scaling_factor)

    def ema_state():
        state = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        state.update({n: e.clone() for n, e in zip(names, ema)})
        return state

    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(latents_mean), (batch,), generator=g)
        z = (latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=g)) * sf
        cond = hidden[caption_ids[idx]]
        drop = torch.rand(batch, generator=g) < caption_dropout
        cond = torch.where(drop.view(-1, 1, 1), empty.expand_as(cond), cond)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        noisy = sched.add_noise(z, noise, t)
        pred = unet(noisy, t, cond).sample
        w = (snr[t].clamp(max=min_snr_gamma) / snr[t]).float()
        loss = (w * (pred - noise).pow(2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lrs.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - d)
        if step % log_every == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} lr {lrs.get_last_lr()[0]:.2e} ({time.perf_counter() - t0:.0f}s)")
        if snapshot is not None and snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            snapshot(step + 1, ema_state(), time.perf_counter() - t0)
    unet.requires_grad_(False).eval()
    return ema_state()


def write_preview(checkpoint: Path, path: Path, captions: list[str]) -> None:
    """Samples for scene captions and for face prompts, through the demo's generation code."""
    from facediffuser.evaluation.generation import SamplerSettings, generate, load_generation_pipeline
    from facediffuser.trainer.progress_plots import save_sample_grid

    pipe = load_generation_pipeline(checkpoint, sampler="ddim", device="cpu")
    faces = ["a photo of a face, brown hair, smiling", "a photo of a face, black hair, neutral expression"]
    prompts = captions[:6] + faces
    images, labels = [], []
    for cfg in (1.0, 4.0):
        out = generate(pipe, prompts, SamplerSettings(steps=20, cfg=cfg, size=64, seed=0), len(prompts), batch_size=8)
        images += [im.resize((128, 128)) for im in out]
        labels += [f"cfg{cfg:g} {p[:18]}" for p in prompts]
    save_sample_grid(images, path, labels=labels, cols=len(prompts))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _import_package()
    import tempfile

    import torch

    from facediffuser.demo.demo_model import demo_unet_config, demo_vae_config, make_demo_checkpoint, write_base_file
    from facediffuser.demo.toy_faces import toy_face_array
    from facediffuser.sd.model_loading import load_components
    from facediffuser.trainer.caching import encode_text, tokenize

    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    images, captions = scene_batch(args.images, args.scene_seed)
    held_x, _ = scene_batch(CHECK_IMAGES, CHECK_SEED)  # held out by seed, not by index
    faces = torch.from_numpy(toy_face_array(CHECK_IMAGES, seed=CHECK_SEED)).permute(0, 3, 1, 2).float() / 127.5 - 1
    log(f"{len(images)} scenes drawn ({time.perf_counter() - t_start:.0f}s, {threads} threads)")

    t = time.perf_counter()
    if args.vae:
        from diffusers import AutoencoderKL

        cfg = demo_vae_config()
        vae = AutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        vae.load_state_dict(torch.load(args.vae, weights_only=True))
        vae.eval().requires_grad_(False)
    else:
        vae = train_vae(images, steps=args.vae_steps, batch=args.vae_batch, crop=args.vae_crop, lr=args.vae_lr,
                        seed=args.seed, log_every=args.log_every)
        if args.save_vae:
            torch.save(vae.state_dict(), args.save_vae)
    vae_seconds = time.perf_counter() - t
    unet_x, unet_c = images[: args.unet_images], captions[: args.unet_images]
    lat_mean, lat_std = encode_all(vae, unet_x)
    stats, k, m = standardise_latents(vae, lat_mean, float(vae.config.scaling_factor))
    lat_mean, lat_std = k * (lat_mean - m), k * lat_std  # what the standardised VAE encodes
    checks = {"vae_psnr_heldout_scenes_db": round(psnr(vae, held_x), 2), "vae_psnr_toy_faces_db": round(psnr(vae, faces), 2)}
    log(f"VAE ready ({vae_seconds:.0f}s), latents encoded ({time.perf_counter() - t_start:.0f}s): {checks}")

    torch.manual_seed(args.seed)
    from diffusers import UNet2DConditionModel

    ucfg = demo_unet_config()
    unet0 = UNet2DConditionModel.from_config({k: v for k, v in ucfg.items() if not k.startswith("_")})
    recipe = {"seed": args.seed, "scene_seed": args.scene_seed, "images": args.images, "vae_steps": args.vae_steps,
              "vae_batch": args.vae_batch, "vae_crop": args.vae_crop, "vae_lr": args.vae_lr,
              "unet_images": args.unet_images, "unet_steps": args.unet_steps, "unet_batch": args.unet_batch,
              "unet_lr": args.unet_lr, "ema": args.ema, "torch": torch.__version__, "threads": threads, **stats, **checks}
    with tempfile.TemporaryDirectory() as tmp:
        base0 = write_base_file(unet0.state_dict(), vae.state_dict(), Path(tmp) / "base0.safetensors", recipe)
        comps = load_components(make_demo_checkpoint(Path(tmp) / "ckpt0.safetensors", base=base0))
    comps.unet.load_state_dict(unet0.state_dict())  # fp32 initial weights, not the fp16-rounded file's
    with torch.no_grad():
        uniq = sorted(set(unet_c))
        ids = {c: i for i, c in enumerate(uniq)}
        hidden = torch.cat([encode_text(comps.text_encoder, tokenize(comps.tokenizer, uniq[i:i + 256]))
                            for i in range(0, len(uniq), 256)] + [encode_text(comps.text_encoder, tokenize(comps.tokenizer, [""]))])
    caption_ids = torch.tensor([ids[c] for c in unet_c])
    vae_sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    log(f"{len(uniq)} distinct captions; scaled latent std {float(lat_mean.std() * vae.config.scaling_factor):.3f}")

    def write(steps: int, unet_sd, unet_seconds: float) -> Path:
        total = time.perf_counter() - t_start
        rec = dict(recipe, unet_steps=steps, vae_seconds=round(vae_seconds), unet_seconds=round(unet_seconds),
                   total_seconds=round(total))
        out = write_base_file(unet_sd, vae_sd, args.out, rec)
        log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) at unet step {steps}, {total:.0f}s: {json.dumps(rec)}")
        return out

    t = time.perf_counter()
    unet_sd = train_unet(comps, lat_mean, lat_std, caption_ids, hidden, steps=args.unet_steps, batch=args.unet_batch,
                         lr=args.unet_lr, ema_decay=args.ema, seed=args.seed, log_every=args.log_every,
                         snapshot=write, snapshot_every=args.snapshot_every)
    out = write(args.unet_steps, unet_sd, time.perf_counter() - t)
    if args.preview:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = make_demo_checkpoint(Path(tmp) / "ckpt.safetensors", base=out)
            _, held_c = toy_scene_array_captions(CHECK_SEED)
            write_preview(ckpt, Path(args.preview), held_c)
        log(f"preview: {args.preview}")
    return 0


def toy_scene_array_captions(seed: int, n: int = 6):
    from facediffuser.demo.toy_scenes import toy_scene_array

    return toy_scene_array(n, seed=seed)


if __name__ == "__main__":
    sys.exit(main())
