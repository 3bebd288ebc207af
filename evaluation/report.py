"""The evaluation table's files (``results.json``, ``table.md``, ``fid_bar_chart.png``,
``samples_grid.png``) and the one FID/KID bar chart (:func:`fid_bar_chart`), which the table, the
demo and the ComfyUI FID Compare node all draw.

All four files are written atomically (temp file in the same folder, then ``os.replace``), so a
viewer watching the folder, or a crash, never sees half a file. Every picture and table carries N
and, when the caller said the features are not the FID Inception's (``features_caveat``, e.g. the
demo's stand-in), calls the distance FD, not FID, and says why in its title.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import UserError
from ..fileio import atomic_write_png, atomic_write_text
from .fid_result import FIDResult

if TYPE_CHECKING:
    import numpy as np

RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
CHART_FILE = "fid_bar_chart.png"
GRID_FILE = "samples_grid.png"


def write_results_json(results: dict[str, Any], out: Path) -> Path:
    return atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")


def _rows(results: dict[str, Any]) -> list[FIDResult]:
    return [FIDResult.from_dict(r) for r in results["rows"]]


def _metric(results: dict[str, Any]) -> str:
    """FID, or FD when the caller said the features are not the FID Inception's."""
    return "FD" if results.get("features_caveat") else "FID"


def _kid_sentence(rows: list[FIDResult]) -> str:
    r = rows[0]
    text = f"KID is unbiased (its std is over {r.kid_subsets} random subsets of {r.kid_subset_size} per side)"
    if any(row.kid_std is None for row in rows):
        text += ("; the std is n/a where the subset size equals N on both sides: every subset is then the whole set, "
                 "so there is no spread to report")
    return text + "."


def markdown_table(results: dict[str, Any]) -> str:
    """The table plus everything needed to read it: N, protocol, sampler settings, warnings."""
    lines: list[str] = []
    caveat = results.get("features_caveat")
    metric = f"Fréchet distance ({caveat['label']}, not FID)" if caveat else "FID"
    rows = _rows(results)
    lines.append(f"# Base vs fine-tuned vs held-out real: {metric} and KID")
    lines.append("")
    for w in results.get("warnings", []):
        lines.append(f"> **Warning:** {w}")
        lines.append("")
    lines.append(f"| Comparison | N (A / B) | {_metric(results)} ↓ | KID ×10³ (mean ± std) ↓ |")
    lines.append("|---|---|---|---|")
    for r in rows:
        lines.append(f"| {r.label} | {r.n_a} / {r.n_b} | {r.fid:.2f} | {r.kid_text(scale=1e3, digits=2)} |")
    lines.append("")
    lines.append("FID is biased at small N (it shrinks roughly like 1/N), so compare rows only at equal N and read them "
                 "against the Real-vs-Real noise floor. " + _kid_sentence(rows))
    for n in results.get("notes", []):
        lines.append(f"- {n}")
    lines.append("")
    p = results["protocol"]
    g = results["generation"]["base"]["settings"]
    lines.append("## Protocol")
    lines.append(f"- features: {p.get('extractor')}; weights `{p.get('weights')}` sha256 `{p.get('weights_sha256')}`; "
                 f"resize `{p.get('resize')}` ({p.get('resize_description', '')})")
    lines.append(f"- sampling, identical for both models: sampler `{g['sampler']}`, {g['steps']} steps, CFG {g['cfg']}, "
                 f"{g['size']}×{g['size']} px, seeds {results['seeds'][0]}…{results['seeds'][-1]} (image i: seed + i), "
                 f"negative prompt {g['negative_prompt']!r}")
    lines.append(f"- prompts ({len(results['prompts'])}, from {results['prompt_source']}): "
                 + "; ".join(f"`{x}`" for x in results["prompts"][:5]) + (" …" if len(results["prompts"]) > 5 else ""))
    lines.append(f"- model `{results['inputs']['model']}`; LoRA `{results['inputs']['lora']}` at scale {results['inputs']['lora_scale']}")
    ov = results["overlap"]
    lines.append(f"- real set `{results['inputs']['real']}` ({results['inputs']['n_real_images']} images): "
                 + (f"checked against the LoRA's {ov.get('n_training_images')} training images, {ov['n_overlap']} overlap"
                    if ov["checked"] else "NOT checked for overlap (the LoRA does not record its training images)"))
    faces = results.get("face_metrics")
    if faces:
        lines.append("")
        lines.append("## Face metrics")
        lines.append(f"Detector: {faces.get('detector', 'mtcnn')} (score ≥ {faces.get('min_score', 0.9)}). Detection rate = share of "
                     "images with exactly one face. W1 = 1-Wasserstein distance to the real set's distribution of the largest "
                     "face's size (fraction of the image side), centre x/y (fraction of width/height) and roll (degrees); "
                     "n/a where a set has fewer than 2 detected faces.")
        lines.append("")
        lines.append("| Set | N | detection rate (one face) | any face | face size W1 | centre-x W1 | centre-y W1 | roll W1 |")
        lines.append("|---|---|---|---|---|---|---|---|")
        real = faces.get("real") or {}
        lines.append(f"| real | {real.get('n_images', '–')} | {_fmt_num(real.get('detection_rate'))} | "
                     f"{_fmt_num(real.get('any_face_rate'))} | – | – | – | – |")
        for name in ("base", "finetuned"):
            f = faces.get(name) or {}
            cells = [f.get("detection_rate"), f.get("any_face_rate"), f.get("face_size_wasserstein"), f.get("center_x_wasserstein"),
                     f.get("center_y_wasserstein"), f.get("roll_wasserstein")]
            lines.append(f"| {name} | {f.get('n_images', '–')} | " + " | ".join(_fmt_num(v) for v in cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _fmt_num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3g}"


_COLORS = ("tab:red", "tab:green", "tab:blue", "tab:gray", "tab:orange", "tab:purple", "tab:brown", "tab:pink")


def fid_bar_chart(results: Sequence[FIDResult], *, title: str = "FID / KID (lower is better)", metric: str = "FID",
                  noise_floor: str | None = None, width: int = 800, height: int = 400) -> "np.ndarray":
    """FID (left) and KID ×10³ ± std (right) per result, value and N on every bar (FID is biased at
    small N: compare only at equal N); the result labelled ``noise_floor`` is also drawn as a
    dashed line across both panels. Returns uint8 RGB (height, width, 3)."""
    import numpy as np

    if not results:
        raise UserError("nothing to compare: give at least one FID result")
    if width < 200 or height < 150:
        raise UserError(f"chart size {width}x{height} is too small (at least 200x150)")
    # No pyplot and no matplotlib.use(): the host's backend and figure registry stay as they are.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [f"{r.label or f'#{i + 1}'}\nN={r.n_a}/{r.n_b}" for i, r in enumerate(results)]
    colors = [_COLORS[i % len(_COLORS)] for i in range(len(results))]
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    x = np.arange(len(results))
    kids = [None if r.kid_mean is None else 1e3 * r.kid_mean for r in results]
    stds = [None if r.kid_std is None else 1e3 * r.kid_std for r in results]
    kid_name = "KID ×10³ ↓ (± std)" if all(s is not None for s in stds) else "KID ×10³ ↓ (std n/a: subsets = whole set)"
    floor = next((r for r in results if noise_floor and r.label == noise_floor), None)
    for col, (name, values, errs, fmt) in enumerate(((f"{metric} ↓", [r.fid for r in results], None, ".2f"),
                                                     (kid_name, kids, stds, ".2f"))):
        ax = fig.add_subplot(1, 2, col + 1)
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        yerr = [e or 0.0 for e in errs] if errs and any(e is not None for e in errs) else None
        bars = ax.bar(x, heights, color=colors, yerr=yerr, capsize=4 if yerr else 0)
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if v is None else format(v, fmt), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        if floor is not None:
            level = floor.fid if col == 0 else kids[results.index(floor)]
            if level is not None:
                ax.axhline(level, color="gray", linestyle="--", linewidth=1)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=15 if len(results) > 3 else 0, fontsize=8)
        ax.set_title(name)
        ax.grid(True, axis="y", alpha=0.3)
        top = max([h + (e or 0) for h, e in zip(heights, yerr or [0] * len(heights))] + [1e-9])
        ax.set_ylim(min(0.0, min(heights)), top * 1.25)
    fig.suptitle(title)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3]).copy()


def save_bar_chart(results: dict[str, Any], path: Path) -> Path:
    """The table's chart: its four rows, the Real-vs-Real floor dashed, the caveat in the title."""
    from PIL import Image

    caveat = results.get("features_caveat")
    title = "Base vs fine-tuned vs held-out real" + (f" — {caveat['label']}: not FID" if caveat else "")
    floor = next((r.label for r in _rows(results) if r.label.startswith("Real vs Real")), None)
    chart = fid_bar_chart(_rows(results), title=title, metric=_metric(results), noise_floor=floor, width=1100, height=450)
    return atomic_write_png(Image.fromarray(chart), path)


def save_samples_grid(real: Sequence[Path], base: Sequence[Path], finetuned: Sequence[Path], path: Path, *,
                      rows: int = 6, cell: int = 128) -> Path:
    """Columns real | base | fine-tuned; base and fine-tuned in a row share prompt and seed."""
    from PIL import Image

    from ..trainer.progress_plots import save_sample_grid

    k = max(1, min(rows, len(base), len(finetuned), len(real)))
    images, labels = [], []
    for i in range(k):
        for col, files in (("real", real), ("base", base), ("fine-tuned", finetuned)):
            with Image.open(files[i]) as im:
                images.append(im.convert("RGB").resize((cell, cell), Image.Resampling.LANCZOS))
            labels.append(f"{col} #{i}" if col == "real" else f"{col} seed+{i}")
    return save_sample_grid(images, path, labels=labels, cols=3)


def write_table_outputs(results: dict[str, Any], out: str | os.PathLike, *, real_files: Sequence[Path],
                        base_files: Sequence[Path], finetuned_files: Sequence[Path]) -> dict[str, Path]:
    """All four artefacts into ``out``; returns their paths (also stored in ``results['artefacts']``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "table": atomic_write_text(out / TABLE_FILE, markdown_table(results)),
        "bar_chart": save_bar_chart(results, out / CHART_FILE),
        "samples_grid": save_samples_grid(real_files, base_files, finetuned_files, out / GRID_FILE),
    }
    results["artefacts"] = {k: v.name for k, v in paths.items()} | {"results": RESULTS_FILE}
    paths["results"] = write_results_json(results, out)
    return paths


def summary_lines(results: dict[str, Any]) -> list[str]:
    """A few lines for the terminal."""
    caveat = results.get("features_caveat")
    name = "FD*" if caveat else "FID"
    out = [f"{r.label:<28} N={r.n_a}/{r.n_b:<5} {name} {r.fid:9.2f}   KID×10³ {r.kid_text(scale=1e3, digits=2)}"
           for r in _rows(results)]
    if caveat:
        out.append(f"* {caveat['label']}: not FID")
    return out
