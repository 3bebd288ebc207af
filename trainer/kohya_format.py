"""The kohya LoRA file format, in one place: the only module that builds LoRA key strings.

An adapter is data. This module converts it between two shapes, with pure functions and no model:

* **peft**: the state dicts that ``peft.get_peft_model_state_dict`` returns, keyed
  ``<module path>.lora_A.weight`` / ``.lora_B.weight`` (UNet paths as in diffusers; text-encoder
  paths with or without ``text_model.`` — transformers 5 dropped that level), plus one alpha per
  module (peft keeps alpha in its config, not in the state dict).
* **kohya** (sd-scripts ``networks/lora.py``, what A1111, ComfyUI, diffusers and sd-scripts load):
  ``lora_unet_<path, '.'->'_'>.lora_down.weight | .lora_up.weight | .alpha`` and
  ``lora_te_text_model_encoder_layers_<i>_<...>`` for the CLIP text encoder. Tensors keep peft's
  layout (``lora_A`` = ``lora_down`` ``[r, in(, kh, kw)]``, ``lora_B`` = ``lora_up``
  ``[out, r(, 1, 1)]``; the SD1.5 ``proj_in``/``proj_out`` 1x1 convs stay 4-D, kohya refuses 2-D).
  ``alpha`` is a 0-d float32 tensor holding the *true* alpha, so every loader computes
  ``ΔW = multiplier · alpha / r · up @ down`` — the same update peft applied during training.
* **DoRA** (peft ``use_dora=True``): each module also holds peft's ``lora_magnitude_vector``, written
  as ``<module>.dora_scale`` (float32) in LyCORIS's output-channel layout ``[out, 1]`` /
  ``[out, 1, 1, 1]`` that ComfyUI and Forge read; see the comment above :func:`dora_merged_weight`.

Files: :func:`save_kohya_lora` writes atomically with string metadata from :func:`build_metadata`
(the settings' own keys from :func:`settings_metadata`, driven by ``config.setting_specs()``; the
base checkpoint's ``ss_sd_model_hash``/``ss_new_sd_model_hash`` from :func:`base_model_hashes`)
and kohya's ``sshs_model_hash`` / ``sshs_legacy_hash``; :func:`load_kohya_lora` reads ours and
kohya's (missing alpha means alpha = rank; ``lora_te1_`` is accepted on read) and rejects anything
else with one line. Training-set membership for the evaluator's overlap guard:
:func:`image_digest`, :func:`training_image_digests`, :func:`is_training_image`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import UserError
from ..fileio import atomic_write_bytes, atomic_write_json, file_sha256
from ..sd.safetensors_io import Header, canonicalize, read_header, split_blob

if TYPE_CHECKING:  # torch/safetensors are imported inside functions (docs/internals.md)
    import torch

    from .config import TrainConfig

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
TE_READ_PREFIXES = ("lora_te_", "lora_te1_")  # lora_te1_ is diffusers' convert_state_dict_to_kohya spelling
TE_PATH_ROOT = "text_model."  # kohya's (transformers 4) CLIP module root; always in the key

DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
DORA_SCALE = "dora_scale"  # DoRA's magnitude (LyCORIS wd_on_output layout: [out, 1] / [out, 1, 1, 1])
KOHYA_SUFFIXES = (DOWN, UP, ALPHA, DORA_SCALE)
FLOAT32_SUFFIXES = (ALPHA, DORA_SCALE)  # saved float32 whatever the save precision

# Metadata keys of our own (the evaluator's overlap guard reads them).
META_TRIGGER = "facediffuser_trigger"
META_TRAIN_IMAGES = "facediffuser_train_images_sha256"
META_TRAIN_IMAGES_SCHEME = "facediffuser_train_images_hash"
IMAGE_DIGEST_HEX = 16  # 64 bits of sha256 per image: collisions are negligible at any dataset size
IMAGE_DIGEST_SCHEME = f"sha256(file bytes)[:{IMAGE_DIGEST_HEX}] hex, sorted JSON list"
# sha256 of the sorted JSON list of [image sha256, caption, mask sha256 or ""]: what was trained on,
# captions and face masks included (the ComfyUI node's reuse check compares it).
META_TRAIN_DATA = "facediffuser_train_data_sha256"
MODEL_HASH_CACHE = "model_hashes.json"  # in the training cache folder: {path: {size, mtime_ns, ...}}

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# peft's DoRA magnitude: ``<module>.lora_magnitude_vector`` in get_peft_model_state_dict, with the
# adapter name and ``.weight`` in named_parameters
_PEFT_MAGNITUDE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")

# Multi-word tokens of diffusers / transformers module paths. Reading a kohya name back splits it at
# '_' and re-joins these greedily (longest first); every other token is its own path component.
_COMPOUND_TOKENS = frozenset({
    # diffusers UNet
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "class_embedding",
    # transformers CLIP
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
    "layer_norm1", "layer_norm2", "token_embedding", "position_embedding",
})
_MAX_COMPOUND = max(t.count("_") + 1 for t in _COMPOUND_TOKENS)

Part = Literal["unet", "text_encoder"]


# --- names --------------------------------------------------------------------------------------

def _te_path(module: str) -> str:
    """A CLIP module path in kohya's form: always rooted at ``text_model.``."""
    module = module.removeprefix("base_model.model.")
    return module if module.startswith(TE_PATH_ROOT) else TE_PATH_ROOT + module


def kohya_module_name(module: str, part: Part) -> str:
    """``down_blocks.0....to_q`` -> ``lora_unet_down_blocks_0_..._to_q``;
    ``encoder.layers.0.mlp.fc1`` (or ``text_model.encoder...``) -> ``lora_te_text_model_encoder_layers_0_mlp_fc1``."""
    if part == "unet":
        return UNET_PREFIX + module.removeprefix("base_model.model.").replace(".", "_")
    if part == "text_encoder":
        return TE_PREFIX + _te_path(module).replace(".", "_")
    raise ValueError(f"part must be 'unet' or 'text_encoder', not {part!r}")


def _split_path(flat: str) -> str:
    parts = flat.split("_")
    out: list[str] = []
    i = 0
    while i < len(parts):
        for j in range(min(len(parts), i + _MAX_COMPOUND), i, -1):
            token = "_".join(parts[i:j])
            if j == i + 1 or token in _COMPOUND_TOKENS:
                out.append(token)
                i = j
                break
    return ".".join(out)


def parse_kohya_module_name(name: str, *, te_text_model: bool = False) -> tuple[Part, str]:
    """The reverse of :func:`kohya_module_name`: ``(part, peft module path)``.

    Text-encoder paths come back without ``text_model.`` (transformers 5 module names) unless
    ``te_text_model`` (transformers 4). ``lora_te1_`` is read like ``lora_te_``."""
    if name.startswith(UNET_PREFIX):
        return "unet", _split_path(name[len(UNET_PREFIX):])
    for prefix in TE_READ_PREFIXES:
        if name.startswith(prefix):
            path = _split_path(name[len(prefix):]).removeprefix(TE_PATH_ROOT)
            return "text_encoder", (TE_PATH_ROOT + path if te_text_model else path)
    raise UserError(f"LoRA key {name!r} is neither lora_unet_ nor lora_te_: not an SD1.x kohya LoRA module")


# --- peft <-> kohya -----------------------------------------------------------------------------

def _group_peft(sd: Mapping[str, "torch.Tensor"], what: str) -> dict[str, dict[str, "torch.Tensor"]]:
    """``{module: {"A": tensor, "B": tensor, "M"?: DoRA magnitude}}``, checked for completeness and
    matching ranks."""
    modules: dict[str, dict[str, Any]] = {}
    adapters: set[str] = set()
    for key, tensor in sd.items():
        m = _PEFT_KEY.match(key)
        kind = m["ab"] if m else None
        if not m:
            m = _PEFT_MAGNITUDE.match(key)
            kind = "M"
        if not m:
            raise UserError(f"{what} LoRA state dict has an unsupported key {key!r} (only lora_A/lora_B weights and DoRA magnitudes are supported: no biases or embeddings)")
        if m["adapter"]:
            adapters.add(m["adapter"])
        modules.setdefault(m["module"].removeprefix("base_model.model."), {})[kind] = tensor
    if len(adapters) > 1:
        raise UserError(f"{what} LoRA state dict holds several adapters ({', '.join(sorted(adapters))}); pass one")
    for module, ab in modules.items():
        if not {"A", "B"} <= set(ab):
            raise UserError(f"{what} LoRA module {module!r} lacks its lora_{'B' if 'A' in ab else 'A'} weight")
        a, b = ab["A"], ab["B"]
        if a.dim() not in (2, 4) or b.dim() != a.dim() or b.shape[1] != a.shape[0]:
            raise UserError(f"{what} LoRA module {module!r} has mismatched shapes lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}")
        if "M" in ab and ab["M"].numel() != b.shape[0]:
            raise UserError(f"{what} DoRA module {module!r} has a magnitude of {ab['M'].numel()} values for {b.shape[0]} output channels")
    return modules


# DoRA (peft ``use_dora=True``): W' = m · (W + s·ΔW) / ‖W + s·ΔW‖, the norm taken per output channel
# (over each row of a Linear weight, over in×kh×kw of a Conv2d one). peft keeps m as
# ``lora_magnitude_vector``: [out] for Linear, [1, out, 1, 1] for Conv2d. The kohya file stores it
# as ``dora_scale`` the way LyCORIS does for ``wd_on_output=True``: [out, 1] / [out, 1, 1, 1], the
# shape ComfyUI and Forge (``weight_decompose``: dora_scale.shape[0] == out) read as the output axis.
# The input-axis layout ([1, in], LyCORIS's old default, the one A1111 reads) is another
# decomposition, not a transpose of this one: it is refused on read, never written.

def _dora_scale_from_peft(magnitude: "torch.Tensor", down: "torch.Tensor") -> "torch.Tensor":
    """peft's magnitude -> kohya's ``dora_scale`` ([out, 1] or [out, 1, 1, 1])."""
    return magnitude.detach().reshape(magnitude.numel(), *([1] * (down.dim() - 1)))


def _dora_scale_to_peft(scale: "torch.Tensor", down: "torch.Tensor", up: "torch.Tensor", name: str,
                        source: str) -> "torch.Tensor":
    """kohya's ``dora_scale`` -> peft's magnitude, refusing the input-axis layout."""
    out = int(up.shape[0])
    if tuple(scale.shape) != (out,) + (1,) * (down.dim() - 1):
        if scale.dim() == down.dim() and scale.shape[0] == 1 and scale.numel() == down.shape[1]:
            raise UserError(f"{source}: DoRA module {name!r} stores its magnitude per input channel "
                            f"(dora_scale {tuple(scale.shape)}, LyCORIS wd_on_output=False); only the output-channel "
                            "layout (peft's, [out, 1]) can be trained here")
        raise UserError(f"{source}: DoRA module {name!r} has a dora_scale of shape {tuple(scale.shape)}; "
                        f"expected {(out,) + (1,) * (down.dim() - 1)} for its {out} output channels")
    return scale.reshape(out) if down.dim() == 2 else scale.reshape(1, out, 1, 1)


def dora_merged_weight(weight: "torch.Tensor", down: "torch.Tensor", up: "torch.Tensor", alpha: float,
                       dora_scale: "torch.Tensor", multiplier: float = 1.0) -> "torch.Tensor":
    """The weight a DoRA module gives a base weight, float32: ``m · V / ‖V‖`` with
    ``V = W + multiplier · alpha/r · up @ down`` and the norm per output channel (peft's merge)."""
    w = weight.float()
    delta = (up.float().flatten(1) @ down.float().flatten(1)).reshape(w.shape) * (multiplier * alpha / down.shape[0])
    v = w + delta
    norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(v.shape[0], *([1] * (v.dim() - 1)))
    return v * (dora_scale.float().reshape(norm.shape) / norm)


def _alpha_for(module: str, rank: int, alpha: float | Mapping[str, float] | None, part: Part) -> float:
    if alpha is None:
        return float(rank)
    if isinstance(alpha, Mapping):
        key = module if module in alpha else None
        if key is None and part == "text_encoder":  # accept either spelling of the CLIP path
            for cand in (_te_path(module), _te_path(module).removeprefix(TE_PATH_ROOT)):
                if cand in alpha:
                    key = cand
                    break
        if key is None:
            raise UserError(f"no alpha given for LoRA module {module!r}")
        return float(alpha[key])
    return float(alpha)


def peft_to_kohya(
    unet_sd: Mapping[str, "torch.Tensor"] | None,
    te_sd: Mapping[str, "torch.Tensor"] | None = None,
    *,
    unet_alpha: float | Mapping[str, float] | None = None,
    te_alpha: float | Mapping[str, float] | None = None,
) -> dict[str, "torch.Tensor"]:
    """peft state dicts -> kohya tensors (``lora_down``/``lora_up`` unchanged, plus a 0-d ``alpha``,
    and ``dora_scale`` for DoRA modules).

    ``*_alpha``: one alpha for every module, or ``{peft module path: alpha}`` (e.g.
    :func:`.lora_targets.module_alphas`), or None for alpha = rank (scale 1). The rank of each
    module is read from its tensors. Tensors are not copied or cast; :func:`save_kohya_lora` casts."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for part, sd, alpha in (("unet", unet_sd, unet_alpha), ("text_encoder", te_sd, te_alpha)):
        if not sd:
            continue
        what = "UNet" if part == "unet" else "text-encoder"
        for module, ab in _group_peft(sd, what).items():
            name = kohya_module_name(module, part)  # type: ignore[arg-type]
            if name + "." + DOWN in out:
                raise UserError(f"two {what} LoRA modules map to the same kohya name {name!r}")
            rank = int(ab["A"].shape[0])
            out[f"{name}.{DOWN}"] = ab["A"].detach()
            out[f"{name}.{UP}"] = ab["B"].detach()
            out[f"{name}.{ALPHA}"] = torch.tensor(_alpha_for(module, rank, alpha, part), dtype=torch.float32)  # type: ignore[arg-type]
            if "M" in ab:
                out[f"{name}.{DORA_SCALE}"] = _dora_scale_from_peft(ab["M"], ab["A"])
    if not out:
        raise UserError("the LoRA is empty: no UNet or text-encoder adapter weights to save")
    return out


@dataclass
class PeftLora:
    """A kohya file read back into peft terms, ready for ``set_peft_model_state_dict``."""

    unet: dict[str, "torch.Tensor"] = field(default_factory=dict)
    text_encoder: dict[str, "torch.Tensor"] = field(default_factory=dict)
    unet_alphas: dict[str, float] = field(default_factory=dict)  # peft module path -> true alpha
    text_encoder_alphas: dict[str, float] = field(default_factory=dict)

    @property
    def unet_ranks(self) -> dict[str, int]:
        return _ranks(self.unet)

    @property
    def text_encoder_ranks(self) -> dict[str, int]:
        return _ranks(self.text_encoder)

    @property
    def dora(self) -> bool:
        """Whether the adapter is DoRA (every module carries a ``lora_magnitude_vector``)."""
        return any(k.endswith(".lora_magnitude_vector") for k in (*self.unet, *self.text_encoder))


def _ranks(sd: Mapping[str, "torch.Tensor"]) -> dict[str, int]:
    return {k[: -len(".lora_A.weight")]: int(v.shape[0]) for k, v in sd.items() if k.endswith(".lora_A.weight")}


def _group_kohya(tensors: Mapping[str, "torch.Tensor"], source: str) -> dict[str, dict[str, "torch.Tensor"]]:
    """``{kohya module name: {"lora_down.weight": .., "lora_up.weight": .., "alpha"?: .., "dora_scale"?: ..}}``,
    validated (a DoRA file has a ``dora_scale`` in every module or in none)."""
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        if suffix not in KOHYA_SUFFIXES:
            kind = "LyCORIS/LoHa/LoKr" if any(s in suffix for s in ("hada_", "lokr_", "lora_mid")) else "unsupported"
            raise UserError(f"{source}: {kind} key {key!r}; only kohya LoRA and DoRA (lora_down/lora_up/alpha/dora_scale) are supported")
        if name.startswith("lora_te2_"):
            raise UserError(f"{source}: an SDXL LoRA (key {key!r}); FaceDiffuser trains and reads SD1.x/SD2.x LoRAs")
        if not name.startswith((UNET_PREFIX,) + TE_READ_PREFIXES):
            raise UserError(f"{source}: key {key!r} is not a kohya LoRA key (lora_unet_/lora_te_)")
        modules.setdefault(name, {})[suffix] = tensor
    for name, parts in modules.items():
        if DOWN not in parts or UP not in parts:
            raise UserError(f"{source}: LoRA module {name!r} lacks its {UP if DOWN in parts else DOWN}")
        down, up = parts[DOWN], parts[UP]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise UserError(f"{source}: LoRA module {name!r} has mismatched shapes lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)}")
        if ALPHA in parts and parts[ALPHA].numel() != 1:
            raise UserError(f"{source}: LoRA module {name!r} has a non-scalar alpha of shape {tuple(parts[ALPHA].shape)}")
    with_dora = [name for name, parts in modules.items() if DORA_SCALE in parts]
    if with_dora and len(with_dora) != len(modules):
        plain = next(name for name, parts in modules.items() if DORA_SCALE not in parts)
        raise UserError(f"{source}: {len(with_dora)} of {len(modules)} modules are DoRA (dora_scale) and the rest plain LoRA, "
                        f"e.g. {plain!r}; a file must be one or the other")
    return modules


def is_dora(tensors: Mapping[str, "torch.Tensor"]) -> bool:
    """Whether a kohya file's modules are DoRA (carry ``dora_scale``)."""
    return any(k.endswith("." + DORA_SCALE) for k in tensors)


def _alpha_value(parts: Mapping[str, "torch.Tensor"]) -> float:
    """kohya: missing (or zero) alpha means alpha = rank."""
    rank = int(parts[DOWN].shape[0])
    if ALPHA not in parts:
        return float(rank)
    value = float(parts[ALPHA].float().item())
    return value if value != 0.0 else float(rank)


def kohya_to_peft(tensors: Mapping[str, "torch.Tensor"], *, te_text_model: bool = False,
                  source: str = "LoRA") -> PeftLora:
    """kohya tensors -> :class:`PeftLora` (for continuing training from a file, ours or kohya's).

    ``te_text_model``: spell text-encoder paths with ``text_model.`` (transformers 4 module
    names); the default matches transformers 5. Rebuild the matching ``LoraConfig`` with
    :func:`.lora_targets.lora_config_from_modules` (ranks and alphas per module)."""
    out = PeftLora()
    for name, parts in _group_kohya(tensors, source).items():
        part, module = parse_kohya_module_name(name, te_text_model=te_text_model)
        sd, alphas = (out.unet, out.unet_alphas) if part == "unet" else (out.text_encoder, out.text_encoder_alphas)
        if module in alphas:
            raise UserError(f"{source}: LoRA module {module!r} appears twice (lora_te_ and lora_te1_?)")
        sd[f"{module}.lora_A.weight"] = parts[DOWN]
        sd[f"{module}.lora_B.weight"] = parts[UP]
        if DORA_SCALE in parts:
            sd[f"{module}.lora_magnitude_vector"] = _dora_scale_to_peft(parts[DORA_SCALE], parts[DOWN], parts[UP], name, source)
        alphas[module] = _alpha_value(parts)
    return out


def kohya_delta_weights(tensors: Mapping[str, "torch.Tensor"], multiplier: float = 1.0) -> dict[str, "torch.Tensor"]:
    """``{kohya module name: ΔW}`` in float32, ``ΔW = multiplier · alpha/r · up @ down``, shaped like the
    target weight (``[out, in]`` or ``[out, in, kh, kw]``): what A1111/ComfyUI/kohya merge.

    A DoRA file's effect depends on the base weight: use :func:`dora_merged_weight` for it."""
    out = {}
    grouped = _group_kohya(tensors, "LoRA")
    if any(DORA_SCALE in parts for parts in grouped.values()):
        raise UserError("a DoRA file (dora_scale) has no base-independent ΔW; use dora_merged_weight with the base weight")
    for name, parts in grouped.items():
        down, up = parts[DOWN].float(), parts[UP].float()
        rank = down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)) * (multiplier * _alpha_value(parts) / rank)
        out[name] = delta.reshape((up.shape[0],) + tuple(down.shape[1:]))
    return out


def network_dims(tensors: Mapping[str, "torch.Tensor"]) -> dict[str, tuple[int, float] | None]:
    """The (rank, alpha) a file's ``ss_network_dim``/``ss_network_alpha`` (and ``conv_dim``/``conv_alpha``)
    should state, read from its tensors: the most common pair among linear and 1×1 modules
    ("network") and among 3×3 convs ("conv", None without any). A run continued from another file
    (``--init-lora``) keeps that file's ranks and alphas, whatever its own settings say."""
    from collections import Counter

    pairs: dict[str, Counter] = {"network": Counter(), "conv": Counter()}
    for parts in _group_kohya(tensors, "LoRA").values():
        down = parts[DOWN]
        kind = "conv" if down.dim() == 4 and down.shape[-1] > 1 else "network"
        pairs[kind][(int(down.shape[0]), _alpha_value(parts))] += 1
    return {k: (c.most_common(1)[0][0] if c else None) for k, c in pairs.items()}


# --- metadata -------------------------------------------------------------------------------------

def image_digest(image: str | os.PathLike[str] | bytes) -> str:
    """The per-image digest stored in the file: sha256 of the file's bytes, first 16 hex digits."""
    return file_sha256(image)[:IMAGE_DIGEST_HEX]


def train_data_digest(image_sha256: Sequence[str], captions: Sequence[str], mask_sha256: Sequence[str]) -> str:
    """One digest of the training data as trained: every image's bytes, its caption (file or
    template, trigger included) and its face mask's bytes. Order does not matter."""
    if not len(image_sha256) == len(captions) == len(mask_sha256):
        raise ValueError("one caption and one mask digest per image")
    rows = sorted([i, c, m or ""] for i, c, m in zip(image_sha256, captions, mask_sha256))
    return file_sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8"))


def base_model_hashes(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> tuple[str, str] | None:
    """sd-scripts' ``(ss_sd_model_hash, ss_new_sd_model_hash)`` of a checkpoint file
    (``train_util.model_hash``: the first 8 hex of the sha256 of the 64 KiB at offset 1 MiB, A1111's
    old hash; ``calculate_sha256``: the sha256 of the whole file, A1111's new one). None for a
    diffusers folder (sd-scripts has no hash for one either).

    The whole-file hash of a 2 GB checkpoint takes seconds, so it is kept in ``cache_dir`` keyed
    by the file's path, size, mtime and ctime (any rewrite changes the ctime)."""
    p = Path(path)
    if not p.is_file():
        return None
    st = p.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    cache = Path(cache_dir) / MODEL_HASH_CACHE if cache_dir is not None else None
    known: dict[str, Any] = {}
    if cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
    key = str(p.resolve())
    hit = known.get(key)
    if isinstance(hit, dict) and all(hit.get(k) == v for k, v in stamp.items()):
        return str(hit["legacy"]), str(hit["sha256"])
    with open(p, "rb") as fh:
        fh.seek(0x100000)
        legacy = file_sha256(fh.read(0x10000))[:8]
    result = (legacy, file_sha256(p))
    if cache is not None:
        known[key] = {**stamp, "legacy": result[0], "sha256": result[1]}
        try:
            atomic_write_json(cache, known)
        except OSError:
            pass  # a cache that cannot be written only costs the next run the hashing time
    return result


def training_image_digests(metadata: Mapping[str, str]) -> frozenset[str] | None:
    """The training set's image digests from a LoRA's metadata, or None if the file does not say
    (not ours, or written without it): the evaluator must then not claim the sets are disjoint."""
    raw = metadata.get(META_TRAIN_IMAGES)
    if raw is None:
        return None
    try:
        digests = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"LoRA metadata {META_TRAIN_IMAGES} is not valid JSON") from None
    if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
        raise UserError(f"LoRA metadata {META_TRAIN_IMAGES} is not a JSON list of digests")
    return frozenset(digests)


def is_training_image(metadata: Mapping[str, str], image: str | os.PathLike[str] | bytes) -> bool | None:
    """Whether this exact image file was in the LoRA's training set (None: the file does not record it)."""
    digests = training_image_digests(metadata)
    return None if digests is None else image_digest(image) in digests


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """kohya's tag count: captions split at ',', stripped, lower-cased, empty tags dropped."""
    counts: Counter[str] = Counter()
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] += 1
    return dict(counts)


def base_model_version(*, v2: bool, v_prediction: bool) -> str:
    """kohya's ``ss_base_model_version``: sd_v1, sd_v1_v, sd_v2, sd_v2_v."""
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_prediction else "")


def _architecture(v2: bool, v_prediction: bool) -> str:
    if not v2:
        return "stable-diffusion-v1/lora"
    return ("stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512") + "/lora"


def _optimizer_text(config: "TrainConfig") -> str:
    """kohya's ``ss_optimizer``: the class's module path and name, then its arguments."""
    cls = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
           "prodigy": "prodigyopt.prodigy.Prodigy"}.get(config.optimizer, config.optimizer)
    args = f"weight_decay={config.weight_decay}"
    if config.optimizer == "prodigy":
        args += (f",d_coef={config.prodigy_d_coef},safeguard_warmup={config.prodigy_safeguard_warmup}"
                 f",use_bias_correction={config.prodigy_use_bias_correction}")
    return f"{cls}({args})"


def _opt_str(value: Any) -> str:
    """kohya writes unset options as "None"; our zeros mean the same."""
    return "None" if value is None or value == 0 else str(value)


def _text_encoder_lr_text(config: "TrainConfig") -> str:
    if not config.train_text_encoder:
        return "None"
    return str(config.text_encoder_lr if config.text_encoder_lr is not None else config.lr)


def _network_args_text(config: "TrainConfig") -> str | None:
    """kohya writes --network_args values as the strings the user typed. DoRA is recorded as
    LyCORIS writes ``--network_module lycoris.kohya --network_args algo=lora dora_wd=True``
    (``wd_on_output``: ``dora_scale`` is per output channel)."""
    args = {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"} if config.dora else {}
    if config.conv_rank > 0:
        args.update({"conv_dim": str(config.conv_rank), "conv_alpha": str(config.effective_conv_alpha)})
    return json.dumps(args) if args else None


def _bucket_side_text(config: "TrainConfig", which: int) -> str:
    """sd-scripts' ``ss_min/max_bucket_reso``: "None" without buckets or with no-upscale (then
    each image's own size decides, not the limits)."""
    from .config import bucket_limits

    return "None" if not config.buckets or config.bucket_no_upscale else str(bucket_limits(config)[which])


# How a setting's ``ss_key`` value is written where it is not ``str(value)``; None = key left out.
_SETTING_TEXT: dict[str, Any] = {
    "ss_sd_model_name": lambda c: Path(c.model).name,
    "ss_output_name": lambda c: Path(c.output).stem,
    "ss_network_alpha": lambda c: str(c.effective_alpha),
    "ss_network_dropout": lambda c: _opt_str(c.lora_dropout),
    "ss_network_args": _network_args_text,
    "ss_network_module": lambda c: "lycoris.kohya" if c.dora else "networks.lora",
    "ss_text_encoder_lr": _text_encoder_lr_text,
    "ss_optimizer": _optimizer_text,
    "ss_noise_offset": lambda c: _opt_str(c.noise_offset),
    "ss_resolution": lambda c: str((int(c.resolution), int(c.resolution))),
    "ss_cache_latents": lambda c: str(not c.no_cache),
    "ss_min_bucket_reso": lambda c: _bucket_side_text(c, 0),
    "ss_max_bucket_reso": lambda c: _bucket_side_text(c, 1),
    "ss_bucket_no_upscale": lambda c: str(bool(c.buckets and c.bucket_no_upscale)),
    "ss_validate_every_n_steps": lambda c: str(c.validation_every) if c.has_validation else "None",
    "facediffuser_validation_data": lambda c: Path(c.validation_data).name if c.validation_data else None,
    "facediffuser_keep_best_validation": lambda c: str(c.keep_best_validation) if c.has_validation else None,
    "facediffuser_trigger": lambda c: c.trigger or None,
    "facediffuser_init_lora": lambda c: Path(c.init_lora).name if c.init_lora else None,
}


def settings_metadata(config: "TrainConfig") -> dict[str, str]:
    """The metadata of the settings themselves: one entry per ``ss_key`` of
    :func:`.config.setting_specs` (kohya's ``ss_*`` where kohya has a key, ours otherwise). The
    writer and the ComfyUI node's reuse check both use it, so they cannot disagree."""
    from .config import setting_specs

    out: dict[str, str] = {}
    for spec in setting_specs():
        key = spec.ss_key
        if key is None or key in out:
            continue
        fmt = _SETTING_TEXT.get(key)
        value = fmt(config) if fmt is not None else str(getattr(config, spec.name))
        if value is not None:
            out[key] = value
    return out


def build_metadata(
    config: "TrainConfig",
    *,
    image_files: Sequence[str | os.PathLike[str]],
    captions: Sequence[str],
    steps_done: int,
    max_train_steps: int,
    epoch: int,
    num_epochs: int,
    started_at: float,
    finished_at: float | None = None,
    v2: bool = False,
    v_prediction: bool = False,
    clip_skip: int | None = None,
    base_model_sha256: str | None = None,
    base_model_hash: str | None = None,
    image_digests: Sequence[str] | None = None,
    train_data_digest: str | None = None,
    num_processes: int = 1,
    bucket_plan: Any = None,
    validation: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The file's metadata, every value a string: kohya's ``ss_*`` keys (what A1111 shows and uses
    for its alias and version filter), ``modelspec.*`` (SAI model spec 1.0.1), and ours
    (``facediffuser_*``: trigger word, training-image digests for the evaluator's overlap guard).

    ``image_files``/``captions``: the training images and the caption each was trained with.
    ``image_digests``: their :func:`image_digest`, if already known (else the files are read).
    ``base_model_hash``/``base_model_sha256``: :func:`base_model_hashes` of the checkpoint.
    ``train_data_digest``: :func:`train_data_digest` of the data as trained.
    The settings' own keys come from :func:`settings_metadata`.
    ``bucket_plan``: the run's :class:`.buckets.BucketPlan` (``ss_bucket_info``);
    ``validation``: what :meth:`.validation.ValidationSet.metadata_values` reports.
    ``sshs_*`` hashes are not here: :func:`save_kohya_lora` computes them from the final tensors."""
    if len(captions) != len(image_files):
        raise ValueError(f"{len(image_files)} image files but {len(captions)} captions")
    digests = list(image_digests) if image_digests is not None else [image_digest(p) for p in image_files]
    if len(digests) != len(image_files):
        raise ValueError(f"{len(image_files)} image files but {len(digests)} digests")
    n = len(image_files)
    output_name = Path(config.output).stem
    data_dir = Path(config.data).name or str(config.data)
    res = int(config.resolution)
    when = finished_at if finished_at is not None else started_at
    meta: dict[str, Any] = {
        # the network
        "ss_base_model_version": base_model_version(v2=v2, v_prediction=v_prediction),
        "ss_v2": v2,
        # the base model
        "ss_clip_skip": clip_skip,
        "ss_max_token_length": None,
        # the data
        "ss_num_train_images": n,
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": math.ceil(n / max(1, config.batch_size * num_processes)),
        "ss_tag_frequency": json.dumps({data_dir: tag_frequency(captions)}, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps({data_dir: {"n_repeats": 1, "img_count": n}}, ensure_ascii=False),
        "ss_reg_dataset_dirs": json.dumps({}),
        "ss_bucket_info": json.dumps({"buckets": {"0": {"resolution": [res, res], "count": n}}, "mean_img_ar_error": 0.0}),
        "ss_color_aug": False,
        "ss_random_crop": False,
        "ss_caption_dropout_every_n_epochs": 0,
        "ss_caption_tag_dropout_rate": 0.0,
        # the schedule
        "ss_unet_lr": config.lr,
        "ss_total_batch_size": config.batch_size * config.grad_accum * num_processes,
        "ss_full_fp16": False,
        "ss_lowram": False,
        "ss_max_train_steps": max_train_steps,
        "ss_steps": steps_done,
        "ss_epoch": epoch,
        "ss_num_epochs": num_epochs,
        "ss_training_started_at": started_at,
        # the SAI model spec
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": _architecture(v2, v_prediction),
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.date": datetime.datetime.fromtimestamp(when, datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        # ours
        META_TRAIN_IMAGES: json.dumps(sorted(set(digests))),
        META_TRAIN_IMAGES_SCHEME: IMAGE_DIGEST_SCHEME,
    }
    meta.update(settings_metadata(config))  # every setting under its ss_key (the specs say which)
    if finished_at is not None:
        meta["ss_training_finished_at"] = finished_at
    if base_model_sha256:
        meta["ss_new_sd_model_hash"] = base_model_sha256
    if base_model_hash:
        meta["ss_sd_model_hash"] = base_model_hash
    if train_data_digest:
        meta[META_TRAIN_DATA] = train_data_digest
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = clip_skip
    if config.trigger:
        meta["modelspec.trigger_phrase"] = config.trigger
    meta.update(_run_metadata(config, bucket_plan, validation))
    return {k: v if isinstance(v, str) else str(v) for k, v in meta.items()}


META_VALIDATION_IMAGES = "facediffuser_validation_images_sha256"
META_VALIDATION_LOSS = "facediffuser_validation_loss"


def _run_metadata(config: "TrainConfig", bucket_plan: Any, validation: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the run found, beside the settings: the buckets used and the held-out validation.

    * ``ss_bucket_info`` as sd-scripts writes it: the used buckets in sorted order,
      ``{"resolution": [w, h], "count": n}``, and the mean absolute aspect-ratio error (with
      ``--no-buckets``: the one square bucket and the error of the square crop, as sd-scripts reports it).
    * Validation: sd-scripts' ``ss_num_validation_images`` and ``ss_validation_seed``; ours: the
      held-out images' digests (they never trained: an honest real set for the evaluator), the
      curve ``[[step, loss], ...]`` and the best step and loss."""
    meta: dict[str, Any] = {}
    if bucket_plan is not None:
        meta["ss_bucket_info"] = json.dumps(bucket_plan.info())
    v = validation or {}
    meta["ss_num_validation_images"] = len(v.get("digests", ()))
    if v:
        meta["ss_validation_seed"] = config.seed  # the held-out pick and its noise come from --seed
        meta[META_VALIDATION_IMAGES] = json.dumps(sorted(set(v["digests"])))
        meta[META_VALIDATION_LOSS] = json.dumps([[int(step), float(loss)] for step, loss in v.get("history", ())])
        if v.get("best") is not None:
            meta["facediffuser_validation_best_step"], meta["facediffuser_validation_best_loss"] = v["best"]
    return meta


# --- files --------------------------------------------------------------------------------------

_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def _data_section(blob: bytes) -> bytes:
    return split_blob(blob)[1]


def safetensors_hashes(tensors: Mapping[str, "torch.Tensor"], metadata: Mapping[str, str]) -> tuple[str, str]:
    """kohya's ``(sshs_model_hash, sshs_legacy_hash)`` (sd-scripts ``precalculate_safetensors_hashes``):
    serialise with the ``ss_*`` metadata only; the model hash is the sha256 of the data section
    (so it also matches the final file, whose header differs), the legacy hash the first 8 hex of
    the sha256 of bytes 0x100000..0x110000 of that serialisation (header included, so it does not)."""
    from safetensors.torch import save

    blob = save(dict(tensors), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    model_hash = file_sha256(_data_section(blob))
    legacy_hash = file_sha256(blob[0x100000:0x110000])[:8]
    return model_hash, legacy_hash


def save_kohya_lora(path: str | os.PathLike[str], tensors: Mapping[str, "torch.Tensor"], metadata: Mapping[str, str],
                    dtype: "str | torch.dtype" = "fp16") -> dict[str, str]:
    """Write a kohya LoRA atomically (a unique temp name, fsync, then ``os.replace``) and return the metadata written.

    ``lora_down``/``lora_up`` are cast to ``dtype`` (fp16/bf16/fp32); ``alpha`` stays float32 so the
    true alpha survives (loaders read it with ``.item()``), and so does DoRA's ``dora_scale``. ``sshs_model_hash`` and
    ``sshs_legacy_hash`` are added, computed as sd-scripts does."""
    import torch
    from safetensors.torch import save

    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad[:5]}")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise UserError(f"save precision must be one of fp16, bf16, fp32 (got {dtype!r})")
        dtype = getattr(torch, _DTYPES[dtype])
    _group_kohya(tensors, "LoRA to save")  # refuse to write something no loader accepts
    # alpha and DoRA's dora_scale stay float32: a magnitude rounded to fp16 rescales each output
    # channel by up to 5e-4, which is of the order of a whole LoRA update
    out = {k: (v.detach().to("cpu", torch.float32) if k.endswith(tuple("." + s for s in FLOAT32_SUFFIXES))
               else v.detach().to("cpu", dtype)).contiguous()
           for k, v in tensors.items()}
    meta = dict(metadata)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(out, meta)
    blob = canonicalize(save(out, metadata=meta))  # same tensors + metadata -> same bytes, in any process
    if file_sha256(_data_section(blob)) != meta["sshs_model_hash"]:  # the header must not move data
        raise AssertionError("sshs_model_hash does not match the data written")
    atomic_write_bytes(path, blob)
    return meta


def read_lora_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """A kohya LoRA's metadata from its header alone (no tensor is read; see
    :func:`..sd.safetensors_io.read_header`). Anything that is not a LoRA raises a one-line UserError."""
    return _lora_header(path).metadata


def _lora_header(path: str | os.PathLike[str]) -> Header:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"LoRA file not found: {p}")
    if p.suffix.lower() != ".safetensors":
        raise UserError(f"{p.name}: LoRA files must be .safetensors (got {p.suffix or 'no extension'})")
    header = read_header(p)  # its errors name the file and what is wrong with it
    keys = header.tensors
    if not any(k.startswith((UNET_PREFIX,) + TE_READ_PREFIXES + ("lora_te2_",)) for k in keys):
        hint = " (it looks like a full model checkpoint)" if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys) else ""
        raise UserError(f"{p.name} is not a kohya LoRA: it has no lora_unet_/lora_te_ keys{hint}")
    return header


def load_kohya_lora(path: str | os.PathLike[str]) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    """Read a kohya LoRA: ``(tensors, metadata)``, tensors as stored (use :func:`kohya_to_peft` or
    :func:`kohya_delta_weights`). Anything that is not one raises a one-line :class:`UserError`."""
    from safetensors import SafetensorError, safe_open

    header = _lora_header(path)
    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in header.tensors}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{p.name} is not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    _group_kohya(tensors, p.name)
    return tensors, header.metadata
