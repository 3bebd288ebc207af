"""What the "FaceDiffuser" tab does, without gradio: start / stop / resume training, prep, stats.

One :class:`Jobs` object per web UI process holds the child processes (one training at a time --
it competes with the web UI for the GPU -- plus a ``prep`` and a stats job). Every job runs the
``facediffuser`` CLI in a child process (:mod:`..trainer.subprocess_runner`) with the trainer's
package overlay first on its ``PYTHONPATH``, so nothing is trained, imported or seeded in the web
UI's own process. Paths:

* the LoRA goes to ``<Lora folder>/<name>.safetensors`` (``<lora:name:W>`` works at once; a
  re-trained file replaces the web UI's cached copy via ``on_lora_written``);
* ``<work>/runs/<name>/`` holds the run's log, ``progress.jsonl`` and ``state/`` (resume);
* ``<work>/cache/train`` the latent / text-embedding cache.

The tab's Start button and the HTTP route ``POST /facediffuser/v1/train`` call :meth:`Jobs.start_training`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..fileio import atomic_write_json
from ..nodes.paths import lora_file_name, stats_file_name
from ..trainer.subprocess_runner import CLIRun, TrainProgress, TrainRun, import_root
from .requirements import overlay_problem
from .settings_form import build_config, config_to_args


def resolve_folder(text: str, base: Path, *, what: str, must_exist: bool = True) -> Path:
    """An absolute folder, or one relative to the web UI's data folder."""
    value = str(text or "").strip()
    if not value:
        raise UserError(f"no {what} given")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if must_exist and not p.is_dir():
        raise UserError(f"{what} {value!r} not found (looked for {p})")
    return p


@dataclass
class Jobs:
    """The tab's child processes and the folders they use."""

    work_dir: Path
    lora_dir: Path
    stats_dir: Path
    inception_dir: Path
    overlay_dir: Path
    package_dir: Path
    base_dir: Path  # relative folders typed in the tab are relative to this (the web UI's data folder)
    python: str = sys.executable
    cpu_only: bool = False
    on_lora_written: Callable[[Path], None] | None = None
    train: TrainRun | None = None
    train_name: str | None = None
    train_output: Path | None = None
    _handled_output: str | None = None
    others: dict[str, CLIRun] = field(default_factory=dict)

    # --- the child's environment ---------------------------------------------------------------
    def _child_kwargs(self) -> dict[str, Any]:
        problem = overlay_problem(self.overlay_dir)
        if problem:
            raise UserError(problem)
        root = import_root(self.package_dir, self.work_dir / "import")
        env = {"CUDA_VISIBLE_DEVICES": ""} if self.cpu_only else {}
        return {"python": self.python, "pythonpath": [self.overlay_dir, root], "env": env}

    # --- training --------------------------------------------------------------------------------
    def run_dir(self, name: str) -> Path:
        return self.work_dir / "runs" / Path(lora_file_name(name)).stem

    def start_training(self, *, checkpoint: str | os.PathLike, dataset: str, name: str, values: dict[str, Any],
                       start_over: bool = False) -> str:
        """Validate everything, then start (or resume) ``facediffuser train`` in a child."""
        if self.train is not None and self.train.running:
            raise UserError(f"training {self.train_name!r} is still running: stop it first")
        file_name = lora_file_name(name)
        output = self.lora_dir / file_name
        run_dir = self.run_dir(name)
        data = resolve_folder(dataset, self.base_dir, what="dataset folder")
        config = build_config(values, model=str(checkpoint), data=str(data), output=str(output),
                              state_dir=str(run_dir / "state"), cache_dir=str(self.work_dir / "cache" / "train"))
        if not Path(checkpoint).is_file() and not Path(checkpoint).is_dir():
            raise UserError(f"checkpoint not found: {checkpoint}")
        kwargs = self._child_kwargs()
        if start_over:
            shutil.rmtree(run_dir / "state", ignore_errors=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        run = TrainRun(run_dir, run_dir / "state", **kwargs)
        args = config_to_args(config)
        resumed = run.start(args)
        atomic_write_json(run_dir / "settings.json", {"name": name, "checkpoint": str(checkpoint), "args": args,
                                                      "resumed": resumed})
        self.train, self.train_name, self.train_output, self._handled_output = run, name, output, None
        return f"{'resumed' if resumed else 'started'} training {name!r} -> {output}"

    def stop_training(self) -> str:
        if self.train is None or not self.train.running:
            return "no training is running"
        self.train.stop()
        return f"stopping {self.train_name!r} at the next step (the state is kept: Start resumes)"

    def training_progress(self) -> TrainProgress:
        if self.train is None:
            return TrainProgress(status="idle")
        prog = self.train.progress()
        if prog.status == "finished" and prog.output and prog.output != self._handled_output:
            self._handled_output = prog.output
            if self.on_lora_written is not None:
                self.on_lora_written(Path(prog.output))
        return prog

    def training_log(self) -> str:
        return self.train.log_tail() if self.train is not None else ""

    def loss_plot(self) -> Path | None:
        """A PNG of the loss so far (rewritten only when new steps arrived)."""
        prog = self.training_progress()
        if self.train is None or not prog.losses:
            return None
        path = self.train.work_dir / "loss.png"
        marker = self.train.work_dir / "loss.png.steps"
        if path.is_file() and marker.is_file() and marker.read_text() == str(len(prog.losses)):
            return path
        from ..trainer.progress_plots import save_loss_curve

        save_loss_curve(prog.losses, path, title=f"{self.train_name}: training loss")
        marker.write_text(str(len(prog.losses)))
        return path

    def wait_training(self, timeout: float | None = None) -> TrainProgress:
        if self.train is not None:
            self.train.wait(timeout)
        return self.training_progress()

    # --- prep and reference stats -----------------------------------------------------------------
    def _start_other(self, kind: str, command: str, args: list[str]) -> str:
        job = self.others.get(kind)
        if job is not None and job.running:
            raise UserError(f"a {kind} job is still running")
        job = CLIRun(self.work_dir / "jobs" / kind, **self._child_kwargs())
        job.start(command, args)
        self.others[kind] = job
        return f"started: facediffuser {command} {' '.join(args)}"

    def start_prep(self, src: str, dst: str, *, size: int = 512, faces: str = "largest") -> str:
        source = resolve_folder(src, self.base_dir, what="photo folder")
        target = resolve_folder(dst, self.base_dir, what="output folder", must_exist=False) if str(dst or "").strip() \
            else source.with_name(source.name + "_aligned")
        extra = {"largest": [], "all": ["--all-faces"], "one-only": ["--one-face-only"]}.get(faces)
        if extra is None:
            raise UserError(f"faces must be largest, all or one-only (got {faces!r})")
        return self._start_other("prep", "prep", [str(source), str(target), "--size", str(int(size)), "--no-progress", *extra])

    def start_stats(self, folder: str, name: str) -> str:
        source = resolve_folder(folder, self.base_dir, what="real-image folder")
        out = self.stats_dir / stats_file_name(name or source.name)
        from ..evaluation.inception import find_inception_weights

        weights = find_inception_weights(None, models_dir=self.inception_dir)
        args = ["stats", str(source), "--out", str(out), "--inception", str(weights),
                "--cache-dir", str(self.work_dir / "cache" / "features"), "--quiet"]
        return self._start_other("stats", "eval", args)

    def job_status(self, kind: str) -> str:
        job = self.others.get(kind)
        if job is None:
            return "idle"
        code = job.returncode
        if code is None:
            state = "running"
        elif code == 0:
            state = "done"
        else:
            state = f"failed: {job.last_error() or f'exit code {code}'}"
        return state + "\n" + job.log_tail(3000)

    def shutdown(self) -> None:
        """The web UI is going away: ask training to stop cleanly, end the other jobs."""
        if self.train is not None and self.train.running:
            self.train.stop()
        for job in self.others.values():
            job.terminate()


def progress_dict(prog: TrainProgress) -> dict[str, Any]:
    """JSON for the HTTP route (the loss history is summarised)."""
    return {"status": prog.status, "step": prog.step, "total": prog.total, "loss": prog.loss, "it_per_s": prog.it_per_s,
            "eta_s": prog.eta_s, "output": prog.output, "message": prog.message, "line": prog.line(),
            "n_losses": len(prog.losses)}


def read_run_settings(run_dir: Path) -> dict | None:
    p = run_dir / "settings.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
