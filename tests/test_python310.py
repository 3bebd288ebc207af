"""The web UIs run Python 3.10: the package imports there, the CLI's --help works, the web-UI
modules load (without torch), and every file compiles under 3.10 (no 3.11-only syntax).

Uses a bare Python 3.10 interpreter (no packages at all) when one is found: ``$FACEDIFFUSER_PYTHON310``,
``/root/.pyenv/versions/3.10.*/bin/python`` (the CI machines have it), or ``python3.10`` on PATH."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _python310() -> str | None:
    candidates = [os.environ.get("FACEDIFFUSER_PYTHON310"), *sorted(glob.glob("/root/.pyenv/versions/3.10.*/bin/python")),
                  shutil.which("python3.10")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


PY310 = _python310()
pytestmark = pytest.mark.skipif(PY310 is None, reason="no Python 3.10 interpreter found")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("py310")
    (root / "facediffuser").symlink_to(REPO, target_is_directory=True)
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"PYTHONPATH": str(root)}


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY310, *args], capture_output=True, text=True, env=env, cwd=str(REPO.parent))


def test_import_and_cli_help_on_310(env):
    code = ("import sys, facediffuser; assert sys.version_info[:2] == (3, 10); "
            "import facediffuser.sdwebui.fid_ui, facediffuser.sdwebui.train_tab, facediffuser.sdwebui.settings_form; "
            "print(facediffuser.__file__, 'torch' in sys.modules)")
    proc = _run(env, "-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == "False"
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"]):
        proc = _run(env, "-m", "facediffuser.cli", *argv)
        assert proc.returncode == 0, (argv, proc.stderr)
    assert "--progress-file" in _run(env, "-m", "facediffuser.cli", "train", "--help").stdout


def test_every_file_compiles_on_310(env, tmp_path):
    files = [str(p) for p in REPO.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    code = ("import sys, py_compile\nbad = []\nfor f in sys.argv[1:]:\n    try:\n"
            f"        py_compile.compile(f, cfile={str(tmp_path / 'x.pyc')!r}, doraise=True)\n"
            "    except py_compile.PyCompileError as e:\n        bad.append(str(e))\nprint('\\n'.join(bad))\nsys.exit(1 if bad else 0)")
    proc = _run(env, "-c", code, *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
