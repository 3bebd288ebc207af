"""Prodigy (``--optimizer prodigy``): its learning rate (a multiplier, refused at AdamW's size), the settings reaching prodigyopt (the
same updates as prodigyopt built by hand), a one-line error without the package, the flags and
TOML keys, and a training run's metadata."""

from __future__ import annotations

import argparse
import builtins
import shutil
import sys
from pathlib import Path

import pytest
import torch

from facediffuser.errors import UserError
from facediffuser.trainer import kohya_format as kf
from facediffuser.trainer import training_loop as tl
from facediffuser.trainer.config import SettingError, TrainConfig, add_arguments, config_from_args
from test_training_loop import make_shapes, tiny_config

pytest.importorskip("prodigyopt", reason="prodigyopt is the optional [prodigy] extra; the test install has it")


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(model="m", data="d", output="o.safetensors", **kw)


def test_prodigy_with_an_adamw_learning_rate_is_a_one_line_error():
    """--lr is a multiplier of Prodigy's own estimate: AdamW's 1e-4 would freeze training, so say so."""
    with pytest.raises(SettingError, match=r"--optimizer prodigy takes --lr as a multiplier .*set --lr 1 \(got 0.0001") as info:
        _cfg(optimizer="prodigy").validate()
    assert "\n" not in str(info.value) and info.value.setting == "lr"
    assert _cfg(optimizer="prodigy", lr=1.0).validate().lr == 1.0
    assert _cfg(optimizer="prodigy", lr=0.5).validate().lr == 0.5
    assert _cfg(optimizer="adamw", lr=0.0).validate().lr == 0.0  # AdamW keeps lr 0 (an unchanged --init-lora)


def _quadratic_run(make_opt, steps: int = 6) -> list[torch.Tensor]:
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    opt, sched = make_opt(a, b)
    target = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = ((a - target) ** 2).sum() + (b ** 2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    return [a.detach().clone(), b.detach().clone()]


def test_our_prodigy_makes_prodigyopts_updates_and_prints_nothing(capsys):
    from prodigyopt import Prodigy

    cfg = _cfg(optimizer="prodigy", lr=1.0, prodigy_d_coef=2.0, prodigy_safeguard_warmup=False, weight_decay=0.05,
               lr_warmup_steps=2)
    ours = _quadratic_run(lambda a, b: tl._make_optimizer(cfg, {"unet.a": a, "text_encoder.b": b}, 6))
    assert capsys.readouterr().out == "", "Prodigy's construction print must not reach stdout"

    def by_hand(a, b):
        from diffusers.optimization import get_scheduler

        opt = Prodigy([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 1.0}], lr=1.0, weight_decay=0.05, decouple=True,
                      d_coef=2.0, safeguard_warmup=False, use_bias_correction=True)
        return opt, get_scheduler("constant", optimizer=opt, num_warmup_steps=2, num_training_steps=6)

    capsys.readouterr()
    ref = _quadratic_run(by_hand)
    for x, y in zip(ours, ref):
        assert torch.equal(x, y)
    opt, sched = tl._make_optimizer(cfg, {"unet.a": torch.nn.Parameter(torch.zeros(2))}, 6)
    g = opt.param_groups[0]
    assert (g["d_coef"], g["safeguard_warmup"], g["use_bias_correction"], g["weight_decay"], g["decouple"]) == (
        2.0, False, True, 0.05, True)
    # the step size shown and logged is Prodigy's estimate d times the scheduled lr
    assert g["d"] == 1e-6 and tl._current_lr(opt, sched) == g["d"] * sched.get_last_lr()[0]


def test_missing_prodigyopt_is_a_one_line_error(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_prodigy(name, *a, **k):
        if name == "prodigyopt":
            raise ImportError("No module named 'prodigyopt'")
        return real_import(name, *a, **k)

    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    monkeypatch.setattr(builtins, "__import__", no_prodigy)
    with pytest.raises(UserError, match=r"needs the prodigyopt package \(pip install prodigyopt") as info:
        tl._make_optimizer(_cfg(optimizer="prodigy", lr=1.0), {"unet.x": torch.nn.Parameter(torch.zeros(2))}, 10)
    assert "\n" not in str(info.value)
    # train() says so before it reads the data or loads a model: nothing at these paths exists
    with pytest.raises(UserError, match=r"needs the prodigyopt package"):
        tl.train(TrainConfig(model="no-such.safetensors", data="no-such-folder", output=str(tmp_path / "o.safetensors"),
                             optimizer="prodigy", lr=1.0))


def test_feature_flags_and_toml_keys(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    toml = tmp_path / "run.toml"
    toml.write_text('model = "m"\ndata = "d"\noutput = "o.safetensors"\noptimizer = "prodigy"\nlr = 1.0\nprodigy_d_coef = 0.5\n'
                    'buckets = false\nvalidation_split = 0.1\ndora = true\n')
    cfg = config_from_args(parser.parse_args(["--config", str(toml)]))
    assert (cfg.optimizer, cfg.prodigy_d_coef, cfg.buckets, cfg.validation_split, cfg.dora) == ("prodigy", 0.5, False, 0.1, True)
    assert cfg.lr == 1.0 and cfg.prodigy_safeguard_warmup is True
    cfg = config_from_args(parser.parse_args(["--config", str(toml), "--buckets", "--no-prodigy-safeguard-warmup",
                                              "--validation-every", "7", "--keep-best-validation"]))
    assert cfg.buckets is True and cfg.prodigy_safeguard_warmup is False and cfg.validation_every == 7
    assert cfg.keep_best_validation
    cfg = config_from_args(parser.parse_args(["--model", "m", "--data", "d", "--output", "o.safetensors", "--no-buckets",
                                              "--validation-data", "v", "--min-bucket-reso", "128"]))
    assert cfg.buckets is False and cfg.validation_data == "v" and cfg.min_bucket_reso == 128
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "lion"])


def test_prodigy_training_run_records_its_optimizer(sd15_tiny_checkpoint, tmp_path):
    data = make_shapes(tmp_path / "data")
    ckpt = Path(shutil.copy2(sd15_tiny_checkpoint, tmp_path / "tiny.safetensors"))
    r = tl.train(tiny_config(ckpt, data, tmp_path / "out" / "face.safetensors", steps=3, optimizer="prodigy", lr=1.0))
    assert r.status == "finished"
    _, meta = kf.load_kohya_lora(r.output)
    assert meta["ss_optimizer"] == ("prodigyopt.prodigy.Prodigy(weight_decay=0.01,d_coef=1.0,safeguard_warmup=True,"
                                    "use_bias_correction=True)")
    assert meta["ss_learning_rate"] == meta["ss_unet_lr"] == "1.0"
