"""docs/internals.md lists every module of the package and every top-level entry of the tree, and
the repository refers to no file outside itself."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "internals.md"
PACKAGES = ("sd", "trainer", "faces", "evaluation", "demo", "nodes", "sdwebui", "scripts")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return out.splitlines()


def test_every_package_module_and_tool_is_in_internals_md():
    text = DOC.read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w/.-]+\.py)`", text))
    modules = [p.relative_to(ROOT).as_posix() for p in sorted(ROOT.glob("*.py"))]
    modules += [p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))
                if p.name != "__init__.py" or pkg == "nodes"]
    modules += [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "tools").glob("*.py"))]
    missing = [m for m in modules if m not in named]
    assert not missing, f"docs/internals.md does not list: {', '.join(missing)}"
    gone = sorted(n for n in named if "/" in n and not n.startswith("tests/") and not (ROOT / n).exists())
    assert not gone, f"docs/internals.md lists modules that do not exist: {', '.join(gone)}"


def test_where_things_live_table_matches_the_top_level_of_the_tree():
    table = DOC.read_text(encoding="utf-8").split("## Where things live", 1)[1].split("\n## ", 1)[0]
    listed = {name.rstrip("/").split("/")[0] for name in re.findall(r"^\| `([^`]+)`", table, re.M)}
    listed |= {name.split("/")[0] for name in re.findall(r"`([^`]+)`", table)}  # rows naming several entries
    top = {path.split("/")[0] for path in _tracked()}
    assert top <= listed, f"not in the where-things-live table: {sorted(top - listed)}"


def test_nothing_refers_to_files_outside_the_repository():
    pattern = re.compile(r"\.\./shared|DESIGN\.md|research/[\w-]+\.md|/work/")
    hits = []
    for rel in _tracked():
        p = ROOT / rel
        if p.suffix not in (".py", ".md", ".toml", ".txt", ".json", ".yaml", ".yml", "") or not p.is_file():
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits += [f"{rel}:{i}" for i, line in enumerate(text.splitlines(), 1) if pattern.search(line) and rel != "tests/test_internals_doc.py"]
    assert not hits, hits
