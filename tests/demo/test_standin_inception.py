"""The stand-in extractor: the real file layout, loaded by the real InceptionFeatures path,
labelled by name and version, and with features (hence distances) in a familiar range."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    from facediffuser.evaluation.inception import InceptionFeatures
    from facediffuser.demo.standin_inception import standin_weights

    path = standin_weights(tmp_path_factory.mktemp("standin"), seed=0)
    return path, InceptionFeatures(path, device="cpu", progress=False)


def test_file_is_a_labelled_inception_state_dict(standin):
    import torch

    from facediffuser.demo.standin_inception import STANDIN_VERSION, is_standin, standin_weights

    path, ext = standin
    assert is_standin(path) and f"-v{STANDIN_VERSION}-" in path.name and path.name.startswith("STAND-IN")
    sd = torch.load(path, weights_only=True)
    assert len(sd) == 566 and sd["fc.weight"].shape == (1008, 2048)
    assert ext.weights_path == path and ext.protocol()["weights"] == path.name  # the real loading code ran
    assert standin_weights(path.parent, seed=0) == path and path.stat().st_size > 90e6  # built once, reused


def test_feature_scale_is_familiar_and_ranks_sets(standin):
    """Toy faces vs toy faces is close; faces vs sharp saturated mosaics (what a random model
    draws) is far; both are in the range FID readers know, not the tens of thousands."""
    import torch

    from facediffuser.evaluation.stats import FeatureStats, fid
    from facediffuser.demo.standin_inception import PROBE_MEAN_ACTIVATION, probe_images
    from facediffuser.demo.toy_faces import toy_face_array

    _, ext = standin
    probe = ext(probe_images(torch.Generator().manual_seed(123))).numpy()  # not the probe the gain was set on
    assert abs(probe.mean() - PROBE_MEAN_ACTIVATION) < 0.3 * PROBE_MEAN_ACTIVATION
    faces = ext(torch.from_numpy(toy_face_array(24, seed=4)).permute(0, 3, 1, 2)).numpy()
    g = torch.Generator().manual_seed(9)
    blocks = (torch.rand((12, 3, 16, 16), generator=g) > 0.5).to(torch.uint8) * 255
    mosaic = ext(torch.nn.functional.interpolate(blocks, scale_factor=4, mode="nearest")).numpy()
    assert 0.01 < faces.mean() < 1.0 and mosaic.mean() < 2.0
    s = FeatureStats.from_features
    floor = fid(s(faces[:12]), s(faces[12:]))
    far = fid(s(faces[:12]), s(mosaic))
    assert 0.1 < floor < 100, floor
    assert 3 * floor < far < 2000, (floor, far)
    assert np.isfinite(faces).all()
