"""Held-out validation loss: which images are held out (and kept out of training and its digests),
the number itself against an independent computation on the base model, that computing it leaves
the training trajectory untouched, the curve in the plot, and --keep-best-validation's file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facediffuser.errors import UserError
from facediffuser.trainer import kohya_format as kf
from facediffuser.trainer import validation as val
from facediffuser.trainer.config import TrainConfig
from facediffuser.trainer.training_loop import train
from test_training_loop import make_shapes, tiny_config


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data", n=5)


@pytest.fixture(scope="module")
def held_folder(tmp_path_factory) -> Path:
    """Two other images (different bytes from every training image) with captions."""
    d = tmp_path_factory.mktemp("held") / "val"
    make_shapes(d, n=6)
    for i in range(4):  # keep shape4/shape5 only; then shift their pixels so no file equals a training one
        (d / f"shape{i}.png").unlink()
        (d / f"shape{i}.txt").unlink()
    for p in d.glob("*.png"):
        a = np.asarray(Image.open(p)).copy()
        a[:4] = 0
        Image.fromarray(a).save(p)
    return d


@pytest.fixture(scope="module")
def tiny_ckpt(sd15_tiny_checkpoint, tmp_path_factory) -> Path:
    return Path(shutil.copy2(sd15_tiny_checkpoint, tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors"))


# --- the split ----------------------------------------------------------------------------------------

def test_split_is_seeded_by_content_and_stable_when_images_are_added():
    shas = [f"{i:064x}" for i in range(20)]
    a = val.held_out_indices(shas, 0.2, seed=0)
    assert len(a) == 4 and a == val.held_out_indices(shas, 0.2, seed=0)
    assert a != val.held_out_indices(shas, 0.2, seed=1)
    # order-independent: the same images held out whatever order they are listed in
    rev = list(reversed(shas))
    assert {rev[i] for i in val.held_out_indices(rev, 0.2, seed=0)} == {shas[i] for i in a}
    assert len(val.held_out_indices(shas[:3], 0.01, 0)) == 1 and len(val.held_out_indices(shas[:3], 0.9, 0)) == 2
    with pytest.raises(UserError, match="at least 2 images"):
        val.held_out_indices(shas[:1], 0.5, 0)


def test_validation_settings_errors(tmp_path):
    base = dict(model="m", data=str(tmp_path), output="o.safetensors")
    with pytest.raises(UserError, match="either --validation-split or --validation-data"):
        TrainConfig(**base, validation_split=0.2, validation_data="v").validate()
    with pytest.raises(UserError, match="is the training folder"):
        TrainConfig(**base, validation_data=str(tmp_path)).validate()
    with pytest.raises(UserError, match="--keep-best-validation needs a validation set"):
        TrainConfig(**base, keep_best_validation=True).validate()
    with pytest.raises(UserError, match="--validation-split must be between 0.0 and 0.9"):
        TrainConfig(**base, validation_split=0.95).validate()


def test_timesteps_are_sd_scripts_four():
    assert val.validation_timesteps(1000) == [200, 400, 600, 800]


# --- the number ------------------------------------------------------------------------------------

def _independent_base_loss(ckpt: Path, folder: Path, resolution: int, seed: int) -> float:
    """Epsilon MSE of the *base* model on the held-out images at 200/400/600/800 with the documented
    noise (one generator, seeded from --seed, drawn image after image), written without the trainer."""
    from facediffuser.sd.model_loading import load_components
    from facediffuser.trainer.caching import encode_text, tokenize
    from facediffuser.trainer.captions import build_caption
    from facediffuser.trainer.dataset import prepare_image

    c = load_components(ckpt, dtype=torch.float32, device="cpu")
    gen = val._noise_generator(seed)
    losses = []
    with torch.no_grad():
        for png in sorted(folder.glob("*.png")):
            z = c.vae.encode(prepare_image(png, resolution).unsqueeze(0)).latent_dist.mean * c.vae.config.scaling_factor
            cond = encode_text(c.text_encoder, tokenize(c.tokenizer, [build_caption(png.with_suffix(".txt"), "x", None)]))
            noise = torch.randn((4, *z.shape[1:]), generator=gen)
            ts = torch.tensor([200, 400, 600, 800])
            pred = c.unet(c.noise_scheduler.add_noise(z.expand(4, -1, -1, -1), noise, ts), ts, cond.expand(4, -1, -1)).sample
            losses += ((pred - noise) ** 2).mean(dim=(1, 2, 3)).tolist()
    return float(np.mean(losses))


@pytest.fixture(scope="module")
def runs(tiny_ckpt, shapes, held_folder, tmp_path_factory):
    """The same training with and without a held-out folder evaluated every step (and lora dropout,
    flip and caption dropout on, so any stray draw from a training RNG would show)."""
    root = tmp_path_factory.mktemp("val")
    kw = dict(steps=4, batch_size=2, lr=3e-3, lora_dropout=0.1, flip=True, caption_dropout=0.2, save_precision="fp32")
    plain = train(tiny_config(tiny_ckpt, shapes, root / "plain" / "face.safetensors", **kw))
    cfg = tiny_config(tiny_ckpt, shapes, root / "val" / "face.safetensors", validation_data=str(held_folder),
                      validation_every=1, keep_best_validation=True, **kw)
    with_val = train(cfg)
    return plain, with_val, cfg


def test_validation_leaves_training_untouched(runs):
    plain, with_val, _ = runs
    assert with_val.losses == plain.losses
    a, _ = kf.load_kohya_lora(plain.output)
    b, _ = kf.load_kohya_lora(with_val.output)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_curve_starts_at_the_base_models_loss(runs, tiny_ckpt, held_folder):
    _, with_val, cfg = runs
    steps = [s for s, _ in with_val.validation]
    assert steps == [0, 1, 2, 3, 4]
    expected = _independent_base_loss(tiny_ckpt, held_folder, cfg.resolution, cfg.seed)
    got = with_val.validation[0][1]
    print(f"\n[validation] step-0 loss {got:.6f}, independent {expected:.6f}; curve {with_val.validation}")
    assert got == pytest.approx(expected, rel=1e-5)
    assert len({round(v, 9) for _, v in with_val.validation}) > 1, "training changes the held-out loss"


def test_validation_is_in_the_metadata_and_the_plot(runs, held_folder):
    _, with_val, _ = runs
    _, meta = kf.load_kohya_lora(with_val.output)
    held = sorted(kf.image_digest(p) for p in held_folder.glob("*.png"))
    assert json.loads(meta[kf.META_VALIDATION_IMAGES]) == held
    assert not set(held) & set(json.loads(meta[kf.META_TRAIN_IMAGES]))
    assert [tuple(x) for x in json.loads(meta[kf.META_VALIDATION_LOSS])] == with_val.validation
    assert meta["ss_num_validation_images"] == "2" and meta["ss_validate_every_n_steps"] == "1"
    best = min(with_val.validation, key=lambda sl: (sl[1], sl[0]))
    assert (int(meta["facediffuser_validation_best_step"]), float(meta["facediffuser_validation_best_loss"])) == best
    # the plot carries the orange validation line (matplotlib's tab:orange, #ff7f0e)
    rgb = np.asarray(Image.open(with_val.loss_plot).convert("RGB")).astype(int)
    orange = (np.abs(rgb - np.array([255, 127, 14])).sum(axis=-1) < 40).sum()
    assert orange > 50, orange


def test_keep_best_validation_writes_the_best_trained_step(runs, tiny_ckpt, shapes, held_folder, tmp_path):
    _, with_val, cfg = runs
    best_step = min((h for h in with_val.validation if h[0] > 0), key=lambda sl: (sl[1], sl[0]))[0]
    assert with_val.best_output == val.best_path(cfg) and with_val.best_output.is_file()
    best, meta = kf.load_kohya_lora(with_val.best_output)
    assert meta["ss_steps"] == str(best_step)
    # a run stopped at that step writes the same tensors
    short = train(tiny_config(tiny_ckpt, shapes, tmp_path / "short.safetensors", steps=best_step, batch_size=2, lr=3e-3,
                              lora_dropout=0.1, flip=True, caption_dropout=0.2, save_precision="fp32"))
    ref, _ = kf.load_kohya_lora(short.output)
    assert all(torch.equal(best[k], ref[k]) for k in ref)


def test_validation_split_holds_images_out_of_training_and_its_digests(tiny_ckpt, shapes, tmp_path):
    cfg = tiny_config(tiny_ckpt, shapes, tmp_path / "face.safetensors", steps=2, validation_split=0.4, validation_every=1)
    r = train(cfg)
    _, meta = kf.load_kohya_lora(r.output)
    trained = set(json.loads(meta[kf.META_TRAIN_IMAGES]))
    held = set(json.loads(meta[kf.META_VALIDATION_IMAGES]))
    everything = {kf.image_digest(p) for p in shapes.glob("*.png")}
    assert len(held) == 2 and len(trained) == 3 and trained | held == everything and not trained & held
    assert meta["ss_num_train_images"] == "3" and meta["ss_validation_split"] == "0.4"
    assert [s for s, _ in r.validation] == [0, 1, 2]


def test_validation_folder_drops_training_duplicates(tiny_ckpt, shapes, tmp_path):
    d = tmp_path / "dupes"
    d.mkdir()
    shutil.copy2(shapes / "shape0.png", d / "copy.png")
    cfg = tiny_config(tiny_ckpt, shapes, tmp_path / "face.safetensors", steps=1, validation_data=str(d))
    with pytest.raises(UserError, match="every image is also in the training set"):
        train(cfg)


def test_two_processes_give_the_same_validation_loss_and_train_in_buckets(tiny_ckpt, tmp_path):
    """DDP (2 CPU processes, gloo): the held-out images are shared out and the sums reduced, so the
    base model's loss equals the single-process one; buckets, the reduce and --keep-best-validation's
    export run on every rank without a hang."""
    import os
    import subprocess
    import sys

    from facediffuser import cli
    from test_buckets import make_mixed

    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed")
    data = make_mixed(tmp_path / "data")
    common = ["--model", str(tiny_ckpt), "--data", str(data), "--steps", "2", "--resolution", "128", "--rank", "4",
              "--validation-split", "0.3", "--validation-every", "1", "--keep-best-validation"]
    single = tmp_path / "one" / "face.safetensors"
    assert cli.main(["train", *common, "--output", str(single)]) == 0
    double = tmp_path / "two" / "face.safetensors"
    r = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "facediffuser.cli", "train", *common, "--output", str(double)],
                       capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads(kf.load_kohya_lora(single)[1][kf.META_VALIDATION_LOSS])
    two = json.loads(kf.load_kohya_lora(double)[1][kf.META_VALIDATION_LOSS])
    assert [s for s, _ in two] == [0, 1, 2]
    # Float32 per-image losses: each rank runs 1 thread (the parent 2), so convolutions sum in another order
    # (CI saw 2e-8 relative). A wrong share-out or reduce (a rank's half only, an image counted twice) moves
    # the mean by the spread between images, orders of magnitude above 1e-6.
    assert two[0][1] == pytest.approx(one[0][1], rel=1e-6), (one, two)
    assert double.with_name("face.best.safetensors").is_file()
