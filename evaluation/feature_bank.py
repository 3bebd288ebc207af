"""A persistent, growing set of Inception features, compared against a reference.

The ComfyUI node feeds it the generated batches of successive queue runs; the bank remembers them
on disk (one ``.npz``, written atomically after every change) until ``reset()``. Each image may
carry a key (its content hash by default), so re-running a cached prompt does not count the same
image twice. The bank records the extractor protocol of its first batch and refuses features made
another way. Its seed is the KID subset seed, so the same bank gives the same KID.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError
from .fid_result import FIDResult
from .kid import DEFAULT_SEED
from .stats import FeatureStats, atomic_write_npz, compare

_PROTOCOL_KEYS = ("weights_sha256", "resize")


def image_keys(images_uint8_nchw) -> list[str]:
    """Content hash per image (SHA-256 of its uint8 pixels and shape): dedup keys for a bank."""
    arr = np.ascontiguousarray(np.asarray(images_uint8_nchw))
    return [hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest() for a in arr]


class FeatureBank:
    """Features (N, D) float32 accumulated batch by batch; optionally backed by a file."""

    def __init__(self, path: str | os.PathLike | None = None, *, seed: int = DEFAULT_SEED, protocol: dict | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.seed = int(seed)
        self.protocol = _core(protocol)
        self._chunks: list[np.ndarray] = []
        self._keys: list[str] = []
        self._key_set: set[str] = set()
        self._n = 0

    # --- persistence --------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, seed: int | None = None, protocol: dict | None = None) -> "FeatureBank":
        """Load the bank at ``path`` if the file exists, else start an empty one that saves there."""
        p = Path(path)
        if not p.exists():
            return cls(p, seed=DEFAULT_SEED if seed is None else seed, protocol=protocol)
        try:
            with np.load(p, allow_pickle=False) as z:
                feats = z["features"]
                keys = [str(k) for k in z["keys"]] if "keys" in z.files else []
                stored_seed = int(z["seed"]) if "seed" in z.files else DEFAULT_SEED
                stored_protocol = json.loads(str(z["protocol"])) if "protocol" in z.files else None
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise UserError(f"cannot read feature bank {p}: {exc}") from None
        if feats.ndim != 2:
            raise UserError(f"feature bank {p} is malformed: features have shape {feats.shape}")
        bank = cls(p, seed=stored_seed if seed is None else seed, protocol=stored_protocol)
        if protocol is not None:
            bank._check_protocol(protocol)
        if len(feats):
            bank._chunks.append(np.asarray(feats, dtype=np.float32))
        bank._n = int(feats.shape[0])
        bank._keys = keys if len(keys) == bank._n else [""] * bank._n
        bank._key_set = {k for k in bank._keys if k}
        return bank

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the bank (atomically) to ``path`` or its own file."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise UserError("this feature bank has no file: pass a path to save()")
        arrays: dict[str, Any] = {
            "features": self.features,
            "keys": np.asarray(self._keys, dtype=str) if self._keys else np.zeros((0,), dtype="<U1"),
            "seed": np.asarray(self.seed, dtype=np.int64),
        }
        if self.protocol is not None:
            arrays["protocol"] = np.asarray(json.dumps(self.protocol, sort_keys=True))
        return atomic_write_npz(target, **arrays)

    def reset(self) -> None:
        """Forget every feature (and the protocol); saves the empty bank if it has a file."""
        self._chunks, self._keys, self._key_set, self._n, self.protocol = [], [], set(), 0, None
        if self.path is not None:
            self.save()

    # --- filling ------------------------------------------------------------------------------
    def _check_protocol(self, protocol: dict | None) -> None:
        core = _core(protocol)
        if core is None:
            return
        if self.protocol is None:
            self.protocol = core
        elif any(self.protocol.get(k) != core.get(k) for k in _PROTOCOL_KEYS):
            raise UserError(
                f"feature bank {self.path or ''} holds features made with {self.protocol}, not {core}; reset it or use another bank"
            )

    def add(self, features: Any, *, keys: Sequence[str] | None = None, protocol: dict | None = None) -> int:
        """Append features (B, D); rows whose key is already in the bank are skipped. Returns how
        many were added; saves the bank if it has a file."""
        f = np.asarray(features.detach().cpu().numpy() if hasattr(features, "detach") else features, dtype=np.float32)
        if f.ndim != 2:
            raise UserError(f"features must be 2-D (B, D), got shape {f.shape}")
        if self._n and f.shape[1] != self.dim:
            raise UserError(f"features have dimension {f.shape[1]} but the bank holds {self.dim}-d features")
        if not np.isfinite(f).all():
            raise UserError("features contain NaN or infinite values")
        if keys is not None and len(keys) != len(f):
            raise UserError(f"{len(keys)} keys for {len(f)} feature rows")
        self._check_protocol(protocol)
        keep = []
        for i in range(len(f)):
            k = keys[i] if keys is not None else ""
            if k and k in self._key_set:
                continue
            if k:
                self._key_set.add(k)
            self._keys.append(k)
            keep.append(i)
        if keep:
            self._chunks.append(f[keep])
            self._n += len(keep)
        if self.path is not None:
            self.save()
        return len(keep)

    def add_images(self, images: Any, extractor, *, dedup: bool = True) -> int:
        """Embed images (uint8 NCHW or ComfyUI float NHWC) with ``extractor`` and add them."""
        from .images import to_uint8_nchw

        x = to_uint8_nchw(images)
        keys = image_keys(x.numpy()) if dedup else None
        if keys is not None and all(k in self._key_set for k in keys):
            return 0  # nothing new: skip the Inception forward
        return self.add(extractor(x), keys=keys, protocol=extractor.protocol())

    # --- reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def dim(self) -> int | None:
        return int(self._chunks[0].shape[1]) if self._chunks else None

    @property
    def features(self) -> np.ndarray:
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else np.zeros((0, 0), dtype=np.float32)

    def stats(self) -> FeatureStats:
        proto = dict(self.protocol) if self.protocol is not None else None
        return FeatureStats.from_features(self.features, protocol=proto, source=str(self.path) if self.path else "feature bank")

    def compare(self, reference: FeatureStats, *, kid_subsets: int | None = None, kid_subset_size: int | None = None) -> "FIDResult":
        """FID (with N) and KID ± std of the bank against a reference (stats file / folder stats)."""
        return compare(self.stats(), reference, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=self.seed)

    def fid(self, reference: FeatureStats) -> float:
        from .stats import fid

        return fid(self.stats(), reference)

    def kid(self, reference: FeatureStats, **kwargs: Any):
        from .kid import kid

        if reference.features is None:
            raise UserError(f"KID needs the reference's features; {reference.source} has only mu/sigma (re-create it with `facediffuser eval stats`)")
        return kid(self.features, reference.features, seed=self.seed, **kwargs)


def _core(protocol: dict | None) -> dict | None:
    """The part of a protocol that must agree between batches (no N, no versions)."""
    if protocol is None:
        return None
    drop = {"n", "images_sha256", "torch"}
    return {k: v for k, v in protocol.items() if k not in drop}
