"""``eval table``: base vs fine-tuned vs held-out real faces — the seed study, done right.

The study this project grew from scored 300 images with pytorch-fid, took its "held-out" reals from
the training set and sampled the base model with 20 steps but the LoRA with 45. What this does instead:

* **Held-out reals.** The real folder is checked against the training-image digests the LoRA file
  records (:func:`..trainer.kohya_format.is_training_image`); any overlap is refused, or with
  ``allow_overlap`` reported loudly in every output. A LoRA that does not record its training set
  gets a warning that disjointness could not be verified.
* **Identical sampling.** Base and fine-tuned images come from one pipeline and one
  :class:`.generation.SamplerSettings` (same prompts, seeds, sampler, steps, CFG, size); both records
  are written to ``results.json`` and tests compare them.
* **N and a noise floor.** Every row states N of both sides; FID is biased at small N, so the table
  also gives Real vs Real (two disjoint real subsets) and KID (unbiased) mean ± std.
* **Protocol.** Extractor, weights SHA-256 and resize mode are recorded. The caller hands in the
  feature extractor (the CLI builds the FID Inception); a caller whose features are not the FID
  Inception's (the demo's stand-in) says so with a :class:`FeatureCaveat`, and every output then
  calls the distance FD, not FID, and carries the caveat.

Each row of ``results.json`` is a :class:`.fid_result.FIDResult` (``to_dict``).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UserError
from .generation import SamplerSettings
from .kid import DEFAULT_SEED, DEFAULT_SUBSET_SIZE, DEFAULT_SUBSETS

log = logging.getLogger("facediffuser.evaluation")

DEFAULT_PROMPT = "a photo of a face"
SCHEMA = "facediffuser.eval_table/2"


@dataclass
class TableConfig:
    """Inputs of one evaluation table."""

    model: str
    lora: str
    real: str
    out: str
    n: int = 100
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    prompts_file: str | None = None
    lora_scale: float = 1.0
    allow_overlap: bool = False
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 4
    kid_subsets: int = DEFAULT_SUBSETS
    kid_subset_size: int = DEFAULT_SUBSET_SIZE
    kid_seed: int = DEFAULT_SEED
    face_metrics: bool = True
    progress: bool = True


@dataclass(frozen=True)
class FeatureCaveat:
    """The caller's word that its features are not the FID Inception's (e.g. a demo's random-weight
    stand-in): every output then names the distance FD, not FID, and shows ``label`` and ``note``."""

    label: str  # short, for titles: "STAND-IN random-weight features"
    note: str  # one sentence: what the features are and why the numbers are not FID
    details: dict[str, Any] = field(default_factory=dict)  # recorded in results.json


# --- checks before any model is loaded ---------------------------------------------------------

def check_overlap(lora: str | os.PathLike, real_files: Sequence[Path], *, allow: bool) -> dict[str, Any]:
    """Compare the real images with the LoRA's recorded training set. Raises on overlap unless
    ``allow``; returns what was found (for results.json)."""
    from ..trainer.kohya_format import image_digest, read_lora_metadata, training_image_digests

    metadata = read_lora_metadata(lora)
    digests = training_image_digests(metadata)
    if digests is None:
        return {"checked": False, "n_overlap": None, "allowed": allow,
                "note": "the LoRA does not record its training images: cannot verify the real set is held out"}
    overlap = [p for p in real_files if image_digest(p) in digests]
    if overlap and not allow:
        raise UserError(
            f"{len(overlap)} of {len(real_files)} real images were in the LoRA's training set (e.g. {overlap[0]}); "
            "use a held-out folder, or pass --allow-overlap to measure memorisation knowingly"
        )
    return {"checked": True, "n_overlap": len(overlap), "allowed": allow, "n_training_images": len(digests),
            "overlapping_files": [str(p) for p in overlap[:20]]}


def choose_prompts(prompts_file: str | None, real_files: Sequence[Path], lora: str | os.PathLike) -> tuple[list[str], str]:
    """Prompts from the file; else the held-out reals' captions (``<stem>.txt``); else the LoRA's
    trigger word with the default template. Returns (prompts, where they came from)."""
    from ..trainer.captions import read_caption_file
    from ..trainer.kohya_format import META_TRIGGER, read_lora_metadata
    from ..sd.prompts import read_prompts

    if prompts_file:
        return read_prompts(prompts_file), f"file {prompts_file}"
    captions = []
    for p in real_files:
        cap = p.with_suffix(".txt")
        if cap.is_file():
            text = read_caption_file(cap)
            if text:
                captions.append(text)
    if captions:
        return captions, f"captions of the {len(captions)} held-out real images"
    metadata = read_lora_metadata(lora)
    trigger = metadata.get(META_TRIGGER) or metadata.get("modelspec.trigger_phrase")
    if trigger:
        return [f"{trigger}, {DEFAULT_PROMPT}"], "LoRA metadata (trigger word + default template)"
    return [DEFAULT_PROMPT], "default template (no prompts file, no captions, no trigger in the LoRA)"


def split_real(files: Sequence[Path], n: int) -> tuple[list[Path], list[Path], list[Path]]:
    """(reference for Real-vs-model rows, floor A, floor B) from files in canonical content order.

    With at least 2N images the floor compares two disjoint sets of N (the same N as the other rows);
    with fewer, it compares two halves and the table says the floor is at that smaller N."""
    files = list(files)
    ref = files[: min(n, len(files))]
    if len(files) >= 2 * n:
        return ref, files[:n], files[n: 2 * n]
    half = len(files) // 2
    return ref, files[:half], files[half: 2 * half]


# --- the table -----------------------------------------------------------------------------------

def _row(name: str, a_label: str, b_label: str, fa, fb, protocol: dict, cfg: TableConfig,
         note: str | None = None) -> dict[str, Any]:
    from .stats import FeatureStats, compare

    a = FeatureStats.from_features(fa, protocol=protocol, source=a_label)
    b = FeatureStats.from_features(fb, protocol=protocol, source=b_label)
    res = compare(a, b, kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size, seed=cfg.kid_seed)
    return res.labelled(name, note=note).to_dict()


def _image_batches(paths: Sequence[Path], batch_size: int = 16):
    """HxWx3 uint8 arrays in lists of ``batch_size``, read lazily: images may differ in size."""
    from .images import load_image

    for i in range(0, len(paths), batch_size):
        yield [load_image(p) for p in paths[i:i + batch_size]]


def _face_metrics(real: Sequence[Path], base: Sequence[Path], ft: Sequence[Path], notes: list[str],
                  device: str | None = None) -> dict[str, Any] | None:
    """Detection rate and framing (size, position, roll) of each set, base and fine-tuned compared
    with the real set; None (and a note saying why) when no face detector is installed."""
    try:
        from .face_metrics import face_metrics, face_stats

        ref = face_stats(_image_batches(list(real)), device=device)
        return {"detector": ref.detector, "min_score": ref.min_score, "real": ref.summary(),
                "base": face_metrics(_image_batches(list(base)), ref, device=device),
                "finetuned": face_metrics(_image_batches(list(ft)), ref, device=device)}
    except (UserError, ImportError) as exc:
        notes.append(f"face metrics skipped: {exc}")
        return None


def run_table(cfg: TableConfig, make_extractor: Callable[[], Any], *, caveat: FeatureCaveat | None = None) -> dict[str, Any]:
    """Generate, embed, compare, and write results.json, table.md, fid_bar_chart.png, samples_grid.png.

    ``make_extractor()`` builds the feature extractor (``protocol()`` and ``features_from_files()``,
    e.g. :class:`.inception.InceptionFeatures`); it is called after the input checks and before
    generation, so a missing weights file fails in a second. ``caveat``: see :class:`FeatureCaveat`."""
    from .generation import generate_pair
    from ..image_files import list_images
    from .images import image_set_digest
    from .report import write_table_outputs

    t0 = time.perf_counter()
    cfg.settings.validate()
    if cfg.n < 2:
        raise UserError(f"--n must be at least 2 (got {cfg.n}): FID needs a covariance")
    if not Path(cfg.model).exists():
        raise UserError(f"model not found: {cfg.model}")
    if not Path(cfg.lora).is_file():
        raise UserError(f"LoRA file not found: {cfg.lora}")
    out = Path(cfg.out)
    warnings: list[str] = []
    notes: list[str] = []

    real_files = list_images(cfg.real)
    overlap = check_overlap(cfg.lora, real_files, allow=cfg.allow_overlap)
    if overlap.get("n_overlap"):
        warnings.append(f"OVERLAP: {overlap['n_overlap']} of {len(real_files)} real images were training images "
                        "(--allow-overlap): Real-vs-Fine-tuned measures memorisation, not generalisation")
    elif not overlap["checked"]:
        warnings.append(overlap["note"])
    if len(real_files) < 4:
        raise UserError(f"need at least 4 real images (2 per half for the Real-vs-Real floor), got {len(real_files)} in {cfg.real}")
    real_digest, real_files = image_set_digest(real_files)  # canonical content order: names do not matter
    prompts, prompt_source = choose_prompts(cfg.prompts_file, real_files, cfg.lora)

    extractor = make_extractor()  # before generating: a missing weights file fails in a second
    protocol = extractor.protocol() | {"kid_subsets": cfg.kid_subsets, "kid_seed": cfg.kid_seed}
    if caveat is not None:
        warnings.insert(0, f"{caveat.label}: {caveat.note}")

    t_gen = time.perf_counter()
    pair = generate_pair(cfg.model, cfg.lora, prompts, cfg.settings, cfg.n, base_dir=out / "generated" / "base",
                         finetuned_dir=out / "generated" / "finetuned", lora_scale=cfg.lora_scale,
                         device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size, progress=cfg.progress)
    t_feat = time.perf_counter()

    ref, floor_a, floor_b = split_real(real_files, cfg.n)
    needed = sorted(set(ref) | set(floor_a) | set(floor_b), key=real_files.index)
    real_feats = dict(zip(needed, extractor.features_from_files(needed, desc="Inception real")))
    import numpy as np

    f_ref = np.stack([real_feats[p] for p in ref])
    f_base = extractor.features_from_files(pair.base_files, desc="Inception base")
    f_ft = extractor.features_from_files(pair.finetuned_files, desc="Inception fine-tuned")
    floor_note = None if len(floor_a) == cfg.n else (
        f"only {len(real_files)} real images (< 2N = {2 * cfg.n}): the floor compares two halves of {len(floor_a)}, "
        "so it is biased upward relative to the N-vs-N rows")
    rows = [
        _row("Real vs Base", "real", "base", f_ref, f_base, protocol, cfg),
        _row("Real vs Fine-tuned", "real", "finetuned", f_ref, f_ft, protocol, cfg),
        _row("Base vs Fine-tuned", "base", "finetuned", f_base, f_ft, protocol, cfg),
        _row("Real vs Real (noise floor)", "real A", "real B", np.stack([real_feats[p] for p in floor_a]),
             np.stack([real_feats[p] for p in floor_b]), protocol, cfg, note=floor_note),
    ]
    if floor_note:
        notes.append(floor_note)
    t_face = time.perf_counter()
    if cfg.face_metrics:
        faces = _face_metrics(ref, pair.base_files, pair.finetuned_files, notes, device=cfg.device)
    else:
        faces = None
        notes.append("face metrics skipped (--no-face-metrics)")

    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "features_caveat": asdict(caveat) if caveat is not None else None,
        "inputs": {"model": str(cfg.model), "lora": str(cfg.lora), "lora_scale": cfg.lora_scale, "real": str(cfg.real),
                   "n_real_images": len(real_files), "real_images_sha256": real_digest},
        "n": cfg.n,
        "protocol": protocol,
        "prompts": list(prompts),
        "prompt_source": prompt_source,
        "seeds": [r["seed"] for r in pair.base_record["images"]],
        "generation": {"base": pair.base_record, "finetuned": pair.finetuned_record},
        "rows": rows,
        "face_metrics": faces,
        "overlap": overlap,
        "warnings": warnings,
        "notes": notes,
        "files": {"base": [p.name for p in pair.base_files], "finetuned": [p.name for p in pair.finetuned_files],
                  "real_reference": [str(p) for p in ref]},
        "timings_s": {"generation": round(t_feat - t_gen, 2), "features_and_metrics": round(t_face - t_feat, 2),
                      "face_metrics": round(time.perf_counter() - t_face, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    write_table_outputs(results, out, real_files=ref, base_files=pair.base_files, finetuned_files=pair.finetuned_files)
    for w in warnings:
        log.warning("warning: %s", w)
    return results
