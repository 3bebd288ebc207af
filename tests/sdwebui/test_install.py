"""install.py's rules, with real pip in a fresh venv and local wheels (no network): missing packages
are added, nothing installed changes version, and what the trainer needs newer goes into the
overlay, which only a child with the overlay on PYTHONPATH sees."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from facediffuser.sdwebui.requirements import unmet

REPO = Path(__file__).resolve().parents[2]


def make_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel whose module records its version."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{dist}/__init__.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: facediffuser-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    whl = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return whl


def test_unmet_applies_markers_and_specifiers():
    have = {"torch": "2.14.1", "numpy": "1.26.2", "diffusers": "0.31.0"}
    assert unmet(["torch>=2.1", "numpy", "diffusers>=0.35", "peft>=0.17", "tomli; python_version < '3.0'"], have) == \
        ["diffusers>=0.35", "peft>=0.17"]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv (its own pip, no packaging module) with fdt-base 1.0 installed, and a wheel folder."""
    root = tmp_path_factory.mktemp("install")
    wheels = root / "wheels"
    make_wheel(wheels, "fdt-base", "1.0")
    make_wheel(wheels, "fdt-base", "2.0")
    make_wheel(wheels, "fdt-new", "1.0")
    make_wheel(wheels, "fdt-needs-newer", "1.0", ("fdt-base>=2",))
    make_wheel(wheels, "fdt-trainer", "1.0", ("fdt-base>=2", "fdt-new"))
    make_wheel(wheels, "fdt-wants-numpy", "1.0", ("numpy>=99",))
    make_wheel(wheels, "numpy", "99.0")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    py = root / "venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    pip = [str(py), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels)]
    subprocess.run(pip + ["fdt-base==1.0"], check=True)
    return py, wheels


def _freeze(py: Path) -> list[str]:
    out = subprocess.run([str(py), "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True).stdout
    return sorted(line for line in out.splitlines() if line.strip())


def _driver(py: Path, code: str) -> dict:
    """Run ``code`` inside the venv with the requirements module loaded by install.py's own loader."""
    prelude = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("fd_install", {str(REPO / 'install.py')!r})
        install = importlib.util.module_from_spec(spec); spec.loader.exec_module(install)
        req = install._requirements_module()
        messages = []
    """)
    proc = subprocess.run([str(py), "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_host_additions_add_what_is_missing_and_never_change_a_version(venv, tmp_path):
    py, wheels = venv
    before = _freeze(py)
    out = _driver(py, f"""
        pins = req.install_host_additions(requirements=["fdt-new", "fdt-needs-newer", "fdt-base>=1"],
                                          pip_args=["--no-index", "--find-links", {str(wheels)!r}], log=messages.append)
        print(json.dumps({{"pins": pins, "messages": messages}}))
    """)
    assert out["pins"] == ["fdt-new==1.0"]
    assert out["messages"] == ["FaceDiffuser: not installing fdt-needs-newer: it would change the web UI's fdt-base 1.0 -> 2.0"]
    after = _freeze(py)
    assert sorted(set(after) - set(before)) == ["fdt-new==1.0"] and set(before) <= set(after)


def test_overlay_holds_the_newer_versions_only_the_child_sees(venv, tmp_path):
    py, wheels = venv
    overlay = tmp_path / ".trainer-overlay"
    before = _freeze(py)
    out = _driver(py, f"""
        args = ["--no-index", "--find-links", {str(wheels)!r}]
        plan = req.build_overlay({str(overlay)!r}, requirements=["fdt-trainer"], no_deps=[], pip_args=args, log=messages.append)
        current = req.overlay_is_current({str(overlay)!r}, requirements=["fdt-trainer"], no_deps=[])
        print(json.dumps({{"pins": plan.pins, "current": current, "problem": req.overlay_problem({str(overlay)!r})}}))
    """)
    assert sorted(out["pins"]) == ["fdt-base==2.0", "fdt-trainer==1.0"] or sorted(out["pins"]) == ["fdt-base==2.0", "fdt-new==1.0", "fdt-trainer==1.0"]
    assert out["current"] is True and out["problem"] is None
    assert _freeze(py) == before  # the venv itself is untouched
    code = "import fdt_base, fdt_trainer; print(fdt_base.__version__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    plain = subprocess.run([str(py), "-c", "import fdt_base; print(fdt_base.__version__)"], capture_output=True, text=True, env=env)
    child = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=env | {"PYTHONPATH": str(overlay)})
    assert plain.stdout.strip() == "1.0" and child.stdout.strip() == "2.0", child.stderr
    assert not any(p.name.endswith((".tmp-" + str(os.getpid()))) for p in tmp_path.iterdir())


def test_overlay_refuses_a_second_numpy_and_says_why(venv, tmp_path):
    py, wheels = venv
    overlay = tmp_path / ".trainer-overlay"
    out = _driver(py, f"""
        try:
            req.build_overlay({str(overlay)!r}, requirements=["fdt-wants-numpy"], no_deps=[],
                              pip_args=["--no-index", "--find-links", {str(wheels)!r}])
            err = None
        except RuntimeError as exc:
            err = str(exc)
        print(json.dumps({{"error": err, "problem": req.overlay_problem({str(overlay)!r}),
                           "current": req.overlay_is_current({str(overlay)!r}, requirements=["fdt-wants-numpy"], no_deps=[])}}))
    """)
    assert "numpy 99.0" in out["error"] and "cannot live beside the web UI's own" in out["error"]
    assert out["problem"].startswith("the trainer's packages could not be installed: ") and out["current"] is False
    assert not (overlay / "numpy").exists()


def test_install_py_does_nothing_outside_a_web_ui(venv):
    py, _ = venv
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(py), str(REPO / "install.py")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "not run by an Automatic1111/Forge web UI" in proc.stdout
    assert not (REPO / ".trainer-overlay").exists() or (REPO / ".trainer-overlay" / "overlay.json").is_file()
