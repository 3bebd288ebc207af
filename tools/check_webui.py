"""Check the extension inside a real Automatic1111 / Forge web UI, through its HTTP API.

Not part of the test suite's own dependencies: point it at a web UI checkout with its venv
(``tests/sdwebui/test_webui_check.py`` runs it when ``$FACEDIFFUSER_WEBUI_DIR`` is set).

    python tools/check_webui.py --webui /path/to/stable-diffusion-webui-forge [--data-dir D] [--port N]

What it does, printing one ``PASS``/``FAIL`` line per point (exit 1 if any fails):

1. **install** -- ``git clone`` of this repository (its committed HEAD) into ``D/extensions/``, then
   the web UI's own installer function (``launch.run_extension_installer``, what *Install from URL*
   calls); ``pip freeze --all`` of the web UI's venv before and after must differ only by added
   packages;
2. starts the web UI headless (``--nowebui --api --always-cpu``, loopback, ``HF_HUB_OFFLINE=1``)
   with an SD1.5-shaped checkpoint (``--checkpoint``, else ``facediffuser make-model --size full``
   cached under ``$FACEDIFFUSER_TEST_CACHE``);
3. **train** -- a 6-step rank-16 UNet + text-encoder training through the tab's callable
   (``POST /facediffuser/v1/train``), stopped after step 1 or a later one (state kept), resumed,
   finished: the LoRA lands in the web UI's Lora folder;
4. **lora** -- ``<lora:NAME:1>`` changes the image, ``<lora:NAME:0>`` leaves it unchanged, and the
   web UI's log says every module was patched (Forge: ``[LORA] Loaded ... UNet with 192 keys ...
   (skipped 0 keys)`` and ``... CLIP with 72 keys ...``, no unmatched keys); a control file with
   one bogus key must be reported by that same log check (so the check can fail);
5. **fid** -- the "FaceDiffuser FID" accordion via ``alwayson_scripts``: off leaves no trace; a
   missing Inception file gives the one-line error naming it; on, it returns FID / KID / N for a
   batch (reference = a folder of real images, saved to ``models/fid_stats``), and accumulates
   across two calls;
6. **lora-vs-base** -- the Script-dropdown entry returns its table (3 rows with N) and 2 images;
7. **pip freeze** -- unchanged by all of the above (training ran in a child process).

The FID Inception weights: ``$FACEDIFFUSER_INCEPTION`` if set, else the labelled stand-in with
random weights (the same file layout; numbers are then not real FIDs -- this checks the plumbing).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EXT_NAME = "facediffuser"
LORA_NAME = "fd_check_lora"
CONTROL_NAME = "fd_check_control"
PROMPT = "a photo of a face"
EXPECTED_UNET, EXPECTED_CLIP = 192, 72


class Report:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def line(self, ok: bool, name: str, detail: str) -> bool:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
        if not ok:
            self.failed.append(name)
        return ok


# --- the web UI process ----------------------------------------------------------------------------

class WebUI:
    def __init__(self, root: Path, python: Path, data: Path, port: int, checkpoint_dir: Path, lora_dir: Path) -> None:
        self.root, self.python, self.data, self.port = root, python, data, port
        self.ckpt_dir, self.lora_dir = checkpoint_dir, lora_dir
        self.log_path = data / "webui.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600) -> float:
        args = [str(self.python), "launch.py", "--skip-prepare-environment", "--skip-python-version-check",
                "--skip-torch-cuda-test", "--skip-version-check", "--always-cpu", "--nowebui", "--api",
                "--server-name", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data),
                "--ckpt-dir", str(self.ckpt_dir), "--lora-dir", str(self.lora_dir), "--no-download-sd-model"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        t0 = time.time()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, cwd=str(self.root), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the web UI exited with {self.proc.returncode}; see {self.log_path}")
            try:
                self.get("/sdapi/v1/sd-models", timeout=5)
                return time.time() - t0
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise RuntimeError(f"the web UI did not answer within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def mark(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, mark: int) -> str:
        with open(self.log_path, "rb") as fh:
            fh.seek(mark)
            return fh.read().decode("utf-8", errors="replace")

    def _call(self, method: str, path: str, payload: Any = None, timeout: float = 900) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None

    def get(self, path: str, timeout: float = 60) -> Any:
        return self._call("GET", path, timeout=timeout)

    def post(self, path: str, payload: Any, timeout: float = 900) -> Any:
        return self._call("POST", path, payload, timeout=timeout)

    def txt2img(self, prompt: str = PROMPT, *, seed: int = 1, batch_size: int = 1, **extra: Any) -> tuple[list, dict]:
        payload = {"prompt": prompt, "negative_prompt": "", "steps": 2, "width": 64, "height": 64, "seed": seed,
                   "sampler_name": "Euler", "cfg_scale": 7.0, "batch_size": batch_size, "n_iter": 1} | extra
        res = self.post("/sdapi/v1/txt2img", payload)
        return [_decode(b) for b in res["images"]], json.loads(res["info"])


def _decode(b64: str):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- install -------------------------------------------------------------------------------------------

def freeze(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True).stdout
    pins = {}
    for line in out.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.lower().replace("_", "-")] = version
        elif line.strip():
            pins[line.strip().lower()] = "(unpinned)"
    return pins


def freeze_diff(before: dict[str, str], after: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    added = [f"{k}=={after[k]}" for k in sorted(set(after) - set(before))]
    removed = [f"{k}=={before[k]}" for k in sorted(set(before) - set(after))]
    changed = [f"{k} {before[k]} -> {after[k]}" for k in sorted(set(before) & set(after)) if before[k] != after[k]]
    return added, changed, removed


def install_extension(webui: Path, python: Path, data: Path, source: Path) -> tuple[Path, str]:
    """Clone ``source`` (its committed HEAD) into extensions/ and run the web UI's installer on it."""
    head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    ext = data / "extensions" / EXT_NAME
    ext.parent.mkdir(parents=True, exist_ok=True)
    if (ext / ".git").exists():
        subprocess.run(["git", "-C", str(ext), "fetch", "-q", str(source), head], check=True)
        subprocess.run(["git", "-C", str(ext), "checkout", "-q", "--force", head], check=True)
    else:
        if ext.exists() or ext.is_symlink():
            raise SystemExit(f"{ext} exists and is not a git clone: remove it (the check installs the extension itself)")
        subprocess.run(["git", "clone", "-q", "--no-checkout", str(source), str(ext)], check=True)
        subprocess.run(["git", "-C", str(ext), "checkout", "-q", head], check=True)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    code = f"import launch; launch.run_extension_installer({str(ext)!r})"
    proc = subprocess.run([str(python), "-c", code], cwd=str(webui), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the web UI's installer failed: {proc.stderr.strip()[-800:]}")
    return ext, (proc.stdout + proc.stderr).strip()


# --- fixtures: checkpoint, Inception, images --------------------------------------------------------------

def _importable() -> None:
    """``import facediffuser`` for this script, whatever this checkout's folder is called."""
    try:
        import facediffuser  # noqa: F401
    except ImportError:
        root = Path(tempfile.mkdtemp(prefix="fd-import-"))
        (root / "facediffuser").symlink_to(REPO, target_is_directory=True)
        sys.path.insert(0, str(root))


def prepare(data: Path, checkpoint: Path | None) -> dict[str, Path]:
    _importable()
    models = data / "models"
    ckpt_dir, lora_dir, inc_dir = models / "Stable-diffusion", models / "Lora", models / "inception"
    for d in (ckpt_dir, lora_dir, inc_dir):
        d.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        cache = Path(os.environ.get("FACEDIFFUSER_TEST_CACHE", REPO / ".cache" / "tests")) / "models"
        checkpoint = cache / "sd15-full-seed0-fp16-layout1.safetensors"
        if not checkpoint.is_file():
            from facediffuser.sd.make_model import make_checkpoint

            make_checkpoint(checkpoint, arch="sd15", size="full", dtype="fp16", seed=0)
    link = ckpt_dir / "sd15-check.safetensors"
    if not link.exists():
        try:
            link.symlink_to(checkpoint.resolve())
        except OSError:
            shutil.copyfile(checkpoint, link)
    weights = inc_dir / "weights-inception-2015-12-05-6726825d.pth"
    if os.environ.get("FACEDIFFUSER_INCEPTION"):
        shutil.copyfile(os.environ["FACEDIFFUSER_INCEPTION"], weights)
        inception_kind = "real"
    else:
        if not weights.is_file():
            import torch

            from facediffuser.demo.standin_inception import build_standin_state_dict

            torch.save(build_standin_state_dict(0), weights)
        inception_kind = "stand-in (random weights; the numbers are not real FIDs)"
    from facediffuser.demo.toy_faces import write_toy_faces

    real, train = data / "inputs" / "real_faces", data / "inputs" / "train_faces"
    if not real.is_dir():
        write_toy_faces(real, 16, seed=1, size=64)
    if not train.is_dir():
        write_toy_faces(train, 4, seed=2, size=64)
    return {"ckpt_dir": ckpt_dir, "lora_dir": lora_dir, "inception": weights, "real": real, "train": train,
            "inception_kind": Path(inception_kind)}


# --- the checks --------------------------------------------------------------------------------------------

_LOADED = re.compile(r"\[LORA\] Loaded (?P<file>\S+) for (?P<model>\S+)-(?P<part>UNet|CLIP) with (?P<keys>\d+) keys "
                     r"at weight (?P<weight>\S+) \(skipped (?P<skipped>\d+) keys\)")
_UNMATCHED = re.compile(r"\[LORA\] Loading (?P<file>\S+) for \S+ with unmatched keys (?P<keys>\[.*\])")
_MISMATCH = re.compile(r"\[LORA\] (?:LoRA version mismatch for \S+: (?P<file1>\S+)|Mismatch (?P<file2>\S+) for)")


def lora_log_verdict(log: str, file_name: str) -> tuple[bool, str]:
    """Did the web UI patch every module of ``file_name`` (UNet 192 + CLIP 72, 0 skipped, no unmatched key)?"""
    loaded = {m["part"]: m for m in _LOADED.finditer(log) if Path(m["file"]).name == file_name}
    unmatched = [m["keys"] for m in _UNMATCHED.finditer(log) if Path(m["file"]).name == file_name]
    mismatch = [m for m in _MISMATCH.finditer(log) if Path(m["file1"] or m["file2"]).name == file_name]
    parts = [f"{part} {m['keys']} keys at weight {m['weight']} (skipped {m['skipped']})" for part, m in sorted(loaded.items())]
    problems = []
    for part, want in (("UNet", EXPECTED_UNET), ("CLIP", EXPECTED_CLIP)):
        m = loaded.get(part)
        if m is None:
            problems.append(f"no '[LORA] Loaded' line for {part}")
        elif int(m["keys"]) != want or int(m["skipped"]) != 0:
            problems.append(f"{part}: {m['keys']} keys, {m['skipped']} skipped (want {want}, 0)")
    if unmatched:
        problems.append(f"unmatched keys {', '.join(unmatched)}")
    if mismatch:
        problems.append("version mismatch / mismatched keys")
    return not problems, "; ".join(parts + problems) or "no [LORA] lines"


TRAIN_STEPS = 6


def check_train(ui: WebUI, rep: Report, paths: dict, title: str) -> Path | None:
    settings = {"steps": TRAIN_STEPS, "rank": 16, "alpha": 16, "train_text_encoder": True, "resolution": 64, "lr": 1e-2,
                "text_encoder_lr": 1e-3, "seed": 0}
    body = {"checkpoint": title, "dataset": str(paths["train"]), "name": LORA_NAME, "settings": settings, "start_over": True}
    target = paths["lora_dir"] / f"{LORA_NAME}.safetensors"
    if target.exists():
        target.unlink()
    t0 = time.time()
    first = ui.post("/facediffuser/v1/train", body)
    if not rep.line(first.get("ok", False) and first["message"].startswith("started"), "train start", first["message"]):
        return None
    deadline = time.time() + 1200
    # Stop once step 1 is done. The child may already be inside the next step (tens of seconds each on a
    # busy CPU), so the run has steps to spare and the stop may land at any step before the last.
    while time.time() < deadline:
        prog = ui.get("/facediffuser/v1/train")
        if prog.get("step", 0) >= 1 or prog["status"] not in ("loading", "training"):
            break
        time.sleep(0.2)
    seen = [line for line in prog.get("log", "").splitlines() if line.strip()][-1:]
    print(f"      (stop requested {time.time() - t0:.1f} s after start; child's last log line: {seen[0][:160] if seen else '-'!r})")
    ui.post("/facediffuser/v1/train/stop", {})
    while time.time() < deadline:
        prog = ui.get("/facediffuser/v1/train")
        if prog["status"] not in ("loading", "training", "stopping"):
            break
        time.sleep(1)
    stopped = prog["status"] == "stopped" and 1 <= prog["step"] < TRAIN_STEPS and not target.exists()
    rep.line(stopped, "train stop", f"{prog['line']} (no LoRA written yet: {not target.exists()})")
    second = ui.post("/facediffuser/v1/train", body | {"start_over": False})
    rep.line(second["message"].startswith("resumed"), "train resume", second["message"])
    while time.time() < deadline:
        prog = ui.get("/facediffuser/v1/train")
        if prog["status"] not in ("loading", "training", "stopping"):
            break
        time.sleep(1)
    ok = prog["status"] == "finished" and prog["step"] == TRAIN_STEPS and target.is_file()
    rep.line(ok, "train finish", f"{prog['line']}; {target} {'exists' if target.is_file() else 'MISSING'} "
             f"({time.time() - t0:.0f} s for both children, on CPU)")
    if not ok:
        print(prog.get("log", "")[-2000:])
    return target if ok else None


def make_control(lora: Path, out: Path) -> str:
    """Our file plus one key no model has."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lora))
    bogus = "lora_unet_facediffuser_bogus_module.lora_down.weight"
    tensors[bogus] = torch.zeros(16, 8, dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(lora), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    save_file(tensors, str(out), metadata=meta | {"ss_output_name": out.stem})
    return bogus


def check_lora(ui: WebUI, rep: Report, lora: Path) -> None:
    import numpy as np

    (base,), _ = ui.txt2img(seed=11)
    mark = ui.mark()
    (with_lora,), _ = ui.txt2img(f"{PROMPT} <lora:{lora.stem}:1>", seed=11)
    log1 = ui.log_since(mark)
    diff = float(np.abs(base.astype(np.int16) - with_lora.astype(np.int16)).mean())
    rep.line(diff > 0, "lora changes the image", f"<lora:{lora.stem}:1>: mean |diff| = {diff:.2f} / 255 vs the same seed without it")
    ok, detail = lora_log_verdict(log1, lora.name)
    rep.line(ok, "lora modules patched", detail)
    mark = ui.mark()
    (zero,), _ = ui.txt2img(f"{PROMPT} <lora:{lora.stem}:0>", seed=11)
    same = bool(np.array_equal(zero, base))
    rep.line(same, "lora weight 0", f"<lora:{lora.stem}:0> image identical to the base image: {same} "
             f"({lora_log_verdict(ui.log_since(mark), lora.name)[1]})")
    control = lora.with_name(f"{CONTROL_NAME}.safetensors")
    bogus = make_control(lora, control)
    mark = ui.mark()
    ui.txt2img(f"{PROMPT} <lora:{control.stem}:1>", seed=11)
    bad, detail = lora_log_verdict(ui.log_since(mark), control.name)
    rep.line(not bad and bogus in detail, "control file with one bogus key",
             f"the same log check fails on it, as it must: {detail}")
    control.unlink()


def _fid_args(enabled=True, reference="(none)", real_folder="", bank="fd_check", mode="this batch", reset=False) -> dict:
    return {"alwayson_scripts": {"FaceDiffuser FID": {"args": [enabled, reference, real_folder, bank, mode, reset]}}}


def check_fid(ui: WebUI, rep: Report, paths: dict) -> str | None:
    _, info = ui.txt2img(seed=21, batch_size=2)
    keys = [k for k in info["extra_generation_params"] if k.startswith("FaceDiffuser")]
    rep.line(not keys, "fid off", f"accordion off (the default): FaceDiffuser keys in the response: {keys or 'none'}")

    moved = paths["inception"].with_suffix(".away")
    os.replace(paths["inception"], moved)
    try:
        mark = ui.mark()
        _, info = ui.txt2img(seed=21, batch_size=2, **_fid_args(real_folder=str(paths["real"])))
        log = ui.log_since(mark)
    finally:
        os.replace(moved, paths["inception"])
    msg = info["extra_generation_params"].get("FaceDiffuser FID error", "")
    in_log = msg.split(": ", 1)[-1][:60] in log
    rep.line(paths["inception"].name in msg and "models/inception" in msg.replace(os.sep, "/") and in_log,
             "fid missing weights", f"{msg[:300] or 'no error in the response'} (also in the web UI's log: {in_log})")

    _, info = ui.txt2img(seed=21, batch_size=2, **_fid_args(real_folder=str(paths["real"])))
    egp = info["extra_generation_params"]
    ok = "FaceDiffuser FID" in egp and "FaceDiffuser KID" in egp and egp.get("FaceDiffuser N") == "2 generated vs 16 reference"
    rep.line(ok and "FaceDiffuser FID: " in info["infotexts"][0], "fid this batch",
             f"FID {egp.get('FaceDiffuser FID')}, KID {egp.get('FaceDiffuser KID')}, N {egp.get('FaceDiffuser N')}, "
             f"reference {egp.get('FaceDiffuser reference')} (also in the images' infotext)")
    stats_name = egp.get("FaceDiffuser reference")
    saved = stats_name and (paths["ckpt_dir"].parent / "fid_stats" / stats_name).is_file()
    rep.line(bool(saved), "fid reference saved", f"the real-image folder was embedded once and saved as models/fid_stats/{stats_name}")

    _, first = ui.txt2img(seed=31, batch_size=2, **_fid_args(reference=stats_name or "(none)", mode="accumulate", reset=True))
    _, second = ui.txt2img(seed=41, batch_size=2, **_fid_args(reference=stats_name or "(none)", mode="accumulate"))
    n1, n2 = first["extra_generation_params"].get("FaceDiffuser N"), second["extra_generation_params"].get("FaceDiffuser N")
    rep.line(n1 == "2 generated vs 16 reference" and n2 == "4 generated vs 16 reference", "fid accumulate",
             f"bank 'fd_check': call 1 N {n1} (FID {first['extra_generation_params'].get('FaceDiffuser FID')}), "
             f"call 2 N {n2} (FID {second['extra_generation_params'].get('FaceDiffuser FID')})")
    return stats_name


def check_lora_vs_base(ui: WebUI, rep: Report, lora: Path, stats_name: str) -> None:
    images, info = ui.txt2img(seed=51, script_name="FaceDiffuser: LoRA vs base",
                              script_args=[lora.stem, 1.0, 2, PROMPT, stats_name, ""])
    rows = info["extra_generation_params"].get("FaceDiffuser LoRA vs base") or []
    table = " | ".join(f"{r['label']}: FID {r['fid']:.2f} N {r['n_a']}/{r['n_b']}" for r in rows)
    ok = [r["label"] for r in rows] == ["Real vs Base", "Real vs LoRA", "Base vs LoRA"] and \
        [(r["n_a"], r["n_b"]) for r in rows] == [(2, 16), (2, 16), (2, 2)] and len(images) == 2
    rep.line(ok, "lora vs base", f"{table}; {len(images)} images (chart, grid); folder "
             f"{info['extra_generation_params'].get('FaceDiffuser output folder')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--webui", required=True, type=Path, help="The web UI checkout (Forge or A1111) with launch.py.")
    ap.add_argument("--python", type=Path, help="Its Python (default: WEBUI/venv/bin/python).")
    ap.add_argument("--data-dir", type=Path, help="The web UI's --data-dir (default: a new temporary folder).")
    ap.add_argument("--port", type=int, default=0, help="Port on 127.0.0.1 (default: a free one).")
    ap.add_argument("--checkpoint", type=Path, help="An SD1.5-shaped .safetensors (default: the cached make-model one).")
    ap.add_argument("--source", type=Path, default=REPO, help="The repository to install (its committed HEAD).")
    args = ap.parse_args(argv)
    python = args.python or args.webui / ("venv/Scripts/python.exe" if os.name == "nt" else "venv/bin/python")
    data = args.data_dir or Path(tempfile.mkdtemp(prefix="fd-webui-check-"))
    data.mkdir(parents=True, exist_ok=True)
    rep = Report()
    print(f"web UI {args.webui} (python {python}), data dir {data}", flush=True)
    paths = prepare(data, args.checkpoint)
    print(f"Inception weights: {paths['inception_kind']}", flush=True)

    before = freeze(python)
    ext, output = install_extension(args.webui, python, data, args.source)
    after = freeze(python)
    added, changed, removed = freeze_diff(before, after)
    rep.line(not changed and not removed, "install", f"{ext}: pip freeze before/after: added {added or 'nothing'}, "
             f"changed {changed or 'nothing'}, removed {removed or 'nothing'}; installer said: {output[-400:] or '(nothing)'}")
    overlay = ext / ".trainer-overlay" / "overlay.json"
    stamp = json.loads(overlay.read_text()) if overlay.is_file() else {}
    rep.line(overlay.is_file() and not stamp.get("error"), "trainer overlay",
             f"{overlay.parent}: {', '.join(stamp.get('installed', [])) or stamp.get('error', 'missing')}")

    ui = WebUI(args.webui, python, data, args.port or _free_port(), paths["ckpt_dir"], paths["lora_dir"])
    try:
        secs = ui.start()
        models = ui.get("/sdapi/v1/sd-models")
        scripts = ui.get("/sdapi/v1/scripts")
        found = "facediffuser fid" in [s.lower() for s in scripts.get("txt2img", [])] and \
            "facediffuser: lora vs base" in [s.lower() for s in scripts.get("txt2img", [])]
        rep.line(found, "start", f"up in {secs:.0f} s; checkpoints {[m['title'] for m in models]}; our scripts listed: {found}")
        lora = check_train(ui, rep, paths, models[0]["title"])
        if lora is not None:
            check_lora(ui, rep, lora)
        stats_name = check_fid(ui, rep, paths)
        if lora is not None and stats_name:
            check_lora_vs_base(ui, rep, lora, stats_name)
    finally:
        ui.stop()
    final = freeze(python)
    added2, changed2, removed2 = freeze_diff(after, final)
    rep.line(not (added2 or changed2 or removed2), "pip freeze after use",
             f"unchanged by training, scoring and the study: added {added2 or 'nothing'}, changed {changed2 or 'nothing'}")
    print(f"{'all checks passed' if not rep.failed else 'FAILED: ' + ', '.join(rep.failed)} (log: {ui.log_path})")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
