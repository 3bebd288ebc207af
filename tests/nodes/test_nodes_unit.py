"""The node pack without a ComfyUI server: import cost, node declarations, path rules, and the pure
glue the nodes call (config building, re-run check, family warning, scoring, chart)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from facediffuser.errors import UserError
from facediffuser.nodes import paths

REPO_ROOT = Path(__file__).resolve().parents[2]


# --- importing ------------------------------------------------------------------------------------

def test_pack_imports_without_comfyui_or_torch() -> None:
    code = (
        "import sys, facediffuser\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'comfy', 'folder_paths', 'diffusers', 'numpy'))\n"
        "print(len(facediffuser.NODE_CLASS_MAPPINGS), heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "6 []", out


@pytest.fixture
def fake_folder_paths(tmp_path, monkeypatch):
    """A minimal ``folder_paths`` with ComfyUI's layout under tmp_path, for node declarations; what
    the pack's folder registration does in ComfyUI's real module is in test_comfyui_folders.py."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(tmp_path / "models")
    fp.folder_names_and_paths = {
        "checkpoints": ([str(tmp_path / "models" / "checkpoints")], {".safetensors"}),
        "loras": ([str(tmp_path / "models" / "loras")], {".safetensors"}),
    }
    fp.filename_list_cache = {}

    def get_folder_paths(name):
        return fp.folder_names_and_paths[name][0][:]

    def get_filename_list(name):
        dirs, exts = fp.folder_names_and_paths[name]
        out = []
        for d in dirs:
            for root, _, files in os.walk(d):
                for f in files:
                    if not exts or os.path.splitext(f)[1] in exts:
                        out.append(os.path.relpath(os.path.join(root, f), d))
        return sorted(out)

    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_input_directory = lambda: str(tmp_path / "input")
    fp.get_output_directory = lambda: str(tmp_path / "output")
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    return fp


def test_node_declarations(fake_folder_paths) -> None:
    from facediffuser import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    assert set(NODE_CLASS_MAPPINGS) == {"FaceDiffuserLoraLoader", "FaceDiffuserTrainLora", "FaceDiffuserTrainOptions",
                                        "FaceDiffuserFIDReference", "FaceDiffuserFID", "FaceDiffuserFIDCompare"}
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("FaceDiffuser")
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"} and spec["required"], node_id
        for section in ("required", "optional"):
            for name, decl in spec.get(section, {}).items():
                assert isinstance(decl, tuple) and 1 <= len(decl) <= 2, (node_id, name)
                assert len(decl) == 2 and decl[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
                if decl[0] in ("INT", "FLOAT"):
                    opts = decl[1]
                    assert opts["min"] <= opts["default"] <= opts["max"], (node_id, name)
        assert callable(getattr(cls, cls.FUNCTION)), node_id
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS), node_id
        assert cls.CATEGORY.startswith("FaceDiffuser") and cls.DESCRIPTION


# --- path rules -----------------------------------------------------------------------------------

@pytest.fixture
def input_dir(tmp_path) -> Path:
    d = tmp_path / "input"
    (d / "faces" / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (d / "escape").symlink_to(tmp_path / "outside", target_is_directory=True)
    (d / "file.png").write_bytes(b"x")
    return d


@pytest.mark.parametrize("value", ["../../etc/passwd", "../outside", "faces/../../outside", "/etc", "escape", "/"])
def test_folder_inputs_cannot_escape(input_dir, value) -> None:
    with pytest.raises(UserError, match="outside the allowed folders") as err:
        paths.resolve_user_folder(value, input_dir=input_dir, what="dataset folder")
    assert "\n" not in str(err.value) and paths.DATASET_ROOTS_ENV in str(err.value)


def test_folder_inputs_allowed(input_dir, tmp_path) -> None:
    assert paths.resolve_user_folder("faces", input_dir=input_dir) == (input_dir / "faces").resolve()
    assert paths.resolve_user_folder(str(input_dir / "faces" / "sub"), input_dir=input_dir) == (input_dir / "faces" / "sub").resolve()
    # an absolute path under an extra root (from $FACEDIFFUSER_DATASET_ROOTS)
    roots = paths.env_roots({paths.DATASET_ROOTS_ENV: f"{tmp_path / 'outside'}{os.pathsep}"})
    assert roots == [tmp_path / "outside"]
    assert paths.resolve_user_folder(str(tmp_path / "outside"), input_dir=input_dir, extra_roots=roots) == (tmp_path / "outside").resolve()
    assert paths.resolve_user_folder("escape", input_dir=input_dir, extra_roots=roots) == (tmp_path / "outside").resolve()
    with pytest.raises(UserError, match="not found"):
        paths.resolve_user_folder("nope", input_dir=input_dir)
    with pytest.raises(UserError, match="not a folder"):
        paths.resolve_user_folder("file.png", input_dir=input_dir)
    with pytest.raises(UserError, match="no folder given"):
        paths.resolve_user_folder("  ", input_dir=input_dir)


@pytest.mark.parametrize("name", ["../x", "/abs/x", "a/../../b", ".hidden", "a//b", "C:/x", "x/..", ""])
def test_written_names_are_plain(name) -> None:
    with pytest.raises(UserError):
        paths.lora_file_name(name)


def test_written_names(tmp_path) -> None:
    assert paths.lora_file_name("face_lora") == "face_lora.safetensors"
    assert paths.lora_file_name("people/anna v2.safetensors") == "people/anna v2.safetensors"
    assert paths.bank_file_name("base") == "base.npz"
    with pytest.raises(UserError):
        paths.bank_file_name("a/b")
    assert paths.safe_join(tmp_path, "a/b.npz") == (tmp_path / "a" / "b.npz").resolve()
    # names read from the loras list may use any characters, but never leave the folder
    assert paths.check_relative_name("my [face] lora.safetensors", strict=False)
    with pytest.raises(UserError):
        paths.check_relative_name("../secret.safetensors", strict=False)


def test_lora_loader_validate_inputs() -> None:
    from facediffuser.nodes.lora_nodes import FaceDiffuserLoraLoader

    assert FaceDiffuserLoraLoader.VALIDATE_INPUTS("not_yet_trained.safetensors") is True
    msg = FaceDiffuserLoraLoader.VALIDATE_INPUTS("../../etc/passwd")
    assert isinstance(msg, str) and ".." in msg


# --- LoRA metadata --------------------------------------------------------------------------------

def test_family_warning() -> None:
    from facediffuser.nodes.lora_nodes import comfy_model_family, describe_lora, family_warning

    sd1 = {"ss_base_model_version": "sd_v1", "ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_steps": "100",
           "modelspec.trigger_phrase": "sks", "ss_sd_model_name": "base.safetensors"}
    assert comfy_model_family("SD15", 768) == "sd1"
    assert comfy_model_family("SDXL", 2048) == "sdxl"
    assert comfy_model_family("Whatever", 1024) == "sd2"
    assert family_warning(sd1, "sd1", False) is None
    w = family_warning(sd1, "sdxl", False)
    assert w and "SD 1.x" in w and "SDXL" in w
    assert family_warning({"ss_base_model_version": "sd_v2_v"}, "sd2", False)  # v-pred LoRA on an eps model
    assert family_warning({}, "sdxl", False) is None  # nothing recorded: no claim
    text = "\n".join(describe_lora("face.safetensors", sd1))
    for part in ("SD 1.x", "rank 8, alpha 4.0", "trigger word: sks", "steps: 100"):
        assert part in text


# --- training config ----------------------------------------------------------------------------------

NODE_VALUES = dict(steps=7, rank=4, alpha=2.0, lr=3e-4, resolution=64, batch_size=2, train_text_encoder=True,
                   seed=5, caption_template="a photo of sks", trigger="sks")


def _node_config(tmp_path, work_dir=None, **over):
    from facediffuser.nodes.train_nodes import build_train_config

    return build_train_config(model=str(tmp_path / "m.safetensors"), data=str(tmp_path / "faces"),
                              output=str(tmp_path / "loras" / "f.safetensors"), values={**NODE_VALUES, **over},
                              work_dir=work_dir)


def test_every_setting_is_one_node_input_generated_from_its_spec(fake_folder_paths) -> None:
    from facediffuser.nodes.train_nodes import (AUTO, NODE_OWNED, NONE_CHOICE, OPTIONS_TYPE, FaceDiffuserTrainLora,
                                                FaceDiffuserTrainOptions)
    from facediffuser.trainer.config import TrainConfig, setting_specs

    train = FaceDiffuserTrainLora.INPUT_TYPES()
    options = FaceDiffuserTrainOptions.INPUT_TYPES()["required"]
    own = {"ckpt_name", "dataset", "output_name"}
    train_settings = [k for k in train["required"] if k not in own]
    assert train["optional"]["options"][0] == OPTIONS_TYPE == FaceDiffuserTrainOptions.RETURN_TYPES[0]
    names = [s.name for s in setting_specs()]
    assert sorted(train_settings + list(options) + list(NODE_OWNED)) == sorted(names)  # each exactly once
    assert names == [f.name for f in __import__("dataclasses").fields(TrainConfig)]
    for spec in setting_specs():
        if spec.name in NODE_OWNED:
            continue
        decl = (train["required"] if spec.name in train_settings else options)[spec.name]
        typ, opts = decl
        assert spec.tooltip in opts["tooltip"], spec.name
        if spec.name == "mixed_precision":
            assert typ == [AUTO, "no", "fp16", "bf16"] and opts["default"] == AUTO
        elif spec.name == "init_lora":
            assert typ[0] == NONE_CHOICE and opts["default"] == NONE_CHOICE
        elif spec.kind == "choice":
            assert typ == list(spec.choices) and opts["default"] == spec.default
        elif spec.kind == "bool":
            assert typ == "BOOLEAN" and opts["default"] is spec.default
        elif spec.kind in ("int", "float"):
            assert typ == spec.kind.upper(), spec.name
            assert opts["default"] == (0 if spec.default is None else spec.default), spec.name
            assert opts["min"] == (0 if spec.optional else spec.minimum), spec.name
            assert opts["max"] == (spec.maximum if spec.maximum is not None else 1e6), spec.name  # lr: unbounded
            assert opts["step"] == spec.step
            assert ("0 = not set" in opts["tooltip"]) == spec.optional, spec.name
        else:
            assert typ == "STRING" and opts["default"] == (spec.default or ""), spec.name
    assert [s.name for s in setting_specs() if s.group == "basic"] == train_settings  # the common ones are widgets


def test_options_node_has_the_issue_13_settings_and_resolves_validation_data(fake_folder_paths, tmp_path) -> None:
    """Validation, DoRA, Prodigy and bucket settings are options-node widgets; the held-out folder is
    found like the dataset (under ComfyUI's input folder), never anywhere on disk."""
    from facediffuser.nodes.train_nodes import FaceDiffuserTrainOptions, _resolve_paths

    options = FaceDiffuserTrainOptions.INPUT_TYPES()["required"]
    for name in ("validation_split", "validation_data", "validation_every", "keep_best_validation", "dora",
                 "prodigy_d_coef", "prodigy_safeguard_warmup", "prodigy_use_bias_correction", "buckets",
                 "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale"):
        assert name in options, name
    assert "prodigy" in options["optimizer"][0] and options["buckets"][1]["default"] is True
    (tmp_path / "input" / "held_out").mkdir(parents=True)
    assert _resolve_paths({"validation_data": "held_out"})["validation_data"] == str((tmp_path / "input" / "held_out").resolve())
    assert _resolve_paths({"validation_data": ""})["validation_data"] == ""
    with pytest.raises(UserError, match=r"validation_data '/etc' is outside the allowed folders"):
        _resolve_paths({"validation_data": "/etc"})


def test_node_builds_the_cli_config(tmp_path) -> None:
    import argparse

    from facediffuser.trainer.config import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    common = ["--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "faces"),
              "--output", str(tmp_path / "loras" / "f.safetensors"), "--steps", "7", "--rank", "4", "--alpha", "2",
              "--lr", "3e-4", "--resolution", "64", "--batch-size", "2", "--train-text-encoder", "--seed", "5",
              "--caption-template", "a photo of sks", "--trigger", "sks"]
    assert _node_config(tmp_path) == config_from_args(parser.parse_args(common))
    # options-node values, as its widgets send them (0 / "" = unset, auto precision on this CPU = no)
    opts = dict(min_snr_gamma=5.0, ema=0.999, text_encoder_lr=5e-5, flip=True, face_loss_weight=2.0, lr_scheduler="cosine",
                conv_rank=4, conv_alpha=0.0, gradient_checkpointing=True, mixed_precision="auto", epochs=0,
                init_lora="(none)", sample_prompts="", logging_dir="")
    cli = config_from_args(parser.parse_args(common + [
        "--min-snr-gamma", "5", "--ema", "0.999", "--text-encoder-lr", "5e-5", "--flip", "--face-loss-weight", "2",
        "--lr-scheduler", "cosine", "--conv-rank", "4", "--gradient-checkpointing", "--mixed-precision", "no"]))
    node = _node_config(tmp_path, **opts)
    assert node == cli and node.conv_alpha is None and node.epochs is None and node.init_lora is None
    assert _node_config(tmp_path, alpha=0.0).alpha is None  # 0 = alpha equals rank, the CLI default
    assert _node_config(tmp_path, trigger="  ").trigger is None
    # work_dir moves caches/state out of the loras folder, keyed by the settings a resume must keep
    a = _node_config(tmp_path, work_dir=str(tmp_path / "work"))
    b = _node_config(tmp_path, work_dir=str(tmp_path / "work"), seed=6)
    c = _node_config(tmp_path, work_dir=str(tmp_path / "work"), steps=70)  # steps may change on resume
    assert Path(a.cache_dir) == tmp_path / "work" / "cache"
    assert Path(a.state_dir).parent == tmp_path / "work" / "state" and a.state_dir != b.state_dir
    assert a.state_dir == c.state_dir
    with pytest.raises(UserError, match=r"--resolution must be a multiple of 8 \(got 100\)"):
        _node_config(tmp_path, resolution=100)
    with pytest.raises(UserError, match=r"--resolution must be between 64 and 4096 \(got 60\)"):
        _node_config(tmp_path, resolution=60)
    with pytest.raises(UserError, match=r"Train Face LoRA: unknown setting\(s\) learning_rate"):
        _node_config(tmp_path, learning_rate=1e-4)
    with pytest.raises(UserError, match="Train Face LoRA: output cannot be set as options"):
        _node_config(tmp_path, output="x.safetensors")


def _reuse_setup(tmp_path):
    from facediffuser.trainer.kohya_format import build_metadata, train_data_digest

    cfg = _node_config(tmp_path)
    imgs = []
    for i in range(2):
        p = tmp_path / f"{i}.png"
        p.write_bytes(bytes([i]) * 10)
        imgs.append(p)
    digest = train_data_digest(["a" * 64, "b" * 64], ["sks, one", "sks, two"], ["", ""])
    meta = build_metadata(cfg, image_files=imgs, captions=["a", "b"], steps_done=cfg.steps, max_train_steps=cfg.steps,
                          epoch=1, num_epochs=1, started_at=0.0, base_model_sha256="c" * 64, train_data_digest=digest)
    return cfg, meta, digest


def test_existing_lora_reuse_check(tmp_path) -> None:
    from facediffuser.nodes.train_nodes import existing_lora_matches
    from facediffuser.trainer.kohya_format import train_data_digest

    cfg, meta, digest = _reuse_setup(tmp_path)
    same = dict(train_data_digest=digest, base_model_sha256="c" * 64)
    assert existing_lora_matches(meta, cfg, **same) == (True, "same settings, base checkpoint and data")
    assert existing_lora_matches(meta, _node_config(tmp_path, seed=6), **same) == (False, "ss_seed is '5', wanted '6'")
    assert not existing_lora_matches(meta, _node_config(tmp_path, steps=8), **same)[0]
    assert not existing_lora_matches(meta, _node_config(tmp_path, train_text_encoder=False), **same)[0]
    # options-node settings are part of the identity too; the paths ComfyUI owns and resumable knobs are not
    assert existing_lora_matches(meta, _node_config(tmp_path, no_cache=True), **same)[1] == "ss_cache_latents is 'True', wanted 'False'"
    assert existing_lora_matches(meta, _node_config(tmp_path, ema=0.99), **same)[1] == "facediffuser_ema is 'None', wanted '0.99'"
    assert existing_lora_matches(meta, _node_config(tmp_path, dataloader_workers=2, gradient_checkpointing=True), **same)[0]
    # so are the issue-13 settings (validation_every only says when the curve is sampled)
    assert existing_lora_matches(meta, _node_config(tmp_path, dora=True), **same)[1] == \
        """ss_network_args is None, wanted '{"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}'"""
    assert existing_lora_matches(meta, _node_config(tmp_path, buckets=False), **same)[1] == \
        "ss_enable_bucket is 'True', wanted 'False'"
    assert existing_lora_matches(meta, _node_config(tmp_path, validation_split=0.2), **same)[1] == \
        "ss_validation_split is '0.0', wanted '0.2'"
    assert existing_lora_matches(meta, _node_config(tmp_path, validation_every=7), **same)[0]
    # a different base checkpoint (same file name) or different data
    assert existing_lora_matches(meta, cfg, train_data_digest=digest, base_model_sha256="d" * 64) == \
        (False, "the base checkpoint differs (ss_new_sd_model_hash)")
    edited = train_data_digest(["a" * 64, "b" * 64], ["sks, one", "sks, 2"], ["", ""])  # one caption edited
    assert existing_lora_matches(meta, cfg, train_data_digest=edited, base_model_sha256="c" * 64) == \
        (False, "the dataset differs (images, captions or face masks)")
    assert not existing_lora_matches({}, cfg, **same)[0]


def test_a_lora_trained_with_a_validation_split_is_reused(sd15_tiny_checkpoint, tmp_path) -> None:
    """The node's data digest leaves out the held-out images, as the file's does: same settings, reused."""
    import shutil

    from facediffuser.nodes.train_nodes import dataset_digest, existing_lora_matches
    from facediffuser.trainer.kohya_format import read_lora_metadata
    from PIL import Image

    from facediffuser.trainer.config import TrainConfig
    from facediffuser.trainer.training_loop import train

    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        Image.new("RGB", (64, 64), (40 * i, 200 - 30 * i, 90)).save(data / f"{i}.png")
    ckpt = Path(shutil.copy2(sd15_tiny_checkpoint, tmp_path / "tiny.safetensors"))

    def config(seed: int) -> TrainConfig:
        return TrainConfig(model=str(ckpt), data=str(data), output=str(tmp_path / "out" / "face.safetensors"), steps=1,
                           resolution=64, rank=4, seed=seed, validation_split=0.4, validation_every=1)

    cfg = config(7)
    meta = read_lora_metadata(train(cfg).output)
    assert meta["ss_num_validation_images"] == "2"
    assert existing_lora_matches(meta, cfg, train_data_digest=dataset_digest(cfg), base_model_sha256=None)[0]
    other = config(8)
    assert existing_lora_matches(meta, other, train_data_digest=dataset_digest(other), base_model_sha256=None)[1] == \
        f"ss_seed is '{cfg.seed}', wanted '{cfg.seed + 1}'"


def test_base_model_hashes_are_sd_scripts_and_cached(tmp_path) -> None:
    import hashlib
    import json

    from facediffuser.trainer.kohya_format import MODEL_HASH_CACHE, base_model_hashes

    ckpt = tmp_path / "m.safetensors"
    blob = bytes(range(256)) * (5 << 12)  # 5 MiB
    ckpt.write_bytes(blob)
    # sd-scripts train_util.model_hash / calculate_sha256 (A1111's old and new hash)
    expect = (hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8], hashlib.sha256(blob).hexdigest())
    assert base_model_hashes(ckpt, cache_dir=tmp_path / "cache") == expect
    cached = json.loads((tmp_path / "cache" / MODEL_HASH_CACHE).read_text())
    assert cached[str(ckpt.resolve())]["sha256"] == expect[1]
    # the cache is used while the file is unchanged ...
    cached[str(ckpt.resolve())]["sha256"] = "f" * 64
    (tmp_path / "cache" / MODEL_HASH_CACHE).write_text(json.dumps(cached))
    assert base_model_hashes(ckpt, cache_dir=tmp_path / "cache")[1] == "f" * 64
    # ... and not once it is rewritten, even with the same size and mtime
    st = ckpt.stat()
    time.sleep(0.05)
    ckpt.write_bytes(blob[::-1])
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert base_model_hashes(ckpt, cache_dir=tmp_path / "cache")[1] == hashlib.sha256(blob[::-1]).hexdigest()
    assert base_model_hashes(tmp_path, cache_dir=None) is None  # a diffusers folder: no hash, as in sd-scripts


def _dataset(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of sks, view {i}")
    return folder


def test_training_fingerprint_follows_dataset_and_checkpoint(tmp_path) -> None:
    from PIL import Image

    from facediffuser.nodes.train_nodes import training_fingerprint

    data = _dataset(tmp_path / "faces")
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"model one")
    inputs = {"ckpt_name": "m.safetensors", "dataset": "faces", "output_name": "f", **NODE_VALUES}

    def fp() -> str:
        return training_fingerprint(inputs, checkpoint=ckpt, dataset=data, output=tmp_path / "f.safetensors")

    seen = [fp()]
    assert fp() == seen[0]  # nothing changed, nothing to do
    time.sleep(0.05)
    cap = data / "1.txt"  # a caption edited to the same length, its mtime put back
    st = cap.stat()
    cap.write_text(cap.read_text().replace("view", "side"))
    os.utime(cap, ns=(st.st_atime_ns, st.st_mtime_ns))
    seen.append(fp())
    time.sleep(0.05)
    (data / "sub").mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "sub" / "2.png")  # an image added in a subfolder
    seen.append(fp())
    time.sleep(0.05)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(data / "0.png")  # an image replaced
    seen.append(fp())
    time.sleep(0.05)
    ckpt.write_bytes(b"model two")  # the checkpoint swapped under the same name
    seen.append(fp())
    (tmp_path / "f.safetensors").write_bytes(b"x")  # the output appeared
    seen.append(fp())
    assert len(set(seen)) == len(seen), seen
    assert fp() == seen[-1]
    (data / ".hidden.png").write_bytes(b"ignored")  # hidden files are not training data
    assert fp() == seen[-1]


def test_is_changed_in_comfyui_folders(comfyui_dir, tmp_path, monkeypatch) -> None:
    """IS_CHANGED with ComfyUI's real folder_paths module (no server): a dataset edit or a swapped
    checkpoint changes it, nothing else does."""
    import importlib.util

    # Today's folder_paths imports comfy.cli_args (the 2024 one imports nothing of ComfyUI's): the
    # checkout goes on sys.path, and the comfy modules it pulls in are dropped again afterwards.
    monkeypatch.syspath_prepend(str(comfyui_dir))
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("folder_paths", comfyui_dir / "folder_paths.py")
    fp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fp)
    for name in set(sys.modules) - before:  # set while absent, so teardown removes them
        monkeypatch.setitem(sys.modules, name, sys.modules.pop(name))
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    for name in ("checkpoints", "loras"):
        (tmp_path / name).mkdir()
        fp.folder_names_and_paths[name] = ([str(tmp_path / name)], fp.folder_names_and_paths[name][1])
    fp.set_input_directory(str(tmp_path / "input"))
    fp.set_output_directory(str(tmp_path / "output"))
    data = _dataset(tmp_path / "input" / "faces")
    (tmp_path / "checkpoints" / "m.safetensors").write_bytes(b"model one")
    from facediffuser.nodes.train_nodes import FaceDiffuserTrainLora

    inputs = {"ckpt_name": "m.safetensors", "dataset": "faces", "output_name": "f", **NODE_VALUES}
    first = FaceDiffuserTrainLora.IS_CHANGED(**inputs)
    assert FaceDiffuserTrainLora.IS_CHANGED(**inputs) == first
    time.sleep(0.05)
    (data / "0.txt").write_text("a photo of sks, edited")
    second = FaceDiffuserTrainLora.IS_CHANGED(**inputs)
    assert second != first and FaceDiffuserTrainLora.IS_CHANGED(**inputs) == second
    time.sleep(0.05)
    (tmp_path / "checkpoints" / "m.safetensors").write_bytes(b"model two")
    third = FaceDiffuserTrainLora.IS_CHANGED(**inputs)
    assert third not in (first, second)
    assert FaceDiffuserTrainLora.IS_CHANGED(**{**inputs, "dataset": "../../etc"}) != third  # refused path: no crash


# --- scoring glue -------------------------------------------------------------------------------------

class _FakeExtractor:
    """Deterministic 'features' from pixels: enough to test the bank/score plumbing without Inception."""

    def __call__(self, images):
        import torch

        from facediffuser.evaluation.images import to_uint8_nchw

        x = to_uint8_nchw(images).to(torch.float32)
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), x[:, :, :4, :4].reshape(len(x), -1)], 1)

    def protocol(self, n=None):
        p = {"extractor": "fake", "weights_sha256": "0" * 64, "resize": "tf1"}
        return p | ({"n": n} if n is not None else {})


def test_accumulate_equals_one_evaluation(tmp_path) -> None:
    import torch

    from facediffuser.evaluation.stats import FeatureStats, compare
    from facediffuser.nodes.fid_nodes import score_images

    gen = torch.Generator().manual_seed(0)
    ext = _FakeExtractor()
    real = torch.rand((12, 16, 16, 3), generator=gen)
    ref = {"stats": FeatureStats.from_features(ext(real), protocol=ext.protocol(12), source="real")}
    batches = [torch.rand((3, 16, 16, 3), generator=gen) for _ in range(3)]
    bank = tmp_path / "banks" / "base.npz"
    res = None
    for i, b in enumerate(batches):
        res, added = score_images(b, ref, ext, mode="accumulate", bank_path=bank, reset=i == 0, kid_subset_size=4, kid_subsets=10)
        assert added == 3 and res.n_a == 3 * (i + 1) and res.n_b == 12
    whole = torch.cat(batches)
    expected = compare(FeatureStats.from_features(ext(whole), protocol=ext.protocol(9)), ref["stats"], kid_subset_size=4, kid_subsets=10)
    assert res.fid == pytest.approx(expected.fid, rel=1e-12)
    assert res.kid_mean == pytest.approx(expected.kid_mean, rel=1e-12)
    single, added = score_images(whole, ref, ext, mode="single", kid_subset_size=4, kid_subsets=10)
    assert single.fid == pytest.approx(expected.fid, rel=1e-12) and added is None
    # the same batch again adds nothing; reset starts over
    again, added = score_images(batches[0], ref, ext, mode="accumulate", bank_path=bank)
    assert added == 0 and again.n_a == 9
    assert score_images(batches[1], ref, ext, mode="accumulate", bank_path=bank, reset=True)[0].n_a == 3
    with pytest.raises(UserError, match="at least 2"):
        score_images(batches[0][:1], ref, ext, mode="single")


def test_missing_inception_weights_names_file_and_folder(tmp_path, monkeypatch) -> None:
    from facediffuser.nodes.fid_nodes import find_weights

    monkeypatch.delenv("FACEDIFFUSER_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    import torch.hub

    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    folder = tmp_path / "models" / "inception"
    with pytest.raises(UserError) as err:
        find_weights([folder])
    assert "weights-inception-2015-12-05-6726825d.pth" in str(err.value) and str(folder) in str(err.value)
    folder.mkdir(parents=True)
    (folder / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"x")
    assert find_weights([tmp_path / "empty", folder]) == folder / "pt_inception-2015-12-05-6726825d.pth"


def test_compare_node_draws_the_one_chart_from_fid_results() -> None:
    """FIDCompare takes the FID node's FIDResults and draws report.fid_bar_chart, the table's chart."""
    from facediffuser.evaluation.fid_result import FIDResult
    from facediffuser.evaluation.report import fid_bar_chart
    from facediffuser.nodes.fid_nodes import FaceDiffuserFIDCompare

    base = FIDResult(fid=120.5, n_a=8, n_b=100, kid_mean=0.05, kid_std=0.01, kid_subsets=10, kid_subset_size=8, label="base")
    lora = FIDResult(fid=80.25, n_a=8, n_b=100, label="lora")  # the reference had no features: no KID
    img = fid_bar_chart([base, lora], width=640, height=320)
    assert img.shape == (320, 640, 3) and img.dtype == np.uint8
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 10  # something was drawn
    out = FaceDiffuserFIDCompare().compare(base, lora)
    chart, text = out["result"]
    assert tuple(chart.shape) == (1, 400, 800, 3) and np.array_equal((chart[0].numpy() * 255).round().astype(np.uint8), fid_bar_chart([base, lora]))
    assert text.splitlines() == ["base: FID 120.5000, KID 0.050000 ± 0.010000, N = 8 / 100", "lora: FID 80.2500, KID n/a, N = 8 / 100"]
    assert "different N" in FaceDiffuserFIDCompare().compare(base, FIDResult(fid=1.0, n_a=16, n_b=100, label="x"))["result"][1]
    with pytest.raises(UserError):
        fid_bar_chart([])


def test_kid_defaults_and_resize_modes_have_one_definition(fake_folder_paths) -> None:
    """The node, the CLI and the table take KID defaults and resize names from evaluation/."""
    from facediffuser.cli import build_parser
    from facediffuser.evaluation.inception import DEFAULT_RESIZE, RESIZE_MODES
    from facediffuser.evaluation.kid import DEFAULT_SEED, DEFAULT_SUBSET_SIZE, DEFAULT_SUBSETS
    from facediffuser.evaluation.table import TableConfig
    from facediffuser.nodes.fid_nodes import FaceDiffuserFID, FaceDiffuserFIDReference

    req = FaceDiffuserFID.INPUT_TYPES()["required"]
    assert (req["kid_subsets"][1]["default"], req["kid_subset_size"][1]["default"]) == (DEFAULT_SUBSETS, DEFAULT_SUBSET_SIZE)
    resize = FaceDiffuserFIDReference.INPUT_TYPES()["required"]["resize"]
    assert resize[0] == list(RESIZE_MODES) and resize[1]["default"] == DEFAULT_RESIZE
    fid = build_parser().parse_args(["eval", "fid", "a", "b"])
    assert (fid.kid_subsets, fid.kid_subset_size, fid.seed, fid.resize) == (DEFAULT_SUBSETS, DEFAULT_SUBSET_SIZE, DEFAULT_SEED, DEFAULT_RESIZE)
    table = build_parser().parse_args(["eval", "table", "--model", "m", "--lora", "l", "--real", "r", "--out", "o"])
    cfg = TableConfig(model="m", lora="l", real="r", out="o")
    assert (table.kid_subsets, table.kid_subset_size) == (cfg.kid_subsets, cfg.kid_subset_size) == (DEFAULT_SUBSETS, DEFAULT_SUBSET_SIZE)
    assert cfg.kid_seed == DEFAULT_SEED and table.resize == DEFAULT_RESIZE
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "fid", "a", "b", "--resize", "bicubic"])


def test_fid_inception_lives_under_comfyuis_model_management(comfyui_dir, inception_weights) -> None:
    """The FID nodes' Inception is one of ComfyUI's loaded models: it stays loaded from one prompt
    to the next, "unload models" frees it (no module-level cache keeps it), the next run loads it
    again with the same features. Real ComfyUI model management, in a subprocess."""
    import json

    probe = Path(__file__).with_name("fid_slot_probe.py")
    r = subprocess.run([sys.executable, str(probe), str(comfyui_dir), str(inception_weights)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    loaded = {"alive": 1, "loaded": ["FIDInceptionV3"]}
    assert seen == {"loaded": loaded, "after_prompt": loaded, "reused": True,
                    "unloaded": {"alive": 0, "loaded": []}, "reloaded_equal": True, "reloaded": loaded}, seen
