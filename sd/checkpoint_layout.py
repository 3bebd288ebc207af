"""Key names: diffusers/transformers modules ⇄ the original single-file (LDM / CompVis) layout.

Why one module: the same map must write our random checkpoints (``make-model``), read user
checkpoints (``model_loading``) and stay bijective, so it is defined once, derived from the model
configs (so the tiny test models get the same names as the full ones), and tested both ways.

A map is ``{diffusers name: Target(ldm key, op)}``. ``op`` says how the tensor changes on the
way to the file:

- ``""``      identical tensor;
- ``"conv"``  VAE mid-block attention: Linear ``[o, i]`` in diffusers, 1x1 conv ``[o, i, 1, 1]`` in LDM;
- ``"T"``     OpenCLIP ``text_projection`` (the file stores the transpose of the Linear weight);
- ``"q"``, ``"k"``, ``"v"``  OpenCLIP fused ``attn.in_proj_weight/bias``: the three thirds, in order.

Prefixes in the file: ``model.diffusion_model.`` (UNet), ``first_stage_model.`` (VAE),
``cond_stage_model.transformer.text_model.`` (SD1, HF CLIP) and ``cond_stage_model.model.``
(SD2, OpenCLIP). Text-encoder names here always carry ``text_model.``; transformers 5 drops that
prefix from ``CLIPTextModel.state_dict()``, and :func:`diffusers_to_ldm` accepts both spellings.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, NamedTuple

import torch

from ..errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TE_PREFIX = "cond_stage_model.transformer."  # followed by text_model.*
SD2_TE_PREFIX = "cond_stage_model.model."

COMPONENTS = ("unet", "vae", "text_encoder")
TEXT_ENCODER_KINDS = ("sd1", "sd2")


class Target(NamedTuple):
    """Where one diffusers tensor lives in the single file, and how it is reshaped."""

    key: str
    op: str = ""


KeyMap = dict[str, Target]

# --- UNet ----------------------------------------------------------------------------------------

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_module_to_ldm(parts: list[str], config: Mapping[str, Any]) -> str:
    """Diffusers module path (split on '.') of a UNet parameter -> LDM module path."""
    per_block = int(config["layers_per_block"]) + 1  # LDM slots per level: L layers + the sampler
    kind = parts[0]
    if kind == "down_blocks":
        level, sub, idx, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if sub == "downsamplers":  # the last slot of the level
            return f"input_blocks.{1 + level * per_block + per_block - 1}.0.op"
        slot = 1 + level * per_block + idx
        if sub == "resnets":
            return f"input_blocks.{slot}.0.{_UNET_RESNET[rest[0]]}"
        return ".".join([f"input_blocks.{slot}.1", *rest])  # attentions: names are the same below
    if kind == "up_blocks":
        level, sub, idx, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if sub == "upsamplers":
            slot = level * per_block + per_block - 1
            has_attn = config["up_block_types"][level].startswith("CrossAttn")
            return f"output_blocks.{slot}.{2 if has_attn else 1}.conv"
        slot = level * per_block + idx
        if sub == "resnets":
            return f"output_blocks.{slot}.0.{_UNET_RESNET[rest[0]]}"
        return ".".join([f"output_blocks.{slot}.1", *rest])
    if kind == "mid_block":
        sub, idx, rest = parts[1], int(parts[2]), parts[3:]
        if sub == "resnets":
            return f"middle_block.{2 * idx}.{_UNET_RESNET[rest[0]]}"
        return ".".join(["middle_block.1", *rest])
    top = ".".join(parts)
    if top in _UNET_TOP:
        return _UNET_TOP[top]
    raise KeyError(top)


def unet_key_map(config: Mapping[str, Any]) -> KeyMap:
    """``{diffusers UNet parameter: Target}`` for a UNet2DConditionModel config (SD1.x / SD2.x)."""
    out: KeyMap = {}
    for name in _param_names("unet", _freeze(config)):
        module, param = name.rsplit(".", 1)
        out[name] = Target(UNET_PREFIX + _unet_module_to_ldm(module.split("."), config) + "." + param)
    return out


# --- VAE -----------------------------------------------------------------------------------------

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_module_to_ldm(parts: list[str], config: Mapping[str, Any]) -> tuple[str, str]:
    n_levels = len(config["block_out_channels"])
    side, rest = parts[0], parts[1:]
    if side not in ("encoder", "decoder"):  # quant_conv, post_quant_conv
        return ".".join(parts), ""
    head = rest[0]
    if head in ("conv_in", "conv_out"):
        return f"{side}.{head}", ""
    if head == "conv_norm_out":
        return f"{side}.norm_out", ""
    if head in ("down_blocks", "up_blocks"):
        level, sub, idx, tail = int(rest[1]), rest[2], int(rest[3]), rest[4:]
        ldm_level = level if head == "down_blocks" else n_levels - 1 - level  # LDM decoder counts up
        word = "down" if head == "down_blocks" else "up"
        if sub in ("downsamplers", "upsamplers"):
            return f"{side}.{word}.{ldm_level}.{'downsample' if sub == 'downsamplers' else 'upsample'}.conv", ""
        leaf = "nin_shortcut" if tail[0] == "conv_shortcut" else tail[0]
        return f"{side}.{word}.{ldm_level}.block.{idx}.{leaf}", ""
    if head == "mid_block":
        sub, idx, tail = rest[1], int(rest[2]), ".".join(rest[3:])
        if sub == "resnets":
            leaf = "nin_shortcut" if tail == "conv_shortcut" else tail
            return f"{side}.mid.block_{idx + 1}.{leaf}", ""
        op = "" if tail == "group_norm" else "conv"
        return f"{side}.mid.attn_1.{_VAE_ATTN[tail]}", op
    raise KeyError(".".join(parts))


def vae_key_map(config: Mapping[str, Any]) -> KeyMap:
    """``{diffusers AutoencoderKL parameter: Target}``; mid-block attention Linears become 1x1 convs."""
    out: KeyMap = {}
    for name in _param_names("vae", _freeze(config)):
        module, param = name.rsplit(".", 1)
        ldm, op = _vae_module_to_ldm(module.split("."), config)
        out[name] = Target(VAE_PREFIX + ldm + "." + param, op if param == "weight" else "")
    return out


# --- text encoders -------------------------------------------------------------------------------

_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _clip_names(n_layers: int) -> list[str]:
    names = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    for i in range(n_layers):
        for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                    "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"):
            names += [f"text_model.encoder.layers.{i}.{mod}.weight", f"text_model.encoder.layers.{i}.{mod}.bias"]
    names += ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]
    return names


def text_encoder_key_map(kind: str, config: Mapping[str, Any], *, with_projection: bool = False) -> KeyMap:
    """``{HF CLIPTextModel name (with text_model.): Target}`` for ``kind`` "sd1" (HF CLIP-L layout
    in the file) or "sd2" (OpenCLIP layout).

    ``config["num_hidden_layers"]`` is the number of layers the map covers. For SD2 the released file
    holds the whole OpenCLIP text tower (24 layers, ``text_projection``, ``logit_scale``) while
    diffusers builds only the first 23 (SD2 conditions on the penultimate layer); pass the 24-layer
    count and ``with_projection=True`` to map everything in the file, which adds the names
    ``text_projection.weight`` (op "T") and ``logit_scale``.
    """
    n = int(config["num_hidden_layers"])
    names = _clip_names(n)
    out: KeyMap = {}
    if kind == "sd1":
        for name in names:
            out[name] = Target(SD1_TE_PREFIX + name)
        return out
    if kind != "sd2":
        raise ValueError(f"text encoder kind must be one of {TEXT_ENCODER_KINDS}, got {kind!r}")
    top = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for name in names:
        if name in top:
            out[name] = Target(SD2_TE_PREFIX + top[name])
            continue
        rest = name[len("text_model.encoder.layers."):]
        i, mod_param = rest.split(".", 1)
        mod, param = mod_param.rsplit(".", 1)
        base = f"{SD2_TE_PREFIX}transformer.resblocks.{i}."
        if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            out[name] = Target(base + f"attn.in_proj_{param}", mod[len("self_attn.")])
        else:
            out[name] = Target(base + _OPENCLIP_LAYER[mod] + "." + param)
    if with_projection:
        out["text_projection.weight"] = Target(SD2_TE_PREFIX + "text_projection", "T")
        out["logit_scale"] = Target(SD2_TE_PREFIX + "logit_scale")
    return out


def canonical_text_encoder_name(name: str) -> str:
    """transformers 5 ``CLIPTextModel`` names lack ``text_model.``; put it back (idempotent)."""
    if name.startswith("text_model.") or name in ("text_projection.weight", "logit_scale"):
        return name
    return "text_model." + name


# --- conversion ----------------------------------------------------------------------------------

def diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor], key_map: KeyMap) -> dict[str, torch.Tensor]:
    """Rename (and reshape/fuse) one component's diffusers state dict to single-file keys.

    Every tensor must be in ``key_map`` and every map entry must be present: a partial
    conversion would write a checkpoint that other tools silently half-load.
    """
    sd = {canonical_text_encoder_name(k) if k not in key_map else k: v for k, v in state_dict.items()}
    unknown = sorted(set(sd) - set(key_map))
    missing = sorted(set(key_map) - set(sd))
    if unknown or missing:
        raise KeyError(f"state dict does not match the key map: unknown {unknown[:3]}, missing {missing[:3]}")
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, (key, op) in key_map.items():
        t = sd[name]
        if op in ("q", "k", "v"):
            fused.setdefault(key, {})[op] = t
        elif op == "conv":
            out[key] = t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t
        elif op == "T":
            out[key] = t.t().contiguous()
        else:
            out[key] = t
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def ldm_to_diffusers(
    checkpoint: Mapping[str, torch.Tensor], key_map: KeyMap, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Pick one component out of a single-file state dict and give it diffusers names.

    With ``strict`` a key of the map that the file lacks raises ``KeyError`` naming it; keys of the
    file that the map does not cover are ignored (other components, EMA copies, schedule buffers).
    """
    out: dict[str, torch.Tensor] = {}
    for name, (key, op) in key_map.items():
        if key not in checkpoint:
            if strict:
                raise KeyError(key)
            continue
        t = checkpoint[key]
        if op in ("q", "k", "v"):
            third = t.shape[0] // 3
            i = "qkv".index(op)
            out[name] = t[i * third:(i + 1) * third]
        elif op == "conv":
            out[name] = t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t
        elif op == "T":
            out[name] = t.t().contiguous()
        else:
            out[name] = t
    return out


# --- parameter names from a config (models built on the meta device: no memory, no init) ----------

def _freeze(config: Mapping[str, Any]) -> str:
    import json

    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=list)


@lru_cache(maxsize=16)
def _param_names(component: str, frozen_config: str) -> tuple[str, ...]:
    import json

    from accelerate import init_empty_weights

    config = json.loads(frozen_config)
    if component == "unet":
        from diffusers import UNet2DConditionModel as cls
    else:
        from diffusers import AutoencoderKL as cls
    try:
        with init_empty_weights():
            model = cls.from_config(config)
    except Exception as exc:  # a shape-inferred config that diffusers cannot build
        raise UserError(f"cannot build a {component} from the inferred config ({exc})") from None
    return tuple(model.state_dict().keys())


def param_shapes(component: str, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{diffusers parameter: shape}`` of the UNet or VAE a config describes (no weights made)."""
    import json

    from accelerate import init_empty_weights

    cfg = json.loads(_freeze(config))
    if component == "unet":
        from diffusers import UNet2DConditionModel as cls
    else:
        from diffusers import AutoencoderKL as cls
    with init_empty_weights():
        model = cls.from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
