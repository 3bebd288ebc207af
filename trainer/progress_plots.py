"""Pictures of a training run: the loss curve and the sample grids.

Both are written atomically (a temp file in the same folder, then ``os.replace``), so a viewer that
watches the folder, or a crash mid-write, never sees half a PNG. matplotlib is used with the Agg
backend only (no display needed) and imported inside the function: the CLI stays fast to start.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..fileio import atomic_path, atomic_write_png

if TYPE_CHECKING:
    from PIL import Image


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style exponential smoothing with bias correction (the first points are not
    dragged towards zero). Non-finite values are skipped (the line keeps its last value)."""
    out: list[float] = []
    avg, norm = 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg = weight * avg + (1.0 - weight) * v
            norm = weight * norm + (1.0 - weight)
        out.append(avg / norm if norm else float("nan"))
    return out


def save_loss_curve(losses: Sequence[float], path: str | Path, *, title: str = "training loss",
                    start_step: int = 1, validation: Sequence[tuple[int, float]] = ()) -> Path:
    """Write a PNG of the per-step loss (faint) and its smoothed trend (bold), and, when given, the
    held-out validation loss ``[(step, loss), ...]`` on the same axes (it is the same objective) with
    its lowest point marked. Returns the path."""
    # No pyplot and no matplotlib.use(): the host's backend and figure registry stay as they are.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    steps = list(range(start_step, start_step + len(losses)))
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if losses or validation:
        ax.plot(steps, list(losses), color="tab:blue", alpha=0.3, linewidth=0.8, label="loss")
        ax.plot(steps, smooth(losses), color="tab:blue", linewidth=2.0, label="smoothed")
        if validation:
            v_steps, v_losses = [int(s) for s, _ in validation], [float(v) for _, v in validation]
            ax.plot(v_steps, v_losses, color="tab:orange", linewidth=1.8, marker="o", markersize=3.5,
                    label="validation (held out)")
            best = min(range(len(v_losses)), key=lambda i: (v_losses[i], v_steps[i]))
            ax.plot([v_steps[best]], [v_losses[best]], color="tab:red", marker="*", markersize=12, linestyle="none",
                    label=f"best validation (step {v_steps[best]})")
        finite = [v for v in [*losses, *(v for _, v in validation)] if math.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 50:
            ax.set_yscale("log")  # a few huge early losses would flatten the rest of the curve
        ax.legend(loc="best", framealpha=0.8)
    else:
        ax.text(0.5, 0.5, "no steps yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def image_grid(images: Sequence["Image.Image"], labels: Sequence[str] | None = None, *,
               cols: int | None = None, label_height: int = 14) -> "Image.Image":
    """Tile equal-sized images into one picture, each with an optional one-line label above it."""
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("image_grid needs at least one image")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    lh = label_height if labels else 0
    grid = Image.new("RGB", (cols * w, rows * (h + lh)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + lh)
        grid.paste(img.convert("RGB").resize((w, h)), (x, y + lh))
        if labels:
            text = labels[i]
            max_chars = max(4, w // 6)
            draw.text((x + 2, y + 1), text if len(text) <= max_chars else text[: max_chars - 1] + "…", fill="black")
    return grid


def save_sample_grid(images: Sequence["Image.Image"], path: str | Path, labels: Sequence[str] | None = None,
                     *, cols: int | None = None) -> Path:
    """Write the sample images of one step as a single PNG grid (atomically). Returns the path."""
    path = Path(path)
    grid = image_grid(images, labels, cols=cols)
    return atomic_write_png(grid, path)
