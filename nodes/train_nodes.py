"""Train Face LoRA: the CLI's trainer (``trainer.training_loop.train``) as a ComfyUI node.

The node builds the same :class:`~..trainer.config.TrainConfig` as ``facediffuser train`` (same
settings + seed -> the same file), runs it with ComfyUI progress and Cancel, and writes the kohya
LoRA into the first ``loras`` folder, so Load Face LoRA / LoraLoader list it.

Re-running (ComfyUI caches outputs by inputs): ``IS_CHANGED`` is a hash of the inputs plus the
state of the output file, so deleting or replacing the file re-runs the node. When it runs and the
output file already exists *with matching training metadata* (same base model name, steps, rank,
alpha, lr, resolution, batch size, seed, text-encoder flag, trigger and the same dataset images)
the node does not train again and returns that file; otherwise it trains and replaces it.

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

# Settings whose change means a different LoRA (the state folder and the skip check key on them).
_NOT_IDENTITY = frozenset({"output", "state_dir", "cache_dir", "resume", "logging_dir", "dataloader_workers"})


# --- pure helpers (tests reach them without ComfyUI) ------------------------------------------------

def build_train_config(*, model: str, data: str, output: str, steps: int, rank: int, alpha: float,
                       learning_rate: float, resolution: int, batch_size: int, train_text_encoder: bool,
                       seed: int, caption_template: str, trigger: str, work_dir: str | None = None) -> Any:
    """The TrainConfig the CLI builds from the same flags (``alpha`` 0 means alpha = rank).

    ``work_dir`` moves the caches and the resumable state out of the loras folder (they do not
    change the trained weights)."""
    from ..trainer.config import TrainConfig

    cfg = TrainConfig(
        model=str(model), data=str(data), output=str(output), steps=int(steps), rank=int(rank),
        alpha=None if not alpha else float(alpha), lr=float(learning_rate), resolution=int(resolution),
        batch_size=int(batch_size), train_text_encoder=bool(train_text_encoder), seed=int(seed),
        caption_template=str(caption_template), trigger=(str(trigger).strip() or None),
    )
    if work_dir is not None:
        cfg.cache_dir = str(Path(work_dir) / "cache")
        cfg.state_dir = str(Path(work_dir) / "state" / f"{Path(output).stem}-{settings_hash(cfg)[:12]}")
    return cfg.validate()


def settings_hash(config: Any) -> str:
    """Hash of the settings that determine the trained weights (not paths of caches/state)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def existing_lora_matches(meta: Mapping[str, str], config: Any, image_digests: set[str] | frozenset[str]) -> tuple[bool, str]:
    """Whether a LoRA file's metadata says it was trained exactly as ``config`` asks, and if not why."""
    from ..trainer.kohya_format import training_image_digests

    if not meta:
        return False, "the existing file has no training metadata"
    te_lr = meta.get("ss_text_encoder_lr")
    want = {
        "ss_sd_model_name": Path(config.model).name,
        "ss_steps": str(config.steps),
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.effective_alpha),
        "ss_learning_rate": str(config.lr),
        "ss_seed": str(config.seed),
        "ss_batch_size_per_device": str(config.batch_size),
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.trigger_phrase": config.trigger or None,
    }
    for key, value in want.items():
        have = meta.get(key)
        if have != value:
            return False, f"{key} is {have!r}, wanted {value!r}"
    if bool(config.train_text_encoder) != (te_lr not in (None, "", "None")):
        return False, "text-encoder training differs"
    try:
        have_images = training_image_digests(meta)
    except UserError as exc:
        return False, str(exc)
    if have_images is None or set(have_images) != set(image_digests):
        return False, "the dataset images differ"
    return True, "same settings and images"


def dataset_digests(data_dir: str | Path, caption_extension: str = ".txt") -> set[str]:
    from ..trainer.dataset import scan_images
    from ..trainer.kohya_format import image_digest

    return {image_digest(r.path) for r in scan_images(data_dir, caption_extension)}


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


# --- the node -------------------------------------------------------------------------------------

class FaceDiffuserTrainLora:
    DESCRIPTION = (
        "Train a face LoRA (kohya format) on a folder of images and save it into ComfyUI's loras folder. "
        "Same settings and seed as `facediffuser train` give the same file. The dataset is a folder under "
        "ComfyUI's input folder (or an absolute path under a root listed in $FACEDIFFUSER_DATASET_ROOTS). "
        "Shows progress; Cancel stops within a step, writes no LoRA and keeps a resumable state (queue the "
        "same settings again to continue). If the output file already exists with matching training metadata "
        "(settings and dataset images) it is reused instead of retraining; otherwise it is replaced. "
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

        return {
            "required": {
                "ckpt_name": (comfy_filename_list("checkpoints"), {"tooltip": "Base checkpoint (SD 1.x/2.x single file) to train on."}),
                "dataset": ("STRING", {"default": "faces", "tooltip": "Folder of face images (+ optional same-name .txt captions), relative to ComfyUI's input folder, or an absolute path under $FACEDIFFUSER_DATASET_ROOTS."}),
                "output_name": ("STRING", {"default": "face_lora", "tooltip": "File name of the LoRA in the loras folder (.safetensors is added)."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 100000, "tooltip": "Number of optimizer steps."}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": "LoRA rank (network dim)."}),
                "alpha": ("FLOAT", {"default": 16.0, "min": 0.0, "max": 1024.0, "step": 0.5, "tooltip": "LoRA alpha; the update is scaled by alpha/rank. 0 = same as rank."}),
                "learning_rate": ("FLOAT", {"default": 0.0001, "min": 0.0000001, "max": 1.0, "step": 0.00001, "round": 0.0000001, "tooltip": "Learning rate of the adapters."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Training resolution (square, multiple of 8)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per step."}),
                "train_text_encoder": ("BOOLEAN", {"default": False, "tooltip": "Also train the CLIP text encoder (load the LoRA with model + clip)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": "fixed", "tooltip": "Seed of everything random: same seed and settings, same file."}),
                "caption_template": ("STRING", {"default": "a photo of a face", "tooltip": "Caption for images without a .txt file."}),
                "trigger": ("STRING", {"default": "", "tooltip": "Trigger word prepended to every caption (recorded in the file)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **inputs):
        from .paths import comfy_folder_path, lora_file_name

        h = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode())
        try:
            out = comfy_folder_path("loras") / lora_file_name(inputs.get("output_name", ""))
            st = out.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except (OSError, UserError):
            h.update(b"missing")
        return h.hexdigest()

    def train(self, ckpt_name, dataset, output_name, steps, rank, alpha, learning_rate, resolution, batch_size,
              train_text_encoder, seed, caption_template, trigger):
        import gc

        import comfy.model_management as mm
        import comfy.utils
        import torch

        from ..trainer.training_loop import TrainCallbacks, train
        from ..sd.safetensors_io import read_metadata
        from .paths import (TRAIN_STATE_SUBDIR, comfy_folder_path, comfy_full_path, comfy_output_dir,
                            comfy_user_folder, lora_file_name)

        ckpt = comfy_full_path("checkpoints", ckpt_name, what="checkpoint")
        data = comfy_user_folder(dataset, what="dataset folder")
        name = lora_file_name(output_name)
        out = comfy_folder_path("loras") / name
        config = build_train_config(
            model=str(ckpt), data=str(data), output=str(out), steps=steps, rank=rank, alpha=alpha,
            learning_rate=learning_rate, resolution=resolution, batch_size=batch_size,
            train_text_encoder=train_text_encoder, seed=seed, caption_template=caption_template, trigger=trigger,
            work_dir=str(comfy_output_dir() / TRAIN_STATE_SUBDIR))
        plot = out.with_name(out.stem + ".loss.png")

        if out.is_file():
            ok, why = existing_lora_matches(read_metadata(out), config, dataset_digests(data, config.caption_extension))
            if ok:
                text = f"{name}: already trained with these settings and images; reused (delete it to retrain)"
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
        log.info("FaceDiffuser Train Face LoRA: training %s (%d steps%s)", name, config.steps,
                 ", resuming" if config.resume else "")
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


NODE_CLASS_MAPPINGS = {"FaceDiffuserTrainLora": FaceDiffuserTrainLora}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceDiffuserTrainLora": "Train Face LoRA (FaceDiffuser)"}
