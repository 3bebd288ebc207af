"""Held-out validation loss: how the adapter does on images it never trains on.

Face LoRAs overfit fast; a training loss that keeps falling says nothing about it, a held-out loss
that turns back up does. The pieces:

* **Which images** (:func:`split_validation`): ``--validation-split F`` holds out ``round(F·n)``
  images (at least one, never all), chosen by ranking ``sha256(seed, image sha256)`` — a function
  of the seed and the image *contents*, not of file names or order, so adding an image never
  reshuffles the others. They are dropped from training before anything is cached, so they are in
  no batch and not in the file's training-image digests (``facediffuser_train_images_sha256``).
  ``--validation-data DIR`` takes a folder instead (any image also in the training set is dropped
  from it, with a note).
* **A comparable number** (:meth:`ValidationSet.loss`): every image at the same fixed timesteps
  (sd-scripts' four: ``linspace`` over the schedule without its ends, 200/400/600/800 of 1000), with
  the same noise every time (drawn once, at set-up, from a generator of its own seeded by
  ``--seed``: the training generators are never touched, so a resumed run stays byte-identical),
  from the mean of each image's VAE distribution (no sampling, no flip, no caption dropout). The loss
  is the training objective itself — the same target, face weighting and min-SNR weighting — in
  eval mode (LoRA dropout off) under ``no_grad``, with the EMA weights when ``--ema`` is set (the
  weights the file would hold). Latents and text come from the same caches as training.
* **Several processes**: every rank builds the same set and noise; image ``i`` is evaluated on rank
  ``i mod world`` and the sums are reduced, so the number does not depend on the process count.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import UserError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from .config import TrainConfig
    from .dataset import DatasetScan, ImageRecord

logger = logging.getLogger(__name__)

NUM_VALIDATION_TIMESTEPS = 4  # sd-scripts' NUM_VALIDATION_TIMESTEPS


# --- which images ----------------------------------------------------------------------------------

def _rank_key(seed: int, image_sha256: str) -> str:
    return hashlib.sha256(f"facediffuser-validation|{seed}|{image_sha256}".encode()).hexdigest()


def held_out_indices(image_sha256s: Sequence[str], fraction: float, seed: int) -> list[int]:
    """Positions of the images ``--validation-split fraction`` holds out, in dataset order."""
    n = len(image_sha256s)
    if n < 2:
        raise UserError(f"--validation-split needs at least 2 images to hold some out (the dataset has {n})")
    k = min(n - 1, max(1, round(fraction * n)))
    ranked = sorted(range(n), key=lambda i: (_rank_key(seed, image_sha256s[i]), i))
    return sorted(ranked[:k])


def split_validation(config: "TrainConfig", scan: "DatasetScan") -> tuple["DatasetScan", "DatasetScan | None"]:
    """(training images, held-out images or None) as the settings ask; see the module docstring."""
    from .dataset import check_dataset

    if config.validation_split:
        held = set(held_out_indices([r.sha256 for r in scan.images], config.validation_split, config.seed))
        keep = [i for i in range(len(scan.images)) if i not in held]
        train = replace(scan, images=[scan.images[i] for i in keep], captions=[scan.captions[i] for i in keep])
        val = replace(scan, images=[scan.images[i] for i in sorted(held)], captions=[scan.captions[i] for i in sorted(held)],
                      skipped=[], notes=[])
        return train, val
    if config.validation_data:
        val = check_dataset(replace(config, data=config.validation_data))
        trained = {r.sha256 for r in scan.images}
        dupes = [i for i, r in enumerate(val.images) if r.sha256 in trained]
        notes = [f"{val.images[i].path}: also in the training set, not used for validation" for i in dupes]
        keep = [i for i in range(len(val.images)) if i not in set(dupes)]
        if not keep:
            raise UserError(f"--validation-data {config.validation_data}: every image is also in the training set {config.data}")
        val = replace(val, images=[val.images[i] for i in keep], captions=[val.captions[i] for i in keep],
                      notes=list(val.notes) + notes)
        return scan, val
    return scan, None


def validation_timesteps(num_train_timesteps: int) -> list[int]:
    """sd-scripts' fixed validation timesteps: ``linspace(0, T, K + 2)[1:-1]`` as integers."""
    k = NUM_VALIDATION_TIMESTEPS
    return [int(num_train_timesteps * (i + 1) / (k + 1)) for i in range(k)]


# --- the set -----------------------------------------------------------------------------------------

def _noise_generator(seed: int) -> "torch.Generator":
    import torch

    digest = hashlib.sha256(f"facediffuser-validation-noise|{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclass
class ValidationSet:
    """The held-out images, ready to evaluate: fixed latents, conditioning, noise and timesteps."""

    images: list["ImageRecord"]
    captions: list[str]
    latents: list["torch.Tensor"]  # (C, h, w) each, scaled, the VAE mean
    noise: list["torch.Tensor"]  # (K, C, h, w) each: the same every evaluation
    timesteps: list[int]
    masks: list["torch.Tensor | None"]  # (1, h, w) face masks at latent size
    hidden: list["torch.Tensor"] | None  # cached text-encoder states (frozen text encoder), else None
    input_ids: list["torch.Tensor"] | None  # token ids when the text encoder trains

    def __len__(self) -> int:
        return len(self.images)

    @property
    def digests(self) -> list[str]:
        from .kohya_format import IMAGE_DIGEST_HEX

        return [r.sha256[:IMAGE_DIGEST_HEX] for r in self.images]


    def loss(self, config: "TrainConfig", unet: "torch.nn.Module", text_encoder: "torch.nn.Module",
             scheduler: Any, prediction_type: str, accelerator: "Accelerator") -> float:
        """The mean loss over every (image, fixed timestep): eval mode, no_grad, RNG untouched."""
        import torch

        from .caching import encode_text
        from .training_loop import loss_from_noise

        device = accelerator.device
        world, rank = accelerator.num_processes, accelerator.process_index
        total, count = 0.0, 0
        modes = [unet.training, text_encoder.training]
        devices = [device] if device.type == "cuda" else []
        try:
            unet.eval(), text_encoder.eval()
            # autocast as the prepared model's forward has it in training (a no-op without mixed precision)
            with torch.random.fork_rng(devices=devices), torch.no_grad(), accelerator.autocast():
                for i in range(rank, len(self), world):
                    k = len(self.timesteps)
                    if self.hidden is not None:
                        cond = self.hidden[i].to(device)
                    else:
                        cond = encode_text(text_encoder, self.input_ids[i].unsqueeze(0).to(device))[0]
                    mask = self.masks[i]
                    per_sample = loss_from_noise(
                        config, unet, scheduler,
                        latents=self.latents[i].unsqueeze(0).expand(k, *self.latents[i].shape).to(device),
                        noise=self.noise[i].to(device),
                        timesteps=torch.tensor(self.timesteps, dtype=torch.long, device=device),
                        cond=cond.unsqueeze(0).expand(k, *cond.shape),
                        face_mask=None if mask is None else mask.unsqueeze(0).expand(k, *mask.shape),
                        prediction_type=prediction_type)
                    total += float(per_sample.double().sum())
                    count += k
        finally:
            unet.train(modes[0]), text_encoder.train(modes[1])
        if world > 1:
            sums = accelerator.reduce(torch.tensor([total, float(count)], dtype=torch.float64, device=device), reduction="sum")
            total, count = float(sums[0]), int(sums[1])
        return total / max(1, count)

    def metadata_values(self, history: Sequence[tuple[int, float]]) -> dict[str, Any]:
        """What :func:`.kohya_format.build_metadata` records about the validation."""
        return {"digests": self.digests, "history": [tuple(h) for h in history], "best": best_of(history)}


def best_of(history: Sequence[tuple[int, float]]) -> tuple[int, float] | None:
    """(step, loss) of the lowest validation loss (the earliest on a tie), or None."""
    return tuple(min(history, key=lambda sl: (sl[1], sl[0]))) if history else None  # type: ignore[return-value]


def build_validation_set(config: "TrainConfig", scan: "DatasetScan", models: Any, *, progress: bool = False) -> ValidationSet:
    """Latents (through the latent cache unless --no-cache), conditioning (through the text cache
    unless the text encoder trains), face masks, and the fixed noise of every held-out image."""
    import torch

    from .buckets import plan_for_config
    from .caching import LatentCache, TextEncodingCache, encode_text, load_entry, tokenize
    from .dataset import prepare_image, prepare_mask

    vae, scheduler = models.vae, models.noise_scheduler
    images, captions = list(scan.images), list(scan.captions)
    plan = plan_for_config(config, images)
    sizes = list(plan.sizes) if plan.enabled else None
    scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latents: list[torch.Tensor] = []
    masks: list[torch.Tensor | None] = []
    if config.no_cache:
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        for i, rec in enumerate(images):
            size = sizes[i] if sizes else None
            pixels = prepare_image(rec.path, config.resolution, size=size).unsqueeze(0)
            with torch.no_grad():
                mean = vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist.mean.float().cpu()[0]
            latents.append(((mean - shift) * scaling).contiguous())
            lat = config.resolution // factor if size is None else (size[0] // factor, size[1] // factor)
            masks.append(prepare_mask(rec.mask_path, lat) if rec.mask_path is not None else None)
    else:
        cache = LatentCache(config.cache_path, vae, resolution=config.resolution, progress=progress)
        build = cache.ensure(images, flip=False, sizes=sizes)
        if build.skipped:
            raise UserError(f"validation image could not be decoded: {build.skipped[0]}")
        for entry in build.entries:
            mean = load_entry(entry.latents)["mean"].to(torch.float32)
            latents.append(((mean - shift) * scaling).contiguous())
            masks.append(load_entry(entry.mask)["mask"].to(torch.float32) if entry.mask is not None else None)
    hidden = input_ids = None
    if config.train_text_encoder:  # encoded at each evaluation, by the text encoder as trained so far
        input_ids = [tokenize(models.tokenizer, [c])[0] for c in captions]
    elif not config.no_cache:  # the captions as written: no tag shuffle or dropout to make them unbounded
        paths = TextEncodingCache(config.cache_path, models.text_encoder, models.tokenizer, progress=progress).ensure(captions)
        hidden = [TextEncodingCache.load(paths[c]).to(torch.float32) for c in captions]
    else:
        with torch.no_grad():
            hidden = [encode_text(models.text_encoder, tokenize(models.tokenizer, [c]))[0].float().cpu() for c in captions]
    timesteps = validation_timesteps(int(scheduler.config.num_train_timesteps))
    gen = _noise_generator(config.seed)
    noise = [torch.randn((len(timesteps), *lat.shape), generator=gen, dtype=torch.float32) for lat in latents]
    return ValidationSet(images=images, captions=captions, latents=latents, noise=noise, timesteps=timesteps,
                         masks=masks, hidden=hidden, input_ids=input_ids)


def best_path(config: "TrainConfig") -> Path:
    """Where ``--keep-best-validation`` writes the adapter of the best validation step."""
    out = config.output_path
    return out.with_name(out.stem + ".best.safetensors")


def report(step: int, loss: float, best: tuple[int, float] | None) -> None:
    logger.info("validation loss at step %d: %.5f%s", step, loss,
                f" (best {best[1]:.5f} at step {best[0]})" if best is not None else "")
