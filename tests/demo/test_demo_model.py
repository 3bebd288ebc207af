"""The shipped demo base model: an ordinary checkpoint for our loader, its VAE as good as its
metadata says (recomputed here through the loader), the rebuilt text encoder checked, bad files refused."""

from __future__ import annotations

import json

import pytest

from facediffuser.demo.demo_model import DEMO_BASE_FILE

pytestmark = pytest.mark.skipif(not DEMO_BASE_FILE.is_file(), reason=f"the demo base model {DEMO_BASE_FILE.name} is not "
                                "installed (build it with tools/make_demo_base_model.py)")


def test_shipped_file_is_small_and_records_its_recipe():
    from facediffuser.demo.demo_model import DEMO_BASE_FILE, base_model_recipe

    assert DEMO_BASE_FILE.is_file() and DEMO_BASE_FILE.stat().st_size < 8e6
    recipe = base_model_recipe()
    for key in ("seed", "scene_seed", "images", "vae_steps", "unet_steps", "unet_batch", "text_encoder_sha256",
                "vae_psnr_heldout_scenes_db", "total_seconds"):
        assert key in recipe, key


def test_checkpoint_loads_and_its_vae_reconstructs_as_recorded(tmp_path):
    import torch

    from facediffuser.demo.demo_model import base_model_recipe, make_demo_checkpoint
    from facediffuser.demo.toy_scenes import toy_scene_array
    from facediffuser.sd.model_loading import load_components

    comps = load_components(make_demo_checkpoint(tmp_path / "demo.safetensors"))
    assert list(comps.vae.config.block_out_channels) == [32, 64, 64]
    x = torch.from_numpy(toy_scene_array(64, seed=99)[0]).permute(0, 3, 1, 2).float() / 127.5 - 1  # the script's check set
    with torch.no_grad():
        post = comps.vae.encode(x).latent_dist
        rec = comps.vae.decode(post.mean).sample.clamp(-1, 1)
    psnr = float((10 * torch.log10(1 / ((rec - x) / 2).pow(2).mean((1, 2, 3)))).mean())
    assert abs(psnr - base_model_recipe()["vae_psnr_heldout_scenes_db"]) < 0.3, psnr  # fp16 weights vs fp32 at build
    assert psnr > 18
    # standardised latents: SD1.5's scaling factor gives about unit spread on scenes
    z = post.mean * comps.vae.config.scaling_factor
    assert 0.6 < float(z.std()) < 1.6 and abs(float(z.mean())) < 0.3


def test_changed_text_encoder_or_foreign_file_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from facediffuser.demo.demo_model import DEMO_BASE_FILE, META_RECIPE, make_demo_checkpoint
    from facediffuser.errors import UserError

    with safe_open(str(DEMO_BASE_FILE), framework="pt") as fh:
        meta = dict(fh.metadata())
    tensors = load_file(str(DEMO_BASE_FILE))
    recipe = json.loads(meta[META_RECIPE])
    recipe["text_encoder_sha256"] = "0" * 64
    save_file(tensors, str(tmp_path / "other_te.safetensors"), dict(meta, **{META_RECIPE: json.dumps(recipe)}))
    with pytest.raises(UserError, match="no longer the one"):
        make_demo_checkpoint(tmp_path / "a.safetensors", base=tmp_path / "other_te.safetensors")
    save_file(tensors, str(tmp_path / "plain.safetensors"), {k: v for k, v in meta.items() if k != META_RECIPE})
    with pytest.raises(UserError, match="not a FaceDiffuser demo base model"):
        make_demo_checkpoint(tmp_path / "b.safetensors", base=tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="is missing; rebuild it with tools/make_demo_base_model.py"):
        make_demo_checkpoint(tmp_path / "c.safetensors", base=tmp_path / "absent.safetensors")
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()
