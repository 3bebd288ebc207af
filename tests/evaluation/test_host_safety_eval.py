"""Evaluation leaves its host process as it found it: generation, Inception features, face
detection and the charts do not move the host's random generators, do not leave TF32 or any other
torch flag changed, and do not choose matplotlib's backend for it."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from host_state import caller_draws, changes, seed_caller, snapshot


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory, sd15_tiny_checkpoint) -> Path:
    from facediffuser.demo.toy_faces import write_toy_faces
    from facediffuser.trainer.config import TrainConfig
    from facediffuser.trainer.training_loop import train

    d = tmp_path_factory.mktemp("lora")
    write_toy_faces(d / "data", 2, size=64)
    return train(TrainConfig(model=str(sd15_tiny_checkpoint), data=str(d / "data"), output=str(d / "face.safetensors"),
                             steps=1, rank=4, resolution=64, save_precision="fp32")).output


def _evaluate(ckpt: Path, lora: Path, weights: Path, out: Path) -> None:
    """Everything evaluation does that builds or runs a model, plus the charts."""
    from facediffuser.evaluation.fid_result import FIDResult
    from facediffuser.evaluation.generation import SamplerSettings, generate_pair
    from facediffuser.evaluation.inception import InceptionFeatures
    from facediffuser.evaluation.kid import kid
    from facediffuser.evaluation.report import fid_bar_chart, save_bar_chart
    from facediffuser.trainer.progress_plots import save_loss_curve

    pair = generate_pair(ckpt, lora, ["a face"], SamplerSettings(steps=1, size=64, sampler="euler_a", eta=1.0), 2,
                         base_dir=out / "base", finetuned_dir=out / "ft", device="cpu", progress=False)
    ext = InceptionFeatures(weights, device="cpu", progress=False)
    f = ext.features_from_files(pair.base_files + pair.finetuned_files)
    kid(f[:2].astype(np.float64), f[2:].astype(np.float64), subsets=2, subset_size=2)
    save_loss_curve([1.0, 0.5], out / "loss.png")
    fid_bar_chart([FIDResult(fid=1.0, n_a=2, n_b=2, kid_mean=0.1, kid_std=0.01, label="a")])
    save_bar_chart({"rows": [{"label": "a", "n_a": 2, "n_b": 2, "fid": 1.0, "kid_mean": 0.1, "kid_std": 0.01}]}, out / "bars.png")


def test_evaluation_leaves_generators_flags_and_backend_alone(sd15_tiny_checkpoint, tiny_lora, inception_weights, tmp_path):
    import matplotlib

    _evaluate(sd15_tiny_checkpoint, tiny_lora, inception_weights, tmp_path / "warm-up")  # first imports happen here
    saved_backend = dict.__getitem__(matplotlib.rcParams, "backend")
    matplotlib.use("svg")  # the host's choice (non-interactive, so it works headless)
    try:
        seed_caller(7)
        expected = caller_draws()
        seed_caller(7)
        before = snapshot()
        _evaluate(sd15_tiny_checkpoint, tiny_lora, inception_weights, tmp_path / "run")
        assert changes(before, snapshot()) == {}  # includes matplotlib's backend: still "svg", no pyplot
        assert caller_draws() == expected
        from PIL import Image

        assert Image.open(tmp_path / "run" / "bars.png").format == "PNG"
    finally:
        dict.__setitem__(matplotlib.rcParams, "backend", saved_backend)


def test_face_detection_leaves_the_callers_generators_alone():
    pytest.importorskip("facenet_pytorch")
    from facediffuser.faces import detection as fd

    fd.clear_detector_cache()
    try:
        seed_caller(3)
        expected = caller_draws()
        seed_caller(3)
        fd.detect_faces(np.zeros((64, 64, 3), np.uint8))  # builds MTCNN (its layers' init drew from the global RNG)
        assert caller_draws() == expected
    finally:
        fd.clear_detector_cache()


def _tf32_state():
    b = torch.backends
    return (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: legacy TF32 flags only")
def test_tf32_is_off_for_the_features_and_the_hosts_setting_comes_back():
    """Before: the legacy ``allow_tf32`` flags were read and written, and reading them raises once
    a host has used torch's fp32_precision API (torch >= 2.9). The flags can be set without a GPU."""
    from facediffuser.evaluation.inception import _fp32_exact

    b = torch.backends
    saved = _tf32_state()
    try:
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision = "tf32", "tf32"  # a host that wants speed
        with _fp32_exact("cuda"):
            assert _tf32_state() == ("ieee", "ieee")
        assert _tf32_state() == ("tf32", "tf32")
        with _fp32_exact("cpu"):  # no TF32 off CUDA: nothing is touched
            assert _tf32_state() == ("tf32", "tf32")
        with pytest.raises(RuntimeError):
            with _fp32_exact("cuda"):
                raise RuntimeError("a failing batch")
        assert _tf32_state() == ("tf32", "tf32")
    finally:
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision = saved


def test_weights_hash_cache_is_bounded(tmp_path):
    from facediffuser.evaluation import inception

    inception._file_sha256.cache_clear()
    for i in range(40):
        (tmp_path / f"w{i}").write_bytes(bytes([i]))
        inception.weights_sha256(tmp_path / f"w{i}")
    assert inception._file_sha256.cache_info().currsize == inception._file_sha256.cache_info().maxsize == 32


def test_an_extractor_is_freed_when_its_owner_drops_it(inception_weights):
    """No module-level cache holds Inception models: the owner's reference is the only one."""
    from facediffuser.evaluation.inception import InceptionFeatures

    ext = InceptionFeatures(inception_weights, device="cpu", progress=False)
    ext(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    ref = weakref.ref(ext.model)
    del ext
    gc.collect()
    assert ref() is None


def test_a_unet_only_lora_loads_without_the_text_encoder_warning(sd15_tiny_checkpoint, tiny_lora):
    """diffusers warns "No LoRA keys associated to CLIPTextModel" for any LoRA without a
    text-encoder part. Our loader drops that one message for such files, for the load only."""
    import logging

    from facediffuser.evaluation import generation as gen

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    keep = Keep()
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(keep)
    try:
        pipe = gen.load_generation_pipeline(sd15_tiny_checkpoint, device="cpu")
        pipe.load_lora_weights(str(tiny_lora), adapter_name="plain")  # diffusers as it is: the warning
        pipe.delete_adapters("plain")
        assert any(m.startswith("No LoRA keys associated to CLIPTextModel") for m in keep.messages), keep.messages
        keep.messages.clear()
        with gen.lora_loaded(pipe, tiny_lora):
            pass
        assert not any("No LoRA keys associated" in m for m in keep.messages), keep.messages
        assert not any(isinstance(f, gen._DropNoTextEncoderKeys) for n in gen._DIFFUSERS_LORA_LOGGERS
                       for f in logging.getLogger(n).filters)  # nothing left behind
    finally:
        diffusers_logger.removeHandler(keep)
