"""Resume: a run killed with SIGKILL and resumed writes the same bytes as one that never stopped;
the checkpoint store is atomic, keeps the newest two, and round-trips every RNG."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from facediffuser.errors import UserError
from facediffuser.trainer import checkpointing as ck
from facediffuser.trainer.training_loop import TrainCallbacks, train
from test_training_loop import make_shapes, tiny_config

EPOCH = "1700000000"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data", n=5)


@pytest.fixture(scope="module")
def tiny_ckpt(sd15_tiny_checkpoint, tmp_path_factory) -> Path:
    return Path(shutil.copy2(sd15_tiny_checkpoint, tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors"))


def _cli(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "facediffuser.cli", "train", "--model", str(ckpt), "--data", str(data),
            "--output", str(out), "--steps", "12", "--save-every", "2", "--resolution", "64", "--rank", "4",
            "--lr", "1e-3", "--seed", "11", "--batch-size", "2", "--min-snr-gamma", "5", "--ema", "0.9",
            "--lora-dropout", "0.1", "--lr-scheduler", "cosine", "--lr-warmup-steps", "3", *extra]


def test_sigkill_then_resume_is_byte_identical_to_an_uninterrupted_run(tiny_ckpt, shapes, tmp_path):
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole" / "face.safetensors"
    t0 = time.perf_counter()
    subprocess.run(_cli(tiny_ckpt, shapes, whole), env=env, check=True, capture_output=True, timeout=600)
    t_whole = time.perf_counter() - t0

    cut = tmp_path / "cut" / "face.safetensors"
    state = cut.with_name("face.state")
    proc = subprocess.Popen(_cli(tiny_ckpt, shapes, cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not ck.checkpoint_dirs(state):  # kill as soon as the first checkpoint is complete
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = ck.read_info(ck.latest_checkpoint(state))["global_step"]
    assert killed_at < 12 and not cut.exists()

    r = subprocess.run(_cli(tiny_ckpt, shapes, cut, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from {state / f'step-{killed_at:08d}'}" in r.stderr
    print(f"killed after step {killed_at}; uninterrupted run {t_whole:.1f}s")
    assert cut.with_name("face.loss.png").is_file()
    assert_same_file(cut, whole)


def _canonical(blob: bytes) -> tuple[dict, bytes]:
    """(parsed header, data section) of a safetensors file."""
    import json

    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def assert_same_file(a: Path, b: Path) -> None:
    """Byte-identical (the header included: the writer serialises it canonically). On a difference,
    say where: the tensor data, which tensor entries, or which metadata keys."""
    ba, bb = a.read_bytes(), b.read_bytes()
    if ba == bb:
        return
    (ha, da), (hb, db) = _canonical(ba), _canonical(bb)
    ma, mb = ha.pop("__metadata__", {}), hb.pop("__metadata__", {})
    meta = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
    entries = sorted(k for k in set(ha) | set(hb) if ha.get(k) != hb.get(k))
    pytest.fail(f"{a} and {b} differ: metadata keys {meta[:6]}, tensor entries {entries[:6]}, "
                f"data section {'equal' if da == db else 'different'}, header bytes {'equal' if ba[:8] == bb[:8] else 'of different length'}")


def test_in_process_cancel_and_resume_matches_with_accumulation_flip_and_dropout(tiny_ckpt, shapes, tmp_path, monkeypatch):
    """Every stateful feature at once: EMA, grad accumulation, warm-up + cosine, LoRA dropout (global
    RNG), flip and caption dropout (per-sample generators), noise offset, min-SNR, TE training."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    kw = dict(steps=6, batch_size=2, grad_accum=2, ema=0.8, lr_scheduler="cosine", lr_warmup_steps=2,
              lora_dropout=0.2, flip=True, caption_dropout=0.3, noise_offset=0.05, min_snr_gamma=5.0,
              train_text_encoder=True, text_encoder_lr=5e-4, save_precision="fp32")
    whole = tiny_config(tiny_ckpt, shapes, tmp_path / "whole" / "face.safetensors", **kw)
    r_whole = train(whole)
    cut = tiny_config(tiny_ckpt, shapes, tmp_path / "cut" / "face.safetensors", **kw)
    done: list[int] = []
    r1 = train(cut, callbacks=TrainCallbacks(on_step=lambda s, t, l: done.append(s), should_stop=lambda: len(done) >= 4))
    assert r1.status == "cancelled" and r1.steps == 4
    cut.resume = True
    r2 = train(cut)
    assert r2.losses == r_whole.losses
    from facediffuser.trainer.kohya_format import load_kohya_lora

    tensors, meta = load_kohya_lora(cut.output_path)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in tensors)
    assert meta["ss_training_started_at"] == meta["ss_training_finished_at"] == str(float(EPOCH))
    assert_same_file(cut.output_path, whole.output_path)


FEATURES = ("--validation-split", "0.3", "--validation-every", "2", "--keep-best-validation", "--dora", "--optimizer",
            "prodigy", "--lr", "1", "--prodigy-d-coef", "2", "--buckets")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    from test_buckets import make_mixed

    return make_mixed(tmp_path_factory.mktemp("mixed") / "data")


def _features_cli(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "facediffuser.cli", "train", "--model", str(ckpt), "--data", str(data),
            "--output", str(out), "--steps", "6", "--save-every", "2", "--resolution", "128", "--rank", "4",
            "--seed", "5", "--batch-size", "2", "--lora-dropout", "0.1", "--flip", *FEATURES, *extra]


def test_sigkill_then_resume_is_byte_identical_with_validation_dora_prodigy_and_buckets(tiny_ckpt, mixed, tmp_path):
    """The same kill -9 / --resume as above with all four issue-13 features on: a held-out split evaluated
    every 2 steps (its curve continues, the best-step file is the same), DoRA, Prodigy (its estimate and
    sums live in the optimizer state), and three aspect-ratio buckets. (DoRA with LoCon and the text
    encoder resumes in the in-process test below.)"""
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole" / "face.safetensors"
    subprocess.run(_features_cli(tiny_ckpt, mixed, whole), env=env, check=True, capture_output=True, timeout=900)

    cut = tmp_path / "cut" / "face.safetensors"
    state = cut.with_name("face.state")
    proc = subprocess.Popen(_features_cli(tiny_ckpt, mixed, cut), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while not ck.checkpoint_dirs(state):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = ck.read_info(ck.latest_checkpoint(state))["global_step"]
    assert killed_at < 6 and not cut.exists()
    r = subprocess.run(_features_cli(tiny_ckpt, mixed, cut, "--resume"), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    print(f"killed after step {killed_at}")
    from facediffuser.trainer.kohya_format import load_kohya_lora

    tensors, meta = load_kohya_lora(cut)
    assert any(k.endswith(".dora_scale") for k in tensors) and meta["ss_enable_bucket"] == "True"
    assert len(json.loads(meta["ss_bucket_info"])["buckets"]) == 3
    assert [s for s, _ in json.loads(meta["facediffuser_validation_loss"])] == [0, 2, 4, 6]
    assert_same_file(cut, whole)
    assert_same_file(cut.with_name("face.best.safetensors"), whole.with_name("face.best.safetensors"))


def test_in_process_cancel_and_resume_matches_with_the_issue_13_features(tiny_ckpt, mixed, tmp_path, monkeypatch):
    """Cancelled at a step between validations, resumed: the same losses, validation curve and file."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    kw = dict(steps=4, resolution=128, batch_size=2, grad_accum=2, validation_split=0.3, validation_every=2,
              keep_best_validation=True, dora=True, conv_rank=2, train_text_encoder=True, optimizer="prodigy", lr=1.0,
              buckets=True, ema=0.8, lora_dropout=0.1, flip=True, save_precision="fp32")
    r_whole = train(tiny_config(tiny_ckpt, mixed, tmp_path / "whole" / "face.safetensors", **kw))
    cut = tiny_config(tiny_ckpt, mixed, tmp_path / "cut" / "face.safetensors", **kw)
    done: list[int] = []
    r1 = train(cut, callbacks=TrainCallbacks(on_step=lambda s, t, l: done.append(s), should_stop=lambda: len(done) >= 3))
    assert r1.status == "cancelled" and r1.steps == 3 and [s for s, _ in r1.validation] == [0, 2]
    cut.resume = True
    r2 = train(cut)
    assert r2.losses == r_whole.losses and r2.validation == r_whole.validation
    assert [s for s, _ in r2.validation] == [0, 2, 4]
    assert_same_file(cut.output_path, r_whole.output)


def test_resume_refuses_changed_settings_and_missing_state(tiny_ckpt, shapes, tmp_path):
    cfg = tiny_config(tiny_ckpt, shapes, tmp_path / "face.safetensors", steps=2, resume=True)
    with pytest.raises(UserError, match="no checkpoint"):
        train(cfg)
    cfg.resume = False
    train(cfg)  # finished: state kept for extending
    longer = tiny_config(tiny_ckpt, shapes, cfg.output_path, steps=3, resume=True)
    r = train(longer)  # more steps is allowed
    assert r.resumed_from == 2 and r.steps == 3
    changed = tiny_config(tiny_ckpt, shapes, cfg.output_path, steps=4, resume=True, lr=5e-4)
    with pytest.raises(UserError, match=r"settings differ.*lr: 0.001 -> 0.0005"):
        train(changed)
    # a setting that changes what is trained is refused, even one the old list let through: without
    # the latent cache the latent sample is drawn from the noise generator every step
    uncached = tiny_config(tiny_ckpt, shapes, cfg.output_path, steps=4, resume=True, no_cache=True)
    with pytest.raises(UserError, match=r"settings differ.*no_cache: False -> True"):
        train(uncached)
    # knobs that do not change the trajectory may change
    knobs = tiny_config(tiny_ckpt, shapes, cfg.output_path, steps=4, resume=True, gradient_checkpointing=True,
                        save_precision="fp32", save_every=1, sample_steps=3)
    r = train(knobs)
    assert r.resumed_from == 3 and r.steps == 4
    # a finished run's state is replaced by a fresh run (nothing unfinished is lost)
    again = tiny_config(tiny_ckpt, shapes, cfg.output_path, steps=2)
    r = train(again)
    assert r.resumed_from == 0 and [p.name for p in ck.checkpoint_dirs(again.state_path)] == ["step-00000002"]
    assert ck.read_info(r.checkpoint)["global_step"] == 2 and len(ck.read_info(r.checkpoint)["losses"]) == 2


def test_resume_check_follows_the_specs():
    """Every setting, changed alone: accepted on resume exactly when its spec says ``resumable``."""
    from facediffuser.trainer.config import TrainConfig, setting_specs
    from facediffuser.trainer.training_loop import _check_resume_compatible

    def other(spec):
        v = spec.default
        if spec.kind == "bool":
            return not v
        if spec.kind == "choice":
            return next(c for c in spec.choices if c != v)
        if spec.kind in ("int", "float"):
            return (spec.minimum or 0) + 1 if v is None else v + 1
        return (v or "") + "x"

    base = TrainConfig(model="m.safetensors", data="d", output="o.safetensors")
    info = {"config": base.to_dict(), "num_processes": 1}
    _check_resume_compatible(base, info, 1)
    for spec in setting_specs():
        changed = TrainConfig(**{**base.to_dict(), spec.name: other(spec)})
        if spec.resumable:
            _check_resume_compatible(changed, info, 1)
        else:
            with pytest.raises(UserError, match=rf"settings differ .*{spec.name}: "):
                _check_resume_compatible(changed, info, 1)
    resumable = {s.name for s in setting_specs() if s.resumable}
    assert "no_cache" not in resumable and {"steps", "epochs", "save_every", "output"} <= resumable


# --- the checkpoint store ------------------------------------------------------------------------

def _save(state_dir: Path, step: int, **kw) -> Path:
    p = torch.nn.Parameter(torch.full((2, 2), float(step)))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return ck.save_checkpoint(state_dir, info={"global_step": step, "losses": [1.0] * step}, adapter={"unet.w": p},
                              optimizer=opt.state_dict(), scheduler=sched.state_dict(), ema=None,
                              rng=[ck.capture_rng(torch.Generator().manual_seed(step))], **kw)


def test_checkpoints_are_atomic_and_only_the_newest_two_are_kept(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = d / f".tmp-step-00000009-{gone}"  # what a kill -9 during a save leaves behind
    stale.mkdir()
    (stale / "adapter.safetensors").write_bytes(b"half")
    live = d / f".tmp-step-00000009-{os.getppid()}-1-ab"  # a live writer's (another process): left alone
    live.mkdir()
    for step in (2, 4, 6):
        _save(d, step)
    assert [p.name for p in ck.checkpoint_dirs(d)] == ["step-00000004", "step-00000006"]
    assert not stale.exists() and live.is_dir() and ck.latest_checkpoint(d).name == "step-00000006"
    loaded = ck.load_checkpoint(d / "step-00000006")
    assert loaded.step == 6 and loaded.adapter["unet.w"].shape == (2, 2) and loaded.ema is None
    assert loaded.optimizer["state"][0]["step"].item() == 1
    assert _save(d, 6) == d / "step-00000006"  # same step again: kept as it is

    (d / "step-00000006" / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="damaged"):
        ck.load_checkpoint(d / "step-00000006")


def test_rng_states_round_trip_without_touching_the_global_generators(tmp_path):
    import numpy as np

    from facediffuser.rng import RNGStream

    noise, stream = torch.Generator().manual_seed(3), RNGStream(5)
    with stream:
        torch.rand(2)  # advance the stream past its start
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    caller = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    torch.save(ck.capture_rng(noise, stream), tmp_path / "rng.pt")
    with stream:
        expected = torch.rand(3)
    expected_noise = torch.rand(3, generator=noise)

    noise2, stream2 = torch.Generator().manual_seed(99), RNGStream(99)
    ck.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True), noise2, stream2)
    with stream2:
        got = torch.rand(3)
    assert torch.equal(got, expected) and torch.equal(torch.rand(3, generator=noise2), expected_noise)
    assert torch.equal(torch.get_rng_state(), caller[0]) and np.array_equal(np.random.get_state()[1], caller[1])
    assert random.getstate() == caller[2]  # capture, restore and the stream never touched the caller's


def test_a_stream_gives_the_numbers_of_a_seeded_script():
    """RNGStream(s) stands in for ``torch.manual_seed(s)`` (the trainer's init numbers are unchanged)."""
    from facediffuser.rng import RNGStream

    with RNGStream(1234):
        a = torch.rand(4)
        lin = torch.nn.Linear(3, 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        b = torch.rand(4)
        ref = torch.nn.Linear(3, 2)
    assert torch.equal(a, b) and torch.equal(lin.weight, ref.weight)
