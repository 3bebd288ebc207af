"""The extension in a real Automatic1111 / Forge: runs ``tools/check_webui.py`` against the web UI
checkout in ``$FACEDIFFUSER_WEBUI_DIR`` (with its venv); skipped when that is not set. The check
installs the committed HEAD of this repository, so commit before running it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WEBUI = os.environ.get("FACEDIFFUSER_WEBUI_DIR")

pytestmark = [pytest.mark.webui, pytest.mark.full_model,
              pytest.mark.skipif(not WEBUI, reason="set FACEDIFFUSER_WEBUI_DIR to a Forge/A1111 checkout with its venv")]


def test_extension_in_a_real_webui(tmp_path, sd15_full_checkpoint):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "check_webui.py"), "--webui", WEBUI,
                           "--data-dir", str(tmp_path / "data"), "--checkpoint", str(sd15_full_checkpoint)],
                          capture_output=True, text=True, timeout=3600)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "FAIL" not in proc.stdout
