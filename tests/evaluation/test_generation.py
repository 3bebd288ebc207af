"""Generation: same seed -> same images; LoRA scale 0 == base; settings recorded; LoRA unloaded after."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory, sd15_tiny_checkpoint):
    """A LoRA trained for a few steps on toy faces, with random (non-zero) up weights."""
    from facediffuser.demo.toy_faces import write_toy_faces
    from facediffuser.trainer.config import TrainConfig
    from facediffuser.trainer.training_loop import train

    d = tmp_path_factory.mktemp("lora")
    write_toy_faces(d / "data", 4, size=64)
    res = train(TrainConfig(model=str(sd15_tiny_checkpoint), data=str(d / "data"), output=str(d / "face.safetensors"),
                            steps=3, rank=4, lr=5e-2, resolution=64, batch_size=2, save_precision="fp32"))
    return res.output


def _arrays(images):
    return [np.asarray(im) for im in images]


def test_same_seed_same_images_and_batch_independent(sd15_tiny_checkpoint):
    from facediffuser.evaluation.generation import SamplerSettings, generate, load_generation_pipeline

    pipe = load_generation_pipeline(sd15_tiny_checkpoint, sampler="ddim", device="cpu")
    s = SamplerSettings(steps=2, cfg=2.0, size=64, seed=7)
    a = _arrays(generate(pipe, ["a face", "a photo"], s, 3, batch_size=3))
    b = _arrays(generate(pipe, ["a face", "a photo"], s, 3, batch_size=1))
    c = _arrays(generate(pipe, ["a face", "a photo"], SamplerSettings(steps=2, cfg=2.0, size=64, seed=8), 3))
    for x, y in zip(a, b):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 1  # batch composition: rounding only
    assert not np.array_equal(a[0], c[0])


def test_lora_scale_zero_equals_base_and_unload_restores(sd15_tiny_checkpoint, tiny_lora, tmp_path):
    from facediffuser.evaluation.generation import SamplerSettings, generate, generate_to_folder, load_generation_pipeline, lora_loaded

    pipe = load_generation_pipeline(sd15_tiny_checkpoint, device="cpu")
    s = SamplerSettings(steps=2, cfg=1.0, size=64, seed=1)
    base = _arrays(generate(pipe, ["a photo of a face"], s, 2))
    with lora_loaded(pipe, tiny_lora, 0.0):
        zero = _arrays(generate(pipe, ["a photo of a face"], s, 2))
    with lora_loaded(pipe, tiny_lora, 1.0):
        one = _arrays(generate(pipe, ["a photo of a face"], s, 2))
    after = _arrays(generate(pipe, ["a photo of a face"], s, 2))
    assert all(np.array_equal(x, y) for x, y in zip(base, zero))
    assert any(not np.array_equal(x, y) for x, y in zip(base, one)), "the LoRA changed nothing"
    assert all(np.array_equal(x, y) for x, y in zip(base, after)), "the LoRA was not removed"

    files = generate_to_folder(pipe, tmp_path / "g", ["p1", "p2"], s, 3, model=sd15_tiny_checkpoint, lora=tiny_lora, lora_scale=0.5)
    rec = json.loads((tmp_path / "g" / "generation.json").read_text())
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"]
    assert rec["settings"] == s.as_dict() and rec["lora_scale"] == 0.5
    assert [i["seed"] for i in rec["images"]] == [1, 2, 3] and [i["prompt"] for i in rec["images"]] == ["p1", "p2", "p1"]


def test_bad_settings_are_user_errors():
    from facediffuser.errors import UserError
    from facediffuser.evaluation.generation import SamplerSettings

    for bad in (dict(steps=0), dict(size=60), dict(sampler="nope"), dict(cfg=-1)):
        with pytest.raises(UserError):
            SamplerSettings(**bad).validate()


def test_generate_cli_registered():
    from facediffuser.cli import build_parser

    args = build_parser().parse_args(["generate", "--model", "m.safetensors", "--prompt", "x", "--out", "o", "--n", "2"])
    assert args.command == "generate" and args.n == 2 and args.sampler == "ddim"


def test_merged_lora_matches_runtime_adapters_and_restores_weights_bit_for_bit(sd15_tiny_checkpoint, tiny_lora):
    """Generation merges the LoRA into the weights (faster); that must draw what peft's runtime
    adapters draw, and leave the very same weight tensors behind."""
    import torch

    from facediffuser.evaluation.generation import SamplerSettings, generate, load_generation_pipeline, lora_loaded

    pipe = load_generation_pipeline(sd15_tiny_checkpoint, device="cpu")
    before = {f"{c}.{n}": (p.data_ptr(), p.detach().clone())
              for c in ("unet", "text_encoder") for n, p in getattr(pipe, c).named_parameters()}
    s = SamplerSettings(steps=2, cfg=2.0, size=64, seed=3)
    with lora_loaded(pipe, tiny_lora, 0.8, merge=False):
        runtime = _arrays(generate(pipe, ["a photo of a face"], s, 2))
    with lora_loaded(pipe, tiny_lora, 0.8, merge=True):
        merged_layers = [m for m in pipe.unet.modules() if getattr(m, "merged", False)]
        merged = _arrays(generate(pipe, ["a photo of a face"], s, 2))
    base = _arrays(generate(pipe, ["a photo of a face"], s, 2))
    assert len(merged_layers) > 0
    assert not any(getattr(m, "merged", False) for m in pipe.unet.modules())
    # peft leaves its (now empty) wrappers behind: ``to_q.base_layer.weight`` is the old ``to_q.weight``
    after = {f"{c}.{n}".replace(".base_layer", ""): p for c in ("unet", "text_encoder") for n, p in getattr(pipe, c).named_parameters()}
    assert set(after) == set(before)
    for name, (ptr, value) in before.items():
        assert after[name].data_ptr() == ptr and torch.equal(after[name].detach(), value), name
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(runtime, merged))
    moved = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(runtime, base))
    print(f"merged vs runtime adapters: max pixel difference {diff}; LoRA vs base: {moved}")
    assert moved > 8 and diff <= 2
