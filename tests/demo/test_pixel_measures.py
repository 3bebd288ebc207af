"""Pixel measures against a brute-force reference written out in full."""

from __future__ import annotations

import numpy as np


def _brute_thumb(im: np.ndarray, size: int) -> np.ndarray:
    k = im.shape[0] // size  # box filter on an exact multiple: the mean of each k x k block
    return im.astype(np.float64).reshape(size, k, size, k, 3).mean((1, 3)).reshape(-1)


def test_thumbnails_are_block_means():
    from facediffuser.demo.pixel_measures import thumbnails

    rng = np.random.default_rng(0)
    ims = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    got = thumbnails(ims, 16)
    want = np.stack([_brute_thumb(im, 16) for im in ims])
    assert got.shape == (3, 16 * 16 * 3)
    assert np.abs(got - want).max() <= 1.0  # PIL box-filters in fixed point to integers


def test_nearest_distances_and_summary_match_brute_force():
    from facediffuser.demo.pixel_measures import nearest_distances, pixel_summary, thumbnails

    rng = np.random.default_rng(1)
    samples = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    reals = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    scenes = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    reals[2] = samples[0]  # an exact match: distance 0, index 2
    s, r, c = thumbnails(samples), thumbnails(reals), thumbnails(scenes)
    d, idx = nearest_distances(s, r)
    for i in range(5):
        rms = [float(np.sqrt(((s[i] - r[j]) ** 2).mean())) for j in range(7)]
        assert abs(d[i] - min(rms)) < 1e-6 and idx[i] == int(np.argmin(rms))
    assert d[0] < 1e-6 and idx[0] == 2
    summ = pixel_summary(list(samples), list(reals), list(scenes))
    to_scene = [min(float(np.sqrt(((s[i] - c[j]) ** 2).mean())) for j in range(4)) for i in range(5)]
    assert summ["n"] == 5 and abs(summ["nearest_real_rms"] - float(np.mean(d))) < 1e-9
    assert summ["nearer_face_share"] == sum(d[i] < to_scene[i] for i in range(5)) / 5
    assert "nearer_face_share" not in pixel_summary(list(samples), list(reals))
