"""The training tab's form, generated from the one settings definition, and back to CLI flags.

Every training setting comes from ``trainer.config.setting_specs()`` (the agreed interface: name,
flag, kind, default, optional, bounds, choices, tooltip, group, ...), so a setting added to
``TrainConfig`` appears in the tab with its help text and no change here. :func:`form_fields`
says which widget each setting gets; :func:`values_to_args` turns the widgets' values into the
``facediffuser train`` flags, after :class:`TrainConfig` itself has validated them (one-line
errors, before any child is started). Pure Python: the gradio code is in ``train_tab``.

A few settings are not form fields because the tab owns them: ``model`` (the web UI's checkpoint
list), ``data`` (the dataset box), ``output`` (the name, written into the web UI's Lora folder),
``state_dir``/``cache_dir`` (the run's work folder) and ``resume`` (Start resumes a stopped run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import UserError

TAB_OWNED = frozenset({"model", "data", "output", "state_dir", "cache_dir", "resume"})
GROUPS = ("basic", "advanced", "paths")


def setting_specs() -> list[Any]:
    """``trainer.config.setting_specs()``; until the settings branch provides it, the same list
    derived from the dataclass fields (TEMPORARY SHIM -- delete this fallback at merge)."""
    from ..trainer import config

    if hasattr(config, "setting_specs"):
        return list(config.setting_specs())
    import dataclasses
    from types import SimpleNamespace
    from typing import get_args, get_type_hints

    hints = get_type_hints(config.TrainConfig)
    path_like = {"CKPT", "DIR", "FILE"}
    basic = {"steps", "rank", "alpha", "lr", "batch_size", "resolution", "train_text_encoder", "seed", "trigger",
             "caption_template", "save_every", "flip"}
    paths = {"model", "data", "output", "cache_dir", "state_dir", "init_lora", "sample_prompts", "logging_dir"}
    minimum = {"steps": 1, "rank": 1, "batch_size": 1, "grad_accum": 1, "resolution": 64, "epochs": 1, "conv_rank": 0,
               "lr_warmup_steps": 0, "save_every": 0, "sample_every": 0, "sample_steps": 1, "keep_tokens": 0,
               "dataloader_workers": 0, "lora_dropout": 0.0, "caption_dropout": 0.0}
    maximum = {"lora_dropout": 0.999, "caption_dropout": 0.999, "ema": 0.99999}
    resumable = {"steps", "epochs", "resume", "save_every", "sample_prompts", "sample_every", "sample_steps", "logging_dir",
                 "output", "state_dir", "cache_dir", "dataloader_workers", "save_precision", "no_cache"}
    specs = []
    for f in dataclasses.fields(config.TrainConfig):
        tp = hints[f.name]
        args = [a for a in get_args(tp) if a is not type(None)]
        base = args[0] if args else tp
        md = f.metadata
        kind = ("choice" if md.get("choices") else "bool" if base is bool else "int" if base is int else
                "float" if base is float else "path" if md.get("metavar") in path_like else "str")
        specs.append(SimpleNamespace(
            name=f.name, flag=md.get("flag") or "--" + f.name.replace("_", "-"), kind=kind, default=f.default,
            optional=type(None) in get_args(tp), minimum=minimum.get(f.name), maximum=maximum.get(f.name),
            step=8 if f.name == "resolution" else None, choices=md.get("choices"), tooltip=md.get("help", ""),
            group="paths" if f.name in paths else "basic" if f.name in basic else "advanced",
            affects_weights=f.name not in resumable | {"logging_dir"}, resumable=f.name in resumable, ss_key=None))
    return specs


@dataclass(frozen=True)
class FormField:
    """One widget: ``widget`` is number | checkbox | dropdown | textbox; ``value`` its initial value."""

    name: str
    label: str
    widget: str
    value: Any
    tooltip: str
    group: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    precision: int | None = None  # 0 for integers
    optional: bool = False


_WORDS = {"lr": "LR", "ema": "EMA", "lora": "LoRA", "snr": "SNR"}


def _label(spec: Any) -> str:
    """``min_snr_gamma`` -> ``Min SNR gamma``; optional settings say so (empty = off/default)."""
    words = [_WORDS.get(w, w) for w in spec.name.split("_")]
    words[0] = words[0][:1].upper() + words[0][1:]
    return " ".join(words) + (" (optional)" if spec.optional else "")


def form_fields(specs: Sequence[Any] | None = None) -> list[FormField]:
    """The widgets for every setting the tab does not own, in field order."""
    out = []
    for s in setting_specs() if specs is None else specs:
        if s.name in TAB_OWNED:
            continue
        common = dict(name=s.name, label=_label(s), tooltip=s.tooltip, group=s.group if s.group in GROUPS else "advanced",
                      optional=bool(s.optional))
        if s.kind == "bool":
            out.append(FormField(widget="checkbox", value=bool(s.default), **common))
        elif s.kind == "choice":
            out.append(FormField(widget="dropdown", value=s.default, choices=tuple(s.choices), **common))
        elif s.kind in ("int", "float"):
            out.append(FormField(widget="number", value=s.default, minimum=s.minimum, maximum=s.maximum, step=s.step,
                                 precision=0 if s.kind == "int" else None, **common))
        else:  # str, path
            out.append(FormField(widget="textbox", value="" if s.default is None else str(s.default), **common))
    return out


def _coerce(spec: Any, value: Any) -> Any:
    """A widget's value as the setting's type; empty optional values are None."""
    if spec.kind == "bool":
        return bool(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        if spec.optional:
            return None
        if spec.kind in ("str", "path") and isinstance(value, str):
            return value
        raise UserError(f"{_label(spec)}: a value is required")
    try:
        if spec.kind == "int":
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        if spec.kind == "float":
            return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{_label(spec)}: {value!r} is not a{'n integer' if spec.kind == 'int' else ' number'}") from None
    return str(value).strip() if spec.kind in ("str", "path", "choice") else value


def build_config(values: dict[str, Any], *, model: str, data: str, output: str, state_dir: str, cache_dir: str,
                 specs: Sequence[Any] | None = None) -> Any:
    """A validated TrainConfig from the form's values plus the tab-owned ones."""
    from ..trainer.config import TrainConfig

    specs = setting_specs() if specs is None else specs
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise UserError(f"unknown training setting(s): {', '.join(unknown)}")
    kw = {name: _coerce(by_name[name], v) for name, v in values.items() if name not in TAB_OWNED}
    for s in specs:  # bounds the form widgets also show
        v = kw.get(s.name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if s.minimum is not None and v < s.minimum:
                raise UserError(f"{_label(s)} must be at least {s.minimum} (got {v})")
            if s.maximum is not None and v > s.maximum:
                raise UserError(f"{_label(s)} must be at most {s.maximum} (got {v})")
    cfg = TrainConfig(**kw, model=model, data=data, output=output, state_dir=state_dir, cache_dir=cache_dir)
    return cfg.validate()


def config_to_args(config: Any, *, specs: Sequence[Any] | None = None) -> list[str]:
    """The ``facediffuser train`` flags that rebuild ``config`` (every setting that is not None or
    a False flag; ``resume`` is the runner's)."""
    specs = setting_specs() if specs is None else specs
    args: list[str] = []
    for s in specs:
        if s.name == "resume":
            continue
        v = getattr(config, s.name)
        if s.kind == "bool":
            if v:
                args.append(s.flag)
            elif s.default:
                raise UserError(f"{_label(s)} defaults to on and the CLI has no flag to turn it off")
            continue
        if v is None:
            continue
        args += [s.flag, repr(v) if isinstance(v, float) else str(v)]
    return args
