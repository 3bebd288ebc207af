"""Smoke test in a real ComfyUI: our pack imports, the full random SD1.5 checkpoint is detected as
SD1.5 by ComfyUI's own checkpoint loader, and a 1-step txt2img prompt writes an image.

These are the preconditions of every other ComfyUI integration test: if one fails here, the
harness, the checkpoint builder or the pack is broken, not the feature under test."""

from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import pytest

from comfyui_harness import PROBE_PACK_NAME, ComfyServer, ComfyServerError, api_prompt

pytestmark = [pytest.mark.comfyui, pytest.mark.full_model]

# ComfyUI fills these two itself for SD1.x (logit scale and an identity text projection); real SD1.5
# checkpoints do not contain them either, and old ComfyUI logs them as "clip missing".
_CLIP_KEYS_COMFY_ADDS = {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}
SD15_UNET_PARAMS = 859_520_964


@pytest.fixture(scope="module")
def sd15_ckpt_name(comfyui_server: ComfyServer, sd15_full_checkpoint: Path) -> str:
    """The full random SD1.5 checkpoint, as ComfyUI's checkpoint COMBO lists it."""
    return comfyui_server.add_model("checkpoints", sd15_full_checkpoint, "facediffuser_sd15_random.safetensors")


def _loader_probe_prompt(ckpt_name: str) -> dict:
    return api_prompt([
        ("1", "CheckpointLoaderSimple", {"ckpt_name": ckpt_name}),
        ("2", "FaceDiffuserTestProbeModel", {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2]}),
    ])


def test_pack_imports_without_error(comfyui_server: ComfyServer) -> None:
    log = comfyui_server.log_text()
    assert comfyui_server.custom_node_import_status() == "ok", comfyui_server.log_tail()
    assert comfyui_server.custom_node_import_status(comfyui_server.custom_nodes_dir / PROBE_PACK_NAME) == "ok"
    pack = str(comfyui_server.pack_path)
    bad = [ln for ln in log.splitlines() if pack in ln and ("IMPORT FAILED" in ln or "Cannot import" in ln)]
    assert not bad, bad

    # Whatever nodes the pack declares (possibly none yet) are registered, under their own ids.
    from facediffuser import NODE_CLASS_MAPPINGS

    info = comfyui_server.object_info()
    assert "CheckpointLoaderSimple" in info and "FaceDiffuserTestProbeProcess" in info
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(info))
    assert not missing, f"pack nodes not registered in ComfyUI: {missing}"

    # Inside ComfyUI the pack is imported as its folder name, with relative imports only: an
    # absolute `import facediffuser` would work here (it is pip-installed) but not for users.
    entry = comfyui_server.run(api_prompt([("1", "FaceDiffuserTestProbeProcess", {"nonce": "import"})]), timeout=60)
    modules = entry["outputs"]["1"]["modules"]
    assert any(m.split(".")[0].endswith("facediffuser_pack") for m in modules), modules
    assert not [m for m in modules if m == "facediffuser" or m.startswith("facediffuser.")], modules


def test_full_checkpoint_is_detected_as_sd15(comfyui_server: ComfyServer, sd15_ckpt_name: str) -> None:
    mark = comfyui_server.log_mark()
    t0 = time.monotonic()
    entry = comfyui_server.run(_loader_probe_prompt(sd15_ckpt_name), timeout=300)
    print(f"checkpoint load + probe: {time.monotonic() - t0:.1f} s")
    probe = {k: v[0] for k, v in entry["outputs"]["2"].items()}

    # ComfyUI's own detection (comfy.model_detection over the state dict) picked its SD15 class.
    assert probe["model_config"] == "SD15"
    assert probe["model_class"] == "BaseModel"
    assert probe["model_type"] == "EPS"
    assert probe["clip_class"] == "SD1ClipModel"
    assert probe["vae_class"] == "AutoencoderKL"
    assert probe["unet_config"]["model_channels"] == 320
    assert probe["unet_config"]["context_dim"] == 768
    assert probe["unet_params"] == SD15_UNET_PARAMS

    log = comfyui_server.log_since(mark)
    assert "model_type EPS" in log, log
    # Every key of the file was used: no missing/leftover UNet, VAE or text-encoder weights.
    for needle in ("Missing VAE keys", "left over keys", "NOT LOADED", "Could not detect model type"):
        assert needle not in log, log
    for match in re.finditer(r"clip missing: (\[.*?\])", log):
        assert set(ast.literal_eval(match.group(1))) <= _CLIP_KEYS_COMFY_ADDS, match.group(0)


def test_one_step_txt2img_writes_an_image(comfyui_server: ComfyServer, sd15_ckpt_name: str) -> None:
    from PIL import Image

    prompt = api_prompt([
        ("1", "CheckpointLoaderSimple", {"ckpt_name": sd15_ckpt_name}),
        ("2", "CLIPTextEncode", {"clip": ["1", 1], "text": "a photo of a face"}),
        ("3", "CLIPTextEncode", {"clip": ["1", 1], "text": ""}),
        ("4", "EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
        ("5", "KSampler", {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                           "latent_image": ["4", 0], "seed": 0, "steps": 1, "cfg": 7.0,
                           "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}),
        ("6", "VAEDecode", {"samples": ["5", 0], "vae": ["1", 2]}),
        ("7", "SaveImage", {"images": ["6", 0], "filename_prefix": "facediffuser_smoke"}),
    ])
    t0 = time.monotonic()
    entry = comfyui_server.run(prompt, timeout=600)
    print(f"1-step 64x64 txt2img prompt: {time.monotonic() - t0:.1f} s")

    assert entry["status"]["status_str"] == "success"
    images = comfyui_server.output_images(entry)
    assert len(images) == 1 and images[0].name.startswith("facediffuser_smoke")
    assert images[0].is_file()
    with Image.open(images[0]) as img:
        assert img.format == "PNG"
        assert img.size == (64, 64)  # the VAE decoded an 8x8 latent: 8x upsampling, as in SD1.5
        assert img.mode == "RGB"


# --- the harness itself: its failure reports must fire, or every test above could pass vacuously.

def test_harness_reports_a_pack_that_fails_to_import(comfyui_server_factory, tmp_path: Path) -> None:
    broken = tmp_path / "broken_pack"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('facediffuser test: deliberately broken pack')\n")
    with pytest.raises(ComfyServerError, match=r"import status in ComfyUI: failed(.|\n)*deliberately broken"):
        comfyui_server_factory("comfyui_broken", pack_dir=broken, pack_name="broken_pack", probe_nodes=False)


def test_harness_reports_an_invalid_prompt(comfyui_server: ComfyServer) -> None:
    bad = api_prompt([("1", "CheckpointLoaderSimple", {"ckpt_name": "no_such_model.safetensors"}),
                      ("2", "FaceDiffuserTestProbeModel", {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2]})])
    with pytest.raises(ComfyServerError, match="value_not_in_list|not in list"):
        comfyui_server.submit(bad)


def test_harness_interrupts_a_running_prompt(comfyui_server: ComfyServer, sd15_ckpt_name: str) -> None:
    prompt = api_prompt([
        ("1", "CheckpointLoaderSimple", {"ckpt_name": sd15_ckpt_name}),
        ("2", "CLIPTextEncode", {"clip": ["1", 1], "text": "interrupt me"}),
        ("4", "EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
        ("5", "KSampler", {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                           "latent_image": ["4", 0], "seed": 1, "steps": 200, "cfg": 1.0,
                           "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}),
        ("6", "VAEDecode", {"samples": ["5", 0], "vae": ["1", 2]}),
        ("7", "SaveImage", {"images": ["6", 0], "filename_prefix": "facediffuser_interrupted"}),
    ])
    mark = comfyui_server.log_mark()
    prompt_id = comfyui_server.submit(prompt)
    deadline = time.monotonic() + 120
    while not re.search(r"\b[1-9]\d*/200 \[", comfyui_server.log_since(mark)):  # a sampling step is done
        assert time.monotonic() < deadline, comfyui_server.log_tail()
        time.sleep(0.2)
    comfyui_server.interrupt()
    t0 = time.monotonic()
    with pytest.raises(ComfyServerError, match="execution_interrupted|interrupted"):
        comfyui_server.wait(prompt_id, timeout=120)
    assert time.monotonic() - t0 < 60  # stopped well before 200 steps
    entry = comfyui_server.history(prompt_id)
    assert comfyui_server.execution_errors(entry), entry["status"]
    assert not comfyui_server.output_images(entry)
    assert "Processing interrupted" in comfyui_server.log_since(mark) or entry["status"]["status_str"] == "error"
