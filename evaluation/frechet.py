"""Fréchet distance between Gaussians, in float64, real arithmetic only.

``FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)``. The trace term is computed on symmetric
matrices so that ``eigh``/``eigvalsh`` apply (no complex numbers, no NaN on rank-deficient
covariances, ~4x faster than ``scipy.linalg.sqrtm`` at D = 2048):

- stats route: ``R = S1^(1/2)`` from ``eigh(S1)``; ``tr sqrt(S1 S2) = sum sqrt(eigvalsh(R S2 R))``
  (``R S2 R`` is similar to ``S1 S2`` and PSD);
- Gram route, when one side has raw features X (N < D): with ``Xc = (X - mean) / sqrt(N-1)``,
  ``S2 = Xc^T Xc`` and ``tr sqrt(S1 S2) = sum sqrt(eigvalsh(Xc S1 Xc^T))``, an N x N problem.
Rounding-level negative eigenvalues are clamped to 0; FD of a set with itself may come out as a
tiny negative number (~-1e-10), as in every implementation.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError


def _as64(x: Any, name: str):
    import torch

    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise UserError(f"{name} contains NaN or infinite values")
    return t


def _check(mu1, sigma1, mu2, sigma2) -> None:
    for mu, sigma, side in ((mu1, sigma1, "first"), (mu2, sigma2, "second")):
        if mu.dim() != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UserError(f"{side} statistics are malformed: mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)} (need (D,) and (D, D))")
    if mu1.shape[0] != mu2.shape[0]:
        raise UserError(f"statistics have different dimensions: {mu1.shape[0]} vs {mu2.shape[0]} (different feature layers or extractors?)")


def psd_sqrt(sigma: Any) -> "torch.Tensor":  # noqa: F821
    """Symmetric PSD square root (float64) via ``eigh``; negative rounding eigenvalues -> 0."""
    import torch

    s = _as64(sigma, "covariance")
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * _zero_noise(w).sqrt()) @ v.T


def _zero_noise(w):
    """Eigenvalues below the rounding level of ``eigh`` (D * eps * max) are zeros of a singular
    (N < D) covariance; their sqrt would add ~1e-8 each, i.e. ~1e-6 to FD at D = 2048."""
    import torch

    thr = w.abs().max() * w.shape[0] * torch.finfo(torch.float64).eps
    return torch.where(w > thr, w, torch.zeros_like(w))


def _sum_sqrt_eig(m) -> float:
    import torch

    return float(_zero_noise(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum())


def trace_sqrt_product(sigma1: Any, sigma2: Any, *, sqrt_sigma1: Any = None) -> float:
    """``tr sqrt(S1 S2)`` by the symmetric route; pass ``sqrt_sigma1`` to reuse a reference's root."""
    r = psd_sqrt(sigma1) if sqrt_sigma1 is None else _as64(sqrt_sigma1, "sqrt_sigma1")
    s2 = _as64(sigma2, "covariance")
    return _sum_sqrt_eig(r @ s2 @ r)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, *, sqrt_sigma1: Any = None) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2), float64; accepts numpy arrays or tensors."""
    m1, s1, m2, s2 = _as64(mu1, "mu"), _as64(sigma1, "sigma"), _as64(mu2, "mu"), _as64(sigma2, "sigma")
    _check(m1, s1, m2, s2)
    diff = m1 - m2
    tr = trace_sqrt_product(s1, s2, sqrt_sigma1=sqrt_sigma1)
    return float(diff @ diff + _trace(s1) + _trace(s2) - 2.0 * tr)


def _trace(s) -> float:
    return float(s.diagonal().sum())


def frechet_distance_gram(features: Any, mu_ref: Any, sigma_ref: Any) -> float:
    """FD between raw ``features`` (N, D) and N(mu_ref, sigma_ref), via an N x N eigenproblem.

    Exact (not an approximation) for any N >= 2; fastest when N < D. The covariance of ``features``
    is the unbiased one (N - 1), as ``np.cov`` and pytorch-fid use.
    """
    x = _as64(features, "features")
    m_ref, s_ref = _as64(mu_ref, "mu"), _as64(sigma_ref, "sigma")
    if x.dim() != 2 or x.shape[0] < 2:
        raise UserError(f"need at least 2 feature vectors for a covariance, got shape {tuple(x.shape)}")
    mu = x.mean(0)
    if x.shape[1] != m_ref.shape[0] or s_ref.shape != (m_ref.shape[0], m_ref.shape[0]):
        raise UserError(f"statistics have different dimensions: features D={x.shape[1]} vs reference mu {tuple(m_ref.shape)}, sigma {tuple(s_ref.shape)}")
    xc = (x - mu) / (x.shape[0] - 1) ** 0.5
    diff = mu - m_ref
    tr = _sum_sqrt_eig(xc @ s_ref @ xc.T)
    return float(diff @ diff + _trace(s_ref) + float((xc * xc).sum()) - 2.0 * tr)
