"""Pixel-space checks of the demo's samples, independent of any feature extractor.

Why: without the real FID weights the demo's Fréchet distances come from a random-weight stand-in
Inception, which ranks image sets but is no authority. These two numbers need no network at all
and say the same thing in terms a reader can check by eye on the sample grid:

* **nearest-real distance** — for each sample, the RMS pixel distance (0..255 scale, on 16x16
  thumbnails so that a face shifted by a pixel still counts as close) to the nearest held-out real
  image; the mean over the samples. Lower = closer to the training distribution.
* **nearer-to-a-face share** — the share of samples whose nearest thumbnail among held-out toy
  faces *and* toy scenes (what the demo base model draws) is a face: a nearest-neighbour
  classifier in pixel space. Only meaningful with the demo base model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

THUMB = 16


def thumbnails(images: np.ndarray | Sequence[np.ndarray], size: int = THUMB) -> np.ndarray:
    """uint8 HxWx3 images -> float64 (N, size*size*3) box-downsampled thumbnails, 0..255."""
    from PIL import Image

    out = [np.asarray(Image.fromarray(np.asarray(im, dtype=np.uint8)).convert("RGB").resize((size, size), Image.Resampling.BOX),
                      dtype=np.float64).reshape(-1) for im in images]
    return np.stack(out)


def nearest_distances(samples: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample RMS distance to the nearest reference thumbnail, and that reference's index."""
    d2 = (samples ** 2).sum(1)[:, None] + (refs ** 2).sum(1)[None, :] - 2 * samples @ refs.T
    d = np.sqrt(np.clip(d2, 0, None) / samples.shape[1])
    return d.min(1), d.argmin(1)


def pixel_summary(samples: Sequence[np.ndarray], reals: Sequence[np.ndarray],
                  scenes: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """``nearest_real_rms`` and, given the scenes, ``nearer_face_share`` (see the module doc)."""
    s, r = thumbnails(samples), thumbnails(reals)
    to_real, _ = nearest_distances(s, r)
    out = {"nearest_real_rms": float(to_real.mean()), "n": len(s)}
    if scenes is not None:
        to_scene, _ = nearest_distances(s, thumbnails(scenes))
        out["nearer_face_share"] = float((to_real < to_scene).mean())
    return out
