"""A test-only ComfyUI node that reports the weights ComfyUI actually samples with after a LoRA.

ComfyUI applies LoRA patches lazily: ``LoraLoader`` only records them on a cloned ``ModelPatcher``;
the weights change when the model is loaded for use (``comfy.model_management.load_models_gpu`` ->
``ModelPatcher.patch_model``), which keeps the original of each patched weight in
``ModelPatcher.backup``. This node does exactly that load (the same call KSampler and CLIPTextEncode
make), then, for a list of kohya module names, writes the *patched* and the *original* weight into a
``.safetensors`` in ComfyUI's output folder. The module -> weight-key mapping is ComfyUI's own
(``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip``), so the test does not assume it.

This file is both a normal test helper (``install_probe_pack``) and, copied verbatim as
``custom_nodes/<PROBE_PACK_NAME>/__init__.py``, the node pack itself: its module level needs only the
standard library. It is our code (no ComfyUI code is copied), written into a server at test time.
"""

from __future__ import annotations

import json
from pathlib import Path

PROBE_PACK_NAME = "facediffuser_lora_probe"
PROBE_NODE = "FaceDiffuserTestLoraWeights"


class FaceDiffuserTestLoraWeights:
    """MODEL + CLIP (e.g. from LoraLoader) -> patched and original weights of named LoRA modules."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "clip": ("CLIP",),
            # kohya module names, one per line (no suffix), e.g. lora_unet_down_blocks_0_..._to_q
            "modules": ("STRING", {"multiline": True, "default": ""}),
            # the file name (no extension) written into the output folder; unique per call, which
            # also keeps ComfyUI from serving a cached result
            "filename": ("STRING", {"default": "lora_probe"}),
        }}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "FaceDiffuser/testing"

    @staticmethod
    def _original(patcher, key, current):
        """The unpatched weight: ModelPatcher.backup holds it (a tensor in 2024 ComfyUI, a
        namedtuple with ``.weight`` in newer ones); a key without patches is its own original."""
        saved = patcher.backup.get(key)
        if saved is None:
            return current
        return getattr(saved, "weight", saved)

    def probe(self, model, clip, modules, filename):
        import comfy.lora
        import comfy.model_management
        import comfy.utils
        import folder_paths
        import torch
        from safetensors.torch import save_file

        names = [m.strip() for m in modules.replace(",", "\n").splitlines() if m.strip()]
        unet_map = comfy.lora.model_lora_keys_unet(model.model, {})
        clip_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})

        # The loads sampling does: patches are applied to the weights here, originals backed up.
        comfy.model_management.load_models_gpu([model])
        comfy.model_management.load_models_gpu([clip.patcher])

        tensors, info = {}, {}
        for name in names:
            if name in unet_map:
                patcher, key = model, unet_map[name]
            elif name in clip_map:
                patcher, key = clip.patcher, clip_map[name]
            else:
                info[name] = {"key": None}
                continue
            if isinstance(key, tuple):  # newer ComfyUI: (key, offsets...) for fused weights
                key = key[0]
            current = comfy.utils.get_attr(patcher.model, key)
            original = self._original(patcher, key, current)
            with torch.inference_mode(False):
                tensors[name + ".patched"] = current.detach().to("cpu").clone().contiguous()
                tensors[name + ".original"] = original.detach().to("cpu").clone().contiguous()
            info[name] = {
                "key": key,
                "part": "unet" if patcher is model else "clip",
                "dtype": str(current.dtype).replace("torch.", ""),
                "patches": len(patcher.patches.get(key, [])),
                "backed_up": key in patcher.backup,
            }
        path = Path(folder_paths.get_output_directory()) / f"{filename}.safetensors"
        with torch.inference_mode(False):
            save_file(tensors, str(path))
        summary = {
            "file": path.name,
            "modules": info,
            # how many weights each patcher patches: one per LoRA module that ComfyUI mapped
            "patched_keys": {"unet": len(model.patches), "clip": len(clip.patcher.patches)},
        }
        return {"ui": {"lora_probe": [json.dumps(summary)]}}


NODE_CLASS_MAPPINGS = {PROBE_NODE: FaceDiffuserTestLoraWeights}
NODE_DISPLAY_NAME_MAPPINGS = {PROBE_NODE: "FaceDiffuser test probe (LoRA weights)"}


# --- test-side helpers (not used inside ComfyUI) -------------------------------------------------

def install_probe_pack(custom_nodes_dir: Path) -> Path:
    """Write this file as ``<custom_nodes_dir>/<PROBE_PACK_NAME>/__init__.py``; return that folder.

    ComfyUI scans custom-node folders at start-up only, so this must happen before the server starts
    (see :func:`probe_paths_yaml` for a server whose base folder is made by the harness)."""
    folder = Path(custom_nodes_dir) / PROBE_PACK_NAME
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text(Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def probe_paths_yaml(base_dir: Path) -> Path:
    """A ``--extra-model-paths-config`` file that adds ``<base_dir>/custom_nodes`` (holding the probe
    pack) to a server's custom-node folders; ComfyUI accepts the flag more than once. JSON is YAML."""
    base_dir = Path(base_dir)
    install_probe_pack(base_dir / "custom_nodes")
    path = base_dir / "lora_probe_paths.yaml"
    path.write_text(json.dumps({"facediffuser_lora_probe": {"base_path": str(base_dir),
                                                             "custom_nodes": "custom_nodes"}}, indent=2) + "\n")
    return path


def read_probe_result(entry: dict) -> dict:
    """The summary dict the probe node returned, from a ``/history`` entry."""
    for node_out in (entry.get("outputs") or {}).values():
        if "lora_probe" in node_out:
            return json.loads(node_out["lora_probe"][0])
    raise KeyError("no FaceDiffuserTestLoraWeights output in this history entry")
