"""Offline CLIP tokenizers for SD1.x and SD2.x, built from the BPE files shipped in the package.

Why: training and caching text embeddings must work with no network and no hub cache, and must
produce exactly the token ids the text encoders were trained on. Both SD families use the same
49,408-token OpenAI CLIP BPE (``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407, 77 positions);
they differ only in padding:

* ``"sd15"`` (SD1.x, OpenAI CLIP ViT-L/14): pads with ``<|endoftext|>`` (49407), as the Hugging Face
  ``openai/clip-vit-large-patch14`` tokenizer that SD1.x (CompVis ``FrozenCLIPEmbedder``) used.
* ``"sd2"`` / ``"sd2-v"`` (OpenCLIP ViT-H/14): pads with id 0 (the token ``!``), as OpenCLIP's
  ``tokenize`` did when SD2 was trained and as ``stabilityai/stable-diffusion-2``'s tokenizer does.
  Unlike that hub tokenizer we do **not** register ``!`` as a special (added) token: there, a ``!``
  typed in a prompt is split out before BPE and becomes the pad id 0, so ``"wow!!!"`` no longer
  tokenizes as OpenCLIP did (diffusers issue #4153). Here ``!`` in text stays BPE (``!!!`` -> 995) and
  only the padding uses id 0 — the OpenCLIP ids, and what ComfyUI's SD2 tokenizer produces.

Known differences from OpenCLIP's ``SimpleTokenizer`` (pinned by ``tests/test_tokenizer.py``):
the returned tokenizer is transformers' ``CLIPTokenizer``, whose text cleaning is Unicode NFC,
whitespace runs -> one space, lowercase. OpenCLIP additionally runs ``ftfy.fix_text`` and
``html.unescape`` twice before that, and lowercases with Python's ``str.lower``. So prompts that
contain HTML entities (``&amp;``), curly quotes (``’`` -> ``'``), Latin ligatures and digraphs
(``ﬁ ﬀ ǅ Ǆ ŉ``), full-width forms (``ＡＢＣ``, ``１２``), control characters, mojibake (``cafÃ©``), or a
capital Greek sigma ending a word (``ΟΔΟΣ``: Python's final-sigma rule gives ``ς``, the tokenizers
``Lowercase`` gives ``σ``) tokenize differently; on every other prompt the ids are identical. The text
``<|startoftext|>`` / ``<|endoftext|>`` typed in a prompt becomes the special id here (it is BPE text
in OpenCLIP, whose own special strings are ``<start_of_text>`` / ``<end_of_text>``). diffusers and
ComfyUI (with transformers 5) tokenize with this same ``CLIPTokenizer``, so training here matches
what they feed the model at inference.

Truncation: ``tokenizer(text, padding="max_length", max_length=77, truncation=True)`` keeps
``<|startoftext|>`` + the first 75 text tokens + ``<|endoftext|>``, as OpenCLIP does.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # transformers is heavy: import it only when a tokenizer is built
    from transformers import CLIPTokenizer

TOKENIZER_DIR: Path = Path(__file__).resolve().parent / "model_files" / "tokenizer"
"""The shipped files (Hugging Face layout, SD1 settings): ``CLIPTokenizer.from_pretrained`` loads it."""

REQUIRED_FILES: tuple[str, ...] = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407

# family -> pad id. SD1 pads with <|endoftext|>; SD2 (OpenCLIP) with 0, the token "!".
_PAD_IDS: dict[str, int] = {"sd15": EOS_ID, "sd2": 0, "sd2-v": 0}
FAMILIES: tuple[str, ...] = tuple(_PAD_IDS)


def tokenizer_files_dir() -> Path:
    """The folder with the shipped tokenizer files, after checking they are all there."""
    missing = [name for name in REQUIRED_FILES if not (TOKENIZER_DIR / name).is_file()]
    if missing:
        raise UserError(
            f"the CLIP tokenizer files {', '.join(missing)} are missing from {TOKENIZER_DIR}; "
            "reinstall facediffuser or regenerate them with `python tools/make_tokenizer_files.py`"
        )
    return TOKENIZER_DIR


def load_tokenizer(family: str) -> CLIPTokenizer:
    """The CLIP tokenizer of a model family ("sd15", "sd2" or "sd2-v"), offline, cached per family.

    The returned object is shared between callers: do not mutate it.
    """
    key = str(family).strip().lower()
    if key not in _PAD_IDS:
        raise UserError(f"unknown model family {family!r} for the CLIP tokenizer; expected one of {', '.join(FAMILIES)}")
    return _load(key)


@functools.lru_cache(maxsize=len(FAMILIES))  # one per family (a few MB each); tokenizers hold no device memory
def _load(family: str) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    folder = tokenizer_files_dir()
    try:
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=MODEL_MAX_LENGTH)
    except (OSError, ValueError) as exc:  # a corrupt or truncated file
        raise UserError(
            f"cannot read the CLIP tokenizer files in {folder} ({type(exc).__name__}: {exc}); "
            "regenerate them with `python tools/make_tokenizer_files.py`"
        ) from exc
    if len(tok) != VOCAB_SIZE or tok.bos_token_id != BOS_ID or tok.eos_token_id != EOS_ID:
        raise UserError(
            f"the CLIP tokenizer files in {folder} are not the OpenAI CLIP BPE "
            f"({len(tok)} tokens, bos {tok.bos_token_id}, eos {tok.eos_token_id}); "
            "regenerate them with `python tools/make_tokenizer_files.py`"
        )
    pad_id = _PAD_IDS[family]
    if tok.pad_token_id != pad_id:
        # Setting the id (not pad_token="!") keeps "!" an ordinary BPE token in prompt text.
        tok.pad_token_id = pad_id
    return tok
