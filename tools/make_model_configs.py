"""Regenerate the diffusers-style config files shipped in ``sd/model_files/configs/``.

Why: loading must work offline, so the small JSON configs of the released Stable Diffusion models
ship inside the package. The values below are the architecture of the public releases
(runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-base (512, epsilon) and
stabilityai/stable-diffusion-2-1 (768, v-prediction)); only fields that matter to diffusers are
kept, and no ``_diffusers_version`` is written so that the output does not depend on the installed
library. Run: ``python tools/make_model_configs.py`` (writes the files, sorted keys, LF endings).
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "sd" / "model_files" / "configs"

_SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": False,
    "upcast_attention": False,
}

_SD2_UNET = dict(
    _SD15_UNET,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    use_linear_projection=True,
)

_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# OpenCLIP ViT-H/14 text tower as diffusers uses it: 23 of its 24 layers (SD2 conditions on the
# penultimate layer), no projection.
_OPENCLIP_H = dict(
    _CLIP_L,
    hidden_act="gelu",
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    projection_dim=512,
)

_SCHED_COMMON = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}

_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def configs() -> dict[str, dict[str, dict]]:
    """family -> {relative file path: content}."""
    sd15 = {
        "model_index.json": _MODEL_INDEX,
        "unet/config.json": _SD15_UNET,
        "vae/config.json": _VAE,
        "text_encoder/config.json": _CLIP_L,
        "scheduler/scheduler_config.json": dict(
            _SCHED_COMMON, _class_name="PNDMScheduler", skip_prk_steps=True, prediction_type="epsilon"
        ),
    }
    ddim = dict(_MODEL_INDEX, scheduler=["diffusers", "DDIMScheduler"])
    sd2 = {
        "model_index.json": ddim,
        "unet/config.json": _SD2_UNET,
        "vae/config.json": _VAE,
        "text_encoder/config.json": _OPENCLIP_H,
        "scheduler/scheduler_config.json": dict(
            _SCHED_COMMON, _class_name="DDIMScheduler", prediction_type="epsilon"
        ),
    }
    # 768-v (SD 2.1): same tensors, 96x96 latents, v-prediction, attention upcast in fp16.
    sd2_v = {
        "model_index.json": ddim,
        "unet/config.json": dict(_SD2_UNET, sample_size=96, upcast_attention=True),
        "vae/config.json": dict(_VAE, sample_size=768),
        "text_encoder/config.json": _OPENCLIP_H,
        "scheduler/scheduler_config.json": dict(
            _SCHED_COMMON, _class_name="DDIMScheduler", prediction_type="v_prediction"
        ),
    }
    return {"sd15": sd15, "sd2": sd2, "sd2-v": sd2_v}


def main() -> None:
    for family, files in configs().items():
        for rel, content in files.items():
            path = OUT / family / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8", newline="\n")
            print(path.relative_to(OUT.parent.parent.parent))


if __name__ == "__main__":
    main()
