"""The one header reader: the same tensors, shapes and metadata as safetensors' own reader, from
the header alone, and a one-line error for a file that is not whole."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from facediffuser.errors import UserError
from facediffuser.sd.safetensors_io import read_header, read_metadata


def test_header_equals_safetensors_own_reader(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2, 3), "b.weight": torch.ones(4, dtype=torch.float16)}, str(p), metadata={"k": "v", "n": "1"})
    h = read_header(p)
    with safe_open(str(p), framework="pt") as fh:
        assert h.metadata == fh.metadata() == read_metadata(p)
        assert set(h.tensors) == set(fh.keys())
        assert h.shapes == {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    assert h.tensors["b.weight"]["dtype"] == "F16"
    save_file({"a": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    assert read_metadata(tmp_path / "bare.safetensors") == {}


def test_bad_files_are_one_line_errors(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(64)}, str(p))
    (tmp_path / "cut.safetensors").write_bytes(p.read_bytes()[:-10])
    (tmp_path / "text.safetensors").write_text("just text, renamed\n" * 3)
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    for name, match in (("cut", "truncated"), ("text", "bad header length"), ("short", "only 3 bytes")):
        with pytest.raises(UserError, match=match) as err:
            read_header(tmp_path / f"{name}.safetensors")
        assert f"{name}.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_the_evaluation_reads_lora_metadata_without_loading_the_lora(tmp_path, monkeypatch):
    """The table's overlap guard and prompt choice need the header only, never the tensors."""
    from facediffuser.evaluation import table
    from facediffuser.trainer import kohya_format as kf

    lora = tmp_path / "face.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(4, 8), "lora_unet_a.lora_up.weight": torch.zeros(8, 4)},
              str(lora), metadata={kf.META_TRIGGER: "sks"})
    monkeypatch.setattr(kf, "load_kohya_lora", lambda *a, **k: pytest.fail("the whole LoRA was loaded"))
    assert table.check_overlap(lora, [], allow=False)["checked"] is False
    assert table.choose_prompts(None, [], lora) == (["sks, a photo of a face"], "LoRA metadata (trigger word + default template)")
    with pytest.raises(UserError, match="not a kohya LoRA: .*full model"):
        save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "ckpt.safetensors"))
        kf.read_lora_metadata(tmp_path / "ckpt.safetensors")
