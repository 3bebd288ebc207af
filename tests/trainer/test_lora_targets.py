"""Which modules get adapters: kohya's set on the real SD1.5 architecture (built on the meta
device, no weights), checked against lists written out by hand from kohya's rule, and the peft
configs (ranks, alphas, init) the trainer gets from lora_targets."""

from __future__ import annotations

import math

import pytest
import torch

from facediffuser.errors import UserError
from facediffuser.trainer import lora_targets as lt

# --- the SD1.5 architecture on the meta device ------------------------------------------------------

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
VIT_L_TEXT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408)


@pytest.fixture(scope="session")
def sd15_meta():
    """(unet, text_encoder) with SD1.5's exact module tree and shapes, on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        te = CLIPTextModel(CLIPTextConfig(**VIT_L_TEXT))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # the SD1.5 UNet
    return unet, te


# --- kohya's module list, written out by hand (independent of lora_targets) -------------------------

ATTN_BLOCKS = ([f"down_blocks.{i}.attentions.{j}" for i in range(3) for j in range(2)]
               + ["mid_block.attentions.0"]
               + [f"up_blocks.{i}.attentions.{j}" for i in (1, 2, 3) for j in range(3)])
ATTN_CHILDREN = (["proj_in", "proj_out"]
                 + [f"transformer_blocks.0.attn{a}.{m}" for a in (1, 2) for m in ("to_q", "to_k", "to_v", "to_out.0")]
                 + ["transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2"])
EXPECTED_UNET = {f"{b}.{c}" for b in ATTN_BLOCKS for c in ATTN_CHILDREN}
EXPECTED_TE = {f"encoder.layers.{i}.{m}" for i in range(12)
               for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")}
RESNETS = ([f"down_blocks.{i}.resnets.{j}" for i in range(4) for j in range(2)]
           + [f"mid_block.resnets.{j}" for j in range(2)]
           + [f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)])
SHORTCUTS = ["down_blocks.1.resnets.0", "down_blocks.2.resnets.0"] + [f"up_blocks.{i}.resnets.{j}" for i in range(4) for j in range(3)]
SAMPLERS = [f"down_blocks.{i}.downsamplers.0.conv" for i in range(3)] + [f"up_blocks.{i}.upsamplers.0.conv" for i in range(3)]
EXPECTED_CONV3 = {f"{r}.{c}" for r in RESNETS for c in ("conv1", "conv2")} | set(SAMPLERS)
EXPECTED_CONV = EXPECTED_CONV3 | {f"{r}.time_emb_proj" for r in RESNETS} | {f"{r}.conv_shortcut" for r in SHORTCUTS}


def test_hand_written_lists_have_kohyas_counts():
    assert (len(ATTN_BLOCKS), len(EXPECTED_UNET), len(EXPECTED_TE), len(EXPECTED_CONV)) == (16, 192, 72, 86)


def test_sd15_unet_targets_are_kohyas_lierla_set(sd15_meta):
    unet, _ = sd15_meta
    names = lt.unet_target_modules(unet)
    assert len(names) == len(set(names)) == 192
    assert set(names) == EXPECTED_UNET


def test_sd15_unet_conv_targets_add_the_86_locon_modules(sd15_meta):
    unet, _ = sd15_meta
    names = lt.unet_target_modules(unet, conv=True)
    assert len(names) == len(set(names)) == 192 + 86
    assert set(names) == EXPECTED_UNET | EXPECTED_CONV
    assert set(lt.unet_conv3x3_modules(unet)) == EXPECTED_CONV3


def test_sd15_text_encoder_targets_use_the_models_own_names(sd15_meta):
    _, te = sd15_meta
    names = lt.text_encoder_target_modules(te)
    assert len(names) == 72
    assert set(names) == EXPECTED_TE  # transformers 5: no text_model. level; peft matches these names
    modules = dict(te.named_modules())
    assert all(type(modules[n]).__name__ == "Linear" for n in names)


def test_targets_are_exact_names_that_peft_matches_once(sd15_meta):
    """peft matches list entries by ``key == t or key.endswith('.' + t)``: each full name must hit exactly one module."""
    unet, _ = sd15_meta
    targets = lt.unet_target_modules(unet, conv=True)
    all_names = [n for n, _ in unet.named_modules()]
    for t in targets:
        assert [n for n in all_names if n == t or n.endswith("." + t)] == [t]


def test_no_targets_is_a_user_error():
    with pytest.raises(UserError, match="no LoRA target modules"):
        lt.unet_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(UserError, match="text encoder"):
        lt.text_encoder_target_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# --- peft configs on a tiny model (real peft injection) ---------------------------------------------

def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(16, 32), cross_attention_dim=24, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and isinstance(getattr(m, "r", None), dict) and m.r}


def test_unet_lora_config_gives_kohya_ranks_alphas_and_init():
    unet = tiny_unet()
    cfg = lt.unet_lora_config(unet, rank=8, alpha=4, conv_rank=2, conv_alpha=1, dropout=0.1)
    unet.add_adapter(cfg)
    layers = _lora_layers(unet)
    expected = set(lt.unet_target_modules(unet, conv=True))
    assert set(layers) == expected
    conv3 = {"down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2", "down_blocks.0.downsamplers.0.conv",
             "up_blocks.0.upsamplers.0.conv", "up_blocks.1.resnets.1.conv2"}
    for name, layer in layers.items():
        if name in conv3 or name.endswith(("conv1", "conv2", "samplers.0.conv")):
            assert (layer.r["default"], layer.scaling["default"]) == (2, 0.5), name
        else:  # attention, time_emb_proj and 1x1 conv_shortcut take the network rank, as in kohya
            assert (layer.r["default"], layer.scaling["default"]) == (8, 0.5), name
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0, "kohya init: up (lora_B) starts at zero"
        assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
        assert layer.lora_dropout["default"].p == pytest.approx(0.1)
    # the 3x3 LoCon down projection keeps the conv's kernel and stride, like kohya's lora_down
    down = layers["down_blocks.0.downsamplers.0.conv"].lora_A["default"]
    assert (tuple(down.weight.shape), down.stride) == ((2, 16, 3, 3), (2, 2))
    # a kaiming-uniform(a=sqrt(5)) A is bounded by 1/sqrt(fan_in)
    a = layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].lora_A["default"].weight
    assert a.abs().max() <= 1 / math.sqrt(a.shape[1]) + 1e-6


def test_unet_lora_config_without_conv_and_default_alpha():
    unet = tiny_unet()
    cfg = lt.unet_lora_config(unet, rank=4)
    assert cfg.lora_alpha == 4 and not cfg.rank_pattern and cfg.init_lora_weights is True
    unet.add_adapter(cfg)
    assert set(_lora_layers(unet)) == set(lt.unet_target_modules(unet))


def test_module_alphas_read_the_true_scale_including_rslora():
    from peft import LoraConfig

    unet = tiny_unet()
    unet.add_adapter(lt.unet_lora_config(unet, rank=8, alpha=2, conv_rank=4, conv_alpha=3))
    alphas = lt.module_alphas(unet)
    assert alphas["down_blocks.0.attentions.0.proj_in"] == 2.0
    assert alphas["down_blocks.0.resnets.0.conv1"] == 3.0
    assert alphas["down_blocks.0.resnets.0.time_emb_proj"] == 2.0

    unet2 = tiny_unet()
    unet2.add_adapter(LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["to_q"]))
    (alpha,) = set(lt.module_alphas(unet2).values())
    assert alpha == pytest.approx(8 * math.sqrt(16))  # kohya's scale alpha/r must equal peft's 8/sqrt(16)


def test_lora_config_from_modules_recreates_per_module_ranks():
    unet = tiny_unet()
    targets = lt.unet_target_modules(unet, conv=True)
    ranks = {t: (3 if t.endswith("conv1") else 5) for t in targets}
    alphas = {t: (1.5 if "attn2" in t else 5.0) for t in targets}
    unet.add_adapter(lt.lora_config_from_modules(ranks, alphas))
    layers = _lora_layers(unet)
    assert set(layers) == set(targets)
    for name, layer in layers.items():
        assert layer.r["default"] == ranks[name], name
        assert layer.scaling["default"] == pytest.approx(alphas[name] / ranks[name]), name
    with pytest.raises(UserError):
        lt.lora_config_from_modules({}, {})
