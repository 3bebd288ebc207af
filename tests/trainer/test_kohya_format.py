"""The kohya file format: key names and shapes on the full SD1.5 architecture against a list
written from kohya's rule, numeric equivalence with diffusers' own kohya loader, exact round
trips, hashes checked against an independent reading of the file, metadata, and errors."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from facediffuser.errors import UserError
from facediffuser.trainer import kohya_format as kf
from facediffuser.trainer import lora_targets as lt
from test_lora_targets import sd15_meta, tiny_unet  # noqa: F401  (fixture)

# --- kohya's names for SD1.5, written out in kohya's own '_' form (not via our mapping) -------------

def _kohya_unet_blocks():
    """(kohya block prefix, channels) of the 16 Transformer2DModels, from the LDM/diffusers layout."""
    down = [(f"lora_unet_down_blocks_{i}_attentions_{j}", (320, 640, 1280)[i]) for i in range(3) for j in range(2)]
    mid = [("lora_unet_mid_block_attentions_0", 1280)]
    up = [(f"lora_unet_up_blocks_{i}_attentions_{j}", (1280, 1280, 640, 320)[i]) for i in (1, 2, 3) for j in range(3)]
    return down + mid + up


def expected_kohya_shapes(rank: int, conv_rank: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every key of kohya's SD1.5 LoRA with its shape (sd-scripts ``networks/lora.py``: Linear and 1x1
    children of every Transformer2DModel and of CLIPAttention/CLIPMLP; down [r, in(, kh, kw)], up [out, r(, 1, 1)])."""
    out: dict[str, tuple[int, ...]] = {}

    def mod(name, down, up):
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = ()

    r = rank
    for block, c in _kohya_unet_blocks():
        mod(f"{block}_proj_in", (r, c, 1, 1), (c, r, 1, 1))
        mod(f"{block}_proj_out", (r, c, 1, 1), (c, r, 1, 1))
        t = f"{block}_transformer_blocks_0"
        for a, ctx in (("attn1", c), ("attn2", 768)):
            mod(f"{t}_{a}_to_q", (r, c), (c, r))
            mod(f"{t}_{a}_to_k", (r, ctx), (c, r))
            mod(f"{t}_{a}_to_v", (r, ctx), (c, r))
            mod(f"{t}_{a}_to_out_0", (r, c), (c, r))
        mod(f"{t}_ff_net_0_proj", (r, c), (8 * c, r))  # GEGLU: 2 x 4c
        mod(f"{t}_ff_net_2", (r, 4 * c), (c, r))
    for i in range(12):
        p = f"lora_te_text_model_encoder_layers_{i}"
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            mod(f"{p}_self_attn_{m}", (r, 768), (768, r))
        mod(f"{p}_mlp_fc1", (r, 768), (3072, r))
        mod(f"{p}_mlp_fc2", (r, 3072), (768, r))
    if conv_rank:
        cr = conv_rank
        chans = (320, 640, 1280, 1280)
        for i in range(4):
            for j in range(2):
                cin = (chans[i - 1] if i else 320) if j == 0 else chans[i]
                res = f"lora_unet_down_blocks_{i}_resnets_{j}"
                mod(f"{res}_conv1", (cr, cin, 3, 3), (chans[i], cr, 1, 1))
                mod(f"{res}_conv2", (cr, chans[i], 3, 3), (chans[i], cr, 1, 1))
                mod(f"{res}_time_emb_proj", (r, 1280), (chans[i], r))
                if cin != chans[i]:
                    mod(f"{res}_conv_shortcut", (r, cin, 1, 1), (chans[i], r, 1, 1))
            if i < 3:
                mod(f"lora_unet_down_blocks_{i}_downsamplers_0_conv", (cr, chans[i], 3, 3), (chans[i], cr, 1, 1))
        for j in range(2):
            res = f"lora_unet_mid_block_resnets_{j}"
            mod(f"{res}_conv1", (cr, 1280, 3, 3), (1280, cr, 1, 1))
            mod(f"{res}_conv2", (cr, 1280, 3, 3), (1280, cr, 1, 1))
            mod(f"{res}_time_emb_proj", (r, 1280), (1280, r))
        rev = (1280, 1280, 640, 320)
        # skip connections: conv_in, then each down resnet and downsampler output; the up path pops them in reverse
        skips = [320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280]
        for i in range(4):
            prev = rev[i - 1] if i else 1280
            for j in range(3):
                skip = skips.pop()
                cin = (prev if j == 0 else rev[i]) + skip
                res = f"lora_unet_up_blocks_{i}_resnets_{j}"
                mod(f"{res}_conv1", (cr, cin, 3, 3), (rev[i], cr, 1, 1))
                mod(f"{res}_conv2", (cr, rev[i], 3, 3), (rev[i], cr, 1, 1))
                mod(f"{res}_time_emb_proj", (r, 1280), (rev[i], r))
                mod(f"{res}_conv_shortcut", (r, cin, 1, 1), (rev[i], r, 1, 1))
            if i < 3:
                mod(f"lora_unet_up_blocks_{i}_upsamplers_0_conv", (cr, rev[i], 3, 3), (rev[i], cr, 1, 1))
    return out


def synthetic_peft_sd(model, targets, rank, conv3x3=(), conv_rank=None, seed=0):
    """A peft state dict with the real shapes of the (meta) model's layers and small random values."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    sd = {}
    for name in targets:
        m = modules[name]
        r = conv_rank if name in conv3x3 else rank
        if isinstance(m, torch.nn.Conv2d):
            a, b = (r, m.in_channels, *m.kernel_size), (m.out_channels, r, 1, 1)
        else:
            a, b = (r, m.in_features), (m.out_features, r)
        sd[f"{name}.lora_A.weight"] = torch.randn(a, generator=g, dtype=torch.float16)
        sd[f"{name}.lora_B.weight"] = torch.randn(b, generator=g, dtype=torch.float16)
    return sd


# A1111's key -> LDM module conversion (extensions-builtin/Lora/networks.py, convert_diffusers_name_to_compvis,
# regexes tried in this order with re.match), re-typed from its description:
# a key that matches none of these is silently dropped by A1111.
A1111_PATTERNS = [
    r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
    r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
    r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
    r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
    r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
    r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
]


@pytest.mark.parametrize("conv", [False, True], ids=["lierla", "locon"])
def test_sd15_keys_and_shapes_are_kohyas(sd15_meta, conv):  # noqa: F811
    unet, te = sd15_meta
    rank, conv_rank = 4, (2 if conv else None)
    conv3 = set(lt.unet_conv3x3_modules(unet)) if conv else set()
    unet_sd = synthetic_peft_sd(unet, lt.unet_target_modules(unet, conv=conv), rank, conv3, conv_rank)
    te_sd = synthetic_peft_sd(te, lt.text_encoder_target_modules(te), rank, seed=1)
    tensors = kf.peft_to_kohya(unet_sd, te_sd, unet_alpha=2.0, te_alpha=3.0)

    expected = expected_kohya_shapes(rank, conv_rank)
    assert len(expected) == (1050 if conv else 792)
    assert set(tensors) == set(expected)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert not [k for k in tensors if k.startswith(("lora_te_encoder", "lora_te1_"))]
    for key in tensors:  # every module maps in A1111's converter (which ignores misses silently)
        module = key.partition(".")[0]
        assert any(re.fullmatch(p, module) for p in A1111_PATTERNS), key
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in alphas.values())
    assert {float(v) for k, v in alphas.items() if k.startswith("lora_unet_")} == {2.0}
    assert {float(v) for k, v in alphas.items() if k.startswith("lora_te_")} == {3.0}


def test_te_keys_always_carry_text_model_whatever_the_peft_spelling():
    a, b = torch.ones(2, 8), torch.ones(8, 2)
    for path in ("encoder.layers.3.mlp.fc1", "text_model.encoder.layers.3.mlp.fc1", "base_model.model.encoder.layers.3.mlp.fc1"):
        out = kf.peft_to_kohya(None, {f"{path}.lora_A.weight": a, f"{path}.lora_B.weight": b})
        assert set(out) == {f"lora_te_text_model_encoder_layers_3_mlp_fc1.{s}" for s in ("lora_down.weight", "lora_up.weight", "alpha")}
        assert float(out["lora_te_text_model_encoder_layers_3_mlp_fc1.alpha"]) == 2.0  # default alpha = rank


def test_peft_keys_with_adapter_name_are_accepted_and_bad_ones_refused():
    a, b = torch.ones(2, 8), torch.ones(8, 2)
    out = kf.peft_to_kohya({"mid_block.attentions.0.proj_out.lora_A.default.weight": a,
                            "mid_block.attentions.0.proj_out.lora_B.default.weight": b})
    assert "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight" in out
    for bad in ({"x.lora_A.weight": a},  # no lora_B
                {"x.lora_A.weight": a, "x.lora_B.weight": torch.ones(8, 3)},  # rank mismatch
                {"x.lora_A.weight": a, "x.lora_B.weight": b, "x.lora_magnitude_vector": b}):  # DoRA
        with pytest.raises(UserError) as exc:
            kf.peft_to_kohya(bad)
        assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="no alpha"):
        kf.peft_to_kohya({"x.lora_A.weight": a, "x.lora_B.weight": b}, unet_alpha={"y": 1.0})
    with pytest.raises(UserError, match="empty"):
        kf.peft_to_kohya({}, {})


# --- round trip -------------------------------------------------------------------------------------

def test_round_trip_peft_kohya_peft_is_exact(sd15_meta, tmp_path):  # noqa: F811
    unet, te = sd15_meta
    conv3 = set(lt.unet_conv3x3_modules(unet))
    targets = lt.unet_target_modules(unet, conv=True)
    unet_sd = synthetic_peft_sd(unet, targets, 4, conv3, 2)
    te_sd = synthetic_peft_sd(te, lt.text_encoder_target_modules(te), 4, seed=3)
    unet_alpha = {t: (1.5 if t in conv3 else 3.0) for t in targets}
    unet_alpha["mid_block.attentions.0.proj_in"] = 0.1  # not representable in fp16: must survive exactly
    tensors = kf.peft_to_kohya(unet_sd, te_sd, unet_alpha=unet_alpha, te_alpha=5.0)

    back = kf.kohya_to_peft(tensors)
    assert back.unet.keys() == unet_sd.keys() and back.text_encoder.keys() == te_sd.keys()
    assert all(torch.equal(back.unet[k], unet_sd[k]) for k in unet_sd)
    assert all(torch.equal(back.text_encoder[k], te_sd[k]) for k in te_sd)
    assert back.unet_alphas == {t: float(torch.tensor(a, dtype=torch.float32)) for t, a in unet_alpha.items()}
    assert set(back.text_encoder_alphas.values()) == {5.0}
    assert back.unet_ranks == {t: (2 if t in conv3 else 4) for t in targets}

    # through a file (fp16 = the tensors' dtype, so still exact) and with transformers-4 TE names
    path = tmp_path / "rt.safetensors"
    kf.save_kohya_lora(path, tensors, {"ss_network_module": "networks.lora"}, dtype="fp16")
    loaded, _ = kf.load_kohya_lora(path)
    back2 = kf.kohya_to_peft(loaded, te_text_model=True)
    assert all(torch.equal(back2.unet[k], unet_sd[k]) for k in unet_sd)
    assert all(torch.equal(back2.text_encoder["text_model." + k], te_sd[k]) for k in te_sd)
    assert back2.unet_alphas["mid_block.attentions.0.proj_in"] == float(torch.tensor(0.1, dtype=torch.float32))


def test_kohya_own_file_conventions_are_read():
    """Files from sd-scripts without alpha, or from diffusers' converter with lora_te1_."""
    down, up = torch.randn(4, 768), torch.randn(768, 4)
    tensors = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_down.weight": torch.randn(4, 320),
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj.lora_up.weight": torch.randn(2560, 4),
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj.alpha": torch.tensor(0.0),
    }
    p = kf.kohya_to_peft(tensors)
    assert set(p.text_encoder) == {"encoder.layers.0.self_attn.q_proj.lora_A.weight", "encoder.layers.0.self_attn.q_proj.lora_B.weight"}
    assert p.text_encoder_alphas == {"encoder.layers.0.self_attn.q_proj": 4.0}  # missing alpha = rank
    assert p.unet_alphas == {"down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj": 4.0}  # zero alpha = rank
    # the delta uses the same convention: scale 1
    delta = kf.kohya_delta_weights(tensors)["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
    torch.testing.assert_close(delta, up @ down)


def test_parse_names_covers_every_sd15_module(sd15_meta):  # noqa: F811
    unet, te = sd15_meta
    for name in lt.unet_target_modules(unet, conv=True):
        assert kf.parse_kohya_module_name(kf.kohya_module_name(name, "unet")) == ("unet", name)
    for name in lt.text_encoder_target_modules(te):
        assert kf.parse_kohya_module_name(kf.kohya_module_name(name, "text_encoder")) == ("text_encoder", name)
    with pytest.raises(UserError):
        kf.parse_kohya_module_name("lora_foo_bar")


# --- numeric equivalence with diffusers' own kohya loader --------------------------------------------

def tiny_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                                        vocab_size=100, max_position_embeddings=16, hidden_act="quick_gelu"))


def _randomise_lora(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _run(unet, te, ids, sample, t):
    with torch.no_grad():
        ctx = te(ids).last_hidden_state
        return ctx, unet(sample, t, encoder_hidden_states=ctx).sample


@pytest.mark.parametrize("conv", [False, True], ids=["lierla", "locon"])
def test_diffusers_loads_our_file_with_the_same_numeric_effect(tmp_path, conv):
    from diffusers import StableDiffusionPipeline
    from peft import inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    base_unet, base_te = tiny_unet().eval(), tiny_text_encoder().eval()
    unet, te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    # alpha != rank everywhere, and a different conv rank/alpha for LoCon
    unet.add_adapter(lt.unet_lora_config(unet, rank=4, alpha=3, conv_rank=2 if conv else 0, conv_alpha=5))
    te = inject_adapter_in_model(lt.text_encoder_lora_config(te, rank=4, alpha=7), te)
    _randomise_lora(unet, 10)
    _randomise_lora(te, 11)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 16), generator=g)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    ref_ctx, ref_out = _run(unet, te, ids, sample, t)
    base_ctx, base_out = _run(base_unet, base_te, ids, sample, t)
    assert (ref_out - base_out).abs().max() > 1e-2 and (ref_ctx - base_ctx).abs().max() > 1e-2  # the LoRA matters

    tensors = kf.peft_to_kohya(get_peft_model_state_dict(unet), get_peft_model_state_dict(te),
                               unet_alpha=lt.module_alphas(unet), te_alpha=lt.module_alphas(te))
    path = tmp_path / "face.safetensors"
    kf.save_kohya_lora(path, tensors, {"ss_network_module": "networks.lora"}, dtype="fp32")

    # diffusers: file -> its kohya conversion -> its own peft loading, on fresh copies of the base models
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    n_modules = len([k for k in tensors if k.endswith(".alpha")])
    assert len(alphas) == n_modules and len(state_dict) == 2 * n_modules  # nothing dropped, nothing left over
    new_unet, new_te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet=new_unet, adapter_name="face")
    StableDiffusionPipeline.load_lora_into_text_encoder(state_dict, alphas, text_encoder=new_te, adapter_name="face")
    assert len(_lora_modules(new_unet)) == len(_lora_modules(unet))
    assert len(_lora_modules(new_te)) == len(_lora_modules(te))
    ctx, out = _run(new_unet, new_te, ids, sample, t)
    torch.testing.assert_close(ctx, ref_ctx, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)


def _lora_modules(model):
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and getattr(m, "r", None)]


def test_delta_weights_equal_peft_merge(tmp_path):
    """kohya_delta_weights (the A1111/ComfyUI merge) equals peft's own delta, per module, linear and conv."""
    unet = tiny_unet()
    unet.add_adapter(lt.unet_lora_config(unet, rank=4, alpha=3, conv_rank=2, conv_alpha=5))
    _randomise_lora(unet, 12)
    from peft.utils import get_peft_model_state_dict

    tensors = kf.peft_to_kohya(get_peft_model_state_dict(unet), unet_alpha=lt.module_alphas(unet))
    deltas = kf.kohya_delta_weights(tensors, multiplier=0.7)
    modules = dict(unet.named_modules())
    assert len(deltas) == len(_lora_modules(unet))
    for kname, delta in deltas.items():
        _, path = kf.parse_kohya_module_name(kname)
        layer = modules[path]
        ref = layer.get_delta_weight("default") * 0.7
        assert delta.shape == layer.base_layer.weight.shape
        torch.testing.assert_close(delta, ref, atol=1e-6, rtol=1e-5)


# --- files: hashes, atomicity, errors ----------------------------------------------------------------

def _independent_data_sha256(path) -> str:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + n)
        return hashlib.sha256(fh.read()).hexdigest()


def _big_lora():
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for i in range(6):  # ~2.4 MB in fp16, so the legacy hash window 0x100000..0x110000 holds data
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn{1 + i % 2}_to_{'qkv'[i % 3]}{i}"
        tensors[f"{name}.lora_down.weight"] = torch.randn(64, 1600, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(1600, 64, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(32.0)
    return tensors


def test_save_writes_kohyas_hashes_and_string_metadata(tmp_path):
    tensors = _big_lora()
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "64", "modelspec.title": "x", "facediffuser_trigger": "sks"}
    path = tmp_path / "out" / "face.safetensors"
    written = kf.save_kohya_lora(path, tensors, meta, dtype="fp16")
    assert os.listdir(path.parent) == ["face.safetensors"]  # atomic: no temp file left behind

    loaded, file_meta = kf.load_kohya_lora(path)
    assert file_meta == written and all(isinstance(v, str) for v in file_meta.values())
    assert file_meta["sshs_model_hash"] == _independent_data_sha256(path)
    # legacy hash, kohya's way: the file re-serialised with only the ss_ metadata, sha256 of 0x100000..0x110000
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    ss_only = {k: v for k, v in header["__metadata__"].items() if k.startswith("ss_") and not k.startswith("sshs_")}
    save_file(load_file(path), tmp_path / "ss_only.safetensors", metadata=ss_only)
    legacy = hashlib.sha256((tmp_path / "ss_only.safetensors").read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert file_meta["sshs_legacy_hash"] == legacy
    # dtypes: weights as asked, alpha float32 (true value)
    assert loaded["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q0.lora_down.weight"].dtype == torch.float16
    assert loaded["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q0.alpha"].dtype == torch.float32


def test_save_refuses_non_string_metadata_and_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        kf.save_kohya_lora(tmp_path / "a.safetensors", _big_lora(), {"ss_network_dim": 16})  # type: ignore[dict-item]
    with pytest.raises(UserError):
        kf.save_kohya_lora(tmp_path / "a.safetensors", {"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, {})
    assert os.listdir(tmp_path) == []


def test_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        kf.save_kohya_lora(tmp_path / "a.safetensors", _big_lora(), {})
    assert os.listdir(tmp_path) == []


def _one_line_error(path, match):
    with pytest.raises(UserError, match=match) as exc:
        kf.load_kohya_lora(path)
    assert "\n" not in str(exc.value)


def test_load_rejects_what_is_not_a_lora_with_one_line(tmp_path):
    _one_line_error(tmp_path / "missing.safetensors", "not found")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + os.urandom(64))
    _one_line_error(junk, "junk.safetensors: not a valid safetensors file")
    truncated = tmp_path / "trunc.safetensors"
    kf.save_kohya_lora(truncated, _big_lora(), {})
    truncated.write_bytes(truncated.read_bytes()[:5000])
    _one_line_error(truncated, "trunc.safetensors: safetensors file is truncated")
    ckpt = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, ckpt)
    _one_line_error(ckpt, "full model checkpoint")
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, loha)
    _one_line_error(loha, "LyCORIS")
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te2_text_model_x.lora_down.weight": torch.zeros(2, 2), "lora_te2_text_model_x.lora_up.weight": torch.zeros(2, 2)}, sdxl)
    _one_line_error(sdxl, "SDXL")
    pt = tmp_path / "x.ckpt"
    pt.write_bytes(b"abc")
    _one_line_error(pt, "must be .safetensors")


# --- metadata -----------------------------------------------------------------------------------------

def _config(tmp_path, **kw):
    from facediffuser.trainer.config import TrainConfig

    return TrainConfig(model="/models/v1-5-pruned.safetensors", data=str(tmp_path / "faces"),
                       output=str(tmp_path / "sks_face.safetensors"), rank=16, alpha=8, **kw)


def _images(tmp_path, n=3):
    d = tmp_path / "faces"
    d.mkdir(exist_ok=True)
    files = []
    for i in range(n):
        f = d / f"{i}.png"
        f.write_bytes(f"fake image {i}".encode())
        files.append(f)
    return files


def test_build_metadata_is_kohya_compatible_and_all_strings(tmp_path):
    files = _images(tmp_path)
    cfg = _config(tmp_path, trigger="sks", conv_rank=4, conv_alpha=1, flip=True)
    meta = kf.build_metadata(cfg, image_files=files, captions=["sks, a photo, Smiling", "sks, a photo", "sks"],
                             steps_done=100, max_train_steps=100, epoch=34, num_epochs=34,
                             started_at=1_700_000_000.0, finished_at=1_700_000_600.5, clip_skip=2,
                             base_model_sha256="ab" * 32)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    expect = {
        "ss_network_module": "networks.lora", "ss_network_dim": "16", "ss_network_alpha": "8.0",
        "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_output_name": "sks_face",
        "ss_resolution": "(512, 512)", "ss_num_train_images": "3", "ss_clip_skip": "2", "ss_steps": "100",
        "ss_sd_model_name": "v1-5-pruned.safetensors", "ss_new_sd_model_hash": "ab" * 32, "ss_flip_aug": "True",
        "ss_training_started_at": "1700000000.0", "ss_training_finished_at": "1700000600.5",
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.resolution": "512x512",
        "modelspec.prediction_type": "epsilon", "modelspec.trigger_phrase": "sks", "modelspec.title": "sks_face",
        "modelspec.encoder_layer": "2", "facediffuser_trigger": "sks",
    }
    assert {k: meta.get(k) for k in expect} == expect
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1.0"}
    assert json.loads(meta["ss_tag_frequency"]) == {"faces": {"sks": 3, "a photo": 2, "smiling": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"faces": {"n_repeats": 1, "img_count": 3}}
    assert json.loads(meta["ss_bucket_info"])["buckets"]["0"] == {"resolution": [512, 512], "count": 3}
    assert meta["modelspec.date"].startswith("2023-11-14T22:")
    for key in ("ss_learning_rate", "ss_unet_lr", "ss_text_encoder_lr", "ss_seed", "ss_mixed_precision", "ss_epoch",
                "ss_num_epochs", "ss_max_train_steps", "ss_lr_scheduler", "ss_batch_size_per_device",
                "ss_gradient_accumulation_steps", "ss_cache_latents", "ss_caption_dropout_rate", "ss_keep_tokens",
                "ss_shuffle_caption", "ss_noise_offset", "ss_min_snr_gamma"):
        assert key in meta, key


def test_build_metadata_versions_and_optional_keys(tmp_path):
    files = _images(tmp_path, 1)
    common = dict(image_files=files, captions=["a"], steps_done=1, max_train_steps=1, epoch=1, num_epochs=1, started_at=0.0)
    m1 = kf.build_metadata(_config(tmp_path), **common)
    assert "ss_network_args" not in m1 and "modelspec.trigger_phrase" not in m1 and "ss_new_sd_model_hash" not in m1
    assert m1["ss_clip_skip"] == "None"
    m2 = kf.build_metadata(_config(tmp_path), v2=True, v_prediction=True, **common)
    assert (m2["ss_base_model_version"], m2["ss_v2"], m2["modelspec.architecture"], m2["modelspec.prediction_type"]) == \
        ("sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "v")
    m3 = kf.build_metadata(_config(tmp_path), v2=True, **common)
    assert (m3["ss_base_model_version"], m3["modelspec.architecture"]) == ("sd_v2", "stable-diffusion-v2-512/lora")


def test_training_image_digests_let_the_evaluator_spot_overlap(tmp_path):
    files = _images(tmp_path)
    meta = kf.build_metadata(_config(tmp_path), image_files=files, captions=["a"] * 3, steps_done=1,
                             max_train_steps=1, epoch=1, num_epochs=1, started_at=0.0)
    stored = json.loads(meta[kf.META_TRAIN_IMAGES])
    assert stored == sorted(hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files)  # independent sha256
    copy_of_train = tmp_path / "elsewhere.png"
    copy_of_train.write_bytes(files[1].read_bytes())
    other = tmp_path / "other.png"
    other.write_bytes(b"a different face")
    assert kf.is_training_image(meta, copy_of_train) is True
    assert kf.is_training_image(meta, other) is False
    assert kf.is_training_image({"ss_network_module": "networks.lora"}, other) is None  # kohya's files don't say
    # the digests survive a save/load
    path = tmp_path / "l.safetensors"
    kf.save_kohya_lora(path, _big_lora(), meta)
    assert kf.training_image_digests(kf.load_kohya_lora(path)[1]) == frozenset(stored)
