"""Procedurally drawn, captioned NON-face scenes: what the demo's base model learned to draw.

Why: the demo must show a face LoRA turning a model that draws *something else* into one that
draws the training faces (:mod:`.toy_faces`). So the demo's base model
(:mod:`.demo_model`, trained by ``tools/make_demo_base_model.py``) is trained on these pictures:
houses, trees, mountains, sailing boats, flowers and plain geometric shapes, in the same flat
cartoon style and at the same size as the toy faces, and never on anything face-like (no skin-
coloured ellipses, no eyes). Colour words the face captions also use (brown, red, black, grey)
appear here too, so a face prompt reads partly familiar to the base model, which then draws
brown or red *things* — not faces.

Each image is a pure function of ``(seed, index, size)`` (its own random stream), drawn at 4x with
PIL and downsampled with a box filter, like the toy faces. Its caption follows the toy faces'
pattern (``"a drawing of a house, red roof, white walls"``), so captions and prompts look alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import UserError

if TYPE_CHECKING:
    from PIL import Image, ImageDraw

SUPERSAMPLE = 4
COLOURS = {
    "red": (200, 40, 40), "blue": (40, 80, 200), "green": (40, 150, 60), "yellow": (240, 210, 40),
    "orange": (240, 130, 30), "purple": (130, 60, 170), "brown": (120, 75, 35), "black": (25, 25, 25),
    "white": (245, 245, 245), "grey": (140, 140, 140), "pink": (240, 140, 190),
}
SKIES = {"blue sky": (120, 180, 240), "grey sky": (170, 175, 185), "evening sky": (240, 170, 110), "night sky": (30, 35, 70)}
KINDS = ("house", "trees", "mountains", "boat", "flowers", "shapes")


@dataclass(frozen=True)
class ToyScene:
    """What was drawn (what the caption says)."""

    kind: str
    caption: str


def _rng(seed: int, index: int) -> np.random.Generator:
    # Independent stream per (seed, index), and a different one from the toy faces' (0x70F).
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0x5CE])


def _jitter(rgb: tuple[int, int, int], r: np.random.Generator, amount: float = 10) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + r.normal(0, amount), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _pick(r: np.random.Generator, names: tuple[str, ...] | list[str]) -> str:
    return names[int(r.integers(len(names)))]


def _sky_and_ground(d: "ImageDraw.ImageDraw", S: int, r: np.random.Generator, ground: tuple[int, int, int],
                    horizon: float) -> str:
    sky = _pick(r, list(SKIES))
    d.rectangle([0, 0, S, S], fill=_jitter(SKIES[sky], r, 8))
    d.rectangle([0, S * horizon, S, S], fill=_jitter(ground, r, 10))
    return sky


def _sun(d: "ImageDraw.ImageDraw", S: int, r: np.random.Generator, night: bool) -> None:
    x, y, rad = S * r.uniform(0.1, 0.9), S * r.uniform(0.08, 0.25), S * r.uniform(0.05, 0.09)
    d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=(235, 235, 210) if night else _jitter((250, 220, 60), r, 6))


def _house(d: "ImageDraw.ImageDraw", S: int, r: np.random.Generator) -> str:
    sky = _sky_and_ground(d, S, r, (80, 160, 70), r.uniform(0.72, 0.85))
    if r.random() < 0.6:
        _sun(d, S, r, sky == "night sky")
    walls, roof = _pick(r, ("white", "yellow", "red", "brown", "grey", "pink")), _pick(r, ("red", "brown", "black", "grey", "blue"))
    w, h = S * r.uniform(0.4, 0.6), S * r.uniform(0.28, 0.4)
    x0, y1 = S * r.uniform(0.08, 0.92) - w / 2, S * r.uniform(0.8, 0.9)
    x0 = float(np.clip(x0, S * 0.04, S * 0.96 - w))
    y0 = y1 - h
    d.rectangle([x0, y0, x0 + w, y1], fill=_jitter(COLOURS[walls], r))
    over, rh = w * 0.08, h * r.uniform(0.6, 0.9)
    d.polygon([(x0 - over, y0), (x0 + w + over, y0), (x0 + w / 2, y0 - rh)], fill=_jitter(COLOURS[roof], r))
    dw = w * 0.18
    dx = x0 + w * r.uniform(0.15, 0.85 - 0.18)
    d.rectangle([dx, y1 - h * 0.55, dx + dw, y1], fill=_jitter((90, 55, 30), r))
    for wx in (x0 + w * 0.12, x0 + w * 0.62):
        if abs(wx - dx) < dw * 1.3:
            continue
        ww = w * 0.22
        d.rectangle([wx, y0 + h * 0.2, wx + ww, y0 + h * 0.2 + ww], fill=(170, 210, 240))
        d.line([wx + ww / 2, y0 + h * 0.2, wx + ww / 2, y0 + h * 0.2 + ww], fill=(60, 60, 60), width=max(1, S // 64))
    return f"a drawing of a house, {roof} roof, {walls} walls"


def _trees(d: "ImageDraw.ImageDraw", S: int, r: np.random.Generator) -> str:
    horizon = r.uniform(0.6, 0.75)
    sky = _sky_and_ground(d, S, r, (90, 170, 70), horizon)
    if r.random() < 0.5:
        _sun(d, S, r, sky == "night sky")
    n, kind = int(r.integers(1, 4)), _pick(r, ("pine", "round"))
    xs = np.sort(r.uniform(0.15, 0.85, n)) if n > 1 else np.array([r.uniform(0.3, 0.7)])
    for x in xs * S:
        base, height = S * r.uniform(horizon + 0.08, 0.95), S * r.uniform(0.45, 0.7) / (1 + 0.25 * (n - 1))
        tw = height * 0.12
        d.rectangle([x - tw / 2, base - height * 0.4, x + tw / 2, base], fill=_jitter(COLOURS["brown"], r))
        green = _jitter((30, 120, 50), r, 15)
        if kind == "pine":
            for k in range(3):
                top, bottom = base - height * (1.0 - 0.22 * k), base - height * (0.35 - 0.1 * k)
                half = height * (0.22 + 0.08 * k)
                d.polygon([(x, top), (x - half, bottom), (x + half, bottom)], fill=green)
        else:
            rad = height * 0.33
            cy = base - height * 0.62
            for ox, oy in ((0, 0), (-0.5, 0.25), (0.5, 0.25), (0, -0.35)):
                d.ellipse([x + ox * rad - rad, cy + oy * rad - rad, x + ox * rad + rad, cy + oy * rad + rad], fill=green)
    word = {1: "a", 2: "two", 3: "three"}[n]
    return f"a drawing of {word} {kind} tree{'s' if n > 1 else ''}, green meadow, {sky}"


def _mountains(d: "ImageDraw.ImageDraw", S: int, r: np.random.Generator) -> str:
    sky = _pick(r, list(SKIES))
    d.rectangle([0, 0, S, S], fill=_jitter(SKIES[sky], r, 8))
    if r.random() < 0.7:
        _sun(d, S, r, sky == "night sky")
    rock = _pick(r, ("grey", "brown", "purple", "blue"))
    base = S * r.uniform(0.7, 0.8)
    for k in range(int(r.integers(2, 4))):
        px, top, half = S * r.uniform(0.1, 0.9), S * r.uniform(0.2, 0.45), S * r.uniform(0.25, 0.45)
        col = tuple(int(c * (0.75 + 0.12 * k)) for c in _jitter(COLOURS[rock], r, 12))
        d.polygon([(px - half, base), (px, top), (px + half, base)], fill=col)
        cap = (base - top) * 0.25
        d.polygon([(px - half * cap / (base - top), top + cap), (px, top), (px + half * cap / (base - top), top + cap)],
                  fill=(245, 245, 250))
    lake = r.random() < 0.5
    d.rectangle([0, base, S, S], fill=_jitter((50, 110, 190) if lake else (90, 160, 70), r, 10))
    return f"a drawing of mountains, {rock} rock, {'a lake' if lake else 'green valley'}, {sky}"


def _boat(d: "ImageDraw.ImageDraw", S: int, r: np.random.Generator) -> str:
    sky = _pick(r, list(SKIES))
    d.rectangle([0, 0, S, S], fill=_jitter(SKIES[sky], r, 8))
    if r.random() < 0.6:
        _sun(d, S, r, sky == "night sky")
    sea = S * r.uniform(0.6, 0.72)
    d.rectangle([0, sea, S, S], fill=_jitter((30, 80, 160), r, 12))
    hull, sail = _pick(r, ("red", "brown", "black", "white", "yellow")), _pick(r, ("white", "red", "yellow", "orange"))
    x, w = S * r.uniform(0.3, 0.7), S * r.uniform(0.35, 0.5)
    y = sea + S * r.uniform(0.02, 0.08)
    d.polygon([(x - w / 2, y - w * 0.18), (x + w / 2, y - w * 0.18), (x + w * 0.35, y + w * 0.05), (x - w * 0.35, y + w * 0.05)],
              fill=_jitter(COLOURS[hull], r))
    mast_top = y - w * 0.18 - S * r.uniform(0.3, 0.42)
    d.line([x, y - w * 0.18, x, mast_top], fill=(60, 40, 20), width=max(1, S // 48))
    d.polygon([(x + S * 0.01, mast_top), (x + S * 0.01, y - w * 0.22), (x + w * 0.45, y - w * 0.22)], fill=_jitter(COLOURS[sail], r, 6))
    if r.random() < 0.5:
        d.polygon([(x - S * 0.01, mast_top + S * 0.04), (x - S * 0.01, y - w * 0.22), (x - w * 0.35, y - w * 0.22)],
                  fill=_jitter(COLOURS[sail], r, 6))
    return f"a drawing of a sailing boat, {hull} hull, {sail} sail, {sky}"


def _flowers(d: "ImageDraw.ImageDraw", S: int, r: np.random.Generator) -> str:
    sky = _sky_and_ground(d, S, r, (70, 150, 60), r.uniform(0.35, 0.55))
    petals = _pick(r, ("red", "yellow", "purple", "pink", "white", "orange", "blue"))
    n = int(r.integers(2, 6))
    for _ in range(n):
        x, top = S * r.uniform(0.1, 0.9), S * r.uniform(0.3, 0.6)
        d.line([x, top, x + S * r.normal(0, 0.02), S], fill=(30, 110, 40), width=max(2, S // 40))
        rad = S * r.uniform(0.04, 0.07)
        col = _jitter(COLOURS[petals], r, 12)
        for a in range(int(r.integers(5, 8))):
            ang = a * 2 * math.pi / 6 + r.uniform(0, 0.3)
            px, py = x + math.cos(ang) * rad, top + math.sin(ang) * rad
            d.ellipse([px - rad * 0.7, py - rad * 0.7, px + rad * 0.7, py + rad * 0.7], fill=col)
        d.ellipse([x - rad * 0.5, top - rad * 0.5, x + rad * 0.5, top + rad * 0.5], fill=(240, 200, 40))
    return f"a drawing of {petals} flowers, green stems, {sky}"


def _shapes(d: "ImageDraw.ImageDraw", S: int, r: np.random.Generator) -> str:
    bg = _pick(r, ("white", "grey", "black", "yellow", "blue", "green", "pink"))
    d.rectangle([0, 0, S, S], fill=_jitter(COLOURS[bg], r, 10))
    names = []
    for _ in range(int(r.integers(1, 4))):
        shape = _pick(r, ("circle", "square", "triangle", "star"))
        colour = _pick(r, [c for c in COLOURS if c != bg])
        x, y, rad = S * r.uniform(0.2, 0.8), S * r.uniform(0.2, 0.8), S * r.uniform(0.1, 0.22)
        fill = _jitter(COLOURS[colour], r, 8)
        if shape == "circle":
            d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=fill)
        elif shape == "square":
            a = r.uniform(0, math.pi / 2)
            d.polygon([(x + rad * math.cos(a + k * math.pi / 2), y + rad * math.sin(a + k * math.pi / 2)) for k in range(4)], fill=fill)
        elif shape == "triangle":
            a = r.uniform(0, 2 * math.pi)
            d.polygon([(x + rad * math.cos(a + k * 2 * math.pi / 3), y + rad * math.sin(a + k * 2 * math.pi / 3)) for k in range(3)], fill=fill)
        else:
            a = r.uniform(0, 2 * math.pi)
            d.polygon([(x + rad * (1 if k % 2 == 0 else 0.45) * math.cos(a + k * math.pi / 5),
                        y + rad * (1 if k % 2 == 0 else 0.45) * math.sin(a + k * math.pi / 5)) for k in range(10)], fill=fill)
        names.append(f"a {colour} {shape}")
    return f"a drawing of {' and '.join(names)}, {bg} background"


_DRAW: dict[str, Callable[["ImageDraw.ImageDraw", int, np.random.Generator], str]] = {
    "house": _house, "trees": _trees, "mountains": _mountains, "boat": _boat, "flowers": _flowers, "shapes": _shapes,
}


def draw_scene(seed: int, index: int, size: int = 64) -> tuple["Image.Image", ToyScene]:
    """One scene, RGB ``size`` x ``size``, deterministic in ``(seed, index, size)``; the kind cycles
    with ``index`` so every 6 consecutive images hold one of each."""
    from PIL import Image, ImageDraw

    if size < 16:
        raise UserError(f"toy scenes need at least 16 px (got {size})")
    r = _rng(seed, index)
    kind = KINDS[int(index) % len(KINDS)]
    S = size * SUPERSAMPLE
    img = Image.new("RGB", (S, S))
    caption = _DRAW[kind](ImageDraw.Draw(img), S, r)
    return img.resize((size, size), Image.Resampling.BOX), ToyScene(kind=kind, caption=caption)


def toy_scene_array(n: int, *, seed: int = 0, start: int = 0, size: int = 64) -> tuple[np.ndarray, list[str]]:
    """Scenes ``start .. start+n-1`` as one uint8 NHWC array, and their captions."""
    if n < 1:
        raise UserError(f"need at least one toy scene (got {n})")
    pairs = [draw_scene(seed, i, size) for i in range(start, start + n)]
    return np.stack([np.asarray(img, dtype=np.uint8) for img, _ in pairs]), [s.caption for _, s in pairs]
