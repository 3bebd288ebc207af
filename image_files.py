"""Image files: which files in a folder are images, and decoding one to upright 8-bit RGB.

One extension set (:data:`IMAGE_EXTENSIONS`, the set pytorch-fid scores) and one lister
(:func:`list_images`) serve the trainer's dataset, ``facediffuser prep`` and the evaluation, so a
folder that can be prepped can also be trained on and scored, with the same files in the same
order (sorted by relative POSIX path). Hidden files and folders (``.*``: caches, macOS ``._x.jpg``
droppings, prep's ``.debug/`` overlays and journal) are never images, nor are the face masks prep
writes beside each crop (``<stem>.mask.png``, :data:`MASK_SUFFIX`).

:func:`load_rgb` is how training and prep see a photo: EXIF orientation applied, any pixel mode we
accept (:data:`CONVERSIONS`) turned into 8-bit RGB, transparency composited on white. The FID
evaluation decodes its own way on purpose (``evaluation/images.py``: pytorch-fid's pixels, no EXIF
rotation), so that its numbers match the reference tools.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from PIL import Image

#: What PIL reads and users have; the same set pytorch-fid scores.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
#: ``<stem>.mask.png`` beside an image is its face mask (written by ``facediffuser prep``).
MASK_SUFFIX = ".mask.png"
#: prep's debug overlays (hidden, so never listed as images).
DEBUG_DIR = ".debug"


def is_prep_artifact(path: str | os.PathLike) -> bool:
    """True for files prep writes that are not training images (masks, debug overlays)."""
    p = Path(path)
    return p.name.lower().endswith(MASK_SUFFIX) or DEBUG_DIR in p.parts


def is_image_name(name: str) -> bool:
    """Whether a file name is an image the lister returns (extension, not hidden, not a mask)."""
    low = name.lower()
    return not name.startswith(".") and low.endswith(IMAGE_EXTENSIONS) and not low.endswith(MASK_SUFFIX)


def list_images(folder: str | os.PathLike, *, recursive: bool = True, exclude: str | os.PathLike | None = None,
                what: str = "image folder") -> list[Path]:
    """The image files under ``folder``, sorted by relative POSIX path; a one-line UserError
    (naming ``what``) when the folder is missing, is a file, or holds no image. Hidden folders and
    ``exclude`` (e.g. prep's output inside its source) are not entered; symlinked folders neither."""
    root = Path(folder)
    if not root.exists():
        raise UserError(f"{what} not found: {root}")
    if not root.is_dir():
        raise UserError(f"{what} {root} is a file; it must be a folder of images")
    skip = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if recursive:
            dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and (skip is None or (d / n).resolve() != skip))
        else:
            dirnames[:] = []
        for name in filenames:
            if is_image_name(name):
                found.append(((d / name).relative_to(root).as_posix(), d / name))
    if not found:
        raise UserError(f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}{', recursively' if recursive else ''})")
    return [p for _, p in sorted(found)]


# --- decoding -----------------------------------------------------------------------------------

class BadImage(Exception):
    """An image we skip; the message says why (one short phrase)."""


#: Pixel modes we accept besides RGB, and what converting each to 8-bit RGB does (reported per file).
CONVERSIONS = {
    "CMYK": "converted CMYK to RGB",
    "I;16": "converted 16-bit to 8-bit RGB",
    "I;16B": "converted 16-bit to 8-bit RGB",
    "I;16L": "converted 16-bit to 8-bit RGB",
    "I": "converted 16-bit to 8-bit RGB",  # older Pillow opens 16-bit gray PNGs as "I"
    "F": "converted float to 8-bit RGB",
    "L": "converted grayscale to RGB",
    "1": "converted 1-bit to RGB",
    "LA": "converted grayscale+alpha to RGB on white",
    "P": "converted palette to RGB",
    "PA": "converted palette+alpha to RGB on white",
    "RGBA": "composited RGBA on white",
    "RGBa": "composited RGBA on white",
    "YCbCr": "converted YCbCr to RGB",
    "LAB": "converted Lab to RGB",
}
SUPPORTED_MODES = set(CONVERSIONS) | {"RGB", "RGBX"}


def open_image(data: bytes) -> "Image.Image":
    """PIL's lazy open of in-memory bytes; a BadImage saying why when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised file content)") from None
    except Image.DecompressionBombError:
        raise BadImage(f"image too large (over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels)") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken headers
        raise BadImage(f"unreadable image header ({exc})") from None
    return img


def load_rgb(path: str | os.PathLike) -> "Image.Image":
    """Decode a file to an 8-bit RGB PIL image, upright (EXIF), transparency on white.

    Raises BadImage (with the reason) for files that cannot be used.
    """
    from PIL import ImageOps

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read file ({exc.strerror or exc})") from None
    img = open_image(data)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001
        raise BadImage(f"corrupt or truncated image data ({exc})") from None
    return to_rgb(img)


def to_rgb(img: "Image.Image") -> "Image.Image":
    """8-bit RGB from any PIL mode in :data:`SUPPORTED_MODES` (16-bit and float scaled, not clipped)."""
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        if mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        arr8 = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa", "LA", "PA", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode not in SUPPORTED_MODES:
        raise BadImage(f"unsupported pixel mode {mode}")
    return img.convert("RGB")
