"""Train Face LoRA and its options node: the CLI's trainer (``trainer.training_loop.train``) in ComfyUI.

Every input is generated from :func:`~..trainer.config.setting_specs` (same names as the TOML
keys, the specs' defaults, ranges and help texts): the ``basic`` settings are widgets of **Train
Face LoRA**, all others are widgets of **Face LoRA training options**, whose output plugs into
the train node's optional ``options`` input. The paths ComfyUI owns are the train node's own
inputs (:data:`NODE_OWNED`). In a widget an unset optional setting is 0 (numbers) or empty (text),
as :class:`~..trainer.config.TrainConfig` reads them; ``mixed_precision`` adds ``auto`` (the
node's default): bf16 on a CUDA GPU that supports it, else fp32.

The node builds the same :class:`~..trainer.config.TrainConfig` as ``facediffuser train`` (same
settings + seed -> the same file), runs it with ComfyUI progress and Cancel, and writes the kohya
LoRA into the first ``loras`` folder, so Load Face LoRA / LoraLoader list it.

Re-running (ComfyUI caches outputs by inputs): ``IS_CHANGED`` covers the inputs, the checkpoint
file's identity, the dataset folder's content (every file's size, mtime and ctime:
:func:`~..trainer.dataset.dataset_fingerprint`) and the output file, so editing the dataset, swapping
the checkpoint or deleting the LoRA runs the node again on the next queue. When it runs and the
output file exists *with matching metadata* — every setting that affects the weights (under the
specs' ``ss_key``), the base checkpoint's sha256 (``ss_new_sd_model_hash``) and the digest of the
images, captions and masks — the node returns that file instead of training again.

Cancel: training stops at the next step boundary; a resumable training state is kept under
``output/facediffuser_train/state/<name>-<settings hash>``, no LoRA is written, and queueing the same
settings again continues from that state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserError

log = logging.getLogger("facediffuser")

CATEGORY = "FaceDiffuser"
OPTIONS_TYPE = "FACEDIFFUSER_TRAIN_OPTIONS"
AUTO = "auto"  # mixed_precision in the node: bf16 where the GPU has it, else "no"
NONE_CHOICE = "(none)"  # an unset COMBO (init_lora)

#: Settings the node sets itself (ComfyUI owns these paths), not widgets: setting -> where it comes from.
NODE_OWNED: dict[str, str] = {
    "model": "ckpt_name: a checkpoint in ComfyUI's checkpoints folder",
    "data": "dataset: a folder under ComfyUI's input folder (or $FACEDIFFUSER_DATASET_ROOTS)",
    "output": "output_name: a file in ComfyUI's loras folder",
    "cache_dir": "<ComfyUI output>/facediffuser_train/cache",
    "state_dir": "<ComfyUI output>/facediffuser_train/state/<name>-<settings hash>",
    "resume": "automatic: an unfinished state of the same settings is continued",
}

# With init_lora the file's ranks and alphas are trained and recorded, whatever these say.
_INIT_LORA_DIMS = ("rank", "alpha", "conv_rank", "conv_alpha")

_WIDGET_MAX = {"int": 2**31 - 1, "float": 1e6}  # a widget needs a bound where the setting has none


# --- inputs generated from the specs ------------------------------------------------------------------

def train_node_specs() -> list[Any]:
    """The settings that are widgets of Train Face LoRA (group ``basic``), in spec order."""
    from ..trainer.config import setting_specs

    return [s for s in setting_specs() if s.group == "basic" and s.name not in NODE_OWNED]


def options_node_specs() -> list[Any]:
    """The settings that are widgets of Face LoRA training options: every other one (files last)."""
    from ..trainer.config import setting_specs

    rest = [s for s in setting_specs() if s.group != "basic" and s.name not in NODE_OWNED]
    return sorted(rest, key=lambda s: s.group == "paths")


def spec_widget(spec: Any, *, lora_names: list[str] | None = None) -> tuple:
    """A ComfyUI V1 input declaration for one setting. The one place that decides how a widget
    spells an unset optional setting: 0 for numbers, "" for text, ``(none)`` for a file list."""
    tip = spec.tooltip
    if spec.name == "mixed_precision":
        return ([AUTO, *spec.choices], {"default": AUTO, "tooltip": tip + " auto = bf16 on a CUDA GPU that supports it, else no (fp32)."})
    if spec.name == "init_lora":
        return ([NONE_CHOICE, *(lora_names or [])], {"default": NONE_CHOICE, "tooltip": tip + " A file in ComfyUI's loras folder."})
    if spec.kind == "bool":
        return ("BOOLEAN", {"default": bool(spec.default), "tooltip": tip})
    if spec.kind == "choice":
        return (list(spec.choices), {"default": spec.default, "tooltip": tip})
    if spec.kind in ("int", "float"):
        opts: dict[str, Any] = {
            "default": spec.default if spec.default is not None else 0,
            "min": 0 if spec.optional else spec.minimum,
            "max": spec.maximum if spec.maximum is not None else _WIDGET_MAX[spec.kind],
            "step": spec.step,
            "tooltip": tip + (" 0 = not set." if spec.optional else ""),
        }
        cast = int if spec.kind == "int" else float
        opts = {k: (cast(v) if k in ("default", "min", "max", "step") else v) for k, v in opts.items()}
        if spec.name == "seed":
            opts["control_after_generate"] = "fixed"
        return ("INT" if spec.kind == "int" else "FLOAT", opts)
    if spec.name == "sample_prompts":
        tip += " A text file under ComfyUI's input folder."
    elif spec.name == "validation_data":
        tip += " A folder under ComfyUI's input folder (like dataset)."
    elif spec.name == "logging_dir":
        tip += " A folder name under ComfyUI's output folder."
    return ("STRING", {"default": spec.default or "", "tooltip": tip + (" Empty = not set." if spec.optional else "")})


# --- pure helpers (tests reach them without ComfyUI) ------------------------------------------------

def build_train_config(*, model: str, data: str, output: str, values: Mapping[str, Any],
                       work_dir: str | None = None) -> Any:
    """The TrainConfig the CLI builds from the same settings: ``values`` are the widget values of
    both nodes by setting name (0 / "" = unset; ``mixed_precision`` may be ``auto``; ``init_lora``
    may be ``(none)``; paths already resolved).

    ``work_dir`` moves the caches and the resumable state out of the loras folder."""
    from ..trainer.config import TrainConfig, auto_mixed_precision

    settings = dict(values)
    if settings.get("mixed_precision") == AUTO:
        settings["mixed_precision"] = auto_mixed_precision()
    if settings.get("init_lora") == NONE_CHOICE:
        settings["init_lora"] = None
    owned = sorted(set(settings) & set(NODE_OWNED))
    if owned:
        raise UserError(f"Train Face LoRA: {', '.join(owned)} cannot be set as options (the node sets them)")
    cfg = TrainConfig.from_dict({**settings, "model": str(model), "data": str(data), "output": str(output)},
                                source="Train Face LoRA")
    if work_dir is not None:
        cfg.cache_dir = str(Path(work_dir) / "cache")
        cfg.state_dir = str(Path(work_dir) / "state" / f"{Path(output).stem}-{settings_hash(cfg)[:12]}")
    return cfg.validate()


def settings_hash(config: Any) -> str:
    """Hash of the settings a resume must keep (not ``resumable``): one state folder per such set,
    so a cancelled run is continued exactly when the resume check would accept it."""
    from ..trainer.config import setting_specs

    d = {s.name: getattr(config, s.name) for s in setting_specs() if not s.resumable}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def identity_keys(config: Any) -> list[str]:
    """The metadata keys that identify a trained LoRA: the ``ss_key`` of every setting that
    affects the weights (those of rank/alpha/conv are the init file's with ``init_lora``)."""
    from ..trainer.config import setting_specs

    specs = setting_specs()
    skip = {s.ss_key for s in specs if s.name in _INIT_LORA_DIMS} if config.init_lora else set()
    keys: list[str] = []
    for s in specs:
        if s.affects_weights and s.ss_key and s.ss_key not in skip and s.ss_key not in keys:
            keys.append(s.ss_key)
    return keys


def existing_lora_matches(meta: Mapping[str, str], config: Any, *, train_data_digest: str,
                          base_model_sha256: str | None) -> tuple[bool, str]:
    """Whether a LoRA file's metadata says it was trained exactly as ``config`` asks, from this
    base checkpoint (its sha256; None for a diffusers folder) and this data, and if not why."""
    from ..trainer.kohya_format import META_TRAIN_DATA, settings_metadata

    if not meta:
        return False, "the existing file has no training metadata"
    want = settings_metadata(config)
    for key in identity_keys(config):
        if meta.get(key) != want.get(key):
            return False, f"{key} is {meta.get(key)!r}, wanted {want.get(key)!r}"
    if base_model_sha256 is not None and meta.get("ss_new_sd_model_hash") != base_model_sha256:
        return False, "the base checkpoint differs (ss_new_sd_model_hash)"
    if meta.get(META_TRAIN_DATA) != train_data_digest:
        return False, "the dataset differs (images, captions or face masks)"
    return True, "same settings, base checkpoint and data"


def dataset_digest(config: Any) -> str:
    """:func:`~..trainer.kohya_format.train_data_digest` of the data ``config`` would train on
    (without the images ``validation_split`` holds out)."""
    from ..trainer.dataset import check_dataset
    from ..trainer.kohya_format import train_data_digest

    scan = check_dataset(config)
    if config.validation_split:  # the held-out images are not trained on, nor in the file's digest
        from ..trainer.validation import split_validation

        scan = split_validation(config, scan)[0]
    return train_data_digest([r.sha256 for r in scan.images], scan.captions, [r.mask_sha256 for r in scan.images])


def file_identity(path: str | Path | None) -> str:
    """Path, size, mtime and ctime of a file: changes when it is replaced or rewritten."""
    try:
        p = Path(path).resolve()  # type: ignore[arg-type]
        st = p.stat()
    except (OSError, TypeError):
        return "missing"
    return f"{p}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def training_fingerprint(inputs: Mapping[str, Any], *, checkpoint: Path | None, dataset: Path | None,
                         output: Path | None) -> str:
    """What ``IS_CHANGED`` returns: the inputs plus the identity of the checkpoint, the dataset's
    content fingerprint and the output file's state."""
    from ..trainer.dataset import dataset_fingerprint

    h = hashlib.sha256(json.dumps(dict(inputs), sort_keys=True, default=str).encode())
    h.update(file_identity(checkpoint).encode())
    h.update((dataset_fingerprint(dataset) if dataset is not None and dataset.is_dir() else "missing").encode())
    h.update(file_identity(output).encode())
    return h.hexdigest()


def resume_needed(state_dir: str | Path) -> bool:
    """True when ``state_dir`` holds an unfinished (e.g. cancelled) run to continue."""
    from ..trainer.checkpointing import latest_checkpoint, read_info

    latest = latest_checkpoint(state_dir)
    return latest is not None and not read_info(latest).get("finished")


def png_to_image_tensor(path: str | Path | None) -> Any:
    """A ComfyUI IMAGE ``[1, H, W, 3]`` float 0..1 of a PNG (a small grey image when missing)."""
    import numpy as np
    import torch
    from PIL import Image

    if path is None or not Path(path).is_file():
        return torch.full((1, 64, 64, 3), 0.5)
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


# --- ComfyUI side ------------------------------------------------------------------------------------

def _resolve_paths(values: dict[str, Any]) -> dict[str, Any]:
    """The options node's file settings as real paths, under the folders ComfyUI owns."""
    from .paths import comfy_full_path, comfy_input_dir, comfy_output_dir, env_roots, resolve_user_folder, safe_join

    out = dict(values)
    if out.get("init_lora") not in (None, "", NONE_CHOICE):
        out["init_lora"] = str(comfy_full_path("loras", out["init_lora"], what="init_lora"))
    prompts = str(out.get("sample_prompts") or "").strip()
    if prompts:
        rel = Path(prompts)
        folder = resolve_user_folder(str(rel.parent), input_dir=comfy_input_dir(), extra_roots=env_roots(),
                                     what="sample_prompts folder")
        f = (folder / rel.name).resolve()
        if f.parent != folder or not f.is_file():
            raise UserError(f"sample_prompts {prompts!r}: no such text file in {folder}")
        out["sample_prompts"] = str(f)
    held_out = str(out.get("validation_data") or "").strip()
    if held_out:  # like the dataset: under ComfyUI's input folder or $FACEDIFFUSER_DATASET_ROOTS
        out["validation_data"] = str(resolve_user_folder(held_out, input_dir=comfy_input_dir(), extra_roots=env_roots(),
                                                         what="validation_data"))
    logs = str(out.get("logging_dir") or "").strip()
    if logs:
        out["logging_dir"] = str(safe_join(comfy_output_dir(), logs, what="logging_dir"))
    return out


def _options_input(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise UserError("Train Face LoRA: the options input must come from a Face LoRA training options node")
    return dict(options)


class FaceDiffuserTrainLora:
    DESCRIPTION = (
        "Train a face LoRA (kohya format) on a folder of images and save it into ComfyUI's loras folder. "
        "Same settings and seed as `facediffuser train` give the same file. The dataset is a folder under "
        "ComfyUI's input folder (or an absolute path under a root listed in $FACEDIFFUSER_DATASET_ROOTS). "
        "Every other setting is on the 'Face LoRA training options' node (connect it to options). "
        "Shows progress; Cancel stops within a step, writes no LoRA and keeps a resumable state (queue the "
        "same settings again to continue). Editing the dataset or swapping the checkpoint retrains on the next "
        "queue. If the output file already exists with matching training metadata (settings, base checkpoint "
        "hash, images, captions, masks) it is reused instead of retraining; otherwise it is replaced. "
        "Frees ComfyUI's loaded models before training."
    )
    CATEGORY = CATEGORY
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("lora_name", "loss_curve")
    OUTPUT_TOOLTIPS = ("Name of the trained LoRA in the loras folder: connect it to Load Face LoRA's lora_name_override.",
                       "The training loss curve.")

    @classmethod
    def INPUT_TYPES(cls):
        from .paths import comfy_filename_list

        required: dict[str, Any] = {
            "ckpt_name": (comfy_filename_list("checkpoints"), {"tooltip": "Base checkpoint (SD 1.x/2.x single file) to train on."}),
            "dataset": ("STRING", {"default": "faces", "tooltip": "Folder of face images (+ optional same-name .txt captions), relative to ComfyUI's input folder, or an absolute path under $FACEDIFFUSER_DATASET_ROOTS."}),
            "output_name": ("STRING", {"default": "face_lora", "tooltip": "File name of the LoRA in the loras folder (.safetensors is added)."}),
        }
        required.update({s.name: spec_widget(s) for s in train_node_specs()})
        return {
            "required": required,
            "optional": {"options": (OPTIONS_TYPE, {"tooltip": "Every other training setting: connect a Face LoRA training options node (defaults without one)."})},
        }

    @classmethod
    def IS_CHANGED(cls, **inputs):
        from .paths import comfy_folder_path, comfy_full_path, comfy_user_folder, lora_file_name

        def attempt(fn: Any) -> Any:
            try:
                return fn()
            except (OSError, UserError, TypeError, ValueError):
                return None

        return training_fingerprint(
            inputs,
            checkpoint=attempt(lambda: comfy_full_path("checkpoints", inputs.get("ckpt_name", ""), what="checkpoint")),
            dataset=attempt(lambda: comfy_user_folder(inputs.get("dataset", ""), what="dataset folder")),
            output=attempt(lambda: comfy_folder_path("loras") / lora_file_name(inputs.get("output_name", ""))),
        )

    def train(self, ckpt_name, dataset, output_name, options=None, **settings):
        import gc

        import comfy.model_management as mm
        import comfy.utils
        import torch

        from ..trainer.kohya_format import base_model_hashes
        from ..trainer.training_loop import TrainCallbacks, train
        from ..sd.safetensors_io import read_metadata
        from .paths import (TRAIN_STATE_SUBDIR, comfy_folder_path, comfy_full_path, comfy_output_dir,
                            comfy_user_folder, lora_file_name)

        ckpt = comfy_full_path("checkpoints", ckpt_name, what="checkpoint")
        data = comfy_user_folder(dataset, what="dataset folder")
        name = lora_file_name(output_name)
        out = comfy_folder_path("loras") / name
        values = _resolve_paths({**settings, **_options_input(options)})
        config = build_train_config(model=str(ckpt), data=str(data), output=str(out), values=values,
                                    work_dir=str(comfy_output_dir() / TRAIN_STATE_SUBDIR))
        plot = out.with_name(out.stem + ".loss.png")

        if out.is_file():
            hashes = base_model_hashes(ckpt, cache_dir=config.cache_path)
            ok, why = existing_lora_matches(read_metadata(out), config, train_data_digest=dataset_digest(config),
                                            base_model_sha256=hashes[1] if hashes else None)
            if ok:
                text = f"{name}: already trained with these settings, checkpoint and data; reused (delete it to retrain)"
                log.info("FaceDiffuser Train Face LoRA: %s", text)
                return {"ui": {"text": [text]}, "result": (name, png_to_image_tensor(plot))}
            log.info("FaceDiffuser Train Face LoRA: %s exists but %s: retraining", name, why)

        config.resume = resume_needed(config.state_path)
        mm.unload_all_models()
        mm.soft_empty_cache()
        gc.collect()

        pbar = comfy.utils.ProgressBar(int(config.steps))

        def on_step(step: int, total: int, loss: float) -> None:
            log.info("FaceDiffuser Train Face LoRA: step %d/%d loss %.5f", step, total,
                     loss if math.isfinite(loss) else float("nan"))
            if not mm.processing_interrupted():  # the hook would raise mid-step; should_stop stops cleanly
                pbar.update_absolute(step, total)

        callbacks = TrainCallbacks(on_step=on_step, should_stop=mm.processing_interrupted)
        log.info("FaceDiffuser Train Face LoRA: training %s (%d steps, mixed precision %s%s)", name, config.steps,
                 config.mixed_precision, ", resuming" if config.resume else "")
        with torch.inference_mode(False), torch.enable_grad():
            result = train(config, callbacks=callbacks)
        gc.collect()
        if result.status != "finished":
            log.info("FaceDiffuser Train Face LoRA: %s", result.summary())
            mm.throw_exception_if_processing_interrupted()  # clears the flag and reports "interrupted"
            raise UserError(result.summary())
        text = f"{name}: {result.summary()}"
        log.info("FaceDiffuser Train Face LoRA: %s", text)
        return {"ui": {"text": [text]}, "result": (name, png_to_image_tensor(result.loss_plot or plot))}


class FaceDiffuserTrainOptions:
    DESCRIPTION = (
        "Every training setting that is not on Train Face LoRA (min-SNR, EMA, text-encoder learning rate, flip, "
        "face-loss weight, schedulers, LoCon conv rank, gradient checkpointing, mixed precision, ...), with the "
        "CLI's names, defaults and ranges. Connect its output to Train Face LoRA's options input. "
        "0 or an empty text means 'not set' for optional settings."
    )
    CATEGORY = CATEGORY
    FUNCTION = "options"
    RETURN_TYPES = (OPTIONS_TYPE,)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = ("The settings, for Train Face LoRA's options input.",)

    @classmethod
    def INPUT_TYPES(cls):
        from .paths import comfy_filename_list

        loras = comfy_filename_list("loras")
        return {"required": {s.name: spec_widget(s, lora_names=loras) for s in options_node_specs()}}

    def options(self, **values):
        return (dict(values),)


NODE_CLASS_MAPPINGS = {"FaceDiffuserTrainLora": FaceDiffuserTrainLora, "FaceDiffuserTrainOptions": FaceDiffuserTrainOptions}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceDiffuserTrainLora": "Train Face LoRA (FaceDiffuser)",
                              "FaceDiffuserTrainOptions": "Face LoRA training options (FaceDiffuser)"}
