"""The training loop on a tiny SD1.5-shaped model and a tiny synthetic dataset: it learns, it stops
cleanly on a bad loss or a cancel, and its pieces (data order, min-SNR, plots) do what they say."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from facediffuser.errors import UserError
from facediffuser.trainer.config import TrainConfig
from facediffuser.trainer import training_loop as tl
from facediffuser.trainer.training_loop import NonFiniteLoss, TrainCallbacks, train

COLOURS = [(220, 30, 30), (30, 170, 60), (40, 60, 220), (230, 200, 20), (150, 40, 180), (20, 180, 190)]
NAMES = ["red", "green", "blue", "yellow", "purple", "cyan"]


def make_shapes(folder: Path, n: int = 4, size: int = 64) -> Path:
    """``n`` coloured shapes on white, each with a caption file (the same bytes every time)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (255, 255, 255))
        d = ImageDraw.Draw(img)
        box = (6 + 3 * i, 8 + 2 * i, size - 8, size - 6 - 2 * i)
        (d.ellipse if i % 2 == 0 else d.rectangle)(box, fill=COLOURS[i % len(COLOURS)])
        img.save(folder / f"shape{i}.png")
        (folder / f"shape{i}.txt").write_text(f"a {NAMES[i % len(NAMES)]} {'circle' if i % 2 == 0 else 'square'}, shape")
    return folder


def tiny_config(ckpt: Path, data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model=str(ckpt), data=str(data), output=str(out), steps=4, resolution=64, rank=4, lr=1e-3, seed=7)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data")


@pytest.fixture(scope="module")
def tiny_ckpt(sd15_tiny_checkpoint, tmp_path_factory) -> Path:
    """A private copy of the session's tiny SD1.5 checkpoint (the shared cache is shared with
    other test runs; a copy cannot vanish under a long training test)."""
    import shutil

    return Path(shutil.copy2(sd15_tiny_checkpoint, tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors"))


# --- evaluation helpers: an independent path from the kohya file back into the UNet --------------

def merge_kohya_into_unet(unet: torch.nn.Module, lora_path: Path) -> int:
    """W += ΔW for every module of a kohya file (the way A1111/ComfyUI merge it). Returns how many."""
    from facediffuser.trainer.kohya_format import kohya_delta_weights, load_kohya_lora, parse_kohya_module_name

    tensors, _ = load_kohya_lora(lora_path)
    modules = dict(unet.named_modules())
    n = 0
    with torch.no_grad():
        for name, delta in kohya_delta_weights(tensors).items():
            part, path = parse_kohya_module_name(name)
            assert part == "unet", name
            w = modules[path].weight
            w += delta.reshape(w.shape).to(w.dtype)
            n += 1
    return n


def fixed_eval_loss(unet, components, latents: torch.Tensor, cond: torch.Tensor, seed: int = 123) -> float:
    """Epsilon MSE at fixed noise and fixed timesteps spread over the whole schedule."""
    sched = components.noise_scheduler
    g = torch.Generator().manual_seed(seed)
    losses = []
    with torch.no_grad():
        for t in (50, 200, 400, 600, 800, 950):
            noise = torch.randn(latents.shape, generator=g)
            ts = torch.full((latents.shape[0],), t, dtype=torch.long)
            pred = unet(sched.add_noise(latents, noise, ts), ts, cond).sample
            losses.append(torch.mean((pred - noise) ** 2).item())
    return sum(losses) / len(losses)


def eval_batch(config: TrainConfig, components):
    """Mean latents and cached text states of every training image (no augmentation)."""
    from facediffuser.trainer.caching import encode_text, tokenize
    from facediffuser.trainer.dataset import check_dataset, prepare_image

    scan = check_dataset(config)
    pixels = torch.stack([prepare_image(r.path, config.resolution) for r in scan.images])
    with torch.no_grad():
        latents = components.vae.encode(pixels).latent_dist.mean * components.vae.config.scaling_factor
        cond = encode_text(components.text_encoder, tokenize(components.tokenizer, scan.captions))
    return latents, cond


# --- the loss falls --------------------------------------------------------------------------------

def test_training_lowers_fixed_noise_loss_on_training_images(tiny_ckpt, shapes, tmp_path):
    from facediffuser.sd.model_loading import load_components

    cfg = tiny_config(tiny_ckpt, shapes, tmp_path / "out" / "face.safetensors", steps=40, lr=2e-3,
                      batch_size=2, rank=8, save_precision="fp32")
    steps_seen: list[tuple[int, int, float]] = []
    result = train(cfg, callbacks=TrainCallbacks(on_step=lambda s, t, l: steps_seen.append((s, t, l))))
    assert result.status == "finished" and result.output == cfg.output_path and cfg.output_path.is_file()
    assert result.steps == 40 and len(result.losses) == 40 and result.final_loss == result.losses[-1]
    assert [s for s, _, _ in steps_seen] == list(range(1, 41)) and {t for _, t, _ in steps_seen} == {40}
    assert all(math.isfinite(x) for x in result.losses)
    assert result.loss_plot == cfg.output_path.with_name("face.loss.png") and result.loss_plot.stat().st_size > 1000

    components = load_components(tiny_ckpt, dtype=torch.float32, device="cpu")
    latents, cond = eval_batch(cfg, components)
    before = fixed_eval_loss(components.unet, components, latents, cond)
    merged = merge_kohya_into_unet(components.unet, cfg.output_path)
    after = fixed_eval_loss(components.unet, components, latents, cond)
    print(f"fixed-noise eval loss: before {before:.4f}, after {after:.4f} ({after / before:.1%}), {merged} modules")
    assert merged > 0
    assert after < 0.85 * before, (before, after)  # measured: 1.37 -> 0.83 (61%)


# --- stopping --------------------------------------------------------------------------------------

def test_non_finite_loss_stops_keeps_last_good_checkpoint_and_writes_no_lora(tiny_ckpt, shapes, tmp_path, monkeypatch):
    real = tl._diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(tl, "_diffusion_loss", poisoned)
    cfg = tiny_config(tiny_ckpt, shapes, tmp_path / "out" / "face.safetensors", steps=8, save_every=2)
    with pytest.raises(NonFiniteLoss) as info:
        train(cfg)
    msg = str(info.value)
    assert "\n" not in msg and "nan" in msg and "step 5" in msg and "step-00000004" in msg and "--lr" in msg
    assert isinstance(info.value, UserError)
    assert not cfg.output_path.exists() and not list(cfg.output_path.parent.glob("*.tmp-*"))
    states = sorted(p.name for p in cfg.state_path.iterdir())
    assert states == ["step-00000002", "step-00000004"]  # nothing written after the bad step

    # The kept checkpoint is good: resuming from it (without the poison) finishes the run.
    monkeypatch.setattr(tl, "_diffusion_loss", real)
    cfg.resume = True
    result = train(cfg)
    assert result.status == "finished" and result.resumed_from == 4 and result.steps == 8
    assert cfg.output_path.is_file()


def test_absurd_learning_rate_is_caught_as_non_finite(tiny_ckpt, shapes, tmp_path):
    cfg = tiny_config(tiny_ckpt, shapes, tmp_path / "face.safetensors", steps=6, lr=1e30, max_grad_norm=0)
    with pytest.raises(NonFiniteLoss, match=r"the loss became (nan|inf)"):
        train(cfg)
    assert not cfg.output_path.exists()


def test_cancel_writes_no_lora_keeps_a_checkpoint_and_resumes(tiny_ckpt, shapes, tmp_path):
    cfg = tiny_config(tiny_ckpt, shapes, tmp_path / "out" / "face.safetensors", steps=6, save_every=0)
    done: list[int] = []
    cb = TrainCallbacks(on_step=lambda s, t, l: done.append(s), should_stop=lambda: len(done) >= 3)
    result = train(cfg, callbacks=cb)
    assert result.status == "cancelled" and result.output is None and result.steps == 3
    assert "cancelled at step 3/6" in result.summary() and "--resume" in result.summary()
    assert not cfg.output_path.exists() and not list(cfg.output_path.parent.glob("face.safetensors*"))
    assert result.checkpoint == cfg.state_path / "step-00000003" and result.checkpoint.is_dir()

    # A fresh (non-resume) run refuses to overwrite an unfinished run's state.
    cfg2 = tiny_config(tiny_ckpt, shapes, cfg.output_path)
    with pytest.raises(UserError, match="unfinished run.*--resume"):
        train(cfg2)

    cfg.resume = True
    result = train(cfg)
    assert result.status == "finished" and result.resumed_from == 3 and len(result.losses) == 6
    assert cfg.output_path.is_file()


def test_bad_data_fails_before_any_model_loads(tmp_path, monkeypatch):
    import facediffuser.sd.model_loading as ml

    monkeypatch.setattr(ml, "load_components", lambda *a, **k: pytest.fail("model loaded before the data check"))
    (tmp_path / "empty").mkdir()
    cfg = TrainConfig(model=str(tmp_path / "nope.safetensors"), data=str(tmp_path / "empty"),
                      output=str(tmp_path / "x.safetensors"), resolution=64)
    with pytest.raises(UserError, match="no images"):
        train(cfg)


def test_adamw8bit_without_bitsandbytes_names_the_package(monkeypatch):
    import builtins
    import sys

    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *a, **k)

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(builtins, "__import__", no_bnb)
    cfg = TrainConfig(model="m", data="d", output="o.safetensors", optimizer="adamw8bit")
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(UserError, match="bitsandbytes"):
        tl._make_optimizer(cfg, {"unet.x": p}, 10)


# --- pieces ----------------------------------------------------------------------------------------

def test_batch_order_is_seeded_covers_each_epoch_and_splits_ranks():
    a = tl._BatchOrder(5, 2, seed=3)
    b = tl._BatchOrder(5, 2, seed=3)
    stream = [x for m in range(10) for x in a.indices(m)]  # 20 samples = 4 epochs of 5
    assert stream == [x for m in range(10) for x in b.indices(m)]
    for e in range(4):
        assert sorted(i for ep, i in stream if ep == e) == list(range(5))
    assert stream != [x for m in range(10) for x in tl._BatchOrder(5, 2, seed=4).indices(m)]
    # two ranks take disjoint consecutive slices of the same stream
    r0, r1 = tl._BatchOrder(5, 2, seed=3, rank=0, world=2), tl._BatchOrder(5, 2, seed=3, rank=1, world=2)
    assert r0.indices(0) + r1.indices(0) + r0.indices(1) + r1.indices(1) == stream[:8]
    it = a.iterate(3)
    assert next(it) == a.indices(3) and next(it) == a.indices(4)


def test_total_steps_from_epochs():
    cfg = TrainConfig(model="m", data="d", output="o.safetensors", epochs=3, batch_size=2, grad_accum=2)
    assert tl._total_steps(cfg, 10, world=1) == math.ceil(3 * 10 / 4)
    assert tl._total_steps(cfg, 10, world=2) == math.ceil(3 * 10 / 8)
    cfg.epochs = None
    assert tl._total_steps(cfg, 10, world=2) == cfg.steps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_matches_the_paper(prediction_type):
    """Loss weight min(SNR, g)/SNR (epsilon) or min(SNR, g)/(SNR+1) (v), at low and high noise."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    zero_unet = SimpleNamespace(parameters=lambda: iter([torch.nn.Parameter(torch.zeros(1), requires_grad=False)]))

    class Unet(torch.nn.Module):
        def forward(self, x, t, c, return_dict=False):
            return (torch.zeros_like(x),)

    unet = Unet()
    unet.parameters = zero_unet.parameters
    models = SimpleNamespace(noise_scheduler=sched, unet=unet, vae=None)
    latents = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    batch = {"latents": latents, "encoder_hidden_states": torch.zeros(64, 2, 3), "face_mask": None}
    cfg = TrainConfig(model="m", data="d", output="o.safetensors")
    plain = tl._diffusion_loss(cfg, models, batch, torch.Generator().manual_seed(1), prediction_type, torch.device("cpu"))
    cfg.min_snr_gamma = 5.0
    g = torch.Generator().manual_seed(1)
    weighted = tl._diffusion_loss(cfg, models, batch, g, prediction_type, torch.device("cpu"))

    # recompute from the same draws
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    per = (target ** 2).mean(dim=(1, 2, 3))
    w = torch.minimum(snr, torch.tensor(5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    assert plain.item() == pytest.approx(per.mean().item(), rel=1e-5)
    assert weighted.item() == pytest.approx((per * w).mean().item(), rel=1e-4)
    assert t.max() > 900  # the full schedule is sampled (the seed project stopped at 500)


def test_face_weight_changes_the_loss_only_with_a_mask():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    class Unet(torch.nn.Module):
        def forward(self, x, t, c, return_dict=False):
            return (torch.zeros_like(x),)

    unet = Unet()
    unet.parameters = lambda: iter([torch.nn.Parameter(torch.zeros(1), requires_grad=False)])
    models = SimpleNamespace(noise_scheduler=DDPMScheduler(), unet=unet, vae=None)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1.0
    base = dict(latents=latents, encoder_hidden_states=torch.zeros(2, 2, 3))
    cfg = TrainConfig(model="m", data="d", output="o.safetensors", face_loss_weight=1.0)

    def loss(batch, cfg):
        return tl._diffusion_loss(cfg, models, batch, torch.Generator().manual_seed(5), "epsilon", torch.device("cpu")).item()

    plain = loss({**base, "face_mask": None}, cfg)
    assert loss({**base, "face_mask": mask}, cfg) == plain  # weight 1: exactly the plain loss
    cfg.face_loss_weight = 5.0
    assert loss({**base, "face_mask": None}, cfg) == plain  # no mask: plain loss
    assert loss({**base, "face_mask": mask}, cfg) != pytest.approx(plain, rel=1e-3)


def test_loss_curve_and_sample_grid_pngs(tmp_path):
    from PIL import Image

    from facediffuser.trainer.progress_plots import save_loss_curve, save_sample_grid, smooth

    p = save_loss_curve([1.0, 0.8, float("nan"), 0.5, 0.4], tmp_path / "a" / "x.loss.png")
    assert p.is_file() and Image.open(p).format == "PNG" and not list(p.parent.glob("*.tmp-*"))
    assert smooth([1.0, 1.0]) == pytest.approx([1.0, 1.0])  # bias-corrected: no pull towards 0
    imgs = [Image.new("RGB", (16, 16), c) for c in ("red", "green", "blue")]
    g = save_sample_grid(imgs, tmp_path / "s" / "step-000010.png", labels=["a", "b", "c"])
    grid = Image.open(g)
    assert grid.size == (32, 2 * (16 + 14))
    assert grid.getpixel((8, 14 + 8))[:3] == (255, 0, 0) and grid.getpixel((16 + 8, 14 + 8))[:3] == (0, 128, 0)


def test_sample_grids_are_written_and_do_not_change_training(tiny_ckpt, shapes, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n# a comment\na blue square\n")
    a = tiny_config(tiny_ckpt, shapes, tmp_path / "a" / "face.safetensors", steps=4, lora_dropout=0.1)
    b = tiny_config(tiny_ckpt, shapes, tmp_path / "b" / "face.safetensors", steps=4, lora_dropout=0.1,
                    sample_prompts=str(prompts), sample_every=2, sample_steps=2)
    got: list[tuple[int, Path]] = []
    ra = train(a)
    rb = train(b, callbacks=TrainCallbacks(on_sample=lambda s, p: got.append((s, p))))
    assert [s for s, _ in got] == [2, 4] and rb.samples == [p for _, p in got]
    assert all(p.is_file() and p.parent.name == "face.samples" for p in rb.samples)
    assert ra.losses == rb.losses  # sampling draws from its own generators


def test_init_lora_continues_from_an_existing_kohya_file(tiny_ckpt, shapes, tmp_path):
    """--init-lora loads the file's adapter (ranks, alphas and weights, text encoder too): with lr 0
    the continued run writes the same tensors back (a fresh adapter has zero lora_up and other
    random lora_down, so it could not); with lr > 0 it trains on from there."""
    from facediffuser.trainer.kohya_format import load_kohya_lora

    first = train(tiny_config(tiny_ckpt, shapes, tmp_path / "first.safetensors", steps=3, alpha=2.0,
                              train_text_encoder=True, lr=1e-2))
    src, src_meta = load_kohya_lora(first.output)
    assert any(float(v.abs().max()) > 0 for k, v in src.items() if k.endswith("lora_up.weight"))

    same = train(tiny_config(tiny_ckpt, shapes, tmp_path / "same.safetensors", steps=1, rank=8, alpha=None,
                             train_text_encoder=True, lr=0.0, init_lora=str(first.output)))
    copy, _ = load_kohya_lora(same.output)
    assert copy.keys() == src.keys()
    assert all(torch.equal(copy[k], src[k]) for k in src), "continuing at lr 0 must keep the file's weights"

    moved = train(tiny_config(tiny_ckpt, shapes, tmp_path / "moved.safetensors", steps=2, train_text_encoder=True,
                              lr=1e-2, init_lora=str(first.output)))
    after, meta = load_kohya_lora(moved.output)
    assert after.keys() == src.keys() and meta["ss_network_alpha"] == src_meta["ss_network_alpha"] == "2.0"
    assert any(not torch.equal(after[k], src[k]) for k in src if k.endswith(".weight"))


def test_init_lora_that_is_not_a_lora_is_a_one_line_error(tiny_ckpt, shapes, tmp_path):
    with pytest.raises(UserError, match=r"^tiny-sd15\.safetensors is not a kohya LoRA: it has no lora_unet_/lora_te_ keys "
                                        r"\(it looks like a full model checkpoint\)$"):
        train(tiny_config(tiny_ckpt, shapes, tmp_path / "x.safetensors", init_lora=str(tiny_ckpt)))
    assert not (tmp_path / "x.safetensors").exists()


def test_trains_on_a_folder_of_bmp_faces(tiny_ckpt, tmp_path):
    """The extension set is the one prep and the evaluation use: .bmp (and .tif) faces train."""
    from PIL import Image

    from facediffuser.fileio import file_sha256
    from facediffuser.trainer.kohya_format import IMAGE_DIGEST_HEX, load_kohya_lora, training_image_digests

    src = make_shapes(tmp_path / "png", n=3)
    data = tmp_path / "bmp"
    data.mkdir()
    for i, png in enumerate(sorted(src.glob("*.png"))):
        with Image.open(png) as im:
            im.save(data / f"face{i}.{'bmp' if i < 2 else 'tif'}")
    files = sorted(data.iterdir())
    result = train(tiny_config(tiny_ckpt, data, tmp_path / "out.safetensors", steps=1, batch_size=3))
    assert result.status == "finished" and result.output is not None
    _, meta = load_kohya_lora(result.output)
    assert training_image_digests(meta) == {file_sha256(f)[:IMAGE_DIGEST_HEX] for f in files}
