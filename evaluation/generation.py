"""Generate images from a checkpoint, with or without a LoRA, under settings that are recorded.

Why this module exists: a base-vs-fine-tuned comparison is only fair when both models see the
same prompts, seeds, sampler, steps, guidance and size (the seed study sampled the base with 20
steps and the LoRA with 45). :func:`generate_pair` therefore builds ONE pipeline, generates the
base images first (no adapter loaded at all), then loads the LoRA into the same pipeline and
generates again with the same :class:`SamplerSettings` object — identical by construction — and
records it.

Seeds: image ``i`` uses prompt ``prompts[i % len(prompts)]`` and its own CPU generator seeded with
``seed + i``, so an image does not depend on the batch it falls in, on the device, or on how many
images are generated after it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..errors import UserError
from ..fileio import atomic_write_png, atomic_write_text

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from PIL import Image

#: sampler name -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "pndm": ("PNDMScheduler", {}),
}
ADAPTER_NAME = "facediffuser_eval"
RECORD_FILE = "generation.json"


@dataclass(frozen=True)
class SamplerSettings:
    """Everything besides the weights that decides a generated image."""

    steps: int = 30
    cfg: float = 7.5
    size: int = 512
    sampler: str = "ddim"
    seed: int = 0
    negative_prompt: str = ""
    eta: float = 0.0

    def validate(self) -> "SamplerSettings":
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1 (got {self.steps})")
        if self.size < 8 or self.size % 8:
            raise UserError(f"--size must be a positive multiple of 8 (got {self.size})")
        if self.cfg < 0:
            raise UserError(f"--cfg must be >= 0 (got {self.cfg})")
        if self.sampler not in SAMPLERS:
            raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)} (got {self.sampler!r})")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_seed(settings: SamplerSettings, index: int) -> int:
    """The seed of image ``index``: ``seed + index``."""
    return int(settings.seed) + int(index)


def load_generation_pipeline(model: str | os.PathLike, *, sampler: str = "ddim", device: str | None = None,
                             dtype: str | None = None) -> "StableDiffusionPipeline":
    """The project's pipeline (:func:`..sd.model_loading.load_pipeline`) with the named sampler.

    ``dtype`` defaults to float16 on CUDA and float32 on CPU."""
    import diffusers
    import torch

    from ..sd.model_loading import load_pipeline

    if sampler not in SAMPLERS:
        raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)} (got {sampler!r})")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = dtype or ("float16" if str(dev).startswith("cuda") else "float32")
    pipe = load_pipeline(model, dtype=dt, device=dev)
    cls_name, extra = SAMPLERS[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def lora_loaded(pipe: "StableDiffusionPipeline", lora: str | os.PathLike, scale: float = 1.0, *,
                merge: bool = True) -> Iterator[None]:
    """The kohya LoRA loaded into ``pipe`` (diffusers converts the kohya keys) at ``scale`` for the
    duration of the block, then removed again, so the pipeline is the base model afterwards.

    ``merge`` (default): for the block, each adapted layer runs with W + scale * ΔW in its weights
    instead of peft's extra adapter GEMMs on every call (:func:`_merged_exactly`; faster, see
    bench/RESULTS.md), and gets its original weight tensors back after, bit for bit."""
    p = Path(lora)
    if not p.is_file():
        raise UserError(f"LoRA file not found: {p}")
    try:
        with _no_text_encoder_warning_for(p):
            pipe.load_lora_weights(str(p), adapter_name=ADAPTER_NAME)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot load LoRA {p} into this checkpoint: {str(exc).splitlines()[0][:200]}") from None
    try:
        pipe.set_adapters([ADAPTER_NAME], adapter_weights=[float(scale)])
        with _merged_exactly(pipe, ADAPTER_NAME) if merge else _nothing():
            yield
    finally:
        pipe.delete_adapters(ADAPTER_NAME)


# diffusers warns "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'"
# for every LoRA without a text-encoder part, which most face LoRAs are; these loggers emit it.
_DIFFUSERS_LORA_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.lora_pipeline", "diffusers.loaders.peft")


class _DropNoTextEncoderKeys(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("No LoRA keys associated to") and "text_encoder" in msg)


def _has_text_encoder_keys(path: Path) -> bool:
    """From the header only (no tensors read): kohya ``lora_te*`` or diffusers ``text_encoder.`` keys."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.startswith(("lora_te", "text_encoder.", "te.")) for k in f.keys())


@contextmanager
def _no_text_encoder_warning_for(path: Path) -> Iterator[None]:
    """For a LoRA that has no text-encoder part that warning states the expected, so it is dropped
    -- this message only, from diffusers' LoRA loggers only, for this load only. A file that does
    have text-encoder keys keeps it (then it means something)."""
    try:
        has_te = _has_text_encoder_keys(path)
    except Exception:  # noqa: BLE001 - not a safetensors file: let diffusers say what is wrong
        has_te = True
    if has_te:
        yield
        return
    drop = _DropNoTextEncoderKeys()
    loggers = [logging.getLogger(name) for name in _DIFFUSERS_LORA_LOGGERS]
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(drop)


@contextmanager
def _merged_exactly(pipe: "StableDiffusionPipeline", adapter: str) -> Iterator[int]:
    """Merge ``adapter`` (at its set scale) into the weights of every layer that carries it, and
    restore the weights exactly afterwards.

    Exact because nothing is subtracted: the merged weight is a *new* tensor ``W + ΔW``, and on the
    way out each layer gets its original tensor object back (diffusers' ``fuse_lora`` adds in place
    and ``unfuse_lora`` subtracts again, which is not bit-exact, and it leaves the adapter's scale
    changed). Costs one extra copy of the adapted layers' weights while the block runs."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged: list[tuple[Any, Any, Any]] = []
    try:
        with torch.no_grad():
            for component in (getattr(pipe, "unet", None), getattr(pipe, "text_encoder", None)):
                if component is None:
                    continue
                for layer in component.modules():
                    if not isinstance(layer, BaseTunerLayer) or adapter not in getattr(layer, "lora_A", {}) or layer.merged:
                        continue
                    base = layer.get_base_layer()
                    original = base.weight.data
                    delta = layer.get_delta_weight(adapter)
                    base.weight.data = original + delta.to(device=original.device, dtype=original.dtype)
                    layer.merged_adapters.append(adapter)  # peft's forward now runs the base layer alone
                    merged.append((layer, base, original))
        yield len(merged)
    finally:
        for layer, base, original in merged:
            base.weight.data = original
            layer.merged_adapters.remove(adapter)


def generate(pipe: "StableDiffusionPipeline", prompts: Sequence[str], settings: SamplerSettings, n: int, *,
             batch_size: int = 4, on_image: Callable[[int, "Image.Image"], None] | None = None) -> list["Image.Image"]:
    """``n`` images: image ``i`` from prompt ``i % len(prompts)`` and seed ``seed + i`` (see module doc)."""
    import torch

    settings.validate()
    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    if not prompts:
        raise UserError("no prompts to generate from")
    out: list[Image.Image] = []
    for start in range(0, n, max(1, batch_size)):
        idx = list(range(start, min(n, start + max(1, batch_size))))
        with torch.no_grad():
            images = pipe(
                prompt=[prompts[i % len(prompts)] for i in idx],
                negative_prompt=[settings.negative_prompt] * len(idx) if settings.negative_prompt else None,
                num_inference_steps=settings.steps, guidance_scale=settings.cfg,
                height=settings.size, width=settings.size, eta=settings.eta,
                generator=[torch.Generator("cpu").manual_seed(image_seed(settings, i)) for i in idx],
                output_type="pil",
            ).images
        for i, img in zip(idx, images):
            if on_image is not None:
                on_image(i, img)
            out.append(img)
    return out


def generation_record(model: str | os.PathLike, lora: str | os.PathLike | None, lora_scale: float,
                      prompts: Sequence[str], settings: SamplerSettings, n: int) -> dict[str, Any]:
    """What produced a folder of images: model, LoRA and scale, settings, and per-image prompt and seed."""
    return {
        "model": str(model),
        "lora": str(lora) if lora else None,
        "lora_scale": float(lora_scale) if lora else 0.0,
        "settings": settings.as_dict(),
        "n": int(n),
        "images": [{"file": f"{i:05d}.png", "prompt": prompts[i % len(prompts)], "seed": image_seed(settings, i)} for i in range(n)],
    }


def generate_to_folder(pipe: "StableDiffusionPipeline", out_dir: str | os.PathLike, prompts: Sequence[str],
                       settings: SamplerSettings, n: int, *, model: str | os.PathLike, lora: str | os.PathLike | None = None,
                       lora_scale: float = 1.0, batch_size: int = 4, progress: bool = True) -> list[Path]:
    """Generate into ``out_dir`` as ``00000.png`` ... and write ``generation.json`` beside them.

    Pass ``lora`` to load it for this call only (the pipeline is the base model again afterwards)."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("[0-9][0-9][0-9][0-9][0-9].png"):  # never mix runs in one folder
        stale.unlink()
    paths: list[Path] = []
    label = "fine-tuned" if lora else "base"
    with tqdm(total=n, desc=f"generate {label}", unit="img", disable=not progress, leave=False) as bar:
        def save(i: int, img: "Image.Image") -> None:
            p = out / f"{i:05d}.png"
            atomic_write_png(img, p)
            paths.append(p)
            bar.update(1)

        with (lora_loaded(pipe, lora, lora_scale) if lora else _nothing()):
            generate(pipe, prompts, settings, n, batch_size=batch_size, on_image=save)
    record = generation_record(model, lora, lora_scale, prompts, settings, n)
    atomic_write_text(out / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    return paths


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@dataclass
class PairResult:
    """Two folders generated with one pipeline and one settings object."""

    base_dir: Path
    finetuned_dir: Path
    base_files: list[Path]
    finetuned_files: list[Path]
    settings: SamplerSettings
    prompts: list[str]
    base_record: dict[str, Any]
    finetuned_record: dict[str, Any]
    seconds: float


def generate_pair(model: str | os.PathLike, lora: str | os.PathLike, prompts: Sequence[str], settings: SamplerSettings,
                  n: int, *, base_dir: str | os.PathLike, finetuned_dir: str | os.PathLike, lora_scale: float = 1.0,
                  device: str | None = None, dtype: str | None = None, batch_size: int = 4,
                  progress: bool = True, pipe: "StableDiffusionPipeline | None" = None) -> PairResult:
    """Base then base+LoRA from ONE pipeline, same prompts/seeds/sampler/steps/CFG/size."""
    settings = replace(settings).validate()  # one frozen object, used for both runs
    prompts = list(prompts)
    t0 = time.perf_counter()
    pipe = pipe or load_generation_pipeline(model, sampler=settings.sampler, device=device, dtype=dtype)
    base = generate_to_folder(pipe, base_dir, prompts, settings, n, model=model, batch_size=batch_size, progress=progress)
    ft = generate_to_folder(pipe, finetuned_dir, prompts, settings, n, model=model, lora=lora, lora_scale=lora_scale,
                            batch_size=batch_size, progress=progress)
    return PairResult(
        Path(base_dir), Path(finetuned_dir), base, ft, settings, prompts,
        generation_record(model, None, 0.0, prompts, settings, n),
        generation_record(model, lora, lora_scale, prompts, settings, n),
        time.perf_counter() - t0,
    )
