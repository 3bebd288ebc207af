"""Prompt files, one rule for every reader (``eval table --prompts``, ``generate --prompts``,
the trainer's ``--sample-prompts``): UTF-8 text (a BOM is fine), one prompt per line, runs of
white space folded to one space; blank lines and lines whose first non-blank character is ``#``
are skipped."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


def read_prompts(path: str | os.PathLike, *, flag: str = "--prompts") -> list[str]:
    """The prompts in ``path``; a one-line UserError naming ``flag`` and the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag}: prompts file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{flag}: prompts file {p} is not UTF-8 text") from None
    prompts = [" ".join(line.split()) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"{flag}: prompts file {p} has no prompts (one per line; blank lines and # comments are skipped)")
    return prompts
