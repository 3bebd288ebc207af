"""The evaluation table's files: ``results.json``, ``table.md``, ``fid_bar_chart.png``, ``samples_grid.png``.

All four are written atomically (temp file in the same folder, then ``os.replace``), so a viewer
watching the folder, or a crash, never sees half a file. Every picture and table carries N and,
when the features came from the stand-in extractor, says so in its title.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ..fileio import atomic_path, atomic_write_text

RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"
CHART_FILE = "fid_bar_chart.png"
GRID_FILE = "samples_grid.png"


def write_results_json(results: dict[str, Any], out: Path) -> Path:
    return atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")


def _fmt_kid(row: dict[str, Any]) -> str:
    """``mean ± std`` ×10³; ``± n/a`` when the std is undefined (subset size = N on both sides)."""
    std = row.get("kid_std")
    return f"{1e3 * row['kid_mean']:.2f} ± {'n/a' if std is None else f'{1e3 * std:.2f}'}"


def _kid_sentence(rows: list[dict[str, Any]]) -> str:
    r = rows[0]
    text = f"KID is unbiased (its std is over {r['kid_subsets']} random subsets of {r['kid_subset_size']} per side)"
    if any(row.get("kid_std") is None for row in rows):
        text += ("; the std is n/a where the subset size equals N on both sides: every subset is then the whole set, "
                 "so there is no spread to report")
    return text + "."


def markdown_table(results: dict[str, Any]) -> str:
    """The table plus everything needed to read it: N, protocol, sampler settings, warnings."""
    lines: list[str] = []
    metric = "Fréchet distance (STAND-IN features, not FID)" if results.get("stand_in") else "FID"
    lines.append(f"# Base vs fine-tuned vs held-out real: {metric} and KID")
    lines.append("")
    for w in results.get("warnings", []):
        lines.append(f"> **Warning:** {w}")
        lines.append("")
    lines.append(f"| Comparison | N (A / B) | {'FD' if results.get('stand_in') else 'FID'} ↓ | KID ×10³ (mean ± std) ↓ |")
    lines.append("|---|---|---|---|")
    for r in results["rows"]:
        lines.append(f"| {r['name']} | {r['n_a']} / {r['n_b']} | {r['fid']:.2f} | {_fmt_kid(r)} |")
    lines.append("")
    lines.append("FID is biased at small N (it shrinks roughly like 1/N), so compare rows only at equal N and read them "
                 "against the Real-vs-Real noise floor. " + _kid_sentence(results["rows"]))
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


def save_bar_chart(results: dict[str, Any], path: Path) -> Path:
    """FID (left) and KID ± std (right) per comparison, N in the labels, the floor as a dashed line."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    rows = results["rows"]
    labels = [f"{r['name']}\nN={r['n_a']}/{r['n_b']}" for r in rows]
    colours = ["tab:red", "tab:green", "tab:blue", "tab:gray"][: len(rows)]
    fig = Figure(figsize=(11, 4.5), dpi=100)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    fid_name = "FD (stand-in features)" if results.get("stand_in") else "FID"
    ax1.bar(range(len(rows)), [r["fid"] for r in rows], color=colours)
    stds = [r.get("kid_std") for r in rows]
    ax2.bar(range(len(rows)), [1e3 * r["kid_mean"] for r in rows], color=colours, capsize=4,
            yerr=None if all(s is None for s in stds) else [float("nan") if s is None else 1e3 * s for s in stds])
    kid_name = "KID ×10³ ↓ (± std)" if all(r.get("kid_std") is not None for r in rows) else "KID ×10³ ↓ (std n/a: subsets = whole set)"
    for ax, name in ((ax1, f"{fid_name} ↓"), (ax2, kid_name)):
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(name)
        ax.grid(True, axis="y", alpha=0.3)
    floor = next((r for r in rows if r["name"].startswith("Real vs Real")), None)
    if floor is not None:
        ax1.axhline(floor["fid"], color="gray", linestyle="--", linewidth=1)
        ax2.axhline(1e3 * floor["kid_mean"], color="gray", linestyle="--", linewidth=1)
    title = "Base vs fine-tuned vs held-out real"
    if results.get("stand_in"):
        title += " — STAND-IN random features: not FID"
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


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
    name = "FD*" if results.get("stand_in") else "FID"
    out = [f"{r['name']:<28} N={r['n_a']}/{r['n_b']:<5} {name} {r['fid']:9.2f}   KID×10³ {_fmt_kid(r)}" for r in results["rows"]]
    if results.get("stand_in"):
        out.append("* stand-in random-weight features: not FID")
    return out


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
