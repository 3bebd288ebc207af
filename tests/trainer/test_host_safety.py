"""The trainer leaves its host process as it found it (it runs for days inside a ComfyUI server):
the host's random generators and global flags, accelerate's process-wide state. And the knobs that
must not change the result do not: gradient checkpointing, DataLoader workers, a warm cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from facediffuser.rng import RNGStream
from facediffuser.trainer import training_loop as tl
from facediffuser.trainer.training_loop import TrainCallbacks, train
from host_state import caller_draws, changes, seed_caller, snapshot
from test_training_loop import make_shapes, tiny_config

EPOCH = "1700000000"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data", n=4)


@pytest.fixture(scope="module")
def tiny_ckpt(sd15_tiny_checkpoint, tmp_path_factory) -> Path:
    return Path(shutil.copy2(sd15_tiny_checkpoint, tmp_path_factory.mktemp("ckpt") / "tiny-sd15.safetensors"))


@pytest.fixture
def reproducible(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)  # byte-identical files from runs at different times


def _cfg(ckpt: Path, data: Path, out: Path, **kw):
    # dropout draws from the global torch generator: the case where a leak would show
    base = dict(steps=3, batch_size=2, lora_dropout=0.1, flip=True, caption_dropout=0.3, save_precision="fp32")
    base.update(kw)
    return tiny_config(ckpt, data, out / "face.safetensors", **base)


# --- random generators -----------------------------------------------------------------------------

def test_training_and_resuming_leave_the_callers_generators_and_flags_alone(tiny_ckpt, shapes, tmp_path, reproducible):
    import matplotlib  # noqa: F401  (imports are the host's business: done before the snapshot)

    train(_cfg(tiny_ckpt, shapes, tmp_path / "warm-up", steps=1))
    seed_caller(123)
    expected = caller_draws()

    seed_caller(123)
    before = snapshot()
    train(_cfg(tiny_ckpt, shapes, tmp_path / "a", sample_every=2, sample_steps=1))  # + a sample grid and the loss plot
    assert changes(before, snapshot()) == {}
    assert caller_draws() == expected

    seed_caller(123)
    done: list[int] = []
    cut = _cfg(tiny_ckpt, shapes, tmp_path / "b")
    r1 = train(cut, callbacks=TrainCallbacks(on_step=lambda s, t, l: done.append(s), should_stop=lambda: len(done) >= 2))
    cut.resume = True
    r2 = train(cut)
    assert (r1.status, r2.status, r2.resumed_from) == ("cancelled", "finished", 2)
    assert caller_draws() == expected


def test_the_result_does_not_depend_on_the_callers_generators_or_on_a_warm_cache(tiny_ckpt, shapes, tmp_path, reproducible):
    """Before: the latent-cache DataLoader drew its worker seed from the global generator, so with
    LoRA dropout a run that built the cache and one that found it warm trained differently."""
    cfg = _cfg(tiny_ckpt, shapes, tmp_path / "x")
    seed_caller(1)
    cold = train(cfg).output.read_bytes()  # builds the latent cache
    seed_caller(2)
    warm = train(cfg).output.read_bytes()  # finds it (a finished run's state is replaced)
    assert cold == warm


def test_lora_init_and_dropout_come_from_the_runs_own_stream():
    """The adapter init draws what a script gets after ``torch.manual_seed(_mix(seed, 2))``."""
    seed_caller(5)
    with RNGStream(tl._mix(7, 2)):
        a = torch.nn.init.kaiming_uniform_(torch.empty(3, 4))
        mask = torch.nn.functional.dropout(torch.ones(8), 0.5, training=True)
    after = caller_draws()
    seed_caller(5)
    assert caller_draws() == after  # the caller's stream did not move
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tl._mix(7, 2))
        assert torch.equal(a, torch.nn.init.kaiming_uniform_(torch.empty(3, 4)))
        assert torch.equal(mask, torch.nn.functional.dropout(torch.ones(8), 0.5, training=True))


# --- accelerate's process-wide state ------------------------------------------------------------------

def _bf16_here() -> bool:
    return torch.cuda.is_available() or tl._cpu_has_bf16()


def test_two_trainings_with_different_mixed_precision_in_one_process(tiny_ckpt, shapes, tmp_path, reproducible):
    """Before: the second Accelerator raised "AcceleratorState has already been initialized and
    cannot be changed". Here: no, then bf16 (CPU autocast needs AVX-512 BF16), then no again."""
    if not _bf16_here():
        pytest.skip("bf16 needs a GPU or a CPU with AVX-512 BF16 here")
    from facediffuser.trainer.kohya_format import load_kohya_lora

    first = train(_cfg(tiny_ckpt, shapes, tmp_path / "fp32-1"))
    second = train(_cfg(tiny_ckpt, shapes, tmp_path / "bf16", mixed_precision="bf16"))
    third = train(_cfg(tiny_ckpt, shapes, tmp_path / "fp32-2"))
    assert (first.status, second.status, third.status) == ("finished",) * 3
    assert load_kohya_lora(second.output)[1]["ss_mixed_precision"] == "bf16"
    assert second.losses != first.losses  # bf16 really ran (other rounding)
    assert third.output.read_bytes() == first.output.read_bytes()


def test_an_accelerator_state_the_host_created_survives_a_training(tiny_ckpt, shapes, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    precision = "bf16" if _bf16_here() else "no"
    host = Accelerator(mixed_precision="no", gradient_accumulation_steps=3)
    try:
        saved = [dict(cls._shared_state) for cls in (PartialState, AcceleratorState, GradientState)]
        r = train(_cfg(tiny_ckpt, shapes, tmp_path / "h", mixed_precision=precision, steps=2))
        assert r.status == "finished"
        assert [dict(cls._shared_state) for cls in (PartialState, AcceleratorState, GradientState)] == saved
        assert host.state.mixed_precision == "no" and host.gradient_state.num_steps == 3
        assert AcceleratorState().mixed_precision == "no"  # the host's own view, unchanged
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# --- knobs that must not change the result -----------------------------------------------------------

def _loss_and_grads(ckpt: Path, data: Path, out: Path, *, checkpointing: bool):
    """One loss and its gradients through the trainer's own pieces (dropout on, LoRA B non-zero so
    that every adapter weight gets a gradient), and how often one checkpointed module ran."""
    from facediffuser.trainer.caching import build_train_data, collate_samples
    from facediffuser.trainer.dataset import check_dataset

    cfg = tiny_config(ckpt, data, out, lora_dropout=0.1, gradient_checkpointing=checkpointing)
    cpu = torch.device("cpu")
    models = tl._load_models(cfg, cpu, torch.float32)
    with RNGStream(tl._mix(cfg.seed, 2)):
        named = tl._add_lora_adapters(cfg, models)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in named.values():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    data = build_train_data(cfg, check_dataset(cfg), vae=models.vae, text_encoder=models.text_encoder,
                            tokenizer=models.tokenizer, progress=False)
    data.dataset.set_epoch(0)
    batch = collate_samples([data.dataset[i] for i in range(len(data.dataset))])
    probe = next(m for n, m in models.unet.named_modules() if n.endswith("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"))
    calls: list[int] = []
    probe.register_forward_hook(lambda *a: calls.append(1))
    models.unet.train()
    with RNGStream(99):  # dropout: the same stream in both runs
        loss = tl._diffusion_loss(cfg, models, batch, torch.Generator().manual_seed(5), "epsilon", cpu)
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in named.items()}, len(calls)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_ckpt, shapes, tmp_path):
    """Same loss bit for bit (the forward is the same); gradients within 1e-6 relative (the
    recomputed forward replays the dropout masks from its saved RNG state)."""
    loss0, grads0, calls0 = _loss_and_grads(tiny_ckpt, shapes, tmp_path / "a.safetensors", checkpointing=False)
    loss1, grads1, calls1 = _loss_and_grads(tiny_ckpt, shapes, tmp_path / "b.safetensors", checkpointing=True)
    assert (calls0, calls1) == (1, 2)  # checkpointing really recomputed the block in the backward pass
    assert loss1 == loss0
    assert set(grads1) == set(grads0)
    assert all(grads0[k].abs().max() > 0 for k in grads0)
    for k in grads0:
        torch.testing.assert_close(grads1[k], grads0[k], rtol=1e-6, atol=1e-9, msg=k)


@pytest.mark.parametrize("no_cache", [False, True], ids=["cached", "no-cache"])
def test_dataloader_workers_give_the_same_file(tiny_ckpt, shapes, tmp_path, reproducible, no_cache):
    """Worker processes get their seeds from the loader's own generator and every random choice is
    per (seed, epoch, image): 2 workers write the bytes 0 workers write."""
    files = []
    for workers in (0, 2):
        r = train(_cfg(tiny_ckpt, shapes, tmp_path / f"w{workers}", dataloader_workers=workers, no_cache=no_cache))
        files.append(r.output.read_bytes())
    assert files[0] == files[1]


# --- several processes (accelerate launch, gloo on CPU) ---------------------------------------------

def test_two_ranks_train_on_different_samples_and_average_their_gradients(tiny_ckpt, shapes, tmp_path):
    """``accelerate launch --num_processes 2``, 1 sample per rank: each rank sees its own sample,
    the optimizer on both ranks applies the same gradient, and that gradient is the mean of the
    two per-sample gradients, computed here in one process (= one process over the doubled
    batch with the same noise), within float32 summation-order error (rtol 1e-5, atol 1e-5 of the largest element). After the step
    both ranks hold identical weights, equal (rtol 1e-5) to one AdamW step, in this process,
    with that gradient. Two more trainings in the same launched processes write the same file: one after
    the first formed the process group (kept for it), one in a group the "host" formed, which
    survives it."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys

    from facediffuser.trainer.caching import build_train_data, collate_samples
    from facediffuser.trainer.dataset import check_dataset

    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate CLI not installed")
    # one latent cache for the ranks and the reference below (a VAE encode with another thread count
    # differs in the last bit)
    settings = dict(model=str(tiny_ckpt), data=str(shapes), output="unused.safetensors", cache_dir=str(tmp_path / "cache"), steps=2, batch_size=1,
                    resolution=64, rank=4, lr=1e-3, seed=7, max_grad_norm=0.0, save_precision="fp32")
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOURCE_DATE_EPOCH": EPOCH}
    # A free port of our own: torchrun's default 29500 is shared by every run on the machine, and a
    # second suite running this test at the same time would join (and hang) our process group.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    proc = subprocess.Popen([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
                             str(Path(__file__).with_name("ddp_probe.py")), str(tmp_path), str(tmp_path / "settings.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # a hung rank: take the launcher and both workers down, not just the launcher
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        assert f"rank {rank}: finished finished finished host-group-kept=True" in r.stdout, r.stdout
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert [x["world"] for x in ranks] == [2, 2] and all(x["group_left"] for x in ranks)
    first, second, third = (tmp_path / d / "face.safetensors" for d in ("first", "second", "third"))
    assert second.read_bytes() == first.read_bytes() == third.read_bytes()

    # the reference, in this process: the same model, adapter init, samples and noise
    from facediffuser.trainer.config import TrainConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count (OMP_NUM_THREADS=1): the same kernels, the same rounding
    try:
        cfg = TrainConfig(**{**settings, "output": str(tmp_path / "ref" / "face.safetensors")})
        cpu = torch.device("cpu")
        models = tl._load_models(cfg, cpu, torch.float32)
        with RNGStream(tl._mix(cfg.seed, 2)):
            named = tl._add_lora_adapters(cfg, models)
        data = build_train_data(cfg, check_dataset(cfg), vae=models.vae, text_encoder=models.text_encoder,
                                tokenizer=models.tokenizer, progress=False)
        view = tl._EpochView(data.dataset)
        models.unet.train()
        losses = []
        for rank in range(2):
            batch = collate_samples([view[k] for k in tl._BatchOrder(len(view), 1, cfg.seed, rank=rank, world=2).indices(0)])
            assert torch.equal(ranks[rank]["latents"][0], batch["latents"])  # rank r trained on its own sample
            noise = torch.Generator().manual_seed(tl._mix(cfg.seed, 1, rank))
            losses.append(tl._diffusion_loss(cfg, models, batch, noise, "epsilon", cpu))
        assert not torch.equal(ranks[0]["latents"][0], ranks[1]["latents"][0])
        params = list(named.values())
        per_sample = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
        mean = [(a + b) / 2 for a, b in zip(*per_sample)]

        g0, g1 = ranks[0]["grads"], ranks[1]["grads"]
        assert len(g0) == len(params)
        assert all(torch.equal(a, b) for a, b in zip(g0, g1))  # the same gradient on both ranks
        flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
        # float32 summation-order error scales with the largest terms summed, not with each element
        scale = float(flat(mean).abs().max())
        torch.testing.assert_close(flat(g0), flat(mean), rtol=1e-5, atol=1e-5 * scale)
        spread = (flat(per_sample[0]) - flat(per_sample[1])).abs().max()
        assert spread > 1e3 * (flat(g0) - flat(mean)).abs().max()  # not one rank's gradient: the mean

        w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
        assert all(torch.equal(a, b) for a, b in zip(w0, w1))  # identical weights on both ranks
        optimizer, _ = tl._make_optimizer(cfg, named, 2)
        for p, g in zip(params, g0):  # the ranks' gradient (= the mean, above): Adam's g/sqrt(v) would blow
            p.grad = g.clone()          # up the last-bit differences of near-zero elements
        optimizer.step()
        torch.testing.assert_close(flat(w0), flat([p.detach() for p in params]), rtol=1e-5, atol=1e-7)
    finally:
        torch.set_num_threads(threads)


# --- temp files and logging ---------------------------------------------------------------------------

def test_two_threads_saving_the_same_checkpoint_both_succeed(tmp_path):
    """Before: both used ``.tmp-step-<step>-<pid>``, so one deleted or renamed the other's folder."""
    import threading

    from facediffuser.trainer import checkpointing as ck
    from test_resume import _save

    errors: list[BaseException] = []
    paths: list[Path] = []
    start = threading.Barrier(2)

    def save() -> None:
        start.wait()
        try:
            paths.append(_save(tmp_path, 4))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert paths == [tmp_path / "step-00000004"] * 2
    assert ck.load_checkpoint(paths[0]).step == 4
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000004"]


def test_the_library_logs_and_the_cli_decides_what_to_show(tiny_ckpt, shapes, tmp_path, capsys, caplog):
    import logging

    from facediffuser import cli
    from facediffuser.trainer.config import config_from_args

    out = tmp_path / "face.safetensors"
    flags = ["--model", str(tiny_ckpt), "--data", str(shapes), "--output", str(out), "--resolution", "64", "--rank", "4"]
    parse = lambda *extra: config_from_args(cli.build_parser().parse_args(["train", *flags, *extra]))  # noqa: E731
    train(parse("--steps", "1"))
    with caplog.at_level(logging.INFO, logger="facediffuser"):
        train(parse("--steps", "2", "--resume"))
    assert [r.name for r in caplog.records if r.getMessage().startswith("resuming from")] == ["facediffuser.trainer"]
    assert "resuming from" not in capsys.readouterr().err  # a library call prints nothing of its own

    assert cli.main(["train", *flags, "--steps", "3", "--resume"]) == 0
    assert f"facediffuser train: resuming from {out.with_name('face.state') / 'step-00000002'} (step 2/3)" in capsys.readouterr().err
    logger = logging.getLogger("facediffuser")
    assert (logger.handlers, logger.level, logger.propagate) == ([], logging.NOTSET, True)  # the CLI's handler is gone
