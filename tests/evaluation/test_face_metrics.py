"""Face detection rate, framing statistics and the real-vs-generated comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from facediffuser.errors import UserError
from facediffuser.evaluation import face_metrics as fm
from fixtures_faces import astronaut, needs_mtcnn


def _real_faces() -> list[Image.Image]:
    """Eight real-face images from the astronaut photo: whole, mirrored, cropped, scaled."""
    a = astronaut()
    out = [a, a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    for box in [(100, 0, 356, 256), (120, 20, 320, 220), (60, 0, 400, 340), (0, 0, 512, 300)]:
        out.append(a.crop(box).resize((256, 256), Image.Resampling.LANCZOS))
    out.append(a.resize((320, 320), Image.Resampling.LANCZOS))
    out.append(a.rotate(15, resample=Image.Resampling.BICUBIC, center=(224, 117)))
    return out


def _nchw(images: list[Image.Image], size: int = 256) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size))) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _noise(n: int = 8, size: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_detection_rate_is_one_on_real_faces_and_zero_on_noise():
    needs_mtcnn()
    real = fm.face_stats(_real_faces())
    assert real.n_images == 8
    assert real.detection_rate == 1.0 and real.multi_face_rate == 0.0
    noise = fm.face_stats(_noise())
    assert noise.n_images == 8 and noise.detection_rate == 0.0 and noise.any_face_rate == 0.0
    assert all(v.size == 0 for v in noise.values.values())
    s = real.summary()
    assert 0.1 < s["face_size_mean"] < 0.6 and 0.3 < s["center_x_mean"] < 0.7 and s["score_mean"] > 0.99
    assert noise.summary()["face_size_mean"] is None  # JSON-safe: no NaN


def test_nchw_tensor_numpy_and_pil_give_the_same_stats():
    needs_mtcnn()
    imgs = _real_faces()[:3]
    t = _nchw(imgs)
    a = fm.face_stats(t)
    b = fm.face_stats(t.numpy(), batch_size=2)
    c = fm.face_stats([Image.fromarray(x.permute(1, 2, 0).numpy()) for x in t])
    d = fm.face_stats(iter([t[:2], t[2:]]))  # a generator of batches
    for other in (b, c, d):
        np.testing.assert_array_equal(a.faces_per_image, other.faces_per_image)
        for k in fm.STATISTICS:
            np.testing.assert_allclose(a.values[k], other.values[k], rtol=1e-6)


def test_roll_and_framing_follow_the_image():
    needs_mtcnn()
    a = astronaut()
    base = fm.face_stats([a]).values
    rolled = fm.face_stats([a.rotate(-20, resample=Image.Resampling.BICUBIC, center=(224, 117))]).values
    # PIL rotates counter-clockwise for positive angles; -20 turns the eye line by +20 degrees.
    assert rolled["roll"][0] - base["roll"][0] == pytest.approx(20.0, abs=4.0)
    canvas = Image.new("RGB", (1024, 1024), (128, 128, 128))
    canvas.paste(a, (512, 512))
    moved = fm.face_stats([canvas]).values
    assert moved["face_size"][0] == pytest.approx(base["face_size"][0] / 2, rel=0.1)
    assert moved["center_x"][0] == pytest.approx(0.5 + base["center_x"][0] / 2, abs=0.02)


def _stats(values: dict[str, list[float]], counts: list[int]) -> fm.FaceStats:
    return fm.FaceStats(np.array(counts), {k: np.asarray(values.get(k, []), float) for k in fm.STATISTICS})


def test_comparison_distances_have_known_values():
    real = _stats({"face_size": [0.1, 0.2, 0.3, 0.4], "roll": [0, 0, 0, 0]}, [1, 1, 1, 1])
    same = fm.compare_face_stats(real, real)
    assert same["face_size"]["wasserstein"] == 0.0 and same["face_size"]["ks"] == 0.0
    shifted = _stats({"face_size": [1.1, 1.2, 1.3, 1.4], "roll": [10, 10, 10, 10]}, [1, 1, 2, 0])
    cmp = fm.compare_face_stats(real, shifted)
    assert cmp["face_size"]["wasserstein"] == pytest.approx(1.0)  # every value moved by 1
    assert cmp["roll"]["wasserstein"] == pytest.approx(10.0)
    assert cmp["face_size"]["ks"] == 1.0 and cmp["face_size"]["ks_pvalue"] < 0.05
    assert cmp["score"]["wasserstein"] is None  # no values: nothing to compare
    assert shifted.detection_rate == 0.5 and shifted.any_face_rate == 0.75 and shifted.multi_face_rate == 0.25


def test_face_metrics_with_a_saved_reference(tmp_path):
    needs_mtcnn()
    ref = fm.face_stats(_real_faces())
    path = ref.save(tmp_path / "real_faces.json")
    back = fm.FaceStats.load(path)
    np.testing.assert_array_equal(back.faces_per_image, ref.faces_per_image)
    gen = _nchw(_real_faces()[:4])
    gen = torch.cat([gen, _noise(4)])
    out = fm.face_metrics(gen, reference=path)
    json.dumps(out)  # JSON-ready for the table and the node
    assert out["n_images"] == 8 and out["detection_rate"] == 0.5 and out["real_detection_rate"] == 1.0
    for k in fm.STATISTICS:
        assert f"{k}_wasserstein" in out and f"{k}_ks" in out
    assert out["face_size_wasserstein"] is not None and out["face_size_wasserstein"] >= 0.0


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="uint8"):
        fm.face_stats(torch.rand(2, 3, 32, 32))
    with pytest.raises(UserError, match="NCHW"):
        fm.face_stats(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(UserError, match="no images"):
        fm.face_stats([])
    with pytest.raises(UserError, match="not found"):
        fm.FaceStats.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="face-stats"):
        fm.FaceStats.load(tmp_path / "bad.json")
