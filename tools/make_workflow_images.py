#!/usr/bin/env python3
"""Make the README screenshots and the template thumbnails from the browser test's screenshots.

tests/nodes/test_browser_workflows.py loads each ``workflows/<name>.json`` in ComfyUI's real
frontend and saves ``<name>.png`` (the whole graph) and ``<name>.thumb.png`` (its FaceDiffuser
nodes, squared) under ``$FACEDIFFUSER_TEST_ARTIFACTS/browser/<frontend>/``. This script turns
them into what the repository ships:

- ``docs/images/workflow_<name>.webp`` -- the README's pictures (at most 1600 px wide);
- ``workflows/<name>.jpg`` -- the thumbnail ComfyUI's *Browse Templates* shows for a custom-node
  template (today's frontend asks for ``/api/workflow_templates/<pack>/<name>.jpg``: same stem as
  the JSON, JPEG only), 512 x 512.

Usage::

    python tools/make_workflow_images.py .cache/tests/artifacts/browser/frontend-1.27.10
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted(p.stem for p in (REPO_ROOT / "workflows").glob("*.json"))
README_WIDTH = 1600
THUMB_SIDE = 512
MAX_BYTES = 150_000


def _encode(im, fmt: str, quality: int, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, quality=quality, **kw)
    return buf.getvalue()


def _smallest_under(im, fmt: str, qualities: tuple[int, ...], **kw) -> bytes:
    """The best quality that stays under MAX_BYTES (the last one if none does)."""
    for q in qualities:
        data = _encode(im, fmt, q, **kw)
        if len(data) <= MAX_BYTES:
            return data
    return data


def make_images(src: Path, docs_dir: Path, workflow_dir: Path) -> list[tuple[Path, int]]:
    from PIL import Image

    written = []
    for name in WORKFLOWS:
        shot, thumb = src / f"{name}.png", src / f"{name}.thumb.png"
        for p in (shot, thumb):
            if not p.is_file():
                raise SystemExit(f"error: {p} is missing: run tests/nodes/test_browser_workflows.py first")
        with Image.open(shot) as im:
            im = im.convert("RGB")
            if im.width > README_WIDTH:
                im = im.resize((README_WIDTH, round(im.height * README_WIDTH / im.width)), Image.LANCZOS)
            data = _smallest_under(im, "WEBP", (85, 80, 75, 70, 60), method=6)
        out = docs_dir / f"workflow_{name}.webp"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        written.append((out, len(data)))
        with Image.open(thumb) as im:
            im = im.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.LANCZOS)
            data = _smallest_under(im, "JPEG", (88, 82, 75), optimize=True, progressive=True)
        out = workflow_dir / f"{name}.jpg"
        out.write_bytes(data)
        written.append((out, len(data)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("screenshots", type=Path, help="the browser test's artefact folder for one frontend")
    parser.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs" / "images")
    parser.add_argument("--workflow-dir", type=Path, default=REPO_ROOT / "workflows")
    args = parser.parse_args(argv)
    for path, size in make_images(args.screenshots, args.docs_dir, args.workflow_dir):
        print(f"{path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path}: {size / 1000:.0f} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
