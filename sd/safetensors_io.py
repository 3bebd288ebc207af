"""Byte-reproducible .safetensors files, written atomically.

The safetensors library serialises the header from a hash map, so its key order (and therefore the
file's bytes) changes from one process to the next. A LoRA resumed after a crash, or a checkpoint
rebuilt from the same seed, must be byte-identical to the original, so every file we write gets a
canonical header: compact JSON with sorted keys, space-padded so the data starts 8-byte aligned
(as the format requires). The data section is never touched, so kohya's ``sshs_model_hash``
(sha256 of the bytes after the header) is the same before and after.
"""

from __future__ import annotations

import json
from typing import Any


def encode_header(header: dict[str, Any]) -> bytes:
    """The 8-byte little-endian length followed by the canonical JSON header."""
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def split_blob(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """A serialised safetensors file -> (header dict, data section)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def canonicalize(blob: bytes) -> bytes:
    """Re-encode a serialised file's header canonically; tensor data and offsets are unchanged."""
    header, data = split_blob(blob)
    return encode_header(header) + data


