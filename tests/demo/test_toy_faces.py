"""The demo's toy face generator: deterministic, varied, with captions and disjoint splits."""

from __future__ import annotations

import numpy as np


def test_same_seed_same_bytes_and_pixels(tmp_path):
    from facediffuser.demo.toy_faces import write_toy_faces

    a = write_toy_faces(tmp_path / "a", 6, seed=3)
    b = write_toy_faces(tmp_path / "b", 6, seed=3)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.with_suffix(".txt").read_text() for p in a] == [p.with_suffix(".txt").read_text() for p in b]


def test_other_seed_and_index_differ():
    from facediffuser.demo.toy_faces import toy_face_array

    x = toy_face_array(8, seed=0)
    y = toy_face_array(8, seed=1)
    assert x.shape == (8, 64, 64, 3) and x.dtype == np.uint8
    assert not np.array_equal(x, y)
    # every image differs from every other: the set is varied, not one face repeated
    flat = x.reshape(8, -1).astype(np.int32)
    d = np.abs(flat[:, None] - flat[None]).mean(-1)
    assert (d + np.eye(8) * 1e9).min() > 5


def test_image_depends_only_on_seed_and_index():
    from facediffuser.demo.toy_faces import toy_face_array

    whole = toy_face_array(10, seed=2)
    tail = toy_face_array(3, seed=2, start=7)
    assert np.array_equal(whole[7:], tail)


def test_splits_are_disjoint_and_captioned(tmp_path):
    from facediffuser.demo.toy_faces import make_splits
    from facediffuser.trainer.kohya_format import image_digest

    train, held = make_splits(tmp_path, n_train=5, n_heldout=7, size=32)
    tr, ho = sorted(train.glob("*.png")), sorted(held.glob("*.png"))
    assert len(tr) == 5 and len(ho) == 7
    assert not {image_digest(p) for p in tr} & {image_digest(p) for p in ho}
    assert all(p.with_suffix(".txt").read_text().startswith("a photo of a face") for p in tr + ho)
