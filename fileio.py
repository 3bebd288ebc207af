"""Nothing half-written: every file the project writes goes through here.

A file appears under its final name only once it is complete (written beside it under a temp name,
then renamed over it, which is atomic on one filesystem), so a crash, a kill or a full disk leaves
the old file or no file, never a torn one that a later run would trust.

The temp name is unique per writer -- ``<name>.tmp-<pid>-<thread id>-<random>``, reserved with
``O_EXCL`` -- so two threads of one server (or two processes) writing the same target never write
into, rename or delete each other's temp file: the last rename wins and the file is always one
writer's complete bytes. With ``fsync=True`` the data reaches the disk before the rename and the
folder's entry after it, so a power cut cannot leave an empty file under the final name either:
for files whose loss costs work (LoRAs, checkpoints, statistics, caches).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def unique_temp_name(target: str | os.PathLike[str]) -> Path:
    """``<target>.tmp-<pid>-<thread id>-<random>`` in the target's folder (not created)."""
    t = Path(target)
    return t.with_name(f"{t.name}.tmp-{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}")


def _reserve(target: Path) -> Path:
    """Create an empty unique temp file (``O_EXCL``: never one another writer holds); mode as for
    any new file (``0o666`` minus the umask), unlike ``tempfile.mkstemp``'s ``0o600``."""
    for _ in range(100):
        tmp = unique_temp_name(target)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name beside {target}")


def fsync_file(path: str | os.PathLike[str]) -> None:
    with open(path, "r+b") as fh:
        os.fsync(fh.fileno())


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (an existing empty file, this writer's alone);
    rename it over ``path`` if the block succeeds, delete it otherwise. Writers that pick a format
    from the file name need an explicit format. ``fsync``: see the module docstring."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve(target)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, target)
        if fsync:
            fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Bytes to ``path`` atomically (fsync'd by default: the rename never exposes unwritten data)."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2, fsync: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent) + "\n", fsync=fsync)


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
