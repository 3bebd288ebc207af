"""The FID accordion's logic without a web UI: what it reports equals `facediffuser eval fid` on the
same images; banks accumulate across generations (each image once) and reset; a folder reference
is embedded once and saved into fid_stats; a missing Inception file is a one-line error."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facediffuser.cli import main
from facediffuser.errors import UserError
from facediffuser.sdwebui.fid_session import (
    INFOTEXT_KEYS, FIDArgs, GenerationScore, bank_size, get_extractor, list_stats_files, load_reference,
    release_extractor, reset_bank,
)
from fixtures_inception import random_test_images


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEDIFFUSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FACEDIFFUSER_INCEPTION", raising=False)
    yield
    release_extractor()


@pytest.fixture
def inception_dir(tmp_path, inception_weights) -> Path:
    d = tmp_path / "models" / "inception"
    d.mkdir(parents=True)
    try:
        os.link(inception_weights, d / inception_weights.name)
    except OSError:
        shutil.copyfile(inception_weights, d / inception_weights.name)
    return d


def _images(seed: int, n: int, size: int = 64) -> torch.Tensor:
    return random_test_images(n, size, torch.Generator().manual_seed(seed))


def _save(folder: Path, x: torch.Tensor, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(x.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(folder / f"{start + i:03d}.png")
    return folder


def _as_webui_batch(x: torch.Tensor) -> list[torch.Tensor]:
    """What Forge/A1111 hand to postprocess_batch_list: float [0, 1] CHW tensors (exact uint8/255 here)."""
    return list(x.to(torch.float32) / 255.0)


def _eval_fid(capsys, gen: Path, ref: Path, weights: Path) -> dict:
    capsys.readouterr()
    assert main(["eval", "fid", str(gen), str(ref), "--inception", str(weights), "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def reference(tmp_path, inception_dir, capsys) -> Path:
    real = _save(tmp_path / "real", _images(1, 12))
    stats = tmp_path / "models" / "fid_stats" / "ref.npz"
    stats.parent.mkdir(parents=True, exist_ok=True)
    assert main(["eval", "stats", str(real), "--out", str(stats), "--inception", str(next(inception_dir.iterdir())), "--quiet"]) == 0
    return stats


def _ref(stats_file: Path, inception_dir: Path):
    args = FIDArgs(enabled=True, reference=stats_file.name)
    return load_reference(args, stats_dir=stats_file.parent, extractor_factory=lambda: get_extractor(inception_dir))


def test_this_batch_over_two_batches_equals_eval_fid_of_the_saved_images(tmp_path, reference, inception_dir, capsys):
    gen = _images(2, 6)
    ref, name = _ref(reference, inception_dir)
    score = GenerationScore(FIDArgs(enabled=True, reference=name), ref, name, get_extractor(inception_dir))
    assert score.add(torch.stack(_as_webui_batch(gen[:3]))) is not None  # 3 images: already scored
    res = score.add(torch.stack(_as_webui_batch(gen[3:])))
    theirs = _eval_fid(capsys, _save(tmp_path / "gen", gen), reference, next(inception_dir.iterdir()))
    assert res.fid == pytest.approx(theirs["fid"], rel=1e-6)
    assert res.kid_mean == pytest.approx(theirs["kid_mean"], rel=1e-6, abs=1e-9)
    assert res.kid_std == pytest.approx(theirs["kid_std"], rel=1e-6, abs=1e-9)
    assert (score.n_generated, score.n_reference) == (6, 12)
    info = score.infotext()
    assert set(info) == set(INFOTEXT_KEYS) - {"FaceDiffuser bank"}
    assert all("," not in v for v in info.values())  # a comma would make the web UI quote the value
    assert info["FaceDiffuser FID"] == f"{theirs['fid']:.4f}" and info["FaceDiffuser N"] == "6 generated vs 12 reference"
    assert "N = 6 generated / 12 reference" in score.summary() and "biased at small N" in score.summary()


def test_a_single_image_is_reported_not_scored(reference, inception_dir):
    ref, name = _ref(reference, inception_dir)
    score = GenerationScore(FIDArgs(enabled=True, reference=name), ref, name, get_extractor(inception_dir))
    assert score.add(torch.stack(_as_webui_batch(_images(2, 1)))) is None
    assert score.infotext() == {} and "at least 2 images" in score.summary()


def test_accumulate_adds_generations_counts_each_image_once_and_resets(tmp_path, reference, inception_dir, capsys):
    gen = _images(3, 6)
    ref, name = _ref(reference, inception_dir)
    banks = tmp_path / "banks"
    args = FIDArgs(enabled=True, reference=name, bank="faces", mode="accumulate")
    ext = get_extractor(inception_dir)
    first = GenerationScore(args, ref, name, ext, banks_dir=banks)
    assert first.add(torch.stack(_as_webui_batch(gen[:1]))) is None and "generate again" in first.summary()
    first.add(torch.stack(_as_webui_batch(gen[1:3])))
    second = GenerationScore(args, ref, name, ext, banks_dir=banks)  # the next click / API request
    res = second.add(torch.stack(_as_webui_batch(gen[3:])))
    assert (second.n_generated, second.added, bank_size(banks, "faces")) == (6, 3, 6)
    theirs = _eval_fid(capsys, _save(tmp_path / "all", gen), reference, next(inception_dir.iterdir()))
    assert res.fid == pytest.approx(theirs["fid"], rel=1e-6)
    assert second.infotext()["FaceDiffuser bank"] == "faces"

    again = GenerationScore(args, ref, name, ext, banks_dir=banks)
    again.add(torch.stack(_as_webui_batch(gen[:3])))  # the same pixels again: not counted twice
    assert (again.added, again.n_generated) == (0, 6)

    fresh = GenerationScore(FIDArgs(enabled=True, reference=name, bank="faces", mode="accumulate", reset=True), ref, name, ext,
                            banks_dir=banks)
    fresh.add(torch.stack(_as_webui_batch(gen[:2])))
    assert fresh.n_generated == 2
    assert reset_bank(banks, "faces") == "bank 'faces' reset (2 images forgotten)" and bank_size(banks, "faces") == 0
    with pytest.raises(UserError, match="bank name"):
        GenerationScore(FIDArgs(enabled=True, bank="../x", mode="accumulate"), ref, name, ext, banks_dir=banks)


def test_folder_reference_is_embedded_once_and_saved_to_the_stats_list(tmp_path, reference, inception_dir):
    stats_dir = reference.parent
    real = tmp_path / "real"  # the folder the `reference` fixture embedded with the CLI
    calls = []

    def factory():
        calls.append(1)
        return get_extractor(inception_dir)

    stats, name = load_reference(FIDArgs(enabled=True, real_folder="real"), stats_dir=stats_dir, extractor_factory=factory,
                                 base_dir=tmp_path)
    assert name == "real.npz" and "real.npz" in list_stats_files(stats_dir) and stats.n == 12
    cli_stats, _ = _ref(reference, inception_dir)
    np.testing.assert_allclose(stats.mu, cli_stats.mu, rtol=1e-6, atol=1e-9)  # same numbers as `eval stats`
    again, name2 = load_reference(FIDArgs(enabled=True, reference="real.npz"), stats_dir=stats_dir, extractor_factory=factory)
    assert name2 == "real.npz" and len(calls) == 1 and again.n == 12

    other = _save(tmp_path / "elsewhere" / "real", _images(9, 4))  # another image set with the same folder name
    _, name3 = load_reference(FIDArgs(enabled=True, real_folder=str(other)), stats_dir=stats_dir, extractor_factory=factory)
    assert name3.startswith("real-") and name3.endswith(".npz") and load_reference(
        FIDArgs(enabled=True, reference="real.npz"), stats_dir=stats_dir, extractor_factory=factory)[0].n == 12


def test_reference_errors_are_one_line(tmp_path, inception_dir):
    stats_dir = tmp_path / "models" / "fid_stats"
    with pytest.raises(UserError, match="choose a reference"):
        load_reference(FIDArgs(enabled=True), stats_dir=stats_dir, extractor_factory=lambda: None)
    with pytest.raises(UserError, match="not found in"):
        load_reference(FIDArgs(enabled=True, reference="nope.npz"), stats_dir=stats_dir, extractor_factory=lambda: None)
    with pytest.raises(UserError, match="not found in"):
        load_reference(FIDArgs(enabled=True, reference="../../etc/passwd"), stats_dir=stats_dir, extractor_factory=lambda: None)
    with pytest.raises(UserError, match="real-image folder 'missing' not found"):
        load_reference(FIDArgs(enabled=True, real_folder="missing"), stats_dir=stats_dir, extractor_factory=lambda: None,
                       base_dir=tmp_path)


def test_missing_inception_weights_name_the_file_and_the_models_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    empty = tmp_path / "models" / "inception"
    with pytest.raises(UserError) as err:
        get_extractor(empty)
    text = str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in text and str(empty) in text and "\n" not in text


def test_api_args_may_be_short_and_are_checked():
    assert FIDArgs.from_values([True]) == FIDArgs(enabled=True)
    assert FIDArgs.from_values([True, "ref.npz", "", "b", "accumulate", True]) == FIDArgs(True, "ref.npz", "", "b", "accumulate", True)
    assert FIDArgs.from_values([False, None, None]) == FIDArgs()
    with pytest.raises(UserError, match="mode must be one of"):
        FIDArgs.from_values([True, "ref.npz", "", "b", "sometimes"])


def test_a_generation_with_scoring_off_lets_the_inception_go(inception_dir):
    import types
    import weakref

    from facediffuser.sdwebui import fid_ui

    first = get_extractor(inception_dir)
    assert get_extractor(inception_dir) is first  # kept between generations while scoring is on
    gone = weakref.ref(first)
    del first
    fid_ui.on_process(types.SimpleNamespace(extra_generation_params={}), (False,))
    import gc

    gc.collect()
    assert gone() is None  # the web UI's process holds no Inception once the accordion is off
