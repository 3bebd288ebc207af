"""The demo end to end (slow: ~2 min on 2 cores): artefacts, labels, and the LoRA helps.

With the shipped scene model (demo/model_files/) the base model draws scenes, the fine-tuned one faces.
Measured 2026-12-08 (2 cores, load ~2, N = 32, the demo's defaults), seeds 0 / 1 / 2:

* pixel space: nearest-real RMS base 50.2 / 53.0 / 52.3 vs fine-tuned 41.8 / 44.5 / 44.7; nearer-to-a-face
  share base 12 % / 9 % / 19 % vs fine-tuned 66 % / 69 % / 81 %;
* stand-in (random-weight Inception) FD: base 3.16 / 3.83 / 3.86 vs fine-tuned 2.93 / 1.80 / 2.68
  (ratios 0.93 / 0.47 / 0.69; Real-vs-Real floor 1.47 / 1.10 / 1.10). Random features weigh colour and
  texture more than shape, so they separate the two models less than the pictures and the pixel
  measures do; seed 0, the test's, is the least separated of the three, hence a margin of 3 %.

With the random fallback model (file not installed) the FD ratio was 0.36 (146 vs 402; earlier defaults: DDIM, N = 16).
"""

from __future__ import annotations

import json

import pytest

from facediffuser.demo.demo_model import DEMO_BASE_FILE

MARGIN = 0.97  # fine-tuned FD below 97 % of the base model's (seed 0: 0.93, see the docstring)
PIXEL_MARGIN = 2.0  # RMS on the 0..255 scale
BASE_FACE_SHARE_MAX = 0.5
FT_FACE_SHARE_MIN = 0.5


@pytest.mark.slow
def test_demo_runs_and_finetuned_beats_base(tmp_path, monkeypatch):
    from facediffuser.demo.cli_demo import run_demo

    monkeypatch.setenv("FACEDIFFUSER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FACEDIFFUSER_INCEPTION", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no FID weights: the stand-in is used
    out = tmp_path / "demo"
    res = run_demo(out, seed=0, progress=False)
    for name in ("report.md", "results.json", "fid_bar_chart.png", "samples_grid.png", "face_lora.safetensors",
                 "face_lora.loss.png", "table.md"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    head = report[:600]
    assert head.startswith("# FaceDiffuser demo report")
    assert "stand-ins for: model, data, features" in head and "must not be quoted as FID" in head
    assert report.count("STAND-IN") >= 4  # provenance rows for model, data, features + the table's warning
    r = json.loads((out / "results.json").read_text())
    assert r["features_caveat"]["note"] and r["demo"]["provenance"]["features"].startswith("STAND-IN")
    assert r["features_caveat"]["label"].startswith("STAND-IN") and r["features_caveat"]["details"]["version"] >= 2
    assert "Fréchet distance (STAND-IN random-weight features, not FID)" in (out / "table.md").read_text().splitlines()[0]
    assert "| FD ↓ |" in report and "| FID ↓ |" not in report
    assert r["protocol"]["weights"].startswith("STAND-IN-random-inception-v2")
    rows = {row["label"]: row for row in r["rows"]}
    base, ft = rows["Real vs Base"]["fid"], rows["Real vs Fine-tuned"]["fid"]
    assert ft < MARGIN * base, (ft, base)
    # the same in pixel space, with no feature extractor: fine-tuned samples are nearer to the held-out
    # toy faces, and the base model (trained on scenes only) draws scenes, the fine-tuned one faces
    px = r["demo"]["pixel"]
    print("demo figures:", json.dumps({"fd_base": base, "fd_finetuned": ft, "pixel": px, "face_metrics": r["face_metrics"],
                                       "timings": r["demo"]["timings_s"]}))
    assert px["n_real"] == 64 and px["base"]["n"] == px["finetuned"]["n"] == 32 and "## Pixel check" in report
    assert px["finetuned"]["nearest_real_rms"] < px["base"]["nearest_real_rms"] - PIXEL_MARGIN, px
    if DEMO_BASE_FILE.is_file():  # the scene model: its samples are scenes, the fine-tuned ones faces
        assert px["n_scenes"] == 256 and "never saw a face" in report
        assert px["base"]["nearer_face_share"] <= BASE_FACE_SHARE_MAX, px
        assert px["finetuned"]["nearer_face_share"] >= FT_FACE_SHARE_MIN, px
    else:  # the random fallback, labelled so
        assert px["n_scenes"] == 0 and "is not installed: build it with tools/make_demo_base_model.py" in report
    # the stand-in's scale is normalised: distances read like FIDs, not tens of thousands
    assert all(0 < row["fid"] < 5000 for row in r["rows"]), [row["fid"] for row in r["rows"]]
    # N = 32 = KID subset size: every subset is the whole set, so the std is n/a, not "± 0.00"
    assert all(row["kid_std"] is None for row in r["rows"]) and "± n/a" in report and "± 0.00" not in report
    assert r["generation"]["base"]["settings"] == r["generation"]["finetuned"]["settings"]
    if r["face_metrics"] is not None:  # MTCNN installed: detection rate and framing vs the real set
        assert "## Face metrics" in report
        for name in ("real", "base", "finetuned"):
            assert 0.0 <= r["face_metrics"][name]["detection_rate"] <= 1.0
    else:
        assert any(n.startswith("face metrics skipped") for n in r["notes"])
