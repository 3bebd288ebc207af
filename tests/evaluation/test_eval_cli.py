"""`facediffuser eval stats|fid`: end to end against pytorch-fid, output formats, one-line errors."""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from facediffuser.cli import main


def _write_pngs(folder, seed, n, size):
    import torch

    from fixtures_inception import random_test_images

    folder.mkdir(parents=True, exist_ok=True)
    x = random_test_images(n, size, torch.Generator().manual_seed(seed))
    for i, im in enumerate(x.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEDIFFUSER_CACHE", str(tmp_path / "cache"))


def _run(capsys, *argv):
    capsys.readouterr()  # drop what reference libraries printed before
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_fid_end_to_end_equals_pytorch_fid_at_299(tmp_path, inception_torch_home, capsys):
    from pytorch_fid.fid_score import IMAGE_EXTENSIONS, calculate_frechet_distance, get_activations
    from pytorch_fid.inception import InceptionV3

    from facediffuser.evaluation.frechet import frechet_distance

    a, b = _write_pngs(tmp_path / "a", 1, 10, 299), _write_pngs(tmp_path / "b", 2, 12, 299)
    model = InceptionV3([3]).eval()
    acts = [get_activations(sorted(d.glob("*.png")), model, 50, 2048, "cpu", 0) for d in (a, b)]
    (m1, s1), (m2, s2) = [(x.mean(0), np.cov(x, rowvar=False)) for x in acts]  # = pytorch-fid's stats
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # sqrtm(disp=False) on scipy 1.17
        theirs = calculate_frechet_distance(m1, s1, m2, s2)
    # exact value on the same stats: tr sqrt(S1 S2) = nuclear norm of Xc1 Xc2^T (N < D)
    xc = [(x - x.mean(0)) / np.sqrt(len(x) - 1) for x in acts]
    exact = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.linalg.svd(xc[0] @ xc[1].T, compute_uv=False).sum())
    ours_same_stats = frechet_distance(m1, s1, m2, s2)
    rc, out, err = _run(capsys, "eval", "fid", str(a), str(b), "--resize", "pytorch-fid", "--json", "--quiet", "--kid-subsets", "5")
    assert rc == 0, err
    res = json.loads(out)
    rel = lambda v, ref: abs(v - ref) / abs(ref)  # noqa: E731
    print(f"\npytorch-fid FID {theirs:.9g} (rel. to exact {rel(theirs, exact):.1e}); ours on its stats {ours_same_stats:.9g} "
          f"(rel. to pytorch-fid {rel(ours_same_stats, theirs):.1e}, to exact {rel(ours_same_stats, exact):.1e}); "
          f"ours end to end {res['fid']:.9g} (rel. to pytorch-fid {rel(res['fid'], theirs):.1e})")
    # With N = 10 < D, scipy's sqrtm of the singular product carries ~(D-N) sqrt(eps lambda_max) of
    # error (measured 5e-6 relative here); ours matches the exact nuclear-norm value.
    assert rel(ours_same_stats, exact) <= 1e-9
    assert rel(ours_same_stats, theirs) <= 1e-5
    assert rel(res["fid"], theirs) <= 1e-5
    assert res["n_a"] == 10 and res["n_b"] == 12 and res["kid_subset_size"] == 10 and res["kid_std"] is not None
    assert res["protocol_a"]["resize"] == res["protocol_b"]["resize"] == "pytorch-fid" and not res["warnings"]
    assert res["a"] == str(a) and res["b"] == str(b)


def test_stats_then_fid_text_output(tmp_path, inception_torch_home, capsys):
    a, b = _write_pngs(tmp_path / "a", 3, 4, 64), _write_pngs(tmp_path / "b", 4, 5, 80)
    rc, out, err = _run(capsys, "eval", "stats", str(a), "--out", str(tmp_path / "ref.npz"), "--quiet")
    assert rc == 0, err
    assert "N=4" in out and "protocol:" in out and "tf1" in out
    with np.load(tmp_path / "ref.npz") as z:
        assert {"mu", "sigma", "n", "features", "protocol"} <= set(z.files)
    rc, out, err = _run(capsys, "eval", "fid", str(tmp_path / "ref.npz"), str(b), "--quiet", "--kid-subsets", "3")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("FID ") and "A: N=4, B: N=5" in lines[0]
    assert lines[1].startswith("KID ") and "±" in lines[1] and "3 subsets of 4" in lines[1]
    assert lines[2].startswith("protocol: inception-v3-compat") and "resize tf1" in lines[2]
    # a pytorch-fid style file (mu/sigma only): FID, no KID, a warning about the unknown protocol
    with np.load(tmp_path / "ref.npz") as z:
        np.savez_compressed(tmp_path / "plain.npz", mu=z["mu"], sigma=z["sigma"])
    rc, out, err = _run(capsys, "eval", "fid", str(tmp_path / "plain.npz"), str(tmp_path / "ref.npz"), "--json")
    res = json.loads(out)
    assert rc == 0 and res["kid_mean"] is None and abs(res["fid"]) < 1e-6 and "no recorded protocol" in err
    assert any("no recorded protocol" in w for w in res["warnings"])


@pytest.mark.parametrize("case", ["missing_weights", "empty", "one_image", "dims", "corrupt"])
def test_one_line_errors(case, tmp_path, inception_torch_home, capsys, monkeypatch):
    good = _write_pngs(tmp_path / "good", 5, 2, 32)
    if case == "missing_weights":
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nothing_here"))
        argv, expect = ["eval", "stats", str(good), "--out", str(tmp_path / "o.npz")], "weights-inception-2015-12-05-6726825d.pth (about 95.6 MB"
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        argv, expect = ["eval", "fid", str(tmp_path / "empty"), str(good)], "no images in"
    elif case == "one_image":
        one = _write_pngs(tmp_path / "one", 6, 1, 32)
        argv, expect = ["eval", "fid", str(one), str(good), "--quiet"], "need at least 2 images"
    elif case == "dims":
        np.savez(tmp_path / "d8.npz", mu=np.zeros(8), sigma=np.eye(8))
        np.savez(tmp_path / "d16.npz", mu=np.zeros(16), sigma=np.eye(16))
        argv, expect = ["eval", "fid", str(tmp_path / "d8.npz"), str(tmp_path / "d16.npz")], "different dimensions: 8"
    else:
        (good / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        argv, expect = ["eval", "stats", str(good), "--out", str(tmp_path / "o.npz"), "--quiet"], "cannot read image"
    rc, out, err = _run(capsys, *argv)
    assert rc == 2
    msg = err.strip()
    assert "\n" not in msg and msg.startswith("facediffuser eval: error:") and expect in msg, msg
    if case == "corrupt":
        assert "broken.png" in msg


def test_eval_subparsers_are_exposed_for_more_commands():
    from facediffuser.evaluation import cli_eval

    top = argparse.ArgumentParser().add_subparsers(dest="command")
    sub = cli_eval.register(top)
    assert {"stats", "fid"} <= set(sub.choices)
    assert "cli_eval_table" in cli_eval._EVAL_COMMAND_MODULES
