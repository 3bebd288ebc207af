"""Training (and other ``facediffuser`` commands) in a child process, for a host that must not
train in its own process: a web UI keeps its loaded model, RNGs and package versions untouched.

:class:`CLIRun` starts ``python -m facediffuser.cli <command> ...`` with a chosen interpreter and a
``PYTHONPATH`` of its own (an overlay of newer packages first, then the folder that makes
``facediffuser`` importable), writes everything the child prints to ``<work_dir>/<command>.log``,
and can be stopped. :class:`TrainRun` adds what training needs:

* **progress** -- the child appends JSON lines to ``progress.jsonl`` (``train --progress-file``);
  :func:`read_progress` turns them into step, total, loss, it/s, ETA and the loss history;
* **stop** -- :meth:`TrainRun.stop` creates ``stop`` (``train --stop-file``): the child saves a
  resumable state at the next step boundary, writes no LoRA and exits 1;
* **resume** -- :meth:`TrainRun.start` passes ``--resume`` when the state folder holds an
  unfinished run (the trainer then checks that the settings still match).

Pure standard library (no torch): the host process imports this, never the trainer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

from ..errors import UserError

PACKAGE = "facediffuser"
PROGRESS_FILE = "progress.jsonl"
STOP_FILE = "stop"
LOG_TAIL_CHARS = 6000


def import_root(package_dir: str | os.PathLike, where: str | os.PathLike) -> Path:
    """A folder that holds ``facediffuser`` -> ``package_dir``, for ``python -m facediffuser.cli``.

    The web UI clones the repository under any folder name (``sd-webui-facediffuser``...), so the
    child gets a folder of its own with a link of the right name (a junction on Windows) instead
    of the web UI's whole ``extensions`` folder on its path."""
    package_dir = Path(package_dir).resolve()
    root = Path(where)
    link = root / PACKAGE
    root.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.resolve() == package_dir:
            return root
        if link.is_symlink():
            link.unlink()
        else:
            raise UserError(f"{link} exists and is not a link to {package_dir}; remove it")
    try:
        link.symlink_to(package_dir, target_is_directory=True)
    except OSError:
        if sys.platform != "win32":
            raise
        import _winapi  # a junction needs no administrator rights

        _winapi.CreateJunction(str(package_dir), str(link))
    return root


def child_env(pythonpath: Sequence[str | os.PathLike], *, base: dict | None = None,
              extra: dict | None = None) -> dict[str, str]:
    """The child's environment: ``pythonpath`` first, then whatever PYTHONPATH the host had."""
    env = dict(os.environ if base is None else base)
    parts = [str(p) for p in pythonpath if p]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class CLIRun:
    """One ``facediffuser <command>`` child process with its log file in ``work_dir``."""

    def __init__(self, work_dir: str | os.PathLike, *, python: str | None = None,
                 pythonpath: Sequence[str | os.PathLike] = (), env: dict | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.python = python or sys.executable
        self.pythonpath = list(pythonpath)
        self.extra_env = dict(env or {})
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.log_path: Path | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0
        self.started_at: float | None = None

    def _launch(self, command: str, args: Sequence[str], *, append: bool = False) -> None:
        if self.running:
            raise UserError(f"a {self.command[3] if len(self.command) > 3 else 'facediffuser'} run is still going: stop it first")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work_dir / f"{command}.log"
        self.close_log()
        self._log = open(self.log_path, "ab" if append else "wb")
        self._log_start = self._log.tell()  # where this child's output begins (a resumed run appends)
        self.command = [self.python, "-m", f"{PACKAGE}.cli", command, *[str(a) for a in args]]
        self._log.write(("$ " + " ".join(self.command) + "\n").encode())
        self._log.flush()
        self.started_at = time.time()
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=child_env(self.pythonpath, extra=self.extra_env), cwd=str(self.work_dir),
        )

    def start(self, command: str, args: Sequence[str]) -> None:
        """Start ``facediffuser <command> <args>``; refuses while a child is still running."""
        self._launch(command, args)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if still running after ``timeout`` seconds."""
        if self.process is None:
            return None
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.close_log()
        return code

    def terminate(self) -> None:
        """Ask the child to end now (SIGTERM / TerminateProcess); for commands with no clean stop."""
        if self.running:
            self.process.terminate()

    def kill(self) -> None:
        if self.running:
            self.process.kill()
            self.process.wait()
        self.close_log()

    def close_log(self) -> None:
        if self._log is not None and (self.process is None or self.process.poll() is not None):
            self._log.close()
            self._log = None

    def log_tail(self, max_chars: int = LOG_TAIL_CHARS, *, this_child: bool = False) -> str:
        """The end of the log, with tqdm's carriage-return redraws reduced to their last state
        (``this_child``: only what the latest child printed)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(self._log_start if this_child else 0, size - 4 * max_chars))
            text = fh.read().decode("utf-8", errors="replace")
        lines = []
        for line in text.split("\n"):
            redraws = [part for part in line.split("\r") if part.strip()]
            lines.append(redraws[-1] if redraws else "")
        return "\n".join(lines)[-max_chars:]

    def last_error(self) -> str | None:
        """The line the CLI printed for a user error (``facediffuser <cmd>: error: ...``), if any."""
        for line in reversed(self.log_tail(this_child=True).splitlines()):
            if ": error: " in line and line.startswith(PACKAGE):
                return line.split(": error: ", 1)[1].strip()
        return None


# --- training --------------------------------------------------------------------------------------

@dataclass
class TrainProgress:
    """What a front end shows: status, step/total, loss, speed, ETA, the loss history."""

    status: str  # idle | loading | training | stopping | stopped | finished | failed
    step: int = 0
    total: int | None = None
    loss: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    losses: list[float] = field(default_factory=list)
    output: str | None = None
    message: str = ""

    def line(self) -> str:
        """``training: step 3/10, loss 0.1234, 0.52 it/s, ETA 0:00:13`` and the like."""
        parts = [self.status]
        if self.total:
            parts.append(f"step {self.step}/{self.total}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.it_per_s:
            parts.append(f"{self.it_per_s:.2f} it/s" if self.it_per_s >= 1 else f"{1 / self.it_per_s:.1f} s/it")
        if self.eta_s is not None and self.status == "training":
            parts.append(f"ETA {_hms(self.eta_s)}")
        text = ", ".join(parts[1:])
        head = parts[0] + (": " + text if text else "")
        return head + (f" -- {self.message}" if self.message else "")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def read_progress(path: str | os.PathLike, *, since: float | None = None) -> tuple[list[dict], dict | None]:
    """Step records and the ``end`` record (or None) of a progress file; an incomplete last line
    (the child is writing it) is ignored. ``since`` drops records older than that time."""
    p = Path(path)
    if not p.is_file():
        return [], None
    steps: list[dict] = []
    end = None
    text = p.read_text(encoding="utf-8", errors="replace")
    for line in text.split("\n")[:-1]:  # the part after the last newline is not complete yet
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if since is not None and float(rec.get("time", 0)) < since:
            continue
        if rec.get("event") == "step":
            steps.append(rec)
        elif rec.get("event") == "end":
            end = rec
    return steps, end


def summarize(steps: list[dict], end: dict | None, *, running: bool, stopping: bool, returncode: int | None,
              started_at: float | None, now: float | None = None, error: str | None = None) -> TrainProgress:
    """Progress from the records of one or more (resumed) runs and the state of the child."""
    now = time.time() if now is None else now
    by_step: dict[int, float] = {}
    for r in steps:  # a resumed run repeats no step, but a restart from an older state would
        by_step[int(r["step"])] = float(r["loss"])
    losses = [by_step[k] for k in sorted(by_step)]
    last = steps[-1] if steps else None
    prog = TrainProgress(status="idle", losses=losses)
    if last is not None:
        prog.step, prog.total, prog.loss = int(last["step"]), int(last["total"]), float(last["loss"])
    # speed over this child's steps (since it started), from the first step it logged
    mine = [r for r in steps if started_at is None or float(r["time"]) >= started_at]
    if len(mine) >= 2:
        dt = float(mine[-1]["time"]) - float(mine[0]["time"])
        if dt > 0:
            prog.it_per_s = (int(mine[-1]["step"]) - int(mine[0]["step"])) / dt
    if prog.it_per_s and prog.total:
        prog.eta_s = max(0.0, (prog.total - prog.step) / prog.it_per_s)
    if running:
        prog.status = "stopping" if stopping else ("training" if mine else "loading")
        if prog.status == "loading" and started_at is not None:
            prog.message = f"loading the model and data ({now - started_at:.0f} s)"
    elif returncode is None:
        prog.status = "idle"
    elif end is not None and end.get("status") == "finished" and returncode == 0:
        prog.status, prog.output = "finished", end.get("output")
        prog.message = f"wrote {end.get('output')}"
    elif end is not None and end.get("status") == "cancelled":
        prog.status = "stopped"
        prog.message = f"resumable at step {end.get('steps')}/{end.get('total')}: Start continues"
    else:
        prog.status = "failed"
        reason = error or (end or {}).get("error") or f"exit code {returncode}"
        prog.message = str(reason)
    if not math.isfinite(prog.loss or 0.0):
        prog.message = (prog.message + "; " if prog.message else "") + "the loss is not finite"
    return prog


class TrainRun(CLIRun):
    """``facediffuser train`` as a child process with progress, a clean stop and resume.

    ``state_dir`` is the run's ``--state-dir`` (the caller passes the same folder in ``args``);
    it decides whether :meth:`start` resumes."""

    def __init__(self, work_dir: str | os.PathLike, state_dir: str | os.PathLike, **kwargs) -> None:
        super().__init__(work_dir, **kwargs)
        self.state_dir = Path(state_dir)
        self.progress_path = self.work_dir / PROGRESS_FILE
        self.stop_path = self.work_dir / STOP_FILE
        self.resumed = False

    def resumable(self) -> bool:
        """True when the state folder holds an unfinished run (stopped, or killed mid-way)."""
        from .checkpointing import latest_checkpoint, read_info

        latest = latest_checkpoint(self.state_dir)
        return latest is not None and not read_info(latest).get("finished")

    def start(self, args: Sequence[str], *, resume: bool | None = None) -> bool:  # type: ignore[override]
        """Start training with the CLI flags ``args``; resumes when ``resume`` is True, or (None)
        when an unfinished state exists. Returns whether it resumed."""
        self.resumed = self.resumable() if resume is None else bool(resume)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.stop_path.exists():
            self.stop_path.unlink()
        if not self.resumed and self.progress_path.exists():
            self.progress_path.unlink()  # a fresh run: a fresh loss history
        extra = ["--progress-file", str(self.progress_path), "--stop-file", str(self.stop_path)]
        self._launch("train", [*args, *extra, *(["--resume"] if self.resumed else [])], append=self.resumed)
        return self.resumed

    def stop(self) -> None:
        """Ask for a clean stop at the next step boundary (the state is kept for resume)."""
        if self.running:
            self.stop_path.write_text("stop\n")

    def progress(self) -> TrainProgress:
        steps, end = read_progress(self.progress_path)
        if end is not None and self.started_at is not None and float(end.get("time", 0)) < self.started_at:
            end = None  # an earlier run's ending
        running = self.running
        if not running:
            self.close_log()
        return summarize(steps, end, running=running, stopping=self.stop_path.exists(), returncode=self.returncode,
                         started_at=self.started_at, error=None if running else self.last_error())
