"""A bar chart of several evaluations side by side (e.g. base vs base+LoRA): FID and KID ± std.

``comparison_chart(rows)`` returns an RGB ``uint8`` array (H, W, 3) that the ComfyUI node turns
into an IMAGE and the CLI can save as a PNG. Each row is a mapping with ``label``, ``fid``,
``n`` and optionally ``kid``/``kid_std``/``n_ref``; N is printed on every bar because FID is biased
at small N (compare only at equal N).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import UserError

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def comparison_chart(rows: Sequence[Mapping[str, Any]], *, title: str = "FID / KID (lower is better)",
                     width: int = 800, height: int = 400) -> np.ndarray:
    """Render the rows as two bar panels (FID, KID ± std); returns uint8 RGB (height, width, 3)."""
    if not rows:
        raise UserError("nothing to compare: connect at least one FID result")
    if width < 200 or height < 150:
        raise UserError(f"chart size {width}x{height} is too small (at least 200x150)")
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [str(r.get("label") or f"#{i + 1}") for i, r in enumerate(rows)]
    colors = [_COLORS[i % len(_COLORS)] for i in range(len(rows))]
    fids = [_finite(r.get("fid")) for r in rows]
    kids = [_finite(r.get("kid")) for r in rows]
    kid_stds = [_finite(r.get("kid_std")) or 0.0 for r in rows]
    ns = [r.get("n") for r in rows]

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    x = np.arange(len(rows))
    for col, (name, values, errs) in enumerate((("FID", fids, None), ("KID", kids, kid_stds))):
        ax = fig.add_subplot(1, 2, col + 1)
        heights = [v if v is not None else 0.0 for v in values]
        yerr = [e if v is not None else 0.0 for v, e in zip(values, errs)] if errs else None
        bars = ax.bar(x, heights, color=colors, yerr=yerr, capsize=4 if yerr else 0)
        for bar, v, n in zip(bars, values, ns):
            text = "n/a" if v is None else (f"{v:.2f}" if name == "FID" else f"{v:.4f}")
            ax.annotate(f"{text}\nN={n if n is not None else '?'}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=15 if len(rows) > 3 else 0, fontsize=9)
        ax.set_title(name)
        ax.grid(True, axis="y", alpha=0.3)
        top = max([h + (e or 0) for h, e in zip(heights, yerr or [0] * len(heights))] + [1e-9])
        ax.set_ylim(min(0.0, min(heights)), top * 1.25)
    fig.suptitle(title)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3]).copy()
