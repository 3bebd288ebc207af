"""ComfyUI V1 node classes: thin adapters over ``trainer`` and ``evaluation``.

Each family of nodes lives in its own module and exports ``NODE_CLASS_MAPPINGS`` and
``NODE_DISPLAY_NAME_MAPPINGS``; this file merges them. Node modules must import ComfyUI
(``folder_paths``, ``comfy``) and torch only inside methods, so importing the pack stays fast and
works without ComfyUI.
"""

from __future__ import annotations

import importlib

_NODE_MODULES: list[str] = ["lora_nodes", "train_nodes", "fid_nodes"]

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

for _name in _NODE_MODULES:
    _mod = importlib.import_module(f".{_name}", __name__)
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)
