"""Stats files (interchangeable with pytorch-fid's), the content-keyed feature cache, FeatureBank."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from facediffuser.errors import UserError
from facediffuser.evaluation.feature_bank import FeatureBank
from facediffuser.evaluation.fid_result import FIDResult
from facediffuser.evaluation.stats import FeatureStats, compare, fid, folder_features, load_stats, save_stats


def _feats(seed, n=40, d=32, shift=0.0):
    return (np.random.default_rng(seed).random((n, d)) + shift).astype(np.float32)


def _write_pngs(folder, seed, n=4, size=64):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_our_file_loads_in_pytorch_fid_and_gives_the_same_fid(tmp_path):
    from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path

    a = FeatureStats.from_features(_feats(0), protocol={"resize": "tf1", "weights_sha256": "x"})
    b = FeatureStats.from_features(_feats(1, n=50, shift=0.05))
    save_stats(a, tmp_path / "a.npz")
    save_stats(b, tmp_path / "b.npz", include_features=False)
    m1, s1 = compute_statistics_of_path(str(tmp_path / "a.npz"), None, 1, 32, "cpu")
    m2, s2 = compute_statistics_of_path(str(tmp_path / "b.npz"), None, 1, 32, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = calculate_frechet_distance(m1, s1, m2, s2)
    assert fid(a, b) == pytest.approx(theirs, rel=1e-6)
    back = load_stats(tmp_path / "a.npz")
    assert back.n == 40 and back.features.shape == (40, 32) and back.protocol["resize"] == "tf1" and back.protocol["n"] == 40
    assert load_stats(tmp_path / "b.npz").features is None


def test_pytorch_fid_save_stats_loads_in_ours(tmp_path, inception_torch_home):
    from pytorch_fid.fid_score import save_fid_stats

    folder = _write_pngs(tmp_path / "imgs", 0, n=3)
    out = tmp_path / "theirs.npz"
    save_fid_stats([str(folder), str(out)], batch_size=3, device="cpu", dims=2048, num_workers=0)
    st = load_stats(out)
    assert st.dim == 2048 and st.n is None and st.protocol is None and st.sigma.shape == (2048, 2048)
    with np.load(out) as z:
        assert np.array_equal(st.mu, z["mu"]) and np.array_equal(st.sigma, z["sigma"])


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="stats file not found"):
        load_stats(tmp_path / "none.npz")
    np.savez(tmp_path / "x.npz", foo=np.zeros(3))
    with pytest.raises(UserError, match="not an FID stats file.*foo"):
        load_stats(tmp_path / "x.npz")
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.zeros((4, 4)))
    with pytest.raises(UserError, match="sigma has shape"):
        load_stats(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot read stats file"):
        load_stats(tmp_path / "junk.npz")
    with pytest.raises(UserError, match="at least 2 images"):
        FeatureStats.from_features(np.zeros((1, 8)), source="one.png")
    with pytest.raises(UserError, match="different dimensions: 32 .* vs 16"):
        fid(FeatureStats.from_features(_feats(0)), FeatureStats.from_features(_feats(1, d=16)))


def test_compare_reports_n_kid_and_protocol_warnings():
    a = FeatureStats.from_features(_feats(0, n=60), protocol={"resize": "tf1", "weights_sha256": "s"}, source="A")
    b = FeatureStats.from_features(_feats(1, n=50, shift=0.1), protocol={"resize": "pytorch-fid", "weights_sha256": "s"}, source="B")
    r = compare(a, b, kid_subsets=5, kid_subset_size=20)
    assert r.n_a == 60 and r.n_b == 50 and r.kid_subset_size == 20 and r.kid_mean > 0 and r.kid_std > 0
    assert (r.a, r.b, r.protocol_a["resize"], r.protocol_b["resize"]) == ("A", "B", "tf1", "pytorch-fid")
    assert any("differ in resize" in w for w in r.warnings)
    assert FIDResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r  # the JSON form round-trips
    # a subset as large as both sets is the whole set every time: the std is undefined, not 0
    whole = compare(a, FeatureStats.from_features(_feats(3, n=20)), kid_subsets=5, kid_subset_size=60)
    assert whole.kid_subset_size == 20 and whole.kid_std is not None
    same_n = compare(FeatureStats.from_features(_feats(4, n=20)), FeatureStats.from_features(_feats(5, n=20)), kid_subsets=5)
    assert same_n.kid_subset_size == 20 and same_n.kid_std is None and "± n/a" in same_n.kid_text()
    # N < D: the Gram route is used; it equals the plain stats route
    from facediffuser.evaluation.frechet import frechet_distance

    a2 = FeatureStats.from_features(_feats(2, n=10, d=64))
    b2 = FeatureStats.from_features(_feats(3, n=12, d=64, shift=0.2))
    assert fid(a2, b2) == pytest.approx(frechet_distance(a2.mu, a2.sigma, b2.mu, b2.sigma), rel=1e-9)


class _CountingExtractor:
    """Stands in for InceptionFeatures: features = mean colour, counts its calls."""

    def __init__(self, key="k1"):
        self.calls = 0
        self.cache_key = key

    def protocol(self, n=None):
        return {"resize": "tf1", "weights_sha256": self.cache_key, "n": n}

    def features_from_files(self, files, desc=""):
        self.calls += 1
        return np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32).mean((0, 1)) for f in files])


def test_feature_cache_keyed_by_content_and_extractor(tmp_path):
    folder = _write_pngs(tmp_path / "a", 1, n=5)
    ex = _CountingExtractor()
    f1, p1 = folder_features(folder, ex, cache_dir=tmp_path / "cache")
    f2, _ = folder_features(folder, ex, cache_dir=tmp_path / "cache")
    assert ex.calls == 1 and np.array_equal(f1, f2) and p1["n"] == 5 and len(p1["images_sha256"]) == 64
    (folder / "000.png").rename(folder / "zzz.png")  # names do not matter, content does
    moved = tmp_path / "b"
    folder.rename(moved)
    f3, _ = folder_features(moved, ex, cache_dir=tmp_path / "cache")
    assert ex.calls == 1 and np.array_equal(f1, f3)
    folder_features(moved, _CountingExtractor("k2"), cache_dir=tmp_path / "cache")  # another extractor: miss
    _write_pngs(moved, 99, n=1)  # content changed: miss
    folder_features(moved, ex, cache_dir=tmp_path / "cache")
    assert ex.calls == 2


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images in"):
        folder_features(tmp_path / "empty", _CountingExtractor(), cache_dir=tmp_path / "c")
    with pytest.raises(UserError, match="image folder not found"):
        folder_features(tmp_path / "missing", _CountingExtractor(), cache_dir=tmp_path / "c")


def test_feature_bank_accumulates_persists_dedups_resets(tmp_path):
    path = tmp_path / "bank.npz"
    proto = {"resize": "tf1", "weights_sha256": "s", "n": 3}
    bank = FeatureBank.open(path, seed=5)
    assert len(bank) == 0
    assert bank.add(_feats(0, n=3), keys=["a", "b", "c"], protocol=proto) == 3
    assert bank.add(_feats(1, n=4), keys=["c", "d", "e", "f"], protocol=proto) == 3  # "c" again: skipped
    again = FeatureBank.open(path)
    assert len(again) == 6 and again.seed == 5 and np.array_equal(again.features, bank.features)
    ref = FeatureStats.from_features(_feats(7, n=30), protocol=proto)
    r1, r2 = bank.compare(ref, kid_subset_size=5), again.compare(ref, kid_subset_size=5)
    assert r1.fid == pytest.approx(r2.fid) and (r1.kid_mean, r1.kid_std) == (r2.kid_mean, r2.kid_std) and r1.n_a == 6
    with pytest.raises(UserError, match="holds features made with"):
        again.add(_feats(2, n=2), protocol={"resize": "pytorch-fid", "weights_sha256": "s"})
    with pytest.raises(UserError, match="dimension 16 but the bank holds 32"):
        again.add(_feats(2, n=2, d=16))
    again.reset()
    assert len(FeatureBank.open(path)) == 0 and FeatureBank.open(path).protocol is None
    with pytest.raises(UserError, match="at least 2 images"):
        FeatureBank().stats()


def test_feature_bank_add_images_uses_the_extractor_once_per_new_image(inception_weights):
    import torch

    from facediffuser.evaluation.inception import InceptionFeatures

    ex = InceptionFeatures(inception_weights, device="cpu", progress=False)
    imgs = torch.rand(3, 48, 48, 3)  # ComfyUI IMAGE
    bank = FeatureBank()
    assert bank.add_images(imgs, ex) == 3 and bank.add_images(imgs, ex) == 0 and len(bank) == 3
    assert bank.protocol["weights_sha256"] == ex.weights_sha256
    assert np.allclose(bank.features, ex(imgs).numpy())
