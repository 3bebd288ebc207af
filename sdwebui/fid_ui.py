"""The "FaceDiffuser FID" accordion in txt2img / img2img: its gradio widgets and processing hooks.

The entry script's ``Script`` subclass delegates here. Its arguments (the API's
``alwayson_scripts["FaceDiffuser FID"]["args"]``) are, in order: ``enabled`` (bool, default
False), ``reference`` (a file name in ``models/fid_stats``, or ``"(none)"``), ``real_folder`` (a
folder of real images, used when no stats file is picked; relative to the web UI's data folder),
``bank`` (name), ``mode`` (``"this batch"`` | ``"accumulate"``), ``reset`` (bool: empty the bank
before this generation).

Off means off: ``process`` returns at once when ``enabled`` is false (the web UI calls it for
every generation, also through the API) -- no model, no file, no import of the evaluation code.
Problems (no Inception weights, a bad reference) never stop the generation: the one-line reason
goes into the info panel instead of the numbers.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import UserError
from . import host
from .fid_session import DEFAULT_BANK, MODES, NO_REFERENCE, FIDArgs

log = logging.getLogger("facediffuser")

TITLE = "FaceDiffuser FID"
_ATTR = "_facediffuser_fid"  # the GenerationScore on the processing object
SKIP_ATTR = "_facediffuser_no_fid"  # set by the LoRA-vs-base script on its inner generations


def build_ui(is_img2img: bool, elem_id) -> list[Any]:
    """The accordion's widgets; returns the argument components in :class:`FIDArgs` order."""
    import gradio as gr

    from .fid_session import list_stats_files, reset_bank

    def choices() -> list[str]:
        return [NO_REFERENCE, *list_stats_files(host.stats_dir())]

    with gr.Accordion(TITLE, open=False, elem_id=elem_id("accordion")):
        with gr.Row():
            enabled = gr.Checkbox(label="Score the generated images (FID / KID)", value=False, elem_id=elem_id("enabled"))
            mode = gr.Radio(label="Score", choices=list(MODES), value=MODES[0], elem_id=elem_id("mode"))
        with gr.Row():
            reference = gr.Dropdown(label="Reference statistics (models/fid_stats)", choices=choices(), value=NO_REFERENCE,
                                    elem_id=elem_id("reference"))
            refresh = gr.Button(value="Refresh list", elem_id=elem_id("refresh"))
            real_folder = gr.Textbox(label="...or a folder of real images (embedded once, saved to fid_stats)", value="",
                                     placeholder="/path/to/real_faces", elem_id=elem_id("real_folder"))
        with gr.Row():
            bank = gr.Textbox(label="Bank name (accumulate)", value=DEFAULT_BANK, elem_id=elem_id("bank"))
            reset = gr.Checkbox(label="Reset the bank before this generation", value=False, elem_id=elem_id("reset"))
            reset_now = gr.Button(value="Reset bank now", elem_id=elem_id("reset_now"))
        status = gr.Markdown("")
        refresh.click(fn=lambda: gr.update(choices=choices()), inputs=[], outputs=[reference])

        def do_reset(name: str) -> str:
            try:
                return reset_bank(host.banks_dir(), name)
            except UserError as exc:
                return f"error: {exc}"

        reset_now.click(fn=do_reset, inputs=[bank], outputs=[status])
    return [enabled, reference, real_folder, bank, mode, reset]


def _report_error(p: Any, text: str) -> None:
    """Into the log, the info panel, and the response/infotext (so an API client sees it too)."""
    log.warning("%s", text)
    if hasattr(p, "comment"):
        p.comment(text)
    p.extra_generation_params["FaceDiffuser FID error"] = text  # the web UI quotes values with commas


def on_process(p: Any, values: tuple) -> None:
    """Before generation: set up the score (reference, extractor, bank) when enabled."""
    setattr(p, _ATTR, None)
    if getattr(p, SKIP_ATTR, False):
        return
    if not values or not values[0]:
        # Scoring is off: the Inception held for it goes, so the web UI gets its memory back.
        from .fid_session import release_extractor

        release_extractor()
        return
    try:
        args = FIDArgs.from_values(values)
        from .fid_session import GenerationScore, get_extractor, load_reference

        def extractor():
            return get_extractor(host.inception_dir(), device=host.device())

        reference, name = load_reference(args, stats_dir=host.stats_dir(), extractor_factory=extractor,
                                         cache_dir=host.feature_cache_dir(), base_dir=host.data_dir())
        setattr(p, _ATTR, GenerationScore(args, reference, name, extractor(), banks_dir=host.banks_dir()))
    except UserError as exc:
        _report_error(p, f"FaceDiffuser FID: {exc}")


def on_batch(p: Any, images: list) -> None:
    """After each decoded batch (float [0, 1] CHW tensors): score, and put the numbers into the
    parameters of the images saved from here on (the whole generation when batch count is 1)."""
    score = getattr(p, _ATTR, None)
    if score is None or not images:
        return
    import torch

    try:
        score.add(torch.stack([img.detach().float().cpu() for img in images]))
    except UserError as exc:
        setattr(p, _ATTR, None)
        _report_error(p, f"FaceDiffuser FID: {exc}")
        return
    p.extra_generation_params.update(score.infotext())


def on_postprocess(p: Any, processed: Any) -> None:
    """The summary line (FID, KID ± std, N on both sides) into the info panel."""
    score = getattr(p, _ATTR, None)
    if score is None:
        return
    setattr(p, _ATTR, None)
    line = score.summary()
    log.info("%s", line)
    processed.comments = (processed.comments or "") + line + "\n"
