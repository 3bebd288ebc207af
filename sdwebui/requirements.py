"""What the extension needs from the web UI's Python, and what only the trainer's child sees.

A web UI's venv is the user's, with the web UI's own pins (Forge: diffusers 0.31, peft 0.13,
accelerate 0.31, transformers 4.46, numpy 1.26, Pillow 9.5, safetensors 0.4.2, gradio 4.40).
So the work is split by process:

* **in the web UI's process** run FID scoring, LoRA metadata reading and the settings form. They
  need torch, numpy, scipy, Pillow, matplotlib, tqdm, safetensors (every web UI has them, at any
  version from those pins up) plus :data:`HOST_ADDITIONS` (not in a web UI: added, never
  upgrading anything -- :func:`install_host_additions` installs exactly the new distributions
  pip's resolver reports, with ``--no-deps``, and refuses a plan that would change an installed one);
* **the trainer** (and ``prep``) run as a child process (:mod:`..trainer.subprocess_runner`) whose
  ``PYTHONPATH`` starts with an **overlay**: a ``pip install --target`` folder inside the
  extension holding the newer versions the trainer needs (:data:`TRAINER_REQUIREMENTS`), found by
  asking pip what it *would* install into the web UI's venv and installing exactly that into the
  overlay instead. Packages with compiled ABIs the web UI's other packages link against
  (:data:`NEVER_OVERLAID`) are never overlaid: a plan that needs them is refused with a message.

The overlay records what it was built for (``overlay.json``: the requirements and the web UI's
installed versions); :func:`overlay_is_current` lets ``install.py``, which the web UI runs at every
start, return in milliseconds when nothing changed. Pure standard library (+ ``packaging``, which
every pip-based venv has).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

# Added to the web UI's venv when missing (in-process FID; TOML on Python 3.10).
HOST_ADDITIONS: tuple[str, ...] = ("torch-fidelity>=0.3", "tomli>=1.1; python_version < '3.11'")
# Needed in the web UI's process and present in every web UI; checked, never installed by us.
HOST_PRESENT: tuple[str, ...] = ("torch>=2.1", "numpy>=1.24", "scipy>=1.10", "Pillow>=9.1", "matplotlib>=3.5",
                                 "safetensors>=0.4", "tqdm")
# The trainer child's needs (pyproject's dependencies); what the web UI lacks goes into the overlay.
TRAINER_REQUIREMENTS: tuple[str, ...] = (
    "diffusers>=0.35", "transformers>=4.45", "peft>=0.17", "accelerate>=1.0", "safetensors>=0.4",
    "torch-fidelity>=0.3", "scipy>=1.13", "tqdm", "matplotlib", "tomli>=1.1; python_version < '3.11'",
)
# Installed into the overlay without dependencies: the face detector pins an ancient torch in its
# metadata but runs on current torch (same as .ci/install).
TRAINER_NO_DEPS: tuple[str, ...] = ("facenet-pytorch==2.6.0",)
NEVER_OVERLAID = frozenset({"torch", "torchvision", "torchaudio", "numpy", "triton", "xformers"})

OVERLAY_DIR = ".trainer-overlay"  # inside the extension folder; git-ignored
STAMP_FILE = "overlay.json"
STAMP_VERSION = 1


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:  # pip's own copy (every venv with pip has it)
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
        from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]
    return Requirement, canonicalize_name


def installed_versions(paths: Sequence[str] | None = None) -> dict[str, str]:
    """``{canonical name: version}`` of the distributions importable from ``paths`` (default sys.path)."""
    from importlib import metadata

    _, canon = _packaging()
    out: dict[str, str] = {}
    dists = metadata.distributions(path=list(paths)) if paths is not None else metadata.distributions()
    for dist in dists:
        name = dist.metadata["Name"]
        if name and canon(name) not in out:  # the first on the path wins, as for imports
            out[canon(name)] = dist.version
    return out


def unmet(requirements: Iterable[str], installed: dict[str, str]) -> list[str]:
    """The requirements (applying to this Python) that ``installed`` does not satisfy."""
    Requirement, canon = _packaging()
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        have = installed.get(canon(req.name))
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            out.append(text)
    return out


@dataclass(frozen=True)
class PipPlan:
    """What ``pip install`` would do: new distributions and changes of installed ones."""

    new: tuple[tuple[str, str], ...]  # (name, version)
    changed: tuple[tuple[str, str, str], ...]  # (name, installed version, planned version)

    @property
    def pins(self) -> list[str]:
        return [f"{n}=={v}" for n, v in self.new] + [f"{n}=={v}" for n, _, v in self.changed]


def pip_plan(requirements: Sequence[str], *, installed: dict[str, str] | None = None,
             pip_args: Sequence[str] = ()) -> PipPlan:
    """Ask pip's resolver (``--dry-run --report``) what installing ``requirements`` into this
    Python's environment would install; nothing is installed."""
    _, canon = _packaging()
    installed = installed_versions() if installed is None else installed
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--prefer-binary", "--report", str(report),
               *pip_args, *requirements]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not report.is_file():
            last = (proc.stderr or proc.stdout).strip().splitlines()
            raise RuntimeError(f"pip could not resolve {' '.join(requirements)}: {last[-1] if last else 'exit ' + str(proc.returncode)}")
        data = json.loads(report.read_text(encoding="utf-8"))
    new, changed = [], []
    for item in data.get("install", []):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        have = installed.get(canon(name))
        if have is None:
            new.append((name, version))
        elif have != version:
            changed.append((name, have, version))
    return PipPlan(tuple(new), tuple(changed))


def _pip(args: Sequence[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--prefer-binary", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"pip install {' '.join(args)} failed: {last[-1] if last else proc.returncode}")


def install_host_additions(*, requirements: Sequence[str] = HOST_ADDITIONS, pip_args: Sequence[str] = (),
                           log=print) -> list[str]:
    """Add :data:`HOST_ADDITIONS` that are missing, upgrading or downgrading nothing. Returns the
    pins installed. A requirement whose resolution would change an installed package is skipped
    with a message (the feature that needs it then says so)."""
    installed = installed_versions()
    missing = unmet(requirements, installed)
    done: list[str] = []
    for req in missing:
        plan = pip_plan([req], installed=installed, pip_args=pip_args)
        if plan.changed:
            what = ", ".join(f"{n} {a} -> {b}" for n, a, b in plan.changed)
            log(f"FaceDiffuser: not installing {req}: it would change the web UI's {what}")
            continue
        if plan.new:
            _pip(["--no-deps", *pip_args, *plan.pins])
            done += plan.pins
    return done


def _fingerprint(installed: dict[str, str]) -> str:
    text = "\n".join(f"{k}=={v}" for k, v in sorted(installed.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _stamp(host: dict[str, str], requirements: Sequence[str] = TRAINER_REQUIREMENTS,
           no_deps: Sequence[str] = TRAINER_NO_DEPS) -> dict:
    return {"version": STAMP_VERSION, "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "requirements": list(requirements), "no_deps": list(no_deps), "host": _fingerprint(host)}


def overlay_is_current(overlay: str | os.PathLike, host: dict[str, str] | None = None, *,
                       requirements: Sequence[str] = TRAINER_REQUIREMENTS, no_deps: Sequence[str] = TRAINER_NO_DEPS) -> bool:
    """True when ``overlay`` was built for these requirements and this web UI's installed versions."""
    stamp = Path(overlay) / STAMP_FILE
    if not stamp.is_file():
        return False
    try:
        have = json.loads(stamp.read_text(encoding="utf-8"))
    except ValueError:
        return False
    want = _stamp(installed_versions() if host is None else host, requirements, no_deps)
    return not have.get("error") and all(have.get(k) == v for k, v in want.items())


def overlay_problem(overlay: str | os.PathLike) -> str | None:
    """Why the trainer cannot start (no overlay, or one made for another web UI state), or None."""
    stamp = Path(overlay) / STAMP_FILE
    if not stamp.is_file():
        return f"the trainer's packages are not installed ({overlay} is missing): restart the web UI so that install.py builds it"
    try:
        data = json.loads(stamp.read_text(encoding="utf-8"))
    except ValueError:
        return f"{stamp} is damaged: delete {overlay} and restart the web UI"
    if data.get("error"):
        return f"the trainer's packages could not be installed: {data['error']}"
    return None


def build_overlay(overlay: str | os.PathLike, *, requirements: Sequence[str] = TRAINER_REQUIREMENTS,
                  no_deps: Sequence[str] = TRAINER_NO_DEPS, pip_args: Sequence[str] = (), log=print) -> PipPlan:
    """(Re)build the overlay: what pip would add or change for :data:`TRAINER_REQUIREMENTS` goes into
    a new folder with ``--target --no-deps``, then replaces the old one. Nothing in the web UI's
    venv changes. A plan that needs a new torch/numpy is refused (the stamp records why)."""
    overlay = Path(overlay)
    host = installed_versions()
    tmp = overlay.with_name(overlay.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        plan = pip_plan(list(requirements), installed=host, pip_args=pip_args)
        _, canon = _packaging()
        blocked = [f"{n} {a} -> {b}" for n, a, b in plan.changed if canon(n) in NEVER_OVERLAID]
        blocked += [f"{n} {v}" for n, v in plan.new if canon(n) in NEVER_OVERLAID]
        if blocked:
            raise RuntimeError(f"the trainer would need a different {', '.join(blocked)} than the web UI has; "
                               "that cannot live beside the web UI's own (use the facediffuser CLI in its own venv)")
        if plan.pins:
            _pip(["--target", str(tmp), "--no-deps", "--no-compile", *pip_args, *plan.pins])
        if no_deps:
            _pip(["--target", str(tmp), "--no-deps", "--no-compile", *pip_args, *no_deps])
        stamp = _stamp(host, requirements, no_deps) | {"installed": plan.pins + list(no_deps)}
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / STAMP_FILE).write_text(json.dumps(_stamp(host, requirements, no_deps) | {"error": str(exc)}, indent=1) + "\n",
                                      encoding="utf-8")
        _replace_dir(tmp, overlay)
        raise
    _replace_dir(tmp, overlay)
    if plan.pins:
        log(f"FaceDiffuser: trainer overlay {overlay}: {', '.join(plan.pins + list(no_deps))}")
    return plan


def _replace_dir(new: Path, target: Path) -> None:
    old = target.with_name(target.name + f".old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
