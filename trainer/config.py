"""Every training setting has one home: a field of :class:`TrainConfig`, with its metadata.

Each field's metadata says what the setting is (kind, range, choices, help text, group), whether it
changes the trained weights (``affects_weights``: part of a LoRA's identity, compared by the
ComfyUI node before it reuses a file), whether it may change on ``--resume`` (``resumable``) and
the LoRA metadata key it is recorded under (``ss_key``). :func:`setting_specs` hands that out as
:class:`SettingSpec` rows, and every front end is generated from them: the CLI flags
(``--grad-accum``, ``--flip``/``--no-flip``), the TOML keys (``grad_accum``, type- and
range-checked), the ComfyUI node inputs (``nodes/train_nodes.py``), the resume check
(``training_loop``) and the metadata writer (``kohya_format.settings_metadata``). So the same
settings and seed give the same file from any front end, and no list of settings lives elsewhere.

Unset optional settings: every front end may spell ``None`` as ``0`` (numbers) or ``""`` (text);
:class:`TrainConfig` turns those into ``None`` (widgets cannot hold a None; kohya reads 0 the same
way, e.g. alpha 0 = rank).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

from ..errors import UserError

KINDS = ("int", "float", "bool", "str", "choice", "path")
GROUPS = ("basic", "advanced", "paths")


@dataclass(frozen=True)
class SettingSpec:
    """One setting as every front end sees it (see the module docstring).

    ``minimum``/``maximum``/``step`` are None where unbounded (text, booleans). ``optional``: None
    is allowed (spelled 0 or "" in a front end that has no None). ``ss_key``: the LoRA metadata
    key the setting is written under (several settings may share one, e.g. ``ss_optimizer``)."""

    name: str
    flag: str
    kind: str
    default: Any
    optional: bool
    minimum: int | float | None
    maximum: int | float | None
    step: int | float | None
    choices: tuple[str, ...] | None
    tooltip: str
    group: str
    affects_weights: bool
    resumable: bool
    ss_key: str | None

    @property
    def negative_flag(self) -> str | None:
        """The flag that turns a boolean off (``--no-flip``; ``--cache`` for ``--no-cache``)."""
        if self.kind != "bool":
            return None
        return "--" + self.flag[len("--no-"):] if self.flag.startswith("--no-") else "--no-" + self.flag[2:]


class SettingError(UserError):
    """A bad value of one setting; ``setting`` names it (the CLI adds the TOML file it came from)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def _opt(help: str, *, weights: bool, resume: bool, group: str = "advanced", ss: str | None = None,
         lo: float | None = None, hi: float | None = None, step: float | None = None,
         choices: tuple[str, ...] | None = None, metavar: str | None = None) -> dict[str, Any]:
    """A field's description, stored in the dataclass field metadata (read by :func:`setting_specs`)."""
    return {"help": help, "weights": weights, "resume": resume, "group": group, "ss": ss, "lo": lo, "hi": hi,
            "step": step, "choices": choices, "metavar": metavar}


@dataclass
class TrainConfig:
    # --- inputs and outputs -------------------------------------------------------------------
    model: str = field(default="", metadata=_opt("Base checkpoint: a single-file .safetensors/.ckpt (LDM layout) or a diffusers folder.", group="paths", weights=True, resume=False, ss="ss_sd_model_name", metavar="CKPT"))
    data: str = field(default="", metadata=_opt("Folder of training images (searched recursively), each with an optional same-name .txt caption.", group="paths", weights=True, resume=False, metavar="DIR"))
    output: str = field(default="", metadata=_opt("Where to write the kohya-format LoRA (.safetensors).", group="paths", weights=False, resume=True, ss="ss_output_name", metavar="FILE"))
    cache_dir: str | None = field(default=None, metadata=_opt("Where to cache VAE latents and text-encoder outputs (default: a .facediffuser-cache folder beside the output).", group="paths", weights=False, resume=True, metavar="DIR"))
    state_dir: str | None = field(default=None, metadata=_opt("Where training-state checkpoints go, for --resume (default: <output stem>.state beside the output).", group="paths", weights=False, resume=True, metavar="DIR"))
    init_lora: str | None = field(default=None, metadata=_opt("Start from this kohya-format LoRA (ours or kohya's) instead of a fresh adapter; its ranks and alphas replace --rank/--alpha/--conv-*.", group="paths", weights=True, resume=False, ss="facediffuser_init_lora", metavar="FILE"))

    # --- length -------------------------------------------------------------------------------
    steps: int = field(default=1000, metadata=_opt("Number of optimizer steps.", group="basic", weights=True, resume=True, ss="facediffuser_steps", lo=1, hi=1_000_000, metavar="N"))
    epochs: int | None = field(default=None, metadata=_opt("Train for N passes over the data instead of --steps.", weights=True, resume=True, ss="facediffuser_epochs", lo=1, hi=100_000, metavar="N"))

    # --- the adapter --------------------------------------------------------------------------
    rank: int = field(default=16, metadata=_opt("LoRA rank (network dim).", group="basic", weights=True, resume=False, ss="ss_network_dim", lo=1, hi=1024, metavar="R"))
    alpha: float | None = field(default=None, metadata=_opt("LoRA alpha; the update is scaled by alpha/rank (default: alpha = rank).", group="basic", weights=True, resume=False, ss="ss_network_alpha", lo=0.0, hi=4096.0, step=0.5, metavar="A"))
    lora_dropout: float = field(default=0.0, metadata=_opt("Dropout on the LoRA branch during training.", weights=True, resume=False, ss="ss_network_dropout", lo=0.0, hi=0.99, step=0.01, metavar="P"))
    conv_rank: int = field(default=0, metadata=_opt("Also train LoCon adapters on ResNet 3x3 convs with this rank (0 = off, kohya's default).", weights=True, resume=False, ss="ss_network_args", lo=0, hi=1024, metavar="R"))
    conv_alpha: float | None = field(default=None, metadata=_opt("Alpha of the conv adapters (default: conv alpha = conv rank).", weights=True, resume=False, ss="ss_network_args", lo=0.0, hi=4096.0, step=0.5, metavar="A"))
    dora: bool = field(default=False, metadata=_opt("DoRA (weight-decomposed LoRA): also train a magnitude per output channel; saved as kohya/LyCORIS dora_scale, which ComfyUI and Forge load.", weights=True, resume=False, ss="ss_network_module"))
    train_text_encoder: bool = field(default=False, metadata=_opt("Also train LoRA adapters on the CLIP text encoder (disables the text-embedding cache; load the LoRA with model + clip).", group="basic", weights=True, resume=False, ss="facediffuser_train_text_encoder"))

    # --- optimisation -------------------------------------------------------------------------
    lr: float = field(default=1e-4, metadata=_opt("Learning rate of the UNet adapters; with --optimizer prodigy a multiplier of the step size Prodigy estimates (use 1; tune --prodigy-d-coef instead).", group="basic", weights=True, resume=False, ss="ss_learning_rate", lo=0.0, step=1e-6, metavar="LR"))
    text_encoder_lr: float | None = field(default=None, metadata=_opt("Learning rate of the text-encoder adapters (default: --lr).", weights=True, resume=False, ss="ss_text_encoder_lr", lo=0.0, step=1e-6, metavar="LR"))
    optimizer: str = field(default="adamw", metadata=_opt("Optimizer; adamw8bit needs bitsandbytes; prodigy (learning-rate free: set --lr 1) needs prodigyopt.", weights=True, resume=False, ss="ss_optimizer", choices=("adamw", "adamw8bit", "prodigy")))
    weight_decay: float = field(default=1e-2, metadata=_opt("AdamW weight decay.", weights=True, resume=False, ss="ss_optimizer", lo=0.0, hi=1.0, step=0.001, metavar="W"))
    prodigy_d_coef: float = field(default=1.0, metadata=_opt("Prodigy: scales its step-size estimate (2 = bolder, 0.5 = more careful).", weights=True, resume=False, ss="ss_optimizer", lo=0.01, hi=100.0, step=0.1, metavar="X"))
    prodigy_safeguard_warmup: bool = field(default=True, metadata=_opt("Prodigy: keep the warm-up from inflating its estimate (its authors advise it for diffusion models).", weights=True, resume=False, ss="ss_optimizer"))
    prodigy_use_bias_correction: bool = field(default=True, metadata=_opt("Prodigy: Adam's bias correction (its authors advise it for diffusion models).", weights=True, resume=False, ss="ss_optimizer"))
    lr_scheduler: str = field(default="constant", metadata=_opt("Learning-rate schedule after warm-up.", weights=True, resume=False, ss="ss_lr_scheduler", choices=("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")))
    lr_warmup_steps: int = field(default=0, metadata=_opt("Linear warm-up steps.", weights=True, resume=False, ss="ss_lr_warmup_steps", lo=0, hi=1_000_000, metavar="N"))
    batch_size: int = field(default=1, metadata=_opt("Images per step per process.", group="basic", weights=True, resume=False, ss="ss_batch_size_per_device", lo=1, hi=1024, metavar="B"))
    grad_accum: int = field(default=1, metadata=_opt("Gradient accumulation steps per optimizer step.", weights=True, resume=False, ss="ss_gradient_accumulation_steps", lo=1, hi=1024, metavar="K"))
    max_grad_norm: float = field(default=1.0, metadata=_opt("Clip the gradient norm to this value (0 = no clipping).", weights=True, resume=False, ss="ss_max_grad_norm", lo=0.0, hi=1000.0, step=0.1, metavar="X"))
    seed: int = field(default=0, metadata=_opt("Seed of everything random: adapter init, data order, noise, timesteps. Same seed, same file (on CPU).", group="basic", weights=True, resume=False, ss="ss_seed", lo=0, hi=2**32 - 1, metavar="S"))

    # --- the diffusion loss -------------------------------------------------------------------
    prediction_type: str = field(default="auto", metadata=_opt("What the UNet predicts; auto takes it from the checkpoint family (SD2-768 is v-prediction).", weights=True, resume=False, ss="facediffuser_prediction_type", choices=("auto", "epsilon", "v_prediction")))
    min_snr_gamma: float | None = field(default=None, metadata=_opt("Min-SNR loss weighting with this gamma (5 is usual; default off).", weights=True, resume=False, ss="ss_min_snr_gamma", lo=0.0, hi=100.0, step=0.5, metavar="G"))
    noise_offset: float = field(default=0.0, metadata=_opt("Noise offset (0.05-0.1 helps very dark/bright images; default off).", weights=True, resume=False, ss="ss_noise_offset", lo=0.0, hi=1.0, step=0.005, metavar="X"))
    face_loss_weight: float = field(default=1.0, metadata=_opt("Weight of the loss inside the face mask (needs prep's face masks); 1 = plain loss.", weights=True, resume=False, ss="facediffuser_face_loss_weight", lo=0.0, hi=100.0, step=0.1, metavar="W"))

    # --- data ---------------------------------------------------------------------------------
    resolution: int = field(default=512, metadata=_opt("Training resolution in pixels (a multiple of 8); with --no-buckets images are resized (short side) and centre-cropped to a square.", group="basic", weights=True, resume=False, ss="ss_resolution", lo=64, hi=4096, step=8, metavar="PX"))
    buckets: bool = field(default=True, metadata=_opt("Aspect-ratio buckets: each image keeps its shape in a bucket of about --resolution squared pixels (sides multiples of 64), batches drawn within one bucket; --no-buckets centre-crops every image to a square. Square images train the same either way.", weights=True, resume=False, ss="ss_enable_bucket"))
    min_bucket_reso: int | None = field(default=None, metadata=_opt("Shortest bucket side in pixels, a multiple of 64 (default: half the resolution, at least 64).", weights=True, resume=False, ss="ss_min_bucket_reso", lo=64, hi=4096, step=64, metavar="PX"))
    max_bucket_reso: int | None = field(default=None, metadata=_opt("Longest bucket side in pixels, a multiple of 64 (default: twice the resolution).", weights=True, resume=False, ss="ss_max_bucket_reso", lo=64, hi=8192, step=64, metavar="PX"))
    bucket_no_upscale: bool = field(default=False, metadata=_opt("With buckets: never upscale; an image smaller than the bucket area gets a bucket of its own size (rounded down to 64).", weights=True, resume=False, ss="ss_bucket_no_upscale"))
    flip: bool = field(default=False, metadata=_opt("Random horizontal flip (both latents are cached).", weights=True, resume=False, ss="ss_flip_aug"))
    caption_template: str = field(default="a photo of a face", metadata=_opt("Caption for images without a caption file.", group="basic", weights=True, resume=False, ss="facediffuser_caption_template", metavar="TEXT"))
    trigger: str | None = field(default=None, metadata=_opt("Trigger word prepended to every caption (recorded in the file).", group="basic", weights=True, resume=False, ss="facediffuser_trigger", metavar="WORD"))
    caption_extension: str = field(default=".txt", metadata=_opt("Caption file extension (kohya uses .txt or .caption).", weights=True, resume=False, ss="facediffuser_caption_extension", metavar="EXT"))
    caption_dropout: float = field(default=0.0, metadata=_opt("Probability of training a sample with an empty caption.", weights=True, resume=False, ss="ss_caption_dropout_rate", lo=0.0, hi=0.99, step=0.01, metavar="P"))
    shuffle_tags: bool = field(default=False, metadata=_opt("Shuffle comma-separated caption tags each time (after the first --keep-tokens).", weights=True, resume=False, ss="ss_shuffle_caption"))
    keep_tokens: int = field(default=0, metadata=_opt("With --shuffle-tags, keep this many leading tags in place.", weights=True, resume=False, ss="ss_keep_tokens", lo=0, hi=1000, metavar="N"))
    dataloader_workers: int = field(default=0, metadata=_opt("DataLoader worker processes (the data is the same with any number).", weights=False, resume=True, lo=0, hi=64, metavar="N"))

    # --- held-out validation ------------------------------------------------------------------
    validation_split: float = field(default=0.0, metadata=_opt("Hold out this fraction of the images (picked from their contents and --seed) for a validation loss; 0 = off.", weights=True, resume=False, ss="ss_validation_split", lo=0.0, hi=0.9, step=0.05, metavar="F"))
    validation_data: str | None = field(default=None, metadata=_opt("Folder of held-out images (captions as for --data) for the validation loss, instead of --validation-split.", group="paths", weights=False, resume=False, ss="facediffuser_validation_data", metavar="DIR"))
    validation_every: int = field(default=50, metadata=_opt("Compute the validation loss every N steps (and before the first and after the last step).", weights=False, resume=True, ss="ss_validate_every_n_steps", lo=1, hi=1_000_000, metavar="N"))
    keep_best_validation: bool = field(default=False, metadata=_opt("Also write <output stem>.best.safetensors: the adapter at the step with the lowest validation loss.", weights=False, resume=False, ss="facediffuser_keep_best_validation"))

    # --- performance --------------------------------------------------------------------------
    mixed_precision: str = field(default="no", metadata=_opt("Mixed precision (fp16 needs a GPU; bf16 a GPU or a CPU with AVX-512 BF16).", weights=True, resume=False, ss="ss_mixed_precision", choices=("no", "fp16", "bf16")))
    gradient_checkpointing: bool = field(default=False, metadata=_opt("Trade compute for memory in the UNet (and text encoder); the same maths.", weights=False, resume=True, ss="ss_gradient_checkpointing"))
    no_cache: bool = field(default=False, metadata=_opt("Do not cache latents/text embeddings: encode every step (for benchmarks; the latent sample is then drawn each step, so the result differs).", weights=True, resume=False, ss="ss_cache_latents"))
    compile: bool = field(default=False, metadata=_opt("Compile the UNet step with torch.compile (inductor): the first step then takes minutes (less once inductor's cache is warm), later steps may be faster; the same maths up to float rounding.", weights=False, resume=True))

    # --- outputs during training --------------------------------------------------------------
    save_every: int = field(default=0, metadata=_opt("Save a resumable checkpoint every N steps (0 = only at the end).", weights=False, resume=True, lo=0, hi=1_000_000, metavar="N"))
    resume: bool = field(default=False, metadata=_opt("Continue from the last checkpoint in the state folder.", weights=False, resume=True))
    ema: float | None = field(default=None, metadata=_opt("Keep an EMA of the adapter with this decay (e.g. 0.999) and export it.", weights=True, resume=False, ss="facediffuser_ema", lo=0.0, hi=0.99999, step=0.0001, metavar="DECAY"))
    sample_prompts: str | None = field(default=None, metadata=_opt("Text file, one prompt per line, for sample grids during training.", group="paths", weights=False, resume=True, metavar="FILE"))
    sample_every: int = field(default=0, metadata=_opt("Write a sample grid every N steps (0 = off).", weights=False, resume=True, lo=0, hi=1_000_000, metavar="N"))
    sample_steps: int = field(default=20, metadata=_opt("Sampler steps for the sample grids.", weights=False, resume=True, lo=1, hi=1000, metavar="N"))
    save_precision: str = field(default="fp16", metadata=_opt("dtype of the saved LoRA tensors.", weights=True, resume=True, ss="facediffuser_save_precision", choices=("fp16", "bf16", "fp32")))
    logging_dir: str | None = field(default=None, metadata=_opt("Write TensorBoard logs here (when tensorboard is installed).", group="paths", weights=False, resume=True, metavar="DIR"))

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # The one spelling of "unset" for front ends without None (widgets, TOML): 0 or "".
        for spec in _specs():
            if spec.optional:
                value = getattr(self, spec.name)
                if (isinstance(value, str) and not value.strip()) or (
                        isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0):
                    setattr(self, spec.name, None)

    def validate(self) -> "TrainConfig":
        """Reject bad settings up front, with one line each, before any model is loaded."""
        if not self.model:
            raise SettingError("model", "no base model given: pass --model CKPT (a .safetensors checkpoint or a diffusers folder)")
        if not self.data:
            raise SettingError("data", "no dataset given: pass --data DIR (a folder of face images)")
        if not self.output:
            raise SettingError("output", "no output given: pass --output FILE.safetensors")
        if not self.output.endswith(".safetensors"):
            raise SettingError("output", f"--output must end in .safetensors (got {self.output!r})")
        for spec in _specs():
            value = check_value(spec, getattr(self, spec.name), where=spec.name)
            check_range(spec, value)
        if self.resolution % 8:
            raise SettingError("resolution", f"--resolution must be a multiple of 8 (got {self.resolution})")
        _check_feature_settings(self)
        return self

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_split) or bool(self.validation_data)

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def effective_conv_alpha(self) -> float:
        return float(self.conv_rank if self.conv_alpha is None else self.conv_alpha)

    @property
    def output_path(self) -> Path:
        return Path(self.output)

    @property
    def state_path(self) -> Path:
        out = self.output_path
        return Path(self.state_dir) if self.state_dir else out.with_name(out.stem + ".state")

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else self.output_path.parent / ".facediffuser-cache"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        """A config from plain values (TOML, a node's widgets): unknown keys and wrong types are
        one-line errors naming ``source``, the key and the type expected."""
        specs = {s.name: s for s in _specs()}
        unknown = sorted(set(values) - set(specs))
        if unknown:
            raise UserError(f"{source}: unknown setting(s) {', '.join(unknown)}; see facediffuser train --help")
        return cls(**{k: check_value(specs[k], v, where=f"{source}: {k}") for k, v in values.items()})


def _check_feature_settings(config: TrainConfig) -> None:
    """Validation split/folder, Prodigy's learning rate and the bucket limits, one line each."""
    if config.validation_split and config.validation_data:
        raise SettingError("validation_data", "give either --validation-split or --validation-data, not both")
    if config.validation_data and Path(config.validation_data).resolve() == Path(config.data).resolve():
        raise SettingError("validation_data", f"--validation-data {config.validation_data} is the training folder: "
                           "give a folder of held-out images, or use --validation-split")
    if config.keep_best_validation and not config.has_validation:
        raise SettingError("keep_best_validation", "--keep-best-validation needs a validation set: add --validation-split F "
                           "or --validation-data DIR")
    if config.optimizer == "prodigy" and config.lr < 0.1:
        raise SettingError("lr", f"--optimizer prodigy takes --lr as a multiplier of its own step-size estimate: set --lr 1 "
                           f"(got {config.lr:g}, an AdamW learning rate)")
    for name in ("min_bucket_reso", "max_bucket_reso"):
        value = getattr(config, name)
        if value is not None and value % 64:
            raise SettingError(name, f"--{name.replace('_', '-')} must be a multiple of 64 (got {value})")
    lo, hi = bucket_limits(config)
    if config.buckets and not lo <= hi:
        raise SettingError("min_bucket_reso", f"--min-bucket-reso {lo} is larger than --max-bucket-reso {hi}")


def bucket_limits(config: TrainConfig) -> tuple[int, int]:
    """(shortest, longest) bucket side: the settings, or half and twice the resolution (sd-scripts'
    256/1024 at 512 px), on the 64-pixel grid."""
    lo = config.min_bucket_reso if config.min_bucket_reso is not None else max(64, config.resolution // 2 // 64 * 64)
    hi = config.max_bucket_reso if config.max_bucket_reso is not None else max(64, config.resolution * 2 // 64 * 64)
    return lo, hi


# --- the specs --------------------------------------------------------------------------------------

_PYTHON_KIND = {bool: "bool", int: "int", float: "float", str: "str"}
_SPECS: tuple[SettingSpec, ...] | None = None


def _base_type(tp: Any) -> type:
    """``int | None`` -> int, ``str`` -> str."""
    args = [a for a in get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _specs() -> tuple[SettingSpec, ...]:
    global _SPECS
    if _SPECS is None:
        hints = get_type_hints(TrainConfig)
        rows = []
        for f in fields(TrainConfig):
            m = f.metadata
            kind = _PYTHON_KIND[_base_type(hints[f.name])]
            if m["choices"]:
                kind = "choice"
            elif m["group"] == "paths":
                kind = "path"
            step = m["step"] if m["step"] is not None else (1 if kind == "int" and m["lo"] is not None else None)
            rows.append(SettingSpec(
                name=f.name, flag="--" + f.name.replace("_", "-"), kind=kind, default=f.default,
                optional=type(None) in get_args(hints[f.name]), minimum=m["lo"], maximum=m["hi"], step=step,
                choices=m["choices"], tooltip=m["help"], group=m["group"], affects_weights=m["weights"],
                resumable=m["resume"], ss_key=m["ss"]))
        _SPECS = tuple(rows)
    return _SPECS


def setting_specs() -> list[SettingSpec]:
    """Every TrainConfig setting in field order: the one source of every front end."""
    return list(_specs())


_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "choice": "a string", "path": "a path string"}


def check_value(spec: SettingSpec, value: Any, *, where: str) -> Any:
    """``value`` as the setting's type (an int is accepted for a float), or a one-line error that
    names ``where`` (the flag, or "file: key"), the value and the type expected."""
    if value is None:
        if spec.optional:
            return None
        raise SettingError(spec.name, f"{where} must be set ({_KIND_WORDS[spec.kind]})")
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }.get(spec.kind, isinstance(value, str))
    if not ok:
        if spec.kind == "bool":
            example = "true"
        elif spec.kind in ("int", "float"):
            example = spec.default if spec.default is not None else (spec.minimum or 1)
        else:
            example = f'"{spec.default or "..."}"'
        raise SettingError(spec.name, f"{where} = {value!r}: expected {_KIND_WORDS[spec.kind]}, e.g. {spec.name} = {example}")
    return float(value) if spec.kind == "float" else value


def check_range(spec: SettingSpec, value: Any) -> None:
    """Choices and bounds of a (type-checked) value; None (unset) is always in range."""
    if value is None:
        return
    if spec.choices and value not in spec.choices:
        raise SettingError(spec.name, f"{spec.flag} must be one of {', '.join(spec.choices)} (got {value!r})")
    lo, hi = spec.minimum, spec.maximum
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            raise SettingError(spec.name, f"{spec.flag} must be at least {lo} (got {value})")
        raise SettingError(spec.name, f"{spec.flag} must be between {lo} and {hi} (got {value})")


# --- CLI / TOML generated from the specs ------------------------------------------------------------

class _Toggle(argparse.Action):
    """``--flip`` sets True, ``--no-flip`` sets False (to turn off a TOML file's ``flip = true``)."""

    def __init__(self, option_strings: list[str], dest: str, negative: str, **kw: Any) -> None:
        self.negative = negative
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, option_string != self.negative)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (two for a boolean); defaults are shown, but parsed values default
    to None so that we can tell what the user set on the command line (it overrides the TOML file)."""
    metavars = {f.name: f.metadata.get("metavar") for f in fields(TrainConfig)}
    parser.add_argument("--config", metavar="FILE.toml", help="Read settings from a TOML file (keys are the flag names with '_'); flags given here override it.")
    for spec in _specs():
        if spec.kind == "bool":
            parser.add_argument(spec.flag, spec.negative_flag, dest=spec.name, action=_Toggle, negative=spec.negative_flag,
                                default=None, help=spec.tooltip + (" (default: True)" if spec.default is True else ""))
            continue
        default_text = f" (default: {spec.default})" if spec.default not in (None, False, "") else ""
        parser.add_argument(
            spec.flag, dest=spec.name, type={"int": int, "float": float}.get(spec.kind, str), default=None,
            choices=spec.choices, metavar=None if spec.choices else metavars[spec.name],
            help=spec.tooltip + default_text,
        )


def _toml_module() -> Any:
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib
    try:
        import tomli
    except ImportError:
        raise UserError("reading a TOML file on Python 3.10 needs the tomli package (pip install tomli)") from None
    return tomli


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's settings (a flat file or one ``[train]`` table), each checked against its type."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    toml = _toml_module()
    try:
        with p.open("rb") as fh:
            data = toml.load(fh)
    except toml.TOMLDecodeError as exc:
        raise UserError(f"{p}: not valid TOML ({exc})") from None
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    values = {k.replace("-", "_"): v for k, v in data.items()}
    TrainConfig.from_dict(values, source=str(p))  # unknown keys, wrong types: one line naming the file
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TOML (if --config) first, then every flag the user actually gave on top."""
    values: dict[str, Any] = {}
    from_file: set[str] = set()
    source = getattr(args, "config", None)
    if source:
        values.update(load_toml(source))
        from_file = set(values)
    for spec in _specs():
        v = getattr(args, spec.name, None)
        if v is not None:
            values[spec.name] = v
            from_file.discard(spec.name)
    config = TrainConfig.from_dict(values, source=source or "arguments")
    try:
        return config.validate()
    except SettingError as exc:
        if exc.setting in from_file:
            raise SettingError(exc.setting, f"{source}: {exc} (set in this file)") from None
        raise


# --- host-dependent values ------------------------------------------------------------------------

def auto_mixed_precision() -> str:
    """What a front end's "auto" means: bf16 on a CUDA GPU that supports it, else fp32 ("no")."""
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
