"""The training loop: ``train(config) -> TrainResult``.

:func:`train` reads top to bottom — check, load, wrap, data, optimise, loop, save — and each stage
is a function below it that does one thing. The parts worth knowing before changing anything:

* **Timesteps** are drawn uniformly over the *full* training schedule (1000 steps for SD), with the
  checkpoint's own betas. (The seed project rebuilt the scheduler with 500 steps, which mislabels
  every noise level and never trains the noisiest quarter.)
* **Determinism.** Adapter init, data order, noise and timesteps are functions of ``config.seed``:
  data order is a seeded permutation per epoch (no global RNG), noise and timesteps come from one
  dedicated CPU ``torch.Generator`` per process, and flip / latent sampling / caption dropout from
  a generator per (seed, epoch, image) (:func:`.caching.sample_generator`). Same seed, same settings -> the same file, bit for bit, on CPU.
  The host's global generators are never reseeded: peft's adapter init and dropout, which draw
  from the global torch generator, run inside the run's own seeded :class:`..rng.RNGStream`, and
  the caller gets its generators back as they were (:func:`..rng.preserve_global_rng`).
* **Resume.** A checkpoint (:mod:`.checkpointing`) holds adapter, optimizer, lr scheduler, EMA,
  every RNG state, the step, the loss history and the run's start time. Resuming continues the
  exact trajectory: a run killed with SIGKILL and resumed writes the same bytes as one that never
  stopped.
* **Timestamps.** The metadata's ``ss_training_started_at`` is stored in the state (a resumed run
  reports when training really began); ``ss_training_finished_at`` is the export time. When the
  environment sets ``SOURCE_DATE_EPOCH`` (the reproducible-builds convention) both are that value,
  so two runs at different times give byte-identical files.
* **Several processes** (``accelerate launch --multi_gpu --num_processes N``; gloo without CUDA): each rank trains on its own slice
  of every batch, gradients are averaged by DDP, and only the main process writes files.
* **Stopping.** ``callbacks.should_stop()`` is checked before every step: the run saves a checkpoint
  at that step boundary, writes no LoRA, and returns ``status="cancelled"``. A non-finite loss stops
  with :class:`NonFiniteLoss` before it can touch the weights; the last good checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

from ..errors import UserError
from .config import TrainConfig, setting_specs

log = logging.getLogger("facediffuser.trainer")  # the CLI shows INFO as "facediffuser train: ..."

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from .dataset import DatasetScan


# --- public types -----------------------------------------------------------------------------

@dataclass
class TrainCallbacks:
    """Hooks for a front end (the ComfyUI node): progress, cancellation, fresh sample grids.

    ``on_step(step, total, loss)`` after every optimizer step; ``should_stop()`` before every step;
    ``on_sample(step, png_path)`` after each sample grid is written; ``on_train_start()`` once,
    after the models, caches and base validation are set up and before the first step (the
    ``facediffuser train`` command sets up its own process's allocator there)."""

    on_step: Callable[[int, int, float], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_sample: Callable[[int, Path], None] | None = None
    on_train_start: Callable[[], None] | None = None


@dataclass
class TrainResult:
    """What a run produced. ``output`` is None unless ``status == "finished"``."""

    status: Literal["finished", "cancelled"]
    output: Path | None
    steps: int  # optimizer steps done (including those before a resume)
    total_steps: int
    final_loss: float | None
    losses: list[float]  # one per optimizer step, from step 1
    loss_plot: Path | None = None
    checkpoint: Path | None = None  # the last training-state folder (for --resume)
    samples: list[Path] = field(default_factory=list)
    seconds: float = 0.0  # wall time of this call
    resumed_from: int = 0  # the step this call started at
    is_main_process: bool = True
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss), from step 0
    best_output: Path | None = None  # --keep-best-validation's file

    def summary(self) -> str:
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        val = ""
        if self.validation:
            best = min(self.validation, key=lambda sl: (sl[1], sl[0]))
            val = f", validation loss {self.validation[-1][1]:.4f} (best {best[1]:.4f} at step {best[0]})"
        if self.status == "finished":
            return f"wrote {self.output} ({self.steps} steps, final loss {loss}{val}, {self.seconds:.1f}s)"
        return (f"cancelled at step {self.steps}/{self.total_steps}: no LoRA written; "
                f"training state kept in {self.checkpoint} (continue with --resume)")


class NonFiniteLoss(UserError):
    """The loss became NaN/inf: training stops before the bad step touches the weights."""


# --- the loop -----------------------------------------------------------------------------------

def train(config: TrainConfig, *, callbacks: TrainCallbacks | None = None) -> TrainResult:
    """Train a LoRA as ``config`` says and write it (kohya format) to ``config.output``.

    The host process is left as it was found: its random generators (the run draws from its own
    seeded streams) and accelerate's process-wide state (so the next run may use another
    mixed precision)."""
    from ..rng import preserve_global_rng

    with preserve_global_rng(), _accelerate_state_for_this_run():
        return _train(config, callbacks=callbacks)


def _train(config: TrainConfig, *, callbacks: TrainCallbacks | None = None) -> TrainResult:
    import torch

    from ..rng import RNGStream

    t0 = time.perf_counter()
    callbacks = callbacks or TrainCallbacks()
    config.validate()
    if config.optimizer == "prodigy":
        _import_prodigy()  # a missing package fails before the data check and the models, not after
    _check_writable(config)  # before the data check and any model or cache: a bad --output fails in a second
    scan = _check_dataset(config)  # before any model is loaded: bad data fails in a second
    scan, held_out = _split_validation(config, scan)  # held-out images never reach the training data
    accelerator = _make_accelerator(config)
    world, rank = accelerator.num_processes, accelerator.process_index
    resume_from = _find_resume_checkpoint(config, world)
    if resume_from is None and accelerator.is_main_process:
        _clear_finished_state(config)
    accelerator.wait_for_everyone()

    models = _load_models(config, accelerator.device, _weight_dtype(config))
    prediction_type = _prediction_type(config, models)
    # peft's LoRA init and dropout draw from the global torch generator: this run's own seeded
    # stream stands in for it (same stream on every rank, as a seeded script would have it).
    torch_rng = RNGStream(_mix(config.seed, 2), devices=[accelerator.device])
    with torch_rng:
        named = _add_lora_adapters(config, models)  # {"unet.<path>.lora_A.default.weight": param, ...}
    _lean_lora_forward(config, models)
    params = list(named.values())
    data = _build_training_data(config, scan, models, accelerator)
    validation = _build_validation(config, held_out, models, accelerator)
    order = _batch_order(config, data, rank, world)
    total_steps = _total_steps(config, len(data.images), world, getattr(order, "micro_batches_per_epoch", None))
    optimizer, lr_scheduler = _make_optimizer(config, named, total_steps)
    ema = _make_ema(config, params)

    if config.train_text_encoder:
        models.unet, models.text_encoder, optimizer = accelerator.prepare(models.unet, models.text_encoder, optimizer)
    else:
        models.unet, optimizer = accelerator.prepare(models.unet, optimizer)

    step_unet = _compiled_unet(config, models.unet)
    noise_gen = torch.Generator().manual_seed(_mix(config.seed, 1, rank))
    run = _RunState(started_at=_now(), world=world)
    if resume_from is not None:
        _restore_checkpoint(resume_from, run, named, optimizer, lr_scheduler, ema, noise_gen, torch_rng, rank, accelerator)
        _print_main(accelerator, f"resuming from {resume_from} (step {run.global_step}/{total_steps})")
    start_step = run.global_step

    _start_trackers(config, accelerator)
    batches = _batches(config, data, order, start=start_step * config.grad_accum, pin_memory=accelerator.device.type == "cuda")
    progress = _progress_bar(accelerator, total_steps, start_step)
    samples: list[Path] = []
    status: Literal["finished", "cancelled"] = "finished"
    models.unet.train()
    if config.train_text_encoder:
        models.text_encoder.train()
    hook = _ValidationHook(config, validation, models, ema, params, accelerator, prediction_type, data, run, total_steps)
    if start_step == 0:
        hook.evaluate()  # the base model's held-out loss: where the curve starts
    if callbacks.on_train_start is not None:
        callbacks.on_train_start()

    while run.global_step < total_steps:
        if _should_stop(callbacks, accelerator):
            status = "cancelled"
            break
        step_loss = 0.0
        for _ in range(config.grad_accum):
            batch = next(batches)
            with accelerator.accumulate(*_trained(models, config)):
                with torch_rng:  # dropout (the backward of a checkpointed block replays its state itself)
                    loss = _diffusion_loss(config, models, batch, noise_gen, prediction_type, accelerator.device, unet=step_unet)
                mean_loss = float(accelerator.gather(loss.detach().reshape(1)).mean())
                if not math.isfinite(mean_loss):
                    _stop_non_finite(config, accelerator, run, mean_loss, progress)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += mean_loss / config.grad_accum
        lr_scheduler.step()
        if ema is not None:
            ema.step(params)
        run.global_step += 1
        run.losses.append(step_loss)
        if hook.due(run.global_step):
            hook.evaluate()

        progress.update(1)
        lr_now = _current_lr(optimizer, lr_scheduler)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_now:.2e}", **hook.postfix())
        accelerator.log({"loss": step_loss, "lr": lr_now}, step=run.global_step)
        if callbacks.on_step is not None:
            callbacks.on_step(run.global_step, total_steps, step_loss)
        if config.sample_every and run.global_step % config.sample_every == 0 and run.global_step < total_steps:
            samples += _write_samples(config, models, ema, params, accelerator, run.global_step, callbacks)
        if config.save_every and run.global_step % config.save_every == 0 and run.global_step < total_steps:
            run.last_checkpoint = _save_checkpoint(config, accelerator, run, named, optimizer, lr_scheduler, ema, noise_gen, torch_rng)
    progress.close()

    # The end: a final checkpoint (to extend later with --resume --steps N, or to resume a cancel),
    # then, only when finished, the LoRA file, the loss curve and a last sample grid.
    run.last_checkpoint = _save_checkpoint(config, accelerator, run, named, optimizer, lr_scheduler, ema, noise_gen,
                                           torch_rng, finished=status == "finished")
    output = loss_plot = None
    if status == "finished":
        if config.sample_every:
            samples += _write_samples(config, models, ema, params, accelerator, run.global_step, callbacks)
        output = _export_lora(config, accelerator, models, ema, params, data, run, total_steps, prediction_type,
                              validation=validation)
    if accelerator.is_main_process:
        loss_plot = _write_loss_plot(config, run, finished=status == "finished")
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it also destroys a host's process group
        tracker.finish()
    return TrainResult(
        status=status, output=output, steps=run.global_step, total_steps=total_steps,
        final_loss=run.losses[-1] if run.losses else None, losses=list(run.losses), loss_plot=loss_plot,
        checkpoint=run.last_checkpoint, samples=samples, seconds=time.perf_counter() - t0,
        resumed_from=start_step, is_main_process=accelerator.is_main_process,
        validation=[tuple(v) for v in run.validation], best_output=hook.best_file,
    )


# --- state of one run ---------------------------------------------------------------------------

@dataclass
class _RunState:
    started_at: float
    world: int
    global_step: int = 0
    losses: list[float] = field(default_factory=list)
    last_checkpoint: Path | None = None
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)


def _now() -> float:
    """Wall time, or ``SOURCE_DATE_EPOCH`` when set (reproducible builds: byte-identical files)."""
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if sde:
        try:
            return float(int(sde))
        except ValueError:
            raise UserError(f"SOURCE_DATE_EPOCH must be an integer (seconds since 1970), got {sde!r}") from None
    return float(int(time.time()))


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (seed, purpose, rank, step ...), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _print_main(accelerator: "Accelerator", message: str) -> None:
    if accelerator.is_main_process:
        log.info("%s", message)


# --- stage: checks and set-up -----------------------------------------------------------------

def _check_writable(config: TrainConfig) -> None:
    """The output folder (created if missing) must take a file, and the state and cache folders
    must be creatable: found out now, not after the cache build or at the end of the run."""
    import tempfile

    out = config.output_path
    if out.is_dir():
        raise UserError(f"--output {out} is a folder: give a file name ending in .safetensors")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise UserError(f"--output {out}: cannot write to {out.parent} ({exc.strerror or type(exc).__name__})") from None
    for flag, folder in (("--state-dir", config.state_path), ("--cache-dir", config.cache_path)):
        existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            why = "is not a folder" if not existing.is_dir() else "is not writable"
            raise UserError(f"{flag} {folder}: cannot create or write it ({existing} {why})")


def _check_dataset(config: TrainConfig) -> "DatasetScan":
    from .dataset import check_dataset

    scan = check_dataset(config)
    for line in scan.report_lines():
        log.info("%s", line)
    return scan


def _make_accelerator(config: TrainConfig) -> "Accelerator":
    import torch
    from accelerate import Accelerator

    if config.mixed_precision != "no" and not torch.cuda.is_available():
        _check_cpu_mixed_precision(config.mixed_precision)
    log_with = None
    if config.logging_dir:
        try:
            import tensorboard  # noqa: F401
            log_with = "tensorboard"
        except ImportError:
            log.warning("--logging-dir ignored: tensorboard is not installed (pip install tensorboard)")
    # Several processes without CUDA (``accelerate launch --multi_gpu --num_processes N`` or torchrun
    # on a CPU machine): accelerate only forms a gloo (MULTI_CPU) group when told cpu=True.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                       log_with=log_with, project_dir=config.logging_dir if log_with else None, cpu=cpu_ddp)


@contextmanager
def _accelerate_state_for_this_run() -> Iterator[None]:
    """accelerate keeps one process-wide ``AcceleratorState`` (a Borg: every instance shares one
    dict) and refuses a second ``Accelerator`` with another mixed precision. A long-lived host trains
    many times, so each run gets a fresh ``AcceleratorState``/``GradientState`` and the host gets
    back exactly what it had (nothing, or its own state) when the run ends.

    ``PartialState`` (device, rank) holds no training setting: a host's is reused and survives the
    run; one the run created without a process group is dropped again. A process group the run
    formed (the CLI under ``accelerate launch``) is kept with its ``PartialState`` for the next run
    in that process, as accelerate itself does: destroying it and forming it again on the same
    rendezvous was flaky (gloo's reconnect raced the other rank and hung or was refused)."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState, PartialState

    group_before = dist.is_available() and dist.is_initialized()
    shared = [cls._shared_state for cls in (PartialState, AcceleratorState, GradientState)]
    saved = [dict(d) for d in shared]
    AcceleratorState._shared_state.clear()
    GradientState._shared_state.clear()
    try:
        yield
    finally:
        formed = not group_before and dist.is_available() and dist.is_initialized()
        for d, s in zip(shared, saved):
            if formed and d is PartialState._shared_state:
                continue  # the group the run formed, and the state that describes it, stay
            d.clear()
            d.update(s)


def _cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX-512 BF16 or AMX); elsewhere oneDNN emulates bf16."""
    import torch

    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def _check_cpu_mixed_precision(mode: str) -> None:
    """bf16 on a CPU only where it has bf16 arithmetic: elsewhere it is emulated and slower than
    fp32. fp16 on a CPU: no."""
    if mode == "fp16":
        raise UserError("--mixed-precision fp16 needs a GPU; on a CPU use --mixed-precision bf16 (with AVX-512 BF16 or AMX) or no")
    if not _cpu_has_bf16():
        raise UserError("--mixed-precision bf16 on this CPU: it has no bf16 arithmetic (AVX-512 BF16 or AMX), so bf16 would be "
                        "emulated and slower than fp32; use --mixed-precision no (or a GPU)")


def _weight_dtype(config: TrainConfig) -> "torch.dtype":
    """The frozen base weights' dtype; the LoRA weights stay float32 (see _add_lora_adapters)."""
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]


def _find_resume_checkpoint(config: TrainConfig, world: int) -> Path | None:
    """The checkpoint to continue from, or None for a fresh run.

    A fresh run refuses to start over an unfinished run's state (that would lose it); the state of a
    finished run is replaced."""
    from .checkpointing import latest_checkpoint, read_info

    latest = latest_checkpoint(config.state_path)
    if config.resume:
        if latest is None:
            raise UserError(f"--resume: no checkpoint in {config.state_path} (nothing to resume; drop --resume to start)")
        info = read_info(latest)
        _check_resume_compatible(config, info, world)
        return latest
    if latest is not None and not read_info(latest).get("finished"):
        raise UserError(f"{config.state_path} holds an unfinished run (step {read_info(latest).get('global_step')}): "
                        "pass --resume to continue it, or delete that folder to start over")
    return None


def _clear_finished_state(config: TrainConfig) -> None:
    """A fresh run over a finished run's state: drop the old checkpoints, so that "the newest" and
    the keep-two rotation only ever see this run's."""
    import shutil

    from .checkpointing import checkpoint_dirs

    for old in checkpoint_dirs(config.state_path):
        shutil.rmtree(old, ignore_errors=True)


def _check_resume_compatible(config: TrainConfig, info: dict[str, Any], world: int) -> None:
    """Only settings marked ``resumable`` in :mod:`.config` may differ from the checkpoint's."""
    saved = info.get("config", {})
    now = config.to_dict()
    changed = [s.name for s in setting_specs() if not s.resumable and s.name in saved and saved[s.name] != now[s.name]]
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed[:4])
        raise UserError(f"--resume: settings differ from the checkpoint's ({details}); use the same settings or start a new run")
    if int(info.get("num_processes", 1)) != world:
        raise UserError(f"--resume: the checkpoint was made with {info.get('num_processes')} process(es), "
                        f"this run has {world}; resume with the same number")


def _total_steps(config: TrainConfig, n_images: int, world: int, micro_batches_per_epoch: int | None = None) -> int:
    """--steps, or enough optimizer steps to see every image ``--epochs`` times (with buckets: to
    draw every bucket's batches of an epoch ``--epochs`` times)."""
    if config.epochs is None:
        return config.steps
    if micro_batches_per_epoch is not None:
        return max(1, math.ceil(config.epochs * micro_batches_per_epoch / config.grad_accum))
    per_step = config.batch_size * config.grad_accum * world
    return max(1, math.ceil(config.epochs * n_images / per_step))


# --- stage: models and adapters -----------------------------------------------------------------

def _load_models(config: TrainConfig, device: "torch.device", dtype: "torch.dtype") -> Any:
    """All components; the VAE stays float32 (fp16 VAEs overflow into black images)."""
    import torch

    from ..sd.model_loading import load_components

    models = load_components(config.model, dtype=dtype, device=device)
    if models.vae.dtype != torch.float32:
        models.vae.to(dtype=torch.float32)
    for m in (models.unet, models.vae, models.text_encoder):
        m.requires_grad_(False)
    models.vae.eval()
    models.text_encoder.eval()
    return models


def _prediction_type(config: TrainConfig, models: Any) -> str:
    return models.prediction_type if config.prediction_type == "auto" else config.prediction_type


def _add_lora_adapters(config: TrainConfig, models: Any) -> dict[str, "torch.nn.Parameter"]:
    """Freeze the base, add kohya's LoRA set (UNet, and the text encoder if asked) with a seeded
    init, or the adapter of ``--init-lora``. Returns the trainable (float32) parameters by name,
    ``unet.<module>...`` / ``text_encoder.<module>...``, in model order (the optimizer's order)."""
    import torch
    from diffusers.training_utils import cast_training_params

    from . import lora_targets

    init = _read_init_lora(config) if config.init_lora else None
    if init is None:
        unet_cfg = lora_targets.unet_lora_config(models.unet, rank=config.rank, alpha=config.alpha, dropout=config.lora_dropout,
                                                 conv_rank=config.conv_rank, conv_alpha=config.conv_alpha, use_dora=config.dora)
    else:
        unet_cfg = lora_targets.lora_config_from_modules(init.unet_ranks, init.unet_alphas, dropout=config.lora_dropout,
                                                         use_dora=init.dora)
    models.unet.add_adapter(unet_cfg)
    trained = [models.unet]
    if config.train_text_encoder:
        if init is None or not init.text_encoder:
            te_cfg = lora_targets.text_encoder_lora_config(models.text_encoder, rank=config.rank, alpha=config.alpha,
                                                           dropout=config.lora_dropout, use_dora=config.dora if init is None else init.dora)
        else:
            te_cfg = lora_targets.lora_config_from_modules(init.text_encoder_ranks, init.text_encoder_alphas,
                                                           dropout=config.lora_dropout, use_dora=init.dora)
        _inject(models.text_encoder, te_cfg)
        trained.append(models.text_encoder)
    if init is not None:
        _load_init_weights(config, models, init)
    cast_training_params(trained, dtype=torch.float32)
    if config.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            models.text_encoder.gradient_checkpointing_enable()
    named = {f"{prefix}.{name}": p for prefix, m in zip(("unet", "text_encoder"), trained)
             for name, p in m.named_parameters() if p.requires_grad}
    if not named:
        raise UserError("no trainable LoRA parameters: the adapter targets no module of this model")
    return named


def _lean_lora_forward(config: TrainConfig, models: Any) -> None:
    """The trained models' LoRA layers compute ``base + scale * B(A x)`` as one fused GEMM
    (:mod:`.lora_forward`): the same function, fewer passes over the activations."""
    from .lora_forward import enable_lean_forward

    for model in _trained(models, config):
        enable_lean_forward(model)


def _compiled_unet(config: TrainConfig, unet: Any) -> Any:
    """The UNet the step calls: ``torch.compile`` of it with ``--compile`` (sharing its
    parameters, so saving, sampling and the export keep using the plain module), else itself."""
    if not config.compile:
        return unet
    import torch

    return torch.compile(unet)


def _inject(model: "torch.nn.Module", lora_config: Any) -> None:
    """Add a peft LoRA adapter in place (the model keeps its class, so pipelines still take it)."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config, model, adapter_name="default")


def _read_init_lora(config: TrainConfig) -> Any:
    from .kohya_format import kohya_to_peft, load_kohya_lora

    tensors, _ = load_kohya_lora(config.init_lora)
    init = kohya_to_peft(tensors, source=Path(config.init_lora).name)
    if not init.unet:
        raise UserError(f"--init-lora {config.init_lora}: it has no UNet modules")
    if init.text_encoder and not config.train_text_encoder:
        log.warning("--init-lora has text-encoder modules; they are not trained (no --train-text-encoder) and not saved")
    if init.dora != config.dora:
        log.warning("--init-lora is %s file: training continues as %s (%s --dora makes no difference)",
                    "a DoRA" if init.dora else "a plain LoRA", "DoRA" if init.dora else "plain LoRA",
                    "without" if init.dora else "with")
    return init


def _load_init_weights(config: TrainConfig, models: Any, init: Any) -> None:
    from peft import set_peft_model_state_dict

    for model, sd, what in ((models.unet, init.unet, "UNet"),
                            (models.text_encoder, init.text_encoder if config.train_text_encoder else {}, "text-encoder")):
        if not sd:
            continue
        result = set_peft_model_state_dict(model, sd, adapter_name="default")
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise UserError(f"--init-lora {config.init_lora}: {len(missing)} {what} module(s) do not exist in this model, e.g. {missing[0]}")


def _trained(models: Any, config: TrainConfig) -> tuple:
    return (models.unet, models.text_encoder) if config.train_text_encoder else (models.unet,)


# --- stage: data --------------------------------------------------------------------------------

class _BatchOrder:
    """Which images micro-batch ``m`` of rank ``r`` trains on: a function of (seed, m, r) only.

    The images form one stream, epoch after epoch, each epoch a seeded permutation; micro-batch
    ``m`` takes ``world`` consecutive slices of ``batch_size``, one per rank. No sampler state, so a
    resume needs nothing but the step number."""

    def __init__(self, n: int, batch_size: int, seed: int, *, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        import torch

        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(_mix(self.seed, 3, epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return self._perms[epoch]

    def indices(self, m: int) -> list[tuple[int, int]]:
        """``[(epoch, image index), ...]`` of micro-batch ``m`` on this rank."""
        start = (m * self.world + self.rank) * self.batch_size
        return [(p // self.n, self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.batch_size)]

    def iterate(self, start: int) -> Any:
        """Micro-batches ``start, start+1, ...`` (a DataLoader ``batch_sampler``)."""
        m = start
        while True:
            yield self.indices(m)
            m += 1

    def epoch(self, m: int) -> int:
        """The (0-based) epoch micro-batch ``m`` ends in."""
        return ((m + 1) * self.world * self.batch_size - 1) // self.n


def _build_training_data(config: TrainConfig, scan: "DatasetScan", models: Any, accelerator: "Accelerator") -> Any:
    """Latents (cached unless --no-cache) and text conditioning (cached unless the text encoder
    trains or tags are shuffled): :func:`.caching.build_train_data`. Rank 0 fills the caches first,
    the other ranks then read them."""
    from .caching import build_train_data

    with accelerator.main_process_first():
        data = build_train_data(config, scan, vae=models.vae, text_encoder=models.text_encoder,
                                tokenizer=models.tokenizer, progress=accelerator.is_main_process)
    for line in data.skipped:
        _print_main(accelerator, f"skipped {line}")
    return data


def _split_validation(config: TrainConfig, scan: "DatasetScan") -> tuple["DatasetScan", "DatasetScan | None"]:
    """--validation-split / --validation-data: the images held out of training (:mod:`.validation`)."""
    from .validation import split_validation

    scan, held_out = split_validation(config, scan)
    if held_out is not None:
        for line in held_out.report_lines():
            log.info("validation: %s", line)
        log.info("%d training image(s), %d held out for validation", len(scan.images), len(held_out.images))
    return scan, held_out


def _build_validation(config: TrainConfig, held_out: "DatasetScan | None", models: Any, accelerator: "Accelerator") -> Any:
    """The held-out set with its fixed noise, through the same caches (rank 0 fills them first)."""
    if held_out is None:
        return None
    from .validation import build_validation_set

    with accelerator.main_process_first():
        return build_validation_set(config, held_out, models, progress=accelerator.is_main_process)


def _batch_order(config: TrainConfig, data: Any, rank: int, world: int) -> Any:
    """Batches within one aspect-ratio bucket when the images fall in several (:mod:`.buckets`);
    with one bucket (square crops) the plain order, so square data trains the same either way."""
    from .buckets import BucketBatchOrder

    plan = getattr(data, "buckets", None)
    if plan is None or len(plan.buckets) <= 1:
        return _BatchOrder(len(data.images), config.batch_size, config.seed, rank=rank, world=world)
    order = BucketBatchOrder(list(plan.buckets.values()), config.batch_size, config.seed, rank=rank, world=world)
    data.micro_batches_per_epoch = order.micro_batches_per_epoch
    return order


class _ValidationHook:
    """The held-out loss at step 0, every ``--validation-every`` steps and at the last step: logged
    (logging, tqdm, trackers), kept in the run state (a resumed curve continues) and, with
    ``--keep-best-validation``, the best step's adapter written beside the output. A no-op
    without a validation set."""

    def __init__(self, config: TrainConfig, validation: Any, models: Any, ema: Any, params: list,
                 accelerator: "Accelerator", prediction_type: str, data: Any, run: _RunState, total_steps: int) -> None:
        self.config, self.validation, self.models, self.ema, self.params = config, validation, models, ema, params
        self.accelerator, self.prediction_type, self.data, self.run = accelerator, prediction_type, data, run
        self.total_steps = total_steps
        self.best_file: Path | None = None
        if validation is not None and config.keep_best_validation:  # resumed: the file of the best step so far
            from .validation import best_path

            self.best_file = best_path(config) if self._best_trained() is not None and best_path(config).is_file() else None

    def _best_trained(self) -> tuple[int, float] | None:
        """The best validation among trained steps (step 0 is the base model: no adapter to keep)."""
        from .validation import best_of

        return best_of([h for h in self.run.validation if h[0] > 0])

    def due(self, step: int) -> bool:
        return self.validation is not None and (step % self.config.validation_every == 0 or step == self.total_steps)

    def postfix(self) -> dict[str, str]:
        return {"val": f"{self.run.validation[-1][1]:.4f}"} if self.run.validation else {}

    def evaluate(self) -> None:
        """Evaluate now (every rank: the work is shared and reduced) unless this step already has its value."""
        from .validation import best_of, best_path, report

        step = self.run.global_step
        if self.validation is None or (self.run.validation and self.run.validation[-1][0] == step):
            return
        accelerator = self.accelerator
        with _ema_weights(self.ema, self.params):
            loss = self.validation.loss(self.config, accelerator.unwrap_model(self.models.unet),
                                        accelerator.unwrap_model(self.models.text_encoder), self.models.noise_scheduler,
                                        self.prediction_type, accelerator)
        before = self._best_trained()
        self.run.validation.append((step, loss))
        if accelerator.is_main_process:
            report(step, loss, best_of(self.run.validation))
        accelerator.log({"val_loss": loss}, step=step)
        if self.config.keep_best_validation and step > 0 and (before is None or loss < before[1]):
            self.best_file = _export_lora(self.config, accelerator, self.models, self.ema, self.params, self.data, self.run,
                                          self.total_steps, self.prediction_type, validation=self.validation,
                                          output=best_path(self.config))


class _EpochView:
    """The dataset addressed by ``(epoch, index)``: each sample's random choices (flip, latent
    noise, caption dropout) are a function of (seed, epoch, index), wherever the batch falls."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


def _batches(config: TrainConfig, data: Any, order: _BatchOrder, start: int, *, pin_memory: bool = False) -> Any:
    """An endless iterator of collated batches from micro-batch ``start`` on (DataLoader workers
    when asked). Its own generator: creating it never draws from the global RNG.

    On CUDA the batches come in pinned (page-locked) memory, so the loop's ``.to(device,
    non_blocking=True)`` copies are asynchronous: a cached batch is a few hundred KB per sample
    (latents + text states), copied while the GPU is still busy with the previous step."""
    import torch

    from .caching import collate_samples

    loader = torch.utils.data.DataLoader(
        _EpochView(data.dataset), batch_sampler=order.iterate(start), num_workers=config.dataloader_workers,
        collate_fn=collate_samples, generator=torch.Generator().manual_seed(_mix(config.seed, 5, start)),
        persistent_workers=False, pin_memory=pin_memory,
    )
    return iter(loader)


def _conditioning(config: TrainConfig, models: Any, batch: dict[str, Any], device: "torch.device") -> "torch.Tensor":
    """Cached text-encoder states, or the text encoder run now (with gradients when it trains)."""
    import torch

    from .caching import encode_text

    if "encoder_hidden_states" in batch:
        return batch["encoder_hidden_states"].to(device, non_blocking=True)
    with nullcontext() if config.train_text_encoder else torch.no_grad():
        return encode_text(models.text_encoder, batch["input_ids"].to(device))


def _latents(models: Any, batch: dict[str, Any], device: "torch.device", gen: "torch.Generator") -> "torch.Tensor":
    """Cached (already sampled and scaled) latents, or the VAE run now (--no-cache)."""
    import torch

    if "latents" in batch:
        return batch["latents"].to(device, non_blocking=True)
    vae = models.vae
    with torch.no_grad():
        dist = vae.encode(batch["pixel_values"].to(device=device, dtype=next(vae.parameters()).dtype, non_blocking=True)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=gen, dtype=torch.float32).to(device)
        z = dist.mean.float() + dist.std.float() * eps
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return (z - shift) * float(vae.config.scaling_factor)


# --- stage: optimisation ------------------------------------------------------------------------

def _make_optimizer(config: TrainConfig, named: dict[str, "torch.nn.Parameter"], total_steps: int) -> tuple[Any, Any]:
    """AdamW (or bitsandbytes AdamW8bit) with the UNet and text-encoder adapters as two groups,
    and diffusers' lr schedule with linear warm-up."""
    import torch
    from diffusers.optimization import get_scheduler

    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("--optimizer adamw8bit needs the bitsandbytes package (pip install bitsandbytes), or use --optimizer adamw") from None
        opt_cls = bnb.optim.AdamW8bit
    else:
        opt_cls = torch.optim.AdamW
    groups = [{"params": [p for k, p in named.items() if k.startswith("unet.")], "lr": config.lr}]
    te = [p for k, p in named.items() if k.startswith("text_encoder.")]
    if te:
        groups.append({"params": te, "lr": config.text_encoder_lr if config.text_encoder_lr is not None else config.lr})
    if config.optimizer == "prodigy":
        optimizer = _prodigy(groups, config)
    else:
        optimizer = _adamw_fused(opt_cls, groups, config) or opt_cls(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=total_steps)
    return optimizer, scheduler


def _adamw_fused(opt_cls: Any, groups: list[dict[str, Any]], config: TrainConfig) -> Any:
    """torch's fused AdamW (one kernel over all LoRA tensors), or None where this torch or device lacks it.

    Measured (bench/RESULTS.md, ``bench_train.py --knobs``, CPU): one step over the 384 tensors of a
    rank-16 SD1.5 UNet LoRA takes 8.7 ms fused vs 24.8 ms for torch's CPU default (a per-tensor loop)
    and 32.1 ms foreach. Same update rule and state-dict layout, so checkpoints resume across the two."""
    import torch

    if opt_cls is not torch.optim.AdamW:
        return None
    try:
        # copies: the optimizer writes its defaults into the group dicts, and the fallback must get clean ones
        return opt_cls([dict(g) for g in groups], lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch, or a device without the fused kernel
        return None


def _prodigy(groups: list[dict[str, Any]], config: TrainConfig) -> Any:
    """Prodigy (prodigyopt): Adam with a learning rate it estimates itself; ``lr`` (1 is usual)
    multiplies that estimate. AdamW-style decoupled weight decay. Its whole state (the estimate
    ``d`` and its sums live in the param groups) is in ``state_dict()``, so a resume continues it."""
    optimizer = _import_prodigy()(groups, lr=config.lr, weight_decay=0.0, decouple=True, d_coef=config.prodigy_d_coef,
                        safeguard_warmup=config.prodigy_safeguard_warmup,
                        use_bias_correction=config.prodigy_use_bias_correction)
    # set after construction: Prodigy prints (not logs) a line when built with weight decay
    for group in optimizer.param_groups:
        group["weight_decay"] = config.weight_decay
    optimizer.defaults["weight_decay"] = config.weight_decay
    return optimizer


def _import_prodigy() -> Any:
    """prodigyopt's ``Prodigy`` class, or the one-line error naming the package."""
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise UserError("--optimizer prodigy needs the prodigyopt package (pip install prodigyopt, or facediffuser[prodigy]), "
                        "or use --optimizer adamw") from None
    return Prodigy


def _current_lr(optimizer: Any, lr_scheduler: Any) -> float:
    """The step size in use: the scheduled lr, times Prodigy's estimate ``d`` under Prodigy."""
    lr = float(lr_scheduler.get_last_lr()[0])
    group = optimizer.param_groups[0]
    return lr * float(group["d"]) if "d" in group and "d0" in group else lr


def _make_ema(config: TrainConfig, params: list["torch.nn.Parameter"]) -> Any:
    """diffusers' EMAModel over the adapter parameters (it takes a parameter list, so peft's
    injected LoRA weights fit as they are; no EMA class of our own is needed)."""
    if config.ema is None:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=config.ema)


# --- stage: one step -----------------------------------------------------------------------------

def _diffusion_loss(config: TrainConfig, models: Any, batch: dict[str, Any], gen: "torch.Generator",
                    prediction_type: str, device: "torch.device", *, unet: Any = None) -> "torch.Tensor":
    """Noise the latents at timesteps drawn uniformly over the full schedule, predict, and take the
    MSE against epsilon or v — face-weighted when masks are present and the weight is not 1,
    min-SNR-weighted when asked. Noise and timesteps come from ``gen`` (a CPU generator: the same
    numbers on any device)."""
    import torch

    scheduler = models.noise_scheduler
    latents = _latents(models, batch, device, gen)
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32)
    if config.noise_offset:
        noise = noise + config.noise_offset * torch.randn((b, c, 1, 1), generator=gen, dtype=torch.float32)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen)
    noise, timesteps = noise.to(device), timesteps.to(device)
    cond = _conditioning(config, models, batch, device)
    mask = batch.get("face_mask")
    return loss_from_noise(config, models.unet if unet is None else unet, scheduler, latents=latents, noise=noise, timesteps=timesteps, cond=cond,
                           face_mask=None if mask is None else mask.to(device, non_blocking=True),
                           prediction_type=prediction_type).mean()


def loss_from_noise(config: TrainConfig, unet: Any, scheduler: Any, *, latents: "torch.Tensor", noise: "torch.Tensor",
                    timesteps: "torch.Tensor", cond: "torch.Tensor", face_mask: "torch.Tensor | None",
                    prediction_type: str) -> "torch.Tensor":
    """The per-sample training objective at given noise and timesteps (the training step draws them;
    the held-out validation fixes them): MSE against epsilon or v, face- and min-SNR-weighted as set."""
    import torch
    from diffusers.training_utils import compute_snr

    from ..faces.masks import face_weight_map, weighted_mse

    noisy = scheduler.add_noise(latents, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserError(f"unsupported prediction type {prediction_type!r} (epsilon or v_prediction)")

    base_dtype = _frozen_dtype(unet)
    pred = unet(noisy.to(base_dtype), timesteps, cond.to(base_dtype), return_dict=False)[0]

    weight_map = None
    if face_mask is not None and config.face_loss_weight != 1.0:
        # normalised per sample: the face gets `weight`x the background's share at the same loss scale
        weight_map = face_weight_map(face_mask, config.face_loss_weight, normalize=True)
    per_sample = weighted_mse(pred.float(), target.float(), weight_map, reduction="per_sample")
    if config.min_snr_gamma:
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=config.min_snr_gamma)
        # Min-SNR-gamma (Hang et al. 2023): weight min(SNR, g)/SNR on the epsilon loss; the v loss
        # already carries a factor (SNR+1), so there it is min(SNR, g)/(SNR+1).
        per_sample = per_sample * (clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1))
    return per_sample


def _frozen_dtype(model: Any) -> "torch.dtype":
    """The dtype of the frozen base weights (inputs are cast to it; the LoRA itself is float32)."""
    import torch

    for p in model.parameters():
        if not p.requires_grad:
            return p.dtype
    return torch.float32


def _should_stop(callbacks: TrainCallbacks, accelerator: "Accelerator") -> bool:
    """The main process decides (the node runs there); the others follow, so no rank hangs."""
    import torch

    stop = bool(callbacks.should_stop and callbacks.should_stop())
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if stop else 0.0], device=accelerator.device)
        stop = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    return stop


def _stop_non_finite(config: TrainConfig, accelerator: "Accelerator", run: _RunState, value: float, progress: Any) -> None:
    progress.close()
    where = f"{run.last_checkpoint} (step {int(run.last_checkpoint.name.split('-')[-1])})" if run.last_checkpoint else "none saved yet"
    raise NonFiniteLoss(
        f"the loss became {value} at step {run.global_step + 1}: stopped before it reached the weights; "
        f"no LoRA written; last good checkpoint: {where}. Try a lower --lr (now {config.lr:g}), "
        f"--max-grad-norm 1, or --mixed-precision bf16 instead of fp16"
    )


# --- stage: saving ------------------------------------------------------------------------------

def _save_checkpoint(config: TrainConfig, accelerator: "Accelerator", run: _RunState, named: dict, optimizer: Any,
                     lr_scheduler: Any, ema: Any, noise_gen: "torch.Generator", torch_rng: Any, *,
                     finished: bool = False) -> Path:
    """Gather every rank's RNG state; the main process writes the checkpoint; all agree on its path."""
    from accelerate.utils import gather_object

    from .checkpointing import capture_rng, save_checkpoint

    mine = capture_rng(noise_gen, torch_rng)
    rng = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    path = config.state_path / f"step-{run.global_step:08d}"
    if accelerator.is_main_process:
        path = save_checkpoint(
            config.state_path,
            info={"global_step": run.global_step, "losses": run.losses, "started_at": run.started_at,
                  "num_processes": run.world, "finished": finished, "config": config.to_dict(),
                  "validation": [list(v) for v in run.validation]},
            adapter=named,
            optimizer=optimizer.state_dict(),
            scheduler=lr_scheduler.state_dict(),
            ema=ema.state_dict() if ema is not None else None,
            rng=rng,
        )
    accelerator.wait_for_everyone()
    return path


def _restore_checkpoint(path: Path, run: _RunState, named: dict, optimizer: Any, lr_scheduler: Any, ema: Any,
                        noise_gen: "torch.Generator", torch_rng: Any, rank: int, accelerator: "Accelerator") -> None:
    import torch

    from .checkpointing import load_checkpoint, restore_rng

    ck = load_checkpoint(path)
    if set(ck.adapter) != set(named):
        odd = sorted(set(ck.adapter) ^ set(named))
        raise UserError(f"--resume: {path} holds a different adapter ({len(odd)} tensor name(s) differ, e.g. {odd[0]}); same settings?")
    with torch.no_grad():
        for name, p in named.items():
            saved = ck.adapter[name]
            if saved.shape != p.shape:
                raise UserError(f"--resume: adapter tensor {name} has shape {tuple(saved.shape)} in {path}, {tuple(p.shape)} here")
            p.copy_(saved.to(p.device, p.dtype))
    optimizer.load_state_dict(ck.optimizer)
    lr_scheduler.load_state_dict(ck.scheduler)
    if ema is not None:
        if ck.ema is None:
            raise UserError(f"--resume: {path} has no EMA state but --ema is set")
        ema.load_state_dict(ck.ema)
        ema.to(device=next(iter(named.values())).device)
    restore_rng(ck.rng[rank], noise_gen, torch_rng)
    run.global_step = ck.step
    run.losses = [float(x) for x in ck.info.get("losses", [])]
    run.validation = [(int(step), float(loss)) for step, loss in ck.info.get("validation", [])]
    run.started_at = float(ck.info.get("started_at", run.started_at))
    run.last_checkpoint = path


def _adapter_state_dicts(config: TrainConfig, models: Any, accelerator: "Accelerator") -> tuple[dict, dict | None]:
    """peft state dicts (UNet, text encoder or None), float32 on CPU."""
    from peft.utils import get_peft_model_state_dict

    def sd(model: Any) -> dict:
        return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(accelerator.unwrap_model(model)).items()}

    return sd(models.unet), (sd(models.text_encoder) if config.train_text_encoder else None)


def _export_lora(config: TrainConfig, accelerator: "Accelerator", models: Any, ema: Any, params: list, data: Any,
                 run: _RunState, total_steps: int, prediction_type: str, *, validation: Any = None,
                 output: Path | None = None) -> Path:
    """Write the kohya file (EMA weights when --ema) with full metadata; main process only.
    ``output``: somewhere else than ``--output`` (``--keep-best-validation``'s file)."""
    from . import kohya_format, lora_targets

    output = output or config.output_path
    if accelerator.is_main_process:
        with _ema_weights(ema, params):
            unet_sd, te_sd = _adapter_state_dicts(config, models, accelerator)
        tensors = kohya_format.peft_to_kohya(
            unet_sd, te_sd,
            unet_alpha=lora_targets.module_alphas(accelerator.unwrap_model(models.unet)),
            te_alpha=lora_targets.module_alphas(accelerator.unwrap_model(models.text_encoder)) if te_sd else None,
        )
        per_epoch = max(1, math.ceil(len(data.images) / (config.batch_size * config.grad_accum * run.world)))
        if getattr(data, "micro_batches_per_epoch", None):  # buckets: an epoch is every bucket's batches
            per_epoch = max(1, math.ceil(data.micro_batches_per_epoch / config.grad_accum))
        dims = kohya_format.network_dims(tensors)  # what the file holds (--init-lora keeps its file's dims)
        described = dataclasses.replace(
            config, rank=dims["network"][0], alpha=dims["network"][1],
            conv_rank=dims["conv"][0] if dims["conv"] else 0, conv_alpha=dims["conv"][1] if dims["conv"] else None,
            dora=kohya_format.is_dora(tensors))
        hashes = kohya_format.base_model_hashes(config.model, cache_dir=config.cache_path)
        metadata = kohya_format.build_metadata(
            described,
            image_files=[r.path for r in data.images], captions=data.captions,
            image_digests=[r.sha256[: kohya_format.IMAGE_DIGEST_HEX] for r in data.images],
            train_data_digest=kohya_format.train_data_digest([r.sha256 for r in data.images], data.captions,
                                                             [r.mask_sha256 for r in data.images]),
            base_model_hash=hashes[0] if hashes else None, base_model_sha256=hashes[1] if hashes else None,
            steps_done=run.global_step, max_train_steps=total_steps,
            epoch=math.ceil(run.global_step / per_epoch), num_epochs=math.ceil(total_steps / per_epoch),
            started_at=run.started_at, finished_at=_now(),
            v2=getattr(models, "family", "sd15").startswith("sd2"), v_prediction=prediction_type == "v_prediction",
            num_processes=run.world, bucket_plan=getattr(data, "buckets", None),
            validation=validation.metadata_values(run.validation) if validation is not None else None,
        )
        kohya_format.save_kohya_lora(output, tensors, metadata, dtype=config.save_precision)
    accelerator.wait_for_everyone()
    return output


class _ema_weights:
    """Swap the EMA weights in for the duration of a block (export, samples), then put them back."""

    def __init__(self, ema: Any, params: list) -> None:
        self.ema, self.params = ema, params

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc: Any) -> None:
        if self.ema is not None:
            self.ema.restore(self.params)


def _write_loss_plot(config: TrainConfig, run: _RunState, *, finished: bool) -> Path | None:
    """Beside the LoRA when it was written; a cancelled run keeps its plot with its state, so
    nothing but finished LoRAs and their plots ever lands in the output (e.g. ComfyUI's loras)."""
    from .progress_plots import save_loss_curve

    out = config.output_path
    where = out.with_name(out.stem + ".loss.png") if finished else config.state_path / "loss.png"
    try:
        title = f"{out.stem}: training loss" + (" and held-out validation loss" if run.validation else "")
        return save_loss_curve(run.losses, where, title=title, validation=run.validation)
    except Exception as exc:  # noqa: BLE001 - a plot must never cost the user the LoRA
        log.warning("loss plot not written (%s)", exc)
        return None


# --- stage: samples, logs, progress ---------------------------------------------------------------

def _read_prompts(config: TrainConfig) -> list[str]:
    if not config.sample_prompts:
        return [config.trigger + ", " + config.caption_template if config.trigger else config.caption_template]
    from ..sd.prompts import read_prompts

    return read_prompts(config.sample_prompts, flag="--sample-prompts")


def _write_samples(config: TrainConfig, models: Any, ema: Any, params: list, accelerator: "Accelerator", step: int,
                   callbacks: TrainCallbacks) -> list[Path]:
    """A grid of one image per prompt, fixed seeds, DDIM, from the in-memory components (main process
    only). It draws from its own generators and restores the global RNG, so samples never change
    the training trajectory."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from .progress_plots import save_sample_grid

    written: list[Path] = []
    if accelerator.is_main_process:
        prompts = _read_prompts(config)
        unet = accelerator.unwrap_model(models.unet)
        te = accelerator.unwrap_model(models.text_encoder)
        pipe = StableDiffusionPipeline(
            vae=models.vae, text_encoder=te, tokenizer=models.tokenizer, unet=unet,
            scheduler=DDIMScheduler.from_config(models.noise_scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _ema_weights(ema, params), _eval_mode(unet, te), torch.no_grad():
            images = [
                pipe(prompt, num_inference_steps=config.sample_steps, height=config.resolution, width=config.resolution,
                     generator=torch.Generator().manual_seed(_mix(config.seed, 4, i)), output_type="pil").images[0]
                for i, prompt in enumerate(prompts)
            ]
        out = config.output_path
        path = out.with_name(out.stem + ".samples") / f"step-{step:06d}.png"
        written.append(save_sample_grid(images, path, labels=prompts))
        if callbacks.on_sample is not None:
            callbacks.on_sample(step, path)
    accelerator.wait_for_everyone()
    return written


class _eval_mode:
    """eval() for sampling (no LoRA dropout), then back to whatever mode each model was in."""

    def __init__(self, *modules: Any) -> None:
        self.modules = modules
        self.modes: list[bool] = []

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, mode in zip(self.modules, self.modes):
            m.train(mode)


def _start_trackers(config: TrainConfig, accelerator: "Accelerator") -> None:
    """TensorBoard (when installed and --logging-dir is set), with the settings as hyper-parameters."""
    if accelerator.log_with:
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.to_dict().items()}
        accelerator.init_trackers("facediffuser", config=hparams)


def _progress_bar(accelerator: "Accelerator", total: int, start: int) -> Any:
    """tqdm: loss and lr in the postfix; it/s and ETA come with tqdm."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                disable=not accelerator.is_main_process)
