"""Kernel Inception Distance: the unbiased MMD^2 with the cubic polynomial kernel, float64.

``k(x, y) = (gamma x.y + coef0)^degree`` with ``gamma = 1/D``, ``coef0 = 1``, ``degree = 3``
(Bińkowski et al. 2018). Averaged over random subsets, reported as mean ± std. Subsets are drawn
exactly as torch-fidelity draws them (``np.random.RandomState(seed)``, then per subset
``choice(n1, m)`` and ``choice(n2, m)`` without replacement), so equal seeds give equal numbers;
the default seed is torch-fidelity's (2020). Unlike FID, KID has no small-N bias.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import UserError

#: one definition of the KID defaults, used by the maths, the CLI, the nodes and the table
DEFAULT_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 1000
DEFAULT_SEED = 2020
_GRAM_BUDGET_BYTES = 512 * 2**20  # precompute whole kernel matrices below this size


@dataclass(frozen=True)
class KIDResult:
    mean: float
    std: float
    subsets: int
    subset_size: int
    n1: int
    n2: int
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.6g} ± {self.std:.2g} ({self.subsets} subsets of {self.subset_size})"


def polynomial_kernel(x: Any, y: Any, *, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> "torch.Tensor":  # noqa: F821
    """``(gamma x y^T + coef0)^degree`` in float64."""
    import torch

    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    g = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * g + coef0) ** degree


def mmd2_unbiased(k_xx: "torch.Tensor", k_xy: "torch.Tensor", k_yy: "torch.Tensor") -> float:  # noqa: F821
    """Unbiased MMD^2 from kernel blocks: off-diagonal means of K_xx, K_yy minus 2 mean K_xy."""
    m, n = k_xx.shape[0], k_yy.shape[0]
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * k_xy.mean())


def kid(
    features1: Any,
    features2: Any,
    *,
    subsets: int = DEFAULT_SUBSETS,
    subset_size: int = DEFAULT_SUBSET_SIZE,
    seed: int = DEFAULT_SEED,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
) -> KIDResult:
    """KID mean ± std over ``subsets`` random subsets of ``min(subset_size, n1, n2)`` per side."""
    import numpy as np
    import torch

    x = torch.as_tensor(np.asarray(features1), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(features2), dtype=torch.float64)
    if x.dim() != 2 or y.dim() != 2:
        raise UserError(f"KID needs 2-D feature arrays, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise UserError(f"features have different dimensions: {x.shape[1]} vs {y.shape[1]}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise UserError("features contain NaN or infinite values")
    n1, n2 = x.shape[0], y.shape[0]
    m = min(subset_size, n1, n2)
    if m < 2:
        raise UserError(f"KID needs at least 2 images per side (got {n1} and {n2})")
    if subsets < 1:
        raise UserError(f"KID needs at least one subset (got {subsets})")
    kern = dict(degree=degree, gamma=1.0 / x.shape[1] if gamma is None else gamma, coef0=coef0)

    rng = np.random.RandomState(seed)
    # Whole kernel matrices once when they are small and subsets overlap; else per subset.
    whole = (n1 + n2) ** 2 * 8 <= _GRAM_BUDGET_BYTES and (n1 + n2) ** 2 < 3 * subsets * m * m
    if whole:
        k_xx, k_yy, k_xy = polynomial_kernel(x, x, **kern), polynomial_kernel(y, y, **kern), polynomial_kernel(x, y, **kern)
    values = np.empty(subsets)
    for i in range(subsets):
        ix = torch.from_numpy(rng.choice(n1, m, replace=False))
        iy = torch.from_numpy(rng.choice(n2, m, replace=False))
        if whole:
            values[i] = mmd2_unbiased(k_xx[ix][:, ix], k_xy[ix][:, iy], k_yy[iy][:, iy])
        else:
            xs, ys = x[ix], y[iy]
            values[i] = mmd2_unbiased(polynomial_kernel(xs, xs, **kern), polynomial_kernel(xs, ys, **kern), polynomial_kernel(ys, ys, **kern))
    return KIDResult(float(values.mean()), float(values.std()), subsets, m, n1, n2, seed)
