"""The "FaceDiffuser FID" accordion's logic: reference, feature banks, scoring, infotext.

The web UI adapter (``scripts/facediffuser_webui.py``) creates one :class:`GenerationScore` per
generation (one click, or one API request) when the accordion is on, feeds it each decoded batch
(``postprocess_batch_list``), and writes :meth:`GenerationScore.infotext` into the images'
parameters and :meth:`GenerationScore.summary` into the info panel. Modes:

* ``this batch`` -- every image of this generation (batch count x batch size), nothing kept;
* ``accumulate`` -- the images are added to the named feature bank ``<banks>/<bank>.npz`` (each
  distinct image once, by pixel hash) and the whole bank is scored, so k generations of b images
  are scored as k x b images. :func:`reset_bank` empties it.

The reference is a stats file (``models/fid_stats/*.npz``, ours or pytorch-fid's) or a folder of
real images, embedded once (the feature cache keys it by content) and saved as
``models/fid_stats/<folder name>.npz`` so it appears in the list next time. The numbers equal
``facediffuser eval fid`` on the same images (same extractor, float64 maths, KID seed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import UserError
from ..nodes.paths import bank_file_name, stats_file_name

if TYPE_CHECKING:
    from ..evaluation.fid_result import FIDResult

log = logging.getLogger("facediffuser")

MODES = ("this batch", "accumulate")
NO_REFERENCE = "(none)"
DEFAULT_BANK = "default"
INFOTEXT_KEYS = ("FaceDiffuser FID", "FaceDiffuser KID", "FaceDiffuser N", "FaceDiffuser reference", "FaceDiffuser bank")


@dataclass(frozen=True)
class FIDArgs:
    """The accordion's values, in the order of its components (= the API's ``args``)."""

    enabled: bool = False
    reference: str = NO_REFERENCE  # a file name in the fid_stats folder
    real_folder: str = ""  # used when no stats file is picked
    bank: str = DEFAULT_BANK
    mode: str = MODES[0]
    reset: bool = False  # accumulate: empty the bank before this generation

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> "FIDArgs":
        """From the script's ``*args`` (UI values or an API ``args`` list, possibly shorter)."""
        names = [f for f in cls.__dataclass_fields__]
        d = {n: v for n, v in zip(names, values) if v is not None}
        args = cls(**d)
        if args.mode not in MODES:
            raise UserError(f"FaceDiffuser FID: mode must be one of {', '.join(repr(m) for m in MODES)} (got {args.mode!r})")
        return args


def list_stats_files(stats_dir: str | os.PathLike) -> list[str]:
    """The ``.npz`` files in the fid_stats folder (sorted names, subfolders as ``a/b.npz``)."""
    root = Path(stats_dir)
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.npz") if p.is_file())


def _find_user_folder(text: str, base: Path | None) -> Path:
    p = Path(text.strip()).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    if not p.is_dir():
        raise UserError(f"FaceDiffuser FID: real-image folder {text!r} not found (looked for {p})")
    return p


_STATS_MEMO: dict[tuple, Any] = {}


def load_reference(args: FIDArgs, *, stats_dir: str | os.PathLike, extractor_factory: Callable[[], Any],
                   cache_dir: str | os.PathLike | None = None, base_dir: str | os.PathLike | None = None) -> tuple[Any, str]:
    """``(FeatureStats, name)`` of the reference: the picked stats file, else the real-image folder
    (embedded once via the content-keyed cache, then saved into ``stats_dir``)."""
    from ..evaluation.stats import FeatureStats, folder_features, load_stats, save_stats

    stats_dir = Path(stats_dir)
    if args.reference and args.reference != NO_REFERENCE:
        path = (stats_dir / args.reference).resolve()
        if stats_dir.resolve() not in path.parents or not path.is_file():
            raise UserError(f"FaceDiffuser FID: reference {args.reference!r} not found in {stats_dir}")
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _STATS_MEMO:
            _STATS_MEMO.clear()  # one reference in memory (a stats file with features is tens of MB)
            _STATS_MEMO[key] = load_stats(path)
        return _STATS_MEMO[key], args.reference
    if not str(args.real_folder or "").strip():
        raise UserError(f"FaceDiffuser FID: choose a reference -- a stats file from {stats_dir} or a folder of real images")
    folder = _find_user_folder(str(args.real_folder), Path(base_dir) if base_dir else None)
    feats, protocol = folder_features(folder, extractor_factory(), cache_dir=cache_dir)
    stats = FeatureStats.from_features(feats, protocol=protocol, source=str(folder))
    name = _saved_name(stats_dir, folder.name or "reference", protocol.get("images_sha256", ""))
    target = stats_dir / name
    if not target.is_file():
        stats_dir.mkdir(parents=True, exist_ok=True)
        save_stats(stats, target, include_features=True)
        log.info("FaceDiffuser FID: saved the reference %s (N = %d) as %s", folder, stats.n, target)
    return stats, name


def _saved_name(stats_dir: Path, base: str, digest: str) -> str:
    """``<folder>.npz``, unless that file holds another image set: then ``<folder>-<digest8>.npz``."""
    import json

    import numpy as np

    name = stats_file_name(base.replace("/", "_"))
    path = stats_dir / name
    if not path.is_file():
        return name
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = json.loads(str(z["protocol"])).get("images_sha256") if "protocol" in z.files else None
    except (OSError, ValueError, KeyError, EOFError):
        stored = None
    return name if stored == digest else stats_file_name(f"{Path(name).stem}-{digest[:8]}")


def bank_path(banks_dir: str | os.PathLike, bank: str) -> Path:
    return Path(banks_dir) / bank_file_name(str(bank or DEFAULT_BANK).strip() or DEFAULT_BANK)


def reset_bank(banks_dir: str | os.PathLike, bank: str) -> str:
    """Empty a bank now (the accordion's Reset button); returns a line for the UI."""
    from ..evaluation.feature_bank import FeatureBank

    path = bank_path(banks_dir, bank)
    if not path.is_file():
        return f"bank {bank!r} is already empty"
    b = FeatureBank.open(path)
    n = len(b)
    b.reset()
    return f"bank {bank!r} reset ({n} image{'s' if n != 1 else ''} forgotten)"


def bank_size(banks_dir: str | os.PathLike, bank: str) -> int:
    from ..evaluation.feature_bank import FeatureBank

    path = bank_path(banks_dir, bank)
    return len(FeatureBank.open(path)) if path.is_file() else 0


@dataclass
class GenerationScore:
    """FID/KID of one generation's images (or of the bank they are added to)."""

    args: FIDArgs
    reference: Any  # FeatureStats
    reference_name: str
    extractor: Any  # InceptionFeatures (or any callable images -> features with .protocol())
    banks_dir: Path | None = None
    _features: list = field(default_factory=list)
    _bank: Any = None
    result: "FIDResult | None" = None
    added: int = 0
    seen: int = 0
    note: str | None = None

    def __post_init__(self) -> None:
        if self.args.mode == "accumulate":
            from ..evaluation.feature_bank import FeatureBank

            if self.banks_dir is None:
                raise UserError("FaceDiffuser FID: accumulate mode needs a folder for the banks")
            path = bank_path(self.banks_dir, self.args.bank)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._bank = FeatureBank.open(path)
            if self.args.reset:
                self._bank.reset()

    def add(self, images: Any) -> "FIDResult | None":
        """Add a batch (uint8 NCHW, or float [0,1] CHW/NCHW as the web UI decodes them) and
        rescore. Returns the result, or None while fewer than 2 images are available."""
        from ..evaluation.images import to_uint8_nchw

        x = to_uint8_nchw(images)
        self.seen += int(x.shape[0])
        if self._bank is not None:
            self.added += self._bank.add_images(x, self.extractor)
        else:
            self._features.append(self.extractor(x))
            self.added += int(x.shape[0])
        return self._score()

    def _score(self) -> "FIDResult | None":
        from ..evaluation.stats import FeatureStats, compare

        if self._bank is not None:
            if len(self._bank) < 2:
                self.note = f"bank {self.args.bank!r} holds {len(self._bank)} image; FID needs 2: generate again"
                return None
            self.result = self._bank.compare(self.reference)
            return self.result
        import torch

        feats = torch.cat(self._features)
        if feats.shape[0] < 2:
            self.note = "FID needs at least 2 images: raise the batch size or count, or use accumulate"
            return None
        gen = FeatureStats.from_features(feats, protocol=self.extractor.protocol(int(feats.shape[0])), source="this batch")
        self.result = compare(gen, self.reference)
        return self.result

    @property
    def n_generated(self) -> int | None:
        return None if self.result is None else self.result.n_a

    @property
    def n_reference(self) -> int | None:
        return None if self.result is None else self.result.n_b

    def infotext(self) -> dict[str, str]:
        """The parameters written into each image's infotext (no commas: they would be quoted)."""
        if self.result is None:
            return {}
        out = {
            "FaceDiffuser FID": f"{self.result.fid:.4f}",
            "FaceDiffuser KID": _kid_text(self.result),
            "FaceDiffuser N": f"{self.n_generated} generated vs {self.n_reference} reference",
            "FaceDiffuser reference": self.reference_name,
        }
        if self._bank is not None:
            out["FaceDiffuser bank"] = str(self.args.bank)
        return out

    def summary(self) -> str:
        """The line for the info panel (with N on both sides, and the small-N caveat)."""
        if self.result is None:
            return f"FaceDiffuser FID: {self.note or 'no images scored'}"
        where = f"bank {self.args.bank!r}, {self.added} new" if self._bank is not None else "this batch"
        text = (f"FaceDiffuser FID ({where}) vs {self.reference_name}: FID {self.result.fid:.4f}, "
                f"KID {_kid_text(self.result)}, N = {self.n_generated} generated / {self.n_reference} reference. "
                "FID is biased at small N: compare only at equal N.")
        for w in self.result.warnings:
            text += f" Warning: {w}."
        return text


def _kid_text(result: "FIDResult") -> str:
    return "n/a (the reference has no features)" if result.kid_mean is None else result.kid_text()


# --- the Inception extractor, one at a time -----------------------------------------------------

_EXTRACTOR: dict[tuple, Any] = {}


def get_extractor(inception_dir: str | os.PathLike, *, device: Any = None, resize: str = "tf1") -> Any:
    """The FID Inception from ``inception_dir`` (then $FACEDIFFUSER_INCEPTION, $TORCH_HOME), loaded
    once and kept while scoring is on (one at a time); a generation with the accordion off, the
    script's unload or :func:`release_extractor` lets it go."""
    from ..evaluation.inception import InceptionFeatures, find_inception_weights

    weights = find_inception_weights(None, models_dir=inception_dir)
    st = weights.stat()
    key = (str(weights.resolve()), st.st_size, st.st_mtime_ns, str(device), resize)
    if key not in _EXTRACTOR:
        _EXTRACTOR.clear()
        _EXTRACTOR[key] = InceptionFeatures(weights, device=device, resize=resize, batch_size=16, progress=False)
    return _EXTRACTOR[key]


def release_extractor() -> None:
    """Drop the loaded Inception (the web UI unloads the script, or the user turns scoring off)."""
    _EXTRACTOR.clear()
    _STATS_MEMO.clear()
