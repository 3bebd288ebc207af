"""A procedurally generated, face-like image set for the offline demo and the tests.

Why: the demo must run the whole product loop (train a LoRA, generate, measure) with no download,
so it needs a small data set with a clear, learnable distribution that is *not* what a random model
draws. These pictures are cartoon faces — not photographs — and nothing measured on them says
anything about real face quality; the demo report says so at the top.

Each image is a pure function of ``(seed, index, size)``: a background colour, a face ellipse (width,
height, skin tone), hair (colour, volume), two eyes (spacing, height, size, iris colour), a nose, a
mouth (width, smile) and a pose (in-plane roll, horizontal/vertical shift, scale). It is drawn at 4x
with PIL and downsampled with a box filter (anti-aliased edges). A caption is written beside each
image (``<stem>.txt``: hair colour and expression), so the held-out split also carries prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UserError
from ..fileio import atomic_write_bytes

if TYPE_CHECKING:
    from PIL import Image

SKIN_TONES = ((255, 224, 196), (241, 194, 160), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 58, 36))
HAIR_COLOURS = {
    "black": (25, 20, 18), "brown": (92, 58, 30), "blond": (222, 190, 110), "red": (170, 62, 30), "grey": (165, 165, 165),
}
IRIS_COLOURS = ((60, 40, 20), (40, 90, 160), (50, 120, 70), (30, 30, 30))
BACKGROUNDS = ((96, 140, 190), (200, 200, 205), (120, 170, 120), (220, 200, 160), (60, 60, 80), (180, 120, 140))
SUPERSAMPLE = 4


@dataclass(frozen=True)
class ToyFace:
    """The drawn parameters of one face (what the caption summarises)."""

    hair: str
    smiling: bool
    caption: str


def _rng(seed: int, index: int) -> np.random.Generator:
    # Independent stream per (seed, index): any subset of images can be regenerated alone.
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0x70F])


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in rgb)  # type: ignore[return-value]


def draw_face(seed: int, index: int, size: int = 64) -> tuple["Image.Image", ToyFace]:
    """One toy face, RGB ``size`` x ``size``, deterministic in ``(seed, index, size)``."""
    from PIL import Image, ImageDraw

    if size < 16:
        raise UserError(f"toy faces need at least 16 px (got {size})")
    r = _rng(seed, index)
    S = size * SUPERSAMPLE
    bg = _jitter(BACKGROUNDS[r.integers(len(BACKGROUNDS))], r, 12)
    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)

    scale = r.uniform(0.85, 1.1)
    cx, cy = S * (0.5 + r.uniform(-0.06, 0.06)), S * (0.53 + r.uniform(-0.05, 0.05))
    fw, fh = S * 0.27 * scale * r.uniform(0.85, 1.1), S * 0.34 * scale * r.uniform(0.9, 1.1)
    skin = _jitter(SKIN_TONES[r.integers(len(SKIN_TONES))], r, 8)
    hair_name = list(HAIR_COLOURS)[r.integers(len(HAIR_COLOURS))]
    hair = _jitter(HAIR_COLOURS[hair_name], r, 10)
    volume = r.uniform(1.05, 1.3)

    # shoulders / neck, then hair behind the head, the face, and a fringe on top
    d.ellipse([cx - fw * 1.9, cy + fh * 0.95, cx + fw * 1.9, cy + fh * 2.6], fill=_jitter((70, 80, 110), r, 30))
    d.rectangle([cx - fw * 0.35, cy + fh * 0.6, cx + fw * 0.35, cy + fh * 1.15], fill=skin)
    d.ellipse([cx - fw * volume, cy - fh * volume * 1.02, cx + fw * volume, cy + fh * 0.55], fill=hair)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    fringe = r.uniform(0.45, 0.75)
    d.chord([cx - fw * 1.02, cy - fh * 1.05, cx + fw * 1.02, cy - fh * (1 - 2 * fringe) + fh * 0.1], 180, 360, fill=hair)

    # eyes
    ey = cy - fh * r.uniform(0.05, 0.2)
    ex = fw * r.uniform(0.35, 0.5)
    er = fw * r.uniform(0.11, 0.16)
    iris = IRIS_COLOURS[r.integers(len(IRIS_COLOURS))]
    for sx in (-1, 1):
        x = cx + sx * ex
        d.ellipse([x - er * 1.4, ey - er, x + er * 1.4, ey + er], fill=(250, 250, 250))
        d.ellipse([x - er * 0.75, ey - er * 0.75, x + er * 0.75, ey + er * 0.75], fill=iris)
        d.ellipse([x - er * 0.3, ey - er * 0.3, x + er * 0.3, ey + er * 0.3], fill=(10, 10, 10))
        d.line([x - er * 1.5, ey - er * 1.9, x + er * 1.5, ey - er * 2.1 - sx * r.uniform(-1, 1) * er * 0.3],
               fill=tuple(int(c * 0.6) for c in hair), width=max(1, int(er * 0.45)))
    # nose and mouth
    shade = tuple(int(c * 0.8) for c in skin)
    ny = cy + fh * r.uniform(0.12, 0.25)
    d.polygon([(cx, ey + er), (cx - fw * 0.09, ny), (cx + fw * 0.09, ny)], fill=shade)
    my, mw = cy + fh * r.uniform(0.45, 0.6), fw * r.uniform(0.3, 0.5)
    smiling = bool(r.random() < 0.5)
    lips = _jitter((180, 60, 70), r, 15)
    if smiling:
        d.chord([cx - mw, my - fh * 0.12, cx + mw, my + fh * 0.12], 0, 180, fill=lips)
    else:
        d.line([cx - mw, my, cx + mw, my], fill=lips, width=max(2, int(fh * 0.05)))

    img = img.rotate(float(r.uniform(-15, 15)), resample=Image.Resampling.BICUBIC, center=(cx, cy), fillcolor=bg)
    img = img.resize((size, size), Image.Resampling.BOX)
    caption = f"a photo of a face, {hair_name} hair, {'smiling' if smiling else 'neutral expression'}"
    return img, ToyFace(hair=hair_name, smiling=smiling, caption=caption)


def write_toy_faces(folder: str | os.PathLike, n: int, *, seed: int = 0, start: int = 0, size: int = 64,
                    captions: bool = True) -> list[Path]:
    """Write faces ``start .. start+n-1`` as ``toy_<index>.png`` (+ ``.txt`` captions) into ``folder``."""
    import io

    if n < 1:
        raise UserError(f"need at least one toy face (got {n})")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        img, face = draw_face(seed, i, size)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False)  # no timestamps in PNG: same pixels, same bytes
        p = out / f"toy_{i:05d}.png"
        atomic_write_bytes(p, buf.getvalue())
        if captions:
            atomic_write_bytes(p.with_suffix(".txt"), (face.caption + "\n").encode("utf-8"))
        paths.append(p)
    return paths


def toy_face_array(n: int, *, seed: int = 0, start: int = 0, size: int = 64) -> np.ndarray:
    """Faces as one uint8 NHWC array (no files), e.g. to fit the demo's VAE."""
    return np.stack([np.asarray(draw_face(seed, i, size)[0], dtype=np.uint8) for i in range(start, start + n)])


def make_splits(root: str | os.PathLike, *, n_train: int = 48, n_heldout: int = 48, seed: int = 0,
                size: int = 64) -> tuple[Path, Path]:
    """``root/train`` and ``root/heldout``: disjoint index ranges of the same distribution."""
    root = Path(root)
    write_toy_faces(root / "train", n_train, seed=seed, start=0, size=size)
    write_toy_faces(root / "heldout", n_heldout, seed=seed, start=n_train, size=size)
    return root / "train", root / "heldout"

