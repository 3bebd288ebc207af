"""The fused LoRA forward computes what peft's forward computes: outputs and every adapter gradient,
for Linear and 1x1-conv layers, batch 1 and 2, alpha != rank, under bf16 autocast; and every case it
does not cover falls back to peft's own forward."""

from __future__ import annotations

import pytest
import torch

from facediffuser.trainer.lora_forward import disable_lean_forward, enable_lean_forward, lean_lora_forward


class Block(torch.nn.Module):
    """A transformer-block-shaped toy: 1x1 conv in, linears, 1x1 conv out (SD1.5's proj_in/out)."""

    def __init__(self, c: int = 24) -> None:
        super().__init__()
        self.proj_in = torch.nn.Conv2d(c, c, 1)
        self.to_q = torch.nn.Linear(c, c, bias=False)
        self.ff = torch.nn.Linear(c, 3 * c)
        self.ff2 = torch.nn.Linear(3 * c, c)
        self.proj_out = torch.nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.proj_in(x).permute(0, 2, 3, 1).reshape(n, h * w, c)
        y = self.ff2(torch.nn.functional.gelu(self.ff(self.to_q(y))))
        return self.proj_out(y.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()) + x


def _model(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(seed)
    m = Block()
    m.requires_grad_(False)
    cfg = LoraConfig(r=4, lora_alpha=3, lora_dropout=dropout, init_lora_weights="gaussian",
                     target_modules=["proj_in", "to_q", "ff", "ff2", "proj_out"])
    inject_adapter_in_model(cfg, m)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # peft starts B at zero; a zero B would hide a wrong up-projection
    return m


def _run(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = m(x)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    m.zero_grad(set_to_none=True)
    return out.detach().float(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_forward_matches_peft_outputs_and_gradients(batch):
    m = _model()
    x = torch.randn(batch, 24, 6, 5, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = _run(m, x)
    with lean_lora_forward(m) as n:
        out, grads = _run(m, x)
    assert n == 5
    assert _rel(out, ref_out) < 1e-5
    assert set(grads) == set(ref_grads) and len(grads) == 10
    for k in grads:
        assert _rel(grads[k], ref_grads[k]) < 1e-5, k


def test_fused_forward_under_bf16_autocast_matches_peft_under_autocast():
    m = _model()
    x = torch.randn(2, 24, 6, 5, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref_grads = _run(m, x)
        with lean_lora_forward(m):
            out, grads = _run(m, x)
    # both round to bf16 (8 bits of mantissa), in a different order: a few bf16 steps apart at most
    assert _rel(out, ref_out) < 0.05
    for k in grads:
        assert grads[k].dtype == torch.float32  # the adapter stays float32
        assert _rel(grads[k], ref_grads[k]) < 0.05, k


def test_state_dict_and_parameters_are_unchanged_and_disable_restores_peft():
    m = _model()
    before = list(m.state_dict())
    assert enable_lean_forward(m) == 5
    assert enable_lean_forward(m) == 0  # idempotent
    assert list(m.state_dict()) == before
    disable_lean_forward(m)
    assert not any("forward" in vars(mod) for mod in m.modules())


def test_cases_without_a_fast_path_run_peft(monkeypatch):
    """Merged and disabled adapters, channels-last input, a bf16 base without autocast: peft's own
    forward runs (counted), and the result still equals peft's."""
    from peft.tuners.lora import layer as lora_layer

    calls = {"n": 0}
    real_linear, real_conv = lora_layer.Linear.forward, lora_layer.Conv2d.forward

    def count(real):
        def f(self, *a, **k):
            calls["n"] += 1
            return real(self, *a, **k)
        return f

    monkeypatch.setattr(lora_layer.Linear, "forward", count(real_linear))
    monkeypatch.setattr(lora_layer.Conv2d, "forward", count(real_conv))
    m = _model()
    x = torch.randn(1, 24, 4, 4, generator=torch.Generator().manual_seed(3))
    with lean_lora_forward(m):
        m(x)
        assert calls["n"] == 0  # the plain case is all fast path
        cl = x.to(memory_format=torch.channels_last)
        m(cl)
        assert calls["n"] == 1  # proj_in's input is channels-last: peft for that layer only
        m.proj_in.merge()
        calls["n"] = 0
        merged = m(x)
        assert calls["n"] == 1
        m.proj_in.unmerge()
        for layer in (m.to_q, m.ff):
            layer.enable_adapters(False)
        calls["n"] = 0
        m(x)
        assert calls["n"] == 2
    with torch.no_grad():
        ref = _model()(x)
    assert _rel(merged.detach(), ref) < 1e-5

    bf = _model()
    for p in bf.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    calls["n"] = 0
    with lean_lora_forward(bf), torch.no_grad():
        bf(x.to(torch.bfloat16))
    assert calls["n"] == 5  # fp32 adapter on a bf16 base outside autocast: peft's numerics


def test_train_with_the_fused_forward_writes_peft_s_file(sd15_tiny_checkpoint, tmp_path, monkeypatch):
    """The real trainer with the fused forward (the default) and with it switched off (peft's own
    forward): the same losses and the same LoRA file (keys, shapes, dtypes, metadata keys, values
    within float32 rounding order), and the fused forward really ran on the UNet's layers."""
    from facediffuser.trainer import lora_forward
    from facediffuser.trainer import training_loop as tl
    from facediffuser.trainer.kohya_format import load_kohya_lora

    from test_training_loop import make_shapes, tiny_config

    data = make_shapes(tmp_path / "data")
    switched = []
    real_enable, real_lean = lora_forward.enable_lean_forward, tl._lean_lora_forward
    monkeypatch.setattr(lora_forward, "enable_lean_forward", lambda m: switched.append(real_enable(m)) or switched[-1])
    runs = {}
    for mode in ("peft", "fused"):
        monkeypatch.setattr(tl, "_lean_lora_forward", (lambda config, models: None) if mode == "peft" else real_lean)
        cfg = tiny_config(sd15_tiny_checkpoint, data, tmp_path / f"{mode}.safetensors", steps=6, save_precision="fp32")
        result = tl.train(cfg)
        runs[mode] = (result.losses, *load_kohya_lora(cfg.output_path))
    assert len(switched) == 1 and switched[0] > 0  # only the fused run switched the UNet's LoRA layers
    (lp, tp, mp), (lf, tf, mf) = runs["peft"], runs["fused"]
    assert len(lp) == len(lf) == 6
    assert max(abs(a - b) / abs(a) for a, b in zip(lp, lf)) < 1e-4
    assert set(tp) == set(tf) and len(tp) > 0
    assert set(mp) == set(mf)
    for k in tp:
        assert tf[k].shape == tp[k].shape and tf[k].dtype == tp[k].dtype == torch.float32, k
        assert _rel(tf[k], tp[k]) < 1e-3, k
