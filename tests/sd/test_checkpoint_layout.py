"""The diffusers <-> LDM key map: bijective, and in agreement with diffusers' own converters."""

from __future__ import annotations

import pytest
import torch

from facediffuser.sd import checkpoint_layout as L
from facediffuser.sd import make_model as mm

pytestmark = pytest.mark.filterwarnings("ignore")


def _assert_bijective(key_map: L.KeyMap) -> None:
    targets = list(key_map.values())
    assert len(set(targets)) == len(targets), "two diffusers tensors map to the same place"
    fused: dict[str, set[str]] = {}
    for key, op in targets:
        if op in ("q", "k", "v"):
            fused.setdefault(key, set()).add(op)
    assert all(ops == {"q", "k", "v"} for ops in fused.values())
    plain = [key for key, op in targets if op not in ("q", "k", "v")]
    assert not set(plain) & set(fused), "a fused key is also a plain target"


@pytest.mark.parametrize("arch", ["sd15", "sd2"])
@pytest.mark.parametrize("size", ["full", "tiny"])
def test_maps_are_bijective_and_roundtrip(arch: str, size: str) -> None:
    maps = mm.key_maps(arch, size)
    for comp, key_map in maps.items():
        _assert_bijective(key_map)
    if size == "tiny":
        tensors = mm.component_tensors(arch, size, seed=3)
        for comp, key_map in maps.items():
            ldm = L.diffusers_to_ldm(tensors[comp], key_map)
            back = L.ldm_to_diffusers(ldm, key_map)
            assert back.keys() == tensors[comp].keys()
            assert all(torch.equal(back[k], tensors[comp][k]) for k in back), comp


def test_sd15_full_key_counts_and_real_names() -> None:
    maps = mm.key_maps("sd15", "full")
    assert len(maps["unet"]) == 686 and len(maps["vae"]) == 248 and len(maps["text_encoder"]) == 196
    unet = {t.key for t in maps["unet"].values()}
    for real in (  # keys of the released v1-5-pruned-emaonly.safetensors
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.bias",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.weight",
    ):
        assert real in unet, real
    vae = {t.key: t.op for t in maps["vae"].values()}
    assert vae["first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"] == ""
    assert vae["first_stage_model.encoder.mid.attn_1.proj_out.weight"] == "conv"
    assert vae["first_stage_model.decoder.up.3.upsample.conv.weight"] == ""
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in vae
    assert maps["text_encoder"]["text_model.encoder.layers.11.mlp.fc2.bias"].key == (
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias"
    )


def test_sd2_text_encoder_map_matches_the_release_file() -> None:
    te = mm.key_maps("sd2", "full")["text_encoder"]
    keys = {t.key for t in te.values()}
    assert len(keys) == 24 * 12 + 6  # 24 resblocks x 12 tensors + embeddings, ln_final, projection, logit_scale
    assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in keys
    assert te["text_projection.weight"] == L.Target("cond_stage_model.model.text_projection", "T")
    assert te["logit_scale"].key == "cond_stage_model.model.logit_scale"
    assert te["text_model.encoder.layers.0.self_attn.k_proj.bias"] == L.Target(
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias", "k"
    )
    unet = {t.key for t in mm.key_maps("sd2", "full")["unet"].values()}
    assert "model.diffusion_model.input_blocks.1.1.proj_in.weight" in unet


def test_transformers5_names_without_text_model_prefix_are_accepted() -> None:
    tensors = mm.component_tensors("sd15", "tiny", components=("text_encoder",))["text_encoder"]
    flat = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    key_map = mm.key_maps("sd15", "tiny")["text_encoder"]
    a, b = L.diffusers_to_ldm(tensors, key_map), L.diffusers_to_ldm(flat, key_map)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_incomplete_state_dict_is_rejected() -> None:
    tensors = mm.component_tensors("sd15", "tiny", components=("vae",))["vae"]
    tensors.pop(next(iter(tensors)))
    with pytest.raises(KeyError, match="missing"):
        L.diffusers_to_ldm(tensors, mm.key_maps("sd15", "tiny")["vae"])


# --- the independent reference: diffusers' own LDM -> diffusers converters ------------------------

@pytest.mark.parametrize("arch", ["sd15", "sd2"])
def test_diffusers_converters_invert_ours_tiny(arch: str) -> None:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = mm.model_configs(arch, "tiny")
    ref = mm.component_tensors(arch, "tiny", seed=1)
    ldm = mm.build_state_dict(arch, "tiny", seed=1, dtype="fp32")
    for got, want in (
        (convert_ldm_unet_checkpoint(ldm, cfg["unet"]), ref["unet"]),
        (convert_ldm_vae_checkpoint(ldm, cfg["vae"]), ref["vae"]),
    ):
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got)
    if arch == "sd15":
        te = convert_ldm_clip_checkpoint(ldm)
        te.pop("text_model.embeddings.position_ids")
        want = ref["text_encoder"]
    else:
        model = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        te = convert_open_clip_checkpoint(model, ldm)  # drops resblocks.23 and text_projection, as we do
        want = {k: v for k, v in ref["text_encoder"].items() if ".layers.23." not in k and k not in ("text_projection.weight", "logit_scale")}
    assert te.keys() == want.keys()
    assert all(torch.equal(te[k], want[k]) for k in te)


@pytest.mark.parametrize("arch", ["sd15", "sd2"])
def test_diffusers_converters_agree_on_full_size_names(arch: str) -> None:
    """Full-size maps, checked name by name with one scalar per tensor (no 3 GB of weights)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    cfg = mm.model_configs(arch, "full")
    for comp, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        key_map = mm.key_maps(arch, "full")[comp]
        ldm = {t.key: torch.tensor(float(i)) for i, t in enumerate(key_map.values())}
        got = convert(ldm, cfg[comp])
        assert got.keys() == key_map.keys()
        for i, name in enumerate(key_map):
            assert float(got[name]) == float(i), name
