"""Caption rules: file vs template, trigger, whitespace, dropout/shuffle under a seed, tag frequency."""

from __future__ import annotations

import pytest
import torch

from facediffuser.errors import UserError
from facediffuser.trainer.captions import (
    add_trigger,
    augment_caption,
    build_caption,
    normalize_caption,
    shuffle_tags,
    tag_frequency,
)


def test_caption_file_is_stripped_and_whitespace_normalised(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("\ufeff  smiling woman,\n\tred   hair \n\n", encoding="utf-8")
    assert build_caption(p, "template") == "smiling woman, red hair"


def test_missing_or_empty_caption_file_gives_template(tmp_path):
    empty = tmp_path / "e.txt"
    empty.write_text(" \n", encoding="utf-8")
    assert build_caption(None, "a photo of  a face") == "a photo of a face"
    assert build_caption(empty, "a photo of a face") == "a photo of a face"


def test_non_utf8_caption_is_a_one_line_user_error(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"caf\xe9\xff\xfe")
    with pytest.raises(UserError, match="bad.txt is not UTF-8"):
        build_caption(p, "t")


@pytest.mark.parametrize(
    ("caption", "trigger", "expected"),
    [
        ("a photo of a face", "sks", "sks, a photo of a face"),
        ("sks, a photo of a face", "sks", "sks, a photo of a face"),
        ("a photo of SKS person", "sks", "a photo of SKS person"),  # present as a word: not doubled
        ("a photo of asks person", "sks", "sks, a photo of asks person"),  # inside a word: not present
        ("", "sks", "sks"),
        ("a face", None, "a face"),
        ("a face", "  ", "a face"),
        ("a face", "ohwx  man", "ohwx man, a face"),
    ],
)
def test_trigger_prepended_kohya_style_and_not_doubled(caption, trigger, expected):
    assert add_trigger(caption, trigger) == expected


def test_trigger_applies_to_template_and_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("blue eyes", encoding="utf-8")
    assert build_caption(p, "t", "sks") == "sks, blue eyes"
    assert build_caption(None, "a photo of a face", "sks") == "sks, a photo of a face"


def test_normalize_caption():
    assert normalize_caption(" a\n\n b\t c ") == "a b c"


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shuffle_keeps_first_n_tags_and_is_a_permutation():
    cap = "sks, woman, red hair, smiling, outdoors, glasses, hat"
    seen = set()
    for seed in range(30):
        out = shuffle_tags(cap, 2, _g(seed))
        tags = out.split(", ")
        assert tags[:2] == ["sks", "woman"]
        assert sorted(tags) == sorted(cap.split(", "))
        seen.add(out)
    assert len(seen) > 5  # it really shuffles


def test_dropout_and_shuffle_reproducible_under_a_seed():
    cap = "sks, a, b, c, d, e, f"
    run1 = [augment_caption(cap, dropout=0.3, shuffle=True, keep_tokens=1, generator=_g(7)) for _ in range(1)]
    g1, g2 = _g(123), _g(123)
    seq1 = [augment_caption(cap, dropout=0.3, shuffle=True, keep_tokens=1, generator=g1) for _ in range(200)]
    seq2 = [augment_caption(cap, dropout=0.3, shuffle=True, keep_tokens=1, generator=g2) for _ in range(200)]
    assert seq1 == seq2
    seq3 = [augment_caption(cap, dropout=0.3, shuffle=True, keep_tokens=1, generator=_g(124)) for _ in range(200)]
    assert seq3 != seq1
    dropped = sum(s == "" for s in seq1)
    assert 30 < dropped < 95  # ~60 of 200 at p=0.3
    assert all(s == "" or s.startswith("sks, ") for s in seq1)
    assert run1[0] == augment_caption(cap, dropout=0.3, shuffle=True, keep_tokens=1, generator=_g(7))


def test_no_augmentation_returns_caption_and_zero_dropout_never_drops():
    cap = "sks, a, b"
    g = _g(0)
    assert all(augment_caption(cap, dropout=0.0, generator=g) == cap for _ in range(100))


def test_tag_frequency_kohya_shape():
    caps = ["sks, woman, smiling", "sks, woman", "sks, man"]
    freq = tag_frequency(caps, ["10_faces", "10_faces", "other"])
    assert freq == {"10_faces": {"sks": 2, "woman": 2, "smiling": 1}, "other": {"sks": 1, "man": 1}}
