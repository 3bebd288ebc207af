"""Nothing half-written: every file the project writes goes through here.

A file appears under its final name only once it is complete (written beside it as
``<name>.tmp-<pid>``, then renamed over it, which is atomic on one filesystem), so a crash, a kill
or a full disk leaves the old file or no file, never a torn one that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds,
    delete it otherwise. Writers that pick a format from the file name need an explicit format."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Bytes to ``path`` atomically (fsync'd first, so the rename never exposes unwritten data)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=False)


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


def atomic_write_png(image: Any, path: str | os.PathLike[str]) -> Path:
    """A PIL image to ``path`` as PNG, atomically (the format is explicit: the temp name has none)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


# --- content digests ------------------------------------------------------------------------------

def file_sha256(source: str | os.PathLike[str] | bytes, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (a 2 GB checkpoint never sits in memory);
    ``bytes`` already read are hashed as they are. Every content digest in the project is this."""
    h = hashlib.sha256()
    if isinstance(source, (bytes, bytearray, memoryview)):
        h.update(source)
        return h.hexdigest()
    with open(source, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
