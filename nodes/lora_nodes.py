"""Load Face LoRA: ComfyUI's own LoRA patching plus what the file says about itself.

The patching is ``comfy.sd.load_lora_for_models`` (what the core ``LoraLoader`` calls), so the
result composes with every other node. On top, the node reads the file's training metadata (base
model, rank/alpha, trigger word, steps), warns when the LoRA was trained for another model family
than the MODEL it is applied to, and counts the keys ComfyUI did not load (its ``lora key not
loaded`` / ``NOT LOADED`` warnings), all shown in its text output and the log.

The pure parts (:func:`describe_lora`, :func:`comfy_model_family`, :func:`family_warning`) take
plain values, so tests reach them without ComfyUI.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

from ..errors import UserError
from ..sd.safetensors_io import read_metadata

log = logging.getLogger("facediffuser")

CATEGORY = "FaceDiffuser"
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "unknown": "unknown"}


# --- pure helpers ---------------------------------------------------------------------------------

def lora_family(meta: Mapping[str, str]) -> tuple[str, bool | None]:
    """(family, v_prediction) from kohya's ``ss_base_model_version`` / ``modelspec.architecture``."""
    version = (meta.get("ss_base_model_version") or "").lower()
    arch = (meta.get("modelspec.architecture") or "").lower()
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl", False
    if version.startswith("sd_v2") or arch.startswith("stable-diffusion-v2"):
        vpred = version.endswith("_v") or "768-v" in arch or meta.get("modelspec.prediction_type") == "v"
        return "sd2", vpred
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1", False
    if meta.get("ss_v2") == "True":
        return "sd2", None
    return "unknown", None


def comfy_model_family(config_name: str, context_dim: int | None, v_prediction: bool | None = None) -> str:
    """The family of a ComfyUI model from its ``model_config`` class name, else its context dim."""
    name = (config_name or "").upper()
    if name.startswith("SD15") or name.startswith("SD1"):
        return "sd1"
    if name.startswith("SD2"):
        return "sd2"
    if name.startswith("SDXL") or name.startswith("SSD1B") or name.startswith("SEGMIND"):
        return "sdxl"
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(int(context_dim or 0), "unknown")


def family_warning(meta: Mapping[str, str], model_family: str, model_v_prediction: bool | None) -> str | None:
    """A one-line warning when the LoRA's base family (or prediction type) is not the model's."""
    fam, vpred = lora_family(meta)
    if fam == "unknown" or model_family == "unknown":
        return None
    if fam != model_family:
        return (f"WARNING: this LoRA was trained on {FAMILY_NAMES[fam]} but the model is {FAMILY_NAMES[model_family]}: "
                "most keys will not load or the result will be noise; use a matching checkpoint")
    if fam == "sd2" and vpred is not None and model_v_prediction is not None and vpred != model_v_prediction:
        want = "v-prediction (768-v)" if vpred else "epsilon (512-base)"
        return f"WARNING: this LoRA was trained on an SD 2.x {want} model; the loaded SD 2.x model differs"
    return None


def describe_lora(name: str, meta: Mapping[str, str]) -> list[str]:
    """Human-readable lines: base model, rank/alpha, trigger word, steps, resolution."""
    if not meta:
        return [f"{name}: no training metadata in the file"]
    fam, _ = lora_family(meta)
    trigger = meta.get("modelspec.trigger_phrase") or meta.get("facediffuser_trigger") or ""
    if not trigger:
        try:  # kohya files: the most frequent tag of the first dataset folder is usually the trigger
            freq = json.loads(meta.get("ss_tag_frequency") or "{}")
            tags = next(iter(freq.values()), {}) if isinstance(freq, dict) else {}
            trigger = max(tags, key=tags.get) + " (most frequent tag)" if tags else ""
        except (ValueError, TypeError, AttributeError):
            trigger = ""
    lines = [
        f"{name}",
        f"base model: {FAMILY_NAMES[fam]} ({meta.get('ss_base_model_version', '?')}; trained on {meta.get('ss_sd_model_name', '?')})",
        f"rank {meta.get('ss_network_dim', '?')}, alpha {meta.get('ss_network_alpha', '?')}",
        f"trigger word: {trigger or '(none recorded)'}",
        f"steps: {meta.get('ss_steps', '?')}"
        + (f" of {meta['ss_max_train_steps']}" if meta.get("ss_max_train_steps") else "")
        + (f", resolution {meta['modelspec.resolution']}" if meta.get("modelspec.resolution") else ""),
    ]
    if meta.get("ss_text_encoder_lr") not in (None, "", "None"):
        lines.append("text encoder: trained")
    return lines


class _NotLoadedCounter(logging.Handler):
    """Counts ComfyUI's ``lora key not loaded`` / ``NOT LOADED`` warnings while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return
        for prefix in ("lora key not loaded: ", "NOT LOADED "):
            if msg.startswith(prefix):
                self.keys.append(msg[len(prefix):].strip())


# --- the node -------------------------------------------------------------------------------------

class FaceDiffuserLoraLoader:
    DESCRIPTION = ("Apply a face LoRA (kohya format, e.g. from Train Face LoRA) to MODEL and CLIP with ComfyUI's own "
                   "LoRA patching, and show the file's training metadata: base model, rank/alpha, trigger word, steps. "
                   "Warns when the LoRA was trained for another model family and counts keys ComfyUI could not load. "
                   "Connect lora_name_override (e.g. Train Face LoRA's lora_name) to load a file made in the same run.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "lora_info")
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied.", "The CLIP with the LoRA applied.",
                       "The LoRA's training metadata, warnings and the count of keys not loaded.")

    def __init__(self) -> None:
        self._cached: tuple[str, float, Any] | None = None

    @classmethod
    def INPUT_TYPES(cls):
        from .paths import comfy_filename_list

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to apply the LoRA to."}),
                "clip": ("CLIP", {"tooltip": "The text encoder to apply the LoRA to (face LoRAs may train it too)."}),
                "lora_name": (comfy_filename_list("loras"), {"tooltip": "LoRA file in ComfyUI's loras folder."}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01,
                                             "tooltip": "How strongly to apply the LoRA to the diffusion model (1 = as trained)."}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01,
                                            "tooltip": "How strongly to apply the LoRA to the text encoder."}),
            },
            "optional": {
                "lora_name_override": ("STRING", {"forceInput": True,
                                                  "tooltip": "A LoRA name from another node (e.g. Train Face LoRA); when "
                                                             "connected and not empty it replaces lora_name."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        # Naming lora_name here skips ComfyUI's list-membership check, so a workflow whose LoRA is
        # produced in the same prompt (override connected) validates; existence is checked at run time.
        from .paths import check_relative_name

        try:
            check_relative_name(lora_name, what="lora_name", strict=False)
        except UserError as exc:
            return str(exc)
        return True

    def _load_file(self, path: str) -> Any:
        import comfy.utils

        mtime = os.path.getmtime(path)
        if self._cached is not None and self._cached[:2] == (path, mtime):
            return self._cached[2]
        self._cached = None
        lora = comfy.utils.load_torch_file(path, safe_load=True)
        self._cached = (path, mtime, lora)
        return lora

    def load(self, model, clip, lora_name, strength_model, strength_clip, lora_name_override=None):
        import comfy.sd

        from .paths import comfy_full_path

        name = (lora_name_override or "").strip() or lora_name
        path = str(comfy_full_path("loras", name, what="LoRA"))
        meta = read_metadata(path) if path.lower().endswith(".safetensors") else {}  # .pt/.ckpt LoRAs: none
        lines = describe_lora(name, meta)

        base = model.model
        unet_config = getattr(base.model_config, "unet_config", {}) or {}
        model_type = getattr(getattr(base, "model_type", None), "name", "")
        fam = comfy_model_family(type(base.model_config).__name__, unet_config.get("context_dim"))
        lines.append(f"model: {type(base.model_config).__name__} ({FAMILY_NAMES[fam]}, {model_type or '?'})")
        warning = family_warning(meta, fam, model_type == "V_PREDICTION" if model_type else None)
        if warning:
            lines.append(warning)
            log.warning("FaceDiffuser Load Face LoRA: %s: %s", name, warning)

        if strength_model == 0 and strength_clip == 0:
            lines.append("strengths are 0: LoRA not applied")
            text = "\n".join(lines)
            return {"ui": {"text": [text]}, "result": (model, clip, text)}

        lora = self._load_file(path)
        counter = _NotLoadedCounter()
        root = logging.getLogger()
        root.addHandler(counter)
        try:
            model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
        finally:
            root.removeHandler(counter)
        patched_unet = _patch_count(model_lora) - _patch_count(model)
        patched_clip = _patch_count(getattr(clip_lora, "patcher", None)) - _patch_count(getattr(clip, "patcher", None))
        lines.append(f"patched {patched_unet} UNet and {patched_clip} text-encoder weights")
        if counter.keys:
            shown = ", ".join(counter.keys[:3])
            lines.append(f"WARNING: {len(counter.keys)} LoRA keys not loaded by ComfyUI (e.g. {shown})")
            log.warning("FaceDiffuser Load Face LoRA: %s: %d keys not loaded", name, len(counter.keys))
        else:
            lines.append("all LoRA keys loaded")
        text = "\n".join(lines)
        log.info("FaceDiffuser Load Face LoRA: %s", text.replace("\n", "; "))
        return {"ui": {"text": [text]}, "result": (model_lora, clip_lora, text)}


def _patch_count(patcher: Any) -> int:
    patches = getattr(patcher, "patches", None)
    return len(patches) if isinstance(patches, dict) else 0


NODE_CLASS_MAPPINGS = {"FaceDiffuserLoraLoader": FaceDiffuserLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceDiffuserLoraLoader": "Load Face LoRA (FaceDiffuser)"}
