"""Which modules get a LoRA adapter: kohya's default set, as exact peft ``target_modules`` lists.

kohya (``networks/lora.py``) picks modules by the *class* of their parent, not by a name regex:
every ``Linear`` and ``Conv2d`` inside each ``Transformer2DModel`` of the UNet (192 for SD1.5,
"LoRA-LierLa"), every ``Linear`` inside CLIP's attention and MLP blocks (72), and with LoCon
("LoRA-C3Lier", ``conv_dim``) also the children of ``ResnetBlock2D`` / ``Downsample2D`` /
``Upsample2D`` (86 more). We walk the model the same way and hand peft the *full* module names, so
there is no regex ambiguity (``proj_in`` of a resnet, ``to_q`` of some other attention ...).
Walking ``named_modules()`` needs no weights, so it works on a model built on the ``meta`` device.

In kohya, the LoCon set's ``Linear`` and 1x1 convs (``time_emb_proj``, ``conv_shortcut``) use the
network rank and alpha; only the 3x3 convs use the conv rank and alpha. :func:`unet_lora_config`
reproduces that with peft's ``rank_pattern`` / ``alpha_pattern`` keyed by escaped exact names.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # heavy imports stay inside functions (see docs/internals.md)
    import torch
    from peft import LoraConfig

# kohya networks/lora.py: UNET_TARGET_REPLACE_MODULE, ..._CONV2D_3X3, TEXT_ENCODER_TARGET_REPLACE_MODULE
UNET_ATTENTION_PARENTS: tuple[str, ...] = ("Transformer2DModel",)
UNET_CONV_PARENTS: tuple[str, ...] = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_PARENTS_RE = re.compile(r"^CLIP\w*(Attention|MLP)$")  # CLIPAttention, CLIPSdpaAttention, CLIPMLP


def _is_linear(module: "torch.nn.Module") -> bool:
    return type(module).__name__ == "Linear"


def _is_conv2d(module: "torch.nn.Module") -> bool:
    return type(module).__name__ == "Conv2d"


def _is_3x3_conv(module: "torch.nn.Module") -> bool:
    """A conv that is not 1x1: kohya gives it the conv rank instead of the network rank."""
    return _is_conv2d(module) and tuple(module.kernel_size) != (1, 1)


def _inside_adapter(name: str) -> bool:
    """A layer peft added (``to_q.base_layer``, ``to_q.lora_A.default``): on an already wrapped model
    the target is the wrapper (peft's own ``Linear``/``Conv2d``), never its insides."""
    return any(part == "base_layer" or part.startswith("lora_") for part in name.split("."))


def _children_of(model: "torch.nn.Module", parent_classes: Iterable[str] | re.Pattern[str]) -> list[str]:
    """Full names of every Linear/Conv2d below a module whose class matches, in model order."""
    def matches(cls_name: str) -> bool:
        if isinstance(parent_classes, re.Pattern):
            return bool(parent_classes.match(cls_name))
        return cls_name in parent_classes

    found: dict[str, None] = {}  # ordered set: a child of two nested parents is listed once
    for name, module in model.named_modules():
        if not matches(type(module).__name__):
            continue
        for child_name, child in module.named_modules():
            if child_name and (_is_linear(child) or _is_conv2d(child)) and not _inside_adapter(child_name):
                found[f"{name}.{child_name}" if name else child_name] = None
    return list(found)


def unet_target_modules(unet: "torch.nn.Module", *, conv: bool = False) -> list[str]:
    """Exact module names of a diffusers ``UNet2DConditionModel`` that kohya trains.

    ``conv=False``: the LierLa set (192 for SD1.5). ``conv=True`` adds the LoCon set (+86)."""
    names = _children_of(unet, UNET_ATTENTION_PARENTS)
    if conv:
        seen = set(names)
        names += [n for n in _children_of(unet, UNET_CONV_PARENTS) if n not in seen]
    if not names:
        raise UserError(f"no LoRA target modules found in the UNet ({type(unet).__name__}): expected diffusers Transformer2DModel blocks")
    return names


def unet_conv3x3_modules(unet: "torch.nn.Module") -> list[str]:
    """The LoCon modules that take the conv rank/alpha (kernel larger than 1x1)."""
    modules = dict(unet.named_modules())
    return [n for n in _children_of(unet, UNET_CONV_PARENTS) if _is_3x3_conv(modules[n])]


def text_encoder_target_modules(text_encoder: "torch.nn.Module") -> list[str]:
    """Exact module names of a transformers ``CLIPTextModel`` that kohya trains (72 for ViT-L).

    The names are the model's own (transformers 5: ``encoder.layers.0.self_attn.q_proj``; 4.x:
    ``text_model.encoder...``), because peft matches against them; the kohya key always carries
    ``text_model_`` — that is :mod:`.kohya_format`'s business, not this one's."""
    modules = dict(text_encoder.named_modules())
    names = [n for n in _children_of(text_encoder, TEXT_ENCODER_PARENTS_RE) if _is_linear(modules[n])]
    if not names:
        raise UserError(f"no LoRA target modules found in the text encoder ({type(text_encoder).__name__}): expected a CLIP text model")
    return names


def _exact(name: str) -> str:
    """A peft pattern key that matches exactly this module: peft does ``re.match(rf"(.*\\.)?({key})$")``."""
    return re.escape(name)


def _lora_config(targets: list[str], rank: int, alpha: float, dropout: float,
                 rank_pattern: Mapping[str, int], alpha_pattern: Mapping[str, float], use_dora: bool = False) -> "LoraConfig":
    from peft import LoraConfig

    if rank < 1:
        raise UserError(f"LoRA rank must be at least 1 (got {rank})")
    return LoraConfig(
        r=int(rank),
        lora_alpha=float(alpha),
        lora_dropout=float(dropout),
        target_modules=list(targets),
        rank_pattern={_exact(k): int(v) for k, v in rank_pattern.items()},
        alpha_pattern={_exact(k): float(v) for k, v in alpha_pattern.items()},
        init_lora_weights=True,  # kaiming-uniform A, zero B: kohya's ("microsoft's") init
        use_rslora=False,  # kohya's scale is alpha/r; rsLoRA would need alpha*sqrt(r) in the file
        use_dora=bool(use_dora),  # DoRA: + a magnitude per output channel (kohya dora_scale)
        bias="none",
    )


def unet_lora_config(unet: "torch.nn.Module", *, rank: int, alpha: float | None = None, dropout: float = 0.0,
                     conv_rank: int = 0, conv_alpha: float | None = None, use_dora: bool = False) -> "LoraConfig":
    """The peft ``LoraConfig`` for kohya's UNet set; ``conv_rank > 0`` adds LoCon (3x3 convs at conv rank).

    ``alpha``/``conv_alpha`` default to the rank (scale 1), as ``TrainConfig`` documents."""
    alpha = float(rank if alpha is None else alpha)
    conv = conv_rank > 0
    targets = unet_target_modules(unet, conv=conv)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if conv:
        c_alpha = float(conv_rank if conv_alpha is None else conv_alpha)
        for name in unet_conv3x3_modules(unet):
            rank_pattern[name] = conv_rank
            alpha_pattern[name] = c_alpha
    return _lora_config(targets, rank, alpha, dropout, rank_pattern, alpha_pattern, use_dora)


def text_encoder_lora_config(text_encoder: "torch.nn.Module", *, rank: int, alpha: float | None = None,
                             dropout: float = 0.0, use_dora: bool = False) -> "LoraConfig":
    """The peft ``LoraConfig`` for kohya's CLIP text-encoder set."""
    alpha = float(rank if alpha is None else alpha)
    return _lora_config(text_encoder_target_modules(text_encoder), rank, alpha, dropout, {}, {}, use_dora)


def lora_config_from_modules(ranks: Mapping[str, int], alphas: Mapping[str, float], *, dropout: float = 0.0,
                             use_dora: bool = False) -> "LoraConfig":
    """A ``LoraConfig`` that recreates per-module ranks and alphas exactly (e.g. read back from a
    kohya file by :func:`.kohya_format.kohya_to_peft`): the most common rank/alpha are the
    defaults, every other module gets an exact-name ``rank_pattern`` / ``alpha_pattern`` entry."""
    if not ranks:
        raise UserError("no LoRA modules given: the adapter is empty")
    if set(ranks) != set(alphas):
        raise UserError("LoRA ranks and alphas name different modules")
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    rank_pattern = {k: r for k, r in ranks.items() if r != rank}
    alpha_pattern = {k: a for k, a in alphas.items() if a != alpha}
    return _lora_config(list(ranks), rank, alpha, dropout, rank_pattern, alpha_pattern, use_dora)


def module_alphas(model: "torch.nn.Module", adapter_name: str = "default") -> dict[str, float]:
    """The kohya alpha of every LoRA layer of a live peft-wrapped model: ``scaling * r``.

    Reading the layers (not the config) gives the true value whatever produced it — rank/alpha
    patterns, rsLoRA (``alpha*sqrt(r)``) — so the file scales exactly like the trained model."""
    out: dict[str, float] = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        r = getattr(module, "r", None)
        if isinstance(scaling, dict) and isinstance(r, dict) and adapter_name in scaling and adapter_name in r:
            out[name.removeprefix("base_model.model.")] = float(scaling[adapter_name]) * float(r[adapter_name])
    return out
