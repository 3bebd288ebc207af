"""The training images: find them, vet them, and turn one into a square tensor.

* :func:`scan_images` lists the data folder with :func:`..image_files.list_images` (recursively,
  sorted by relative path so every run and every machine sees the same order; the extension set
  prep and the evaluation use, hidden files and folders and prep's masks skipped) and pairs each
  image with its optional caption file (``<stem><caption_extension>``) and optional face mask
  (``<stem>.mask.png``, written by ``facediffuser prep``).
* :func:`check_dataset` is what the training loop calls **before loading any model**: it raises a
  :class:`UserError` for a missing or empty folder, reads every file once (its sha256 goes into the
  LoRA metadata for the evaluation overlap guard and keys the latent cache), checks that it is a
  usable image, and returns one report line per skipped or converted file.
* :func:`dataset_fingerprint` is a stat-only fingerprint of the folder (for ComfyUI's ``IS_CHANGED``).
* :func:`prepare_image` decodes an image with :func:`..image_files.load_rgb` (EXIF orientation
  applied, converted to 8-bit RGB: CMYK, 16-bit, grayscale, palette; transparency composited on
  white), **centre-cropped to the largest square, then resized to ``resolution`` with Lanczos** (the same
  result as "resize the short side, then centre-crop", in one antialiased resample) — or, with
  aspect-ratio buckets (:mod:`.buckets`), centre-cropped to its bucket's aspect ratio and resized
  to the bucket (``size=(w, h)``), so a portrait keeps its forehead and chin.

Images whose short side is below ``resolution / 4`` (:func:`min_side_for`) are skipped as too small
to teach anything but blur; images between that and ``resolution`` are upscaled.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ..errors import UserError
from ..faces.masks import read_mask
from ..fileio import file_sha256
from ..image_files import CONVERSIONS, MASK_SUFFIX, SUPPORTED_MODES, BadImage, list_images, load_rgb, open_image
from .captions import build_caption, tag_frequency

if TYPE_CHECKING:  # heavy imports stay inside functions (see docs/internals.md)
    import torch
    from PIL import Image

    from .config import TrainConfig

#: An image whose short side is below resolution // MIN_SIDE_DIVISOR is skipped.
MIN_SIDE_DIVISOR = 4


@dataclass(frozen=True)
class ImageRecord:
    """One training image. ``sha256``/``width``/``height`` are filled in by :func:`check_dataset`."""

    path: Path
    rel: str  # path relative to the data folder, POSIX separators (the sort key)
    caption_path: Path | None = None
    mask_path: Path | None = None
    sha256: str = ""
    width: int = 0
    height: int = 0
    mask_sha256: str = ""  # "" when there is no usable mask


@dataclass
class DatasetScan:
    """What :func:`check_dataset` found: the usable images, their captions and the report."""

    data_dir: Path
    images: list[ImageRecord]
    captions: list[str]  # base caption per image (file or template, trigger prepended)
    skipped: list[str] = field(default_factory=list)  # one line per skipped file: "path: why"
    notes: list[str] = field(default_factory=list)  # one line per converted file / ignored mask
    min_side: int = 0

    @property
    def image_hashes(self) -> list[str]:
        """sha256 of every training image's bytes, in dataset order (LoRA metadata)."""
        return [r.sha256 for r in self.images]

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya ``ss_tag_frequency``: ``{folder: {tag: count}}``."""
        return tag_frequency(self.captions, [_folder_name(self.data_dir, r) for r in self.images])

    def report_lines(self) -> list[str]:
        return [f"skipped {line}" for line in self.skipped] + list(self.notes)


def min_side_for(resolution: int) -> int:
    """Smallest accepted short side in pixels for a training resolution."""
    return max(1, resolution // MIN_SIDE_DIVISOR)


def _folder_name(data_dir: Path, rec: ImageRecord) -> str:
    parent = Path(rec.rel).parent.as_posix()
    return data_dir.name if parent in ("", ".") else parent


def scan_images(data_dir: str | os.PathLike, caption_extension: str = ".txt") -> list[ImageRecord]:
    """All images under ``data_dir`` (see :func:`..image_files.list_images`), sorted by relative path,
    each with its caption and mask file if present. Raises UserError for a missing folder or one
    without any image file."""
    root = Path(data_dir)
    if caption_extension and not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    files = list_images(root, what="dataset folder")
    siblings: dict[Path, tuple[set[str], dict[str, str]]] = {}  # one directory listing per folder
    records: list[ImageRecord] = []
    for path in files:
        d = path.parent
        if d not in siblings:
            names = {e.name for e in os.scandir(d) if e.is_file()}
            siblings[d] = (names, {n.lower(): n for n in names})
        names, lower = siblings[d]
        stem = path.name.rsplit(".", 1)[0]
        cap = stem + caption_extension if caption_extension else None
        mask = lower.get((stem + MASK_SUFFIX).lower())
        records.append(ImageRecord(
            path=path,
            rel=path.relative_to(root).as_posix(),
            caption_path=d / cap if cap and cap in names else None,
            mask_path=d / mask if mask else None,
        ))
    return records


def dataset_fingerprint(data_dir: str | os.PathLike) -> str:
    """A cheap fingerprint of everything in a data folder that training reads: the relative path,
    size, mtime and ctime of every non-hidden file (images, captions of any extension, face masks).

    For ComfyUI's ``IS_CHANGED``, which runs on every queue: a stat per file (about 6 ms for 1000
    files here) instead of hashing gigabytes. Any write, rename or replacement changes the ctime,
    even when a tool restores the size and mtime (``cp -p``, ``touch -r``); the node's reuse check
    then compares the real content digests before it decides to retrain."""
    root = Path(data_dir)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                continue
            rel = path.relative_to(root).as_posix()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# --- vetting ----------------------------------------------------------------------------------

def _verify(data: bytes) -> tuple[int, int, str]:
    """Decode ``data`` fully (cheaply for JPEG) and return its upright size and pixel mode."""
    img = open_image(data)
    try:
        if img.format == "PNG":
            img.verify()  # walks every chunk's CRC: catches truncation and bit rot
            img = open_image(data)
        w, h, mode, fmt = img.width, img.height, img.mode, img.format
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block is not a reason to drop the image
            orientation = 1
        if fmt == "JPEG":
            img.draft(None, (max(1, w // 8), max(1, h // 8)))  # DCT-scaled decode: 1/64 of the work
        img.load()
    except BadImage:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces as OSError, SyntaxError ...
        raise BadImage(f"corrupt or truncated image data ({exc})") from None
    if orientation in (5, 6, 7, 8):  # stored rotated by 90 degrees
        w, h = h, w
    return w, h, mode


def _check_one(rec: ImageRecord, min_side: int) -> tuple[ImageRecord | None, str | None, list[str]]:
    """(record with hash and size, skip reason, notes) for one file."""
    try:
        data = rec.path.read_bytes()
    except OSError as exc:
        return None, f"cannot read file ({exc.strerror or exc})", []
    try:
        w, h, mode = _verify(data)
        if mode not in SUPPORTED_MODES:
            raise BadImage(f"unsupported pixel mode {mode}")
        if min(w, h) < min_side:
            raise BadImage(f"too small ({w}x{h}; the short side must be at least {min_side} px)")
    except BadImage as exc:
        return None, str(exc), []
    notes = [CONVERSIONS[mode]] if mode in CONVERSIONS else []
    if mode == "P" and _has_transparency_bytes(data):
        notes = ["converted palette with transparency to RGB on white"]
    mask_sha = ""
    if rec.mask_path is not None:
        try:
            mdata = rec.mask_path.read_bytes()
            mw, mh, _ = _verify(mdata)
            if (mw, mh) != (w, h):
                raise BadImage(f"mask is {mw}x{mh} but the image is {w}x{h}")
            mask_sha = file_sha256(mdata)
        except (OSError, BadImage) as exc:
            notes.append(f"face mask {rec.mask_path.name} ignored: {exc}")
    out = replace(rec, sha256=file_sha256(data), width=w, height=h, mask_sha256=mask_sha,
                  mask_path=rec.mask_path if mask_sha else None)
    return out, None, notes


def _has_transparency_bytes(data: bytes) -> bool:
    return "transparency" in open_image(data).info


def check_images(records: Iterable[ImageRecord], resolution: int, *, workers: int | None = None,
                 progress: bool = False) -> tuple[list[ImageRecord], list[tuple[Path, str]], list[str]]:
    """Vet ``records`` in parallel threads (hashing and decoding release the GIL).

    Returns (usable records with sha256 and size, (path, why) of each skipped file, note lines),
    in input order.
    """
    records = list(records)
    min_side = min_side_for(resolution)
    workers = workers or min(8, (os.cpu_count() or 1))
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(lambda r: _check_one(r, min_side), records), total=len(records),
                            desc="checking images", unit="image", disable=not progress or len(records) < 100))
    good, skipped, notes = [], [], []
    for rec, (out, why, rec_notes) in zip(records, results):
        if out is None:
            skipped.append((rec.path, why))
        else:
            good.append(out)
        notes.extend(f"{rec.path}: {n}" for n in rec_notes)
    return good, skipped, notes


def check_dataset(config: "TrainConfig", *, progress: bool = False) -> DatasetScan:
    """Everything about the data that can fail, checked before any model is loaded.

    Raises UserError when the folder is missing, holds no image, or none of them is usable.
    """
    data_dir = Path(config.data)
    records = scan_images(data_dir, config.caption_extension)
    good, skipped, notes = check_images(records, config.resolution, progress=progress)
    images: list[ImageRecord] = []
    captions: list[str] = []
    for rec in good:
        try:
            captions.append(build_caption(rec.caption_path, config.caption_template, config.trigger))
        except UserError as exc:
            skipped.append((rec.path, str(exc)))
            continue
        images.append(rec)
    if not images:
        raise UserError(f"none of the {len(records)} image(s) in {data_dir} is usable: "
                        + skip_summary(skipped, data_dir, config.resolution))
    return DatasetScan(data_dir=data_dir, images=images, captions=captions, skipped=[f"{p}: {why}" for p, why in skipped],
                       notes=notes, min_side=min_side_for(config.resolution))


def skip_summary(skipped: Iterable[tuple[Path, str]], data_dir: Path, resolution: int) -> str:
    """The skip reasons by count, most common first, one example file each: "3 too small for 512 px
    (short side < 128; e.g. a.jpg), 1 not an image (e.g. notes.png)"."""
    groups: dict[str, list[Path]] = {}
    for path, why in skipped:
        if why.startswith("too small"):
            kind = f"too small for {resolution} px (short side < {min_side_for(resolution)})"
        elif "caption" in why:
            kind = "unreadable caption file"
        else:  # "not an image (unrecognised file content)" -> "not an image"
            kind = why.split(" (", 1)[0]
        groups.setdefault(kind, []).append(path)
    parts = []
    for kind, paths in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        example = paths[0].relative_to(data_dir).as_posix() if paths[0].is_relative_to(data_dir) else str(paths[0])
        text = f"{len(paths)} {kind}"
        parts.append(text[:-1] + f"; e.g. {example})" if text.endswith(")") else text + f" (e.g. {example})")
    return ", ".join(parts)


# --- preparation --------------------------------------------------------------------------------

def fit_square(img: "Image.Image", size: int | tuple[int, int], resample: int | None = None) -> "Image.Image":
    """Centre-crop the largest region of the target's aspect ratio and resize it to ``size`` (an int:
    a square; or ``(width, height)``, a bucket), antialiased Lanczos by default."""
    from PIL import Image, ImageOps

    resample = Image.Resampling.LANCZOS if resample is None else resample
    wh = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return ImageOps.fit(img, wh, method=resample, centering=(0.5, 0.5))


def pil_to_tensor(img: "Image.Image") -> "torch.Tensor":
    """8-bit RGB PIL image -> float32 CHW tensor in [-1, 1] (contiguous)."""
    import numpy as np
    import torch

    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    return (t / 127.5 - 1.0).contiguous()


def prepare_image(path: str | os.PathLike, resolution: int, *, flip: bool = False,
                  size: tuple[int, int] | None = None) -> "torch.Tensor":
    """The training view of an image: (3, resolution, resolution) float32 in [-1, 1], or
    (3, h, w) for a bucket ``size=(w, h)``."""
    img = fit_square(load_rgb(path), size if size is not None else resolution)
    t = pil_to_tensor(img)
    return t.flip(-1).contiguous() if flip else t


def prepare_mask(path: str | os.PathLike, size: int | tuple[int, int], *, flip: bool = False) -> "torch.Tensor":
    """A face mask at ``size`` x ``size`` (latent size; ``(w, h)`` for a bucket): (1, h, w) float32 in [0, 1].

    Read by :func:`..faces.masks.read_mask`; the same centre crop as the image, area-averaged (box
    filter) so a latent cell holds the fraction of its pixels that are face.
    """
    import numpy as np
    import torch
    from PIL import Image

    m = fit_square(read_mask(path), size, Image.Resampling.BOX)
    t = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0).unsqueeze(0)
    return t.flip(-1).contiguous() if flip else t.contiguous()
