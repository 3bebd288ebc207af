"""The shipped workflows and the FaceDiffuser nodes in a real ComfyUI, with the full random SD1.5.

One server for the module. What the tests change in the API twins before submitting (everything
else is the shipped file as is): ``ckpt_name`` -> the random SD1.5, sizes 64x64, sampler ``steps`` 1,
batch 2 in the FID workflow, and the training run: 2 steps, rank 4, resolution 64, text encoder on
(the options node keeps its defaults: mixed precision ``auto`` is fp32 on this CPU).

Order matters only for cost: ``trained`` (a module fixture) runs ``train_face_lora`` once and its
LoRA is reused by the txt2img and FID workflows.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from comfyui_harness import MODEL_FOLDERS, ComfyServer, api_prompt

from test_workflow_formats import WORKFLOWS, load_api, load_ui, ui_to_api

pytestmark = [pytest.mark.comfyui, pytest.mark.full_model]

CKPT = "facediffuser_sd15_random.safetensors"
BAD_LOG = ("lora key not loaded", "NOT LOADED", "Traceback", "!!! Exception during processing")


class Env:
    server: ComfyServer
    ckpt: str
    inception_dir: Path
    stats_dir: Path
    weights: Path


def _random_pngs(folder: Path, n: int, seed: int, size: int = 64) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        low = rng.random((4, 4, 3))
        img = np.kron(low, np.ones((size // 4, size // 4, 1))) * 200 + rng.random((size, size, 3)) * 55
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(img.astype(np.uint8)).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def env(request, comfyui_server_factory, tmp_path_factory, sd15_full_checkpoint, inception_weights) -> Env:
    e = Env()
    if {"fid_stats", "inception"} <= set(MODEL_FOLDERS):  # the shared server maps our folders: use it
        e.server = request.getfixturevalue("comfyui_server")
        e.inception_dir, e.stats_dir = e.server.models_dir / "inception", e.server.models_dir / "fid_stats"
        own = False
    else:  # a server of our own with models/fid_stats and models/inception mapped by a second yaml
        extra = tmp_path_factory.mktemp("fd_model_folders")
        e.inception_dir, e.stats_dir = extra / "inception", extra / "fid_stats"
        yaml = extra / "facediffuser_folders.yaml"
        yaml.write_text(json.dumps({"facediffuser_nodes": {"base_path": str(extra), "fid_stats": "fid_stats", "inception": "inception"}}))
        e.server = comfyui_server_factory("fd_nodes", extra_args=["--extra-model-paths-config", str(yaml)])
        own = True
    e.inception_dir.mkdir(parents=True, exist_ok=True)
    e.stats_dir.mkdir(parents=True, exist_ok=True)
    e.weights = e.inception_dir / inception_weights.name
    if not e.weights.exists():
        e.weights.symlink_to(inception_weights)
    e.ckpt = e.server.add_model("checkpoints", sd15_full_checkpoint, CKPT)
    _random_pngs(e.server.input_dir / "faces", 3, seed=1)
    for i, p in enumerate(sorted((e.server.input_dir / "faces").glob("*.png"))):
        p.with_suffix(".txt").write_text(f"a photo of sks person, view {i}")
    _random_pngs(e.server.input_dir / "real_faces", 6, seed=2)
    yield e
    if own:
        e.server.stop()


def _clean_log(text: str) -> None:
    bad = [ln for ln in text.splitlines() if any(b in ln for b in BAD_LOG)]
    assert not bad, "\n".join(bad[:20])


def _shrink(prompt: dict, ckpt: str) -> dict:
    for node in prompt.values():
        inp = node["inputs"]
        if "ckpt_name" in inp:
            inp["ckpt_name"] = ckpt
        if node["class_type"] == "EmptyLatentImage":
            inp.update(width=64, height=64)
        if node["class_type"] == "KSampler":
            inp["steps"] = 1
    return prompt


def _train_prompt(env: Env, **over) -> dict:
    p = _shrink(load_api("train_face_lora"), env.ckpt)
    p["2"]["inputs"].update(steps=2, rank=4, alpha=2.0, resolution=64, train_text_encoder=True, output_name="face_lora_test")
    p["2"]["inputs"].update(over)
    return p


def _lora_dirs(srv: ComfyServer) -> list[Path]:
    """ComfyUI's loras folders in its search order: the first (where Train Face LoRA writes) is the
    server's primary models/loras -- the base directory's in today's ComfyUI, the private run tree's
    (linked to this server's models folder) in old ones -- then the extra path to the same folder."""
    return list(dict.fromkeys([srv.primary_models_dir / "loras", srv.models_dir / "loras"]))


def _find_lora(srv: ComfyServer, name: str) -> Path | None:
    return next((d / name for d in _lora_dirs(srv) if (d / name).is_file()), None)


def _loras_listing(srv: ComfyServer) -> list[str]:
    return sorted(str(p) for d in _lora_dirs(srv) if d.is_dir() for p in d.iterdir())


@pytest.fixture(scope="module")
def trained(env: Env):
    name = "face_lora_test.safetensors"
    mark = env.server.log_mark()
    t0 = time.monotonic()
    try:
        entry = env.server.run(_train_prompt(env), timeout=900)
        yield {"entry": entry, "log": env.server.log_since(mark), "seconds": time.monotonic() - t0, "name": name}
    finally:  # the files this module made in a loras folder shared with other runs
        for d in _lora_dirs(env.server):
            for f in (name, "face_lora_test.loss.png", "cancelled_lora.safetensors", "cancelled_lora.loss.png"):
                (d / f).unlink(missing_ok=True)


# --- workflow files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_converts_to_its_api_twin(env: Env, name: str) -> None:
    info = env.server.object_info()
    assert ui_to_api(load_ui(name), info) == load_api(name)


# --- paths --------------------------------------------------------------------------------------

def test_path_inputs_cannot_escape(env: Env) -> None:
    srv = env.server
    entry = srv.run(_train_prompt(env, dataset="../../etc/passwd"), timeout=300, check=False)
    errors = srv.execution_errors(entry)
    assert errors and "outside the allowed folders" in errors[0].get("exception_message", ""), errors
    assert errors[0].get("node_id") == "2"

    prompt = api_prompt([
        ("1", "LoadImage", {"image": "faces/img_00.png"}),
        ("2", "FaceDiffuserFIDReference", {"folder": "/etc", "stats_file": "(compute from folder)", "save_as": "", "resize": "tf1"}),
        ("3", "FaceDiffuserFID", {"images": ["1", 0], "reference": ["2", 0], "label": "x", "mode": "single", "reset": False,
                                   "kid_subsets": 10, "kid_subset_size": 2}),
    ])
    if "faces/img_00.png" not in srv.object_info("LoadImage")["LoadImage"]["input"]["required"]["image"][0]:
        prompt["1"]["inputs"]["image"] = "img_00.png"
        shutil.copy(srv.input_dir / "faces" / "img_00.png", srv.input_dir / "img_00.png")
    entry = srv.run(prompt, timeout=120, check=False)
    errors = srv.execution_errors(entry)
    assert errors and "outside the allowed folders" in errors[0].get("exception_message", ""), errors


# --- training -------------------------------------------------------------------------------------

def test_train_face_lora_workflow(env: Env, trained: dict) -> None:
    from facediffuser.trainer.kohya_format import load_kohya_lora

    srv, entry = env.server, trained["entry"]
    print(f"train_face_lora (2 steps, 64 px, TE on) + load + 1-step sample: {trained['seconds']:.1f} s")
    lora = _find_lora(srv, trained["name"])
    assert lora is not None and lora.parent == _lora_dirs(srv)[0]  # the first loras folder
    tensors, meta = load_kohya_lora(lora)
    assert meta["ss_steps"] == "2" and meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.trigger_phrase"] == "sks"
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    assert not [p for p in _loras_listing(srv) if ".tmp" in p]
    outs = entry["outputs"]
    assert "2 steps" in outs["2"]["text"][0]
    info = outs["3"]["text"][0]
    assert "all LoRA keys loaded" in info and "trigger word: sks" in info and "WARNING" not in info
    assert srv.output_images(entry) and all(p.is_file() for p in srv.output_images(entry))
    assert outs["10"]["images"]  # the loss curve preview
    assert "step 2/2" in trained["log"]
    _clean_log(trained["log"])

    # the base checkpoint's hashes as sd-scripts writes them (A1111's new and old model hash)
    ckpt = env.server.models_dir / "checkpoints" / env.ckpt
    h = hashlib.sha256()
    with open(ckpt, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
        fh.seek(0x100000)
        legacy = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    assert (meta["ss_new_sd_model_hash"], meta["ss_sd_model_hash"]) == (h.hexdigest(), legacy)

    # queue the same prompt again: the file exists with matching metadata, so it is reused, not retrained
    mtime = lora.stat().st_mtime_ns
    again = srv.run(_train_prompt(env), timeout=300)
    assert "reused" in again["outputs"]["2"]["text"][0]
    assert lora.stat().st_mtime_ns == mtime

    # edit one caption, no restart: IS_CHANGED sees the dataset change, the reuse check sees a new
    # caption, and the next queue trains again
    caption = env.server.input_dir / "faces" / "img_01.txt"
    caption.write_text(caption.read_text() + ", smiling")
    mark = srv.log_mark()
    edited = srv.run(_train_prompt(env), timeout=900)
    assert "wrote" in edited["outputs"]["2"]["text"][0] and "reused" not in edited["outputs"]["2"]["text"][0]
    assert "the dataset differs" in srv.log_since(mark)
    assert lora.stat().st_mtime_ns != mtime
    assert load_kohya_lora(lora)[1]["facediffuser_train_data_sha256"] != meta["facediffuser_train_data_sha256"]


def test_cancel_training(env: Env, trained: dict) -> None:
    srv = env.server
    before = _loras_listing(srv)
    mark = srv.log_mark()
    full = _train_prompt(env, steps=40, output_name="cancelled_lora", seed=11)
    prompt = {k: full[k] for k in ("2", "11")}  # the trainer and its options node
    pid = srv.submit(prompt)
    deadline = time.monotonic() + 300
    while "Train Face LoRA: step 1/40" not in srv.log_since(mark):
        assert time.monotonic() < deadline, srv.log_tail()
        time.sleep(0.2)
    t0 = time.monotonic()
    srv.interrupt()
    entry = srv.wait(pid, timeout=120, check=False)
    took = time.monotonic() - t0
    log = srv.log_since(mark)
    steps = [int(s) for s in re.findall(r"Train Face LoRA: step (\d+)/40", log)]
    print(f"cancel: node ended {took:.1f} s after /interrupt, at step {max(steps)}")
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert max(steps) <= 3
    new = sorted(set(_loras_listing(srv)) - set(before))
    # no LoRA, no temp file, no loss plot: a cancelled run keeps everything in its state folder
    assert not new, new
    assert "cancelled at step" in log
    # the server goes on serving prompts
    ok = srv.run(api_prompt([("1", "FaceDiffuserTestProbeProcess", {"nonce": f"after-cancel-{time.time()}"})]), timeout=60)
    assert ok["status"]["status_str"] == "success"


# --- txt2img --------------------------------------------------------------------------------------

def test_face_txt2img_workflow(env: Env, trained: dict) -> None:
    srv = env.server
    p = _shrink(load_api("face_txt2img"), env.ckpt)
    p["2"]["inputs"]["lora_name"] = trained["name"]
    mark = srv.log_mark()
    entry = srv.run(p, timeout=300)
    imgs = srv.output_images(entry)
    assert len(imgs) == 1 and imgs[0].is_file() and imgs[0].stat().st_size > 0
    assert "all LoRA keys loaded" in entry["outputs"]["2"]["text"][0]
    _clean_log(srv.log_since(mark))


# --- FID ------------------------------------------------------------------------------------------

def test_fid_workflow_matches_cli_and_accumulates(env: Env, trained: dict, tmp_path: Path, capsys) -> None:
    import torch

    from facediffuser.cli import main as cli_main
    from facediffuser.evaluation.images import load_images
    from facediffuser.evaluation.inception import InceptionFeatures
    from facediffuser.evaluation.stats import FeatureStats, compare, stats_for

    srv = env.server
    runs = []
    mark = srv.log_mark()
    for i in range(3):
        p = _shrink(load_api("face_lora_vs_base_fid"), env.ckpt)
        p["2"]["inputs"]["lora_name"] = trained["name"]
        p["7"]["inputs"]["batch_size"] = 2
        for nid in ("8", "9"):
            p[nid]["inputs"]["seed"] = 100 + i
        for nid in ("15", "16"):
            p[nid]["inputs"].update(reset=i == 0, kid_subsets=20)
        t0 = time.monotonic()
        entry = srv.run(p, timeout=600)
        print(f"FID workflow run {i + 1}: {time.monotonic() - t0:.1f} s")
        runs.append(entry)
    _clean_log(srv.log_since(mark))

    def files(entry, nid):
        return [srv.output_dir / im["subfolder"] / im["filename"] for im in entry["outputs"][nid]["images"]]

    # the reference was saved as models/fid_stats/real_faces.npz, with features
    assert (env.stats_dir / "real_faces.npz").is_file()
    out1 = runs[0]["outputs"]
    assert out1["15"]["n"] == [2] and out1["16"]["n"] == [2]
    assert "N = 2 generated vs 6 reference" in out1["15"]["text"][0]
    assert out1["17"]["text"] and out1["18"]["images"]  # comparison table and chart

    # run 1 equals the CLI's `facediffuser eval fid` on the saved images and the reference folder
    gen_dir = tmp_path / "base_run1"
    gen_dir.mkdir()
    for f in files(runs[0], "12"):
        shutil.copy(f, gen_dir / f.name)
    capsys.readouterr()
    rc = cli_main(["eval", "fid", str(gen_dir), str(srv.input_dir / "real_faces"), "--json", "--no-cache", "--quiet",
                   "--inception", str(env.weights), "--device", "cpu", "--kid-subsets", "20"])
    assert rc == 0
    cli = json.loads(capsys.readouterr().out)
    assert out1["15"]["fid"][0] == pytest.approx(cli["fid"], rel=1e-5)
    assert out1["15"]["kid"][0] == pytest.approx(cli["kid_mean"], rel=1e-5, abs=1e-9)

    # accumulate: after 3 runs of batch 2 the bank equals one evaluation over the 6 images
    ext = InceptionFeatures(env.weights, device="cpu", progress=False)
    ref = stats_for(srv.input_dir / "real_faces", lambda: ext, use_cache=False)
    for nid, save in (("15", "12"), ("16", "13")):
        imgs = torch.cat([load_images(files(e, save)) for e in runs])
        assert imgs.shape[0] == 6
        gen = FeatureStats.from_features(ext(imgs), protocol=ext.protocol(6))
        expected = compare(gen, ref, kid_subsets=20)
        last = runs[-1]["outputs"][nid]
        assert last["n"] == [6]
        assert last["fid"][0] == pytest.approx(expected.fid, rel=1e-5)
        assert last["kid"][0] == pytest.approx(expected.kid_mean, rel=1e-5, abs=1e-9)
    bank = srv.output_dir / "facediffuser_fid_banks" / "lora.npz"
    assert bank.is_file()
