"""Generate the CLIP BPE tokenizer files shipped in ``sd/model_files/tokenizer/``.

Why: the trainer must tokenize prompts fully offline, without the Hugging Face hub. The OpenAI CLIP
BPE table (the one SD1.x's ViT-L/14 and SD2.x's OpenCLIP ViT-H/14 both use) is distributed under the
MIT licence inside the ``open_clip_torch`` wheel as ``bpe_simple_vocab_16e6.txt.gz``. This script turns
that table into the Hugging Face ``CLIPTokenizer`` layout (``vocab.json``, ``merges.txt``,
``tokenizer_config.json``, ``special_tokens_map.json``) plus a ``NOTICE`` with the licence texts.

The construction is the one the original CLIP code performs at start-up: 256 byte symbols, the same
256 symbols with the end-of-word marker ``</w>``, then the first 48,894 merges (in rank order), then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407) — 49,408 tokens in all.

Deterministic: the source file is checked against a pinned SHA-256 and the outputs depend on nothing
else (no timestamps, no dict-order surprises). Run it twice and the bytes are identical; ``--check``
verifies that the shipped files are exactly what this script produces.

Usage::

    python tools/make_tokenizer_files.py            # (re)write the package files
    python tools/make_tokenizer_files.py --check    # exit 1 if the shipped files differ
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

# SHA-256 of the *decompressed* bpe_simple_vocab_16e6.txt (identical in openai/CLIP and open_clip).
SOURCE_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
SOURCE_NAME = "bpe_simple_vocab_16e6.txt.gz"

N_MERGES = 49152 - 256 - 2  # what the CLIP code keeps of the table: 48,894 merges
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
MAX_LENGTH = 77

OUT_DIR = Path(__file__).resolve().parent.parent / "sd" / "model_files" / "tokenizer"

OPENAI_CLIP_LICENSE = """\
MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character table of GPT-2/CLIP byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards, in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # CLIP's vocabulary lists the printable bytes first, then the remapped ones.
    return {b: table[b] for b in printable + [b for b in range(256) if b not in printable]}


def find_source() -> tuple[Path, Path | None]:
    """Locate open_clip's BPE table and its licence file without importing open_clip (torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip is not installed: pip install open-clip-torch (it ships the MIT BPE table)")
    src = Path(list(spec.submodule_search_locations)[0]) / SOURCE_NAME
    if not src.is_file():
        raise SystemExit(f"{src} not found in the installed open_clip")
    licence = None
    try:
        dist = importlib.metadata.distribution("open_clip_torch")
        for f in dist.files or []:
            if f.name.upper().startswith("LICENSE"):
                licence = Path(dist.locate_file(f))
                break
    except importlib.metadata.PackageNotFoundError:
        pass
    return src, licence


def read_merges(src: Path) -> list[str]:
    """The kept merges of the table, after checking the file is the pinned one."""
    raw = gzip.decompress(src.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SOURCE_SHA256:
        raise SystemExit(f"{src}: SHA-256 {digest} is not the pinned CLIP BPE table {SOURCE_SHA256}")
    lines = raw.decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]  # line 0 is the '#version' header
    for m in merges:
        if len(m.split()) != 2:
            raise SystemExit(f"{src}: unexpected merge line {m!r}")
    return merges


def build_vocab(merges: list[str]) -> dict[str, int]:
    """Token -> id, in the order of the original CLIP vocabulary."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
        raise SystemExit(f"built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def render(src: Path, licence: Path | None) -> dict[str, bytes]:
    """File name -> exact bytes of every generated file."""
    merges = read_merges(src)
    vocab = build_vocab(merges)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    open_clip_licence = (
        licence.read_text(encoding="utf-8").strip() + "\n"
        if licence is not None and licence.is_file()
        else "(open_clip_torch licence file not found; open_clip is MIT-licensed)\n"
    )
    notice = (
        "CLIP BPE tokenizer files (vocab.json, merges.txt) for FaceDiffuser\n"
        "=====================================================================\n\n"
        "vocab.json and merges.txt are generated by tools/make_tokenizer_files.py from\n"
        f"'{SOURCE_NAME}' (decompressed SHA-256 {SOURCE_SHA256}),\n"
        "the byte-pair-encoding table of OpenAI CLIP, as redistributed in the open_clip_torch\n"
        "package (https://github.com/mlfoundations/open_clip). The table originates from\n"
        "https://github.com/openai/CLIP. Both are released under the MIT licence; their\n"
        "notices follow.\n\n"
        "---------------------------------------------------------------------\n"
        "OpenAI CLIP (https://github.com/openai/CLIP)\n"
        "---------------------------------------------------------------------\n"
        f"{OPENAI_CLIP_LICENSE}\n"
        "---------------------------------------------------------------------\n"
        "OpenCLIP (https://github.com/mlfoundations/open_clip)\n"
        "---------------------------------------------------------------------\n"
        f"{open_clip_licence}"
    )

    def as_json(obj: object) -> bytes:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    return {
        "vocab.json": as_json(vocab),
        "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"),
        "tokenizer_config.json": as_json(config),
        "special_tokens_map.json": as_json(special),
        "NOTICE": notice.encode("utf-8"),
    }


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: the package's)")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if any file differs")
    args = parser.parse_args(argv)

    files = render(*find_source())
    if args.check:
        bad = [n for n, data in files.items() if not (args.out / n).is_file() or (args.out / n).read_bytes() != data]
        for n in bad:
            print(f"differs: {args.out / n}", file=sys.stderr)
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_atomic(args.out / name, data)
        print(f"{args.out / name}  {len(data):>9} bytes  sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
