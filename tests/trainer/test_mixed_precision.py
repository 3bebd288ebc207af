"""bf16 training on a CPU with bf16 arithmetic: the same run as fp32 within bf16's rounding, the same file.

Tolerances come from measurement (tiny SD1.5 model, 4 shapes, 30 steps at lr 1e-3, seeds 7, 1 and 2;
bench/RESULTS.md, "bf16 on this CPU"): the per-step loss differed from fp32 by at most 0.22 %, 0.46 %
and 0.26 % (about one bf16 rounding, 2**-8 = 0.39 %); the learned update ΔW = up @ down * alpha/rank,
over all modules, by 3.7 %, 4.2 % and 3.8 % (Frobenius, relative; median module 3.5-3.9 %). Adam
divides by the running gradient RMS, so rounding in small gradient components moves the update more
than the loss. The bounds below are 4x (loss) and 2.4x (ΔW) the worst seen; a run with another seed
differs from this one by more than 100 %.
"""

from __future__ import annotations

import pytest
import torch

from facediffuser.errors import UserError
from facediffuser.trainer import training_loop as tl
from facediffuser.trainer.kohya_format import kohya_delta_weights, load_kohya_lora
from facediffuser.trainer.training_loop import train

from test_training_loop import make_shapes, tiny_config

LOSS_REL_TOL = 0.02
DELTA_W_REL_TOL = 0.10


def _cpu_has_bf16() -> bool:
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state fixed to the first mixed-precision mode; a test that
    trains in two modes resets it before and after, so it leaves the process as it found it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes-mp") / "data")


@pytest.mark.skipif(not (_cpu_has_bf16() or torch.cuda.is_available()), reason="needs a CPU with AVX-512 BF16/AMX or a GPU")
def test_bf16_trains_like_fp32_and_writes_the_same_file_format(sd15_tiny_checkpoint, shapes, tmp_path, fresh_accelerate_state):
    from accelerate.state import AcceleratorState

    runs = {}
    for mp in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)
        cfg = tiny_config(sd15_tiny_checkpoint, shapes, tmp_path / f"{mp}.safetensors", steps=30, save_precision="fp32",
                          mixed_precision=mp)
        result = train(cfg)
        tensors, meta = load_kohya_lora(cfg.output_path)
        runs[mp] = (result.losses, tensors, meta)
    (l32, t32, m32), (l16, t16, m16) = runs["no"], runs["bf16"]

    # the same file: keys, shapes, dtypes, alphas; the metadata says which precision trained it
    assert set(t16) == set(t32) and len(t32) > 0
    for k in t32:
        assert t16[k].shape == t32[k].shape and t16[k].dtype == t32[k].dtype == torch.float32, k
        if k.endswith(".alpha"):
            assert torch.equal(t16[k], t32[k]), k
    assert m32["ss_mixed_precision"] == "no" and m16["ss_mixed_precision"] == "bf16"
    assert set(m16) == set(m32)

    # the same run within bf16 rounding, and not the same bits (bf16 really ran)
    assert len(l16) == len(l32) == 30
    rel = [abs(a - b) / abs(a) for a, b in zip(l32, l16)]
    print(f"loss: max relative difference {max(rel):.4%}")
    assert max(rel) < LOSS_REL_TOL, rel
    assert l16 != l32
    d32, d16 = kohya_delta_weights(t32), kohya_delta_weights(t16)
    num = sum(float(((d32[k] - d16[k]) ** 2).sum()) for k in d32)
    den = sum(float((d32[k] ** 2).sum()) for k in d32)
    print(f"ΔW: relative difference {(num / den) ** 0.5:.4%} over {len(d32)} modules")
    assert den > 0 and (num / den) ** 0.5 < DELTA_W_REL_TOL


def test_fp16_on_a_cpu_is_refused_with_the_alternative(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"fp16 needs a GPU; on a CPU use --mixed-precision bf16"):
        tl._check_cpu_mixed_precision("fp16")


def test_bf16_on_a_cpu_without_bf16_arithmetic_is_refused(monkeypatch):
    # no such CPU here: its capability report is what decides
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False, "avx2": True})
    with pytest.raises(UserError, match=r"no bf16 arithmetic .* use --mixed-precision no"):
        tl._check_cpu_mixed_precision("bf16")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    tl._check_cpu_mixed_precision("bf16")  # accepted
