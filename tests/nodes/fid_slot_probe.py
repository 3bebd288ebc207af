"""Run by tests/nodes/test_nodes_unit.py in a subprocess: the FID nodes' Inception slot against a
real ComfyUI's model management (no server; ComfyUI's import sets process-wide state, hence the
subprocess). Prints one JSON line of what it saw.

Usage: ``python fid_slot_probe.py COMFYUI_DIR WEIGHTS``
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

comfy_dir, weights = sys.argv[1], Path(sys.argv[2])
sys.path.insert(0, comfy_dir)
sys.argv = ["main.py", "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.model_management as mm  # noqa: E402
import torch  # noqa: E402

from facediffuser.nodes import fid_nodes  # noqa: E402


def seen() -> dict:
    gc.collect()
    return {"alive": sum(1 for o in gc.get_objects() if type(o).__name__ == "FIDInceptionV3"),
            "loaded": [type(getattr(lm.model, "model", None)).__name__ for lm in mm.current_loaded_models]}


images = torch.arange(2 * 3 * 64 * 64, dtype=torch.int64).reshape(2, 3, 64, 64).remainder(251).to(torch.uint8)
out = {}
first = fid_nodes._INCEPTION.get(weights, "tf1")(images)
out["loaded"] = seen()
mm.cleanup_models()  # what ComfyUI's executor does at every prompt
out["after_prompt"] = seen()
patcher = fid_nodes._INCEPTION._patcher
fid_nodes._INCEPTION.get(weights, "tf1")
out["reused"] = fid_nodes._INCEPTION._patcher is patcher
del patcher
mm.unload_all_models()  # "unload models" (POST /free)
out["unloaded"] = seen()
out["reloaded_equal"] = bool(torch.equal(fid_nodes._INCEPTION.get(weights, "tf1")(images), first))
out["reloaded"] = seen()
print(json.dumps(out))
