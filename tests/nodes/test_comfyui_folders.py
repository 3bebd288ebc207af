"""The pack's model folders in real ComfyUI: ``fid_stats`` lists only ``.npz`` files.

``folder_paths.add_model_folder_path`` (and a user's ``extra_model_paths.yaml``) give a new folder
name an empty extension set, which lists every file; :func:`register_model_folders` sets the set
explicitly and drops ComfyUI's cached listing. Checked twice against the real thing: ComfyUI's own
``folder_paths`` module (from the unpacked ComfyUI, in a subprocess so its globals stay there), and
a running server's ``/object_info`` for the FID Reference node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from comfyui_harness import ComfyServer

FILES = ("ref.npz", "notes.txt", "weights.safetensors", "sub/deep.npz", "sub/readme.md")
NPZ = ["ref.npz", "sub/deep.npz"]

_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import folder_paths  # ComfyUI's own module
from facediffuser.nodes.paths import register_model_folders

folder_paths.add_model_folder_path("fid_stats", sys.argv[2])  # as extra_model_paths.yaml does
before = folder_paths.get_filename_list("fid_stats")  # cached by ComfyUI from here on
register_model_folders()
register_model_folders()  # idempotent
after = folder_paths.get_filename_list("fid_stats")
print(json.dumps({"before": before, "after": after, "exts": sorted(folder_paths.folder_names_and_paths["fid_stats"][1]),
                  "inception": sorted(folder_paths.folder_names_and_paths["inception"][1])}))
"""


def _fill(folder: Path) -> None:
    for name in FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"x")


def test_real_folder_paths_lists_only_npz_after_registration(comfyui_dir: Path, tmp_path: Path) -> None:
    stats = tmp_path / "fid_stats"
    _fill(stats)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", _PROBE, str(comfyui_dir), str(stats)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(res["before"]) == sorted(FILES)  # ComfyUI's default for a new name: every file
    assert res["after"] == NPZ and res["exts"] == [".npz"] and res["inception"] == [".pth"]


def test_server_object_info_offers_only_npz_stats_files(comfyui_server: ComfyServer) -> None:
    from facediffuser.nodes.fid_nodes import COMPUTE_FROM_FOLDER

    folder = comfyui_server.models_dir / "fid_stats"  # mapped by the harness's extra_model_paths.yaml
    # The server is shared: earlier tests (the workflows run in a browser) may have saved references here.
    earlier = [p.relative_to(folder).as_posix() for p in folder.rglob("*.npz")] if folder.is_dir() else []
    _fill(folder)
    try:
        info = comfyui_server.object_info("FaceDiffuserFIDReference")
        choices = info["FaceDiffuserFIDReference"]["input"]["required"]["stats_file"][0]
        assert choices[0] == COMPUTE_FROM_FOLDER
        assert sorted(choices[1:]) == sorted(set(NPZ) | set(earlier))  # every .npz, and nothing else
    finally:
        for name in FILES:
            (folder / name).unlink(missing_ok=True)
