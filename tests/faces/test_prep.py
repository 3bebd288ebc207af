"""``facediffuser prep``: crops, metadata, masks, the drop summary, resume, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from facediffuser.cli import main
from facediffuser.errors import UserError
from facediffuser.faces.prep import JOURNAL_NAME, SUMMARY_NAME, PrepSettings, prep_folder
from fixtures_faces import GROUP_PHOTO_FACES, group_photo_image, needs_mtcnn  # noqa: F401,F811 (fixture)

SIZE = 256


@pytest.fixture
def src(tmp_path):
    from skimage import data

    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(data.astronaut()).save(d / "astronaut.png")
    Image.fromarray(data.coffee()).save(d / "coffee.png")
    Image.fromarray(data.astronaut()[:, ::-1]).save(d / "sub" / "mirror.jpg", quality=95)
    (d / "broken.jpg").write_bytes(b"not an image")
    return d


def test_prep_writes_crops_metadata_masks_and_summary(src, tmp_path):
    needs_mtcnn()
    dst = tmp_path / "faces"
    res = prep_folder(src, dst, PrepSettings(size=SIZE, debug_masks=True), progress=False)
    assert (res.sources, res.faces_written, res.images_with_faces) == (4, 2, 2)

    for rel in ("astronaut", "sub/mirror"):
        img = Image.open(dst / f"{rel}.png")
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
        mask = Image.open(dst / f"{rel}.mask.png")
        assert mask.size == (SIZE, SIZE) and mask.mode == "L"
        m = np.asarray(mask)
        meta = json.loads((dst / f"{rel}.json").read_text())
        assert meta["face_index"] == 0 and meta["faces_in_source"] == 1 and meta["score"] > 0.99
        assert meta["source"] in ("astronaut.png", "sub/mirror.jpg")
        assert meta["mask"] == rel.split("/")[-1] + ".mask.png"
        lm = np.array(list(meta["landmarks"].values()))
        assert lm.shape == (5, 2) and np.all((lm > 0) & (lm < SIZE))
        # Landmarks are in crop pixels: each sits on the mask.
        assert all(m[int(y), int(x)] > 250 for x, y in lm)
        x0, y0, x1, y1 = meta["box"]
        assert x0 < lm[:, 0].min() and lm[:, 0].max() < x1 and y0 < lm[:, 1].min() and lm[:, 1].max() < y1
        assert (dst / ".debug" / f"{rel}.png").is_file()

    summary = json.loads((dst / SUMMARY_NAME).read_text())
    dropped = {d["source"]: d["reason"] for d in summary["dropped"]}
    assert dropped == {"coffee.png": "no_face", "broken.jpg": "unreadable"}
    assert summary["dropped_by_reason"] == {"no_face": 1, "unreadable": 1}
    assert summary["counts"]["faces_written"] == 2
    assert not (dst / "coffee.png").exists()


def test_prep_resumes_and_redoes_on_new_settings(src, tmp_path):
    needs_mtcnn()
    dst = tmp_path / "faces"
    prep_folder(src, dst, PrepSettings(size=SIZE), progress=False)
    stamp = (dst / "astronaut.png").stat().st_mtime_ns
    again = prep_folder(src, dst, PrepSettings(size=SIZE), progress=False)
    assert again.resumed == 4 and again.faces_written == 2
    assert (dst / "astronaut.png").stat().st_mtime_ns == stamp
    assert {d["source"] for d in again.dropped} == {"coffee.png", "broken.jpg"}  # still reported
    # A deleted output is redone; the others are not.
    (dst / "sub" / "mirror.mask.png").unlink()
    third = prep_folder(src, dst, PrepSettings(size=SIZE), progress=False)
    assert third.resumed == 3 and (dst / "sub" / "mirror.mask.png").is_file()
    # New settings redo everything.
    fourth = prep_folder(src, dst, PrepSettings(size=128), progress=False)
    assert fourth.resumed == 0 and Image.open(dst / "astronaut.png").size == (128, 128)
    # A torn journal line (killed mid-write) is ignored.
    with open(dst / JOURNAL_NAME, "a") as fh:
        fh.write('{"source": "astro')
    assert prep_folder(src, dst, PrepSettings(size=128), progress=False).resumed == 4


def test_group_photo_face_modes(group_photo_image, tmp_path):
    needs_mtcnn()
    src = tmp_path / "group"
    src.mkdir()
    group_photo_image.save(src / "t1.jpg", quality=95)
    one = prep_folder(src, tmp_path / "one", PrepSettings(size=128, faces="one-only"), progress=False)
    assert one.faces_written == 0 and one.dropped[0]["reason"] == "multiple_faces"
    every = prep_folder(src, tmp_path / "all", PrepSettings(size=128, faces="all"), progress=False)
    assert every.faces_written == GROUP_PHOTO_FACES
    metas = [json.loads((tmp_path / "all" / f"t1_{k}.json").read_text()) for k in range(GROUP_PHOTO_FACES)]
    assert [m["face_index"] for m in metas] == list(range(GROUP_PHOTO_FACES))
    assert all(m["faces_in_source"] == GROUP_PHOTO_FACES for m in metas)
    largest = prep_folder(src, tmp_path / "largest", PrepSettings(size=128), progress=False)
    assert largest.faces_written == 1
    assert json.loads((tmp_path / "largest" / "t1.json").read_text())["source_box"] == metas[0]["source_box"]
    # --min-face above every face: dropped as too small.
    small = prep_folder(src, tmp_path / "small", PrepSettings(size=128, min_face=400), progress=False)
    assert small.dropped[0]["reason"] == "face_too_small"


def test_cli_prep(src, tmp_path, capsys):
    needs_mtcnn()
    dst = tmp_path / "out"
    assert main(["prep", str(src), str(dst), "--size", str(SIZE), "--no-progress", "--debug-masks"]) == 0
    assert "2 face crop(s) from 2 of 4 image(s)" in capsys.readouterr().out
    assert (dst / "astronaut.png").is_file() and (dst / ".debug" / "astronaut.png").is_file()
    # Only non-faces: the summary is still written, and the command fails with one line.
    only = tmp_path / "coffee_only"
    only.mkdir()
    (src / "coffee.png").rename(only / "coffee.png")
    assert main(["prep", str(only), str(tmp_path / "none"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("facediffuser prep: error: no usable face") and "\n" not in err
    assert json.loads((tmp_path / "none" / SUMMARY_NAME).read_text())["dropped"][0] == {
        "source": "coffee.png", "reason": "no_face", "detail": "no face with score >= 0.9"}
    with pytest.raises(SystemExit):
        main(["prep", str(src), str(dst), "--one-face-only", "--all-faces"])


def test_prep_rejects_bad_folders_and_settings(src, tmp_path):
    with pytest.raises(UserError, match="DST must differ"):
        prep_folder(src, src, progress=False)
    with pytest.raises(UserError, match="source folder not found"):
        prep_folder(tmp_path / "missing", tmp_path / "x", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        prep_folder(empty, tmp_path / "x", progress=False)
    with pytest.raises(UserError, match="--size"):
        prep_folder(src, tmp_path / "x", PrepSettings(size=100), progress=False)


def test_clashing_stems_and_dst_inside_src(tmp_path):
    needs_mtcnn()
    from skimage import data

    src = tmp_path / "p"
    src.mkdir()
    Image.fromarray(data.astronaut()).save(src / "a.png")
    Image.fromarray(data.astronaut()).save(src / "a.jpg")
    res = prep_folder(src, src / "faces", PrepSettings(size=128), progress=False)
    assert res.sources == 2  # the outputs inside SRC are not read back as sources
    assert (src / "faces" / "a_png.png").is_file() and (src / "faces" / "a_jpg.png").is_file()
