"""``facediffuser prep``: turn a folder of photos into FFHQ-aligned face crops with masks.

For every source image (listed by :func:`..image_files.list_images`, decoded by
:func:`..image_files.load_rgb`, as the trainer does): detect faces (:mod:`.detection`), pick which to keep, cut the FFHQ
square around each (:mod:`.align`), mask it (:mod:`.masks`) and write, mirroring the source sub-folders under DST::

    <name>.png        the aligned crop, size x size RGB
    <name>.json       box and landmarks in crop pixels, score, source file, face index, ...
    <name>.mask.png   the face mask the trainer's face-weighted loss reads

``<name>`` is the source file's stem (``<stem>_<k>`` per face with ``--all-faces``; a source whose
stem clashes with a sibling's, e.g. ``a.jpg`` + ``a.png``, gets its extension added). Images
without a usable face are dropped, each with a reason, into ``DST/prep_summary.json``.

Resumable: after each source, one line goes to ``DST/.prep_journal.jsonl`` (its outputs, or why it
was dropped, the settings and the source's size and mtime). A re-run skips sources whose journal
line matches the current settings and file and whose outputs all exist; anything else is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import UserError
from ..fileio import atomic_write_json, atomic_write_png
from ..image_files import DEBUG_DIR, MASK_SUFFIX, list_images, load_rgb
from .align import align_face
from .masks import face_mask, mask_debug_image, save_mask
from .detection import DEFAULT_BACKEND, DEFAULT_MIN_SCORE, LANDMARK_NAMES, Face, detect_faces

SUMMARY_NAME = "prep_summary.json"
JOURNAL_NAME = ".prep_journal.jsonl"
FACE_MODES = ("largest", "one-only", "all")
DROP_REASONS = {
    "unreadable": "the file could not be decoded as an image",
    "no_face": "no face detected at or above the score threshold",
    "face_too_small": "faces were found, but all smaller than --min-face",
    "multiple_faces": "more than one face (--one-face-only)",
}
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PrepSettings:
    """What decides the outputs; a change of any of these redoes a source on resume."""

    size: int = 512
    min_face: int = 64  # detector box size (sqrt of w*h) in source pixels
    min_score: float = DEFAULT_MIN_SCORE
    faces: str = "largest"  # largest | one-only | all
    debug_masks: bool = False
    detector: str = DEFAULT_BACKEND
    detect_max_side: int = 1600  # bigger sources are downscaled for detection only

    def validate(self) -> "PrepSettings":
        if self.size < 64 or self.size % 8:
            raise UserError(f"--size must be a multiple of 8 and at least 64 (got {self.size})")
        if self.min_face < 0:
            raise UserError(f"--min-face must be >= 0 pixels (got {self.min_face})")
        if not 0.0 <= self.min_score <= 1.0:
            raise UserError(f"--min-score must be in [0, 1] (got {self.min_score})")
        if self.faces not in FACE_MODES:
            raise UserError(f"faces mode must be one of {', '.join(FACE_MODES)} (got {self.faces!r})")
        return self

    def key(self) -> str:
        """Hash of everything that changes the written files."""
        d = asdict(self)
        d["version"] = _FORMAT_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PrepResult:
    """What a run did; ``summary`` is what was written to ``prep_summary.json``."""

    dst: Path
    summary_path: Path
    sources: int
    faces_written: int
    images_with_faces: int
    resumed: int
    dropped: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        reasons = self.summary.get("dropped_by_reason", {})
        why = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "none"
        return (f"prep: {self.faces_written} face crop(s) from {self.images_with_faces} of {self.sources} image(s) "
                f"in {self.dst} ({self.resumed} already done); dropped: {why}; summary: {self.summary_path}")


def prep_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    settings: PrepSettings | None = None,
    *,
    progress: bool = True,
    device: str | None = None,
) -> PrepResult:
    """Detect, align and write every face of ``src`` (searched recursively) into ``dst``."""
    settings = (settings or PrepSettings()).validate()
    src_root, dst_root = Path(src), Path(dst)
    if not src_root.is_dir():
        raise UserError(f"source folder not found: {src_root}")
    if dst_root.exists() and not dst_root.is_dir():
        raise UserError(f"destination is a file, not a folder: {dst_root}")
    if dst_root.resolve() == src_root.resolve():
        raise UserError("DST must differ from SRC: prep writes <name>.png crops that would overwrite the photos")
    sources = list_images(src_root, exclude=dst_root, what="source folder")
    dst_root.mkdir(parents=True, exist_ok=True)
    names = _output_stems(src_root, sources)
    key = settings.key()
    journal = _read_journal(dst_root / JOURNAL_NAME)

    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []
    resumed = 0
    bar = tqdm(sources, desc="prep", unit="img", disable=not progress, dynamic_ncols=True)
    with open(dst_root / JOURNAL_NAME, "a", encoding="utf-8") as jfh:
        for path in bar:
            rel = path.relative_to(src_root).as_posix()
            stat = path.stat()
            fingerprint = [stat.st_size, stat.st_mtime_ns]
            old = journal.get(rel)
            if old and old.get("key") == key and old.get("source_stat") == fingerprint and _outputs_exist(dst_root, old):
                records.append(old)
                resumed += 1
                continue
            rec = _prep_one(path, rel, dst_root, names[path], settings, device=device)
            rec.update(key=key, source_stat=fingerprint)
            if old:
                _remove_stale(dst_root, old, keep=rec)
            jfh.write(json.dumps(rec) + "\n")
            jfh.flush()
            records.append(rec)
            if progress:
                bar.set_postfix(faces=sum(len(r["outputs"]) for r in records), dropped=sum(1 for r in records if r["dropped"]))
    return _write_summary(src_root, dst_root, settings, records, resumed)


def _output_stems(root: Path, sources: Iterable[Path]) -> dict[Path, Path]:
    """Output path stem (relative folder + name, no extension) per source; clashing stems keep their
    extension so ``a.jpg`` and ``a.png`` do not overwrite each other."""
    by_stem: dict[tuple[str, str], list[Path]] = {}
    for p in sources:
        rel = p.relative_to(root)
        by_stem.setdefault((rel.parent.as_posix(), p.stem.lower()), []).append(rel)
    out: dict[Path, Path] = {}
    for (_, _), rels in by_stem.items():
        for rel in rels:
            stem = rel.stem if len(rels) == 1 else f"{rel.stem}_{rel.suffix.lstrip('.').lower()}"
            out[root / rel] = rel.parent / stem
    return out


def _prep_one(path: Path, rel: str, dst_root: Path, out_stem_rel: Path, s: PrepSettings, *, device: str | None) -> dict[str, Any]:
    """Process one source; returns its journal record (outputs written, or why it was dropped)."""
    rec: dict[str, Any] = {"source": rel, "outputs": [], "dropped": None, "detail": "", "faces_detected": 0}
    try:
        image = load_rgb(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is "unreadable"
        rec.update(dropped="unreadable", detail=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
        return rec
    faces = _detect(image, s, device=device)
    rec["faces_detected"] = len(faces)
    if not faces:
        rec.update(dropped="no_face", detail=f"no face with score >= {s.min_score}")
        return rec
    big = sorted((f for f in faces if f.size >= s.min_face), key=lambda f: -f.size)
    if not big:
        rec.update(dropped="face_too_small", detail=f"largest face {max(f.size for f in faces):.0f} px < --min-face {s.min_face}")
        return rec
    if s.faces == "one-only" and len(big) > 1:
        rec.update(dropped="multiple_faces", detail=f"{len(big)} faces of at least {s.min_face} px")
        return rec
    keep = big if s.faces == "all" else big[:1]
    rec["faces_skipped_small"] = len(faces) - len(big)
    for k, face in enumerate(keep):
        stem = out_stem_rel.name + (f"_{k}" if s.faces == "all" else "")
        base = out_stem_rel.parent / stem
        _write_face(image, face, dst_root, base, rel, k, len(big), s)
        rec["outputs"].append(base.name)
    rec["folder"] = out_stem_rel.parent.as_posix()
    return rec


def _detect(image: Any, s: PrepSettings, *, device: str | None) -> list[Face]:
    """Detect on a copy whose long side is at most ``detect_max_side`` (speed, memory), then map
    boxes and landmarks back to source pixels."""
    from PIL import Image

    w, h = image.size
    scale = 1.0
    probe = image
    if s.detect_max_side and max(w, h) > s.detect_max_side:
        scale = s.detect_max_side / max(w, h)
        probe = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    faces = detect_faces(probe, min_score=s.min_score, backend=s.detector, device=device)
    if scale == 1.0:
        return faces
    sx, sy = w / probe.size[0], h / probe.size[1]
    return [Face(box=(f.box[0] * sx, f.box[1] * sy, f.box[2] * sx, f.box[3] * sy), score=f.score,
                 landmarks=f.landmarks * np.array([sx, sy])) for f in faces]


def _write_face(image: Any, face: Face, root: Path, base: Path, rel: str, index: int, n_faces: int, s: PrepSettings) -> None:
    """Crop, mask, metadata (and the debug overlay) for one face; each file atomically, the JSON
    last so that its presence means the set is complete."""
    aligned = align_face(image, face.landmarks, s.size, box=face.box)
    mask = face_mask(aligned.landmarks, (s.size, s.size))
    img_path = root / base.with_name(base.name + ".png")
    atomic_write_png(aligned.image, img_path)
    save_mask(mask, root / base.with_name(base.name + MASK_SUFFIX))
    if s.debug_masks:
        atomic_write_png(mask_debug_image(aligned.image, mask, aligned.landmarks),
                         root / DEBUG_DIR / base.with_name(base.name + ".png"))
    meta = {
        "source": rel,
        "face_index": index,
        "faces_in_source": n_faces,
        "score": round(face.score, 6),
        "size": s.size,
        "box": [round(v, 2) for v in aligned.box],
        "landmarks": {n: [round(float(x), 2), round(float(y), 2)] for n, (x, y) in zip(LANDMARK_NAMES, aligned.landmarks)},
        "source_box": [round(float(v), 2) for v in face.box],
        "source_landmarks": {n: [round(float(x), 2), round(float(y), 2)] for n, (x, y) in zip(LANDMARK_NAMES, face.landmarks)},
        "source_to_crop": [[round(float(v), 8) for v in row] for row in aligned.matrix],
        "pad_fraction": round(aligned.pad_fraction, 4),
        "roll_degrees": round(face.roll_degrees, 2),
        "mask": base.name + MASK_SUFFIX,
        "detector": s.detector,
    }
    atomic_write_json(root / base.with_name(base.name + ".json"), meta)


def _outputs_exist(dst_root: Path, rec: dict[str, Any]) -> bool:
    folder = dst_root / rec.get("folder", "")
    for name in rec.get("outputs", []):
        for suffix in (".png", MASK_SUFFIX, ".json"):
            if not (folder / (name + suffix)).is_file():
                return False
    return True


def _remove_stale(dst_root: Path, old: dict[str, Any], *, keep: dict[str, Any]) -> None:
    """Delete files an earlier run wrote for this source that the new settings no longer produce
    (e.g. ``a_1.png`` after switching from --all-faces to the largest face)."""
    current = {(keep.get("folder", ""), n) for n in keep.get("outputs", [])}
    folder = old.get("folder", "")
    for name in old.get("outputs", []):
        if (folder, name) in current:
            continue
        for p in (dst_root / folder / (name + ".png"), dst_root / folder / (name + MASK_SUFFIX),
                  dst_root / folder / (name + ".json"), dst_root / DEBUG_DIR / folder / (name + ".png")):
            if p.is_file():
                p.unlink()


def _read_journal(path: Path) -> dict[str, dict[str, Any]]:
    """Last record per source; a torn last line (killed mid-write) is ignored."""
    out: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return out
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "source" in rec:
                out[rec["source"]] = rec
    return out


def _write_summary(src: Path, dst: Path, s: PrepSettings, records: list[dict[str, Any]], resumed: int) -> PrepResult:
    dropped = [{"source": r["source"], "reason": r["dropped"], "detail": r.get("detail", "")} for r in records if r["dropped"]]
    by_reason: dict[str, int] = {}
    for d in dropped:
        by_reason[d["reason"]] = by_reason.get(d["reason"], 0) + 1
    written = [r for r in records if r["outputs"]]
    faces_written = sum(len(r["outputs"]) for r in written)
    summary = {
        "source_folder": str(src),
        "output_folder": str(dst),
        "settings": asdict(s),
        "counts": {
            "sources": len(records),
            "images_with_faces": len(written),
            "faces_written": faces_written,
            "dropped": len(dropped),
            "resumed": resumed,
        },
        "dropped_by_reason": by_reason,
        "reasons": {k: DROP_REASONS[k] for k in by_reason},
        "dropped": dropped,
        "written": [{"source": r["source"], "outputs": [f"{(Path(r.get('folder', '')) / n).as_posix()}.png" for n in r["outputs"]]} for r in written],
    }
    path = atomic_write_json(dst / SUMMARY_NAME, summary)
    return PrepResult(dst=dst, summary_path=path, sources=len(records), faces_written=faces_written,
                      images_with_faces=len(written), resumed=resumed, dropped=dropped, summary=summary)

