"""The demo's base model: a tiny SD1.5-shaped text-to-image model that draws toy SCENES, not faces.

Why: the demo trains a face LoRA and shows base vs fine-tuned samples. With a random model both
columns were coloured noise. This base model was trained (once, by
``tools/make_demo_base_model.py``, seeded) on captioned, procedurally drawn houses, trees,
mountains, boats, flowers and shapes (:mod:`.toy_scenes`) and never on a face, so its samples for
a face prompt are scenes, and what the LoRA adds — faces — shows at a glance.

What is in it (all the stock block types and the single-file LDM key layout, so the loader, the
trainer, the kohya LoRA code and the evaluation run on it unchanged):

* **VAE**: a real ``AutoencoderKL``, 3 levels (32, 64, 64 channels) — 4x downsampling, so a 64 px
  image is a 16x16x4 latent (SD's own VAE has 4 levels and 8x). Trained as an autoencoder on the
  scenes only (L1 + L2 + SD's tiny KL weight). Its latents are then standardised per channel and
  the shift and scale folded into ``quant_conv`` / ``post_quant_conv``, so that SD1.5's fixed
  ``scaling_factor`` (0.18215, which every loader assumes) gives unit-variance latents.
  Reconstruction PSNR on held-out scenes and on toy faces (which it never saw) is in the file's
  metadata and in the demo report.
* **UNet**: make-model's *tiny* SD1.5 UNet architecture (32/64 channels), with its cross-attention
  at the 8x8 level and in the mid block (see :func:`demo_unet_config`), trained from scratch with
  the SD1.5 noise schedule.
* **Text encoder**: make-model's tiny CLIP with seeded RANDOM weights, frozen during training (the
  UNet learned to read its outputs). It is not shipped: :func:`make_demo_checkpoint` rebuilds it
  from its seed and checks it against the SHA-256 recorded at training time.

The file ``model_files/demo_base_model.safetensors`` (written by the script; a few MB) holds the
UNet and VAE in fp16; :func:`make_demo_checkpoint` adds the text encoder and writes an ordinary
single-file checkpoint. Where the file is not installed the demo falls back to
:mod:`.random_demo_model` and says so in its report.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserError
from ..fileio import atomic_path

DEMO_BASE_FILE = Path(__file__).resolve().parent / "model_files" / "demo_base_model.safetensors"
TEXT_ENCODER_SEED = 0
META_RECIPE = "facediffuser.demo_base"
BASE_NOTE = ("tiny SD1.5-shaped model (UNet 32/64 ch, 4x VAE, 16x16 latents at 64 px) TRAINED on procedurally drawn "
             "non-face scenes — houses, trees, mountains, boats, flowers, shapes (demo/toy_scenes.py) — by "
             "tools/make_demo_base_model.py; frozen random-weight text encoder; not a real image model")


def demo_vae_config() -> dict[str, Any]:
    """3 levels (4x downsampling) of 32/64/64 channels, one ResNet per level."""
    from ..sd.make_model import model_configs

    cfg = model_configs("sd15", "tiny")["vae"]
    cfg.update(block_out_channels=[32, 64, 64], layers_per_block=1,
               down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
    return cfg


def demo_unet_config() -> dict[str, Any]:
    """make-model's tiny SD1.5 UNet with its cross-attention moved from the 16x16 level to the 8x8 one.

    Why: SD1's 8 heads are 4 channels wide at this width, and 256-token attention was two thirds
    of a training step on a CPU; at 64 tokens a step costs 0.33 s instead of 0.82 s (batch 16, 2
    cores), so the same hours train 2.4 times as many steps. The loader reads which blocks carry
    attention from the keys, so the file loads like any other."""
    from ..sd.make_model import model_configs

    cfg = model_configs("sd15", "tiny")["unet"]
    cfg.update(down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    return cfg


def text_encoder_tensors(seed: int = TEXT_ENCODER_SEED) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """make-model's tiny random SD1 text encoder (fp32), under its single-file keys."""
    from ..sd import checkpoint_layout as layout
    from ..sd.make_model import build_state_dict

    return {k: v for k, v in build_state_dict("sd15", "tiny", seed, "fp32").items() if k.startswith(layout.SD1_TE_PREFIX)}


@functools.lru_cache(maxsize=4)
def text_encoder_digest(seed: int = TEXT_ENCODER_SEED) -> str:
    """:func:`tensor_digest` of :func:`text_encoder_tensors` (cached: it builds a whole tiny model)."""
    return tensor_digest(text_encoder_tensors(seed))


def tensor_digest(tensors: Mapping[str, "torch.Tensor"]) -> str:  # noqa: F821
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_base_file(unet: Mapping[str, "torch.Tensor"], vae: Mapping[str, "torch.Tensor"],  # noqa: F821
                    out: str | os.PathLike, recipe: Mapping[str, Any]) -> Path:
    """The shipped file: UNet + VAE (diffusers names in, LDM keys out) in fp16, the text encoder's
    digest and the training recipe in the metadata; canonical bytes (same weights, same file)."""
    import torch

    from ..sd import checkpoint_layout as layout
    from ..sd.make_model import file_metadata, write_safetensors

    sd = layout.diffusers_to_ldm({k: v.detach().contiguous() for k, v in unet.items()}, layout.unet_key_map(demo_unet_config()))
    sd.update(layout.diffusers_to_ldm({k: v.detach().contiguous() for k, v in vae.items()}, layout.vae_key_map(demo_vae_config())))
    sd = {k: v.to(torch.float16) for k, v in sd.items()}
    meta = file_metadata("sd15", "tiny", TEXT_ENCODER_SEED, "fp16")
    del meta["facediffuser.make_model"]
    meta["modelspec.title"] = "FaceDiffuser DEMO base model (draws toy scenes, not faces)"
    meta[META_RECIPE] = json.dumps(dict(recipe, text_encoder_seed=TEXT_ENCODER_SEED,
                                        text_encoder_sha256=text_encoder_digest()), sort_keys=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, fsync=True) as tmp:
        write_safetensors(Path(tmp), sd, meta)
    return out


def base_model_recipe(base: str | os.PathLike = DEMO_BASE_FILE) -> dict[str, Any]:
    """The training recipe recorded in the shipped file (seed, steps, images, times, PSNR)."""
    from safetensors import safe_open

    path = Path(base)
    if not path.is_file():
        raise UserError(f"the demo base model {path} is missing; rebuild it with tools/make_demo_base_model.py "
                        "(or reinstall FaceDiffuser)")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if META_RECIPE not in meta:
        raise UserError(f"{path} is not a FaceDiffuser demo base model (no {META_RECIPE} metadata)")
    return json.loads(meta[META_RECIPE])


def make_demo_checkpoint(out: str | os.PathLike, *, base: str | os.PathLike = DEMO_BASE_FILE) -> Path:
    """The shipped UNet + VAE plus the rebuilt random text encoder, written atomically as one
    single-file ``.safetensors`` (LDM layout) that every loader reads."""
    from safetensors.torch import load_file

    from ..sd.make_model import file_metadata, schedule_buffers, write_safetensors

    recipe = base_model_recipe(base)
    te = text_encoder_tensors(int(recipe["text_encoder_seed"]))
    if tensor_digest(te) != recipe["text_encoder_sha256"]:
        raise UserError("make-model's tiny text encoder is no longer the one the demo base model was trained with "
                        "(its seeded weights changed); rebuild the model with tools/make_demo_base_model.py")
    sd = load_file(str(base))
    sd.update(te)
    sd.update(schedule_buffers())
    meta = file_metadata("sd15", "tiny", int(recipe["text_encoder_seed"]), "fp16")
    del meta["facediffuser.make_model"]
    meta["modelspec.title"] = "FaceDiffuser DEMO model (tiny; draws toy scenes, not faces)"
    meta[META_RECIPE] = json.dumps(recipe, sort_keys=True)
    out = Path(out)
    with atomic_path(out, fsync=True) as tmp:
        write_safetensors(Path(tmp), sd, meta)
    return out
