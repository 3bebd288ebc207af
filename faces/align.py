"""FFHQ-style face alignment, face masks, and the face-weighted diffusion loss.

Alignment follows the recipe FFHQ was made with (NVlabs/ffhq-dataset, ``recreate_aligned_images``),
re-implemented here from its description: from the eye centres and mouth corners build an oriented
square around the eye-mouth quad -- its x axis blends the eye line with the eye-to-mouth direction
turned by 90 degrees, its half-side is ``max(2 * eye distance, 1.8 * eye-to-mouth distance)``, its
centre lies 0.1 of the way from the eye midpoint to the mouth midpoint -- and resample that square
to ``size x size``. Large sources are box-reduced first and the warp runs at twice the output size
then is Lanczos-reduced (no aliasing); parts of the square outside the photo are filled by
reflection that fades into a blur, as FFHQ does, and the padded share is reported.
The FFHQ mean 5-point positions in a 512 crop (:data:`FFHQ_TEMPLATE_512`, the values facexlib and
GFPGAN use) are what a correct alignment lands near; the tests check against them.

File-naming contract between ``facediffuser prep`` and the trainer
------------------------------------------------------------------
For every aligned crop ``DIR/<name>.png`` that prep writes, beside it are

* ``DIR/<name>.mask.png`` -- the face mask: 8-bit grayscale, same width and height as the crop,
  255 = face, 0 = background, feathered in between (:func:`mask_path_for`, :func:`load_mask`);
* ``DIR/<name>.json`` -- box, landmarks (output pixels), score, source file, face index.

Debug overlays (``--debug-masks``) go to ``DST/.debug/`` and prep's resume journal is
``DST/.prep_journal.jsonl``: hidden, so a dataset scan that skips dot-folders never takes them for
training images. A dataset scanning ``DST`` must skip files for which :func:`is_prep_artifact` is
true (``*.mask.png`` and anything under ``.debug/``); ``DST/prep_summary.json`` says what was
dropped and why. The trainer loads the mask with :func:`load_mask`, applies to it the same resize/crop/flip
as to the image, downsamples it with :func:`mask_to_latent` to the latent grid and turns it into
per-pixel loss weights with :func:`face_weight_map`; :func:`weighted_mse` with weight 1 is exactly
the plain MSE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..fileio import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

MASK_SUFFIX = ".mask.png"
DEBUG_DIR = ".debug"

# Mean 5-point landmarks of FFHQ 512x512 crops (left eye, right eye, nose, left/right mouth corner),
# as published in facexlib (face_restoration_helper.py, xinntao/facexlib issue #14).
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)


def ffhq_template(size: int) -> np.ndarray:
    """The FFHQ 5-point template scaled to a ``size x size`` crop."""
    return FFHQ_TEMPLATE_512 * (size / 512.0)


# --- the oriented square ------------------------------------------------------------------------

@dataclass
class FaceSquare:
    """The FFHQ crop square in source pixels: centre, half-side vectors x (right) and y (down)."""

    center: np.ndarray
    x: np.ndarray
    y: np.ndarray

    @property
    def side(self) -> float:
        return 2.0 * float(np.hypot(*self.x))

    @property
    def corners(self) -> np.ndarray:
        """Top-left, bottom-left, bottom-right, top-right (source pixels)."""
        c, x, y = self.center, self.x, self.y
        return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])

    def matrix(self, size: int) -> np.ndarray:
        """2x3 affine taking source pixels to output pixels of a ``size`` crop."""
        s2 = float(self.x @ self.x)  # |x|^2 == |y|^2
        scale = size / (2.0 * s2)
        lin = np.stack([self.x * scale, self.y * scale])  # rows: projections on x and y
        origin = self.center - self.x - self.y
        return np.concatenate([lin, (-lin @ origin)[:, None]], axis=1)


def ffhq_square(landmarks: np.ndarray) -> FaceSquare:
    """The FFHQ recipe's crop square from 5 landmarks (eyes, nose, mouth corners)."""
    lm = _landmarks(landmarks)
    eye_avg = (lm[0] + lm[1]) / 2.0
    eye_to_eye = lm[1] - lm[0]
    eye_to_mouth = (lm[3] + lm[4]) / 2.0 - eye_avg
    # The eye line and the face's vertical axis (turned by -90 degrees) vote together on "right".
    direction = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    norm = float(np.hypot(*direction))
    if not math.isfinite(norm) or norm < 1e-6:
        raise UserError("degenerate face landmarks: eyes and mouth coincide")
    half = max(2.0 * float(np.hypot(*eye_to_eye)), 1.8 * float(np.hypot(*eye_to_mouth)))
    x = direction / norm * half
    y = np.array([-x[1], x[0]])
    return FaceSquare(center=eye_avg + 0.1 * eye_to_mouth, x=x, y=y)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ matrix[:, :2].T + matrix[:, 2]


# --- alignment ----------------------------------------------------------------------------------

@dataclass
class AlignedFace:
    """An aligned crop and where things landed in it (output pixels)."""

    image: "Image.Image"
    matrix: np.ndarray  # 2x3, source pixels -> output pixels
    landmarks: np.ndarray  # (5, 2)
    box: tuple[float, float, float, float]  # axis-aligned bounds of the detector box, output pixels
    pad_fraction: float  # share of the crop that lay outside the source photo (filled by reflection)
    mask: np.ndarray = field(repr=False)  # (size, size) float32 in [0, 1]


def align_face(image: Any, landmarks: np.ndarray, size: int = 512, *, box: Any = None, supersample: int = 2) -> AlignedFace:
    """Cut the FFHQ square around a face and resample it to ``size x size`` RGB."""
    from PIL import Image

    from .detection import to_rgb_array

    if size < 8:
        raise UserError(f"aligned face size must be at least 8 px (got {size})")
    rgb = to_rgb_array(image)
    sq = ffhq_square(landmarks)
    work = max(size * max(int(supersample), 1), size)
    corners = sq.corners

    # 1. Box-reduce big sources so that the warp never shrinks by more than 2x.
    k = int(math.floor(sq.side / work))
    src = Image.fromarray(rgb)
    if k >= 2:
        src = src.reduce(k)
        corners = corners / k
    arr = np.asarray(src)
    h, w = arr.shape[:2]

    # 2. Cut the square's bounding box (+ a margin for the resampling filter), padding outside.
    side = float(np.hypot(*(corners[3] - corners[0])))
    margin = max(int(round(0.1 * side)), 3)
    x0 = int(math.floor(corners[:, 0].min())) - margin
    y0 = int(math.floor(corners[:, 1].min())) - margin
    x1 = int(math.ceil(corners[:, 0].max())) + margin
    y1 = int(math.ceil(corners[:, 1].max())) + margin
    region = _padded_region(arr, x0, y0, x1, y1, fade=0.25 * side)
    corners = corners - np.array([x0, y0], dtype=np.float64)

    # 3. One affine warp at the working size, then a Lanczos reduction to the output size.
    tl, bl, tr = corners[0], corners[1], corners[3]
    ax = (tr - tl) / work
    ay = (bl - tl) / work
    data = (ax[0], ay[0], tl[0], ax[1], ay[1], tl[1])
    out = Image.fromarray(region).transform((work, work), Image.Transform.AFFINE, data, resample=Image.Resampling.BICUBIC)
    if work != size:
        out = out.resize((size, size), Image.Resampling.LANCZOS)

    matrix = sq.matrix(size)
    lm_out = transform_points(matrix, _landmarks(landmarks))
    box_out = _box_bounds(matrix, box) if box is not None else _box_bounds(matrix, None, lm_out)
    pad_fraction = _outside_fraction(sq, rgb.shape[1], rgb.shape[0])
    return AlignedFace(image=out, matrix=matrix, landmarks=lm_out, box=box_out, pad_fraction=pad_fraction,
                       mask=face_mask(lm_out, (size, size)))


def _landmarks(landmarks: Any) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (5, 2) or not np.all(np.isfinite(lm)):
        raise UserError(f"face landmarks must be 5 finite (x, y) points, got shape {lm.shape}")
    return lm


def _padded_region(arr: np.ndarray, x0: int, y0: int, x1: int, y1: int, *, fade: float) -> np.ndarray:
    """``arr[y0:y1, x0:x1]`` where the window may leave the image: outside, mirror the photo and
    let the mirror fade into a blur of itself and then towards the mean colour with distance."""
    h, w = arr.shape[:2]
    if x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h:
        return np.ascontiguousarray(arr[y0:y1, x0:x1])
    from scipy.ndimage import gaussian_filter

    ys = _mirror_index(np.arange(y0, y1), h)
    xs = _mirror_index(np.arange(x0, x1), w)
    region = arr[ys[:, None], xs[None, :]].astype(np.float32)
    dy = np.maximum(np.maximum(-np.arange(y0, y1), np.arange(y0, y1) - (h - 1)), 0).astype(np.float32)
    dx = np.maximum(np.maximum(-np.arange(x0, x1), np.arange(x0, x1) - (w - 1)), 0).astype(np.float32)
    dist = np.maximum(dy[:, None], dx[None, :])
    ramp = np.clip(dist / max(fade, 1.0), 0.0, 1.0)[:, :, None]
    sigma = max(fade * 0.1, 1.0)
    blurred = np.stack([gaussian_filter(region[:, :, c], sigma) for c in range(3)], axis=2)
    mean = region.reshape(-1, 3).mean(axis=0)
    region = region + (blurred - region) * np.clip(ramp * 3.0, 0.0, 1.0)
    region = region + (mean - region) * (0.5 * ramp)
    return np.clip(np.rint(region), 0, 255).astype(np.uint8)


def _mirror_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Reflect indices into [0, n) (edge pixel not repeated), for any distance outside."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    m = np.mod(idx, period)
    return np.where(m < n, m, period - m)


def _box_bounds(matrix: np.ndarray, box: Any, fallback_points: np.ndarray | None = None) -> tuple[float, float, float, float]:
    if box is None:
        pts = fallback_points
    else:
        bx0, by0, bx1, by1 = (float(v) for v in box)
        pts = transform_points(matrix, np.array([[bx0, by0], [bx0, by1], [bx1, by1], [bx1, by0]]))
    return (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))


def _outside_fraction(sq: FaceSquare, w: int, h: int, samples: int = 64) -> float:
    """Share of the crop square whose source point lies outside the photo."""
    t = (np.arange(samples) + 0.5) / samples * 2.0 - 1.0
    u, v = np.meshgrid(t, t)
    pts = sq.center + u[..., None] * sq.x + v[..., None] * sq.y
    inside = (pts[..., 0] >= 0) & (pts[..., 0] <= w) & (pts[..., 1] >= 0) & (pts[..., 1] <= h)
    return float(1.0 - inside.mean())


# --- masks --------------------------------------------------------------------------------------

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

    lm = _landmarks(landmarks)
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


def mask_path_for(image_path: str | Path) -> Path:
    """Where prep puts the mask of an aligned crop: ``<name>.png`` -> ``<name>.mask.png``."""
    p = Path(image_path)
    return p.with_name(p.stem + MASK_SUFFIX)


def is_prep_artifact(path: str | Path) -> bool:
    """True for files prep writes that are not training images (masks, debug overlays)."""
    p = Path(path)
    return p.name.endswith(MASK_SUFFIX) or DEBUG_DIR in p.parts


def save_mask(mask: np.ndarray, path: str | Path) -> Path:
    """Write a [0, 1] mask as an 8-bit grayscale PNG, atomically."""
    from PIL import Image

    img = Image.fromarray(np.clip(np.rint(np.asarray(mask, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8), mode="L")
    return save_image_atomic(img, path)


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask PNG as float32 HxW in [0, 1]; ``size=(w, h)`` resizes it (box filter) first."""
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise UserError(f"face mask not found: {p} (run facediffuser prep, or set --face-loss-weight 1)")
    with Image.open(p) as im:
        im = im.convert("L")
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


def save_image_atomic(img: "Image.Image", path: str | Path) -> Path:
    """PNG, atomically."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


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
