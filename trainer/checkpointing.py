"""Resumable training state: everything needed to continue a run as if it had never stopped.

A checkpoint is a folder ``<state_dir>/step-00000120/`` holding

- ``adapter.safetensors`` — the trainable (LoRA) parameters, by their module names;
- ``optimizer.pt``, ``scheduler.pt``, ``ema.pt`` — the ``state_dict()`` of each;
- ``rng.pt`` — the run's own generator states, one entry per process (DDP ranks draw different
  noise): the noise/timestep generator and the stream that stands in for the global torch
  generator during adapter init and dropout (:class:`..rng.RNGStream`, keys ``torch``/``cuda``).
  The process-wide generators are neither saved nor restored: they belong to the host.
- ``state.json`` — global step, data position, the loss history, the start time of the run, the
  settings it was made with, and whether the run finished.

Why our own and not ``accelerator.save_state``: that writes the *whole* prepared model (3.4 GB for
an SD1.5 UNet) where the adapter is a few MB, keeps one RNG file per rank written by each rank, and
is not atomic. Here only the main process writes; a checkpoint is built in a temp folder unique to
its writer (pid, thread, random token) and renamed into place, so a folder named ``step-*`` is
always complete, even after ``kill -9``; a killed writer's temp folder is removed by the next save.
Everything is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..fileio import fsync_dir

if TYPE_CHECKING:
    import torch

    from ..rng import RNGStream

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class Checkpoint:
    """A checkpoint read back from disk (tensors on CPU)."""

    path: Path
    info: dict[str, Any]
    adapter: dict[str, "torch.Tensor"]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    ema: dict[str, Any] | None
    rng: list[dict[str, Any]] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.info["global_step"])


# --- RNG -----------------------------------------------------------------------------------------

def capture_rng(noise_generator: "torch.Generator | None" = None, stream: "RNGStream | None" = None) -> dict[str, Any]:
    """Every generator a training step draws from, in a form ``torch.load(weights_only=True)`` reads."""
    state: dict[str, Any] = {}
    if stream is not None:
        state.update(stream.state_dict())
    if noise_generator is not None:
        state["noise"] = noise_generator.get_state()
    return state


def restore_rng(state: dict[str, Any], noise_generator: "torch.Generator | None" = None,
                stream: "RNGStream | None" = None) -> None:
    """Put back what :func:`capture_rng` saved (never the process-wide generators).

    A format-1 checkpoint written before the stream existed holds the global torch state of the
    run under ``torch``: that was the same stream, so it is restored into ``stream``."""
    if stream is not None and "torch" in state:
        stream.load_state_dict(state)
    if noise_generator is not None and "noise" in state:
        noise_generator.set_state(state["noise"])


# --- writing --------------------------------------------------------------------------------------

def checkpoint_dirs(state_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``state_dir``, oldest first."""
    d = Path(state_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(state_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(state_dir)
    return dirs[-1] if dirs else None


def read_info(checkpoint: str | Path) -> dict[str, Any]:
    """Just the ``state.json`` of a checkpoint (cheap: no tensors)."""
    p = Path(checkpoint) / "state.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read training state {p}: {exc}") from None


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    import torch

    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(state_dir: str | Path, *, info: dict[str, Any], adapter: dict[str, "torch.Tensor"],
                    optimizer: dict[str, Any], scheduler: dict[str, Any], ema: dict[str, Any] | None,
                    rng: list[dict[str, Any]], keep: int = 2) -> Path:
    """Write one checkpoint atomically and keep only the newest ``keep``. Returns its folder.

    ``info["global_step"]`` names the folder. If a checkpoint of that step exists already (a cancel
    right after a scheduled save), it is the same state and is left as it is."""
    from safetensors.torch import save as st_save

    state_dir = Path(state_dir)
    step = int(info["global_step"])
    final = state_dir / f"step-{step:08d}"
    if final.is_dir():
        return final
    state_dir.mkdir(parents=True, exist_ok=True)
    for stale in state_dir.glob(".tmp-step-*"):
        if _writer_is_gone(stale):  # left behind by a killed run; a live writer's is its own
            shutil.rmtree(stale, ignore_errors=True)
    tmp = _unique_temp_dir(state_dir, f".tmp-step-{step:08d}")
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.items()}
        _fsync_write(tmp / "adapter.safetensors", st_save(tensors))
        _torch_save(optimizer, tmp / "optimizer.pt")
        _torch_save(scheduler, tmp / "scheduler.pt")
        if ema is not None:
            _torch_save(ema, tmp / "ema.pt")
        _torch_save({"ranks": rng}, tmp / "rng.pt")
        _fsync_write(tmp / "state.json", json.dumps({"format": FORMAT_VERSION, **info}, indent=1, sort_keys=True).encode())
        fsync_dir(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another writer saved this step first: the same state
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(state_dir)
    for old in checkpoint_dirs(state_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _unique_temp_dir(parent: Path, prefix: str) -> Path:
    """``<prefix>-<pid>-<thread id>-<random>``, created here (``mkdir`` fails rather than share one)."""
    for _ in range(100):
        tmp = parent / f"{prefix}-{os.getpid()}-{threading.get_ident()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp folder name in {parent}")


def _writer_is_gone(tmp: Path) -> bool:
    """Whether the process that named ``.tmp-step-<step>-<pid>[-...]`` no longer runs (never ours)."""
    parts = tmp.name.split("-")
    try:
        pid = int(parts[3])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return False  # another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False  # alive (another user's), or we cannot tell: leave it
    return False


# --- reading --------------------------------------------------------------------------------------

def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (tensors on CPU)."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    info = read_info(path)
    if info.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: training state format {info.get('format')} is not supported (expected {FORMAT_VERSION})")

    def tload(name: str) -> Any:
        return torch.load(path / name, map_location="cpu", weights_only=True)

    try:
        return Checkpoint(
            path=path,
            info=info,
            adapter=load_file(path / "adapter.safetensors"),
            optimizer=tload("optimizer.pt"),
            scheduler=tload("scheduler.pt"),
            ema=tload("ema.pt") if (path / "ema.pt").exists() else None,
            rng=tload("rng.pt")["ranks"],
        )
    except Exception as exc:  # noqa: BLE001 - truncated/garbled files raise OSError, RuntimeError, UnpicklingError, SafetensorError
        raise UserError(f"training state {path} is damaged ({type(exc).__name__}): delete that folder to resume from the one before") from None
