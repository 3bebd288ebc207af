"""Loading: our loader and diffusers' own single-file loader give back exactly the generated weights;
everything we do not load fails with one line that says what the file is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from facediffuser.errors import UserError
from facediffuser.sd import make_model as mm
from facediffuser.sd import model_loading as ml
from facediffuser.sd.checkpoint_layout import COMPONENTS

pytestmark = pytest.mark.filterwarnings("ignore")


def write_config_folder(arch: str, size: str, folder: Path, *, tokenizer: bool = False) -> Path:
    """A diffusers-layout folder with only the configs (what ``from_single_file(config=...)`` reads)."""
    shutil.copytree(mm.CONFIG_DIR / arch, folder, dirs_exist_ok=True)
    for comp, cfg in mm.model_configs(arch, size).items():
        name = "scheduler_config.json" if comp == "scheduler" else "config.json"
        (folder / comp / name).write_text(json.dumps(cfg))
    if tokenizer:
        from facediffuser.sd.tokenizer import load_tokenizer

        load_tokenizer(arch).save_pretrained(folder / "tokenizer")
    return folder


def diffusers_single_file(path: Path, config: Path, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """diffusers' own single-file loading, offline: config= a local folder, local_files_only=True."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from transformers import CLIPTextModel

    kw = {"config": str(config), "local_files_only": True, "torch_dtype": dtype}
    unet = UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **kw)
    vae = AutoencoderKL.from_single_file(str(path), subfolder="vae", **kw)
    # The function StableDiffusionPipeline.from_single_file uses for the text encoder.
    ckpt = load_single_file_checkpoint(str(path), local_files_only=True)
    te = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, ckpt, subfolder="text_encoder", config=str(config), torch_dtype=dtype, local_files_only=True
    )
    return {"unet": unet, "vae": vae, "text_encoder": te}


def assert_same_weights(model: torch.nn.Module, reference: dict[str, torch.Tensor], comp: str) -> None:
    """Bit-identical parameters; the reference may hold extra tensors the model does not build
    (SD2: the last OpenCLIP layer, text_projection, logit_scale)."""
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    if comp == "text_encoder":
        sd = {"text_model." + k if not k.startswith("text_model.") else k: v for k, v in sd.items()}
    assert sd, comp
    missing = [k for k in sd if k not in reference]
    assert not missing, missing[:3]
    extra = sorted(set(reference) - set(sd))
    assert all(".layers.23." in k or k in ("text_projection.weight", "logit_scale") for k in extra), extra[:3]
    for k, v in sd.items():
        assert v.dtype == reference[k].dtype and torch.equal(v, reference[k]), f"{comp}: {k} differs"


# --- tiny: both loaders, all components, numerics -----------------------------------------------------

@pytest.mark.parametrize("arch", ["sd15", "sd2"])
def test_tiny_loads_bit_identical_in_ours_and_diffusers(arch: str, request, tmp_path: Path) -> None:
    path = request.getfixturevalue(f"{arch}_tiny_checkpoint")
    ref = mm.component_tensors(arch, "tiny", seed=0, dtype="fp32")
    theirs = diffusers_single_file(path, write_config_folder(arch, "tiny", tmp_path / "cfg"), torch.float32)
    ours = ml.load_components(path)
    assert ours.family == arch and ours.prediction_type == "epsilon"
    for comp in COMPONENTS:
        assert_same_weights(theirs[comp], ref[comp], comp)
        assert_same_weights(getattr(ours, comp), ref[comp], comp)
    # Same forward: configs (heads, projections, activation) agree, not only the tensors.
    torch.manual_seed(0)
    ids = ours.tokenizer("a photo of a face", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h_ours, h_theirs = ours.text_encoder(ids)[0], theirs["text_encoder"](ids)[0]
        assert torch.equal(h_ours, h_theirs)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
        assert torch.equal(ours.unet(x, t, h_ours).sample, theirs["unet"](x, t, h_theirs).sample)
        img = torch.rand(1, 3, 64, 64) * 2 - 1
        assert torch.equal(ours.vae.encode(img).latent_dist.mean, theirs["vae"].encode(img).latent_dist.mean)


def test_tiny_pipeline_from_single_file_matches_ours(sd15_tiny_checkpoint: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    cfg = write_config_folder("sd15", "tiny", tmp_path / "cfg", tokenizer=True)
    theirs = StableDiffusionPipeline.from_single_file(
        str(sd15_tiny_checkpoint), config=str(cfg), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    ours = ml.load_pipeline(sd15_tiny_checkpoint)
    for comp in COMPONENTS:
        a, b = getattr(ours, comp).state_dict(), getattr(theirs, comp).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp
    gen = lambda pipe: pipe("a face", num_inference_steps=2, height=64, width=64, output_type="np",  # noqa: E731
                            generator=torch.Generator().manual_seed(0)).images
    assert gen(ours).shape == (1, 64, 64, 3)


def test_noise_scheduler_has_the_sd_betas(sd15_tiny_checkpoint: Path) -> None:
    c = ml.load_components(sd15_tiny_checkpoint)
    want = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert type(c.noise_scheduler).__name__ == "DDPMScheduler"
    assert torch.allclose(c.noise_scheduler.betas.double(), want, rtol=1e-6, atol=0)
    assert c.noise_scheduler.config.prediction_type == "epsilon"
    assert not any(p.requires_grad for p in c.unet.parameters())


def test_dtype_and_ckpt_with_state_dict_wrapper(sd15_tiny_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(sd15_tiny_checkpoint)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 7}, ckpt)
    c = ml.load_components(ckpt, dtype=torch.float16)
    assert c.family == "sd15" and c.unet.dtype == torch.float16
    ref = mm.component_tensors("sd15", "tiny", components=("unet",), dtype="fp16")["unet"]
    assert_same_weights(c.unet, ref, "unet")
    assert ml.detect_family(sd).family == "sd15"


def test_diffusers_folder(sd2_tiny_checkpoint: Path, tmp_path: Path) -> None:
    c = ml.load_components(sd2_tiny_checkpoint)
    folder = write_config_folder("sd2-v", "tiny", tmp_path / "model")
    for comp in COMPONENTS:
        getattr(c, comp).save_pretrained(folder / comp)
    got = ml.load_components(folder)
    assert got.family == "sd2-v" and got.prediction_type == "v_prediction"  # from its scheduler config
    assert got.model_family.prediction_source == "scheduler config"
    for comp in COMPONENTS:
        a, b = getattr(got, comp).state_dict(), getattr(c, comp).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp
    assert ml.detect_family(folder, prediction_type="epsilon").family == "sd2"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    with pytest.raises(UserError, match="is an SDXL checkpoint; FaceDiffuser supports SD 1.x/2.x"):
        ml.detect_family(folder)


# --- prediction type -------------------------------------------------------------------------------

def test_prediction_type_rules(sd2_tiny_checkpoint: Path, sd15_tiny_checkpoint: Path, tmp_path: Path) -> None:
    f = ml.detect_family(sd2_tiny_checkpoint)
    assert (f.family, f.prediction_type, f.full_size) == ("sd2", "epsilon", False)
    assert ml.detect_family(sd2_tiny_checkpoint, family="sd2-v").prediction_type == "v_prediction"
    assert ml.detect_family(sd2_tiny_checkpoint, prediction_type="v_prediction").family == "sd2-v"
    copy = tmp_path / "m.safetensors"
    shutil.copy(sd2_tiny_checkpoint, copy)
    (tmp_path / "m.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    f = ml.detect_family(copy)
    assert (f.family, f.prediction_source) == ("sd2-v", "sidecar m.yaml")
    assert ml.load_components(copy).noise_scheduler.config.prediction_type == "v_prediction"
    assert ml.detect_family(copy, prediction_type="epsilon").family == "sd2"  # the flag beats the yaml
    v = mm.make_checkpoint(tmp_path / "v.safetensors", arch="sd2-v", size="tiny", dtype="fp32")
    assert ml.detect_family(v).family == "sd2-v"
    with pytest.raises(UserError, match="SD 1.x by its tensors"):
        ml.detect_family(sd15_tiny_checkpoint, family="sd2")


# --- what we refuse, in one line ----------------------------------------------------------------

def _save(tmp_path: Path, name: str, sd: dict) -> Path:
    from safetensors.torch import save_file

    p = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    return p


def _tiny_sd() -> dict[str, torch.Tensor]:
    return mm.build_state_dict("sd15", "tiny", seed=0, dtype="fp32")


def _only(sd: dict, prefix: str, strip: bool = False) -> dict:
    return {(k[len(prefix):] if strip else k): v for k, v in sd.items() if k.startswith(prefix)}


@pytest.mark.parametrize(
    "case, message",
    [
        ("sdxl", "is an SDXL checkpoint; FaceDiffuser supports SD 1.x/2.x"),
        ("sd3", "is a Stable Diffusion 3 checkpoint; FaceDiffuser supports SD 1.x/2.x"),
        ("flux", "is a Flux checkpoint; FaceDiffuser supports SD 1.x/2.x"),
        ("lora", "is a LoRA, not a checkpoint: put it in loras/ and pass it as --lora/--init-lora"),
        ("peft_lora", "is a LoRA, not a checkpoint"),
        ("vae", "is a VAE-only file"),
        ("vae_ldm", "is a VAE-only file"),
        ("unet_only", "has no VAE"),
        ("no_te", "has no text encoder"),
        ("empty", "contains no tensors"),
        ("unknown", "is not a Stable Diffusion checkpoint"),
        ("inpaint", "is an inpainting/instruct-pix2pix checkpoint"),
    ],
)
def test_refused_state_dicts(case: str, message: str, tmp_path: Path) -> None:
    z = lambda *s: torch.zeros(*s)  # noqa: E731
    sd = _tiny_sd()
    dicts = {
        "sdxl": {"model.diffusion_model.input_blocks.0.0.weight": z(320, 4, 3, 3), "model.diffusion_model.label_emb.0.0.weight": z(1280, 2816),
                 "conditioner.embedders.1.model.positional_embedding": z(77, 1280)},
        "sd3": {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": z(9216)},
        "flux": {"double_blocks.0.img_attn.norm.key_norm.scale": z(128)},
        "lora": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": z(4, 32), "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": z(())},
        "peft_lora": {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": z(4, 32)},
        "vae": _only(sd, "first_stage_model.", strip=True),
        "vae_ldm": _only(sd, "first_stage_model."),
        "unet_only": _only(sd, "model.diffusion_model."),
        "no_te": {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")},
        "empty": {},
        "unknown": {"foo.weight": z(3)},
        "inpaint": {**sd, "model.diffusion_model.input_blocks.0.0.weight": z(32, 9, 3, 3)},
    }
    with pytest.raises(UserError, match=message) as err:
        ml.detect_family(dicts[case])
    assert "\n" not in str(err.value)
    if dicts[case]:  # the same through a file, with the file named in the message
        p = _save(tmp_path, f"{case}.safetensors", dicts[case])
        with pytest.raises(UserError, match=message) as err:
            ml.load_components(p)
        assert str(p) in str(err.value)


def test_refused_files(sd15_tiny_checkpoint: Path, tmp_path: Path) -> None:
    text = tmp_path / "readme.safetensors"
    text.write_text("This is not a model, just a text file renamed.\n" * 3)
    with pytest.raises(UserError, match="not a valid safetensors file"):
        ml.load_components(text)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        ml.detect_family(short)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(sd15_tiny_checkpoint.read_bytes()[:-1000])
    with pytest.raises(UserError, match="safetensors file is truncated"):
        ml.load_components(cut)
    with pytest.raises(UserError, match="model not found"):
        ml.load_components(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="no model_index.json"):
        ml.load_components(tmp_path)
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(UserError, match="unsupported model file type"):
        ml.detect_family(odd)


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.ckpt"
    with p.open("wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(UserError, match="refused to unpickle it safely"):
        ml.load_components(p)


# --- full size (the 2.1 GB SD1.5-shaped file) ---------------------------------------------------------

@pytest.mark.full_model
@pytest.mark.parametrize("arch", ["sd15", "sd2"])
def test_full_bit_identical_in_diffusers_and_ours(arch: str, request) -> None:
    path = request.getfixturevalue(f"{arch}_full_checkpoint")
    f = ml.detect_family(path)
    assert (f.family, f.full_size) == (arch, True)
    theirs = diffusers_single_file(path, mm.CONFIG_DIR / arch, torch.float16)
    for comp in COMPONENTS:  # one component's reference at a time: peak memory stays ~5 GB
        ref = mm.component_tensors(arch, "full", seed=0, dtype="fp16", components=(comp,))[comp]
        assert_same_weights(theirs.pop(comp), ref, comp)
    ours = ml.load_components(path, dtype=torch.float16)
    theirs = diffusers_single_file(path, mm.CONFIG_DIR / arch, torch.float16)
    for comp in COMPONENTS:
        a, b = getattr(ours, comp).state_dict(), theirs[comp].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), comp
        if comp == "text_encoder":
            fields = ("hidden_act", "hidden_size", "num_attention_heads", "num_hidden_layers", "eos_token_id", "projection_dim")
            assert {f: getattr(ours.text_encoder.config, f) for f in fields} == {f: getattr(theirs[comp].config, f) for f in fields}
        else:
            strip = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
            assert strip(getattr(ours, comp).config) == strip(theirs[comp].config), comp
