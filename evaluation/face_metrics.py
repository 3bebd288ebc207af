"""Face metrics: does a model draw one face, and is it framed like the real faces?

FID mixes face quality with composition: SD1.5 generations are not FFHQ-aligned, so much of a
"real vs base" FID can be framing. These numbers separate the two:

* **detection rate** -- share of images with exactly one face (score >= 0.9): catches collapse,
  crowds, crops that cut the face off; plus the share with any face and the mean top score;
* **framing statistics** of each image's largest face -- ``face_size`` (sqrt of the box area over
  sqrt of the image area), ``center_x`` / ``center_y`` (box centre over width / height),
  ``roll`` (eye-line angle in degrees), ``eye_mouth_ratio`` (eye distance over eye-to-mouth
  distance: a landmark-plausibility check) and ``score``;
* **real vs generated** comparison per statistic: 1-Wasserstein distance (in the statistic's
  units) and the two-sample Kolmogorov-Smirnov statistic and p-value (scipy).

Entry points: :func:`face_stats` (uint8 NCHW tensors/arrays, PIL images, or an iterable of such
batches), :func:`compare_face_stats`, and :func:`face_metrics` -- one flat, JSON-ready dict for
the FID table and the ComfyUI node. Real-set stats can be saved once (:meth:`FaceStats.save`) and
reused. Detection runs through :mod:`facediffuser.faces.detection` (MTCNN; install with
``pip install facenet-pytorch==2.5.3``). torch-only: no ComfyUI imports.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import UserError
from ..fileio import atomic_write_json

STATISTICS = ("face_size", "center_x", "center_y", "roll", "eye_mouth_ratio", "score")
DEFAULT_MIN_SCORE = 0.9


@dataclass
class FaceStats:
    """Per-image face counts plus the framing statistics of each image's largest face."""

    faces_per_image: np.ndarray  # (N,) int
    values: dict[str, np.ndarray] = field(default_factory=dict)  # each (number of images with a face,)
    min_score: float = DEFAULT_MIN_SCORE
    detector: str = "mtcnn"

    @property
    def n_images(self) -> int:
        return int(self.faces_per_image.size)

    @property
    def detection_rate(self) -> float:
        """Share of images with exactly one face."""
        return float(np.mean(self.faces_per_image == 1)) if self.n_images else float("nan")

    @property
    def any_face_rate(self) -> float:
        return float(np.mean(self.faces_per_image >= 1)) if self.n_images else float("nan")

    @property
    def multi_face_rate(self) -> float:
        return float(np.mean(self.faces_per_image >= 2)) if self.n_images else float("nan")

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_images": self.n_images,
            "detection_rate": self.detection_rate,
            "any_face_rate": self.any_face_rate,
            "multi_face_rate": self.multi_face_rate,
            "min_score": self.min_score,
        }
        for name in STATISTICS:
            v = self.values.get(name, np.empty(0))
            out[f"{name}_mean"] = float(v.mean()) if v.size else float("nan")
            out[f"{name}_std"] = float(v.std(ddof=1)) if v.size > 1 else float("nan")
        return _json_safe(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "facediffuser-face-stats-1",
            "min_score": self.min_score,
            "detector": self.detector,
            "faces_per_image": self.faces_per_image.astype(int).tolist(),
            "values": {k: np.asarray(v, dtype=np.float64).tolist() for k, v in self.values.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FaceStats":
        if d.get("format") != "facediffuser-face-stats-1":
            raise UserError("not a face-stats file (expected format facediffuser-face-stats-1)")
        return cls(
            faces_per_image=np.asarray(d["faces_per_image"], dtype=np.int64),
            values={k: np.asarray(v, dtype=np.float64) for k, v in d["values"].items()},
            min_score=float(d.get("min_score", DEFAULT_MIN_SCORE)),
            detector=str(d.get("detector", "mtcnn")),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write as JSON, atomically (compute the real set's stats once, reuse them)."""
        return atomic_write_json(path, self.to_dict(), indent=None, fsync=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FaceStats":
        p = Path(path)
        if not p.is_file():
            raise UserError(f"face-stats file not found: {p}")
        try:
            return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{p}: not a valid face-stats file ({type(exc).__name__})") from None


class FaceStatsAccumulator:
    """Feed batches with :meth:`update`, read the result with :meth:`result` (constant memory per
    image: a handful of floats)."""

    def __init__(self, *, min_score: float = DEFAULT_MIN_SCORE, backend: str = "mtcnn", device: str | None = None) -> None:
        self.min_score = min_score
        self.backend = backend
        self.device = device
        self._counts: list[int] = []
        self._values: dict[str, list[float]] = {k: [] for k in STATISTICS}

    def update(self, images: Any) -> None:
        from ..faces.detection import detect_faces_batch

        arrays = images_to_hwc(images)
        for arr, faces in zip(arrays, detect_faces_batch(arrays, min_score=self.min_score, backend=self.backend, device=self.device)):
            self._counts.append(len(faces))
            if faces:
                h, w = arr.shape[:2]
                for k, v in framing(max(faces, key=lambda f: f.size), w, h).items():
                    self._values[k].append(v)

    def result(self) -> FaceStats:
        return FaceStats(
            faces_per_image=np.asarray(self._counts, dtype=np.int64),
            values={k: np.asarray(v, dtype=np.float64) for k, v in self._values.items()},
            min_score=self.min_score,
            detector=self.backend,
        )


def framing(face: Any, width: int, height: int) -> dict[str, float]:
    """The framing statistics of one face in a ``width x height`` image."""
    lm = face.landmarks
    eye_mid = (lm[0] + lm[1]) / 2.0
    mouth_mid = (lm[3] + lm[4]) / 2.0
    em = float(np.hypot(*(mouth_mid - eye_mid)))
    cx, cy = face.center
    return {
        "face_size": face.size / math.sqrt(width * height),
        "center_x": cx / width,
        "center_y": cy / height,
        "roll": face.roll_degrees,
        "eye_mouth_ratio": face.eye_distance / em if em > 1e-6 else float("nan"),
        "score": float(face.score),
    }


def face_stats(
    images: Any,
    *,
    min_score: float = DEFAULT_MIN_SCORE,
    batch_size: int = 16,
    backend: str = "mtcnn",
    device: str | None = None,
) -> FaceStats:
    """Face counts and framing statistics of a set of images.

    ``images``: a uint8 NCHW torch tensor or numpy array, a list of PIL images / HxWx3 uint8
    arrays, or an iterable of such batches (e.g. a generator over a folder).
    """
    acc = FaceStatsAccumulator(min_score=min_score, backend=backend, device=device)
    for batch in _batches(images, batch_size):
        acc.update(batch)
    stats = acc.result()
    if stats.n_images == 0:
        raise UserError("no images given for face metrics")
    return stats


def compare_face_stats(real: FaceStats, generated: FaceStats) -> dict[str, dict[str, float | None]]:
    """Per statistic: Wasserstein-1 distance, KS statistic and p-value, both means and counts.
    ``None`` where a side has fewer than 2 faces (no distribution to compare)."""
    from scipy.stats import ks_2samp, wasserstein_distance

    out: dict[str, dict[str, float | None]] = {}
    for name in STATISTICS:
        a = _finite(real.values.get(name))
        b = _finite(generated.values.get(name))
        row: dict[str, float | None] = {
            "n_real": float(a.size), "n_generated": float(b.size),
            "mean_real": float(a.mean()) if a.size else None,
            "mean_generated": float(b.mean()) if b.size else None,
            "wasserstein": None, "ks": None, "ks_pvalue": None,
        }
        if a.size >= 2 and b.size >= 2:
            ks = ks_2samp(a, b)
            row.update(wasserstein=float(wasserstein_distance(a, b)), ks=float(ks.statistic), ks_pvalue=float(ks.pvalue))
        out[name] = row
    return out


def face_metrics(
    images: Any,
    reference: FaceStats | str | os.PathLike | None = None,
    *,
    min_score: float = DEFAULT_MIN_SCORE,
    batch_size: int = 16,
    device: str | None = None,
) -> dict[str, Any]:
    """One flat, JSON-ready dict: detection rates and framing means of ``images``, and, given
    the real set's :class:`FaceStats` (or its saved file), the distances per statistic
    (``<stat>_wasserstein``, ``<stat>_ks``) and the real set's detection rate."""
    stats = face_stats(images, min_score=min_score, batch_size=batch_size, device=device)
    out = stats.summary()
    if reference is not None:
        ref = reference if isinstance(reference, FaceStats) else FaceStats.load(reference)
        out["real_detection_rate"] = ref.detection_rate
        out["real_n_images"] = ref.n_images
        for name, row in compare_face_stats(ref, stats).items():
            out[f"{name}_wasserstein"] = row["wasserstein"]
            out[f"{name}_ks"] = row["ks"]
            out[f"{name}_ks_pvalue"] = row["ks_pvalue"]
    return _json_safe(out)


# --- inputs ---------------------------------------------------------------------------------------

def images_to_hwc(images: Any) -> list[np.ndarray]:
    """A batch (uint8 NCHW tensor/array, or a list of PIL images / HxWxC uint8 arrays) as a list
    of HxWx3 uint8 arrays."""
    from ..faces.detection import to_rgb_array

    if _is_tensor(images):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UserError(f"face metrics need uint8 NCHW images (N, 3, H, W), got shape {tuple(images.shape)}")
        if images.dtype != np.uint8:
            raise UserError(f"face metrics need uint8 images (0..255), got dtype {images.dtype}; quantise first")
        return [to_rgb_array(np.ascontiguousarray(im.transpose(1, 2, 0))) for im in images]
    return [to_rgb_array(im) for im in images]


def _batches(images: Any, batch_size: int) -> Iterable[Any]:
    """Split one big batch, pass batches of an iterable through."""
    if _is_tensor(images) or isinstance(images, np.ndarray):
        for i in range(0, len(images), max(batch_size, 1)):
            yield images[i:i + batch_size]
        return
    if isinstance(images, (list, tuple)):
        if images and (_is_tensor(images[0]) or (isinstance(images[0], np.ndarray) and images[0].ndim == 4)):
            yield from images  # a list of batches
            return
        for i in range(0, len(images), max(batch_size, 1)):
            yield list(images[i:i + batch_size])
        return
    for item in images:  # a generator of batches (or of single images)
        yield item if _is_batch(item) else [item]


def _is_batch(x: Any) -> bool:
    return isinstance(x, (list, tuple)) or ((_is_tensor(x) or isinstance(x, np.ndarray)) and x.ndim == 4)


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _finite(v: Any) -> np.ndarray:
    a = np.asarray(v if v is not None else [], dtype=np.float64)
    return a[np.isfinite(a)]


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
