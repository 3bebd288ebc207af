"""The demo's FALLBACK base model, used only when the trained one (:mod:`.demo_model`) is not
installed: the tiny random SD1.5-shaped checkpoint with a hand-set "box" VAE.

Why: a randomly initialised VAE does not reconstruct images, so a LoRA trained through it could
not show anything on a picture; fitting a VAE costs minutes on 2 CPU cores. Instead the demo's VAE
is set analytically (no training) to a *box autoencoder*: the latent is the mean colour of each
4x4 pixel block (3 channels, the 4th is zero) and the decoder paints those means back as 4x4
blocks. Reconstruction is therefore an exact 4x-downsampled mosaic of the input: crude, but a
real, invertible-on-its-range autoencoder, so the UNet + LoRA have something to learn.

How, within the stock ``AutoencoderKL`` block structure (so every loader and the trainer use it
unchanged): every ResNet's second conv and the mid-block attention's output projection are zero
(the blocks become identities); ``conv_in`` writes each colour ``s`` as the channel pair
``(d*s, -d*s)``; 2x2 averaging downsamplers / nearest upsamplers carry it; the final GroupNorm
(groups of 2 channels) sees a zero group mean and a variance far below its eps, so it scales by a
constant instead of normalising; a bias keeps SiLU in its linear range and ``conv_out`` removes it.
UNet and text encoder are the tiny random ones of :func:`..sd.make_model.make_checkpoint`.
Everything is labelled in the file metadata and in the demo report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..fileio import atomic_path

DEMO_VAE_NOTE = ("box VAE set by hand (no training): latent = mean colour of each 4x4 block; decoder paints the blocks "
                 "back (a 4x-downsampled mosaic); not a learned image model")
_DELTA = 3e-5  # signal scale in the GroupNorm pairs: delta^2 * s^2 << eps (1e-6)
_BIAS = 10.0  # keeps SiLU(x) ~ x: sigmoid(10 - 1) > 0.9998
_LATENT_GAIN = 8.0  # latent = gain * block mean, so scaling_factor * latent has unit-ish spread


def box_vae_config() -> dict[str, Any]:
    from ..sd.make_model import model_configs

    cfg = model_configs("sd15", "tiny")["vae"]
    cfg.update(block_out_channels=[64, 64, 64], layers_per_block=1,
               down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3)
    return cfg


def build_box_vae(config: dict[str, Any] | None = None) -> "torch.nn.Module":  # noqa: F821
    """An ``AutoencoderKL`` with the box weights described in the module docstring."""
    import torch
    from diffusers import AutoencoderKL

    from ..rng import preserve_global_rng

    cfg = config or box_vae_config()
    with preserve_global_rng():  # every weight is set below; the default init is not the caller's draw
        vae = AutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    eps = float(vae.encoder.conv_norm_out.eps)
    gain = eps ** 0.5 / _DELTA  # undoes the GroupNorm's constant scale 1/sqrt(eps)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for norm in [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]:
            norm.weight.fill_(1.0)  # residual-branch norms: harmless (their branch outputs zero)

        def pairs_in(conv: torch.nn.Conv2d, n: int, scale: float) -> None:
            for k in range(n):  # input channel k -> channels (2k, 2k+1) = (d*s, -d*s), centre tap
                conv.weight[2 * k, k, 1, 1] = scale
                conv.weight[2 * k + 1, k, 1, 1] = -scale

        def norm_out(norm: torch.nn.GroupNorm, n: int) -> None:
            norm.weight.zero_()
            for c in range(2 * n):
                norm.weight[c] = gain
                norm.bias[c] = _BIAS

        enc, dec = vae.encoder, vae.decoder
        pairs_in(enc.conv_in, 3, _DELTA)
        for block in enc.down_blocks:
            for ds in block.downsamplers or []:  # stride-2 conv after a (0,1,0,1) pad: top-left 2x2 mean
                for c in range(ds.conv.out_channels):
                    ds.conv.weight[c, c, 0:2, 0:2] = 0.25
        norm_out(enc.conv_norm_out, 3)
        for k in range(3):  # latent mean channel k = gain * s_k; logvar very negative (std ~ 5e-5)
            enc.conv_out.weight[k, 2 * k, 1, 1] = _LATENT_GAIN
            enc.conv_out.bias[k] = -_LATENT_GAIN * _BIAS
        lat = vae.config.latent_channels
        enc.conv_out.bias[lat:] = -20.0
        for c in range(2 * lat):
            vae.quant_conv.weight[c, c, 0, 0] = 1.0
        for c in range(lat):
            vae.post_quant_conv.weight[c, c, 0, 0] = 1.0 / _LATENT_GAIN
        pairs_in(dec.conv_in, 3, _DELTA)
        for block in dec.up_blocks:
            for us in block.upsamplers or []:  # nearest x2, then an identity 3x3 conv
                for c in range(us.conv.out_channels):
                    us.conv.weight[c, c, 1, 1] = 1.0
        norm_out(dec.conv_norm_out, 3)
        for k in range(3):
            dec.conv_out.weight[k, 2 * k, 1, 1] = 1.0
            dec.conv_out.bias[k] = -_BIAS
    return vae.eval()


def make_random_demo_checkpoint(out: str | os.PathLike, *, seed: int = 0) -> Path:
    """Tiny random SD1.5-shaped UNet + text encoder (make-model, ``seed``) with the box VAE, written
    atomically as one single-file ``.safetensors`` (LDM layout) that every loader reads."""
    from safetensors.torch import save_file

    from ..sd import checkpoint_layout as layout
    from ..sd.make_model import build_state_dict, file_metadata

    out = Path(out)
    sd = {k: v for k, v in build_state_dict("sd15", "tiny", seed, "fp32").items() if not k.startswith(layout.VAE_PREFIX)}
    cfg = box_vae_config()
    vae = build_box_vae(cfg)
    sd.update(layout.diffusers_to_ldm({k: v.contiguous() for k, v in vae.state_dict().items()}, layout.vae_key_map(cfg)))
    meta = file_metadata("sd15", "tiny", seed, "fp32")
    meta["modelspec.title"] = f"FaceDiffuser DEMO model (random tiny UNet/CLIP seed {seed}, box VAE)"
    meta["facediffuser.demo_vae"] = json.dumps({"note": DEMO_VAE_NOTE, "downsample": 4})
    with atomic_path(out, fsync=True) as tmp:
        save_file(sd, str(tmp), metadata=meta)
    return out
