"""--compile: the trainer's step through torch.compile (inductor) trains like eager and writes the same
file. Slow (inductor compiles the tiny UNet's forward and backward: a minute or more on a CPU)."""

from __future__ import annotations

import shutil

import pytest
import torch

from facediffuser.trainer.kohya_format import load_kohya_lora
from facediffuser.trainer.training_loop import train

from test_training_loop import make_shapes, tiny_config

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                 reason="inductor's CPU backend needs a C++ compiler")]


def test_compiled_step_trains_like_eager_and_writes_the_same_file(sd15_tiny_checkpoint, tmp_path):
    from torch._dynamo.utils import counters

    data = make_shapes(tmp_path / "data")
    runs = {}
    for compiled in (False, True):
        counters.clear()
        cfg = tiny_config(sd15_tiny_checkpoint, data, tmp_path / f"c{int(compiled)}.safetensors", steps=4,
                          save_precision="fp32", compile=compiled)
        result = train(cfg)
        runs[compiled] = (result.losses, *load_kohya_lora(cfg.output_path), sum(counters["stats"].values()))
    (le, te, me, _), (lc, tc, mc, dynamo_stats) = runs[False], runs[True]
    assert dynamo_stats > 0  # dynamo really traced the step
    assert set(tc) == set(te) and len(te) > 0 and set(mc) == set(me)
    for k in te:
        assert tc[k].shape == te[k].shape and tc[k].dtype == te[k].dtype == torch.float32, k
    # inductor fuses and reorders float32 arithmetic: the same run within rounding, not the same bits
    assert len(lc) == len(le) == 4
    assert max(abs(a - b) / abs(a) for a, b in zip(le, lc)) < 1e-3
    num = sum(float(((tc[k] - te[k]) ** 2).sum()) for k in te if "lora_up" in k)
    den = sum(float((te[k] ** 2).sum()) for k in te if "lora_up" in k)
    assert den > 0 and (num / den) ** 0.5 < 1e-2
