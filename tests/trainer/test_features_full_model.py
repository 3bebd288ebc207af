"""The four issue-13 features at once on the full SD1.5-shaped checkpoint (2 steps at 128 px): a
held-out split evaluated every step, DoRA, Prodigy and three aspect-ratio buckets. The tiny-model
tests check each in depth; this one checks they work on the real architecture and module names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from facediffuser.trainer import kohya_format as kf
from facediffuser.trainer.config import TrainConfig
from facediffuser.trainer.training_loop import train
from test_buckets import make_mixed

pytestmark = pytest.mark.full_model
pytest.importorskip("prodigyopt", reason="prodigyopt is the optional [prodigy] extra; the test install has it")


def test_validation_dora_prodigy_and_buckets_on_the_full_model(sd15_full_checkpoint: Path, tmp_path: Path) -> None:
    data = make_mixed(tmp_path / "data")
    cfg = TrainConfig(model=str(sd15_full_checkpoint), data=str(data), output=str(tmp_path / "out" / "face.safetensors"),
                      steps=2, resolution=128, rank=4, batch_size=1, seed=1, optimizer="prodigy", lr=1.0, dora=True,
                      validation_split=0.3, validation_every=1, buckets=True)
    r = train(cfg)
    assert r.status == "finished"
    assert [s for s, _ in r.validation] == [0, 1, 2] and all(v > 0 for _, v in r.validation)
    tensors, meta = kf.load_kohya_lora(r.output)
    modules = {k.split(".")[0] for k in tensors}
    assert len(modules) == 192 and all(k.split(".")[0] in modules for k in tensors if k.endswith(".dora_scale"))
    assert sum(k.endswith(".dora_scale") for k in tensors) == 192
    assert kf.kohya_to_peft(tensors).dora
    assert tensors["lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"].shape == (320, 1, 1, 1)
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.dora_scale"].shape == (320, 1)
    info = json.loads(meta["ss_bucket_info"])
    assert sum(b["count"] for b in info["buckets"].values()) == 5 and len(info["buckets"]) >= 2
    assert meta["ss_optimizer"].startswith("prodigyopt.prodigy.Prodigy(") and meta["ss_num_validation_images"] == "2"
    assert meta["ss_network_module"] == "lycoris.kohya" and r.loss_plot is not None and r.loss_plot.is_file()
    print(f"\n[features/full] {r.seconds:.1f} s; validation {r.validation}; buckets {info['buckets']}")
    assert torch.isfinite(torch.tensor([v for _, v in r.validation])).all()
