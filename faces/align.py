"""FFHQ-style face alignment: the crop square from 5 landmarks, and the resampled crop.

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

The mask of the face in a crop, the mask files prep writes beside it and the face-weighted loss
are in :mod:`.masks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

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
    lm = checked_landmarks(landmarks)
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
    lm_out = transform_points(matrix, checked_landmarks(landmarks))
    box_out = _box_bounds(matrix, box) if box is not None else _box_bounds(matrix, None, lm_out)
    pad_fraction = _outside_fraction(sq, rgb.shape[1], rgb.shape[0])
    return AlignedFace(image=out, matrix=matrix, landmarks=lm_out, box=box_out, pad_fraction=pad_fraction)


def checked_landmarks(landmarks: Any) -> np.ndarray:
    """Landmarks as a (5, 2) float64 array; a UserError for any other shape or a non-finite value."""
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
