"""The training tab's form, generated from the one settings definition, and back to CLI flags.

Every training setting comes from ``trainer.config.setting_specs()`` (the agreed interface: name,
flag, kind, default, optional, bounds, choices, tooltip, group, ...), so a setting added to
``TrainConfig`` appears in the tab with its help text and no change here. :func:`form_fields`
says which widget each setting gets; :func:`values_to_args` turns the widgets' values into the
``facediffuser train`` flags, after :class:`TrainConfig` itself has validated them (its own
type and range checks, the CLI's one-line errors, before any child is started). Pure Python: the
gradio code is in ``train_tab``.

A few settings are not form fields because the tab owns them: ``model`` (the web UI's checkpoint
list), ``data`` (the dataset box), ``output`` (the name, written into the web UI's Lora folder),
``state_dir``/``cache_dir`` (the run's work folder) and ``resume`` (Start resumes a stopped run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import UserError
from ..trainer.config import SettingSpec, TrainConfig, setting_specs

TAB_OWNED = frozenset({"model", "data", "output", "state_dir", "cache_dir", "resume"})


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


def _label(spec: SettingSpec) -> str:
    """``min_snr_gamma`` -> ``Min SNR gamma``; optional settings say so (empty = off/default)."""
    words = [_WORDS.get(w, w) for w in spec.name.split("_")]
    words[0] = words[0][:1].upper() + words[0][1:]
    return " ".join(words) + (" (optional)" if spec.optional else "")


def form_fields(specs: Sequence[SettingSpec] | None = None) -> list[FormField]:
    """The widgets for every setting the tab does not own, in field order."""
    out = []
    for s in setting_specs() if specs is None else specs:
        if s.name in TAB_OWNED:
            continue
        common = dict(name=s.name, label=_label(s), tooltip=s.tooltip, group=s.group,
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


def _coerce(spec: SettingSpec, value: Any) -> Any:
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
                 specs: Sequence[SettingSpec] | None = None) -> TrainConfig:
    """A validated TrainConfig from the form's values plus the tab-owned ones: the widgets' values
    are turned into the settings' types here; types, choices and bounds are checked by
    :class:`TrainConfig` (the same checks and messages as the CLI's)."""
    specs = setting_specs() if specs is None else specs
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise UserError(f"unknown training setting(s): {', '.join(unknown)}")
    kw = {name: _coerce(by_name[name], v) for name, v in values.items() if name not in TAB_OWNED}
    kw.update(model=model, data=data, output=output, state_dir=state_dir, cache_dir=cache_dir)
    return TrainConfig.from_dict(kw, source="FaceDiffuser tab").validate()


def config_to_args(config: TrainConfig, *, specs: Sequence[SettingSpec] | None = None) -> list[str]:
    """The ``facediffuser train`` flags that rebuild ``config``: every setting that differs from
    its default (a boolean as ``--x``/``--no-x``; an unset optional with a default as ``""``, the
    one spelling of unset); ``resume`` is the runner's."""
    specs = setting_specs() if specs is None else specs
    args: list[str] = []
    for s in specs:
        v = getattr(config, s.name)
        if s.name == "resume" or v == s.default:
            continue
        if s.kind == "bool":
            args.append(s.flag if v else s.negative_flag)
        elif v is None:
            args += [s.flag, ""]
        else:
            args += [s.flag, repr(v) if isinstance(v, float) else str(v)]
    return args
