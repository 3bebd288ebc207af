"""A random-weight FID Inception file with exactly the layout of the real one, for offline tests.

The real ``weights-inception-2015-12-05-6726825d.pth`` (= pytorch-fid's ``pt_inception-…``) cannot be
downloaded here. We build a state dict with the same 566 keys and shapes from torch-fidelity's own
module class (its weight loading bypassed), fill it with seeded He-initialised convolutions and
batch-norm statistics calibrated on a seeded batch of random smooth and noisy images (each channel
centred, unit variance), so that activations stay O(1) and pool3 features differ from image to image. The real loading, resizing and forward code of every library then runs on it; only the
*values* of FIDs are not the published ones (gate those on real weights).
"""

from __future__ import annotations

import io
import math
import os
import shutil
from pathlib import Path

import pytest

INCEPTION_FILE_NAMES = (
    "weights-inception-2015-12-05-6726825d.pth",  # torch-fidelity, torchmetrics
    "pt_inception-2015-12-05-6726825d.pth",  # pytorch-fid
)
INCEPTION_NUM_KEYS = 566


def build_random_inception_state_dict(seed: int = 0) -> dict:
    """Seeded random weights in the exact key/shape layout of the FID Inception file."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # bypass: nothing to load
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    module = _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in module.state_dict().items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.int64)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            out[key] = torch.zeros_like(value)
        elif key.endswith("running_var"):
            out[key] = torch.ones_like(value)
        elif key.endswith("bn.weight"):
            out[key] = torch.ones_like(value)
        else:  # conv / fc weights: He initialisation keeps the activations O(1) through 94 layers
            fan_in = math.prod(value.shape[1:])
            out[key] = torch.randn(value.shape, generator=gen, dtype=torch.float32) * math.sqrt(2.0 / fan_in)
    assert len(out) == INCEPTION_NUM_KEYS, len(out)
    return _calibrate_batch_norm(module, out, gen)


def random_test_images(n: int, size: int, generator, *, smooth: int = 8):
    """Seeded uint8 NCHW images: half low-frequency colour fields, half those plus noise."""
    import torch
    import torch.nn.functional as F

    low = torch.rand((n, 3, smooth, smooth), generator=generator)
    img = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    noise = torch.rand((n, 3, size, size), generator=generator) - 0.5
    img[n // 2:] += 0.5 * noise[n // 2:]
    return (img.clamp(0, 1) * 255).to(torch.uint8)


def _calibrate_batch_norm(module, state: dict, generator) -> dict:
    """Replace identity BN statistics by the batch statistics of one seeded batch. Without this,
    all-positive ReLU outputs make deep random features nearly equal for every image."""
    import torch

    torch.nn.Module.load_state_dict(module, state)  # the skeleton's own load_state_dict is a no-op
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch -> its own statistics
    module.train()
    x = random_test_images(8, 299, generator)
    with torch.no_grad():
        module(x)
    module.eval()
    out = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for k in out:
        if k.endswith("num_batches_tracked"):
            out[k] = torch.zeros((), dtype=torch.int64)
    return out


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """Path of a seeded random-weight FID Inception state-dict file (≈ 96 MB, 566 keys)."""
    import torch

    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE_NAMES[0]
    torch.save(build_random_inception_state_dict(seed=0), path)
    return path


@pytest.fixture(scope="session")
def inception_torch_home_dir(tmp_path_factory, inception_weights: Path) -> Path:
    home = tmp_path_factory.mktemp("torch_home")
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    for name in INCEPTION_FILE_NAMES:
        try:
            os.link(inception_weights, ckpt / name)
        except OSError:
            shutil.copyfile(inception_weights, ckpt / name)
    return home


@pytest.fixture
def inception_torch_home(inception_torch_home_dir: Path, monkeypatch) -> Path:
    """TORCH_HOME pointing at a temp dir whose ``hub/checkpoints`` holds the random Inception file
    under both names, so pytorch-fid, torch-fidelity, torchmetrics and we all run offline on it."""
    monkeypatch.setenv("TORCH_HOME", str(inception_torch_home_dir))
    monkeypatch.delenv("FACEDIFFUSER_INCEPTION", raising=False)
    import torch.hub

    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # in case someone called set_dir()
    return inception_torch_home_dir
