"""Shared test set-up. Fixture families live in their own modules (imported below) so that each
area of the code owns its fixtures: models (random SD checkpoints), inception (a random-weight
Inception file), comfyui (a real ComfyUI server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def test_cache_dir() -> Path:
    """Artefacts that are expensive to build (full-size checkpoints, ComfyUI) and safe to reuse
    across test sessions: they are keyed by content/version in their file names."""
    d = Path(os.environ.get("FACEDIFFUSER_TEST_CACHE", REPO_ROOT / ".cache" / "tests"))
    d.mkdir(parents=True, exist_ok=True)
    return d


from fixtures_models import *  # noqa: E402,F401,F403
from fixtures_inception import *  # noqa: E402,F401,F403
from fixtures_comfyui import *  # noqa: E402,F401,F403
from fixtures_faces import *  # noqa: E402,F401,F403
