"""Run by Automatic1111 / Forge with the web UI's own Python when the extension is installed
(Extensions -> Install from URL) and at every start.

It adds what the extension's in-process parts lack (the FID Inception extractor's package; tomli
on Python 3.10) without upgrading or downgrading anything in the web UI's venv, and builds the
trainer's overlay: the newer diffusers/peft/accelerate/transformers the trainer needs, installed
with ``pip install --target`` into ``.trainer-overlay/`` inside this folder and seen only by the
training child process. ``sdwebui/requirements.py`` holds the lists and the rules. When nothing
changed since the last start this returns in well under a second. It never fails the web UI's
start-up: problems are printed, and the part that needs the missing package says so when used.
"""

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _requirements_module():
    # Loaded by path: the folder may have any name, and this module needs only the standard library.
    name = "_facediffuser_requirements"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "sdwebui" / "requirements.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def _run_by_webui() -> bool:
    """A1111/Forge run this with their own folder (launch.py, modules/) on PYTHONPATH; ComfyUI-Manager
    also runs a node pack's install.py, but ComfyUI needs none of this (requirements.txt)."""
    import os

    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and (Path(entry) / "launch.py").is_file() and (Path(entry) / "modules").is_dir():
            return True
    return "--webui" in sys.argv[1:]


def _skip_install() -> bool:
    try:
        import launch  # the web UI's launcher (its folder is on PYTHONPATH when it runs us)

        return bool(getattr(launch.args, "skip_install", False))
    except Exception:  # noqa: BLE001 - run by hand, or a web UI without that flag
        return False


def main() -> int:
    if sys.version_info < (3, 10):
        print(f"FaceDiffuser needs Python 3.10 or newer (this web UI runs {sys.version.split()[0]})")
        return 0
    if not _run_by_webui():
        print("FaceDiffuser install.py: not run by an Automatic1111/Forge web UI, nothing to do "
              "(ComfyUI uses requirements.txt; pass --webui to run it by hand in a web UI's venv)")
        return 0
    if _skip_install():
        return 0
    req = _requirements_module()
    try:
        added = req.install_host_additions()
        if added:
            print(f"FaceDiffuser: added {', '.join(added)} (nothing else in the web UI's venv changed)")
    except Exception as exc:  # noqa: BLE001
        print(f"FaceDiffuser: could not add {', '.join(req.HOST_ADDITIONS)}: {exc}")
    overlay = HERE / req.OVERLAY_DIR
    if not req.overlay_is_current(overlay):
        try:
            req.build_overlay(overlay)
        except Exception as exc:  # noqa: BLE001
            print(f"FaceDiffuser: the trainer's packages were not installed: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
