"""Random SD checkpoints for tests, made by ``facediffuser make-model`` and cached per session.

Files are cached in ``test_cache_dir`` under names keyed by arch, size, seed, dtype and the
make-model layout version, so a cache from an older layout is never reused. They are written
atomically, so two pytest processes sharing a cache at worst build the same file twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = [
    "cached_checkpoint",
    "sd15_tiny_checkpoint",
    "sd2_tiny_checkpoint",
    "sd15_full_checkpoint",
    "sd2_full_checkpoint",
]


def cached_checkpoint(cache_dir: Path, arch: str, size: str, *, seed: int = 0, dtype: str = "fp32") -> Path:
    """Build (once) and return a make-model checkpoint in ``cache_dir``."""
    from facediffuser.sd.make_model import LAYOUT_VERSION, make_checkpoint

    path = Path(cache_dir) / "models" / f"{arch}-{size}-seed{seed}-{dtype}-layout{LAYOUT_VERSION}.safetensors"
    if not path.is_file():
        make_checkpoint(path, arch=arch, size=size, dtype=dtype, seed=seed)
    return path


@pytest.fixture(scope="session")
def sd15_tiny_checkpoint(test_cache_dir: Path) -> Path:
    """SD1.5 block types and names, tiny widths, fp32, seed 0 (about 15 MB)."""
    return cached_checkpoint(test_cache_dir, "sd15", "tiny")


@pytest.fixture(scope="session")
def sd2_tiny_checkpoint(test_cache_dir: Path) -> Path:
    """SD2 (OpenCLIP text encoder, linear projections) with tiny widths, fp32, seed 0."""
    return cached_checkpoint(test_cache_dir, "sd2", "tiny")


@pytest.fixture(scope="session")
def sd15_full_checkpoint(test_cache_dir: Path) -> Path:
    """Exactly the SD1.5 architecture, fp16, seed 0 (2.1 GB; ~40 s to build on 2 cores)."""
    return cached_checkpoint(test_cache_dir, "sd15", "full", dtype="fp16")


@pytest.fixture(scope="session")
def sd2_full_checkpoint(test_cache_dir: Path) -> Path:
    """Exactly the SD2 (512 base) architecture, fp16, seed 0 (2.6 GB)."""
    return cached_checkpoint(test_cache_dir, "sd2", "full", dtype="fp16")
