"""The "FaceDiffuser: LoRA vs base" script's logic: the same N images with and without a LoRA,
both scored against real images, as a table, a bar chart and a side-by-side grid.

The adapter runs the web UI's own ``process_images`` twice with identical prompts, seeds,
sampler, steps, CFG and size -- once as the user wrote the prompt, once with ``<lora:NAME:W>``
appended -- so what is measured is the web UI's own LoRA loading and sampling. Everything here
works on features and PIL images, without a web UI:

* :func:`plan` -- N prompts (the prompt list cycled, or the UI's prompt) and N seeds;
* :func:`compare_sets` -- rows Real vs Base, Real vs LoRA, Base vs LoRA (FID, KID ± std, N/N);
* :func:`markdown_table`, :func:`bar_chart`, :func:`side_by_side` -- the three outputs;
* :func:`write_outputs` -- ``results.json``, ``table.md``, the chart and the grid, atomically.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import UserError

if TYPE_CHECKING:
    from ..evaluation.fid_result import FIDResult

ROW_NAMES = ("Real vs Base", "Real vs LoRA", "Base vs LoRA")
_LORA_NAME = re.compile(r"^[^<>:]+$")


@dataclass(frozen=True)
class Plan:
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    lora_prompts: tuple[str, ...]
    batch_size: int
    n_iter: int

    @property
    def n(self) -> int:
        return len(self.prompts)


def lora_tag(name: str, weight: float) -> str:
    """``<lora:NAME:W>`` -- the web UI's extra-network syntax (NAME = file name without extension)."""
    if not name or not _LORA_NAME.match(name):
        raise UserError(f"LoRA vs base: {name!r} is not a usable LoRA name (no '<', '>' or ':')")
    return f"<lora:{name}:{weight:g}>"


def plan(prompt_lines: str, ui_prompt: str, n: int, seed: int, batch_size: int, lora_name: str, weight: float) -> Plan:
    """N prompts (one per non-empty line of ``prompt_lines``, cycled; else the UI's prompt), seeds
    ``seed + i``, and the same prompts with the LoRA tag. The batch size is the user's when it
    divides N, else 1, so that exactly N images are made."""
    if n < 2:
        raise UserError(f"LoRA vs base: N must be at least 2 (FID needs 2 images per side), got {n}")
    lines = [line.strip() for line in str(prompt_lines or "").splitlines() if line.strip() and not line.strip().startswith("#")]
    if not lines:
        if not str(ui_prompt or "").strip():
            raise UserError("LoRA vs base: no prompt -- type one in the prompt box or list prompts in the script")
        lines = [str(ui_prompt).strip()]
    prompts = tuple(lines[i % len(lines)] for i in range(n))
    tag = lora_tag(lora_name, weight)
    bs = batch_size if batch_size >= 1 and n % batch_size == 0 else 1
    return Plan(prompts=prompts, seeds=tuple(int(seed) + i for i in range(n)),
                lora_prompts=tuple(f"{p} {tag}" for p in prompts), batch_size=bs, n_iter=n // bs)


def compare_sets(real: Any, base_features: Any, lora_features: Any, protocol: dict | None) -> "list[FIDResult]":
    """The three rows, labelled (:data:`ROW_NAMES`); ``real`` is the reference FeatureStats, the
    others (N, 2048) features."""
    from ..evaluation.stats import FeatureStats, compare

    n = int(base_features.shape[0])
    base = FeatureStats.from_features(base_features, protocol=protocol, source="base")
    lora = FeatureStats.from_features(lora_features, protocol=protocol, source="LoRA")
    if lora.n != n:
        raise UserError(f"LoRA vs base: {n} base images but {lora.n} LoRA images")
    pairs = ((base, real), (lora, real), (lora, base))
    return [compare(a, b).labelled(name) for name, (a, b) in zip(ROW_NAMES, pairs)]


def markdown_table(rows: "Sequence[FIDResult]", *, lora: str, weight: float, reference: str) -> str:
    lines = [f"| Comparison | N (A / B) | FID ↓ | KID (mean ± std) ↓ |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.n_a} / {r.n_b} | {r.fid:.4f} | {r.kid_text(digits=5)} |")
    lines.append("")
    lines.append(f"LoRA `{lora}` at weight {weight:g}; reference `{reference}`. Same prompts, seeds, sampler, steps, CFG "
                 "and size for both. FID is biased at small N: compare rows only at equal N.")
    warnings = sorted({w for r in rows for w in r.warnings})
    lines += [f"Warning: {w}" for w in warnings]
    return "\n".join(lines)


def bar_chart(rows: "Sequence[FIDResult]", *, title: str) -> "Any":
    """The project's one FID/KID bar chart (:func:`.evaluation.report.fid_bar_chart`) as a PIL image."""
    from PIL import Image

    from ..evaluation.report import fid_bar_chart

    return Image.fromarray(fid_bar_chart(list(rows), title=title, width=900, height=420))


def side_by_side(base: Sequence[Any], lora: Sequence[Any], *, rows: int = 8, cell: int = 192, lora_name: str = "LoRA") -> "Any":
    """Columns base | base + LoRA, one row per prompt/seed (the first ``rows`` pairs)."""
    from PIL import Image

    from ..trainer.progress_plots import image_grid

    k = max(1, min(rows, len(base), len(lora)))
    images, labels = [], []
    for i in range(k):
        for col, ims in (("base", base), (lora_name, lora)):
            images.append(ims[i].convert("RGB").resize((cell, cell), Image.Resampling.LANCZOS))
            labels.append(f"{col} #{i}")
    return image_grid(images, labels, cols=2)


def write_outputs(out_dir: str | os.PathLike, *, rows: "Sequence[FIDResult]", table: str, chart: Any, grid: Any,
                  settings: dict) -> dict[str, Path]:
    """``results.json`` (rows + settings), ``table.md``, ``fid_bar_chart.png``, ``side_by_side.png``."""
    from ..fileio import atomic_path, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, name, image in (("chart", "fid_bar_chart.png", chart), ("grid", "side_by_side.png", grid)):
        with atomic_path(out / name) as tmp:
            image.save(tmp, format="PNG")
        paths[key] = out / name
    paths["table"] = atomic_write_text(out / "table.md", table + "\n")
    paths["results"] = atomic_write_text(out / "results.json", json.dumps({"rows": [r.to_dict() for r in rows], "settings": settings}, indent=2, default=str) + "\n")
    return paths
