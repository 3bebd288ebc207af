"""One FID/KID result, whoever computes or shows it.

:func:`.stats.compare` returns a :class:`FIDResult`; the ``eval fid`` CLI (``--json`` is
:meth:`FIDResult.to_dict`), the evaluation table (each row of ``results.json``), the demo, the
ComfyUI FID nodes (the ``FID_RESULT`` socket) and the bar chart (:func:`.report.fid_bar_chart`)
all read the same fields. A result always carries N of both sides (FID is biased at small N:
compare only at equal N), the protocol each side was embedded with (extractor, weights SHA-256,
resize), and KID mean ± std when both sides have features -- with the std ``None`` where it means
nothing (see :func:`kid_std_or_none`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping


def kid_std_or_none(std: float, subset_size: int, n1: int, n2: int) -> float | None:
    """The KID std, or None when it means nothing: a subset as large as both sets is the whole
    set every time, so all subsets give the same value and the std is 0 by construction."""
    if subset_size >= n1 and subset_size >= n2:
        return None
    return std


@dataclass(frozen=True)
class FIDResult:
    """FID (and KID) of side A against side B."""

    fid: float
    n_a: int | None
    n_b: int | None
    kid_mean: float | None = None  # None: a side has only mu/sigma (no features)
    kid_std: float | None = None  # None: no KID, or every subset was the whole set
    kid_subsets: int | None = None
    kid_subset_size: int | None = None
    kid_seed: int | None = None
    a: str | None = None  # where side A came from (a folder, a stats file, "base", ...)
    b: str | None = None
    protocol_a: dict | None = None
    protocol_b: dict | None = None
    warnings: tuple[str, ...] = ()
    label: str = ""  # the name of this comparison (a table row, a chart bar)
    note: str | None = None

    @property
    def protocol(self) -> dict | None:
        """The protocol the features were made with (A's, else B's; they differ only with a warning)."""
        return self.protocol_a or self.protocol_b

    def labelled(self, label: str, *, note: str | None = None) -> "FIDResult":
        return replace(self, label=label, note=note if note is not None else self.note)

    def kid_text(self, *, scale: float = 1.0, digits: int = 6) -> str:
        """``mean ± std`` (times ``scale``); ``± n/a`` when the std is undefined, ``n/a`` without KID."""
        if self.kid_mean is None:
            return "n/a"
        std = "n/a" if self.kid_std is None else f"{scale * self.kid_std:.{digits}f}"
        return f"{scale * self.kid_mean:.{digits}f} ± {std}"

    def line(self, metric: str = "FID") -> str:
        """One line with the numbers and both N."""
        return f"{self.label or 'A vs B'}: {metric} {self.fid:.4f}, KID {self.kid_text()}, N = {self.n_a} / {self.n_b}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the ``eval fid --json`` output and a ``results.json`` row)."""
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FIDResult":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in data.items() if k in known}
        d["warnings"] = tuple(d.get("warnings") or ())
        return cls(**d)


def equal_n_warning(results: "list[FIDResult] | tuple[FIDResult, ...]") -> str | None:
    """A warning when results compared side by side were computed at different N."""
    if len({(r.n_a, r.n_b) for r in results}) > 1:
        return "different N: FID is biased at small N, compare at equal N"
    return None
