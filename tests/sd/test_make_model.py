"""make-model: reproducible bytes, the real architecture sizes, the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from facediffuser.cli import main as cli_main
from facediffuser.errors import UserError
from facediffuser.sd import make_model as mm
from facediffuser.sd.checkpoint_layout import SD1_TE_PREFIX, SD2_TE_PREFIX, UNET_PREFIX, VAE_PREFIX

pytestmark = pytest.mark.filterwarnings("ignore")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _header(p: Path) -> tuple[dict, dict]:
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    h = json.loads(raw[8:8 + n])
    return h.pop("__metadata__"), h


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = mm.make_checkpoint(tmp_path / "a.safetensors", arch="sd15", size="tiny", dtype="fp16", seed=5)
    b = mm.make_checkpoint(tmp_path / "b.safetensors", arch="sd15", size="tiny", dtype="fp16", seed=5)
    c = mm.make_checkpoint(tmp_path / "c.safetensors", arch="sd15", size="tiny", dtype="fp16", seed=6)
    assert _sha(a) == _sha(b) != _sha(c)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]  # no temp files left


def test_cli_writes_the_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "sd2.safetensors"
    assert cli_main(["make-model", "--arch", "sd2", "--size", "tiny", "--dtype", "fp32", "--seed", "1", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert _sha(out) == _sha(mm.make_checkpoint(tmp_path / "ref.safetensors", arch="sd2", size="tiny", dtype="fp32", seed=1))
    meta, header = _header(out)
    assert json.loads(meta["facediffuser.make_model"]) == {"arch": "sd2", "size": "tiny", "seed": 1, "dtype": "fp32", "layout_version": mm.LAYOUT_VERSION}
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert header[SD2_TE_PREFIX + "text_projection"]["dtype"] == "F32"
    assert SD2_TE_PREFIX + "transformer.resblocks.23.attn.in_proj_weight" in header
    assert SD2_TE_PREFIX + "logit_scale" in header and "alphas_cumprod" in header
    assert cli_main(["make-model", "--size", "tiny", "--out", str(tmp_path / "x.ckpt")]) == 2  # one-line error, exit 2


def test_cli_registration_does_not_import_torch() -> None:
    code = ("import sys, argparse; from facediffuser.sd import cli_make_model as m; "
            "m.register(argparse.ArgumentParser().add_subparsers()); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    from facediffuser.sd import cli_make_model

    assert cli_make_model.ARCHS == mm.ARCHS and cli_make_model.SIZES == mm.SIZES
    assert set(cli_make_model.DTYPES) == set(mm.DTYPES)


def test_bad_arguments() -> None:
    with pytest.raises(UserError, match="--arch must be one of"):
        mm.make_checkpoint("x.safetensors", arch="sdxl")
    with pytest.raises(UserError, match="--dtype must be one of"):
        mm.make_checkpoint("x.safetensors", size="tiny", dtype="int8")
    with pytest.raises(UserError, match="--out must end in .safetensors"):
        mm.make_checkpoint("x.bin", size="tiny")


def test_tiny_is_small_but_complete() -> None:
    sd = mm.build_state_dict("sd15", "tiny", dtype="fp32")
    n = sum(v.numel() for k, v in sd.items() if k.startswith((UNET_PREFIX, VAE_PREFIX, "cond_stage_model.")))
    assert n < 5_000_000
    keys = set(sd)
    for needed in ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.3.0.op.weight",
                   "middle_block.1.proj_in.weight", "middle_block.2.in_layers.0.weight", "output_blocks.2.1.conv.weight",
                   "output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.4.0.skip_connection.weight"):
        assert UNET_PREFIX + needed in keys, needed
    assert SD1_TE_PREFIX + "text_model.encoder.layers.11.self_attn.q_proj.weight" in keys
    assert VAE_PREFIX + "decoder.mid.attn_1.q.weight" in keys and sd[VAE_PREFIX + "decoder.mid.attn_1.q.weight"].ndim == 4


@pytest.mark.full_model
def test_full_sd15_has_the_released_sizes(sd15_full_checkpoint: Path) -> None:
    meta, header = _header(sd15_full_checkpoint)
    count = lambda prefix: sum(  # noqa: E731
        int(__import__("math").prod(v["shape"])) for k, v in header.items() if k.startswith(prefix) and not k.endswith("position_ids"))
    assert count(UNET_PREFIX) == 859_520_964
    assert count(SD1_TE_PREFIX) == 123_060_480
    assert count(VAE_PREFIX) == 83_653_863
    assert 2.0e9 < sd15_full_checkpoint.stat().st_size < 2.2e9
    assert header[UNET_PREFIX + "input_blocks.1.1.proj_in.weight"]["shape"] == [320, 320, 1, 1]
    assert header[SD1_TE_PREFIX + "text_model.embeddings.position_ids"]["dtype"] == "I64"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
