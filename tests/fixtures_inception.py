"""A random-weight FID Inception file with exactly the layout of the real one, for offline tests.

The real ``weights-inception-2015-12-05-6726825d.pth`` (= pytorch-fid's ``pt_inception-…``) cannot be
downloaded here. ``evaluation/standin_inception.py`` builds a state dict with the same 566 keys and
shapes from torch-fidelity's own module class, seeded and calibrated so that features stay O(1) and
differ from image to image. The real loading, resizing and forward code of every library then runs
on it; only the *values* of FIDs are not the published ones (gate those on real weights).
"""

from __future__ import annotations

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
    """Seeded random weights in the exact key/shape layout of the FID Inception file: the same
    recipe as the product's labelled stand-in extractor (He-initialised, batch norm calibrated)."""
    from facediffuser.demo.standin_inception import build_standin_state_dict

    state = build_standin_state_dict(seed)
    assert len(state) == INCEPTION_NUM_KEYS, len(state)
    return state


def random_test_images(n: int, size: int, generator, *, smooth: int = 8):
    """Seeded uint8 NCHW images: half low-frequency colour fields, half those plus noise."""
    import torch
    import torch.nn.functional as F

    low = torch.rand((n, 3, smooth, smooth), generator=generator)
    img = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    noise = torch.rand((n, 3, size, size), generator=generator) - 0.5
    img[n // 2:] += 0.5 * noise[n // 2:]
    return (img.clamp(0, 1) * 255).to(torch.uint8)


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
