"""The FID Inception: finding and loading the weights, and features equal to the references
(pytorch-fid at 299, torch-fidelity at any size, torchmetrics' antialias mode) on the same file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from facediffuser.errors import UserError
from facediffuser.evaluation.images import to_uint8_nchw
from facediffuser.evaluation.inception import WEIGHTS_FILE_NAMES, InceptionFeatures, find_inception_weights
from fixtures_inception import INCEPTION_NUM_KEYS, random_test_images


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(11)
    return lambda n, size: random_test_images(n, size, g)


def test_fixture_has_the_real_layout_and_lively_features(inception_weights, images):
    sd = torch.load(inception_weights, map_location="cpu", weights_only=True)
    assert len(sd) == INCEPTION_NUM_KEYS
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3) and sd["fc.weight"].shape == (1008, 2048)
    assert abs(sum(v.numel() for v in sd.values() if v.is_floating_point()) - 23.9e6) < 0.1e6
    f = InceptionFeatures(inception_weights, device="cpu", progress=False)(images(6, 96))
    assert f.shape == (6, 2048) and f.dtype == torch.float32
    assert 0.01 < float(f.mean()) < 5 and float(f.std(0).mean()) > 0.05 * float(f.mean())  # differs per image


def test_find_order_explicit_env_models_dir_torch_home(tmp_path, inception_weights, inception_torch_home, monkeypatch):
    assert find_inception_weights().parent == inception_torch_home / "hub" / "checkpoints"
    models = tmp_path / "models" / "inception"
    models.mkdir(parents=True)
    os.link(inception_weights, models / WEIGHTS_FILE_NAMES[1])  # the pytorch-fid name is accepted too
    assert find_inception_weights(models_dir=models) == models / WEIGHTS_FILE_NAMES[1]
    monkeypatch.setenv("FACEDIFFUSER_INCEPTION", str(inception_weights))
    assert find_inception_weights(models_dir=models) == inception_weights
    assert find_inception_weights(models) == models / WEIGHTS_FILE_NAMES[1]  # explicit wins (a folder is searched)


def test_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.delenv("FACEDIFFUSER_INCEPTION", raising=False)
    with pytest.raises(UserError) as e:
        find_inception_weights(models_dir=tmp_path / "models")
    msg = str(e.value)
    assert "\n" not in msg
    for part in (WEIGHTS_FILE_NAMES[0], "95.6 MB", "23.9 M parameters", str(tmp_path / "models"), "hub/checkpoints", "--inception"):
        assert part in msg
    with pytest.raises(UserError, match="not found: .*nope.pth"):
        find_inception_weights(tmp_path / "nope.pth")


def test_wrong_or_truncated_file(tmp_path, inception_weights):
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(inception_weights.read_bytes()[:1_000_000])
    with pytest.raises(UserError, match="not a loadable FID Inception state dict"):
        InceptionFeatures(trunc, device="cpu")
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(UserError, match="does not have the FID Inception layout: 566 missing keys"):
        InceptionFeatures(other, device="cpu")


def test_features_equal_pytorch_fid_at_299(inception_torch_home, images):
    from pytorch_fid.inception import InceptionV3

    x = images(6, 299)
    ref = InceptionV3([3]).eval()
    with torch.no_grad():
        expected = ref(x.float() / 255)[0].flatten(1)
    exact = InceptionFeatures(resize="pytorch-fid", channels_last=False, device="cpu", progress=False)(x)
    fast = InceptionFeatures(resize="pytorch-fid", device="cpu", progress=False)(x)
    err_exact, err_fast = (exact - expected).abs().max().item(), (fast - expected).abs().max().item()
    print(f"pytorch-fid parity at 299: max|Δ| NCHW {err_exact:.2e}, channels_last {err_fast:.2e}")
    assert err_exact < 1e-4
    assert err_fast < 3e-4  # fp32 rounding of the channels_last kernels; FID moves ~1e-7 relative


@pytest.mark.parametrize("size", [64, 128, 512])
def test_features_equal_torch_fidelity_at_other_sizes(inception_weights, images, size):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    x = images(4, size)
    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_weights))
    with torch.no_grad():
        expected = ref(x)[0]
    exact = InceptionFeatures(inception_weights, channels_last=False, device="cpu", progress=False)(x)
    fast = InceptionFeatures(inception_weights, device="cpu", progress=False, batch_size=3)(x)
    err_exact, err_fast = (exact - expected).abs().max().item(), (fast - expected).abs().max().item()
    print(f"torch-fidelity parity at {size}: max|Δ| NCHW {err_exact:.2e}, channels_last {err_fast:.2e}")
    assert err_exact < 1e-4
    assert err_fast < 3e-4


def test_antialias_mode_equals_torchmetrics(inception_weights, images):
    from torchmetrics.image.fid import NoTrainInceptionV3

    x = images(3, 200)
    ref = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_weights), antialias=True)
    with torch.no_grad():
        expected = ref(x)[0] if isinstance(ref(x), tuple) else ref(x)
    ours = InceptionFeatures(inception_weights, resize="torch-antialias", channels_last=False, device="cpu", progress=False)(x)
    assert (ours - expected.reshape(ours.shape)).abs().max().item() < 1e-4


def test_comfyui_image_is_quantised_like_save_image(inception_weights, images):
    x = images(2, 64)
    comfy = x.permute(0, 2, 3, 1).float() / 255  # IMAGE: float [0,1] NHWC
    assert torch.equal(to_uint8_nchw(comfy), x)
    vals = torch.tensor([0.0, 0.5, 0.99999, 1.2, -0.1]).reshape(1, 1, 5, 1).expand(1, 1, 5, 3)
    expected = np.clip(255.0 * vals.numpy(), 0, 255).astype(np.uint8)  # ComfyUI SaveImage
    assert to_uint8_nchw(vals).permute(0, 2, 3, 1).numpy().tolist() == expected.tolist()
    ex = InceptionFeatures(inception_weights, device="cpu", progress=False)
    assert torch.equal(ex(comfy), ex(x))
    with pytest.raises(UserError, match="channel"):
        to_uint8_nchw(torch.zeros(1, 8, 8, 7))


def test_protocol_names_extractor_weights_resize_and_n(inception_weights):
    p = InceptionFeatures(inception_weights, device="cpu", progress=False).protocol(n=123)
    assert p["resize"] == "tf1" and "TF1" in p["resize_description"]
    assert len(p["weights_sha256"]) == 64 and p["n"] == 123 and "inception-v3-compat" in p["extractor"]
