"""Seeded random Stable Diffusion checkpoints in the real single-file layout (``make-model``).

Why: no real weights exist in the test bed, so we make our own. ``full`` is exactly the released
architecture (SD1.5: UNet 859.5 M, CLIP ViT-L text encoder 123 M, VAE 83.7 M parameters; SD2: the
same VAE, the SD2 UNet and the whole OpenCLIP ViT-H text tower as the release file stores it);
``tiny`` keeps every block type and name (cross-attention, resnets, samplers, mid block, all text
encoder layers) with tiny widths, for fast unit tests.

Every tensor is drawn from its own generator, seeded by ``sha256(seed/component/name)``, so the file
depends only on (arch, size, dtype, seed) and :data:`LAYOUT_VERSION` — not on library init code,
thread counts or the order tensors are made in. Same inputs, same bytes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..fileio import atomic_path
from . import checkpoint_layout as layout
from .safetensors_io import encode_header

ARCHS = ("sd15", "sd2", "sd2-v")
SIZES = ("full", "tiny")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUT_VERSION = 1
"""Bump when the bytes written for given (arch, size, dtype, seed) change (test caches key on it)."""

CONFIG_DIR = Path(__file__).resolve().parent / "model_files" / "configs"

# Widths of the tiny models. The shape-free settings follow the family rules that
# model_loading uses to rebuild a config from tensor shapes (heads = width // 64, at least 1 for
# SD2 and the text encoders; 8 UNet heads for SD1; 32 norm groups), so a tiny file loads back exactly.
_TINY_UNET = {
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
}
_TINY_VAE = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}
_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64}


def load_family_config(family: str, component: str) -> dict[str, Any]:
    """A shipped diffusers/transformers config (``unet``, ``vae``, ``text_encoder``, ``scheduler``)."""
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    path = CONFIG_DIR / family / component / name
    return json.loads(path.read_text(encoding="utf-8"))


def text_heads(hidden_size: int) -> int:
    """CLIP-L (768) and OpenCLIP-H (1024) both use 64-wide heads; tiny widths get one head."""
    return max(1, hidden_size // 64)


def unet_heads(family: str, block_out_channels: list[int]) -> int | list[int]:
    """diffusers' (mis-named) ``attention_head_dim``: 8 heads for SD1, 64-wide heads for SD2."""
    if family == "sd15":
        return 8
    return [max(1, c // 64) for c in block_out_channels]


def model_configs(arch: str, size: str) -> dict[str, dict[str, Any]]:
    """The configs a diffusers folder of this model would hold: ``unet``, ``vae``, ``text_encoder``
    (for SD2 the 23-layer model diffusers builds) and ``scheduler``."""
    _check(arch, size)
    cfg = {c: load_family_config(arch, c) for c in ("unet", "vae", "text_encoder", "scheduler")}
    if size == "tiny":
        te = cfg["text_encoder"]
        te.update(_TINY_TEXT, num_attention_heads=text_heads(_TINY_TEXT["hidden_size"]))
        cfg["unet"].update(copy.deepcopy(_TINY_UNET), cross_attention_dim=te["hidden_size"])
        cfg["unet"]["attention_head_dim"] = unet_heads(arch.split("-")[0], cfg["unet"]["block_out_channels"])
        n = len(_TINY_VAE["block_out_channels"])
        cfg["vae"].update(copy.deepcopy(_TINY_VAE), down_block_types=["DownEncoderBlock2D"] * n,
                          up_block_types=["UpDecoderBlock2D"] * n)
    return cfg


def _check(arch: str, size: str) -> None:
    if arch not in ARCHS:
        raise UserError(f"--arch must be one of {', '.join(ARCHS)} (got {arch!r})")
    if size not in SIZES:
        raise UserError(f"--size must be one of {', '.join(SIZES)} (got {size!r})")


# --- tensors -------------------------------------------------------------------------------------

def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


_NORM_WORDS = ("norm", "ln_", "layer_norm")


def random_tensor(seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One float32 tensor, a pure function of (seed, name, shape). Weights ~ N(0, 1/fan_in);
    norm scales ~ 1 + N(0, .02); biases and embeddings ~ N(0, .02). Nothing is constant, so a
    swapped key in a converter cannot hide behind identical tensors."""
    if name.endswith("logit_scale"):
        return torch.tensor(math.log(1 / 0.07), dtype=torch.float32)
    t = torch.randn(shape, generator=_generator(seed, name), dtype=torch.float32)
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    if len(shape) == 1:
        if name.endswith(".weight") and any(w in leaf for w in _NORM_WORDS):
            return t.mul_(0.02).add_(1.0)
        return t.mul_(0.02)
    if "embedding" in name:
        return t.mul_(0.02)
    fan_in = math.prod(shape[1:])
    return t.mul_(1.0 / math.sqrt(fan_in))


def _clip_shapes(config: dict[str, Any], n_layers: int, with_projection: bool) -> dict[str, tuple[int, ...]]:
    h, inter = config["hidden_size"], config["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in layout.text_encoder_key_map("sd1", {"num_hidden_layers": n_layers}):
        if name.endswith("token_embedding.weight"):
            shapes[name] = (config["vocab_size"], h)
        elif name.endswith("position_embedding.weight"):
            shapes[name] = (config["max_position_embeddings"], h)
        elif ".mlp.fc1." in name:
            shapes[name] = (inter, h) if name.endswith("weight") else (inter,)
        elif ".mlp.fc2." in name:
            shapes[name] = (h, inter) if name.endswith("weight") else (h,)
        elif "_proj." in name and name.endswith("weight"):
            shapes[name] = (h, h)
        else:
            shapes[name] = (h,)
    if with_projection:
        shapes["text_projection.weight"] = (h, h)
        shapes["logit_scale"] = ()
    return shapes


def file_text_encoder_layers(arch: str, config: dict[str, Any]) -> int:
    """Layers the single file holds: SD2 files keep the last OpenCLIP layer diffusers drops."""
    return config["num_hidden_layers"] + (0 if arch == "sd15" else 1)


def component_tensors(
    arch: str = "sd15", size: str = "full", seed: int = 0, dtype: str = "fp32",
    components: tuple[str, ...] = layout.COMPONENTS,
) -> dict[str, dict[str, torch.Tensor]]:
    """The generated weights under diffusers names: ``{"unet": {...}, "vae": {...},
    "text_encoder": {...}}`` (text-encoder names with ``text_model.``; for SD2 all file layers plus
    ``text_projection.weight`` and ``logit_scale``). This is what :func:`make_checkpoint` writes,
    before renaming, so tests can compare any loader against it. ``components`` picks a subset."""
    cfg = model_configs(arch, size)
    torch_dtype = _dtype(dtype)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for comp in [c for c in ("unet", "vae") if c in components]:
        shapes = layout.param_shapes(comp, cfg[comp])
        out[comp] = {n: random_tensor(seed, f"{comp}/{n}", s).to(torch_dtype) for n, s in shapes.items()}
    if "text_encoder" not in components:
        return out
    te = cfg["text_encoder"]
    shapes = _clip_shapes(te, file_text_encoder_layers(arch, te), with_projection=arch != "sd15")
    out["text_encoder"] = {
        n: random_tensor(seed, f"text_encoder/{n}", s).to(torch.float32 if n == "logit_scale" else torch_dtype)
        for n, s in shapes.items()
    }
    return out


def key_maps(arch: str, size: str) -> dict[str, layout.KeyMap]:
    """The maps that place :func:`component_tensors` in the file."""
    cfg = model_configs(arch, size)
    te = dict(cfg["text_encoder"], num_hidden_layers=file_text_encoder_layers(arch, cfg["text_encoder"]))
    kind = "sd1" if arch == "sd15" else "sd2"
    return {
        "unet": layout.unet_key_map(cfg["unet"]),
        "vae": layout.vae_key_map(cfg["vae"]),
        "text_encoder": layout.text_encoder_key_map(kind, te, with_projection=kind == "sd2"),
    }


def schedule_buffers(num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> dict[str, torch.Tensor]:
    """The DDPM buffers the LDM code saves beside the weights (``betas``, ``alphas_cumprod``, ...),
    float32 as in the release files. Loaders ignore them; they make the file look like the real one."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    bufs = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.to(torch.float32) for k, v in bufs.items()}


def build_state_dict(arch: str = "sd15", size: str = "full", seed: int = 0, dtype: str = "fp16") -> dict[str, torch.Tensor]:
    """The whole single-file state dict (LDM keys) that :func:`make_checkpoint` writes."""
    tensors = component_tensors(arch, size, seed, dtype)
    maps = key_maps(arch, size)
    sd: dict[str, torch.Tensor] = {}
    for comp in layout.COMPONENTS:
        sd.update(layout.diffusers_to_ldm(tensors.pop(comp), maps[comp]))
    if arch == "sd15":  # the HF CLIP buffer the SD1 release files carry
        n_pos = model_configs(arch, size)["text_encoder"]["max_position_embeddings"]
        sd[layout.SD1_TE_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(n_pos, dtype=torch.int64)[None]
    sd.update(schedule_buffers())
    return sd


def file_metadata(arch: str, size: str, seed: int, dtype: str) -> dict[str, str]:
    """safetensors metadata: what made the file, and the SAI ModelSpec fields loaders read."""
    spec_arch = {"sd15": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sd2-v": "stable-diffusion-v2-768-v"}
    return {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": spec_arch[arch],
        "modelspec.title": f"FaceDiffuser random {arch} {size} seed {seed}",
        "modelspec.prediction_type": "v" if arch == "sd2-v" else "epsilon",
        "facediffuser.make_model": json.dumps(
            {"arch": arch, "size": size, "seed": seed, "dtype": dtype, "layout_version": LAYOUT_VERSION}, sort_keys=True
        ),
    }


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    return DTYPES[dtype]


_ST_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a .safetensors file with a canonical header (sorted keys, tensors in key order).

    Why not ``safetensors.save_file``: it serialises the metadata from a hash map, so the header's
    byte order changes from run to run, and same seed would not give the same bytes.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    with path.open("wb") as fh:
        fh.write(encode_header(header))
        for name in names:
            t = tensors[name].contiguous()
            fh.write(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")


def make_checkpoint(
    out: str | os.PathLike, arch: str = "sd15", size: str = "full", dtype: str = "fp16", seed: int = 0
) -> Path:
    """Write a seeded random checkpoint (single-file LDM layout, ``.safetensors``) atomically."""
    _check(arch, size)
    _dtype(dtype)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out must end in .safetensors (got {str(out)!r})")
    if out.is_dir():
        raise UserError(f"--out is a folder: {out}")
    sd = build_state_dict(arch, size, seed, dtype)
    with atomic_path(out, fsync=True) as tmp:
        write_safetensors(tmp, sd, file_metadata(arch, size, seed, dtype))
    return out
