"""FID / KID nodes: a reference set, scoring IMAGE batches against it, and a comparison chart.

* **FID Reference** embeds a folder of real images (same path rule as the dataset: under ComfyUI's
  input folder or ``$FACEDIFFUSER_DATASET_ROOTS``) and optionally saves the statistics (with the
  features, so KID works) as ``models/fid_stats/<name>.npz``; or it loads an existing stats file from
  that folder (ours or pytorch-fid's).
* **FID / KID** scores an IMAGE batch against a reference. ``single``: this batch only.
  ``accumulate``: the batch is added to an on-disk feature bank ``output/facediffuser_fid_banks/<label>.npz``
  (identical images are counted once) and the whole bank is scored, so queueing the workflow k times
  evaluates k x batch images; ``reset`` empties the bank first. The numbers are exactly what
  ``facediffuser eval fid`` computes for the same images and reference (same extractor, float64
  maths, KID seed).
* **FID Compare** draws the results of several FID nodes (e.g. base vs base+LoRA) as a bar chart.

The ``FID_RESULT`` socket carries an :class:`..evaluation.fid_result.FIDResult` (the type the CLI
and the evaluation table use), and the chart is :func:`..evaluation.report.fid_bar_chart`.

The Inception weights (``weights-inception-2015-12-05-6726825d.pth``) are looked up in ComfyUI's
``models/inception`` folder(s), then ``$FACEDIFFUSER_INCEPTION`` and ``$TORCH_HOME/hub/checkpoints``;
when missing, the node error names the file and the folder to put it in.

The loaded Inception is one of ComfyUI's models (a ``ModelPatcher`` loaded with
``load_models_gpu``): ComfyUI moves it on and off the GPU with the others, and "unload models"
(``unload_all_models``, ``POST /free``) frees it; the next FID run loads it again.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from ..evaluation.inception import DEFAULT_RESIZE, RESIZE_MODES  # light: torch only inside functions
from ..evaluation.kid import DEFAULT_SUBSET_SIZE, DEFAULT_SUBSETS

log = logging.getLogger("facediffuser")

CATEGORY = "FaceDiffuser/evaluation"
COMPUTE_FROM_FOLDER = "(compute from folder)"
MODES = ("single", "accumulate")



# --- core glue (no ComfyUI; tests call these directly) -----------------------------------------------

def find_weights(folders: Sequence[str | os.PathLike]) -> Path:
    """The Inception weights in the first of ``folders`` that has them, else the standard search
    (``$FACEDIFFUSER_INCEPTION``, ``$TORCH_HOME``), whose error names ``folders[0]``."""
    from ..evaluation.inception import WEIGHTS_FILE_NAMES, find_inception_weights

    for folder in folders:
        for name in WEIGHTS_FILE_NAMES:
            p = Path(folder) / name
            if p.is_file():
                return p
    return find_inception_weights(None, models_dir=folders[0] if folders else None)


def make_reference(folder: str | os.PathLike | None, stats_file: str | os.PathLike | None, extractor_factory,
                   *, cache_dir: str | os.PathLike | None = None, save_to: str | os.PathLike | None = None) -> dict:
    """A reference: ``{"stats": FeatureStats, "source", "n", "resize"}`` from a stats file or a folder."""
    from ..evaluation.stats import FeatureStats, folder_features, load_stats, save_stats

    if stats_file is not None:
        stats = load_stats(stats_file)
        source = str(stats_file)
    else:
        if folder is None:
            raise UserError("FID reference: give a folder of real images or pick a stats file")
        extractor = extractor_factory()
        feats, protocol = folder_features(folder, extractor, cache_dir=cache_dir)
        stats = FeatureStats.from_features(feats, protocol=protocol, source=str(folder))
        source = str(folder)
        if save_to is not None:
            save_stats(stats, save_to, include_features=True)
    resize = (stats.protocol or {}).get("resize")
    return {"stats": stats, "source": source, "n": stats.n, "resize": resize, "saved_to": str(save_to) if save_to else None}


def score_images(images: Any, reference: dict, extractor: Any, *, mode: str = "single", bank_path: str | os.PathLike | None = None,
                 reset: bool = False, kid_subsets: int = DEFAULT_SUBSETS, kid_subset_size: int = DEFAULT_SUBSET_SIZE) -> tuple[Any, int | None]:
    """FID/KID of ``images`` (ComfyUI IMAGE or uint8 NCHW) against ``reference``, the way
    ``facediffuser eval fid`` computes them; in ``accumulate`` mode over the whole feature bank.
    Returns the :class:`FIDResult` and, in ``accumulate`` mode, how many images were new to the bank."""
    from ..evaluation.feature_bank import FeatureBank
    from ..evaluation.stats import FeatureStats, compare

    if mode not in MODES:
        raise UserError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
    if kid_subsets < 1 or kid_subset_size < 2:
        raise UserError("kid_subsets must be >= 1 and kid_subset_size >= 2")
    ref = reference["stats"]
    if mode == "single":
        feats = extractor(images)
        n = int(feats.shape[0])
        if n < 2:
            raise UserError(f"FID needs at least 2 images, got a batch of {n}: raise the batch size or use accumulate mode")
        gen = FeatureStats.from_features(feats, protocol=extractor.protocol(n), source="batch")
        return compare(gen, ref, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size), None
    if bank_path is None:
        raise UserError("accumulate mode needs a bank file")
    bank = FeatureBank.open(bank_path)
    if reset:
        bank.reset()
    added = bank.add_images(images, extractor)
    if len(bank) < 2:
        raise UserError(f"the bank {Path(bank_path).stem!r} holds {len(bank)} image(s); FID needs at least 2: queue again")
    return bank.compare(ref, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size), added


def summary_text(result: Any) -> str:
    """The FID node's text: the numbers, both N, how this run fed the bank, the warnings."""
    kid = "n/a (reference has no features)" if result.kid_mean is None else result.kid_text()
    lines = [f"{result.label}: FID {result.fid:.4f}  KID {kid}",
             f"N = {result.n_a} generated vs {result.n_b} reference" + (f" ({result.note})" if result.note else ""),
             "FID is biased at small N: compare only at equal N"]
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def _cache_dir() -> Path:
    from ..evaluation.stats import CACHE_ENV_VAR, default_cache_dir

    from .paths import comfy_output_dir

    if os.environ.get(CACHE_ENV_VAR):
        return default_cache_dir()
    return comfy_output_dir() / "facediffuser_cache" / "features"


class _ManagedInception:
    """The FID nodes' Inception, owned by ComfyUI's model management rather than by this module.

    Holds at most one ``ModelPatcher`` (a new weights file or resize mode replaces it) and lets go
    of it when ComfyUI unloads it ("unload models", or memory needed for other models), so that
    ComfyUI's unload really frees it; the next FID run loads it again. Between prompts it stays
    loaded, like a checkpoint a loader node holds. Today's ComfyUI reports a full unload through
    the patcher's ``ON_DETACH`` callback; older ComfyUI (e.g. 2024-03) has no callbacks, and there
    every ``unpatch_model`` with its weights is an unload (``LoadedModel.model_unload``)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._patcher: Any = None

    def get(self, weights: Path, resize: str) -> Any:
        """The InceptionFeatures, its weights loaded on ComfyUI's device (loaded first if needed)."""
        import comfy.model_management as mm

        st = Path(weights).stat()
        key = (str(Path(weights).resolve()), st.st_size, st.st_mtime_ns, resize)
        patcher = self._patcher if key == self._key else None
        if patcher is None:
            patcher = self._new_patcher(weights, resize)
            self._key = key
        mm.load_models_gpu([patcher])
        return patcher.facediffuser_extractor

    def clear(self) -> None:
        self._key = self._patcher = None

    def _new_patcher(self, weights: Path, resize: str) -> Any:
        import comfy.model_management as mm

        from ..evaluation.inception import InceptionFeatures

        self.clear()
        offload = mm.unet_offload_device()
        extractor = InceptionFeatures(weights, device=offload, resize=resize, progress=False)
        patcher = _patcher_class()(extractor.model, mm.get_torch_device(), offload)
        patcher.facediffuser_extractor = extractor
        if _has_detach_callbacks():
            from comfy.patcher_extension import CallbacksMP

            patcher.add_callback(CallbacksMP.ON_DETACH, self._on_detach)
        self._patcher = patcher
        return patcher

    def _on_detach(self, patcher: Any, unpatch_all: bool = True) -> None:
        # A partial unload or a re-load detaches without unpatch_all: only a full unload lets go.
        if unpatch_all and self._patcher is patcher:
            _detach_cleanup_finalizer(patcher)
            self.clear()
            log.debug("FaceDiffuser FID: Inception unloaded by ComfyUI")


def _detach_cleanup_finalizer(patcher: Any) -> None:
    """Today's ComfyUI runs ``cleanup_models()`` when a loaded module is garbage-collected; our
    module dies as soon as the slot lets go, inside ComfyUI's own unload, which would then remove
    its entry twice (``IndexError`` in ``free_memory``). The finalizer is detached first, as
    ``LoadedModel.model_unload`` does itself right after the detach."""
    import comfy.model_management as mm

    for loaded in list(mm.current_loaded_models):
        finalizer = getattr(loaded, "model_finalizer", None)
        if finalizer is not None and loaded.model is patcher:
            finalizer.detach()


def _has_detach_callbacks() -> bool:
    try:
        from comfy.patcher_extension import CallbacksMP
    except ImportError:
        return False
    from comfy.model_patcher import ModelPatcher

    return hasattr(CallbacksMP, "ON_DETACH") and hasattr(ModelPatcher, "add_callback")


@functools.lru_cache(maxsize=1)  # a class, not a model
def _patcher_class() -> type:
    from comfy.model_patcher import ModelPatcher

    callbacks = _has_detach_callbacks()

    class InceptionPatcher(ModelPatcher):
        """ComfyUI's ModelPatcher; on a ComfyUI without ``ON_DETACH`` it tells the slot of an unload."""

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            out = super().unpatch_model(device_to, unpatch_weights=unpatch_weights)
            if not callbacks and unpatch_weights:
                _INCEPTION._on_detach(self, True)
            return out

    return InceptionPatcher


_INCEPTION = _ManagedInception()


def _comfy_extractor_factory(resize: str):
    import folder_paths

    from .paths import INCEPTION_FOLDER, register_model_folders

    def make():
        register_model_folders()
        weights = find_weights(folder_paths.get_folder_paths(INCEPTION_FOLDER))
        return _INCEPTION.get(weights, resize)

    return make


# --- nodes ----------------------------------------------------------------------------------------

class FaceDiffuserFIDReference:
    DESCRIPTION = ("Reference statistics for FID/KID: embed a folder of real images (under ComfyUI's input folder, "
                   "or $FACEDIFFUSER_DATASET_ROOTS) and optionally save them as models/fid_stats/<save_as>.npz, "
                   "or load an existing stats file from models/fid_stats. Needs the FID Inception weights in models/inception.")
    CATEGORY = CATEGORY
    FUNCTION = "reference"
    RETURN_TYPES = ("FID_REFERENCE", "STRING")
    RETURN_NAMES = ("reference", "info")
    OUTPUT_TOOLTIPS = ("Reference statistics for the FID / KID node.", "Where the reference came from and its N.")

    @classmethod
    def INPUT_TYPES(cls):
        from .paths import FID_STATS_FOLDER, comfy_filename_list

        return {
            "required": {
                "folder": ("STRING", {"default": "real_faces", "tooltip": "Folder of real face images, relative to ComfyUI's input folder (ignored when a stats file is picked)."}),
                "stats_file": ([COMPUTE_FROM_FOLDER] + comfy_filename_list(FID_STATS_FOLDER), {"tooltip": "A saved reference (.npz in models/fid_stats), or compute it from the folder."}),
                "save_as": ("STRING", {"default": "", "tooltip": "When computing from the folder: also save the stats as models/fid_stats/<save_as>.npz (empty = do not save)."}),
                "resize": (list(RESIZE_MODES), {"default": DEFAULT_RESIZE, "tooltip": "Resize convention of the Inception input: "
                                                + "; ".join(f"{k} = {v}" for k, v in RESIZE_MODES.items())}),
            },
        }

    def reference(self, folder, stats_file, save_as, resize):
        from .paths import FID_STATS_FOLDER, comfy_folder_path, comfy_full_path, comfy_user_folder, stats_file_name

        if resize not in RESIZE_MODES:
            raise UserError(f"resize must be one of {', '.join(RESIZE_MODES)}")
        if stats_file and stats_file != COMPUTE_FROM_FOLDER:
            ref = make_reference(None, comfy_full_path(FID_STATS_FOLDER, stats_file, what="stats file"), None)
        else:
            path = comfy_user_folder(folder, what="reference folder")
            save_to = comfy_folder_path(FID_STATS_FOLDER) / stats_file_name(save_as) if str(save_as).strip() else None
            ref = make_reference(path, None, _comfy_extractor_factory(resize), cache_dir=_cache_dir(), save_to=save_to)
        ref["resize"] = ref["resize"] or resize
        text = f"reference: {ref['source']} (N = {ref['n']}, resize {ref['resize']})"
        if ref.get("saved_to"):
            text += f"; saved to {ref['saved_to']}"
        if ref["stats"].features is None:
            text += "; no features stored: KID not available"
        log.info("FaceDiffuser FID reference: %s", text)
        return {"ui": {"text": [text]}, "result": (ref, text)}


class FaceDiffuserFID:
    DESCRIPTION = ("FID and KID of an IMAGE batch against a reference. single: this batch only. accumulate: adds the "
                   "batch to the feature bank output/facediffuser_fid_banks/<label>.npz (each distinct image once) and "
                   "scores the whole bank, so queueing k times evaluates k x batch images; reset empties the bank "
                   "first. Same numbers as `facediffuser eval fid` on the same images. Always reports N: FID is biased at small N.")
    CATEGORY = CATEGORY
    FUNCTION = "score"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING", "FID_RESULT")
    RETURN_NAMES = ("fid", "kid", "summary", "result")
    OUTPUT_TOOLTIPS = ("Fréchet Inception Distance (lower is better).", "Kernel Inception Distance, mean over subsets (NaN without reference features).",
                       "The numbers with N and warnings.", "The result, for FID Compare.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Generated images to score."}),
                "reference": ("FID_REFERENCE", {"tooltip": "From FID Reference."}),
                "label": ("STRING", {"default": "base", "tooltip": "Name of this series (chart label); in accumulate mode also the feature bank's name."}),
                "mode": (list(MODES), {"default": "single", "tooltip": "single: score this batch; accumulate: add it to the bank and score the bank."}),
                "reset": ("BOOLEAN", {"default": False, "tooltip": "accumulate: empty the bank before adding this batch."}),
                "kid_subsets": ("INT", {"default": DEFAULT_SUBSETS, "min": 1, "max": 10000, "tooltip": "KID: number of random subsets."}),
                "kid_subset_size": ("INT", {"default": DEFAULT_SUBSET_SIZE, "min": 2, "max": 100000, "tooltip": "KID: subset size (capped at the smaller N)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, mode="single", **kwargs):
        # accumulate depends on the bank on disk: always run (the bank counts each image once).
        return float("nan") if mode == "accumulate" else ""

    def score(self, images, reference, label, mode, reset, kid_subsets, kid_subset_size):
        from .paths import BANKS_SUBDIR, bank_file_name, comfy_output_dir

        resize = reference.get("resize") or DEFAULT_RESIZE
        extractor = _comfy_extractor_factory(resize)()
        bank = comfy_output_dir() / BANKS_SUBDIR / bank_file_name(label) if mode == "accumulate" else None
        res, added = score_images(images, reference, extractor, mode=mode, bank_path=bank, reset=bool(reset),
                                  kid_subsets=int(kid_subsets), kid_subset_size=int(kid_subset_size))
        res = res.labelled(str(label), note=mode + (f", {added} new this run" if added is not None else ""))
        text = summary_text(res)
        log.info("FaceDiffuser FID: %s", text.replace("\n", "; "))
        kid = float("nan") if res.kid_mean is None else float(res.kid_mean)
        ui = {"text": [text], "fid": [res.fid], "kid": [res.kid_mean], "n": [res.n_a]}
        return {"ui": ui, "result": (res.fid, kid, text, res)}


class FaceDiffuserFIDCompare:
    DESCRIPTION = "Bar chart (IMAGE) and table of several FID / KID results, e.g. base vs base+LoRA, each with its N."
    CATEGORY = CATEGORY
    FUNCTION = "compare"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("chart", "table")
    OUTPUT_TOOLTIPS = ("FID and KID bars.", "The numbers as text.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "result_1": ("FID_RESULT", {"tooltip": "A result from an FID / KID node."}),
                "result_2": ("FID_RESULT", {"tooltip": "Another result to compare with."}),
            },
            "optional": {
                "result_3": ("FID_RESULT", {"tooltip": "Optional third result."}),
                "result_4": ("FID_RESULT", {"tooltip": "Optional fourth result."}),
            },
        }

    def compare(self, result_1, result_2, result_3=None, result_4=None):
        import torch

        from ..evaluation.fid_result import equal_n_warning
        from ..evaluation.report import fid_bar_chart

        rows = [r for r in (result_1, result_2, result_3, result_4) if r is not None]
        chart = fid_bar_chart(rows)
        table = "\n".join(r.line() for r in rows)
        if equal_n_warning(rows):
            table += f"\nwarning: {equal_n_warning(rows)}"
        image = torch.from_numpy(chart.astype("float32") / 255.0)[None]
        return {"ui": {"text": [table]}, "result": (image, table)}


NODE_CLASS_MAPPINGS = {
    "FaceDiffuserFIDReference": FaceDiffuserFIDReference,
    "FaceDiffuserFID": FaceDiffuserFID,
    "FaceDiffuserFIDCompare": FaceDiffuserFIDCompare,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FaceDiffuserFIDReference": "FID Reference (FaceDiffuser)",
    "FaceDiffuserFID": "FID / KID (FaceDiffuser)",
    "FaceDiffuserFIDCompare": "FID Compare chart (FaceDiffuser)",
}
