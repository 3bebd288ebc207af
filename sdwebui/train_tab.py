"""The "FaceDiffuser" tab (gradio): train a face LoRA into the web UI's Lora folder, prep faces,
build FID reference statistics. All work is done by :class:`.training_service.Jobs` in child
processes; this module only lays out widgets (every training setting generated from
``setting_specs()`` by :func:`.settings_form.form_fields`) and polls progress.
"""

from __future__ import annotations

from typing import Any

from ..errors import UserError
from . import host
from ..trainer.config import GROUPS
from .settings_form import form_fields
from .training_service import Jobs

TAB_TITLE = "FaceDiffuser"
_JOBS: Jobs | None = None


def jobs() -> Jobs:
    """The web UI process's one :class:`Jobs` (created on first use, from the web UI's folders)."""
    global _JOBS
    if _JOBS is None:
        from .requirements import OVERLAY_DIR

        _JOBS = Jobs(work_dir=host.work_dir(), lora_dir=host.lora_dir(), stats_dir=host.stats_dir(),
                     inception_dir=host.inception_dir(), overlay_dir=host.EXTENSION_DIR / OVERLAY_DIR,
                     package_dir=host.EXTENSION_DIR, base_dir=host.data_dir(), cpu_only=host.uses_cpu_only(),
                     on_lora_written=host.forget_lora_file)
    return _JOBS


def start_from_form(checkpoint_title: str, dataset: str, name: str, start_over: bool, values: dict[str, Any]) -> str:
    """The Start button (and the HTTP route): a message line; user errors come back as text."""
    try:
        return jobs().start_training(checkpoint=host.checkpoint_path(checkpoint_title), dataset=dataset, name=name,
                                     values=values, start_over=bool(start_over))
    except UserError as exc:
        return f"error: {exc}"


def _make(cls: Any, **kwargs: Any) -> Any:
    """``cls(**kwargs)`` without the keywords this gradio version does not have (A1111 ships
    gradio 3.41, Forge 4.40: e.g. ``gr.Number(minimum=...)`` is not in every 3.x)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return cls(**kwargs)


def _component(f: Any):
    import gradio as gr

    common = {"label": f.label, "info": f.tooltip, "elem_id": f"facediffuser_train_{f.name}"}
    if f.widget == "checkbox":
        return _make(gr.Checkbox, value=f.value, **common)
    if f.widget == "dropdown":
        return _make(gr.Dropdown, choices=list(f.choices), value=f.value, **common)
    if f.widget == "number":
        kw = {"precision": f.precision} if f.precision is not None else {}
        if f.minimum is not None:
            kw["minimum"] = f.minimum
        if f.maximum is not None:
            kw["maximum"] = f.maximum
        return _make(gr.Number, value=f.value, **kw, **common)
    return _make(gr.Textbox, value=f.value, **common)


def build_tab() -> Any:
    import gradio as gr

    fields = form_fields()
    titles = {"basic": "Training settings", "advanced": "Advanced settings", "paths": "Files (optional)"}

    with gr.Blocks(analytics_enabled=False) as tab:
        gr.Markdown("Train a face LoRA in a separate process (the web UI's model and packages stay as they are). "
                    "The file is written into the web UI's Lora folder: use it as `<lora:NAME:0.8>` right after.")
        with gr.Row():
            checkpoint = gr.Dropdown(label="Base checkpoint", choices=host.checkpoint_titles(),
                                     value=host.current_checkpoint_title(), elem_id="facediffuser_train_checkpoint")
            refresh = gr.Button(value="Refresh", elem_id="facediffuser_train_refresh")
            dataset = gr.Textbox(label="Dataset folder (images + optional .txt captions)", elem_id="facediffuser_train_dataset")
            name = gr.Textbox(label="Output name (LoRA file name)", value="face_lora", elem_id="facediffuser_train_name")
        widgets = []
        for group in GROUPS:
            members = [f for f in fields if f.group == group]
            if not members:
                continue
            with gr.Accordion(titles[group], open=group == "basic"):
                for i in range(0, len(members), 4):
                    with gr.Row():
                        for f in members[i:i + 4]:
                            widgets.append((f.name, _component(f)))
        with gr.Row():
            start_over = gr.Checkbox(label="Start over (discard a stopped run's saved state)", value=False,
                                     elem_id="facediffuser_train_start_over")
            start = gr.Button(value="Start", variant="primary", elem_id="facediffuser_train_start")
            stop = gr.Button(value="Stop", elem_id="facediffuser_train_stop")
        message = gr.Textbox(label="", interactive=False, elem_id="facediffuser_train_message")
        with gr.Row():
            with gr.Column():
                progress = gr.Textbox(label="Progress", value=lambda: jobs().training_progress().line(), every=2,
                                      interactive=False, elem_id="facediffuser_train_progress")
                log = gr.Textbox(label="Log", value=lambda: jobs().training_log(), every=3, lines=12, max_lines=12,
                                 interactive=False, elem_id="facediffuser_train_log")
            with gr.Column():
                loss = gr.Image(label="Loss", value=lambda: _loss_image(), every=5, interactive=False, type="filepath",
                                elem_id="facediffuser_train_loss")

        with gr.Accordion("Prepare faces (detect, FFHQ-align, mask)", open=False):
            with gr.Row():
                prep_src = gr.Textbox(label="Photo folder", elem_id="facediffuser_prep_src")
                prep_dst = gr.Textbox(label="Output folder (empty: <photos>_aligned)", elem_id="facediffuser_prep_dst")
                prep_size = gr.Number(label="Crop size (px)", value=512, precision=0, elem_id="facediffuser_prep_size")
                prep_faces = gr.Radio(label="Faces per photo", choices=["largest", "all", "one-only"], value="largest",
                                      elem_id="facediffuser_prep_faces")
                prep_go = gr.Button(value="Run prep", elem_id="facediffuser_prep_run")
            prep_status = gr.Textbox(label="Prep", value=lambda: jobs().job_status("prep"), every=3, lines=4,
                                     interactive=False, elem_id="facediffuser_prep_status")
        with gr.Accordion("FID reference statistics (models/fid_stats)", open=False):
            with gr.Row():
                stats_src = gr.Textbox(label="Folder of real images", elem_id="facediffuser_stats_src")
                stats_name = gr.Textbox(label="Save as (name; empty: the folder's name)", elem_id="facediffuser_stats_name")
                stats_go = gr.Button(value="Build statistics", elem_id="facediffuser_stats_run")
            stats_status = gr.Textbox(label="Statistics", value=lambda: jobs().job_status("stats"), every=3, lines=4,
                                      interactive=False, elem_id="facediffuser_stats_status")

        names = [n for n, _ in widgets]

        def on_start(ckpt, data, out_name, over, *vals):
            return start_from_form(ckpt, data, out_name, over, dict(zip(names, vals)))

        start.click(fn=on_start, inputs=[checkpoint, dataset, name, start_over, *[w for _, w in widgets]], outputs=[message])
        stop.click(fn=lambda: jobs().stop_training(), inputs=[], outputs=[message])
        refresh.click(fn=lambda: gr.update(choices=host.checkpoint_titles()), inputs=[], outputs=[checkpoint])
        prep_go.click(fn=lambda s, d, z, f: _guard(lambda: jobs().start_prep(s, d, size=int(z or 512), faces=f)),
                      inputs=[prep_src, prep_dst, prep_size, prep_faces], outputs=[message])
        stats_go.click(fn=lambda s, n: _guard(lambda: jobs().start_stats(s, n)), inputs=[stats_src, stats_name],
                       outputs=[message])
    return tab


def _guard(fn) -> str:
    try:
        return fn()
    except UserError as exc:
        return f"error: {exc}"


def _loss_image() -> str | None:
    try:
        path = jobs().loss_plot()
    except Exception:  # noqa: BLE001 - a plot must never break the page
        return None
    return str(path) if path else None


# --- HTTP routes (the same callables, for scripts and the compatibility check) ----------------------

def register_api(app: Any) -> None:
    """``POST /facediffuser/v1/train`` (JSON: checkpoint, dataset, name, settings{}, start_over),
    ``GET /facediffuser/v1/train`` (progress), ``POST /facediffuser/v1/train/stop``, and
    ``GET /facediffuser/v1/settings`` (the generated form)."""
    from dataclasses import asdict

    from fastapi import Body

    from .training_service import progress_dict

    @app.post("/facediffuser/v1/train")
    def _train(payload: dict = Body(...)) -> dict:  # noqa: B008
        msg = start_from_form(str(payload.get("checkpoint", "")), str(payload.get("dataset", "")),
                              str(payload.get("name", "")), bool(payload.get("start_over", False)),
                              dict(payload.get("settings") or {}))
        return {"message": msg, "ok": not msg.startswith("error:")}

    @app.get("/facediffuser/v1/train")
    def _progress() -> dict:
        return progress_dict(jobs().training_progress()) | {"log": jobs().training_log()[-2000:]}

    @app.post("/facediffuser/v1/train/stop")
    def _stop() -> dict:
        return {"message": jobs().stop_training()}

    @app.get("/facediffuser/v1/settings")
    def _settings() -> list:
        return [asdict(f) for f in form_fields()]
