"""Facts about the running web UI (Automatic1111 or Forge): its folders, checkpoints, LoRAs, device.

Every function imports the web UI's ``modules`` inside its body, so importing this module needs no
web UI. Folders the extension uses (all created on demand):

* ``<models>/fid_stats/`` -- FID reference statistics (``.npz``), as in the ComfyUI pack;
* ``<models>/inception/`` -- the FID Inception weights (``weights-inception-2015-12-05-6726825d.pth``);
* the web UI's Lora folder (``--lora-dir``) -- trained LoRAs, so ``<lora:name:0.8>`` works at once;
* ``<data dir>/facediffuser/`` -- feature banks, the feature cache, training runs (state, log,
  progress) and the LoRA-vs-base results.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

EXTENSION_DIR = Path(__file__).resolve().parent.parent
LORA_EXTENSIONS = (".safetensors",)


def models_dir() -> Path:
    from modules import paths

    return Path(paths.models_path)


def data_dir() -> Path:
    from modules import paths

    return Path(paths.data_path)


def stats_dir() -> Path:
    return models_dir() / "fid_stats"


def inception_dir() -> Path:
    return models_dir() / "inception"


def lora_dir() -> Path:
    from modules import shared

    value = getattr(shared.cmd_opts, "lora_dir", None)
    return Path(value) if value else models_dir() / "Lora"


def work_dir() -> Path:
    return data_dir() / "facediffuser"


def banks_dir() -> Path:
    return work_dir() / "fid_banks"


def feature_cache_dir() -> Path:
    return work_dir() / "cache" / "features"


def outputs_dir() -> Path:
    return work_dir() / "lora_vs_base"


def overlay_dir() -> Path:
    from .requirements import OVERLAY_DIR

    return EXTENSION_DIR / OVERLAY_DIR


def device():
    """The web UI's torch device (CPU under ``--always-cpu`` / ``--use-cpu all``)."""
    from modules import devices

    return getattr(devices, "device", None)


def uses_cpu_only() -> bool:
    from modules import shared

    opts = shared.cmd_opts
    return bool(getattr(opts, "always_cpu", False)) or "all" in (getattr(opts, "use_cpu", None) or [])


def checkpoint_titles() -> list[str]:
    from modules import sd_models

    return list(sd_models.checkpoint_tiles())


def checkpoint_path(title: str) -> Path:
    from modules import sd_models

    from ..errors import UserError

    info = sd_models.get_closet_checkpoint_match(title) if title else None
    if info is None:
        raise UserError(f"checkpoint {title!r} is not in the web UI's list (Stable-diffusion folder); pick one from the list")
    return Path(info.filename)


def current_checkpoint_title() -> str | None:
    from modules import shared

    info = getattr(getattr(shared, "sd_model", None), "sd_checkpoint_info", None)
    if info is None:
        return getattr(shared.opts, "sd_model_checkpoint", None)
    return info.title


def lora_names() -> list[str]:
    """The LoRA names the web UI's ``<lora:NAME:W>`` accepts (file names without extension)."""
    root = lora_dir()
    if not root.is_dir():
        return []
    names = {p.stem for p in root.rglob("*") if p.suffix.lower() in LORA_EXTENSIONS and p.is_file()}
    return sorted(names, key=str.lower)


def lora_file(name: str) -> Path | None:
    root = lora_dir()
    for p in sorted(root.rglob(name + ".safetensors")) if root.is_dir() else []:
        if p.is_file():
            return p
    return None


def forget_lora_file(path: str | os.PathLike) -> None:
    """After a LoRA file is replaced (re-trained under the same name): drop the web UI's cached copy,
    so the next ``<lora:...>`` loads the new weights (Forge caches state dicts by file name)."""
    networks = sys.modules.get("networks")
    cached = getattr(networks, "load_lora_state_dict", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()
    try:
        from modules import shared

        model = getattr(shared, "sd_model", None)
        if model is not None and hasattr(model, "current_lora_hash"):
            model.current_lora_hash = None  # Forge re-applies the LoRA set on the next request
    except Exception:  # noqa: BLE001 - best effort, never fail a training run for it
        pass
