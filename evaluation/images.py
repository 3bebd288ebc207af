"""Image files and image tensors, as the FID extractor wants them: uint8, NCHW, RGB.

Folders are listed by :func:`..image_files.list_images` (the one extension set and lister).

Decoding is the same as pytorch-fid's (PIL, ``convert("RGB")``, no EXIF rotation), so a folder
gives the same pixels to both. ComfyUI IMAGE tensors (float [0, 1], NHWC) are quantised exactly
like ComfyUI's SaveImage (``clip(255 * x, 0, 255).astype(uint8)``, i.e. truncation), so features of
an IMAGE equal those of the PNG SaveImage would write.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import UserError
from ..fileio import file_sha256

def load_image(path: str | os.PathLike) -> np.ndarray:
    """One image as uint8 HWC RGB; a corrupt or unreadable file is a one-line UserError naming it."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        with Image.open(p) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"image not found: {p}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {p}: {type(exc).__name__}: {exc}") from None
    return arr


def load_images(paths: Sequence[str | os.PathLike]) -> "torch.Tensor":  # noqa: F821
    """Small sets only: all images as one uint8 NCHW tensor (they must share a size)."""
    import torch

    arrays = [load_image(p) for p in paths]
    if not arrays:
        raise UserError("no images given")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"images differ in size ({', '.join(sorted(f'{s[1]}x{s[0]}' for s in shapes))}); use iter_image_batches")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def iter_image_batches(
    paths: Sequence[str | os.PathLike], batch_size: int = 50, *, workers: int | None = None
) -> Iterator[tuple[list[Path], "torch.Tensor"]]:  # noqa: F821
    """Yield ``(paths, uint8 NCHW batch)`` in order; consecutive same-size images share a batch.

    Decoding runs in a thread pool (PIL releases the GIL) one batch ahead of the consumer, so a
    GPU is kept fed while memory stays at about two batches whatever the folder's size.
    """
    import torch

    paths = [Path(p) for p in paths]
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (got {batch_size})")
    workers = workers or min(8, os.cpu_count() or 1)
    chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(load_image, p) for p in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            arrays = [f.result() for f in pending]
            pending = [pool.submit(load_image, p) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            start = 0
            for i in range(1, len(arrays) + 1):
                if i == len(arrays) or arrays[i].shape != arrays[start].shape:
                    batch = torch.from_numpy(np.stack(arrays[start:i])).permute(0, 3, 1, 2).contiguous()
                    yield chunk[start:i], batch
                    start = i


def to_uint8_nchw(images) -> "torch.Tensor":  # noqa: F821
    """uint8 NCHW RGB from a uint8 NCHW/NHWC tensor or array, or a float [0, 1] image tensor.

    Floats (ComfyUI IMAGE is float32 [0, 1] NHWC) are quantised like ComfyUI's SaveImage:
    ``clip(255 * x, 0, 255)`` then truncation to uint8. A 4th (alpha) channel is dropped; one
    channel is repeated to three. uint8 data is never rescaled (no silent ×255 wrap-around).
    """
    import torch

    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise UserError(f"expected a batch of images [B,H,W,C] or [B,C,H,W], got shape {tuple(x.shape)}")
    if x.shape[1] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        nchw = x
    elif x.shape[-1] in (1, 3, 4):
        nchw = x.permute(0, 3, 1, 2)
    else:
        raise UserError(f"cannot tell the channel axis of images with shape {tuple(x.shape)}: need 1, 3 or 4 channels")
    if nchw.shape[0] == 0:
        raise UserError("empty batch of images")
    if nchw.dtype == torch.uint8:
        out = nchw
    elif nchw.dtype.is_floating_point:
        if not torch.isfinite(nchw).all():
            raise UserError("images contain NaN or infinite values")
        out = (nchw.to(torch.float32) * 255.0).clamp_(0, 255).to(torch.uint8)  # truncates, like SaveImage
    else:
        raise UserError(f"images must be uint8 (0..255) or float (0..1), got {nchw.dtype}")
    if out.shape[1] == 4:
        out = out[:, :3]
    elif out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.contiguous()


def image_set_digest(paths: Sequence[str | os.PathLike], *, workers: int | None = None) -> tuple[str, list[Path]]:
    """A digest of the *content* of an image set, and the files in canonical order.

    The digest hashes the sorted per-file SHA-256s, so renaming or moving files keeps it; the files
    come back sorted by content hash, so features (and KID subsets) do not depend on file names.
    """
    paths = [Path(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(file_sha256, paths))
    order = sorted(range(len(paths)), key=lambda i: (digests[i], str(paths[i])))
    h = hashlib.sha256()
    for i in order:
        h.update(bytes.fromhex(digests[i]))
    return h.hexdigest(), [paths[i] for i in order]
