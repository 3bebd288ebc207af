"""FFHQ alignment: the crop square, the resampled crop, and where the landmarks land.

Tolerances against the FFHQ 5-point template (facexlib's FFHQ mean, in pixels of a 512 crop):
the FFHQ recipe fixes the eye midpoint and the eye-to-mouth axis but not individual points (a
smile widens the mouth, a turned head moves the nose), so the test is tight where the recipe is
and looser where faces differ. Measured when written: astronaut worst landmark 17.1 px, eye
midpoint 4.3 px; group photo eye midpoints <= 4.3 px, mouth midpoints <= 13 px, roll <= 4.8 deg.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from facediffuser.errors import UserError
from facediffuser.faces import align as fa
from facediffuser.faces.detection import Face, detect_faces
from fixtures_faces import GROUP_PHOTO_FACES, astronaut, group_photo_image, needs_mtcnn  # noqa: F401,F811 (fixture)

SIZE = 512
LANDMARK_TOL_PX = 20.0  # any landmark vs template, near-frontal face (astronaut)
EYE_MID_TOL_PX = 6.0    # eye midpoint vs template (what the recipe fixes)
MOUTH_MID_TOL_PX = 16.0
ROLL_TOL_DEG = 6.0


def _rot(theta_deg: float) -> np.ndarray:
    t = math.radians(theta_deg)
    return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])


UPRIGHT = np.array([[100.0, 100.0], [140.0, 100.0], [120.0, 122.0], [104.0, 145.0], [136.0, 145.0]])


# --- the geometry --------------------------------------------------------------------------------

def test_square_follows_the_ffhq_recipe_for_an_upright_face():
    sq = fa.ffhq_square(UPRIGHT)
    # eye distance 40, eye-to-mouth 45: half side = max(2 * 40, 1.8 * 45) = 81, axis-aligned.
    np.testing.assert_allclose(sq.x, [81.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(sq.y, [0.0, 81.0], atol=1e-9)
    np.testing.assert_allclose(sq.center, [120.0, 100.0 + 0.1 * 45.0], atol=1e-9)
    np.testing.assert_allclose(sq.corners[0], [120.0 - 81.0, 104.5 - 81.0])
    out = fa.transform_points(sq.matrix(SIZE), sq.corners)
    np.testing.assert_allclose(out, [[0, 0], [0, SIZE], [SIZE, SIZE], [SIZE, 0]], atol=1e-9)


def test_alignment_removes_rotation_translation_and_scale():
    ref = fa.transform_points(fa.ffhq_square(UPRIGHT).matrix(SIZE), UPRIGHT)
    for angle, scale, shift in [(30.0, 1.0, (0, 0)), (-75.0, 2.5, (300, -40)), (170.0, 0.4, (13, 7))]:
        moved = (UPRIGHT - 120.0) @ _rot(angle).T * scale + 120.0 + np.array(shift)
        out = fa.transform_points(fa.ffhq_square(moved).matrix(SIZE), moved)
        np.testing.assert_allclose(out, ref, atol=1e-6)


def test_pixels_land_where_the_matrix_says():
    """Bright dots drawn at rotated landmark positions come out at the transformed positions."""
    from PIL import Image, ImageDraw

    lm = (UPRIGHT - 120.0) @ _rot(25.0).T * 3.0 + np.array([400.0, 300.0])
    img = Image.new("RGB", (800, 640), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for x, y in lm:
        draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=(255, 255, 255))
    al = fa.align_face(img, lm, 256)
    arr = np.asarray(al.image, dtype=np.float64)[:, :, 0]
    yy, xx = np.mgrid[0:256, 0:256] + 0.5
    for x, y in al.landmarks:
        win = (np.abs(xx - x) < 8) & (np.abs(yy - y) < 8)
        w = arr * win
        cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
        assert math.hypot(cx - x, cy - y) < 0.75, (cx, cy, x, y)


def test_faces_at_the_border_are_padded_by_reflection_not_black():
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(100, 200, (200, 200, 3), dtype=np.uint8))
    lm = UPRIGHT - np.array([100.0, 60.0])  # face in the top-left corner: the square leaves the photo
    al = fa.align_face(photo, lm, 128)
    assert 0.2 < al.pad_fraction < 0.9
    arr = np.asarray(al.image)
    assert arr.shape == (128, 128, 3)
    assert arr.min() > 60  # no black borders: mirrored texture fading to the mean colour


def test_bad_landmarks_are_user_errors():
    with pytest.raises(UserError, match="5 finite"):
        fa.ffhq_square(np.zeros((4, 2)))
    with pytest.raises(UserError, match="degenerate"):
        fa.ffhq_square(np.zeros((5, 2)))


# --- real photographs vs the FFHQ template ---------------------------------------------------------

def _midpoints(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return lm[:2].mean(axis=0), lm[3:].mean(axis=0)


def test_astronaut_aligns_onto_the_ffhq_template():
    needs_mtcnn()
    face = detect_faces(astronaut())[0]
    al = fa.align_face(astronaut(), face.landmarks, SIZE, box=face.box)
    assert al.image.size == (SIZE, SIZE) and al.image.mode == "RGB"
    tmpl = fa.ffhq_template(SIZE)
    err = np.hypot(*(al.landmarks - tmpl).T)
    assert err.max() < LANDMARK_TOL_PX, err
    assert np.hypot(*(_midpoints(al.landmarks)[0] - _midpoints(tmpl)[0])) < EYE_MID_TOL_PX
    # The crop itself, not just the arithmetic: the detector finds the face where it should be.
    again = detect_faces(al.image)
    assert len(again) == 1
    err2 = np.hypot(*(again[0].landmarks - tmpl).T)
    assert err2.max() < LANDMARK_TOL_PX, err2
    assert 0.0 <= al.box[0] < al.box[2] <= SIZE and 0.0 <= al.box[1] < al.box[3] <= SIZE
    assert al.pad_fraction == 0.0


def test_group_photo_faces_all_align(group_photo_image):
    needs_mtcnn()
    faces = detect_faces(group_photo_image)
    assert len(faces) == GROUP_PHOTO_FACES
    tmpl_eye, tmpl_mouth = _midpoints(fa.ffhq_template(SIZE))
    rolls = [f.roll_degrees for f in faces]
    assert max(abs(r) for r in rolls) > 20  # the photo has strongly tilted heads to undo
    for f in faces:
        al = fa.align_face(group_photo_image, f.landmarks, SIZE, box=f.box)
        eye, mouth = _midpoints(al.landmarks)
        assert np.hypot(*(eye - tmpl_eye)) < EYE_MID_TOL_PX
        assert np.hypot(*(mouth - tmpl_mouth)) < MOUTH_MID_TOL_PX
        assert abs(Face((0, 0, 1, 1), 1.0, al.landmarks).roll_degrees) < ROLL_TOL_DEG
        assert len(detect_faces(al.image)) == 1
