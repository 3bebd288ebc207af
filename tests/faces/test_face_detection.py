"""Face detection on real photographs that ship inside PyPI wheels (no downloads at test time).

* scikit-image's ``skimage/data/astronaut.png`` (Eileen Collins, NASA, public domain): one face.
* insightface 2.1's ``insightface/data/images/t1.jpg`` (a group photo of the six "Friends" actors
  at a poker table): **6 faces**, counted by eye when this test was written. A small framed
  portrait on the back wall is not counted; MTCNN scores its few weak candidates (chips, a hand)
  below the 0.9 threshold. CI puts the wheel into the test cache beforehand::

      python -m pip download --no-deps --only-binary=:all: insightface==2.1 -d "${FACEDIFFUSER_TEST_CACHE:-.cache/tests}/wheels"

  The test reads the image out of that wheel (zip) and skips, saying so, when it is absent.
* scikit-image's ``coffee.png`` and seeded noise: no face.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from facediffuser.errors import UserError
from facediffuser.faces import detection as fd

from fixtures_faces import GROUP_PHOTO_FACES, astronaut, group_photo_image, needs_mtcnn  # noqa: F401 (fixture)


# --- real photographs --------------------------------------------------------------------------

def test_astronaut_has_one_face_with_ordered_landmarks():
    needs_mtcnn()
    faces = fd.detect_faces(astronaut())
    assert len(faces) == 1
    f = faces[0]
    assert f.score > 0.99
    # The head is at about x 181..268, y 62..172 (facenet-pytorch 2.6.0's MTCNN, measured: p 0.999998); 6 px tolerance.
    np.testing.assert_allclose(f.box, [181, 62, 268, 172], atol=6)
    le, re_, nose, ml, mr = f.landmarks
    assert le[0] < nose[0] < re_[0] and ml[0] < mr[0]  # image-left before image-right
    assert max(le[1], re_[1]) < nose[1] < min(ml[1], mr[1])  # eyes above nose above mouth
    x0, y0, x1, y1 = f.box
    assert np.all((f.landmarks[:, 0] > x0) & (f.landmarks[:, 0] < x1) & (f.landmarks[:, 1] > y0) & (f.landmarks[:, 1] < y1))
    assert abs(f.roll_degrees) < 10 and 30 < f.eye_distance < 60
    d = f.to_dict()
    assert list(d["landmarks"]) == list(fd.LANDMARK_NAMES)


def test_group_photo_has_six_faces(group_photo_image):
    needs_mtcnn()
    faces = fd.detect_faces(group_photo_image)
    assert len(faces) == GROUP_PHOTO_FACES
    assert all(f.score >= 0.9 for f in faces)
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    # Six different people: no two boxes overlap.
    centers = np.array([f.center for f in faces])
    dist = np.hypot(*(centers[:, None, :] - centers[None, :, :]).transpose(2, 0, 1))
    assert dist[~np.eye(len(faces), dtype=bool)].min() > 100


def test_min_score_controls_weak_candidates(group_photo_image):
    needs_mtcnn()
    # MTCNN's weak candidates on the table (chips, hands) only appear below the 0.9 default.
    assert len(fd.detect_faces(group_photo_image, min_score=0.0)) > GROUP_PHOTO_FACES
    assert len(fd.detect_faces(group_photo_image, min_score=0.9)) == GROUP_PHOTO_FACES


def test_no_face_in_coffee_or_noise():
    needs_mtcnn()
    from skimage import data

    assert fd.detect_faces(data.coffee()) == []
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(4)]
    assert [len(f) for f in fd.detect_faces_batch(noise)] == [0, 0, 0, 0]


def test_batch_equals_single_and_accepts_formats():
    needs_mtcnn()
    img = np.asarray(astronaut())
    single = fd.detect_faces(img)[0]
    gray = np.asarray(astronaut().convert("L"))
    rgba = astronaut().convert("RGBA")
    batch = fd.detect_faces_batch([img, gray, rgba, img[:, ::-1].copy()])
    assert [len(b) for b in batch] == [1, 1, 1, 1]
    np.testing.assert_allclose(batch[0][0].box, single.box, atol=1e-3)
    # The mirrored image mirrors the face: its box centre moves to the other side.
    assert abs(batch[3][0].center[0] - (512 - single.center[0])) < 4


# --- the interface without the network ---------------------------------------------------------

class _FakeDetector:
    name = "fake"

    def __init__(self, device=None):
        self.calls = 0

    def detect(self, images):
        self.calls += 1
        lm = np.array([[30, 40], [50, 40], [40, 50], [32, 60], [48, 60]], dtype=float)
        return [[fd.Face((20, 20, 60, 70), 0.5, lm), fd.Face((0, 0, 10, 10), 0.95, lm), fd.Face((5, 5, 9, 9), 0.99, lm)] for _ in images]


def test_backend_is_swappable_and_results_filtered_and_sorted():
    fd.register_detector("fake", _FakeDetector)
    faces = fd.detect_faces(np.zeros((80, 80, 3), np.uint8), backend="fake")
    assert [f.score for f in faces] == [0.99, 0.95]  # 0.5 < min_score 0.9 dropped, best first
    assert len(fd.detect_faces(np.zeros((80, 80, 3), np.uint8), backend="fake", min_score=0.0)) == 3
    # Same-size images share one network call; other sizes get their own.
    det = fd.get_detector("fake")
    before = det.calls
    fd.detect_faces_batch([np.zeros((80, 80, 3), np.uint8)] * 3 + [np.zeros((40, 80, 3), np.uint8)], backend="fake")
    assert det.calls - before == 2
    with pytest.raises(UserError, match="unknown face detector 'nope'"):
        fd.detect_faces(np.zeros((8, 8, 3), np.uint8), backend="nope")


def test_bad_inputs_are_user_errors():
    fd.register_detector("fake", _FakeDetector)
    with pytest.raises(UserError, match="uint8"):
        fd.detect_faces(np.zeros((8, 8, 3), np.float32), backend="fake")
    with pytest.raises(UserError, match="shape"):
        fd.detect_faces(np.zeros((8, 8, 3, 2), np.uint8), backend="fake")


def test_missing_facenet_gives_one_line_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # import now raises ModuleNotFoundError
    fd.clear_detector_cache()
    try:
        with pytest.raises(UserError) as exc:
            fd.detect_faces(np.zeros((32, 32, 3), np.uint8))
    finally:
        fd.clear_detector_cache()
    msg = str(exc.value)
    assert "\n" not in msg
    assert "pip install facenet-pytorch==2.5.3" in msg


def test_the_detector_cache_is_bounded_and_clear_frees_it():
    """No detector is kept forever: the cache holds the two most recently used, and a host frees
    them with clear_detector_cache()."""
    import gc
    import weakref

    class Probe:
        name = "cache-probe"

        def __init__(self, device=None):
            self.device = device

        def detect(self, images):
            return [[] for _ in images]

    fd.register_detector("cache-probe", Probe)
    try:
        first = fd.get_detector("cache-probe", "dev0")
        assert fd.get_detector("cache-probe", "dev0") is first  # cached
        gone = weakref.ref(first)
        del first
        fd.get_detector("cache-probe", "dev1")
        last = weakref.ref(fd.get_detector("cache-probe", "dev2"))
        gc.collect()
        assert gone() is None and last() is not None  # bounded: the oldest fell out
        fd.clear_detector_cache()
        gc.collect()
        assert last() is None
    finally:
        fd._FACTORIES.pop("cache-probe", None)
        fd.clear_detector_cache()
