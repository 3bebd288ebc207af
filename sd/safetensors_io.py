"""The .safetensors header: read without loading a tensor, and written byte-reproducibly.

:func:`read_header` / :func:`read_metadata` are the one way the project looks into a file it has
not loaded (model family detection, a LoRA's training metadata, the node's info text, the
evaluation's overlap guard): the 8-byte length, the JSON header, checked for a whole file. Pure
Python (json + struct), so it runs in any host process whatever its safetensors/torch versions.

The safetensors library serialises the header from a hash map, so its key order (and therefore the
file's bytes) changes from one process to the next. A LoRA resumed after a crash, or a checkpoint
rebuilt from the same seed, must be byte-identical to the original, so every file we write gets a
canonical header: compact JSON with sorted keys, space-padded so the data starts 8-byte aligned
(as the format requires). The data section is never touched, so kohya's ``sshs_model_hash``
(sha256 of the bytes after the header) is the same before and after.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

#: the format caps the header at 100 MB; a bigger length means the file is not safetensors
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class Header:
    """A file's tensor entries (name -> ``{"dtype", "shape", "data_offsets"}``), their shapes and
    its ``__metadata__`` strings."""

    tensors: dict[str, dict[str, Any]]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike) -> Header:
    """The header of a .safetensors file, checking it is whole (no tensor is read). A one-line
    UserError naming the file when it is not safetensors, is malformed or is truncated."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a valid safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise UserError(f"{path}: not a valid safetensors file (bad header length; is it really a .safetensors?)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: not a valid safetensors file (unreadable header)") from None
    meta = header.pop("__metadata__", None) or {}
    shapes: dict[str, tuple[int, ...]] = {}
    end = 0
    try:
        for key, info in header.items():
            shapes[key] = tuple(int(d) for d in info["shape"])
            end = max(end, int(info["data_offsets"][1]))
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"{path}: not a valid safetensors file (malformed tensor entry)") from None
    if 8 + n + end > size:
        raise UserError(f"{path}: safetensors file is truncated ({size} of {8 + n + end} bytes); download it again")
    return Header(header, shapes, {str(k): str(v) for k, v in meta.items()})


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Just the ``__metadata__`` strings of a .safetensors file (see :func:`read_header`)."""
    return read_header(path).metadata


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


