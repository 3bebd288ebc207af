"""KID against a plain O(N^2) double-loop reference and against torch-fidelity's own KID."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facediffuser.errors import UserError
from facediffuser.evaluation import kid as kid_mod
from facediffuser.evaluation.kid import kid


def _reference_mmd2(x, y):
    """Unbiased MMD^2 with k(a,b) = (a.b/d + 1)^3, written out with loops in float64."""
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_matches_loop_reference_when_subset_is_everything():
    rng = np.random.default_rng(0)
    x, y = rng.random((15, 6)), rng.random((15, 6)) + 0.2
    res = kid(x, y, subsets=3, subset_size=100)
    assert res.subset_size == 15 and res.std == pytest.approx(0.0, abs=1e-15)
    assert res.mean == pytest.approx(_reference_mmd2(x, y), rel=1e-12, abs=1e-15)


def test_subsets_match_loop_reference_with_torch_fidelity_sampling():
    rng = np.random.default_rng(1)
    x, y = rng.random((30, 5)), rng.random((25, 5)) * 1.1
    res = kid(x, y, subsets=4, subset_size=10, seed=7)
    draw = np.random.RandomState(7)
    vals = [_reference_mmd2(x[draw.choice(30, 10, replace=False)], y[draw.choice(25, 10, replace=False)]) for _ in range(4)]
    assert res.mean == pytest.approx(np.mean(vals), rel=1e-12)
    assert res.std == pytest.approx(np.std(vals), rel=1e-10)


def test_equals_torch_fidelity_kid(monkeypatch):
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(2)
    x = rng.random((120, 64)).astype(np.float32)
    y = (rng.random((100, 64)) * 1.05).astype(np.float32)
    ref = kid_features_to_metric(torch.from_numpy(x).double(), torch.from_numpy(y).double(), kid_subsets=20, kid_subset_size=50,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1, rng_seed=2020, verbose=False)
    ours = kid(x, y, subsets=20, subset_size=50)
    assert ours.mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
    assert ours.std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9)
    monkeypatch.setattr(kid_mod, "_GRAM_BUDGET_BYTES", 0)  # the per-subset path gives the same
    per_subset = kid(x, y, subsets=20, subset_size=50)
    assert per_subset.mean == pytest.approx(ours.mean, rel=1e-12)


def test_unbiased_near_zero_for_same_distribution_and_errors():
    rng = np.random.default_rng(3)
    res = kid(rng.random((200, 16)), rng.random((200, 16)), subsets=30, subset_size=100, seed=0)
    assert abs(res.mean) < 3 * res.std + 1e-6
    assert kid(rng.random((5, 16)), rng.random((5, 16)), subsets=2).n1 == 5
    with pytest.raises(UserError, match="at least 2 images"):
        kid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(UserError, match="different dimensions: 4 vs 5"):
        kid(np.zeros((3, 4)), np.zeros((3, 5)))
