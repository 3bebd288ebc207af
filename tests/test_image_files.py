"""image_files: one extension set and one lister for the trainer, prep and the evaluation; one
decoder for the trainer and prep."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from facediffuser.errors import UserError
from facediffuser.image_files import IMAGE_EXTENSIONS, list_images, load_rgb


def _img(path, fmt=None, color=(200, 40, 40), size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


@pytest.fixture
def mixed(tmp_path):
    root = tmp_path / "faces"
    want = [
        _img(root / "a.png"),
        _img(root / "b.BMP", fmt="BMP"),
        _img(root / "c.tif", fmt="TIFF"),
        _img(root / "sub" / "d.jpeg", fmt="JPEG"),
        _img(root / "sub" / "e.webp", fmt="WEBP"),
        _img(root / "z.ppm", fmt="PPM"),
    ]
    _img(root / "a.mask.png")  # prep's face mask beside a.png: not an image
    _img(root / "B.MASK.PNG")  # whatever the case (b.BMP's mask)
    _img(root / ".debug" / "a.png")  # prep's debug overlay
    _img(root / ".hidden.png")
    _img(root / ".cache" / "x.png")
    (root / "a.txt").write_text("a caption")
    (root / "notes.gif").write_bytes(b"GIF89a")  # not in the set
    return root, want


def test_one_lister_sorted_by_relative_path_skipping_sidecars(mixed):
    root, want = mixed
    got = list_images(root)
    assert got == sorted(want, key=lambda p: p.relative_to(root).as_posix())
    assert list_images(root, recursive=False) == [p for p in got if p.parent == root]
    assert list_images(root, exclude=root / "sub") == [p for p in got if p.parent == root]
    assert set(IMAGE_EXTENSIONS) >= {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def test_the_trainer_prep_and_the_evaluation_see_the_same_files(mixed):
    """A folder that can be scored can also be trained on and prepped: the same files, in order."""
    from pytorch_fid.fid_score import IMAGE_EXTENSIONS as PYTORCH_FID_EXTENSIONS

    from facediffuser.trainer.dataset import scan_images

    root, _ = mixed
    listed = list_images(root)
    assert [r.path for r in scan_images(root)] == listed
    assert {e.lstrip(".") for e in IMAGE_EXTENSIONS} == set(PYTORCH_FID_EXTENSIONS)
    a, b = scan_images(root)[:2]
    assert a.caption_path == root / "a.txt" and a.mask_path == root / "a.mask.png"
    assert b.path.name == "b.BMP" and b.caption_path is None and b.mask_path == root / "B.MASK.PNG"


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match="dataset folder not found: .*missing"):
        list_images(tmp_path / "missing", what="dataset folder")
    f = _img(tmp_path / "one.png")
    with pytest.raises(UserError, match="is a file; it must be a folder of images"):
        list_images(f)
    (tmp_path / "empty" / ".debug").mkdir(parents=True)
    _img(tmp_path / "empty" / "x.mask.png")
    with pytest.raises(UserError, match=r"no images in .*empty \(looked for .png, .jpg.*\.bmp.*, recursively\)"):
        list_images(tmp_path / "empty")


def test_load_rgb_is_upright_rgb_with_16_bit_scaled(tmp_path):
    """prep and the trainer decode alike: EXIF orientation, alpha on white, 16-bit scaled (not clipped)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    Image.new("RGB", (40, 20), (10, 20, 30)).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_rgb(tmp_path / "rot.jpg").size == (20, 40)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert load_rgb(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert load_rgb(tmp_path / "g16.png").getpixel((0, 0)) == (128, 128, 128)
