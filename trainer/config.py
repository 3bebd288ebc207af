"""Every training setting has one home: a field of :class:`TrainConfig`.

The CLI flags (``--grad-accum``), the TOML keys (``grad_accum``), the defaults and the help texts
are all generated from the fields below, so they cannot drift apart. The ComfyUI training node
builds the same dataclass, so the same settings and seed give the same file from either front end.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ..errors import UserError


def _opt(help: str, *, choices: tuple[str, ...] | None = None, flag: str | None = None, metavar: str | None = None):
    """A field's CLI/TOML description; stored in the dataclass field metadata."""
    return {"help": help, "choices": choices, "flag": flag, "metavar": metavar}


@dataclass
class TrainConfig:
    # --- inputs and outputs -------------------------------------------------------------------
    model: str = field(default="", metadata=_opt("Base checkpoint: a single-file .safetensors/.ckpt (LDM layout) or a diffusers folder.", metavar="CKPT"))
    data: str = field(default="", metadata=_opt("Folder of training images (searched recursively), each with an optional same-name .txt caption.", metavar="DIR"))
    output: str = field(default="", metadata=_opt("Where to write the kohya-format LoRA (.safetensors).", metavar="FILE"))
    cache_dir: str | None = field(default=None, metadata=_opt("Where to cache VAE latents and text-encoder outputs (default: a .facediffuser-cache folder beside the output).", metavar="DIR"))
    state_dir: str | None = field(default=None, metadata=_opt("Where training-state checkpoints go, for --resume (default: <output stem>.state beside the output).", metavar="DIR"))
    init_lora: str | None = field(default=None, metadata=_opt("Start from this kohya-format LoRA (ours or kohya's) instead of a fresh adapter.", metavar="FILE"))

    # --- length -------------------------------------------------------------------------------
    steps: int = field(default=1000, metadata=_opt("Number of optimizer steps.", metavar="N"))
    epochs: int | None = field(default=None, metadata=_opt("Train for N passes over the data instead of --steps.", metavar="N"))

    # --- the adapter --------------------------------------------------------------------------
    rank: int = field(default=16, metadata=_opt("LoRA rank (network dim).", metavar="R"))
    alpha: float | None = field(default=None, metadata=_opt("LoRA alpha; the update is scaled by alpha/rank (default: alpha = rank).", metavar="A"))
    lora_dropout: float = field(default=0.0, metadata=_opt("Dropout on the LoRA branch during training.", metavar="P"))
    conv_rank: int = field(default=0, metadata=_opt("Also train LoCon adapters on ResNet 3x3 convs with this rank (0 = off, kohya's default).", metavar="R"))
    conv_alpha: float | None = field(default=None, metadata=_opt("Alpha of the conv adapters (default: conv alpha = conv rank).", metavar="A"))
    train_text_encoder: bool = field(default=False, metadata=_opt("Also train LoRA adapters on the CLIP text encoder (disables the text-embedding cache)."))

    # --- optimisation -------------------------------------------------------------------------
    lr: float = field(default=1e-4, metadata=_opt("Learning rate of the UNet adapters.", metavar="LR"))
    text_encoder_lr: float | None = field(default=None, metadata=_opt("Learning rate of the text-encoder adapters (default: --lr).", metavar="LR"))
    optimizer: str = field(default="adamw", metadata=_opt("Optimizer; adamw8bit needs bitsandbytes.", choices=("adamw", "adamw8bit")))
    weight_decay: float = field(default=1e-2, metadata=_opt("AdamW weight decay.", metavar="W"))
    lr_scheduler: str = field(default="constant", metadata=_opt("Learning-rate schedule after warm-up.", choices=("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")))
    lr_warmup_steps: int = field(default=0, metadata=_opt("Linear warm-up steps.", metavar="N"))
    batch_size: int = field(default=1, metadata=_opt("Images per step per process.", metavar="B"))
    grad_accum: int = field(default=1, metadata=_opt("Gradient accumulation steps per optimizer step.", metavar="K"))
    max_grad_norm: float = field(default=1.0, metadata=_opt("Clip the gradient norm to this value (0 = no clipping).", metavar="X"))
    seed: int = field(default=0, metadata=_opt("Seed of everything random: adapter init, data order, noise, timesteps. Same seed, same file (on CPU).", metavar="S"))

    # --- the diffusion loss -------------------------------------------------------------------
    prediction_type: str = field(default="auto", metadata=_opt("What the UNet predicts; auto takes it from the checkpoint family (SD2-768 is v-prediction).", choices=("auto", "epsilon", "v_prediction")))
    min_snr_gamma: float | None = field(default=None, metadata=_opt("Min-SNR loss weighting with this gamma (5 is usual; default off).", metavar="G"))
    noise_offset: float = field(default=0.0, metadata=_opt("Noise offset (0.05-0.1 helps very dark/bright images; default off).", metavar="X"))
    face_loss_weight: float = field(default=1.0, metadata=_opt("Weight of the loss inside the face mask (needs prep's face masks); 1 = plain loss.", metavar="W"))

    # --- data ---------------------------------------------------------------------------------
    resolution: int = field(default=512, metadata=_opt("Training resolution in pixels; images are resized (short side) and centre-cropped to a square.", metavar="PX"))
    flip: bool = field(default=False, metadata=_opt("Random horizontal flip (both latents are cached)."))
    caption_template: str = field(default="a photo of a face", metadata=_opt("Caption for images without a .txt file.", metavar="TEXT"))
    trigger: str | None = field(default=None, metadata=_opt("Trigger word prepended to every caption.", metavar="WORD"))
    caption_extension: str = field(default=".txt", metadata=_opt("Caption file extension (kohya uses .txt or .caption).", metavar="EXT"))
    caption_dropout: float = field(default=0.0, metadata=_opt("Probability of training a sample with an empty caption.", metavar="P"))
    shuffle_tags: bool = field(default=False, metadata=_opt("Shuffle comma-separated caption tags each time (after the first --keep-tokens)."))
    keep_tokens: int = field(default=0, metadata=_opt("With --shuffle-tags, keep this many leading tags in place.", metavar="N"))
    dataloader_workers: int = field(default=0, metadata=_opt("DataLoader worker processes.", metavar="N"))

    # --- performance --------------------------------------------------------------------------
    mixed_precision: str = field(default="no", metadata=_opt("Mixed precision (bf16/fp16 need a GPU).", choices=("no", "fp16", "bf16")))
    gradient_checkpointing: bool = field(default=False, metadata=_opt("Trade compute for memory in the UNet (and text encoder)."))
    no_cache: bool = field(default=False, metadata=_opt("Do not cache latents/text embeddings: encode every step (for benchmarks)."))

    # --- outputs during training --------------------------------------------------------------
    save_every: int = field(default=0, metadata=_opt("Save a resumable checkpoint every N steps (0 = only at the end).", metavar="N"))
    resume: bool = field(default=False, metadata=_opt("Continue from the last checkpoint in the state folder."))
    ema: float | None = field(default=None, metadata=_opt("Keep an EMA of the adapter with this decay (e.g. 0.999) and export it.", metavar="DECAY"))
    sample_prompts: str | None = field(default=None, metadata=_opt("Text file, one prompt per line, for sample grids during training.", metavar="FILE"))
    sample_every: int = field(default=0, metadata=_opt("Write a sample grid every N steps (0 = off).", metavar="N"))
    sample_steps: int = field(default=20, metadata=_opt("Sampler steps for the sample grids.", metavar="N"))
    save_precision: str = field(default="fp16", metadata=_opt("dtype of the saved LoRA tensors.", choices=("fp16", "bf16", "fp32")))
    logging_dir: str | None = field(default=None, metadata=_opt("Write TensorBoard logs here (when tensorboard is installed).", metavar="DIR"))

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Reject bad settings up front, with one line each, before any model is loaded."""
        if not self.model:
            raise UserError("no base model given: pass --model CKPT (a .safetensors checkpoint or a diffusers folder)")
        if not self.data:
            raise UserError("no dataset given: pass --data DIR (a folder of face images)")
        if not self.output:
            raise UserError("no output given: pass --output FILE.safetensors")
        if not self.output.endswith(".safetensors"):
            raise UserError(f"--output must end in .safetensors (got {self.output!r})")
        for name in ("steps", "rank", "batch_size", "grad_accum", "resolution"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"--epochs must be at least 1 (got {self.epochs})")
        if self.resolution % 8:
            raise UserError(f"--resolution must be a multiple of 8 (got {self.resolution})")
        for name in ("lora_dropout", "caption_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1) (got {getattr(self, name)})")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise UserError(f"--ema must be a decay in (0, 1), e.g. 0.999 (got {self.ema})")
        for name, spec in _field_specs().items():
            if spec["choices"] and getattr(self, name) not in spec["choices"]:
                raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(spec['choices'])} (got {getattr(self, name)!r})")
        return self

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{source}: unknown setting(s) {', '.join(unknown)}; see facediffuser train --help")
        return cls(**values)


# --- CLI / TOML generated from the fields ---------------------------------------------------------

def _field_specs() -> dict[str, dict[str, Any]]:
    return {f.name: dict(f.metadata) for f in fields(TrainConfig)}


def _base_type(tp: Any) -> Any:
    """``int | None`` -> int, ``str`` -> str."""
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is Literal:
        return str
    return args[0] if args else tp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per TrainConfig field; defaults are shown, but parsed values default to None
    so that we can tell what the user set on the command line (it overrides the TOML file)."""
    hints = get_type_hints(TrainConfig)
    parser.add_argument("--config", metavar="FILE.toml", help="Read settings from a TOML file (keys are the flag names with '_'); flags given here override it.")
    for f in fields(TrainConfig):
        spec = f.metadata
        flag = spec.get("flag") or "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        default_text = f" (default: {f.default})" if f.default not in (None, False, "") else ""
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=spec["help"])
        else:
            parser.add_argument(
                flag, dest=f.name, type=tp, default=None, choices=spec.get("choices"),
                metavar=None if spec.get("choices") else spec.get("metavar"),
                help=spec["help"] + default_text,
            )


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p}: not valid TOML ({exc})") from None
    # Accept a flat file or one [train] table.
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    return {k.replace("-", "_"): v for k, v in data.items()}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TOML (if --config) first, then every flag the user actually gave on top."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_toml(args.config))
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return TrainConfig.from_dict(values, source=getattr(args, "config", None) or "arguments").validate()
