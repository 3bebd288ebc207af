"""The LoRA-vs-base study's logic: identical prompts and seeds for both runs, the three rows equal the
evaluation's own comparisons, and the table / chart / grid carry N."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from facediffuser.errors import UserError
from facediffuser.evaluation.stats import FeatureStats, compare
from facediffuser.sdwebui import lora_vs_base as lvb


def test_plan_cycles_prompts_and_gives_both_runs_the_same_seeds():
    plan = lvb.plan("a face\n\n# comment\na smiling face\n", "ignored", 5, 100, 4, "face_lora", 0.8)
    assert plan.prompts == ("a face", "a smiling face", "a face", "a smiling face", "a face")
    assert plan.seeds == (100, 101, 102, 103, 104)
    assert plan.lora_prompts == tuple(p + " <lora:face_lora:0.8>" for p in plan.prompts)
    assert (plan.batch_size, plan.n_iter) == (1, 5)  # 4 does not divide 5: one image per batch, exactly N
    assert (lvb.plan("", "portrait", 8, 0, 4, "x", 1.0).batch_size, lvb.plan("", "portrait", 8, 0, 4, "x", 1.0).n_iter) == (4, 2)
    assert lvb.plan("", "portrait", 2, 0, 1, "x", 1).prompts == ("portrait", "portrait")


@pytest.mark.parametrize("args, message", [
    (("", "", 4, 0, 1, "x", 1.0), "no prompt"),
    (("a", "", 1, 0, 1, "x", 1.0), "N must be at least 2"),
    (("a", "", 4, 0, 1, "bad:name", 1.0), "not a usable LoRA name"),
])
def test_plan_errors(args, message):
    with pytest.raises(UserError, match=message):
        lvb.plan(*args)


def _feats(seed, n, shift=0.0):
    return (np.random.default_rng(seed).standard_normal((n, 16)) + shift).astype(np.float32)


def test_rows_are_the_evaluations_own_comparisons():
    real = FeatureStats.from_features(_feats(0, 40), source="real")
    base, lora = _feats(1, 10, 2.0), _feats(2, 10, 0.0)
    rows = lvb.compare_sets(real, base, lora, None)
    assert [r.label for r in rows] == list(lvb.ROW_NAMES)
    expected = [compare(FeatureStats.from_features(base), real), compare(FeatureStats.from_features(lora), real),
                compare(FeatureStats.from_features(lora), FeatureStats.from_features(base))]
    for row, exp in zip(rows, expected):
        assert (row.fid, row.kid_mean, row.kid_std) == (exp.fid, exp.kid_mean, exp.kid_std)
    assert [(r.n_a, r.n_b) for r in rows] == [(10, 40), (10, 40), (10, 10)]
    assert rows[1].fid < rows[0].fid  # the LoRA set was drawn closer to the real one
    same = lvb.compare_sets(real, base, base, None)
    assert same[2].fid == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(UserError, match="10 base images but 9 LoRA"):
        lvb.compare_sets(real, base, lora[:9], None)


def test_table_chart_grid_and_files(tmp_path):
    real = FeatureStats.from_features(_feats(0, 40))
    rows = lvb.compare_sets(real, _feats(1, 10, 2.0), _feats(2, 10, 0.0), None)
    table = lvb.markdown_table(rows, lora="face", weight=0.8, reference="ffhq.npz")
    assert "| Real vs Base | 10 / 40 |" in table and "| Base vs LoRA | 10 / 10 |" in table and "weight 0.8" in table
    chart = lvb.bar_chart(rows, title="t")
    assert chart.size == (900, 420) and np.asarray(chart).std() > 0
    base = [Image.new("RGB", (64, 64), (10 * i, 0, 0)) for i in range(3)]
    lora = [Image.new("RGB", (64, 64), (0, 10 * i, 0)) for i in range(3)]
    grid = lvb.side_by_side(base, lora, cell=32)
    assert grid.size[0] == 64 and grid.size[1] == 3 * (32 + 14)
    assert np.asarray(grid)[14 + 16, 48, 1] == 0 and np.asarray(grid)[2 * 46 + 14 + 16, 48, 1] == 20  # row 2, LoRA column
    paths = lvb.write_outputs(tmp_path / "out", rows=rows, table=table, chart=chart, grid=grid, settings={"n": 10})
    assert json.loads(paths["results"].read_text())["rows"][0]["n_a"] == 10
    assert Image.open(paths["chart"]).size == (900, 420) and paths["table"].read_text().startswith("| Comparison")
