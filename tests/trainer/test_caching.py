"""Latent / text-embedding caches and the datasets: hits, invalidation, flips, masks, reproducibility.

Tiny models built here (a 2-level AutoencoderKL and a 1-layer CLIPTextModel); forward passes are
counted both by the cache's own stats and by hooks on the modules, so "no forward on the second run"
is proven independently of the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facediffuser.errors import UserError
from facediffuser.trainer.caching import (
    CachedLatentDataset,
    CacheStats,
    LatentCache,
    TextEncodingCache,
    atomic_save,
    build_train_data,
    collate_samples,
    encode_text,
    module_fingerprint,
    tokenize,
    uses_text_cache,
)
from facediffuser.trainer.config import TrainConfig
from facediffuser.trainer.dataset import check_dataset, prepare_image

RES = 32


def _tokenizer(tmp_path_factory):
    try:
        from facediffuser.sd.tokenizer import load_tokenizer

        return load_tokenizer("sd15")
    except Exception:  # the helper writing the tokenizer module may not be done: a toy BPE vocab
        from transformers import CLIPTokenizer

        d = tmp_path_factory.mktemp("toyvocab")
        words = ["a</w>", "photo</w>", "of</w>", "face</w>", "sks</w>", "smiling</w>", ",</w>", "woman</w>"]
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
        for w in words + [chr(c) for c in range(97, 123)] + [chr(c) + "</w>" for c in range(97, 123)]:
            vocab.setdefault(w, len(vocab))
        (d / "vocab.json").write_text(json.dumps(vocab))
        (d / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77,
                             bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return _tokenizer(tmp_path_factory)


def _vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=RES).eval()


def _text_encoder(tokenizer, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=max(len(tokenizer), 64), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(cfg).eval()


class Counter:
    """Counts real forward calls through a module (independent of CacheStats)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


@pytest.fixture(scope="module")
def vae():
    return _vae()


@pytest.fixture(scope="module")
def text_encoder(tokenizer):
    return _text_encoder(tokenizer)


def _images(d: Path, n: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (RES + 8 * i, RES, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return d


def _cfg(tmp_path: Path, data: Path, **kw) -> TrainConfig:
    return TrainConfig(model="m", data=str(data), output=str(tmp_path / "out" / "lora.safetensors"),
                       cache_dir=str(tmp_path / "cache"), **{"resolution": RES, **kw})


def _build(cfg, vae, te, tok):
    return build_train_data(cfg, check_dataset(cfg), vae=vae, text_encoder=te, tokenizer=tok, progress=False)


# --- hits and invalidation -----------------------------------------------------------------------

def test_second_run_does_no_vae_or_text_forward(tmp_path, tokenizer):
    vae, te = _vae(), _text_encoder(tokenizer)
    vae_calls, te_calls = Counter(vae.encoder), Counter(te)
    data = _images(tmp_path / "data", 3)
    (data / "img1.txt").write_text("sks, smiling woman")
    cfg = _cfg(tmp_path, data, flip=True, caption_dropout=0.1)

    first = _build(cfg, vae, te, tokenizer)
    assert first.stats.images_encoded == 6  # 3 images x (plain + mirrored)
    assert first.stats.vae_forwards == vae_calls.calls == 1  # one batch
    assert first.stats.captions_encoded == 3  # template, the file caption, and "" for dropout
    assert first.stats.text_forwards == te_calls.calls == 1
    assert first.pre_encoded and len(first.dataset) == 3

    second = _build(cfg, vae, te, tokenizer)
    assert vae_calls.calls == 1 and te_calls.calls == 1  # nothing ran again
    assert second.stats.vae_forwards == second.stats.text_forwards == 0
    assert second.stats.latent_hits == 6 and second.stats.latent_misses == 0
    assert second.stats.text_hits == 3 and second.stats.text_misses == 0
    for i in range(3):
        a, b = first.dataset[i], second.dataset[i]
        assert torch.equal(a["latents"], b["latents"])
        assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"])


def test_invalidation_by_bytes_resolution_caption_and_model(tmp_path, tokenizer, vae, text_encoder):
    data = _images(tmp_path / "data", 2)
    cfg = _cfg(tmp_path, data)
    _build(cfg, vae, text_encoder, tokenizer)

    # an image's bytes change: exactly that image is re-encoded
    arr = np.asarray(Image.open(data / "img0.png")).copy()
    arr[0, 0, 0] ^= 1
    Image.fromarray(arr).save(data / "img0.png")
    r = _build(cfg, vae, text_encoder, tokenizer)
    assert (r.stats.images_encoded, r.stats.latent_hits, r.stats.captions_encoded) == (1, 1, 0)

    # a caption changes: only the text entry is recomputed
    (data / "img1.txt").write_text("a new caption")
    r = _build(cfg, vae, text_encoder, tokenizer)
    assert (r.stats.images_encoded, r.stats.captions_encoded) == (0, 1)
    # a new trigger changes every caption
    r = _build(_cfg(tmp_path, data, trigger="sks"), vae, text_encoder, tokenizer)
    assert (r.stats.images_encoded, r.stats.captions_encoded) == (0, 2)

    # the resolution changes: every image is re-encoded (text entries still hit)
    r = _build(_cfg(tmp_path, data, resolution=RES + 8), vae, text_encoder, tokenizer)
    assert r.stats.images_encoded == 2 and r.stats.text_hits == 2 and r.dataset[0]["latents"].shape == (4, 20, 20)

    # another VAE / text encoder (other weights): all entries are new
    r = _build(cfg, _vae(seed=1), _text_encoder(tokenizer, seed=1), tokenizer)
    assert r.stats.images_encoded == 2 and r.stats.captions_encoded == 2

    # flip on after a flip-off run: only the mirrored views are encoded
    r = _build(_cfg(tmp_path, data, flip=True), vae, text_encoder, tokenizer)
    assert r.stats.images_encoded == 2 and r.stats.latent_hits == 2


def test_fingerprint_sees_weights_and_dtype(vae):
    fp = module_fingerprint(vae)
    assert fp == module_fingerprint(_vae())
    other = _vae()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1e-3)
    assert module_fingerprint(other) != fp
    assert module_fingerprint(_vae().to(torch.float16)) != fp


# --- what is stored ------------------------------------------------------------------------------

def test_cached_distribution_and_flipped_latents_match_direct_encoding(tmp_path, vae):
    data = _images(tmp_path / "data", 2)
    scan = check_dataset(_cfg(tmp_path, data))
    cache = LatentCache(tmp_path / "cache", vae, resolution=RES, progress=False)
    build = cache.ensure(scan.images, flip=True)
    from safetensors.torch import load_file

    for rec, entry in zip(scan.images, build.entries):
        pixels = prepare_image(rec.path, RES)
        with torch.no_grad():
            direct = vae.encode(torch.stack([pixels, pixels.flip(-1)])).latent_dist
        plain, mirrored = load_file(entry.latents), load_file(entry.latents_flipped)
        torch.testing.assert_close(plain["mean"], direct.mean[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain["std"], direct.std[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mirrored["mean"], direct.mean[1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mirrored["mean"], plain["mean"].flip(-1), atol=1e-6)  # really re-encoded


def test_dataset_samples_latents_from_the_distribution(tmp_path, vae, tokenizer):
    data = _images(tmp_path / "data", 1)
    scan = check_dataset(_cfg(tmp_path, data))
    cache = LatentCache(tmp_path / "cache", vae, resolution=RES, progress=False)
    build = cache.ensure(scan.images)
    from safetensors.torch import load_file

    dist = load_file(build.entries[0].latents)
    sf = vae.config.scaling_factor
    mode = CachedLatentDataset(build.entries, scan.captions, tokenizer=tokenizer, sample_latents=False,
                               scaling_factor=sf)
    torch.testing.assert_close(mode[0]["latents"], dist["mean"] * sf)
    sampled = CachedLatentDataset(build.entries, scan.captions, tokenizer=tokenizer, scaling_factor=sf, seed=3)
    a = sampled[0]["latents"]
    assert torch.equal(a, sampled[0]["latents"])  # same seed, epoch, index -> same draw
    sampled.set_epoch(1)
    b = sampled[0]["latents"]
    assert not torch.equal(a, b)
    z = (a / sf - dist["mean"]) / dist["std"]  # the noise actually used is standard normal-ish
    assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 1.5
    s = sampled[0]
    assert s["latents"].dtype == torch.float32 and s["latents"].is_contiguous() and s["latents"].device.type == "cpu"
    assert s["input_ids"].shape == (77,) and s["face_mask"] is None and s["index"] == 0


def test_flip_choice_uses_the_mirrored_entry(tmp_path, vae, tokenizer):
    data = _images(tmp_path / "data", 4)
    cfg = _cfg(tmp_path, data, flip=True)
    scan = check_dataset(cfg)
    cache = LatentCache(tmp_path / "cache", vae, resolution=RES, progress=False)
    build = cache.ensure(scan.images, flip=True)
    ds = CachedLatentDataset(build.entries, scan.captions, tokenizer=tokenizer, flip=True, sample_latents=False,
                             scaling_factor=1.0)
    from safetensors.torch import load_file

    seen = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        for i in range(4):
            s = ds[i]
            e = build.entries[i]
            expected = load_file(e.latents_flipped if s["flipped"] else e.latents)["mean"]
            assert torch.equal(s["latents"], expected)
            seen.add(s["flipped"])
    assert seen == {True, False}


def test_face_masks_are_cached_at_latent_size_and_flip_with_the_image(tmp_path, vae, tokenizer):
    data = _images(tmp_path / "data", 2)
    m = np.zeros((RES, RES), dtype=np.uint8)
    m[:, : RES // 2] = 255
    Image.fromarray(m).save(data / "img0.mask.png")
    cfg = _cfg(tmp_path, data, flip=True)
    td = _build(cfg, vae, _text_encoder(tokenizer), tokenizer)
    assert td.stats.mask_misses == 2
    ds = td.dataset
    for epoch in range(8):
        ds.set_epoch(epoch)
        s = ds[0]
        assert s["face_mask"].shape == (1, RES // 2, RES // 2)
        left = s["face_mask"][0, :, 0]
        assert torch.equal(left, torch.zeros(RES // 2) if s["flipped"] else torch.ones(RES // 2))
    batch = collate_samples([ds[0], ds[1]])
    assert batch["face_mask"].shape == (2, 1, RES // 2, RES // 2)
    assert batch["has_face_mask"].tolist() == [True, False] and batch["face_mask"][1].abs().sum() == 0
    assert batch["latents"].shape == (2, 4, RES // 2, RES // 2) and batch["latents"].is_contiguous()
    assert batch["encoder_hidden_states"].shape == (2, 77, 16)
    assert _build(cfg, vae, _text_encoder(tokenizer), tokenizer).stats.mask_hits == 2


# --- text ----------------------------------------------------------------------------------------

def test_text_cache_matches_encode_text_and_dedups(tmp_path, tokenizer, text_encoder):
    cache = TextEncodingCache(tmp_path / "cache", text_encoder, tokenizer, progress=False, batch_size=2)
    caps = ["a photo of a face"] * 5 + ["sks, smiling", "", "a photo of a face"]
    paths = cache.ensure(caps)
    assert set(paths) == {"a photo of a face", "sks, smiling", ""}
    assert cache.stats.captions_encoded == 3 and cache.stats.text_forwards == 2
    with torch.no_grad():
        direct = encode_text(text_encoder, tokenize(tokenizer, ["sks, smiling"]))[0]
    torch.testing.assert_close(TextEncodingCache.load(paths["sks, smiling"]), direct)


def test_caption_dropout_with_frozen_encoder_uses_the_empty_embedding(tmp_path, tokenizer, text_encoder):
    data = _images(tmp_path / "data", 2)
    cfg = _cfg(tmp_path, data, caption_dropout=0.5, seed=5)
    td = _build(cfg, _vae(), text_encoder, tokenizer)
    with torch.no_grad():
        empty = encode_text(text_encoder, tokenize(tokenizer, [""]))[0]
        full = encode_text(text_encoder, tokenize(tokenizer, ["a photo of a face"]))[0]
    kinds = set()
    for epoch in range(12):
        td.dataset.set_epoch(epoch)
        s = td.dataset[0]
        ref = empty if s["caption"] == "" else full
        torch.testing.assert_close(s["encoder_hidden_states"], ref)
        kinds.add(s["caption"])
    assert kinds == {"", "a photo of a face"}


def test_trained_text_encoder_or_shuffle_yields_ids_and_reproducible_captions(tmp_path, tokenizer, text_encoder):
    data = _images(tmp_path / "data", 3)
    for i in range(3):
        (data / f"img{i}.txt").write_text("sks, a, b, c, d, e")
    cfg = _cfg(tmp_path, data, train_text_encoder=True, shuffle_tags=True, keep_tokens=1, caption_dropout=0.2,
               seed=11)
    assert not uses_text_cache(cfg) and uses_text_cache(_cfg(tmp_path, data))
    te_calls = Counter(text_encoder)
    td = _build(cfg, _vae(), text_encoder, tokenizer)
    assert te_calls.calls == 0 and td.stats.text_forwards == 0 and not td.pre_encoded

    def captions(ds, epochs=5):
        out = []
        for e in range(epochs):
            ds.set_epoch(e)
            out += [ds[i]["caption"] for i in range(len(ds))]
        return out

    again = _build(cfg, _vae(), text_encoder, tokenizer)
    c1, c2 = captions(td.dataset), captions(again.dataset)
    assert c1 == c2  # same seed -> same dropout and shuffles
    assert len(set(c1)) > 3 and "" in c1
    assert all(c == "" or c.startswith("sks, ") for c in c1)
    other = _build(_cfg(tmp_path, data, train_text_encoder=True, shuffle_tags=True, keep_tokens=1,
                        caption_dropout=0.2, seed=12), _vae(), text_encoder, tokenizer)
    assert captions(other.dataset) != c1
    s = td.dataset[0]
    assert torch.equal(s["input_ids"], tokenize(tokenizer, [s["caption"]])[0])

    # and through a DataLoader with workers: the same samples as in-process
    loader = torch.utils.data.DataLoader(td.dataset, batch_size=3, num_workers=2, collate_fn=collate_samples)
    td.dataset.set_epoch(0)
    batch = next(iter(loader))
    assert batch["caption"] == [td.dataset[i]["caption"] for i in range(3)]
    assert torch.equal(batch["latents"], torch.stack([td.dataset[i]["latents"] for i in range(3)]))


# --- robustness ----------------------------------------------------------------------------------

def test_atomic_save_leaves_no_partial_entry(tmp_path, monkeypatch):
    import facediffuser.trainer.caching as caching

    target = tmp_path / "e" / "x.safetensors"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(caching.os, "replace", boom)
    with pytest.raises(RuntimeError):
        atomic_save({"a": torch.ones(2)}, target)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_image_that_fails_to_decode_at_cache_time_is_skipped(tmp_path, vae, tokenizer, text_encoder):
    data = _images(tmp_path / "data", 2)
    cfg = _cfg(tmp_path, data)
    scan = check_dataset(cfg)
    (data / "img1.png").write_bytes(b"gone bad after the check")
    td = build_train_data(cfg, scan, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, progress=False)
    assert len(td.dataset) == 1 and [r.rel for r in td.images] == ["img0.png"]
    assert len(td.skipped) == 1 and "img1.png: not an image" in td.skipped[0]


def test_damaged_entry_is_a_user_error(tmp_path, vae, tokenizer, text_encoder):
    data = _images(tmp_path / "data", 1)
    td = _build(_cfg(tmp_path, data), vae, text_encoder, tokenizer)
    td.dataset.entries[0].latents.write_bytes(b"garbage")
    with pytest.raises(UserError, match="damaged cache entry"):
        td.dataset[0]


def test_no_cache_mode_yields_pixels(tmp_path, vae, tokenizer, text_encoder):
    data = _images(tmp_path / "data", 2)
    cfg = _cfg(tmp_path, data, no_cache=True, flip=True)
    td = _build(cfg, vae, text_encoder, tokenizer)
    assert td.stats == CacheStats() and not (tmp_path / "cache").exists()
    s = td.dataset[1]
    ref = prepare_image(data / "img1.png", RES, flip=s["flipped"])
    assert torch.equal(s["pixel_values"], ref) and "input_ids" in s


def test_filling_the_cache_draws_nothing_from_the_global_rng(tmp_path, vae, tokenizer, text_encoder):
    """A cold cache and a warm one must leave the training's global RNG (LoRA dropout) in the same state."""
    data = _images(tmp_path / "data")
    cfg = _cfg(tmp_path, data)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build = _build(cfg, vae, text_encoder, tokenizer)
    assert build.stats.latent_misses == 3  # it really encoded
    assert torch.equal(torch.get_rng_state(), before)
