"""The one module that loads Stable Diffusion models — offline, SD 1.x and 2.x.

Sources: a single-file checkpoint in the original LDM layout (``.safetensors``; ``.ckpt``/``.pt``
only through ``torch.load(weights_only=True)``), or a diffusers folder (``model_index.json`` +
``unet/``, ``vae/``, ``text_encoder/``). No hub call is ever made: configs ship in
``model_files/configs`` and the tokenizer in ``model_files/tokenizer`` (``tokenizer.py``).

Configs are rebuilt from tensor shapes (so tiny test models load too) with the family rules for
what shapes cannot tell (heads, norm groups, activation); when the shapes are those of the released
architecture the shipped config is used as is.

Prediction type (epsilon vs v) cannot be seen in the tensors: SD2 512-base and 768-v have the same
shapes. The rule, first match wins:

1. an explicit ``prediction_type`` (``--prediction-type``) or ``family="sd2-v"``;
2. an A1111-style sidecar ``<checkpoint stem>.yaml`` containing ``parameterization: "v"`` (v) or
   ``"eps"`` (epsilon);
3. SAI ModelSpec metadata ``modelspec.prediction_type`` in the safetensors header;
4. for a diffusers folder, ``scheduler/scheduler_config.json``'s ``prediction_type``;
5. otherwise epsilon.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from . import checkpoint_layout as layout
from .safetensors_io import read_header

if TYPE_CHECKING:  # heavy imports happen inside the functions
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

FAMILIES = ("sd15", "sd2", "sd2-v")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
CONFIG_DIR = Path(__file__).resolve().parent / "model_files" / "configs"
_SD_SUPPORTED = "FaceDiffuser supports SD 1.x/2.x"


@dataclass(frozen=True)
class ModelFamily:
    """What a checkpoint is, and why we think its prediction type is what it is."""

    family: str  # "sd15" | "sd2" | "sd2-v"
    prediction_type: str  # "epsilon" | "v_prediction"
    full_size: bool  # shapes are the released architecture (False: tiny/custom widths)
    prediction_source: str  # "override" | "sidecar <file>" | "modelspec metadata" | "scheduler config" | "default"

    @property
    def base(self) -> str:
        """``"sd15"`` or ``"sd2"``: the tensor layout, whatever the prediction type."""
        return "sd15" if self.family == "sd15" else "sd2"


@dataclass
class SDComponents:
    """Everything training needs, frozen and in eval mode (the trainer decides what trains)."""

    family: str
    unet: "UNet2DConditionModel"
    vae: "AutoencoderKL"
    text_encoder: "CLIPTextModel"
    tokenizer: "CLIPTokenizer"
    noise_scheduler: "DDPMScheduler"
    prediction_type: str
    model_family: ModelFamily | None = None
    source: Path | None = None


# --- reading files -------------------------------------------------------------------------------

def _torch_load(path: Path) -> dict[str, "torch.Tensor"]:
    """Untrusted pickles: weights_only=True only. Unwraps Lightning's ``state_dict``."""
    import pickle

    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: refused to unpickle it safely (weights_only=True: {first}); convert it to .safetensors") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise UserError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise UserError(f"{path}: not a checkpoint (it holds a {type(obj).__name__}, not a dict of tensors)")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


class _SafetensorsView(Mapping):
    """A read-only ``{key: tensor}`` over a .safetensors file that reads tensors on demand."""

    def __init__(self, path: Path, keys: Iterator[str]) -> None:
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(keys)
        self._set = set(self._keys)

    def __getitem__(self, key: str) -> "torch.Tensor":
        if key not in self._set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class _Source:
    """A single-file checkpoint opened for reading: shapes for detection, tensors on demand."""

    path: Path | None
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]
    tensors: Mapping[str, Any] | None = None  # filled lazily for safetensors
    name: str = "state dict"


def _open_single_file(path: Path, *, with_tensors: bool) -> _Source:
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        header = read_header(path)
        shapes = header.shapes
        src = _Source(path, shapes, header.metadata, name=str(path))
        if with_tensors:
            src.tensors = _SafetensorsView(path, iter(shapes))
        return src
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        sd = _torch_load(path)
        return _Source(path, {k: tuple(v.shape) for k, v in sd.items()}, {}, sd, name=str(path))
    raise UserError(f"{path}: unsupported model file type {suffix or '(no suffix)'!r}; expected .safetensors, .ckpt or a diffusers folder")


def _source_from_dict(sd: Mapping[str, Any]) -> _Source:
    import torch

    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    while not tensors and isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
        tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return _Source(None, {k: tuple(v.shape) for k, v in tensors.items()}, {}, tensors)


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"model not found: {p}")
    return p


# --- what is it? ---------------------------------------------------------------------------------

_OLD_SD1_TE = "cond_stage_model.transformer.embeddings."  # transformers < 4.x file layout


def _normalise_keys(shapes: Mapping[str, Any]) -> dict[str, str]:
    """``{file key: canonical key}`` for layouts that differ only by a prefix."""
    out = {}
    for k in shapes:
        if k.startswith(("cond_stage_model.transformer.embeddings.", "cond_stage_model.transformer.encoder.",
                         "cond_stage_model.transformer.final_layer_norm.")):
            out[k] = layout.SD1_TE_PREFIX + "text_model." + k[len(layout.SD1_TE_PREFIX):]
        else:
            out[k] = k
    return out


def _base_family(shapes: Mapping[str, tuple[int, ...]], name: str) -> str:
    """"sd15" or "sd2" from the keys, or a one-line UserError saying what the file is instead."""
    keys = list(shapes)
    if not keys:
        raise UserError(f"{name}: contains no tensors")
    has = lambda *prefixes: any(k.startswith(prefixes) for k in keys)  # noqa: E731
    if any(("lora_down" in k or "lora_up" in k or "lora_A." in k or "lora_B." in k or ".hada_w" in k or ".lokr_w" in k)
           for k in keys) or has("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"):
        raise UserError(f"{name}: is a LoRA, not a checkpoint: put it in loras/ and pass it as --lora/--init-lora")
    if has("conditioner.embedders.", "model.diffusion_model.label_emb."):
        raise UserError(f"{name}: is an SDXL checkpoint; {_SD_SUPPORTED}")
    if has("model.diffusion_model.joint_blocks.", "joint_blocks."):
        raise UserError(f"{name}: is a Stable Diffusion 3 checkpoint; {_SD_SUPPORTED}")
    if has("model.diffusion_model.double_blocks.", "double_blocks.", "model.diffusion_model.single_blocks."):
        raise UserError(f"{name}: is a Flux checkpoint; {_SD_SUPPORTED}")
    if has("control_model.", "controlnet_cond_embedding.", "input_hint_block."):
        raise UserError(f"{name}: is a ControlNet, not a base checkpoint; {_SD_SUPPORTED} base models")
    if not has(layout.UNET_PREFIX):
        if "encoder.conv_in.weight" in shapes or "first_stage_model.encoder.conv_in.weight" in shapes or has("vae."):
            raise UserError(f"{name}: is a VAE-only file, not a full checkpoint (no UNet, no text encoder)")
        if "conv_in.weight" in shapes and has("down_blocks."):
            raise UserError(f"{name}: is a diffusers-format UNet weights file, not a single-file checkpoint; pass the diffusers folder (with model_index.json)")
        if has("text_model.", "cond_stage_model.") or "embeddings.token_embedding.weight" in shapes:
            raise UserError(f"{name}: is a text-encoder-only file, not a full checkpoint")
        raise UserError(f"{name}: is not a Stable Diffusion checkpoint (no {layout.UNET_PREFIX}* keys; first keys: {', '.join(sorted(keys)[:3])})")
    if not has(layout.VAE_PREFIX):
        raise UserError(f"{name}: has no VAE ({layout.VAE_PREFIX}* keys); FaceDiffuser needs a full checkpoint (UNet + VAE + text encoder)")
    if f"{layout.SD1_TE_PREFIX}text_model.embeddings.token_embedding.weight" in shapes:
        base = "sd15"
    elif f"{layout.SD2_TE_PREFIX}token_embedding.weight" in shapes:
        base = "sd2"
    else:
        raise UserError(f"{name}: has no text encoder (cond_stage_model.* keys); FaceDiffuser needs a full checkpoint (UNet + VAE + text encoder)")
    conv_in = shapes.get(layout.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise UserError(f"{name}: is an inpainting/instruct-pix2pix checkpoint (UNet takes {conv_in[1]} input channels); FaceDiffuser needs a text-to-image SD 1.x/2.x checkpoint")
    return base


def _prediction_from_files(path: Path | None, metadata: Mapping[str, str]) -> tuple[str, str] | None:
    if path is not None:
        for yaml in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
            if yaml.is_file():
                m = re.search(r"""^\s*parameterization:\s*["']?(\w+)""", yaml.read_text(encoding="utf-8", errors="replace"), re.M)
                if m:
                    return ("v_prediction" if m.group(1).lower() == "v" else "epsilon"), f"sidecar {yaml.name}"
    spec = metadata.get("modelspec.prediction_type", "").strip().lower()
    if spec:
        return ("v_prediction" if spec.startswith("v") else "epsilon"), "modelspec metadata"
    return None


def _resolve(base: str, family: str | None, prediction_type: str | None,
             found: tuple[str, str] | None, full_size: bool) -> ModelFamily:
    if family is not None and family not in FAMILIES:
        raise UserError(f"family must be one of {', '.join(FAMILIES)} (got {family!r})")
    if prediction_type in (None, "auto"):
        prediction_type = None
    elif prediction_type not in PREDICTION_TYPES:
        raise UserError(f"prediction type must be one of auto, {', '.join(PREDICTION_TYPES)} (got {prediction_type!r})")
    if family is not None and (family == "sd15") != (base == "sd15"):
        raise UserError(f"the checkpoint is {'SD 1.x' if base == 'sd15' else 'SD 2.x'} by its tensors, but family {family!r} was asked for")
    if prediction_type is not None:
        pred, why = prediction_type, "override"
    elif family == "sd2-v":
        pred, why = "v_prediction", "override"
    elif family == "sd2":
        pred, why = "epsilon", "override"
    elif found is not None:
        pred, why = found
    else:
        pred, why = "epsilon", "default"
    name = "sd2-v" if base == "sd2" and pred == "v_prediction" else base
    return ModelFamily(name, pred, full_size, why)


def detect_family(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    *,
    family: str | None = None,
    prediction_type: str | None = None,
) -> ModelFamily:
    """What a checkpoint (file, diffusers folder or state dict) is; see the module docstring for the
    prediction-type rule. Raises UserError for what we do not load (SDXL, SD3, Flux, a LoRA, a VAE ...)."""
    if isinstance(path_or_state_dict, Mapping):
        src = _source_from_dict(path_or_state_dict)
    else:
        p = _check_path(path_or_state_dict)
        if p.is_dir():
            return _folder_family(p, family, prediction_type)
        src = _open_single_file(p, with_tensors=False)
    return _family_of(src, family, prediction_type)


def _family_of(src: _Source, family: str | None, prediction_type: str | None) -> ModelFamily:
    names = _normalise_keys(src.shapes)
    shapes = {names[k]: v for k, v in src.shapes.items()}
    base = _base_family(shapes, src.name)
    configs = _infer_configs(shapes, base, "sd2" if base == "sd2" else "sd15", src.name)
    full = all(configs[c] == _shipped(base, c) for c in ("unet", "vae", "text_encoder"))
    return _resolve(base, family, prediction_type, _prediction_from_files(src.path, src.metadata), full)


# --- configs from shapes -------------------------------------------------------------------------

def _shipped(family: str, component: str) -> dict[str, Any]:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((CONFIG_DIR / family / component / name).read_text(encoding="utf-8"))


def _indices(shapes: Mapping[str, Any], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def _infer_configs(shapes: Mapping[str, tuple[int, ...]], base: str, family: str, name: str) -> dict[str, dict[str, Any]]:
    """diffusers/transformers configs for the tensors, on top of the family's shipped configs."""
    from .make_model import text_heads, unet_heads

    try:
        u = {k[len(layout.UNET_PREFIX):]: s for k, s in shapes.items() if k.startswith(layout.UNET_PREFIX)}
        n_in = len(_indices(u, r"input_blocks\.(\d+)\."))
        ops = _indices(u, r"input_blocks\.(\d+)\.0\.op\.weight$")
        per = ops[0] if ops else n_in  # slots per level: the layers + the downsampler
        levels = n_in // per
        first = [1 + i * per for i in range(levels)]
        boc = [u[f"input_blocks.{i}.0.out_layers.3.weight"][0] for i in first]
        proj = [s for k, s in u.items() if k.endswith("proj_in.weight")]
        unet = dict(_shipped(family, "unet"))
        unet.update(
            in_channels=u["input_blocks.0.0.weight"][1],
            out_channels=u["out.2.weight"][0],
            block_out_channels=boc,
            layers_per_block=per - 1,
            down_block_types=["CrossAttnDownBlock2D" if f"input_blocks.{i}.1.proj_in.weight" in u else "DownBlock2D" for i in first],
            up_block_types=["CrossAttnUpBlock2D" if f"output_blocks.{i * per}.1.proj_in.weight" in u else "UpBlock2D" for i in range(levels)],
            cross_attention_dim=next(s[1] for k, s in u.items() if k.endswith("attn2.to_k.weight")),
            use_linear_projection=bool(proj) and len(proj[0]) == 2,
            attention_head_dim=unet_heads(base, boc),
        )
        v = {k[len(layout.VAE_PREFIX):]: s for k, s in shapes.items() if k.startswith(layout.VAE_PREFIX)}
        vlevels = len(_indices(v, r"encoder\.down\.(\d+)\."))
        vae = dict(_shipped(family, "vae"))
        vae.update(
            in_channels=v["encoder.conv_in.weight"][1],
            out_channels=v["decoder.conv_out.weight"][0],
            latent_channels=v["decoder.conv_in.weight"][1],
            block_out_channels=[v[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(vlevels)],
            layers_per_block=len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\.")),
            down_block_types=["DownEncoderBlock2D"] * vlevels,
            up_block_types=["UpDecoderBlock2D"] * vlevels,
        )
        te = dict(_shipped(family, "text_encoder"))
        if base == "sd15":
            p = layout.SD1_TE_PREFIX + "text_model."
            tok, pos = shapes[p + "embeddings.token_embedding.weight"], shapes[p + "embeddings.position_embedding.weight"]
            n_layers = len(_indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\."))
            fc1 = shapes[p + "encoder.layers.0.mlp.fc1.weight"]
        else:
            p = layout.SD2_TE_PREFIX
            tok, pos = shapes[p + "token_embedding.weight"], shapes[p + "positional_embedding"]
            # diffusers builds all but the last OpenCLIP layer: SD2 conditions on the penultimate one.
            n_layers = len(_indices(shapes, re.escape(p) + r"transformer\.resblocks\.(\d+)\.")) - 1
            fc1 = shapes[p + "transformer.resblocks.0.mlp.c_fc.weight"]
        te.update(vocab_size=tok[0], hidden_size=tok[1], max_position_embeddings=pos[0], intermediate_size=fc1[0],
                  num_hidden_layers=n_layers, num_attention_heads=text_heads(tok[1]))
    except (KeyError, IndexError, StopIteration, ZeroDivisionError) as exc:
        raise UserError(f"{name}: incomplete or unusual SD checkpoint (cannot read its architecture: missing {exc})") from None
    if unet["cross_attention_dim"] != te["hidden_size"]:
        raise UserError(f"{name}: UNet cross-attention width {unet['cross_attention_dim']} does not match the text encoder width {te['hidden_size']}")
    return {"unet": unet, "vae": vae, "text_encoder": te}


# --- building models -----------------------------------------------------------------------------

def _torch_dtype(dtype: Any) -> "torch.dtype":
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise UserError(f"dtype must be one of fp32, fp16, bf16 (got {dtype!r})")
    return table[dtype]


def _build(cls: Any, config: Any, state: dict[str, "torch.Tensor"], dtype: "torch.dtype", what: str, name: str) -> Any:
    """Instantiate without initialising weights, then take the loaded tensors as parameters."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"{name}: the {what} weights do not fit the {what} architecture ({detail})") from None
    return model.eval().requires_grad_(False)


def _load_single_file(src: _Source, fam: ModelFamily, dtype: "torch.dtype") -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    names = _normalise_keys(src.shapes)
    shapes = {names[k]: v for k, v in src.shapes.items()}
    tensors: Mapping[str, Any] = src.tensors
    if any(k != v for k, v in names.items()):
        inv = {v: k for k, v in names.items()}
        tensors = _Renamed(src.tensors, inv)
    configs = _infer_configs(shapes, fam.base, fam.family, src.name)
    if fam.full_size:  # validated: the released architecture, with the family's exact config
        configs = {c: _shipped(fam.family, c) for c in ("unet", "vae", "text_encoder")}
    te_kind = "sd1" if fam.base == "sd15" else "sd2"
    models = {}
    try:
        unet_sd = layout.ldm_to_diffusers(tensors, layout.unet_key_map(configs["unet"]))
        models["unet"] = _build(UNet2DConditionModel, configs["unet"], unet_sd, dtype, "UNet", src.name)
        del unet_sd
        vae_sd = layout.ldm_to_diffusers(tensors, layout.vae_key_map(configs["vae"]))
        models["vae"] = _build(AutoencoderKL, configs["vae"], vae_sd, dtype, "VAE", src.name)
        del vae_sd
        te_sd = layout.ldm_to_diffusers(tensors, layout.text_encoder_key_map(te_kind, configs["text_encoder"]))
    except KeyError as exc:
        raise UserError(f"{src.name}: incomplete checkpoint, tensor {exc} is missing") from None
    te_config = CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")})
    te_sd = _fit_text_encoder_names(CLIPTextModel, te_config, te_sd)
    models["text_encoder"] = _build(CLIPTextModel, te_config, te_sd, dtype, "text encoder", src.name)
    return models


def _fit_text_encoder_names(cls: Any, config: Any, sd: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """transformers >= 5.6 flattened CLIPTextModel (no ``text_model.``); older ones did not."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        probe = cls(config)
    if hasattr(probe, "text_model"):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


class _Renamed(Mapping):
    """A view of a mapping under canonical names (old SD1 files without ``text_model.``)."""

    def __init__(self, inner: Mapping[str, Any], canonical_to_file: dict[str, str]) -> None:
        self._inner, self._map = inner, canonical_to_file

    def __getitem__(self, key: str) -> Any:
        return self._inner[self._map[key]]

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)


# --- diffusers folders ---------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable JSON ({exc})") from None


def _folder_family(folder: Path, family: str | None, prediction_type: str | None) -> ModelFamily:
    index = folder / "model_index.json"
    if not index.is_file():
        raise UserError(f"{folder}: is a folder but not a diffusers model (no model_index.json)")
    idx = _read_json(index)
    if "text_encoder_2" in idx or "SDXL" in str(idx.get("_class_name", "")) or "XL" in str(idx.get("_class_name", "")):
        raise UserError(f"{folder}: is an SDXL checkpoint; {_SD_SUPPORTED}")
    for sub in ("unet", "vae", "text_encoder"):
        if not (folder / sub / "config.json").is_file():
            raise UserError(f"{folder}: diffusers folder has no {sub}/config.json")
    te = _read_json(folder / "text_encoder" / "config.json")
    base = "sd2" if te.get("hidden_act") == "gelu" or te.get("hidden_size") == 1024 else "sd15"
    found = None
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        pt = _read_json(sched).get("prediction_type")
        if pt in PREDICTION_TYPES:
            found = (pt, "scheduler config")
    unet = _read_json(folder / "unet" / "config.json")
    full = list(unet.get("block_out_channels", [])) == _shipped(base, "unet")["block_out_channels"] and \
        te.get("hidden_size") == _shipped(base, "text_encoder")["hidden_size"]
    return _resolve(base, family, prediction_type, found, full)


def _load_folder(folder: Path, dtype: "torch.dtype") -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    kw = {"torch_dtype": dtype, "local_files_only": True}
    try:
        models = {
            "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw),
            "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, local_files_only=True),
        }
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: cannot load the diffusers folder ({' '.join(str(exc).split())[:200]})") from None
    return {k: m.eval().requires_grad_(False) for k, m in models.items()}


# --- public entry points -------------------------------------------------------------------------

def noise_scheduler_for(fam: ModelFamily, folder: Path | None = None) -> "DDPMScheduler":
    """The training noise schedule: SD's own betas (scaled_linear 0.00085..0.012, 1000 steps)."""
    from diffusers import DDPMScheduler

    cfg = _scheduler_config(fam, folder)
    return DDPMScheduler.from_config(cfg, prediction_type=fam.prediction_type, clip_sample=False)


def _scheduler_config(fam: ModelFamily, folder: Path | None) -> dict[str, Any]:
    if folder is not None and (folder / "scheduler" / "scheduler_config.json").is_file():
        return _read_json(folder / "scheduler" / "scheduler_config.json")
    return _shipped(fam.family, "scheduler")


def load_components(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    device: Any = "cpu",
    family: str | None = None,
    prediction_type: str | None = None,
) -> SDComponents:
    """UNet, VAE, text encoder, tokenizer and the DDPM noise scheduler of a checkpoint, offline.

    ``dtype`` defaults to float32; ``family``/``prediction_type`` override detection (see the
    module docstring). Models come back frozen, in eval mode, on ``device``.
    """
    import torch

    from .tokenizer import load_tokenizer

    torch_dtype = torch.float32 if dtype is None else _torch_dtype(dtype)
    p = _check_path(path)
    if p.is_dir():
        fam = _folder_family(p, family, prediction_type)
        models = _load_folder(p, torch_dtype)
        folder = p
    else:
        src = _open_single_file(p, with_tensors=True)
        fam = _family_of(src, family, prediction_type)
        models = _load_single_file(src, fam, torch_dtype)
        folder = None
    for m in models.values():
        m.to(device)
    return SDComponents(
        family=fam.family,
        unet=models["unet"],
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=load_tokenizer(fam.family),
        noise_scheduler=noise_scheduler_for(fam, folder),
        prediction_type=fam.prediction_type,
        model_family=fam,
        source=p,
    )


def load_pipeline(
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    device: Any = "cpu",
    family: str | None = None,
    prediction_type: str | None = None,
) -> "StableDiffusionPipeline":
    """A ``StableDiffusionPipeline`` for generation, from the same loaded components (no safety checker)."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    c = load_components(path, dtype=dtype, device=device, family=family, prediction_type=prediction_type)
    folder = c.source if c.source is not None and c.source.is_dir() else None
    cfg = _scheduler_config(c.model_family, folder)
    sched_cls = getattr(diffusers, str(cfg.get("_class_name", "PNDMScheduler")), diffusers.PNDMScheduler)
    scheduler = sched_cls.from_config(cfg, prediction_type=c.prediction_type)
    pipe = StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
