"""A STAND-IN feature extractor for demos and tests: the FID Inception with seeded RANDOM weights.

Why: the real FID weights (``weights-inception-2015-12-05-6726825d.pth``) cannot be downloaded in
an offline sandbox, but the demo must still run the whole evaluation. This module writes a state
dict with exactly the real file's 566 keys and shapes, filled with seeded He-initialised weights
and batch-norm statistics calibrated on one seeded batch of smooth random images (so activations
stay O(1) and features differ from image to image). It is then loaded by
:class:`.inception.InceptionFeatures` like the real file — the same loading, resizing and forward
code; only the weights differ.

Feature scale: random deep features react far more strongly than the real Inception to inputs
unlike the calibration batch (a sharp, saturated colour mosaic — what a random diffusion model
draws — gave pool3 activations ~10x larger and Fréchet distances in the tens of thousands). So the
output of the last block (``Mixed_7c``) is multiplied by one constant gain, folded into the affine
weights of its final batch norms (ReLU commutes with a positive scale, so the file stays a plain
Inception state dict). The gain makes the mean pool3 activation over a fixed seeded *probe* set —
smooth fields, noisy fields and sharp block mosaics, 64 px like the demo's images — equal to
:data:`PROBE_MEAN_ACTIVATION`. A uniform gain scales every Fréchet distance by the same factor, so
it changes no ranking and no ratio; it only brings the numbers into the range FID readers know.

Numbers computed with it are Fréchet distances in a random feature space. They can rank two
image sets against the same reference, but they are NOT FID values and must never be quoted as
such: the file name, the protocol (``stand_in``) and every report that uses it say so.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

from ..fileio import atomic_path

#: bump when the construction changes: the version is in the file name, so a cached file built
#: by an older recipe is never reused.
STANDIN_VERSION = 2
STANDIN_PREFIX = "STAND-IN-random-inception"
STANDIN_NOTE = ("stand-in extractor: the FID Inception v3 architecture with SEEDED RANDOM weights; "
                "distances are not FID and are not comparable to any published number")
#: target mean pool3 activation on the probe set (the order of magnitude of Inception pool3 features)
PROBE_MEAN_ACTIVATION = 0.15
#: the final convolutions of each Mixed_7c branch: their batch norms carry the output gain
_OUTPUT_BRANCHES = ("branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")


def standin_file_name(seed: int = 0) -> str:
    return f"{STANDIN_PREFIX}-v{STANDIN_VERSION}-seed{int(seed)}.pth"


def is_standin(path: str | os.PathLike) -> bool:
    return Path(path).name.startswith(STANDIN_PREFIX)


def standin_description(seed: int = 0) -> dict[str, Any]:
    """What the stand-in is, for ``results.json`` (the protocol's ``stand_in`` entry)."""
    return {"note": STANDIN_NOTE, "version": STANDIN_VERSION, "seed": int(seed),
            "feature_scale": f"output gain set so the probe set's mean pool3 activation is {PROBE_MEAN_ACTIVATION}"}


def probe_images(generator: Any, n: int = 8, size: int = 64) -> "torch.Tensor":  # noqa: F821
    """Seeded uint8 NCHW probe images: smooth fields, noisy fields, sharp saturated and soft block mosaics."""
    import torch
    import torch.nn.functional as F

    smooth = F.interpolate(torch.rand((n, 3, 4, 4), generator=generator), size=(size, size), mode="bicubic", align_corners=False)
    noisy = F.interpolate(torch.rand((n, 3, 4, 4), generator=generator), size=(size, size), mode="bicubic", align_corners=False)
    noisy = noisy + 0.5 * (torch.rand((n, 3, size, size), generator=generator) - 0.5)
    blocks = torch.rand((2 * n, 3, size // 4, size // 4), generator=generator)
    blocks[:n] = (blocks[:n] > 0.5).float()  # saturated: every channel 0 or 1
    mosaic = F.interpolate(blocks, size=(size, size), mode="nearest")
    return (torch.cat([smooth, noisy, mosaic]).clamp(0, 1) * 255).round().to(torch.uint8)


def build_standin_state_dict(seed: int = 0) -> dict:
    """Seeded random weights in the FID Inception layout, batch norm calibrated and the output
    scaled (see module doc)."""
    import torch
    import torch.nn.functional as F
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # nothing to load yet
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    from ..rng import preserve_global_rng

    with preserve_global_rng():  # the layers' default init is replaced below from `gen`
        module = _Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    gen = torch.Generator().manual_seed(int(seed))
    state = {}
    for key, value in module.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.int64)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = torch.zeros_like(value)
        elif key.endswith("running_var") or key.endswith("bn.weight"):
            state[key] = torch.ones_like(value)
        else:  # He initialisation keeps activations O(1) through the 94 layers
            state[key] = torch.randn(value.shape, generator=gen) * math.sqrt(2.0 / math.prod(value.shape[1:]))
    torch.nn.Module.load_state_dict(module, state)
    # Without calibrated BN, all-positive ReLU outputs make deep random features nearly equal.
    bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch -> its own statistics
    low = torch.rand((8, 3, 8, 8), generator=gen)
    x = F.interpolate(low, size=(299, 299), mode="bicubic", align_corners=False)
    x[4:] += 0.5 * (torch.rand((4, 3, 299, 299), generator=gen) - 0.5)
    module.train()
    with torch.no_grad():
        module((x.clamp(0, 1) * 255).to(torch.uint8))
    module.eval()
    with torch.no_grad():  # one output gain (see module doc); the features are >= 0, so the mean is > 0
        mean = float(module(probe_images(gen))[0].mean())
        gain = PROBE_MEAN_ACTIVATION / mean
        for name in _OUTPUT_BRANCHES:
            bn = getattr(module.Mixed_7c, name).bn
            bn.weight.mul_(gain)
            bn.bias.mul_(gain)
    out = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for k in out:
        if k.endswith("num_batches_tracked"):
            out[k] = torch.zeros((), dtype=torch.int64)
    return out


def standin_weights(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Path of the stand-in weights file in ``folder``, built (once, atomically) if missing."""
    import torch

    path = Path(folder) / standin_file_name(seed)
    if path.is_file():
        return path
    with atomic_path(path, fsync=True) as tmp:
        torch.save(build_standin_state_dict(seed), tmp)
    return path


def default_standin_dir() -> Path:
    """Beside the feature cache: ``$FACEDIFFUSER_CACHE`` or ``~/.cache/facediffuser``, + /standin."""
    from ..evaluation.stats import default_cache_dir

    return default_cache_dir().parent / "standin"
