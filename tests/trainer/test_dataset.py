"""The image folder: scanning, every kind of bad file, conversions, and the prepared tensor."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facediffuser.errors import UserError
from facediffuser.trainer.config import TrainConfig
from facediffuser.trainer.dataset import (
    check_dataset,
    min_side_for,
    prepare_image,
    prepare_mask,
    scan_images,
)

RES = 64  # tiny threshold = 16 px


def _cfg(data: Path, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), resolution=kw.pop("resolution", RES), **kw)


def _rgb(path: Path, size=(40, 40), color=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def _png16_rgb(path: Path, w: int, h: int, value: int) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), every sample = ``value``."""
    row = b"\x00" + struct.pack(">H", value) * (3 * w)
    raw = row * h

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# --- scanning -------------------------------------------------------------------------------------

def test_scan_recursive_sorted_case_insensitive_with_captions_and_masks(tmp_path):
    _rgb(tmp_path / "b" / "z.JPG")
    _rgb(tmp_path / "a.png")
    _rgb(tmp_path / "b" / "a.WebP", fmt="WEBP")
    _rgb(tmp_path / "c.jpeg")
    (tmp_path / "a.txt").write_text("hello")
    _rgb(tmp_path / "a.mask.png")  # a mask is not an image
    _rgb(tmp_path / ".hidden.png")
    _rgb(tmp_path / ".cache" / "x.png")
    (tmp_path / "notes.md").write_text("x")
    recs = scan_images(tmp_path)
    assert [r.rel for r in recs] == ["a.png", "b/a.WebP", "b/z.JPG", "c.jpeg"]
    assert recs[0].caption_path == tmp_path / "a.txt"
    assert recs[0].mask_path == tmp_path / "a.mask.png"
    assert all(r.caption_path is None for r in recs[1:])
    assert all(r.mask_path is None for r in recs[1:])
    (tmp_path / "a.caption").write_text("other")
    assert scan_images(tmp_path, "caption")[0].caption_path == tmp_path / "a.caption"


def test_missing_folder_errors(tmp_path):
    with pytest.raises(UserError, match="dataset folder not found"):
        check_dataset(_cfg(tmp_path / "nope"))


def test_file_instead_of_folder_errors(tmp_path):
    f = _rgb(tmp_path / "one.png")
    with pytest.raises(UserError, match="must be a folder"):
        scan_images(f)


def test_empty_folder_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"no images in .*jpg"):
        check_dataset(_cfg(tmp_path))


def test_folder_of_only_bad_images_errors(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    (tmp_path / "y.png").write_text("hello")
    with pytest.raises(UserError, match=r"none of the 2 image\(s\) .* is usable"):
        check_dataset(_cfg(tmp_path))


def test_no_usable_image_names_every_reason_by_count(tmp_path):
    """Not one example that may be the odd one out: each reason with its count and one file."""
    for i, size in enumerate([(100, 300), (64, 64), (127, 127)]):
        _rgb(tmp_path / f"small{i}.png", size=size)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.jpg").write_text("hello")
    with pytest.raises(UserError) as err:
        check_dataset(_cfg(tmp_path, resolution=512))
    assert str(err.value) == (f"none of the 4 image(s) in {tmp_path} is usable: 3 too small for 512 px "
                              "(short side < 128; e.g. small0.png), 1 not an image (e.g. sub/notes.jpg)")


# --- bad inputs: one line each, or converted ------------------------------------------------------

@pytest.fixture
def messy(tmp_path) -> Path:
    d = tmp_path / "data"
    _rgb(d / "good.jpg", (80, 64))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "zero.jpg").write_bytes(b"")
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 65535 // 2, dtype=np.uint16)).save(d / "gray16.png")
    _png16_rgb(d / "rgb16.png", 40, 40, 0x8080)
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))
    rgba.save(d / "rgba.png")
    Image.new("L", (40, 40), 100).save(d / "gray.png")
    Image.new("RGB", (40, 40), (10, 200, 10)).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    ptr = Image.new("P", (40, 40), 1)
    ptr.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    ptr.save(d / "palette_transparent.png", transparency=1)
    _rgb(d / "tiny.png", (8, 8))
    (d / "text.png").write_text("this is not an image\n")
    return d


def test_each_bad_kind_is_skipped_with_one_line_or_converted(messy):
    scan = check_dataset(_cfg(messy))
    used = sorted(Path(r.rel).name for r in scan.images)
    assert used == sorted(["good.jpg", "cmyk.jpg", "gray16.png", "rgb16.png", "rgba.png", "gray.png",
                           "palette.png", "palette_transparent.png"])
    skipped = {Path(line.split(": ", 1)[0]).name: line.split(": ", 1)[1] for line in scan.skipped}
    assert set(skipped) == {"truncated.png", "zero.jpg", "tiny.png", "text.png"}
    assert "corrupt or truncated" in skipped["truncated.png"]
    assert skipped["zero.jpg"] == "empty file (0 bytes)"
    assert skipped["tiny.png"] == f"too small (8x8; the short side must be at least {min_side_for(RES)} px)"
    assert min_side_for(RES) == 16
    assert skipped["text.png"].startswith("not an image")
    assert all("\n" not in line for line in scan.skipped + scan.notes)
    notes = {Path(line.split(": ", 1)[0]).name: line.split(": ", 1)[1] for line in scan.notes}
    assert notes["cmyk.jpg"] == "converted CMYK to RGB"
    assert notes["gray16.png"] == "converted 16-bit to 8-bit RGB"
    assert notes["rgba.png"] == "composited RGBA on white"
    assert notes["gray.png"] == "converted grayscale to RGB"
    assert notes["palette.png"] == "converted palette to RGB"
    assert notes["palette_transparent.png"] == "converted palette with transparency to RGB on white"
    assert len(scan.report_lines()) == len(scan.skipped) + len(scan.notes)


def test_conversions_give_the_right_pixels(messy):
    def px(name):  # centre pixel of the prepared tensor, back in 0..255
        t = prepare_image(messy / name, RES)
        assert t.shape == (3, RES, RES) and t.dtype == torch.float32 and t.is_contiguous()
        return ((t[:, RES // 2, :] + 1) * 127.5).round()

    cmyk = px("cmyk.jpg")  # C=0 M=255 Y=255 K=0 is red
    assert cmyk[0].mean() > 200 and cmyk[1].mean() < 60 and cmyk[2].mean() < 60
    assert torch.allclose(px("gray16.png"), torch.full((3, RES), 127.0), atol=1)  # scaled, not clipped
    assert torch.allclose(px("rgb16.png"), torch.full((3, RES), 128.0), atol=1)
    rgba = px("rgba.png")  # left half opaque blue, right half transparent -> white
    assert torch.equal(rgba[:, -1], torch.tensor([255.0, 255.0, 255.0]))
    assert torch.equal(rgba[:, 0], torch.tensor([0.0, 0.0, 255.0]))
    assert torch.allclose(px("gray.png"), torch.full((3, RES), 100.0), atol=1)
    assert torch.equal(px("palette_transparent.png")[:, 5], torch.tensor([255.0, 255.0, 255.0]))
    pal = px("palette.png")
    assert abs(pal[1].mean() - 200) < 3 and pal[0].mean() < 20


def test_hashes_are_sha256_of_the_file_bytes(messy):
    scan = check_dataset(_cfg(messy))
    for rec in scan.images:
        assert rec.sha256 == hashlib.sha256(rec.path.read_bytes()).hexdigest()
    assert scan.image_hashes == [r.sha256 for r in scan.images]
    assert [r.rel for r in scan.images] == sorted(r.rel for r in scan.images)


def test_captions_and_tag_frequency_from_check_dataset(tmp_path):
    _rgb(tmp_path / "p" / "a.png")
    (tmp_path / "p" / "a.txt").write_text("smiling,  woman\n")
    _rgb(tmp_path / "b.png")
    (tmp_path / "c.png").write_bytes(b"")
    (tmp_path / "c.txt").write_text("never read")
    scan = check_dataset(_cfg(tmp_path, trigger="sks"))
    assert scan.captions == ["sks, a photo of a face", "sks, smiling, woman"]
    assert scan.tag_frequency() == {tmp_path.name: {"a photo of a face": 1, "sks": 1},
                                    "p": {"sks": 1, "smiling": 1, "woman": 1}}
    assert [Path(r.rel).name for r in scan.images] == ["b.png", "a.png"]  # sorted by rel: "b.png" < "p/a.png"
    assert len(scan.skipped) == 1 and "c.png" in scan.skipped[0]


def test_bad_caption_file_skips_its_image(tmp_path):
    _rgb(tmp_path / "a.png")
    _rgb(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\xfa")
    scan = check_dataset(_cfg(tmp_path))
    assert [r.rel for r in scan.images] == ["a.png"]
    assert len(scan.skipped) == 1 and "b.png" in scan.skipped[0] and "not UTF-8" in scan.skipped[0]


# --- preparation ---------------------------------------------------------------------------------

def test_centre_crop_of_a_wide_image(tmp_path):
    arr = np.zeros((60, 180, 3), dtype=np.uint8)
    arr[:, :60] = (255, 0, 0)
    arr[:, 60:120] = (0, 255, 0)
    arr[:, 120:] = (0, 0, 255)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    t = prepare_image(tmp_path / "wide.png", 32)
    assert t.shape == (3, 32, 32)
    assert t.min() >= -1 and t.max() <= 1
    inner = t[:, :, 2:-2]  # Lanczos rings a little at the crop edges (it reads pixels beyond them)
    assert torch.allclose(inner[1], torch.ones(32, 28), atol=0.02)  # all green: the middle third
    assert torch.allclose(inner[0], -torch.ones(32, 28), atol=0.02)
    assert t[0].mean() < -0.9


def test_flip_is_a_horizontal_mirror(tmp_path):
    arr = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "r.png")
    a = prepare_image(tmp_path / "r.png", 64)
    b = prepare_image(tmp_path / "r.png", 64, flip=True)
    assert torch.equal(b, a.flip(-1))
    assert torch.equal(a, torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1)  # no resize at 64


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 30), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 30, 30))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    img.save(tmp_path / "o.jpg", exif=exif, quality=95)
    scan = check_dataset(_cfg(tmp_path, resolution=64))
    assert (scan.images[0].width, scan.images[0].height) == (30, 60)
    t = prepare_image(tmp_path / "o.jpg", 16)
    top, bottom = t[:, 2, 8], t[:, 13, 8]  # after rotation the blue half is on top
    assert top[2] > 0.5 and top[0] < 0 and bottom[0] > 0.5


def test_mask_beside_image_and_size_mismatch(tmp_path):
    _rgb(tmp_path / "a.png", (64, 64))
    m = np.zeros((64, 64), dtype=np.uint8)
    m[:, :32] = 255
    Image.fromarray(m).save(tmp_path / "a.mask.png")
    _rgb(tmp_path / "b.png", (64, 64))
    Image.new("L", (10, 10), 255).save(tmp_path / "b.mask.png")
    scan = check_dataset(_cfg(tmp_path))
    a, b = scan.images
    assert a.mask_path == tmp_path / "a.mask.png" and a.mask_sha256
    assert b.mask_path is None and not b.mask_sha256
    assert any("b.mask.png ignored" in n and "10x10" in n for n in scan.notes)
    mask = prepare_mask(a.mask_path, 8)
    assert mask.shape == (1, 8, 8)
    assert torch.equal(mask[0, :, :4], torch.ones(8, 4)) and torch.equal(mask[0, :, 4:], torch.zeros(8, 4))
    assert torch.equal(prepare_mask(a.mask_path, 8, flip=True), mask.flip(-1))
