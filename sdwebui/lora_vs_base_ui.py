"""The "FaceDiffuser: LoRA vs base" script (txt2img / img2img Script dropdown): widgets and run.

Arguments (the API's ``script_args``, all of them, in order): ``lora`` (a name from the web UI's
Lora folder), ``weight`` (float), ``n`` (images per side, >= 2), ``prompts`` (one per line, cycled;
empty = the prompt box), ``reference`` (a file in ``models/fid_stats`` or ``"(none)"``),
``real_folder`` (a folder of real images when no stats file is picked).

``run`` generates the N images twice through the web UI's own ``process_images`` -- the same
prompts, seeds (seed + i; a random seed is fixed first), sampler, steps, CFG and size, the second
time with ``<lora:NAME:W>`` appended -- scores both sets against the reference and returns the bar
chart and the side-by-side grid as images, the table in the info panel, and the rows in the
response's ``extra_generation_params["FaceDiffuser LoRA vs base"]`` (for API clients). Everything
(images, ``results.json``, ``table.md``, chart, grid) is also written under
``<data dir>/facediffuser/lora_vs_base/<time>-<lora>/``.
"""

from __future__ import annotations

import copy
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from . import host
from .fid_session import NO_REFERENCE, FIDArgs

log = logging.getLogger("facediffuser")

TITLE = "FaceDiffuser: LoRA vs base"
RESULT_KEY = "FaceDiffuser LoRA vs base"


def build_ui(is_img2img: bool, elem_id) -> list[Any]:
    import gradio as gr

    from .fid_session import list_stats_files

    def stats_choices() -> list[str]:
        return [NO_REFERENCE, *list_stats_files(host.stats_dir())]

    with gr.Row():
        names = host.lora_names()
        lora = gr.Dropdown(label="LoRA (from the web UI's Lora folder)", choices=names, value=names[0] if names else None,
                           elem_id=elem_id("lora"))
        weight = gr.Slider(label="LoRA weight", minimum=0.0, maximum=2.0, step=0.05, value=0.8, elem_id=elem_id("weight"))
        n = gr.Number(label="N images per side (at least 2)", value=16, precision=0, elem_id=elem_id("n"))
    prompts = gr.Textbox(label="Prompts, one per line, cycled (empty: the prompt above)", lines=3, value="",
                         elem_id=elem_id("prompts"))
    with gr.Row():
        reference = gr.Dropdown(label="Reference statistics (models/fid_stats)", choices=stats_choices(), value=NO_REFERENCE,
                                elem_id=elem_id("reference"))
        real_folder = gr.Textbox(label="...or a folder of real images", value="", elem_id=elem_id("real_folder"))
        refresh = gr.Button(value="Refresh lists", elem_id=elem_id("refresh"))
    refresh.click(fn=lambda: (gr.update(choices=host.lora_names()), gr.update(choices=stats_choices())),
                  inputs=[], outputs=[lora, reference])
    return [lora, weight, n, prompts, reference, real_folder]


def _features(images: list, extractor: Any) -> Any:
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return extractor(torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous())


def _generate(p: Any, prompts: tuple[str, ...], seeds: tuple[int, ...], batch_size: int, n_iter: int) -> list:
    from modules import processing

    from .fid_ui import SKIP_ATTR

    pc = copy.copy(p)
    pc.prompt, pc.seed = list(prompts), list(seeds)
    pc.batch_size, pc.n_iter = batch_size, n_iter
    pc.do_not_save_grid = True
    setattr(pc, SKIP_ATTR, True)  # the FID accordion must not score (or bank) these images
    proc = processing.process_images(pc)
    return list(proc.images[proc.index_of_first_image:proc.index_of_first_image + len(prompts)])


def run(p: Any, lora: str, weight: float, n: Any, prompts: str, reference: str, real_folder: str) -> Any:
    """Generate, score, and return a ``Processed`` with the chart and the grid."""
    from modules import shared
    from modules.processing import Processed

    from . import lora_vs_base as lvb
    from .fid_session import get_extractor, load_reference

    try:
        if not lora:
            raise UserError("LoRA vs base: pick a LoRA (the web UI's Lora folder is empty?)")
        if host.lora_file(lora) is None:
            raise UserError(f"LoRA vs base: no {lora}.safetensors in {host.lora_dir()}")
        seed = int(p.seed) if p.seed not in (None, "", -1, "-1") else secrets.randbelow(4294967294)
        plan = lvb.plan(prompts, p.prompt, int(n or 0), seed, int(p.batch_size), lora, float(weight))

        def extractor():
            return get_extractor(host.inception_dir(), device=host.device())

        ref_args = FIDArgs(enabled=True, reference=reference or NO_REFERENCE, real_folder=real_folder or "")
        ref_stats, ref_name = load_reference(ref_args, stats_dir=host.stats_dir(), extractor_factory=extractor,
                                             cache_dir=host.feature_cache_dir(), base_dir=host.data_dir())
        ext = extractor()
    except UserError as exc:
        log.warning("%s", exc)
        processed = Processed(p, [], p.seed, str(exc))
        processed.comments = str(exc)
        return processed

    shared.state.job_count = 2 * plan.n_iter
    base = _generate(p, plan.prompts, plan.seeds, plan.batch_size, plan.n_iter)
    with_lora = _generate(p, plan.lora_prompts, plan.seeds, plan.batch_size, plan.n_iter)
    if shared.state.interrupted or len(base) != plan.n or len(with_lora) != plan.n:
        text = f"LoRA vs base: interrupted ({len(base)} base and {len(with_lora)} LoRA images of {plan.n})"
        return Processed(p, base + with_lora, seed, text)

    rows = lvb.compare_sets(ref_stats, _features(base, ext), _features(with_lora, ext), ext.protocol(plan.n))
    table = lvb.markdown_table(rows, lora=lora, weight=float(weight), reference=ref_name)
    meta = _lora_metadata(host.lora_file(lora))
    if meta:
        table += (f"\nLoRA metadata: base model {meta.get('ss_sd_model_name', '?')}, rank {meta.get('ss_network_dim', '?')}, "
                  f"alpha {meta.get('ss_network_alpha', '?')}, steps {meta.get('ss_steps', meta.get('ss_max_train_steps', '?'))}")
    chart = lvb.bar_chart(rows, title=f"{lora} @ {float(weight):g} vs base, N = {plan.n} (lower is better)")
    grid = lvb.side_by_side(base, with_lora, lora_name=lora)
    settings = {"lora": lora, "weight": float(weight), "n": plan.n, "seeds": list(plan.seeds), "prompts": list(plan.prompts),
                "reference": ref_name, "sampler": getattr(p, "sampler_name", None), "steps": p.steps, "cfg_scale": p.cfg_scale,
                "width": p.width, "height": p.height, "negative_prompt": p.negative_prompt, "lora_metadata": meta,
                "protocol": ext.protocol(plan.n)}
    out = host.outputs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{lora}"
    for tag, ims in (("base", base), ("lora", with_lora)):
        for i, im in enumerate(ims):
            (out / tag).mkdir(parents=True, exist_ok=True)
            im.save(out / tag / f"{i:05d}-seed{plan.seeds[i]}.png")
    lvb.write_outputs(out, rows=rows, table=table, chart=chart, grid=grid, settings=settings)
    log.info("FaceDiffuser LoRA vs base:\n%s\n(saved in %s)", table, out)

    info = table + f"\nSaved in {out}"
    processed = Processed(p, [chart, grid], seed, info, all_prompts=[plan.prompts[0]] * 2, all_seeds=[seed] * 2,
                          infotexts=[info, info])
    processed.comments = info
    processed.extra_generation_params = {RESULT_KEY: [r.to_dict() for r in rows], "FaceDiffuser output folder": str(out)}
    return processed


def _lora_metadata(path: Path | None) -> dict[str, str]:
    """The LoRA's ``ss_*``/``modelspec.*`` metadata (read in the web UI's process, any safetensors >= 0.4)."""
    if path is None:
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - a metadata-less or odd file is still a usable LoRA
        log.warning("FaceDiffuser: cannot read the metadata of %s: %s", path, exc)
        return {}
