"""The training tab's form is generated from the settings definition and goes back to exactly the
TrainConfig the CLI builds from the flags it produces."""

from __future__ import annotations

import dataclasses

import pytest

from facediffuser import cli
from facediffuser.errors import UserError
from facediffuser.sdwebui.settings_form import TAB_OWNED, build_config, config_to_args, form_fields
from facediffuser.trainer.config import TrainConfig, config_from_args, setting_specs

OWNED = dict(model="m.safetensors", data="faces", output="/loras/face.safetensors", state_dir="/w/state", cache_dir="/w/cache")


def _cli_config(args: list[str]) -> TrainConfig:
    return config_from_args(cli.build_parser().parse_args(["train", *args]))


def test_every_setting_is_a_form_field_or_owned_by_the_tab():
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    fields = form_fields()
    assert [f.name for f in fields] == [n for n in names if n not in TAB_OWNED]  # all of them, in field order
    assert TAB_OWNED <= set(names)
    by_name = {f.name: f for f in fields}
    help_texts = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(TrainConfig)}
    for f in fields:
        assert f.tooltip == help_texts[f.name]  # the CLI's help text, not a re-declared one
    assert by_name["train_text_encoder"].widget == "checkbox" and by_name["train_text_encoder"].value is False
    assert by_name["optimizer"].widget == "dropdown" and by_name["optimizer"].choices == choices["optimizer"]
    assert {"adamw", "adamw8bit", "prodigy"} <= set(by_name["optimizer"].choices)
    assert by_name["rank"].widget == "number" and by_name["rank"].precision == 0 and by_name["rank"].value == 16
    assert by_name["lr"].widget == "number" and by_name["lr"].precision is None
    assert by_name["trigger"].widget == "textbox" and by_name["trigger"].optional and by_name["trigger"].value == ""
    assert {f.group for f in fields} <= {"basic", "advanced", "paths"}


def test_the_form_is_the_settings_definition():
    # kinds, bounds and choices are the specs' own: a setting added to TrainConfig needs no change here
    by_name = {f.name: f for f in form_fields()}
    for s in setting_specs():
        if s.name in TAB_OWNED:
            continue
        f = by_name[s.name]
        assert f.widget == {"bool": "checkbox", "choice": "dropdown", "int": "number", "float": "number"}.get(s.kind, "textbox")
        assert (f.minimum, f.maximum, f.step, f.group, f.optional) == (s.minimum, s.maximum, s.step, s.group, s.optional)
        assert f.choices == s.choices


def test_form_defaults_give_the_cli_defaults():
    values = {f.name: f.value for f in form_fields()}
    config = build_config(values, **OWNED)
    assert config == TrainConfig(**OWNED)
    assert _cli_config(config_to_args(config)) == config


def test_changed_values_of_every_kind_round_trip_through_the_cli_flags():
    values = {f.name: f.value for f in form_fields()}
    values.update(steps=250.0, rank="8", alpha=4, lr=3e-5, text_encoder_lr="", train_text_encoder=True, optimizer="adamw8bit",
                  lr_scheduler="cosine", min_snr_gamma=5.0, trigger="  sks  ", caption_template="a portrait, photo", flip=True,
                  ema=0.999, save_every=50, resolution=256, init_lora="", epochs=None)
    config = build_config(values, **OWNED)
    assert (config.steps, config.rank, config.alpha, config.text_encoder_lr, config.trigger, config.init_lora) == (250, 8, 4.0, None, "sks", None)
    back = _cli_config(config_to_args(config))
    assert back == config
    assert back.to_dict() == config.to_dict()


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "--steps must be between 1 and 1000000 \\(got 0\\)"),
    ({"rank": 2.5}, "is not an integer"),
    ({"lr": "fast"}, "is not a number"),
    ({"resolution": 100}, "multiple of 8"),
    ({"optimizer": "sgd"}, "must be one of adamw, adamw8bit"),
    ({"steps": ""}, "a value is required"),
])
def test_bad_values_are_one_line_errors_before_anything_starts(change, message):
    values = {f.name: f.value for f in form_fields()} | change
    with pytest.raises(UserError, match=message) as err:
        build_config(values, **OWNED)
    assert "\n" not in str(err.value)


def test_unknown_setting_is_refused():
    with pytest.raises(UserError, match="unknown training setting"):
        build_config({"learning_rate": 1e-4}, **OWNED)
