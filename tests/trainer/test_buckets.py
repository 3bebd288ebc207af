"""Aspect-ratio buckets: the candidate sizes and choices follow sd-scripts' rules, a portrait keeps
what the square crop cuts off (image and face mask alike), latents are cached per bucket, and the
batch order is single-bucket, seeded, rank-consistent and a pure function of the step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facediffuser.errors import UserError
from facediffuser.trainer import buckets as bk
from facediffuser.trainer.config import TrainConfig, bucket_limits


# --- sizes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution,lo,hi", [(512, 256, 1024), (768, 384, 1536), (320, 128, 640)])
def test_candidate_buckets_are_the_largest_grid_sizes_within_the_area(resolution, lo, hi):
    resos = bk.bucket_resolutions(resolution, lo, hi)
    area = resolution * resolution
    assert resos == sorted(set(resos)) and (resolution, resolution) in resos
    for w, h in resos:
        assert (h, w) in resos, "both orientations"
        if (w, h) == (resolution, resolution):
            continue
        assert w % 64 == 0 and h % 64 == 0 and lo <= min(w, h) and max(w, h) <= hi
        assert w * h <= area
        # sd-scripts' rule: for a width on the grid, the tallest height within the area (and the transpose)
        assert any(b == hi or a * (b + 64) > area for a, b in ((w, h), (h, w))), (w, h)
    widths = {w for w, _ in resos}
    assert widths >= set(range(lo, hi + 1, 64)) - {w for w in range(lo, hi + 1, 64) if (area // w) // 64 * 64 < lo}


def test_bucket_choice_is_the_nearest_aspect_ratio():
    resos = bk.bucket_resolutions(512, 256, 1024)
    assert (448, 576) in resos and (384, 640) in resos
    assert bk.select_bucket(600, 800, resos)[0] == (448, 576)  # 3:4 portrait: 0.778 vs 0.75
    assert bk.select_bucket(800, 600, resos)[0] == (576, 448)
    assert bk.select_bucket(1024, 1024, resos) == ((512, 512), 0.0)
    assert bk.select_bucket(384, 640, resos) == ((384, 640), 0.0)  # an exact bucket size is kept
    size, err = bk.select_bucket(1000, 1500, resos)
    assert size == (384, 640) and err == pytest.approx(384 / 640 - 1000 / 1500)  # 2:3 -> 0.6 beats 0.778
    # errors are minimal over all candidates
    for w, h in [(300, 900), (1000, 1100), (1920, 1080)]:
        (bw, bh), err = bk.select_bucket(w, h, resos)
        assert abs(err) == pytest.approx(min(abs(rw / rh - w / h) for rw, rh in resos))


def test_no_upscale_buckets_keep_small_images_small_and_shrink_large_ones():
    assert bk.select_bucket(300, 200, [], no_upscale=True, max_area=512 * 512)[0] == (256, 192)
    (w, h), _ = bk.select_bucket(2000, 1000, [], no_upscale=True, max_area=512 * 512)
    assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and abs(w / h - 2.0) < 0.2
    assert bk.select_bucket(40, 30, [], no_upscale=True, max_area=512 * 512)[0] == (64, 64)  # never below a grid step


def test_plan_and_ss_bucket_info_have_sd_scripts_shape():
    plan = bk.plan_buckets([(600, 800), (1024, 1024), (800, 600), (900, 1200), (512, 512)], 512,
                           enabled=True, min_side=256, max_side=1024)
    assert plan.sizes == ((448, 576), (512, 512), (576, 448), (448, 576), (512, 512))
    assert plan.buckets == {(448, 576): [0, 3], (512, 512): [1, 4], (576, 448): [2]}
    info = json.loads(json.dumps(plan.info()))
    assert info["buckets"] == {"0": {"resolution": [448, 576], "count": 2}, "1": {"resolution": [512, 512], "count": 2},
                               "2": {"resolution": [576, 448], "count": 1}}
    expected_err = np.mean([abs(448 / 576 - 0.75), 0, abs(576 / 448 - 4 / 3), abs(448 / 576 - 0.75), 0])
    assert info["mean_img_ar_error"] == pytest.approx(expected_err)
    off = bk.plan_buckets([(600, 800), (512, 512)], 512, enabled=False, min_side=256, max_side=1024)
    assert off.sizes == ((512, 512), (512, 512)) and not off.enabled
    # sd-scripts reports the square crop's aspect-ratio error without buckets too
    assert off.info() == {"buckets": {"0": {"resolution": [512, 512], "count": 2}}, "mean_img_ar_error": pytest.approx(0.125)}


def test_bucket_settings_defaults_and_errors():
    cfg = TrainConfig(model="m", data="d", output="o.safetensors")
    assert cfg.buckets is True and bucket_limits(cfg) == (256, 1024)
    assert bucket_limits(TrainConfig(model="m", data="d", output="o.safetensors", resolution=64)) == (64, 128)
    with pytest.raises(UserError, match="multiple of 64"):
        TrainConfig(model="m", data="d", output="o.safetensors", min_bucket_reso=300).validate()
    with pytest.raises(UserError, match="larger than --max-bucket-reso"):
        TrainConfig(model="m", data="d", output="o.safetensors", min_bucket_reso=768, max_bucket_reso=512).validate()


# --- crops -------------------------------------------------------------------------------------------

def _banded(path: Path, w: int, h: int) -> Path:
    """Red top tenth, blue bottom tenth, grey between: what a square centre crop of a portrait loses."""
    a = np.full((h, w, 3), 128, np.uint8)
    a[: h // 10] = (255, 0, 0)
    a[-(h // 10):] = (0, 0, 255)
    Image.fromarray(a).save(path)
    return path


def test_bucket_crop_keeps_a_portraits_top_and_bottom_and_the_mask_follows(tmp_path):
    from facediffuser.trainer.dataset import prepare_image, prepare_mask

    img = _banded(tmp_path / "portrait.png", 300, 500)
    square = prepare_image(img, 256)
    bucket = prepare_image(img, 256, size=(192, 320))
    assert square.shape == (3, 256, 256) and bucket.shape == (3, 320, 192)
    # in [-1, 1]: red is (1, -1, -1), blue (-1, -1, 1)
    assert bucket[0, :10].mean() > 0.95 and bucket[2, -10:].mean() > 0.95, "the bucket keeps both bands"
    assert square[0, :10].mean() < 0.1 and square[2, -10:].mean() < 0.1, "the square crop cuts them off"
    # an independent crop: scale to cover the bucket, trim the centre (sd-scripts' trim_and_resize)
    pil = Image.open(img).convert("RGB")
    scale = max(192 / 300, 320 / 500)
    big = pil.resize((round(300 * scale), round(500 * scale)), Image.Resampling.LANCZOS)
    left, top = (big.width - 192) // 2, (big.height - 320) // 2
    ref = torch.from_numpy(np.asarray(big.crop((left, top, left + 192, top + 320)), np.float32) / 127.5 - 1).permute(2, 0, 1)
    assert float((bucket - ref).abs().mean()) < 0.02
    # the face mask at latent size is cropped the same way
    m = np.zeros((500, 300), np.uint8)
    m[:50] = 255  # the top tenth is "face"
    Image.fromarray(m).save(tmp_path / "portrait.mask.png")
    lat = prepare_mask(tmp_path / "portrait.mask.png", (24, 40))
    assert lat.shape == (1, 40, 24)
    assert float(lat[0, :3].mean()) > 0.95 and float(lat[0, 5:].max()) < 0.05


def test_latents_are_cached_per_bucket_and_square_entries_keep_their_keys(tmp_path):
    from diffusers import AutoencoderKL

    from facediffuser.trainer.caching import LatentCache, load_entry
    from facediffuser.trainer.dataset import check_dataset

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=64).eval()
    data = tmp_path / "data"
    data.mkdir()
    _banded(data / "a.png", 64, 64)
    _banded(data / "b.png", 60, 120)
    cfg = TrainConfig(model="m", data=str(data), output=str(tmp_path / "o.safetensors"), resolution=64)
    images = check_dataset(cfg).images
    cache = LatentCache(tmp_path / "cache", vae, resolution=64, progress=False)
    sizes = [(64, 64), (64, 128)]
    build = cache.ensure(images, sizes=sizes)
    assert cache.latent_path(images[0].sha256, False, (64, 64)) == cache.latent_path(images[0].sha256, False)
    assert cache.latent_path(images[1].sha256, False, (64, 128)) != cache.latent_path(images[1].sha256, False)
    assert load_entry(build.entries[0].latents)["mean"].shape == (4, 32, 32)
    assert load_entry(build.entries[1].latents)["mean"].shape == (4, 64, 32)
    with pytest.raises(UserError, match="multiple of the VAE"):
        cache.latent_path(images[1].sha256, False, (63, 128))


# --- batch order -------------------------------------------------------------------------------------

BUCKETS = [[0, 3, 5], [1], [2, 4, 6, 7, 8]]


def test_bucket_batches_are_single_bucket_seeded_and_cover_every_image_each_epoch():
    order = bk.BucketBatchOrder(BUCKETS, batch_size=2, seed=5)
    assert order.micro_batches_per_epoch == 2 + 1 + 3
    member = {i: b for b, members in enumerate(BUCKETS) for i in members}
    for e in range(3):
        seen = []
        for j in range(order.micro_batches_per_epoch):
            batch = order.indices(e * order.micro_batches_per_epoch + j)
            assert len(batch) == 2 and {ep for ep, _ in batch} == {e}
            assert len({member[i] for _, i in batch}) == 1, batch
            seen += [i for _, i in batch]
        assert set(seen) == set(member), "every image once an epoch (short buckets wrap around)"
    again = bk.BucketBatchOrder(BUCKETS, batch_size=2, seed=5)
    stream = [order.indices(m) for m in range(12)]
    assert [again.indices(m) for m in reversed(range(12))][::-1] == stream, "a pure function of the step"
    assert stream != [bk.BucketBatchOrder(BUCKETS, batch_size=2, seed=6).indices(m) for m in range(12)]
    it = order.iterate(4)
    assert next(it) == order.indices(4) and next(it) == order.indices(5)


def test_bucket_batches_give_every_rank_the_same_bucket():
    ranks = [bk.BucketBatchOrder(BUCKETS, batch_size=2, seed=1, rank=r, world=2) for r in range(2)]
    member = {i: b for b, members in enumerate(BUCKETS) for i in members}
    assert ranks[0].micro_batches_per_epoch == ranks[1].micro_batches_per_epoch == 1 + 1 + 2
    for m in range(8):
        a, b = ranks[0].indices(m), ranks[1].indices(m)
        assert len({member[i] for _, i in a + b}) == 1, (m, a, b)
        assert a[0][0] == b[0][0]
    # the two slices of a chunk are disjoint where the bucket is big enough to fill it
    big = [(ranks[0].indices(m), ranks[1].indices(m)) for m in range(4)]
    for a, b in big:
        if member[a[0][1]] == 2 and len({i for _, i in a + b}) == 4:
            break
    else:
        pytest.fail("no 4-image chunk from the 5-image bucket")


def test_total_steps_from_epochs_count_bucket_batches():
    from facediffuser.trainer import training_loop as tl

    cfg = TrainConfig(model="m", data="d", output="o.safetensors", epochs=3, batch_size=2, grad_accum=2)
    order = bk.BucketBatchOrder(BUCKETS, batch_size=2, seed=0)
    assert tl._total_steps(cfg, 9, 1, order.micro_batches_per_epoch) == math.ceil(3 * 6 / 2)


def make_mixed(folder: Path) -> Path:
    """Seven captioned images that fall in three buckets at 128 px: square, tall and wide."""
    from PIL import ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate([(128, 128), (120, 128), (136, 128), (64, 200), (60, 180), (200, 64), (190, 62)]):
        img = Image.new("RGB", (w, h), (255, 255, 255))
        ImageDraw.Draw(img).ellipse((4 + i, 4, w - 4, h - 4 - i), fill=(30 * i, 200 - 20 * i, 90))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a shape number {i}")
    return folder


def test_a_mixed_dataset_trains_in_buckets_end_to_end(sd15_tiny_checkpoint, tmp_path):
    """Three buckets at 128 px: every micro-batch is one bucket's latents (the UNet sees one shape), the
    cache holds each image at its bucket size, and ss_bucket_info says so."""
    import shutil

    from facediffuser.trainer import kohya_format as kf
    from facediffuser.trainer import training_loop as tl

    data = make_mixed(tmp_path / "data")
    ckpt = Path(shutil.copy2(sd15_tiny_checkpoint, tmp_path / "tiny.safetensors"))
    cfg = TrainConfig(model=str(ckpt), data=str(data), output=str(tmp_path / "out" / "face.safetensors"), steps=6,
                      resolution=128, rank=4, lr=1e-3, batch_size=2, seed=3)
    shapes_seen = []
    real = tl._diffusion_loss

    def spy(config, models, batch, *a, **kw):
        shapes_seen.append(tuple(batch["latents"].shape))
        return real(config, models, batch, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tl, "_diffusion_loss", spy)
        r = tl.train(cfg)
    assert r.status == "finished"
    assert set(shapes_seen) <= {(2, 4, 16, 16), (2, 4, 24, 8), (2, 4, 8, 24)} and len(set(shapes_seen)) >= 2, shapes_seen
    _, meta = kf.load_kohya_lora(r.output)
    info = json.loads(meta["ss_bucket_info"])
    assert info["buckets"] == {"0": {"resolution": [64, 192], "count": 2}, "1": {"resolution": [128, 128], "count": 3},
                               "2": {"resolution": [192, 64], "count": 2}}
    assert (meta["ss_enable_bucket"], meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"], meta["ss_bucket_no_upscale"]) == (
        "True", "64", "256", "False")
    entries = list((cfg.cache_path / "latents").rglob("*.safetensors"))
    from safetensors import safe_open

    got = set()
    for e in entries:
        with safe_open(str(e), framework="pt") as fh:
            got.add(tuple(fh.get_slice("mean").get_shape()))
    assert got == {(4, 16, 16), (4, 24, 8), (4, 8, 24)}


def test_square_data_trains_the_same_with_buckets_on_or_off(sd15_tiny_checkpoint, tmp_path):
    """Face crops from prep are square: one bucket, the unbucketed batch order, the same latents, the same
    tensors (only the ss_*bucket* metadata says which setting was used)."""
    import shutil

    from facediffuser.trainer import kohya_format as kf
    from facediffuser.trainer import training_loop as tl
    from test_training_loop import make_shapes, tiny_config

    data = make_shapes(tmp_path / "data", n=5)
    ckpt = Path(shutil.copy2(sd15_tiny_checkpoint, tmp_path / "tiny.safetensors"))
    kw = dict(steps=4, batch_size=2, flip=True, lora_dropout=0.1, save_precision="fp32")
    on = tl.train(tiny_config(ckpt, data, tmp_path / "on" / "face.safetensors", buckets=True, **kw))
    off = tl.train(tiny_config(ckpt, data, tmp_path / "off" / "face.safetensors", buckets=False, **kw))
    assert on.losses == off.losses
    a, meta_on = kf.load_kohya_lora(on.output)
    b, meta_off = kf.load_kohya_lora(off.output)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert meta_on["ss_enable_bucket"] == "True" and meta_off["ss_enable_bucket"] == "False"
    assert json.loads(meta_on["ss_bucket_info"])["buckets"] == json.loads(meta_off["ss_bucket_info"])["buckets"]
