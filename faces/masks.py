"""Face masks: what is face in an aligned crop, the mask files beside the crops, and the
face-weighted diffusion loss the trainer builds from them.

File-naming contract between ``facediffuser prep`` and the trainer
------------------------------------------------------------------
For every aligned crop ``DIR/<name>.png`` that prep writes, beside it are

* ``DIR/<name>.mask.png`` -- the face mask: 8-bit grayscale, same width and height as the crop,
  255 = face, 0 = background, feathered in between (:func:`mask_path_for`, :func:`save_mask`);
* ``DIR/<name>.json`` -- box, landmarks (output pixels), score, source file, face index.

Debug overlays (``--debug-masks``) go to ``DST/.debug/`` and prep's resume journal is
``DST/.prep_journal.jsonl``: hidden, so the one image lister (:func:`..image_files.list_images`,
which also skips ``*.mask.png``) never takes them for training images; ``DST/prep_summary.json``
says what was dropped and why.

The trainer pairs ``<stem>.mask.png`` with each image, reads it with :func:`read_mask` (the same
reader as :func:`load_mask`), crops, resizes and flips it like the image onto the latent grid
(box filter: each latent cell holds the face share of its pixels; :func:`mask_to_latent` is the
same area average for masks already held as tensors) and turns it into per-pixel loss weights
with :func:`face_weight_map`; :func:`weighted_mse` with weight 1 is exactly the plain MSE.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..fileio import atomic_write_png
from ..image_files import MASK_SUFFIX, BadImage, to_rgb
from .align import checked_landmarks, ffhq_square

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image


# --- the mask of a face --------------------------------------------------------------------------

def face_mask(landmarks: np.ndarray, shape: tuple[int, int], *, dilate: float = 0.08, feather: float = 0.05) -> np.ndarray:
    """Soft face mask (float32 HxW in [0, 1]) from 5 landmarks in the same pixel frame.

    Five points cannot trace the jaw, so the face is an ellipse in the face's own frame (rolled
    with the eye line): centred a third of the way from the eyes to the mouth, half-height 1.25x
    the eye-mouth distance (forehead to chin), half-width 0.95x the eye distance (cheek to cheek),
    each with a floor from the other measure so turned or tilted heads keep a sane width. It is
    then grown by ``dilate`` and blurred by ``feather`` (both fractions of the half-height), so
    the loss weight fades out across the hairline and jaw instead of stepping.
    """
    from scipy.ndimage import gaussian_filter

    lm = checked_landmarks(landmarks)
    h, w = int(shape[0]), int(shape[1])
    eye_avg = (lm[0] + lm[1]) / 2.0
    eye_to_mouth = (lm[3] + lm[4]) / 2.0 - eye_avg
    e = float(np.hypot(*(lm[1] - lm[0])))
    d = float(np.hypot(*eye_to_mouth))
    sq = ffhq_square(lm)
    ux = sq.x / np.hypot(*sq.x)
    uy = np.array([-ux[1], ux[0]])
    center = eye_avg + uy * (0.33 * d)
    half_h = max(1.25 * d, 1.1 * e)
    half_w = max(0.95 * e, 0.75 * d)
    grow = dilate * half_h
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    rel_x = xx - center[0]
    rel_y = yy - center[1]
    a = (rel_x * ux[0] + rel_y * ux[1]) / (half_w + grow)
    b = (rel_x * uy[0] + rel_y * uy[1]) / (half_h + grow)
    mask = (a * a + b * b <= 1.0).astype(np.float32)
    sigma = feather * half_h
    if sigma > 0.3:
        mask = gaussian_filter(mask, sigma, mode="constant")
    return np.clip(mask, 0.0, 1.0).astype(np.float32)


# --- mask files -------------------------------------------------------------------------------

def mask_path_for(image_path: str | Path) -> Path:
    """Where prep puts the mask of an aligned crop: ``<name>.png`` -> ``<name>.mask.png``."""
    p = Path(image_path)
    return p.with_name(p.stem + MASK_SUFFIX)


def save_mask(mask: np.ndarray, path: str | Path) -> Path:
    """Write a [0, 1] mask as an 8-bit grayscale PNG, atomically."""
    from PIL import Image

    img = Image.fromarray(np.clip(np.rint(np.asarray(mask, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8), mode="L")
    return atomic_write_png(img, path)


def read_mask(path: str | os.PathLike) -> "Image.Image":
    """A mask file as an 8-bit grayscale PIL image, upright (EXIF). Grayscale white = face; a mask
    with a varying alpha channel uses the alpha (kohya's ``--alpha_mask`` convention). Raises
    BadImage when the file cannot be read."""
    from PIL import Image, ImageOps

    try:
        img = Image.open(path)
        img = ImageOps.exif_transpose(img)
        img.load()
    except Exception as exc:  # noqa: BLE001
        raise BadImage(f"unreadable face mask ({exc})") from None
    alpha = None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = img.convert("RGBA").getchannel("A")
    if alpha is not None and alpha.getextrema()[0] != alpha.getextrema()[1]:
        return alpha
    return img if img.mode == "L" else to_rgb(img).convert("L")


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as float32 HxW in [0, 1] (read by :func:`read_mask`); ``size=(w, h)`` resizes
    it (box filter) first."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise UserError(f"face mask not found: {p} (run facediffuser prep, or set --face-loss-weight 1)")
    try:
        im = read_mask(p)
    except BadImage as exc:
        raise UserError(f"{p}: {exc}") from None
    if size is not None and tuple(im.size) != tuple(size):
        im = im.resize(tuple(size), Image.Resampling.BOX)
    return np.asarray(im, dtype=np.float32) / 255.0


def mask_debug_image(image: Any, mask: np.ndarray, landmarks: np.ndarray | None = None) -> "Image.Image":
    """The crop with the mask tinted red and the landmarks dotted: what ``--debug-masks`` writes."""
    from PIL import Image, ImageDraw

    from .detection import to_rgb_array

    rgb = to_rgb_array(image).astype(np.float32)
    m = np.asarray(mask, dtype=np.float32)[:, :, None]
    tint = np.array([255.0, 40.0, 40.0], dtype=np.float32)
    out = Image.fromarray(np.clip(rgb * (1 - 0.45 * m) + tint * (0.45 * m), 0, 255).astype(np.uint8))
    if landmarks is not None:
        draw = ImageDraw.Draw(out)
        r = max(2, out.size[0] // 128)
        for x, y in np.asarray(landmarks).reshape(-1, 2):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 255, 0))
    return out


# --- masks on the latent grid and the face-weighted loss ----------------------------------------

def mask_to_latent(mask: Any, latent_hw: tuple[int, int]) -> "torch.Tensor":
    """Area-average a pixel mask down to the latent grid.

    Accepts HxW, BxHxW or Bx1xHxW (numpy or torch; uint8 is read as 0..255). Returns float32
    Bx1xhxw: each latent cell holds the face share of the pixels it covers (an exact block mean
    when the sizes divide, as they do for SD's factor-8 VAE).
    """
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(mask)) if not isinstance(mask, torch.Tensor) else mask
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.to(torch.float32)
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise UserError(f"a face mask must be HxW, BxHxW or Bx1xHxW, got shape {tuple(t.shape)}")
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if h < 1 or w < 1:
        raise UserError(f"latent size must be positive, got {latent_hw}")
    return F.adaptive_avg_pool2d(t, (h, w))


def face_weight_map(mask_latent: "torch.Tensor", weight: float, *, normalize: bool = False) -> "torch.Tensor":
    """Per-latent-pixel loss weights: 1 outside the face, ``weight`` inside, blended by the mask.

    ``weight == 1`` gives exactly 1 everywhere. With ``normalize`` each sample's map is divided by
    its mean, so the face gets ``weight``x the background's share without changing the loss scale
    (and the effective learning rate) as the weight changes.
    """
    import torch

    if not math.isfinite(weight) or weight < 0:
        raise UserError(f"face loss weight must be a finite number >= 0 (got {weight})")
    m = torch.as_tensor(mask_latent, dtype=torch.float32) if not isinstance(mask_latent, torch.Tensor) else mask_latent
    wmap = 1.0 + (float(weight) - 1.0) * m.clamp(0.0, 1.0)
    if normalize:
        dims = tuple(range(1, wmap.ndim))
        wmap = wmap / wmap.mean(dim=dims, keepdim=True).clamp_min(1e-8)
    return wmap


def weighted_mse(pred: "torch.Tensor", target: "torch.Tensor", weight_map: "torch.Tensor | None" = None, reduction: str = "mean") -> "torch.Tensor":
    """Squared error times the weight map (broadcast over channels), then reduced.

    ``reduction``: ``"mean"`` (a scalar, what ``F.mse_loss`` gives), ``"per_sample"`` (shape B,
    for min-SNR weighting) or ``"none"``. An all-ones map multiplies by exactly 1.0, so the result
    is bit-identical to the unweighted loss.
    """
    import torch.nn.functional as F

    err = F.mse_loss(pred, target, reduction="none")
    if weight_map is not None:
        err = err * weight_map
    if reduction == "mean":
        return err.mean()
    if reduction == "per_sample":
        return err.mean(dim=tuple(range(1, err.ndim)))
    if reduction == "none":
        return err
    raise UserError(f"reduction must be mean, per_sample or none (got {reduction!r})")
