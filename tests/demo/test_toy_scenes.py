"""The demo base model's training pictures: deterministic, captioned, one of each kind per 6, and
not face-like (nearer to each other than to the toy faces in pixel space)."""

from __future__ import annotations

import numpy as np
import pytest


def test_deterministic_per_seed_and_index():
    from facediffuser.demo.toy_scenes import toy_scene_array

    a, ca = toy_scene_array(12, seed=4)
    b, cb = toy_scene_array(12, seed=4)
    assert a.shape == (12, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and ca == cb
    tail, ct = toy_scene_array(5, seed=4, start=7)
    assert np.array_equal(a[7:], tail) and ca[7:] == ct
    other, _ = toy_scene_array(12, seed=5)
    assert not np.array_equal(a, other)


def test_kinds_cycle_and_captions_name_them():
    from facediffuser.demo.toy_scenes import KINDS, draw_scene

    words = {"house": "house", "trees": "tree", "mountains": "mountains", "boat": "boat", "flowers": "flowers",
             "shapes": "background"}
    for i in range(12):
        img, scene = draw_scene(0, i, 48)
        assert img.size == (48, 48) and scene.kind == KINDS[i % len(KINDS)]
        assert scene.caption.startswith("a drawing of ") and words[scene.kind] in scene.caption, scene
        assert "face" not in scene.caption


def test_too_small_or_empty_is_a_user_error():
    from facediffuser.demo.toy_scenes import draw_scene, toy_scene_array
    from facediffuser.errors import UserError

    with pytest.raises(UserError, match="at least 16 px"):
        draw_scene(0, 0, 8)
    with pytest.raises(UserError, match="at least one toy scene"):
        toy_scene_array(0)


def test_scenes_are_not_toy_faces_in_pixel_space():
    """A nearest-neighbour classifier on thumbnails tells held-out scenes from held-out faces; if the
    scenes looked like the faces it could not."""
    from facediffuser.demo.pixel_measures import pixel_summary
    from facediffuser.demo.toy_faces import toy_face_array
    from facediffuser.demo.toy_scenes import toy_scene_array

    from facediffuser.demo.cli_demo import SCENES_PER_REAL

    faces_ref, faces_q = toy_face_array(64, seed=0), toy_face_array(32, seed=5)  # as in the demo: 64 held-out faces
    scenes_ref, scenes_q = toy_scene_array(SCENES_PER_REAL * 64, seed=777)[0], toy_scene_array(32, seed=3)[0]
    assert pixel_summary(list(scenes_q), list(faces_ref), list(scenes_ref))["nearer_face_share"] <= 0.1
    assert pixel_summary(list(faces_q), list(faces_ref), list(scenes_ref))["nearer_face_share"] >= 0.9
