"""Real photographs for the face tests (shipped inside PyPI wheels; no downloads at test time).

See tests/faces/test_face_detection.py for what each photo holds and how CI provides it.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from facediffuser.faces import detection as fd

GROUP_PHOTO_FACES = 6
GROUP_PHOTO_MEMBER = "insightface/data/images/t1.jpg"
GROUP_PHOTO_SHA256 = "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489"
GROUP_PHOTO_HINT = ("python -m pip download --no-deps --only-binary=:all: insightface==2.1 "
                    "-d \"${FACEDIFFUSER_TEST_CACHE:-.cache/tests}/wheels\"")


def needs_mtcnn() -> None:
    pytest.importorskip("facenet_pytorch", reason=f"MTCNN backend not installed: {fd.MTCNN_INSTALL}")


def astronaut():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut())


def group_photo(cache_dir: Path):
    """insightface's t1.jpg read from its wheel in the test cache, or skip with the CI command."""
    from PIL import Image

    wheels = sorted((cache_dir / "wheels").glob("insightface-2.1-*.whl"))
    if not wheels:
        pytest.skip(f"group photo unavailable: put the insightface 2.1 wheel in the test cache: {GROUP_PHOTO_HINT}")
    with zipfile.ZipFile(wheels[0]) as zf:
        data = zf.read(GROUP_PHOTO_MEMBER)
    assert hashlib.sha256(data).hexdigest() == GROUP_PHOTO_SHA256, "t1.jpg differs from the image the face count was made on"
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="session")
def group_photo_image(test_cache_dir):
    return group_photo(test_cache_dir)
