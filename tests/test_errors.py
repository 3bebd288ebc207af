"""UserError: one line, and never caught by an ``except ValueError`` meant for library errors."""

from __future__ import annotations

import json

import pytest

from facediffuser.errors import UserError


def test_user_error_is_not_a_value_error():
    assert not issubclass(UserError, ValueError)

    def parse(text: str) -> dict:
        try:
            data = json.loads(text)
        except ValueError:  # the library's error: a handler like this must not swallow ours
            return {}
        if not isinstance(data, dict):
            raise UserError(f"expected a JSON object, got {type(data).__name__}")
        return data

    assert parse("not json") == {}
    with pytest.raises(UserError, match="expected a JSON object, got list"):
        parse("[1, 2]")


def test_message_is_one_line():
    assert str(UserError("a\n  b\tc ")) == "a b c"


def test_kohya_loader_reports_our_message_not_a_generic_one(tmp_path):
    """load_kohya_lora raises a UserError inside a try that catches library ValueErrors: ours
    must come out as written (it names the real problem), not re-wrapped as "not readable"."""
    import torch
    from safetensors.torch import save_file

    from facediffuser.trainer.kohya_format import load_kohya_lora

    path = tmp_path / "full.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(2)}, str(path))
    with pytest.raises(UserError, match="is not a kohya LoRA: .*full model checkpoint"):
        load_kohya_lora(path)
