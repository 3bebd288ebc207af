"""One prompt-file rule for the evaluation table, ``generate`` and the trainer's sample grids."""

from __future__ import annotations

import pytest

from facediffuser.errors import UserError
from facediffuser.sd.prompts import read_prompts

TEXT = "\ufeff# portraits\n  a photo of sks,   smiling \n\n   # indented comment\nsks\tin a hat\n \n"


def test_rule_comments_blank_lines_and_white_space(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text(TEXT, encoding="utf-8")
    assert read_prompts(p) == ["a photo of sks, smiling", "sks in a hat"]


def test_trainer_and_evaluation_read_the_same_prompts(tmp_path):
    from facediffuser.evaluation.table import choose_prompts
    from facediffuser.trainer.config import TrainConfig
    from facediffuser.trainer.training_loop import _read_prompts

    p = tmp_path / "prompts.txt"
    p.write_text(TEXT, encoding="utf-8")
    table, source = choose_prompts(str(p), [], tmp_path / "unused.safetensors")
    assert _read_prompts(TrainConfig(sample_prompts=str(p))) == table == read_prompts(p) and source == f"file {p}"


def test_errors_name_the_flag_and_the_file(tmp_path):
    with pytest.raises(UserError, match=r"^--sample-prompts: prompts file not found: .*nope.txt$"):
        read_prompts(tmp_path / "nope.txt", flag="--sample-prompts")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(UserError, match=r"^--prompts: prompts file .*empty.txt has no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        read_prompts(tmp_path / "latin1.txt")
