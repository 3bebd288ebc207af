"""DoRA (``--dora``): peft's magnitude <-> kohya ``dora_scale`` in both directions, the merge maths
against peft's own merge, the file a tiny training run writes (every module, float32 magnitudes,
LyCORIS metadata), its outputs against the in-memory model, and the round trip through
``--init-lora`` (continuing at lr 0 gives the same tensors back)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from facediffuser.errors import UserError
from facediffuser.trainer import kohya_format as kf
from facediffuser.trainer import lora_targets as lt
from facediffuser.trainer import training_loop as tl
from test_training_loop import make_shapes, tiny_config


class Net(torch.nn.Module):
    """One of each layer kind kohya DoRA files hold: Linear, 1x1 conv (SD1.5 proj_in), 3x3 conv (LoCon)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 5)
        self.proj = torch.nn.Conv2d(3, 4, 1)
        self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(v), self.conv(self.proj(x))


def _dora_net(seed: int = 0, ranks=None) -> torch.nn.Module:
    from peft import inject_adapter_in_model

    torch.manual_seed(seed)
    net = Net()
    cfg = lt.lora_config_from_modules(ranks or {"lin": 2, "proj": 2, "conv": 3}, {"lin": 1.0, "proj": 4.0, "conv": 3.0},
                                      use_dora=True)
    inject_adapter_in_model(cfg, net, adapter_name="default")
    with torch.no_grad():  # a trained-looking adapter: B != 0 and a magnitude moved off ‖W‖
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return net


def _peft_sd(net):
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(net).items()}


def test_peft_magnitude_becomes_output_axis_dora_scale_and_back():
    net = _dora_net()
    sd = _peft_sd(net)
    assert sd["lin.lora_magnitude_vector"].shape == (5,) and sd["proj.lora_magnitude_vector"].shape == (1, 4, 1, 1)
    tensors = kf.peft_to_kohya(sd, unet_alpha=lt.module_alphas(net))
    assert tensors["lora_unet_lin.dora_scale"].shape == (5, 1)
    assert tensors["lora_unet_proj.dora_scale"].shape == (4, 1, 1, 1)
    assert tensors["lora_unet_conv.dora_scale"].shape == (3, 1, 1, 1)
    assert torch.equal(tensors["lora_unet_proj.dora_scale"].flatten(), sd["proj.lora_magnitude_vector"].flatten())
    assert kf.is_dora(tensors)
    back = kf.kohya_to_peft(tensors)
    assert back.dora and set(back.unet) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back.unet[k], v), k


def test_dora_merged_weight_equals_peft_merge_for_every_layer_kind():
    net = _dora_net()
    tensors = kf.peft_to_kohya(_peft_sd(net), unet_alpha=lt.module_alphas(net))
    originals = {n: getattr(net, n).base_layer.weight.detach().clone() for n in ("lin", "proj", "conv")}
    for n in ("lin", "proj", "conv"):
        getattr(net, n).merge(adapter_names=["default"])  # peft's own DoRA merge
    for n, w in originals.items():
        k = f"lora_unet_{n}"
        ours = kf.dora_merged_weight(w, tensors[f"{k}.lora_down.weight"], tensors[f"{k}.lora_up.weight"],
                                     float(tensors[f"{k}.alpha"]), tensors[f"{k}.dora_scale"])
        merged = getattr(net, n).base_layer.weight.detach()
        assert torch.allclose(ours, merged, rtol=1e-6, atol=1e-6), (n, float((ours - merged).abs().max()))
        assert float((merged - w).abs().max()) > 1e-2, "the adapter must change the weight for this to test anything"


def test_dora_file_loads_into_a_fresh_model_with_identical_outputs(tmp_path):
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    net = _dora_net()
    tensors = kf.peft_to_kohya(_peft_sd(net), unet_alpha=lt.module_alphas(net))
    kf.save_kohya_lora(tmp_path / "fp16.safetensors", tensors, {}, dtype="fp16")
    half, _ = kf.load_kohya_lora(tmp_path / "fp16.safetensors")
    assert half["lora_unet_lin.dora_scale"].dtype == torch.float32, "magnitudes stay float32 in an fp16 file"
    assert half["lora_unet_lin.lora_up.weight"].dtype == torch.float16
    kf.save_kohya_lora(tmp_path / "fp32.safetensors", tensors, {}, dtype="fp32")
    init = kf.kohya_to_peft(kf.load_kohya_lora(tmp_path / "fp32.safetensors")[0])
    fresh = Net()
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if "lora_" not in k})
    inject_adapter_in_model(lt.lora_config_from_modules(init.unet_ranks, init.unet_alphas, use_dora=init.dora), fresh)
    set_peft_model_state_dict(fresh, init.unet)
    x, v = torch.randn(2, 3, 5, 5), torch.randn(2, 6)
    with torch.no_grad():
        for a, b in zip(net(x, v), fresh(x, v)):
            assert torch.equal(a, b)


def test_dora_read_errors_are_one_line():
    net = _dora_net()
    tensors = kf.peft_to_kohya(_peft_sd(net), unet_alpha=lt.module_alphas(net))
    wrong_axis = dict(tensors, **{"lora_unet_lin.dora_scale": torch.ones(1, 6)})
    with pytest.raises(UserError, match=r"per input channel.*wd_on_output=False") as info:
        kf.kohya_to_peft(wrong_axis, source="x.safetensors")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="expected"):
        kf.kohya_to_peft(dict(tensors, **{"lora_unet_lin.dora_scale": torch.ones(4, 1)}))
    mixed = {k: v for k, v in tensors.items() if k != "lora_unet_conv.dora_scale"}
    with pytest.raises(UserError, match="2 of 3 modules are DoRA"):
        kf.kohya_to_peft(mixed)
    with pytest.raises(UserError, match="dora_merged_weight"):
        kf.kohya_delta_weights(tensors)


# --- a tiny training run ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data")


@pytest.fixture(scope="module")
def tiny_ckpt(sd15_tiny_checkpoint, tmp_path_factory) -> Path:
    return Path(shutil.copy2(sd15_tiny_checkpoint, tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors"))


@pytest.fixture(scope="module")
def dora_run(tiny_ckpt, shapes, tmp_path_factory):
    """--dora with LoCon and the text encoder, fp32 file; the live model's outputs on fixed inputs."""
    out = tmp_path_factory.mktemp("dora") / "face.safetensors"
    cfg = tiny_config(tiny_ckpt, shapes, out, steps=3, lr=5e-3, dora=True, conv_rank=2, conv_alpha=1.0,
                      train_text_encoder=True, save_precision="fp32")
    captured = {}
    real = tl._export_lora

    def capture(config, accelerator, models, *a, **kw):
        path = real(config, accelerator, models, *a, **kw)
        if kw.get("output") is None:
            captured["out"] = _forward(accelerator.unwrap_model(models.unet), accelerator.unwrap_model(models.text_encoder),
                                       models.tokenizer)
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tl, "_export_lora", capture)
        result = tl.train(cfg)
    return cfg, result, captured["out"]


@torch.no_grad()
def _forward(unet, text_encoder, tokenizer):
    modes = unet.training, text_encoder.training
    unet.eval(), text_encoder.eval()
    try:
        ids = tokenizer("a red circle, shape", padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        hidden = text_encoder(ids)[0]
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        return hidden.clone(), unet(x, torch.tensor([500]), hidden, return_dict=False)[0].clone()
    finally:
        unet.train(modes[0]), text_encoder.train(modes[1])


def test_dora_training_writes_every_module_with_its_magnitude(dora_run):
    cfg, result, _ = dora_run
    tensors, meta = kf.load_kohya_lora(result.output)
    modules = {k.split(".")[0] for k in tensors}
    assert {k.split(".")[0] for k in tensors if k.endswith(".dora_scale")} == modules
    assert any(m.startswith("lora_te_") for m in modules) and any(m.endswith("_conv1") for m in modules)
    for m in modules:
        scale, up = tensors[m + ".dora_scale"], tensors[m + ".lora_up.weight"]
        assert scale.dtype == torch.float32 and scale.shape == (up.shape[0],) + (1,) * (up.dim() - 1), m
    assert meta["ss_network_module"] == "lycoris.kohya"
    import json

    assert json.loads(meta["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_output": "True",
                                                   "conv_dim": "2", "conv_alpha": "1.0"}


def test_dora_file_merged_into_plain_weights_reproduces_the_trained_model(dora_run, tiny_ckpt):
    """An independent path from the file to the outputs: W' = dora_merged_weight(W, file) written into
    a model without peft, against the live peft model at export time."""
    from facediffuser.sd.model_loading import load_components

    cfg, result, (ref_hidden, ref_out) = dora_run
    tensors, _ = kf.load_kohya_lora(result.output)
    c = load_components(tiny_ckpt, dtype=torch.float32, device="cpu")
    mods = {"unet": dict(c.unet.named_modules()), "text_encoder": dict(c.text_encoder.named_modules())}
    names = {k.split(".")[0] for k in tensors}
    with torch.no_grad():
        for name in names:
            part, path = kf.parse_kohya_module_name(name)
            w = mods[part][path].weight
            merged = kf.dora_merged_weight(w, tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"],
                                           float(tensors[f"{name}.alpha"]), tensors[f"{name}.dora_scale"])
            w.copy_(merged)
    hidden, out = _forward(c.unet, c.text_encoder, c.tokenizer)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    print(f"\n[dora] merged-weights model vs trained model: TE rel {rel(hidden, ref_hidden):.2e}, UNet rel {rel(out, ref_out):.2e}")
    assert rel(hidden, ref_hidden) < 1e-5 and rel(out, ref_out) < 1e-5
    base = load_components(tiny_ckpt, dtype=torch.float32, device="cpu")
    _, base_out = _forward(base.unet, base.text_encoder, base.tokenizer)
    assert rel(base_out, ref_out) > 1e-3, "the DoRA must change the outputs for this to test anything"


def test_dora_file_round_trips_through_init_lora_at_lr_zero(dora_run, tiny_ckpt, shapes, tmp_path):
    cfg, result, _ = dora_run
    again = tiny_config(tiny_ckpt, shapes, tmp_path / "again.safetensors", steps=1, lr=0.0, init_lora=str(result.output),
                        train_text_encoder=True, save_precision="fp32", seed=99)
    r = tl.train(again)
    a, meta = kf.load_kohya_lora(result.output)
    b, meta_b = kf.load_kohya_lora(r.output)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert meta_b["ss_network_module"] == "lycoris.kohya" and meta_b["ss_network_args"] == meta["ss_network_args"]
