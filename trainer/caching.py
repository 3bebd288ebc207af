"""Disk caches of VAE latents and text-encoder outputs, and the Datasets the loop iterates.

Why: the frozen VAE and (usually) the frozen text encoder cost more per step than a LoRA update at
small batch sizes; encoding each image once and reading it back later is what fast trainers do
(OneTrainer, SimpleTuner and ai-toolkit cache latents and text embeddings; kohya's sd-scripts caches
SD1.x latents only). Everything here is shared across runs and safe against crashes.

Layout (``<cache_dir>/``)::

    latents/<k[:2]>/<k>.safetensors   {"mean", "std"}: the VAE's DiagonalGaussian for one view of one image
    masks/<k[:2]>/<k>.safetensors     {"mask"}: a face mask at latent size, (1, h, w) in [0, 1]
    text/<k[:2]>/<k>.safetensors      {"hidden"}: the text encoder's last_hidden_state for one caption

One small file per entry: each is written to a temp name unique to its writer (:mod:`..fileio`),
fsync'd and ``os.replace``-d into place, so a
crash leaves either the old state or a complete entry, and several runs (or DDP ranks) can fill the
same cache at once. Measured here: reading a 4x64x64 mean+std entry back takes ~46 us (page cache),
against ~10 us for one tensor out of a single big file, which cannot be appended to atomically.

Keys (sha256 of a small JSON document, so any change of an input gives a new file):

* latents: image bytes (sha256), VAE fingerprint, resolution, flipped or not, the crop rule, format version,
  and the bucket size when it is not the square ``resolution × resolution`` (aspect-ratio buckets;
  square entries keep their keys, so a cache filled without buckets stays valid with them);
* masks: mask bytes, resolution, latent size, flipped or not (and the bucket's latent size, likewise);
* text: caption text, text-encoder fingerprint, tokenizer fingerprint, which output is cached.

Model fingerprint (:func:`module_fingerprint`): sha256 over every tensor's name, shape and dtype,
plus an evenly strided sample of up to 4096 values per tensor, plus the model config. A fine-tune,
another checkpoint, or another dtype changes it; a change of a few isolated weights might not (pass
``fingerprint=`` explicitly, e.g. a file hash, when that matters). It costs tens of ms for SD1.5.

What is stored for latents: the distribution's **mean and std** (not a sample). The dataset draws
``(mean + std * eps) * scaling_factor`` afresh for every step from a seeded generator, which is what
diffusers' uncached training does (``latent_dist.sample()`` each step); kohya instead caches one
sample forever. ``sample_latents=False`` uses the mean (the mode).

With ``flip`` on, both the image and its mirror are encoded and cached (the VAE is not exactly
flip-equivariant, so mirroring the latent would not be the latent of the mirrored image).

When the text encoder is trained its outputs change every step: the loop then simply does not build
a :class:`TextEncodingCache`; the dataset yields ``input_ids`` and the loop calls :func:`encode_text`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ..errors import UserError
from ..fileio import atomic_path
from .captions import augment_caption
from ..image_files import BadImage
from .dataset import ImageRecord, prepare_image, prepare_mask

if TYPE_CHECKING:
    import torch

    from .buckets import BucketPlan
    from .config import TrainConfig
    from .dataset import DatasetScan

CACHE_VERSION = 1
_CROP_RULE = "centre-square-lanczos-v1"
_TEXT_OUTPUT = "last_hidden_state"


# --- counters ------------------------------------------------------------------------------------

@dataclass
class CacheStats:
    """What the caches did. ``*_forwards`` count encoder calls (batches), ``*_encoded`` items."""

    vae_forwards: int = 0
    images_encoded: int = 0  # views (an image and its mirror are two)
    text_forwards: int = 0
    captions_encoded: int = 0
    latent_hits: int = 0
    latent_misses: int = 0
    mask_hits: int = 0
    mask_misses: int = 0
    text_hits: int = 0
    text_misses: int = 0


# --- fingerprints and files ----------------------------------------------------------------------

_CONFIG_IGNORED = {"transformers_version", "architectures", "torch_dtype", "dtype", "name_or_path"}


def _config_dict(module: Any) -> dict[str, Any]:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in _CONFIG_IGNORED}


def module_fingerprint(module: "torch.nn.Module", sample: int = 4096) -> str:
    """A cheap content fingerprint of a model's weights (see the module docstring)."""
    import torch

    h = hashlib.sha256()
    h.update(type(module).__name__.encode())
    h.update(json.dumps(_config_dict(module), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            part = flat[::step][:sample].to("cpu").contiguous()
            h.update(part.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Class, length limit, vocabulary size and the ids of a probe sentence."""
    probe = "a photo of a face, Close-up portrait; 1girl smiling (detailed) 123 naïve"
    ids = tokenizer(probe, padding="max_length", truncation=True, max_length=tokenizer.model_max_length)["input_ids"]
    doc = [type(tokenizer).__name__, tokenizer.model_max_length, len(tokenizer), tokenizer.pad_token_id, list(ids)]
    return hashlib.sha256(json.dumps(doc, default=str).encode()).hexdigest()


def _key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()


def _entry_path(root: Path, kind: str, key: str) -> Path:
    return root / kind / key[:2] / f"{key}.safetensors"


def atomic_save(tensors: Mapping[str, "torch.Tensor"], path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """safetensors file written to a temp name in the same folder, then moved into place."""
    from safetensors.torch import save_file

    with atomic_path(path, fsync=True) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata or {}))


def load_entry(path: Path) -> dict[str, "torch.Tensor"]:
    """Read a cache entry; a damaged one is a UserError that says how to recover."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"damaged cache entry {path} ({exc}); delete it (or the cache folder) and rerun") from None


def _module_device_dtype(module: "torch.nn.Module") -> tuple["torch.device", "torch.dtype"]:
    p = next(module.parameters())
    return p.device, p.dtype


# --- text ----------------------------------------------------------------------------------------

def tokenize(tokenizer: Any, captions: Sequence[str]) -> "torch.Tensor":
    """(B, model_max_length) int64 ids, padded and truncated the way SD1.x training does."""
    return tokenizer(list(captions), padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length, return_tensors="pt").input_ids


def encode_text(text_encoder: "torch.nn.Module", input_ids: "torch.Tensor") -> "torch.Tensor":
    """The conditioning SD1.x uses: the text encoder's last hidden state. The one definition, used
    by the cache and by the loop when the text encoder is trained (so both give the same tensors)."""
    device, _ = _module_device_dtype(text_encoder)
    return text_encoder(input_ids.to(device), return_dict=False)[0]


class TextEncodingCache:
    """Text-encoder outputs on disk, one entry per distinct caption (a template is encoded once)."""

    def __init__(self, root: str | os.PathLike, text_encoder: "torch.nn.Module", tokenizer: Any, *,
                 fingerprint: str | None = None, batch_size: int = 32, progress: bool = True,
                 stats: CacheStats | None = None) -> None:
        self.root = Path(root)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self.stats = stats if stats is not None else CacheStats()
        self.fingerprint = fingerprint or module_fingerprint(text_encoder)
        self.tokenizer_fingerprint = tokenizer_fingerprint(tokenizer)

    def path(self, caption: str) -> Path:
        key = _key(kind="text", caption=caption, model=self.fingerprint, tokenizer=self.tokenizer_fingerprint,
                   output=_TEXT_OUTPUT)
        return _entry_path(self.root, "text", key)

    def ensure(self, captions: Iterable[str]) -> dict[str, Path]:
        """Encode the captions that are not cached yet (batched); return ``{caption: entry path}``."""
        import torch
        from tqdm.auto import tqdm

        paths = {c: self.path(c) for c in dict.fromkeys(captions)}
        missing = [c for c, p in paths.items() if not p.exists()]
        self.stats.text_hits += len(paths) - len(missing)
        self.stats.text_misses += len(missing)
        with tqdm(total=len(missing), desc="caching text embeddings", unit="caption",
                  disable=not self.progress or not missing) as bar, torch.no_grad():
            for start in range(0, len(missing), self.batch_size):
                chunk = missing[start:start + self.batch_size]
                hidden = encode_text(self.text_encoder, tokenize(self.tokenizer, chunk))
                self.stats.text_forwards += 1
                self.stats.captions_encoded += len(chunk)
                for cap, h in zip(chunk, hidden):
                    atomic_save({"hidden": h}, paths[cap], {"caption": cap, "format": f"facediffuser-text-{CACHE_VERSION}"})
                bar.update(len(chunk))
        return paths

    @staticmethod
    def load(path: Path) -> "torch.Tensor":
        return load_entry(path)["hidden"]


# --- latents -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LatentEntry:
    """The cache files of one training image (``None`` where the view/mask does not exist)."""

    latents: Path
    latents_flipped: Path | None = None
    mask: Path | None = None
    mask_flipped: Path | None = None


@dataclass
class LatentBuild:
    """Result of :meth:`LatentCache.ensure`: entries for the images that could be used."""

    entries: list[LatentEntry]
    images: list[ImageRecord]  # the records behind ``entries`` (same order)
    kept: list[int]  # their positions in the input list
    skipped: list[str] = field(default_factory=list)  # "path: why" for images that failed to decode


class _PrepViews:
    """Decodes the images that miss the cache (in DataLoader workers when asked)."""

    def __init__(self, items: list[tuple[int, ImageRecord, bool, bool]], resolution: int,
                 sizes: Sequence[tuple[int, int]] | None = None) -> None:
        self.items, self.resolution, self.sizes = items, resolution, sizes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, "torch.Tensor | None", str]:
        idx, rec, _, _ = self.items[i]
        try:
            return idx, prepare_image(rec.path, self.resolution, size=self.sizes[idx] if self.sizes else None), ""
        except BadImage as exc:
            return idx, None, str(exc)


def _collate_list(batch: list) -> list:
    return batch


class LatentCache:
    """VAE latent distributions (and face masks at latent size) on disk."""

    def __init__(self, root: str | os.PathLike, vae: "torch.nn.Module", *, resolution: int,
                 fingerprint: str | None = None, batch_size: int = 8, num_workers: int = 0,
                 progress: bool = True, stats: CacheStats | None = None) -> None:
        self.root = Path(root)
        self.vae = vae
        self.resolution = resolution
        self.batch_size = max(1, batch_size)
        self.num_workers = num_workers
        self.progress = progress
        self.stats = stats if stats is not None else CacheStats()
        self.fingerprint = fingerprint or module_fingerprint(vae)
        cfg = vae.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if resolution % factor:
            raise UserError(f"--resolution {resolution} is not a multiple of the VAE's downscale factor {factor}")
        self.factor = factor
        self.latent_size = resolution // factor
        self.scaling_factor = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)

    def _bucket(self, size: tuple[int, int] | None) -> dict[str, Any]:
        """The extra key part of a bucket size (none for the square: old keys stay valid)."""
        if size is None or tuple(size) == (self.resolution, self.resolution):
            return {}
        if size[0] % self.factor or size[1] % self.factor:
            raise UserError(f"bucket {size[0]}x{size[1]} is not a multiple of the VAE's downscale factor {self.factor}")
        return {"bucket": [int(size[0]), int(size[1])]}

    def latent_path(self, image_sha256: str, flipped: bool, size: tuple[int, int] | None = None) -> Path:
        """The entry of one view; ``size=(w, h)``: at that bucket size instead of the square."""
        key = _key(kind="latent", image=image_sha256, model=self.fingerprint, resolution=self.resolution,
                   flipped=flipped, crop=_CROP_RULE, **self._bucket(size))
        return _entry_path(self.root, "latents", key)

    def mask_path(self, mask_sha256: str, flipped: bool, size: tuple[int, int] | None = None) -> Path:
        key = _key(kind="mask", mask=mask_sha256, resolution=self.resolution, size=self.latent_size,
                   flipped=flipped, crop=_CROP_RULE, **self._bucket(size))
        return _entry_path(self.root, "masks", key)

    def ensure(self, images: Sequence[ImageRecord], *, flip: bool = False,
               sizes: Sequence[tuple[int, int]] | None = None) -> LatentBuild:
        """Encode every view that is not cached yet; images must carry ``sha256`` (check_dataset).

        ``sizes``: each image's bucket ``(w, h)`` in pixels (:mod:`.buckets`); default the square."""
        import torch
        from tqdm.auto import tqdm

        if sizes is not None and len(sizes) != len(images):
            raise ValueError(f"{len(images)} images but {len(sizes)} bucket sizes")
        planned: list[LatentEntry] = []
        todo: list[tuple[int, ImageRecord, bool, bool]] = []  # (index, record, need plain, need flipped)
        for i, rec in enumerate(images):
            if not rec.sha256:
                raise ValueError(f"{rec.path}: ImageRecord without sha256; run check_dataset first")
            size = sizes[i] if sizes is not None else None
            plain = self.latent_path(rec.sha256, False, size)
            mirrored = self.latent_path(rec.sha256, True, size) if flip else None
            need = (not plain.exists(), mirrored is not None and not mirrored.exists())
            views = 1 + (mirrored is not None)
            misses = sum(need)
            self.stats.latent_misses += misses
            self.stats.latent_hits += views - misses
            if any(need):
                todo.append((i, rec, *need))
            m = mf = None
            if rec.mask_path is not None and rec.mask_sha256:
                m = self.mask_path(rec.mask_sha256, False, size)
                mf = self.mask_path(rec.mask_sha256, True, size) if flip else None
            planned.append(LatentEntry(plain, mirrored, m, mf))

        failed: dict[int, str] = {}
        if todo:
            if sizes is not None:  # one bucket after another, so the VAE batches are mostly of one shape
                todo.sort(key=lambda item: (tuple(sizes[item[0]]), item[0]))
            loader = torch.utils.data.DataLoader(_PrepViews(todo, self.resolution, sizes), batch_size=self.batch_size,
                                                 num_workers=self.num_workers, collate_fn=_collate_list,
                                                 generator=torch.Generator().manual_seed(0))  # not the global RNG
            needs = {i: (p, f) for i, _, p, f in todo}
            with tqdm(total=len(todo), desc="caching latents", unit="image", disable=not self.progress) as bar:
                for batch in loader:
                    views, targets = [], []
                    for idx, pixels, why in batch:
                        if pixels is None:
                            failed[idx] = why
                            continue
                        need_plain, need_flip = needs[idx]
                        if need_plain:
                            views.append(pixels)
                            targets.append(planned[idx].latents)
                        if need_flip:
                            views.append(pixels.flip(-1))
                            targets.append(planned[idx].latents_flipped)
                    for shape in dict.fromkeys(v.shape for v in views):  # one VAE call per bucket size
                        group = [k for k, v in enumerate(views) if v.shape == shape]
                        self._encode_and_save([views[k] for k in group], [targets[k] for k in group])
                    bar.update(len(batch))

        self._ensure_masks(images, planned, failed, sizes)
        kept = [i for i in range(len(images)) if i not in failed]
        return LatentBuild(entries=[planned[i] for i in kept], images=[images[i] for i in kept], kept=kept,
                           skipped=[f"{images[i].path}: {why}" for i, why in sorted(failed.items())])

    def _encode_and_save(self, views: list["torch.Tensor"], targets: list[Path]) -> None:
        import torch

        device, dtype = _module_device_dtype(self.vae)
        with torch.no_grad():
            dist = self.vae.encode(torch.stack(views).to(device=device, dtype=dtype)).latent_dist
        self.stats.vae_forwards += 1
        self.stats.images_encoded += len(views)
        mean, std = dist.mean.to("cpu"), dist.std.to("cpu")
        for k, path in enumerate(targets):
            atomic_save({"mean": mean[k], "std": std[k]}, path,
                        {"format": f"facediffuser-latent-{CACHE_VERSION}", "resolution": str(self.resolution)})

    def _ensure_masks(self, images: Sequence[ImageRecord], planned: list[LatentEntry], failed: dict[int, str],
                      sizes: Sequence[tuple[int, int]] | None = None) -> None:
        for i, (rec, entry) in enumerate(zip(images, planned)):
            if entry.mask is None or i in failed:
                continue
            latent = self.latent_size if sizes is None else (sizes[i][0] // self.factor, sizes[i][1] // self.factor)
            for path, flipped in ((entry.mask, False), (entry.mask_flipped, True)):
                if path is None:
                    continue
                if path.exists():
                    self.stats.mask_hits += 1
                    continue
                self.stats.mask_misses += 1
                atomic_save({"mask": prepare_mask(rec.mask_path, latent, flip=flipped)}, path,
                            {"format": f"facediffuser-mask-{CACHE_VERSION}"})


# --- datasets ------------------------------------------------------------------------------------

def sample_generator(seed: int, epoch: int, index: int) -> "torch.Generator":
    """The generator behind every random choice for one sample in one epoch.

    A function of (seed, epoch, index) only, so results do not depend on worker count, batch
    order or where a resumed run starts.
    """
    import torch

    digest = hashlib.sha256(f"facediffuser-sample|{seed}|{epoch}|{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class _CaptionedDataset:
    """The caption/flip part shared by the cached and the pixel datasets."""

    def __init__(self, captions: Sequence[str], *, seed: int, flip: bool, caption_dropout: float,
                 shuffle_tags: bool, keep_tokens: int, tokenizer: Any | None,
                 text_embeddings: Mapping[str, Path] | None) -> None:
        if text_embeddings is None and tokenizer is None:
            raise ValueError("give either text_embeddings (frozen text encoder) or a tokenizer")
        if text_embeddings is not None and shuffle_tags:
            raise ValueError("tag shuffling makes captions unbounded; do not pre-encode them")
        self.captions = list(captions)
        self.seed, self.flip, self.epoch = seed, flip, 0
        self.caption_dropout, self.shuffle_tags, self.keep_tokens = caption_dropout, shuffle_tags, keep_tokens
        self.tokenizer = tokenizer
        self.text_embeddings = dict(text_embeddings) if text_embeddings is not None else None
        if self.text_embeddings is not None:
            needed = set(self.captions) | ({""} if caption_dropout > 0 else set())
            missing = needed - set(self.text_embeddings)
            if missing:
                raise ValueError(f"text_embeddings lacks {len(missing)} caption(s), e.g. {sorted(missing)[0]!r}")
        self._memo: dict[str, "torch.Tensor"] = {}
        self._preload = self.text_embeddings is not None and len(set(self.captions)) <= 256

    @property
    def pre_encoded(self) -> bool:
        """True when samples carry ``encoder_hidden_states``; False when they carry ``input_ids``."""
        return self.text_embeddings is not None

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch (before the DataLoader iterator is created)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.captions)

    def _text(self, index: int, g: "torch.Generator") -> dict[str, Any]:
        caption = augment_caption(self.captions[index], dropout=self.caption_dropout, shuffle=self.shuffle_tags,
                                  keep_tokens=self.keep_tokens, generator=g)
        if self.text_embeddings is not None:
            hidden = self._memo.get(caption)
            if hidden is None:
                hidden = TextEncodingCache.load(self.text_embeddings[caption]).to(dtype=_f32()).contiguous()
                if self._preload or caption == "":
                    self._memo[caption] = hidden
            return {"caption": caption, "encoder_hidden_states": hidden}
        return {"caption": caption, "input_ids": tokenize(self.tokenizer, [caption])[0].contiguous()}

    def _flip(self, g: "torch.Generator") -> bool:
        import torch

        return bool(self.flip and torch.rand((), generator=g).item() < 0.5)


def _f32() -> "torch.dtype":
    import torch

    return torch.float32


class CachedLatentDataset(_CaptionedDataset):
    """Samples from the latent cache: ``{latents (C,h,w) f32 scaled, encoder_hidden_states (77,D) f32
    | input_ids (77,), caption, face_mask (1,h,w) f32 | None, flipped, index}``, all CPU, contiguous.

    Per sample and epoch, in this order: flip coin (when ``flip``), latent noise (when
    ``sample_latents``), caption dropout, tag shuffle, all from :func:`sample_generator`.
    """

    def __init__(self, entries: Sequence[LatentEntry], captions: Sequence[str], *, seed: int = 0,
                 flip: bool = False, scaling_factor: float = 0.18215, shift_factor: float = 0.0,
                 sample_latents: bool = True, text_embeddings: Mapping[str, Path] | None = None,
                 tokenizer: Any | None = None, caption_dropout: float = 0.0, shuffle_tags: bool = False,
                 keep_tokens: int = 0) -> None:
        if len(entries) != len(captions):
            raise ValueError("entries and captions differ in length")
        if flip and any(e.latents_flipped is None for e in entries):
            raise ValueError("flip=True needs flipped latents: LatentCache.ensure(..., flip=True)")
        super().__init__(captions, seed=seed, flip=flip, caption_dropout=caption_dropout, shuffle_tags=shuffle_tags,
                         keep_tokens=keep_tokens, tokenizer=tokenizer, text_embeddings=text_embeddings)
        self.entries = list(entries)
        self.scaling_factor, self.shift_factor, self.sample_latents = scaling_factor, shift_factor, sample_latents

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        g = sample_generator(self.seed, self.epoch, index)
        entry = self.entries[index]
        flipped = self._flip(g)
        dist = load_entry(entry.latents_flipped if flipped else entry.latents)
        mean = dist["mean"].to(torch.float32)
        if self.sample_latents:
            mean = mean + dist["std"].to(torch.float32) * torch.randn(mean.shape, generator=g)
        latents = ((mean - self.shift_factor) * self.scaling_factor).contiguous()
        mask_path = entry.mask_flipped if flipped else entry.mask
        mask = load_entry(mask_path)["mask"].to(torch.float32).contiguous() if mask_path is not None else None
        return {"latents": latents, **self._text(index, g), "face_mask": mask, "flipped": flipped, "index": index}


class ImageDataset(_CaptionedDataset):
    """The uncached path (``--no-cache``): ``pixel_values`` (3,H,W) in [-1,1] instead of latents,
    decoded every time; otherwise the same keys and the same random choices as CachedLatentDataset."""

    def __init__(self, images: Sequence[ImageRecord], captions: Sequence[str], *, resolution: int,
                 latent_size: int, seed: int = 0, flip: bool = False, tokenizer: Any | None = None,
                 text_embeddings: Mapping[str, Path] | None = None, caption_dropout: float = 0.0,
                 shuffle_tags: bool = False, keep_tokens: int = 0,
                 sizes: Sequence[tuple[int, int]] | None = None) -> None:
        if len(images) != len(captions):
            raise ValueError("images and captions differ in length")
        super().__init__(captions, seed=seed, flip=flip, caption_dropout=caption_dropout, shuffle_tags=shuffle_tags,
                         keep_tokens=keep_tokens, tokenizer=tokenizer, text_embeddings=text_embeddings)
        self.images, self.resolution, self.latent_size = list(images), resolution, latent_size
        self.sizes = list(sizes) if sizes is not None else None  # bucket (w, h) per image, or the square

    def __getitem__(self, index: int) -> dict[str, Any]:
        g = sample_generator(self.seed, self.epoch, index)
        rec = self.images[index]
        flipped = self._flip(g)
        size = self.sizes[index] if self.sizes is not None else None
        try:
            pixels = prepare_image(rec.path, self.resolution, flip=flipped, size=size)
        except BadImage as exc:
            raise UserError(f"{rec.path}: {exc}") from None
        factor = self.resolution // self.latent_size
        latent = self.latent_size if size is None else (size[0] // factor, size[1] // factor)
        mask = prepare_mask(rec.mask_path, latent, flip=flipped) if rec.mask_path is not None else None
        return {"pixel_values": pixels, **self._text(index, g), "face_mask": mask, "flipped": flipped, "index": index}


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples into one batch of contiguous CPU tensors.

    ``face_mask`` is None when no sample has one; otherwise missing masks are zeros and
    ``has_face_mask`` (B,) bool says which are real.
    """
    import torch

    out: dict[str, Any] = {}
    for key in ("latents", "pixel_values", "encoder_hidden_states", "input_ids"):
        if key in samples[0]:
            out[key] = torch.stack([s[key] for s in samples]).contiguous()
    out["caption"] = [s["caption"] for s in samples]
    out["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
    out["flipped"] = torch.tensor([s["flipped"] for s in samples], dtype=torch.bool)
    masks = [s["face_mask"] for s in samples]
    if all(m is None for m in masks):
        out["face_mask"] = None
        out["has_face_mask"] = torch.zeros(len(samples), dtype=torch.bool)
    else:
        ref = next(m for m in masks if m is not None)
        out["face_mask"] = torch.stack([m if m is not None else torch.zeros_like(ref) for m in masks]).contiguous()
        out["has_face_mask"] = torch.tensor([m is not None for m in masks], dtype=torch.bool)
    return out


# --- one call for the loop -----------------------------------------------------------------------

@dataclass
class TrainData:
    """What the loop needs from the data side."""

    dataset: "CachedLatentDataset | ImageDataset"
    images: list[ImageRecord]  # the images actually trained on (for ss_* metadata and the hash list)
    captions: list[str]
    stats: CacheStats
    skipped: list[str]  # images dropped while encoding (decode failures check_dataset could not see)
    pre_encoded: bool  # samples carry encoder_hidden_states (else input_ids: the loop encodes)
    buckets: "BucketPlan | None" = None  # each image's training size (aspect-ratio buckets), same order as images

    @property
    def image_hashes(self) -> list[str]:
        return [r.sha256 for r in self.images]


def uses_text_cache(config: "TrainConfig") -> bool:
    """Text outputs can be cached only for a frozen text encoder and a bounded set of captions."""
    return not (config.train_text_encoder or config.shuffle_tags or config.no_cache)


def build_train_data(config: "TrainConfig", scan: "DatasetScan", *, vae: "torch.nn.Module",
                     text_encoder: "torch.nn.Module", tokenizer: Any, progress: bool = True,
                     encode_batch_size: int = 8) -> TrainData:
    """Fill the caches as ``config`` asks and return the Dataset (the loop's one call into this module).

    Put the VAE and text encoder on the compute device before calling; they are used as they are
    (an fp32 VAE is the safe choice: the cache is filled once). Under DDP let the main process run
    it first (accelerate's ``main_process_first``); the other ranks then only hit. Entries are
    atomic, so concurrent fills are safe too, just wasteful.
    """
    from .buckets import plan_for_config

    stats = CacheStats()
    root = config.cache_path
    common = dict(seed=config.seed, flip=config.flip, caption_dropout=config.caption_dropout,
                  shuffle_tags=config.shuffle_tags, keep_tokens=config.keep_tokens)
    images, captions = list(scan.images), list(scan.captions)
    plan = plan_for_config(config, images)
    sizes = list(plan.sizes) if plan.enabled else None
    skipped: list[str] = []
    if config.no_cache:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        dataset: CachedLatentDataset | ImageDataset = ImageDataset(
            images, captions, resolution=config.resolution, latent_size=config.resolution // factor,
            tokenizer=tokenizer, sizes=sizes, **common)
    else:
        latents = LatentCache(root, vae, resolution=config.resolution, num_workers=config.dataloader_workers,
                              batch_size=encode_batch_size, progress=progress, stats=stats)
        build = latents.ensure(images, flip=config.flip, sizes=sizes)
        images, skipped = build.images, build.skipped
        captions = [captions[i] for i in build.kept]
        plan = plan.subset(build.kept)
        if not images:
            raise UserError(f"none of the images in {config.data} could be decoded (e.g. {skipped[0]})")
        text_paths = None
        if uses_text_cache(config):
            wanted = captions + ([""] if config.caption_dropout > 0 else [])
            text_paths = TextEncodingCache(root, text_encoder, tokenizer, progress=progress, stats=stats).ensure(wanted)
        dataset = CachedLatentDataset(build.entries, captions, scaling_factor=latents.scaling_factor,
                                      shift_factor=latents.shift_factor, text_embeddings=text_paths,
                                      tokenizer=None if text_paths is not None else tokenizer, **common)
    return TrainData(dataset=dataset, images=images, captions=captions, stats=stats, skipped=skipped,
                     pre_encoded=dataset.pre_encoded, buckets=plan)
