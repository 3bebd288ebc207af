"""The shipped workflows: UI format (v0.4, what users load) and API twins (what tests submit).

Offline here: each file is well-formed and the two formats agree on nodes and links. The full check
(widget values, converting the UI file with the node definitions of a running ComfyUI's
``/object_info``) is in test_comfyui_workflows.py; :func:`ui_to_api` is shared with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOW_DIR = REPO_ROOT / "workflows"
WORKFLOWS = ("face_txt2img", "face_lora_vs_base_fid", "train_face_lora")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds control_after_generate to these INTs by name


def load_ui(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text())


def load_api(name: str) -> dict:
    return json.loads((WORKFLOW_DIR / "api" / f"{name}.json").read_text())


def _input_order(node_info: dict) -> list[tuple[str, tuple]]:
    spec = node_info["input"]
    order = node_info.get("input_order") or {s: list(spec.get(s, {})) for s in ("required", "optional")}
    return [(name, tuple(spec[s][name])) for s in ("required", "optional") for name in order.get(s, []) if name in spec.get(s, {})]


def _is_widget(decl: tuple) -> bool:
    typ, opts = decl[0], (decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {})
    if opts.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


def _has_control_slot(name: str, decl: tuple) -> bool:
    typ, opts = decl[0], (decl[1] if len(decl) > 1 and isinstance(decl[1], dict) else {})
    return bool(opts.get("control_after_generate")) or (typ == "INT" and name in SEED_NAMES)


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format (v0.4) workflow to API format as the ComfyUI frontend does: widget values
    are positional in the node definition's widget order (``control_after_generate`` takes an extra
    slot), links become ``[origin_id, origin_slot]``; muted/bypassed nodes are dropped."""
    links = {link[0]: link for link in ui["links"]}
    out: dict[str, Any] = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4):
            continue
        cls = node["type"]
        if cls not in object_info:
            raise KeyError(f"node type {cls} is not known to this ComfyUI")
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        i = 0
        for name, decl in _input_order(object_info[cls]):
            if not _is_widget(decl):
                continue
            if i < len(values):
                inputs[name] = values[i]
            i += 1
            if _has_control_slot(name, decl):
                i += 1
        if i < len(values):
            raise ValueError(f"node {node['id']} ({cls}) has {len(values)} widget values, the definition {i}")
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        out[str(node["id"])] = {"class_type": cls, "inputs": inputs}
    return out


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_well_formed(name: str) -> None:
    ui = load_ui(name)
    assert ui["version"] == 0.4
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] >= max(nodes)
    assert ui["last_link_id"] >= max(link[0] for link in ui["links"])
    for link_id, origin, o_slot, target, t_slot, typ in ui["links"]:
        out = nodes[origin]["outputs"][o_slot]
        inp = nodes[target]["inputs"][t_slot]
        assert link_id in out["links"] and inp["link"] == link_id, link_id
        assert out["type"] == typ == inp["type"], (link_id, out["type"], inp["type"], typ)
    for n in ui["nodes"]:
        for o in n["outputs"]:
            for link_id in o["links"] or []:
                assert any(link[0] == link_id for link in ui["links"])
        assert isinstance(n["widgets_values"], list) and n["mode"] == 0


@pytest.mark.parametrize("name", WORKFLOWS)
def test_api_twin_has_the_same_graph(name: str) -> None:
    from facediffuser import NODE_CLASS_MAPPINGS

    ui, api = load_ui(name), load_api(name)
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    ui_links = {(str(t), nodes_input_name(ui, t, ts), str(o), os_) for _, o, os_, t, ts, _ in ui["links"]}
    api_links = {(nid, k, v[0], v[1]) for nid, node in api.items() for k, v in node["inputs"].items() if isinstance(v, list)}
    assert ui_links == api_links
    ours = {v["class_type"] for v in api.values() if v["class_type"].startswith("FaceDiffuser")}
    assert ours and ours <= set(NODE_CLASS_MAPPINGS)
    assert any(v["class_type"] in ("SaveImage", "PreviewImage") or v["class_type"] in ("FaceDiffuserFID", "FaceDiffuserTrainLora")
               for v in api.values())


def nodes_input_name(ui: dict, node_id: int, slot: int) -> str:
    node = next(n for n in ui["nodes"] if n["id"] == node_id)
    return node["inputs"][slot]["name"]


def test_converter_handles_control_slots_and_links() -> None:
    info = {
        "KSampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"default": 0}], "steps": ["INT", {"default": 20}],
                                            "sampler_name": [["euler", "ddim"]]}}},
        "Src": {"input": {"required": {"n": ["INT", {"default": 1, "control_after_generate": True}], "s": ["STRING", {"forceInput": True}]},
                          "optional": {"text": ["STRING", {}]}}},
    }
    ui = {"nodes": [
        {"id": 1, "type": "Src", "inputs": [], "outputs": [], "widgets_values": [5, "fixed"], "mode": 0},
        {"id": 2, "type": "KSampler", "inputs": [{"name": "model", "type": "MODEL", "link": 7}],
         "outputs": [], "widgets_values": [42, "randomize", 3, "ddim"], "mode": 0},
        {"id": 3, "type": "KSampler", "inputs": [], "outputs": [], "widgets_values": [1, "fixed", 1, "euler"], "mode": 4},
    ], "links": [[7, 1, 0, 2, 0, "MODEL"]]}
    assert ui_to_api(ui, info) == {
        "1": {"class_type": "Src", "inputs": {"n": 5}},
        "2": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 42, "steps": 3, "sampler_name": "ddim"}},
    }
    ui["nodes"][0]["widgets_values"] = [5, "fixed", "x", "extra"]
    with pytest.raises(ValueError):
        ui_to_api(ui, info)


def test_train_workflow_sets_every_generated_input() -> None:
    """The shipped training workflow follows the inputs generated from the settings specs."""
    from facediffuser.nodes.train_nodes import options_node_specs, train_node_specs

    api = load_api("train_face_lora")
    train = next(v for v in api.values() if v["class_type"] == "FaceDiffuserTrainLora")
    options = next(k for k, v in api.items() if v["class_type"] == "FaceDiffuserTrainOptions")
    assert set(train["inputs"]) == {"ckpt_name", "dataset", "output_name", "options", *(s.name for s in train_node_specs())}
    assert train["inputs"]["options"] == [options, 0]
    assert set(api[options]["inputs"]) == {s.name for s in options_node_specs()}
