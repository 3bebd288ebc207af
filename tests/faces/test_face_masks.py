"""Face masks: the mask of a face, mask files, the latent mask and the face-weighted loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facediffuser.errors import UserError
from facediffuser.faces import masks as fm
from facediffuser.faces.align import ffhq_template
from facediffuser.image_files import is_prep_artifact


# --- masks ---------------------------------------------------------------------------------------------

def test_face_mask_covers_the_face_and_is_feathered():
    tmpl = ffhq_template(256)
    m = fm.face_mask(tmpl, (256, 256))
    assert m.dtype == np.float32 and m.shape == (256, 256)
    assert 0.0 <= m.min() and m.max() <= 1.0
    for x, y in tmpl:
        assert m[int(y), int(x)] > 0.99  # every landmark is inside
    assert m[5, 5] == 0.0 and m[250, 5] == 0.0 and m[5, 250] == 0.0  # corners are background
    assert 0.1 < m.mean() < 0.6
    assert np.count_nonzero((m > 0.05) & (m < 0.95)) > 200  # a soft edge, not a step
    bigger = fm.face_mask(tmpl, (256, 256), dilate=0.3)
    assert bigger.sum() > m.sum() * 1.2


def test_mask_png_round_trip_and_naming(tmp_path):
    m = fm.face_mask(ffhq_template(64), (64, 64))
    img_path = tmp_path / "a.png"
    p = fm.save_mask(m, fm.mask_path_for(img_path))
    assert p.name == "a.mask.png"
    back = fm.load_mask(p)
    assert np.abs(back - m).max() <= 0.5 / 255 + 1e-6
    assert fm.load_mask(p, size=(32, 32)).shape == (32, 32)
    assert is_prep_artifact(p) and is_prep_artifact(tmp_path / ".debug" / "a.png")  # never listed as images
    assert not is_prep_artifact(img_path)
    with pytest.raises(UserError, match="face mask not found"):
        fm.load_mask(tmp_path / "missing.mask.png")
    dbg = fm.mask_debug_image(np.zeros((64, 64, 3), np.uint8), m, ffhq_template(64))
    assert dbg.size == (64, 64) and np.asarray(dbg)[32, 32, 0] > 100


def test_the_trainer_reads_a_mask_as_load_mask_does(tmp_path):
    """One reader: grayscale white = face, or a varying alpha channel (kohya's alpha-mask rule)."""
    from PIL import Image

    from facediffuser.trainer.dataset import prepare_mask

    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = ramp  # black pixels, the face share in alpha
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(ramp, "L").save(tmp_path / "gray.png")
    for name in ("alpha.png", "gray.png"):
        want = ramp.astype(np.float32) / 255.0
        np.testing.assert_array_equal(fm.load_mask(tmp_path / name), want)
        np.testing.assert_array_equal(prepare_mask(tmp_path / name, 16)[0].numpy(), want)
    (tmp_path / "bad.mask.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="unreadable face mask"):
        fm.load_mask(tmp_path / "bad.mask.png")


def test_mask_to_latent_is_an_area_average():
    mask = np.zeros((16, 16), np.float32)
    mask[:, :8] = 1.0  # left half
    np.testing.assert_array_equal(fm.mask_to_latent(mask, (2, 2)).numpy(), [[[[1.0, 0.0], [1.0, 0.0]]]])
    # One 2x2 pixel block of face inside each 4x4 pixel cell's top-left corner: a quarter each.
    m2 = np.zeros((64, 64), np.uint8)
    m2[:2, :2] = 255
    lat = fm.mask_to_latent(m2, (16, 16))
    assert lat.shape == (1, 1, 16, 16) and lat.dtype == torch.float32
    assert lat[0, 0, 0, 0].item() == 0.25 and lat.sum().item() == 0.25
    # SD's factor 8: a 512 mask to a 64 latent, batch kept; the mean face share is preserved.
    real = torch.from_numpy(fm.face_mask(ffhq_template(512), (512, 512)))
    batch = torch.stack([real, 1 - real])
    lat = fm.mask_to_latent(batch, (64, 64))
    assert lat.shape == (2, 1, 64, 64)
    assert torch.allclose(lat.mean(dim=(1, 2, 3)), batch.mean(dim=(1, 2)), atol=1e-6)
    with pytest.raises(UserError, match="mask"):
        fm.mask_to_latent(np.zeros((2, 3, 8, 8)), (2, 2))


# --- the face-weighted loss ---------------------------------------------------------------------------

def test_weight_one_is_exactly_the_plain_mse():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 32, 32, generator=g), torch.randn(3, 4, 32, 32, generator=g)
    lat = fm.mask_to_latent(torch.rand(3, 256, 256, generator=g), (32, 32))
    wmap = fm.face_weight_map(lat, 1.0)
    assert torch.equal(wmap, torch.ones_like(wmap))
    assert torch.equal(fm.weighted_mse(pred, target, wmap), F.mse_loss(pred, target))
    assert torch.equal(fm.weighted_mse(pred, target, None), F.mse_loss(pred, target))
    assert torch.equal(fm.weighted_mse(pred, target, wmap, reduction="per_sample"),
                       F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)))
    assert torch.equal(fm.face_weight_map(lat, 1.0, normalize=True), wmap)


def test_face_weight_scales_the_loss_inside_the_mask():
    pred = torch.zeros(1, 4, 2, 2)
    target = torch.ones(1, 4, 2, 2)  # squared error 1 everywhere
    lat = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    wmap = fm.face_weight_map(lat, 3.0)
    torch.testing.assert_close(wmap, torch.tensor([[[[3.0, 1.0], [2.0, 1.0]]]]))
    assert fm.weighted_mse(pred, target, wmap).item() == pytest.approx((3 + 1 + 2 + 1) / 4)
    norm = fm.face_weight_map(lat, 3.0, normalize=True)
    assert norm.mean().item() == pytest.approx(1.0)
    assert fm.weighted_mse(pred, target, norm).item() == pytest.approx(1.0)
    with pytest.raises(UserError, match="face loss weight"):
        fm.face_weight_map(lat, -1.0)
    with pytest.raises(UserError, match="reduction"):
        fm.weighted_mse(pred, target, wmap, reduction="sum")
