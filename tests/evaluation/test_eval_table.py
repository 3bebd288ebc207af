"""``eval table`` on the tiny random model: four artefacts, identical settings for both models, overlap guard."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sd15_tiny_checkpoint):
    from facediffuser.demo.toy_faces import make_splits
    from facediffuser.trainer.config import TrainConfig
    from facediffuser.trainer.training_loop import train

    d = tmp_path_factory.mktemp("table")
    train_dir, held = make_splits(d / "data", n_train=4, n_heldout=8, size=64)
    res = train(TrainConfig(model=str(sd15_tiny_checkpoint), data=str(train_dir), output=str(d / "face.safetensors"),
                            steps=2, rank=4, lr=1e-2, resolution=64, batch_size=2))
    return d, train_dir, held, res.output


def test_table_writes_four_artefacts_with_identical_settings(trained, sd15_tiny_checkpoint, inception_weights):
    from facediffuser.cli import main

    d, _, held, lora = trained
    out = d / "eval"
    rc = main(["eval", "table", "--model", str(sd15_tiny_checkpoint), "--lora", str(lora), "--real", str(held),
               "--n", "4", "--steps", "2", "--cfg", "1.5", "--seed", "11", "--size", "64",
               "--inception", str(inception_weights), "--out", str(out), "--quiet", "--no-face-metrics",
               "--kid-subsets", "5"])
    assert rc == 0
    for name in ("results.json", "table.md", "fid_bar_chart.png", "samples_grid.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
    r = json.loads((out / "results.json").read_text())
    base, ft = r["generation"]["base"], r["generation"]["finetuned"]
    assert base["settings"] == ft["settings"] == {"steps": 2, "cfg": 1.5, "size": 64, "sampler": "ddim", "seed": 11,
                                                  "negative_prompt": "", "eta": 0.0}
    assert base["images"] == ft["images"]  # same file names, prompts and seeds, image by image
    assert [i["seed"] for i in base["images"]] == r["seeds"] == [11, 12, 13, 14]
    assert base["lora"] is None and ft["lora"] == str(lora)
    # prompts came from the held-out captions
    assert r["prompt_source"].startswith("captions") and all(p.startswith("a photo of a face") for p in r["prompts"])
    # both generation.json files on disk say the same
    g_base = json.loads((out / "generated" / "base" / "generation.json").read_text())
    g_ft = json.loads((out / "generated" / "finetuned" / "generation.json").read_text())
    assert g_base["settings"] == g_ft["settings"]
    names = [row["label"] for row in r["rows"]]
    assert names == ["Real vs Base", "Real vs Fine-tuned", "Base vs Fine-tuned", "Real vs Real (noise floor)"]
    assert [(row["n_a"], row["n_b"]) for row in r["rows"]] == [(4, 4), (4, 4), (4, 4), (4, 4)]
    assert all(row["fid"] > 0 for row in r["rows"])
    # N = 4 and subset size capped at 4: every subset is the whole set, so the std is undefined
    assert all(row["kid_subset_size"] == 4 and row["kid_std"] is None for row in r["rows"])
    assert r["face_metrics"] is None and "face metrics skipped (--no-face-metrics)" in r["notes"]
    assert r["protocol"]["weights_sha256"] and r["protocol"]["resize"] == "tf1" and r["features_caveat"] is None
    assert r["schema"] == "facediffuser.eval_table/2"
    from facediffuser.evaluation.fid_result import FIDResult

    rows = [FIDResult.from_dict(row) for row in r["rows"]]  # each row is the one result type
    assert all(row.protocol == r["protocol"] | {"n": 4} and not row.warnings for row in rows)
    assert rows[0].a == "real" and rows[0].b == "base" and "FID" in md_title(out)
    assert r["overlap"]["checked"] and r["overlap"]["n_overlap"] == 0
    md = (out / "table.md").read_text()
    assert "Real vs Real" in md and "4 / 4" in md and "ddim" in md
    assert "± n/a" in md and "± 0.00" not in md and "## Face metrics" not in md


def test_table_face_metrics_and_kid_std(trained, sd15_tiny_checkpoint, inception_weights):
    """With the MTCNN detector installed, results.json carries detection rates and framing
    distances for real, base and fine-tuned; KID std is a number when subsets are proper subsets."""
    pytest.importorskip("facenet_pytorch")
    from facediffuser.cli import main

    d, _, held, lora = trained
    out = d / "eval_faces"
    rc = main(["eval", "table", "--model", str(sd15_tiny_checkpoint), "--lora", str(lora), "--real", str(held),
               "--n", "4", "--steps", "2", "--size", "64", "--inception", str(inception_weights), "--out", str(out),
               "--quiet", "--kid-subsets", "5", "--kid-subset-size", "3"])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    faces = r["face_metrics"]
    assert faces is not None, r["notes"]
    assert faces["detector"] == "mtcnn" and faces["real"]["n_images"] == 4
    for name in ("real", "base", "finetuned"):
        for key in ("detection_rate", "any_face_rate", "multi_face_rate"):
            assert 0.0 <= faces[name][key] <= 1.0, (name, key, faces[name][key])
    for name in ("base", "finetuned"):
        f = faces[name]
        assert f["n_images"] == 4 and f["real_detection_rate"] == faces["real"]["detection_rate"]
        for stat in ("face_size", "center_x", "center_y", "roll"):
            # a distance needs >= 2 faces on each side; random-model outputs usually have none
            assert f"{stat}_wasserstein" in f and (f[f"{stat}_wasserstein"] is None or f[f"{stat}_wasserstein"] >= 0)
    md = (out / "table.md").read_text()
    assert "## Face metrics" in md and "| real | 4 |" in md and "| finetuned | 4 |" in md
    # subsets of 3 out of 4: they differ, so the std is a real number
    assert all(row["kid_subset_size"] == 3 and isinstance(row["kid_std"], float) for row in r["rows"])
    assert "± n/a" not in md


def md_title(out):
    return (out / "table.md").read_text().splitlines()[0]


def test_kid_std_is_none_only_when_every_subset_is_the_whole_set():
    from facediffuser.evaluation.fid_result import kid_std_or_none

    assert kid_std_or_none(0.0, subset_size=16, n1=16, n2=16) is None
    assert kid_std_or_none(0.3, subset_size=16, n1=16, n2=40) == 0.3  # side 2 varies
    assert kid_std_or_none(0.2, subset_size=8, n1=16, n2=16) == 0.2


def test_overlap_guard_refuses_training_images(trained, sd15_tiny_checkpoint, tmp_path):
    from facediffuser.errors import UserError
    from facediffuser.evaluation.table import TableConfig, check_overlap, run_table
    from facediffuser.image_files import list_images

    d, train_dir, _, lora = trained
    with pytest.raises(UserError, match="training set"):  # refused before the extractor is even built
        run_table(TableConfig(model=str(sd15_tiny_checkpoint), lora=str(lora), real=str(train_dir), out=str(tmp_path / "x"), n=2),
                  lambda: pytest.fail("extractor built before the overlap check"))
    info = check_overlap(lora, list_images(train_dir), allow=True)
    assert info["checked"] and info["n_overlap"] == 4


def test_missing_inception_names_the_file(trained, sd15_tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from facediffuser.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.delenv("FACEDIFFUSER_INCEPTION", raising=False)
    import torch.hub

    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    d, _, held, lora = trained
    rc = main(["eval", "table", "--model", str(sd15_tiny_checkpoint), "--lora", str(lora), "--real", str(held),
               "--n", "2", "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "weights-inception-2015-12-05-6726825d.pth" in err and err.count("\n") == 1
    assert not (tmp_path / "x" / "generated").exists()  # failed before generating anything


def test_no_stand_in_switch_in_the_product_evaluation():
    """Stand-ins live in demo/: evaluation/ never imports them, and the CLI offers no stand-in flag."""
    import ast
    import pathlib

    import facediffuser.evaluation as ev
    from facediffuser.cli import build_parser

    for f in pathlib.Path(ev.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert "demo" not in (node.module or "").split("."), f"{f.name} imports {node.module}"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "table", "--model", "m", "--lora", "l", "--real", "r", "--out", "o", "--stand-in-extractor"])
