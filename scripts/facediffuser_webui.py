"""FaceDiffuser's Automatic1111 / Forge entry point (the web UI imports every .py in scripts/).

Three things, each a thin shell over ``facediffuser.sdwebui``:

* **FaceDiffuser FID** -- an always-visible accordion in txt2img and img2img (off by default);
* **FaceDiffuser: LoRA vs base** -- an entry of the Script dropdown;
* **FaceDiffuser** -- a tab (training, face prep, reference statistics), plus HTTP routes under
  ``/facediffuser/v1/`` for the same actions.

The web UI clones this repository under any folder name, so the package is loaded from this
folder under its own name, ``facediffuser`` (unless that name is taken by an installed copy).
"""

import importlib.util
import sys
from pathlib import Path

from modules import script_callbacks, scripts

_ROOT = Path(__file__).resolve().parent.parent


def _load_package():
    mod = sys.modules.get("facediffuser")
    if mod is not None:
        if Path(getattr(mod, "__file__", "") or "").resolve().parent != _ROOT:
            print(f"FaceDiffuser: another facediffuser ({mod.__file__}) is already imported; using it")
        return mod
    spec = importlib.util.spec_from_file_location("facediffuser", _ROOT / "__init__.py",
                                                  submodule_search_locations=[str(_ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["facediffuser"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["facediffuser"]
        raise
    return mod


_load_package()
from facediffuser.sdwebui import fid_ui, lora_vs_base_ui, train_tab  # noqa: E402


class FaceDiffuserFID(scripts.Script):
    def title(self):
        return fid_ui.TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return fid_ui.build_ui(is_img2img, self.elem_id)

    def process(self, p, *args):
        fid_ui.on_process(p, args)

    def postprocess_batch_list(self, p, pp, *args, **kwargs):
        fid_ui.on_batch(p, pp.images)

    def postprocess(self, p, processed, *args):
        fid_ui.on_postprocess(p, processed)


class FaceDiffuserLoraVsBase(scripts.Script):
    def title(self):
        return lora_vs_base_ui.TITLE

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return lora_vs_base_ui.build_ui(is_img2img, self.elem_id)

    def run(self, p, *args):
        return lora_vs_base_ui.run(p, *args)


def _on_ui_tabs():
    return [(train_tab.build_tab(), train_tab.TAB_TITLE, "facediffuser")]


def _on_app_started(demo, app):
    train_tab.register_api(app)


def _on_script_unloaded():
    from facediffuser.sdwebui.fid_session import release_extractor

    release_extractor()  # a running training keeps going: the tab module (and its jobs) survive a UI reload


script_callbacks.on_ui_tabs(_on_ui_tabs)
script_callbacks.on_app_started(_on_app_started)
script_callbacks.on_script_unloaded(_on_script_unloaded)
