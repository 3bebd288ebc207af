"""Captions: where each image's text comes from, and the per-step caption augmentations.

Rules (kohya-compatible where kohya has a rule):

* an image's caption is its caption file (``<stem>.txt`` by default), read as UTF-8 (a BOM is fine),
  with all whitespace, newlines included, collapsed to single spaces; an empty or missing file gives
  the template (``config.caption_template``);
* the trigger word is prepended as the first tag, ``"<trigger>, <caption>"``, unless the caption
  already contains it as a word (case-insensitive), so that hand-written captions are not doubled;
* per step, caption dropout (probability ``p`` -> empty caption) and tag shuffling (comma-separated
  tags after the first ``keep_tokens`` are permuted) draw from a ``torch.Generator`` the caller
  passes in, so a seed reproduces them exactly, whatever the DataLoader workers do;
* ``tag_frequency`` counts the tags of the final (trigger included) captions per folder, the shape
  kohya writes to ``ss_tag_frequency`` and A1111 shows in its LoRA card.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import UserError

if TYPE_CHECKING:
    import torch


def normalize_caption(text: str) -> str:
    """Strip and collapse every run of whitespace (newlines, tabs) to one space."""
    return " ".join(text.split())


def read_caption_file(path: str | Path) -> str:
    """The normalised text of a caption file; UserError (one line) when it is not UTF-8 text."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read caption file {p} ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"caption file {p.name} is not UTF-8 text") from None
    return normalize_caption(text)


def has_trigger(caption: str, trigger: str) -> bool:
    """Whether ``trigger`` occurs in ``caption`` as a whole word/phrase (case-insensitive)."""
    trig = normalize_caption(trigger)
    if not trig:
        return True
    return re.search(r"(?<!\w)" + re.escape(trig) + r"(?!\w)", caption, flags=re.IGNORECASE) is not None


def add_trigger(caption: str, trigger: str | None) -> str:
    """``"<trigger>, <caption>"`` (kohya style); unchanged when the trigger is already there."""
    if not trigger or not normalize_caption(trigger):
        return caption
    trig = normalize_caption(trigger)
    if not caption:
        return trig
    if has_trigger(caption, trig):
        return caption
    return f"{trig}, {caption}"


def build_caption(caption_path: str | Path | None, template: str, trigger: str | None = None) -> str:
    """The base caption of one image: file text (or the template when absent/empty) + trigger."""
    text = read_caption_file(caption_path) if caption_path is not None else ""
    if not text:
        text = normalize_caption(template)
    return add_trigger(text, trigger)


def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empties dropped."""
    return [t.strip() for t in caption.split(",") if t.strip()]


def shuffle_tags(caption: str, keep_tokens: int, generator: "torch.Generator") -> str:
    """Permute the tags after the first ``keep_tokens`` (kohya ``--shuffle_caption``)."""
    import torch

    tags = split_tags(caption)
    keep = max(0, keep_tokens)
    head, tail = tags[:keep], tags[keep:]
    if len(tail) > 1:
        order = torch.randperm(len(tail), generator=generator).tolist()
        tail = [tail[i] for i in order]
    return ", ".join(head + tail)


def augment_caption(caption: str, *, dropout: float = 0.0, shuffle: bool = False, keep_tokens: int = 0,
                    generator: "torch.Generator") -> str:
    """One training view of a caption: dropout (-> ``""``) then tag shuffle.

    The dropout draw always happens first (when ``dropout > 0``), so shuffled orders stay the same
    function of the generator state whether or not a caption was dropped.
    """
    import torch

    if dropout > 0.0:
        dropped = bool(torch.rand((), generator=generator).item() < dropout)
        if dropped:
            return ""
    if shuffle:
        return shuffle_tags(caption, keep_tokens, generator)
    return caption


def tag_frequency(captions: Sequence[str], folders: Sequence[str]) -> dict[str, dict[str, int]]:
    """kohya-style ``{folder_name: {tag: count}}`` over the base captions."""
    out: dict[str, Counter[str]] = {}
    for cap, folder in zip(captions, folders, strict=True):
        out.setdefault(folder, Counter()).update(split_tags(cap))
    return {folder: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for folder, c in out.items()}
