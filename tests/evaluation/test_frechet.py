"""Fréchet distance against scipy's sqrtm, closed forms, pytorch-fid, and its own Gram route."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg

from facediffuser.errors import UserError
from facediffuser.evaluation.frechet import frechet_distance, frechet_distance_gram, psd_sqrt, trace_sqrt_product


def _stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


def _scipy_fd(m1, s1, m2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("d", [8, 64, 200])
def test_matches_scipy_sqrtm_on_random_spd(d):
    rng = np.random.default_rng(d)
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _spd(rng, d), _spd(rng, d)
    ours, ref = frechet_distance(m1, s1, m2, s2), _scipy_fd(m1, s1, m2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


@pytest.mark.parametrize("n", [20, 60])
def test_rank_deficient_n_below_d_matches_scipy_and_gram(n):
    rng = np.random.default_rng(n)
    d = 128
    x = rng.standard_normal((n, d)) * rng.random(d) + 0.3
    y = rng.standard_normal((n + 7, d)) * rng.random(d)
    (m1, s1), (m2, s2) = _stats(x), _stats(y)
    ours = frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(ours)
    ref = _scipy_fd(m1, s1, m2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    gram = frechet_distance_gram(x, m2, s2)
    assert abs(gram - ours) <= 1e-8 * abs(ours)
    # exact identity: tr sqrt(S1 S2) = nuclear norm of Xc1 Xc2^T
    xc = (x - m1) / np.sqrt(n - 1)
    yc = (y - m2) / np.sqrt(len(y) - 1)
    nuc = np.linalg.svd(xc @ yc.T, compute_uv=False).sum()
    assert abs(trace_sqrt_product(s1, s2) - nuc) <= 1e-8 * nuc


def test_closed_form_on_diagonal_covariances():
    rng = np.random.default_rng(3)
    d = 300
    a, b = rng.random(d) * 5, rng.random(d) * 2
    a[:50] = 0.0  # singular too
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = float(((m1 - m2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum())
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # a common rotation must not matter
    for r in (np.eye(d), q):
        got = frechet_distance(r @ m1, r @ np.diag(a) @ r.T, r @ m2, r @ np.diag(b) @ r.T)
        assert abs(got - expected) <= 1e-9 * expected


def test_equals_pytorch_fid_on_same_stats():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(5)
    d = 256
    (m1, s1), (m2, s2) = _stats(rng.standard_normal((400, d)) + 0.1), _stats(rng.standard_normal((300, d)) * 1.3)
    with warnings.catch_warnings():  # scipy 1.17 deprecates sqrtm(disp=False), which pytorch-fid passes
        warnings.simplefilter("ignore", DeprecationWarning)
        ref = calculate_frechet_distance(m1, s1, m2, s2)
    ours = frechet_distance(m1, s1, m2, s2)
    print(f"pytorch-fid calculate_frechet_distance rel. diff {abs(ours - ref) / ref:.2e}")
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_properties_and_errors():
    rng = np.random.default_rng(9)
    m, s = _stats(rng.standard_normal((30, 40)))  # rank 29 < 40
    assert abs(frechet_distance(m, s, m, s)) < 1e-8
    m2, s2 = _stats(rng.standard_normal((50, 40)))
    assert abs(frechet_distance(m, s, m2, s2) - frechet_distance(m2, s2, m, s)) < 1e-9 * frechet_distance(m, s, m2, s2)
    r = psd_sqrt(s2).numpy()
    assert np.allclose(r @ r, s2, atol=1e-10)
    assert frechet_distance(m, s, m2, s2, sqrt_sigma1=psd_sqrt(s)) == pytest.approx(frechet_distance(m, s, m2, s2), rel=1e-12)
    with pytest.raises(UserError, match="different dimensions: 40 vs 8"):
        frechet_distance(m, s, np.zeros(8), np.eye(8))
    bad = s.copy()
    bad[0, 0] = np.nan
    with pytest.raises(UserError, match="NaN"):
        frechet_distance(m, bad, m, s)
