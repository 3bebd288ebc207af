"""``facediffuser demo --data``: a train/ + heldout/ folder is used as given; one folder is split
in half by content, with no image on both sides, whatever the file names."""

from __future__ import annotations

import json
import shutil

import pytest


def _digests(folder):
    from facediffuser.image_files import list_images
    from facediffuser.trainer.kohya_format import image_digest

    return {image_digest(p) for p in list_images(folder)}


def test_single_folder_is_split_by_content_without_overlap(tmp_path):
    from facediffuser.demo.cli_demo import _split_user_data
    from facediffuser.demo.toy_faces import write_toy_faces

    src = tmp_path / "mine"
    files = write_toy_faces(src / "a", 6, seed=1) + write_toy_faces(src / "b" / "deeper", 5, seed=2)  # nested folders
    shutil.copy(files[0], src / "same_bytes_other_name.png")  # a duplicate must not land on both sides
    train, held, how = _split_user_data(src, tmp_path / "out")
    tr, ho = _digests(train), _digests(held)
    assert not tr & ho
    assert tr | ho == _digests(src) and len(tr) + len(ho) == 11
    assert (len(tr), len(ho)) == (5, 6) and "split in half by content" in how and "1 byte-identical" in how
    # captions travel with their images
    for folder in (train, held):
        for png in folder.glob("*.png"):
            assert png.with_suffix(".txt").read_text().startswith("a photo of a face")

    # by content, not by name or place: renamed copies elsewhere give the same split
    other = tmp_path / "renamed"
    other.mkdir()
    for i, f in enumerate(sorted(src.rglob("*.png"), reverse=True)):
        shutil.copy(f, other / f"img_{i}.png")
    train2, held2, _ = _split_user_data(other, tmp_path / "out2")
    assert _digests(train2) == tr and _digests(held2) == ho

    # a re-run into the same --out does not keep images from the earlier source
    small = tmp_path / "small"
    write_toy_faces(small, 8, seed=3)
    train3, held3, _ = _split_user_data(small, tmp_path / "out")
    assert _digests(train3) | _digests(held3) == _digests(small)


def test_split_refuses_too_few_images_and_its_own_output(tmp_path):
    from facediffuser.demo.cli_demo import _split_user_data
    from facediffuser.errors import UserError
    from facediffuser.demo.toy_faces import write_toy_faces

    write_toy_faces(tmp_path / "few", 5)
    with pytest.raises(UserError, match="at least 8 distinct images"):
        _split_user_data(tmp_path / "few", tmp_path / "out")
    write_toy_faces(tmp_path / "out" / "data" / "x", 8)
    with pytest.raises(UserError, match="inside the demo's own data folder"):
        _split_user_data(tmp_path / "out" / "data" / "x", tmp_path / "out")


def test_train_and_heldout_folders_are_used_as_given(tmp_path):
    from facediffuser.demo.cli_demo import _split_user_data

    (tmp_path / "d" / "train").mkdir(parents=True)
    (tmp_path / "d" / "heldout").mkdir()
    train, held, how = _split_user_data(tmp_path / "d", tmp_path / "out")
    assert (train, held) == (tmp_path / "d" / "train", tmp_path / "d" / "heldout") and "as given" in how
    assert not (tmp_path / "out").exists()  # nothing copied


@pytest.mark.slow
def test_demo_trains_on_train_and_evaluates_on_heldout(tmp_path, monkeypatch):
    """A short demo run on a user folder (toy faces written to disk): the LoRA records exactly the
    train/ images, the table's real set is heldout/, and the report calls the data REAL."""
    from facediffuser.demo.cli_demo import run_demo
    from facediffuser.demo.toy_faces import make_splits
    from facediffuser.trainer.kohya_format import load_kohya_lora, training_image_digests

    monkeypatch.setenv("FACEDIFFUSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FACEDIFFUSER_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    train, held = make_splits(tmp_path / "user", n_train=6, n_heldout=8, seed=5, size=64)
    out = tmp_path / "demo"
    res = run_demo(out, data=str(tmp_path / "user"), train_steps=2, n=4, sample_steps=2, progress=False)
    _, meta = load_kohya_lora(res["lora"])
    assert training_image_digests(meta) == _digests(train)
    r = json.loads((out / "results.json").read_text())
    assert r["inputs"]["real"] == str(held) and r["inputs"]["n_real_images"] == 8
    assert r["overlap"]["checked"] and r["overlap"]["n_overlap"] == 0
    assert r["demo"]["provenance"]["data"].startswith("REAL: your images")
    assert not (out / "data").exists()  # no toy faces were drawn
    head = (out / "report.md").read_text()[:600]
    assert "stand-ins for: model, features" in head
