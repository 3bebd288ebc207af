"""Feature statistics: ``.npz`` stats files, the content-keyed feature cache, and comparisons.

A stats file holds ``mu`` (D,) and ``sigma`` (D, D) in float64 — the layout of pytorch-fid's
``--save-stats`` and TTUR's files, which only read those two keys — plus, when we write it, ``n``,
the raw ``features`` (float32, so KID can be computed later) and ``protocol`` (a JSON string).
Files from pytorch-fid load here; files written here load in pytorch-fid.

The feature cache is keyed by the image set's *content* (sorted SHA-256s of the file bytes) and by
the extractor (weights SHA-256 + resize mode), so a reference set is embedded once, whatever its
folder or file names.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import UserError
from ..fileio import atomic_path

if TYPE_CHECKING:
    from .fid_result import FIDResult

CACHE_ENV_VAR = "FACEDIFFUSER_CACHE"
_CACHE_VERSION = 1


@dataclass
class FeatureStats:
    """Mean and covariance of a feature set (float64), with its N, features and protocol if known."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    features: np.ndarray | None = None
    protocol: dict | None = None
    source: str | None = field(default=None, compare=False)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features: Any, *, protocol: dict | None = None, source: str | None = None, keep_features: bool = True) -> "FeatureStats":
        """Unbiased (N-1) covariance in float64, like ``np.cov(rowvar=False)`` and pytorch-fid."""
        import torch

        f = np.asarray(features.numpy() if hasattr(features, "numpy") else features)
        if f.ndim != 2:
            raise UserError(f"features must be a 2-D array (N, D), got shape {f.shape}")
        if f.shape[0] < 2:
            raise UserError(f"{source or 'feature set'}: need at least 2 images to estimate a covariance for FID, got {f.shape[0]}")
        if not np.isfinite(f).all():
            raise UserError(f"{source or 'feature set'}: features contain NaN or infinite values")
        x = torch.from_numpy(np.ascontiguousarray(f)).to(torch.float64)
        mu = x.mean(0)
        xc = x - mu
        sigma = (xc.T @ xc) / (x.shape[0] - 1)
        proto = dict(protocol, n=int(f.shape[0])) if protocol is not None else None
        return cls(mu.numpy(), sigma.numpy(), int(f.shape[0]), f.astype(np.float32, copy=False) if keep_features else None, proto, source)


# --- files ----------------------------------------------------------------------------------------

def atomic_write_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    """``np.savez``, atomically (never half a file) and fsync'd: stats, banks and feature caches."""
    with atomic_path(path, fsync=True) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would otherwise append ".npz"
            np.savez(fh, **arrays)
    return Path(path)


def save_stats(stats: FeatureStats, path: str | os.PathLike, *, include_features: bool = True) -> Path:
    """Write a pytorch-fid-compatible stats file (``mu``, ``sigma``) with our extra keys."""
    arrays: dict[str, Any] = {"mu": np.asarray(stats.mu, dtype=np.float64), "sigma": np.asarray(stats.sigma, dtype=np.float64)}
    if stats.n is not None:
        arrays["n"] = np.asarray(stats.n, dtype=np.int64)
    if include_features and stats.features is not None:
        arrays["features"] = np.asarray(stats.features, dtype=np.float32)
    if stats.protocol is not None:
        arrays["protocol"] = np.asarray(json.dumps(stats.protocol, sort_keys=True))
    return atomic_write_npz(path, **arrays)


def load_stats(path: str | os.PathLike) -> FeatureStats:
    """Read ours, pytorch-fid's or TTUR's ``.npz`` (``mu``/``sigma``; or only ``features``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"stats file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            data = {k: z[k] for k in keys & {"mu", "sigma", "n", "features", "feats", "protocol"}}
    except (OSError, ValueError, EOFError) as exc:
        raise UserError(f"cannot read stats file {p}: {exc}") from None
    feats = data.get("features", data.get("feats"))
    if feats is not None and feats.ndim != 2:
        raise UserError(f"{p}: 'features' must be 2-D (N, D), got shape {feats.shape}")
    protocol = json.loads(str(data["protocol"])) if "protocol" in data else None
    if "mu" not in data or "sigma" not in data:
        if feats is None:
            raise UserError(f"{p} is not an FID stats file: it has no 'mu'/'sigma' (keys: {', '.join(sorted(keys)) or 'none'})")
        return FeatureStats.from_features(feats, protocol=protocol, source=str(p))
    mu, sigma = np.asarray(data["mu"], dtype=np.float64).reshape(-1), np.asarray(data["sigma"], dtype=np.float64)
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{p}: sigma has shape {sigma.shape} but mu has {mu.shape[0]} entries")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{p}: mu/sigma contain NaN or infinite values")
    if feats is not None and feats.shape[1] != mu.shape[0]:
        raise UserError(f"{p}: features have dimension {feats.shape[1]} but mu has {mu.shape[0]}")
    n = int(data["n"]) if "n" in data else (int(feats.shape[0]) if feats is not None else None)
    return FeatureStats(mu, sigma, n, feats, protocol, str(p))


def is_stats_file(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix.lower() == ".npz" and not p.is_dir()


# --- features of image folders, cached ------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$FACEDIFFUSER_CACHE`` or ``$XDG_CACHE_HOME/facediffuser`` (``~/.cache/facediffuser``), + /features."""
    root = os.environ.get(CACHE_ENV_VAR) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "facediffuser"
    return Path(root) / "features"


def folder_features(folder: str | os.PathLike, extractor, *, cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> tuple[np.ndarray, dict]:
    """Features (N, D) float32 of every image in ``folder`` (canonical content order) and the protocol.

    Looked up first in the cache by (image-set content, extractor); computed and stored otherwise.
    """
    from ..image_files import list_images
    from .images import image_set_digest

    files = list_images(folder)
    digest, files = image_set_digest(files)
    key = hashlib.sha256(f"v{_CACHE_VERSION}|{digest}|{extractor.cache_key}".encode()).hexdigest()[:40]
    cache_file = Path(cache_dir or default_cache_dir()) / f"{key}.npz"
    if use_cache and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                feats = z["features"]
            if feats.shape[0] == len(files):
                return feats, extractor.protocol(len(files)) | {"images_sha256": digest}
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a damaged cache entry is recomputed
    feats = extractor.features_from_files(files, desc=f"Inception {Path(folder).name}")
    protocol = extractor.protocol(len(files)) | {"images_sha256": digest}
    if use_cache:
        try:
            atomic_write_npz(cache_file, features=feats, protocol=np.asarray(json.dumps(protocol, sort_keys=True)))
        except OSError:
            pass  # a read-only cache folder must not fail the evaluation
    return feats, protocol


def stats_for(spec: str | os.PathLike, extractor_factory: Callable[[], Any], *, cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> FeatureStats:
    """A stats file (``.npz``) is loaded; a folder is embedded (via the cache). The extractor is
    built by ``extractor_factory`` only when a folder needs it (loading it takes seconds)."""
    p = Path(spec)
    if is_stats_file(p):
        return load_stats(p)
    if not p.exists():
        raise UserError(f"not found: {p} (expected a folder of images or a .npz stats file)")
    feats, protocol = folder_features(p, extractor_factory(), cache_dir=cache_dir, use_cache=use_cache)
    return FeatureStats.from_features(feats, protocol=protocol, source=str(p))


# --- comparing two sets ---------------------------------------------------------------------------

_PROTOCOL_KEYS = ("weights_sha256", "resize")


def protocol_mismatches(a: FeatureStats, b: FeatureStats) -> list[str]:
    """Human-readable warnings when the two sides were not embedded the same way (or unknown)."""
    out = []
    for s, name in ((a, "A"), (b, "B")):
        if not s.protocol:
            out.append(f"{name} ({s.source}) has no recorded protocol; make sure it used the same Inception weights and resize")
    if a.protocol and b.protocol:
        for k in _PROTOCOL_KEYS:
            if a.protocol.get(k) != b.protocol.get(k):
                out.append(f"A and B differ in {k}: {a.protocol.get(k)} vs {b.protocol.get(k)}; their FID is not meaningful")
    return out


def fid(a: FeatureStats, b: FeatureStats) -> float:
    """FID of two stats, choosing the N x N Gram route when a side has features with N < D."""
    from .frechet import frechet_distance, frechet_distance_gram

    if a.dim != b.dim:
        raise UserError(f"statistics have different dimensions: {a.dim} ({a.source}) vs {b.dim} ({b.source})")
    small = [s for s in (a, b) if s.features is not None and s.features.shape[0] < s.dim]
    if small:
        x = min(small, key=lambda s: s.features.shape[0])
        ref = b if x is a else a
        return frechet_distance_gram(x.features, ref.mu, ref.sigma)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def compare(
    a: FeatureStats,
    b: FeatureStats,
    *,
    kid_subsets: int | None = None,
    kid_subset_size: int | None = None,
    seed: int | None = None,
) -> "FIDResult":
    """FID (always with N) and, when both sides carry features, KID mean ± std; plus protocols."""
    from .fid_result import FIDResult, kid_std_or_none
    from .kid import DEFAULT_SEED, DEFAULT_SUBSET_SIZE, DEFAULT_SUBSETS, kid

    k = None
    if a.features is not None and b.features is not None:
        k = kid(a.features, b.features, subsets=kid_subsets or DEFAULT_SUBSETS,
                subset_size=kid_subset_size or DEFAULT_SUBSET_SIZE, seed=DEFAULT_SEED if seed is None else seed)
    return FIDResult(
        fid=fid(a, b), n_a=a.n, n_b=b.n,
        kid_mean=k.mean if k else None, kid_std=kid_std_or_none(k.std, k.subset_size, k.n1, k.n2) if k else None,
        kid_subsets=k.subsets if k else None, kid_subset_size=k.subset_size if k else None, kid_seed=k.seed if k else None,
        a=a.source, b=b.source, protocol_a=a.protocol, protocol_b=b.protocol, warnings=tuple(protocol_mismatches(a, b)),
    )
