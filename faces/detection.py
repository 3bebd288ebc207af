"""Face detection behind one small interface: ``detect_faces(image) -> list[Face]``.

Every face-aware part of the project (``facediffuser prep``, the face metrics of the FID table and
the ComfyUI node) calls :func:`detect_faces` / :func:`detect_faces_batch` and reads :class:`Face`
(box, score, five landmarks). Nothing else knows which network runs underneath, so a backend can
be swapped with :func:`register_detector` without touching the callers.

Why MTCNN from facenet-pytorch is the default backend
-----------------------------------------------------
The project runs offline, so the weights must ship inside a PyPI wheel. Candidates checked:

* **facenet-pytorch 2.5.3 (MTCNN)** -- MIT licence, a 1.9 MB wheel with the P/R/O-net weights
  inside (``facenet_pytorch/data/*.pt``), pure torch + torchvision (``batched_nms``), so it reuses
  ComfyUI's torch and adds nothing else. Gives a box, a probability and exactly the five landmarks
  the FFHQ recipe needs (eyes, nose, mouth corners). Runs on torch 2.14 / torchvision 0.29 /
  numpy 2 (verified: the astronaut is found at p = 0.999998). Why 2.5.3 and not 2.6.0: the two
  wheels hold the same MTCNN code and the same weight files (only ``utils/download.py`` differs),
  but 2.6.0's metadata pins ``torch<2.3, numpy<2, Pillow<10.3``: installed ``--no-deps`` it makes
  every later ``pip install`` print a dependency-conflict ERROR. 2.5.3 asks for ``numpy, requests,
  torchvision, pillow`` unpinned, which any ComfyUI already has, so a plain install changes nothing.
* **mediapipe 0.10.14** (BlazeFace + face mesh) -- Apache-2.0 and more landmarks, but it drags in
  jax, jaxlib, opencv-contrib and ``protobuf<5`` (a conflict magnet inside ComfyUI), and 1.x no
  longer ships the models.
* **scikit-image LBP cascade** -- already installed, but boxes only: no landmarks, so no alignment.

So: MTCNN, installed as an optional extra (after torch and torchvision, so pip finds its
``torchvision`` requirement satisfied and touches nothing)::

    pip install facenet-pytorch==2.5.3

When it is missing, the first detection raises a one-line :class:`~facediffuser.errors.UserError`
naming that command. facenet-pytorch's own imports are torch, torchvision, numpy, Pillow and
requests, all already present in a ComfyUI or FaceDiffuser install.

Conventions
-----------
* Coordinates are pixels of the image passed in, x to the right, y down (continuous: the
  top-left corner of the image is (0, 0)).
* Landmark order, as seen in the image: left eye, right eye, nose tip, left mouth corner, right
  mouth corner ("left" = smaller x for an upright face: the subject's right eye).
* Faces are returned best score first; ``min_score`` (default 0.9) drops MTCNN's weak candidates,
  which are mostly false positives (poker chips, hands).
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ..errors import UserError

DEFAULT_MIN_SCORE = 0.9
DEFAULT_BACKEND = "mtcnn"
MTCNN_INSTALL = "pip install facenet-pytorch==2.5.3"

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass(eq=False)
class Face:
    """One detected face in source-image pixels."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    landmarks: np.ndarray = field(repr=False)  # (5, 2) float64, order LANDMARK_NAMES

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def size(self) -> float:
        """Geometric mean of box width and height: one number for "how big is this face"."""
        return math.sqrt(max(self.width, 0.0) * max(self.height, 0.0))

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0)

    @property
    def eye_distance(self) -> float:
        return float(np.hypot(*(self.landmarks[1] - self.landmarks[0])))

    @property
    def roll_degrees(self) -> float:
        """In-plane rotation of the eye line; positive = the right eye (image right) is lower."""
        dx, dy = self.landmarks[1] - self.landmarks[0]
        return math.degrees(math.atan2(dy, dx))

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": [round(float(v), 3) for v in self.box],
            "score": round(float(self.score), 6),
            "landmarks": {n: [round(float(x), 3), round(float(y), 3)] for n, (x, y) in zip(LANDMARK_NAMES, self.landmarks)},
        }


class FaceDetector(Protocol):
    """What a backend implements: a batch of same-size RGB uint8 HxWx3 arrays in, faces out."""

    name: str

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]: ...


_FACTORIES: dict[str, Callable[..., FaceDetector]] = {}
_LOCK = threading.Lock()


def register_detector(name: str, factory: Callable[..., FaceDetector]) -> None:
    """Make a backend available by name; ``factory(device=...)`` builds it on first use."""
    with _LOCK:
        _FACTORIES[name] = factory
        _cached_detector.cache_clear()


def get_detector(name: str = DEFAULT_BACKEND, device: str | None = None) -> FaceDetector:
    """The cached detector for a backend name and device. The cache is bounded (the two most
    recently used; MTCNN is 0.5 M parameters) and :func:`clear_detector_cache` frees it: a host
    (a web UI) calls that when it frees its own models."""
    if name not in _FACTORIES:
        raise UserError(f"unknown face detector {name!r}; available: {', '.join(sorted(_FACTORIES))}")
    return _cached_detector(name, device)


def clear_detector_cache() -> None:
    """Forget loaded detectors (frees their memory; the next call loads again)."""
    _cached_detector.cache_clear()


@functools.lru_cache(maxsize=2)
def _cached_detector(name: str, device: str | None) -> FaceDetector:
    return _FACTORIES[name](device=device)


def to_rgb_array(image: Any) -> np.ndarray:
    """PIL image or HxW / HxWxC uint8 array -> contiguous HxWx3 uint8 RGB (alpha dropped)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a hard dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise UserError(f"face detection needs uint8 images (0..255), got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise UserError(f"face detection needs an HxW or HxWxC image, got shape {tuple(arr.shape)}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def detect_faces(
    image: Any,
    *,
    min_score: float = DEFAULT_MIN_SCORE,
    backend: str = DEFAULT_BACKEND,
    device: str | None = None,
) -> list[Face]:
    """Faces in one image (PIL or uint8 HxW[xC] array), best score first."""
    return detect_faces_batch([image], min_score=min_score, backend=backend, device=device)[0]


def detect_faces_batch(
    images: Sequence[Any],
    *,
    min_score: float = DEFAULT_MIN_SCORE,
    backend: str = DEFAULT_BACKEND,
    device: str | None = None,
) -> list[list[Face]]:
    """Faces per image; same-size images go through the network together (much faster)."""
    arrays = [to_rgb_array(im) for im in images]
    detector = get_detector(backend, device)
    results: list[list[Face]] = [[] for _ in arrays]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        by_shape.setdefault(a.shape, []).append(i)
    for idx in by_shape.values():
        for i, faces in zip(idx, detector.detect([arrays[i] for i in idx])):
            kept = [f for f in faces if f.score >= min_score]
            results[i] = sorted(kept, key=lambda f: -f.score)
    return results


# --- the MTCNN backend (facenet-pytorch) -------------------------------------------------------

class MTCNNDetector:
    """facenet-pytorch's MTCNN with the weights from its wheel; no downloads."""

    name = "mtcnn"

    def __init__(self, device: str | None = None, min_face_size: int = 20) -> None:
        import torch

        try:
            from facenet_pytorch import MTCNN
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("facenet_pytorch"):
                raise UserError(f"face detection needs facenet-pytorch (MTCNN weights ship in its wheel): {MTCNN_INSTALL}") from None
            raise UserError(f"facenet-pytorch could not be imported: module {exc.name!r} is missing (it needs torch, torchvision, numpy, Pillow, requests)") from None
        except (ImportError, RuntimeError) as exc:  # e.g. a torchvision built for another torch
            raise UserError(f"facenet-pytorch could not be imported ({type(exc).__name__}: {exc}); torchvision must match torch") from None
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # keep_all: every face; post_process off: we only use detect(), never the crops.
        from ..rng import preserve_global_rng

        with preserve_global_rng():  # its layers' random init (overwritten by the wheel's weights) is not the caller's draw
            self._mtcnn = MTCNN(keep_all=True, device=self.device, min_face_size=min_face_size, post_process=False)
        self._torch = torch

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Face]]:
        if not images:
            return []
        with self._torch.inference_mode():
            boxes, probs, points = self._mtcnn.detect(np.stack(images), landmarks=True)
        out: list[list[Face]] = []
        for b, p, lm in zip(boxes, probs, points):
            faces: list[Face] = []
            if b is not None:
                for box, score, pts in zip(np.asarray(b, dtype=np.float64), p, np.asarray(lm, dtype=np.float64)):
                    faces.append(Face(box=tuple(float(v) for v in box), score=float(score), landmarks=pts.reshape(5, 2)))
            out.append(faces)
        return out


register_detector("mtcnn", MTCNNDetector)
