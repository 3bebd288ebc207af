"""The Automatic1111 / Forge extension's logic: thin adapters over evaluation/ and trainer/.

The web UI imports ``scripts/facediffuser_webui.py`` (the only entry point); that file loads this
package and hands it the web UI's objects. Modules here import the web UI (``modules.*``) and
gradio only inside the functions that build UI or call the web UI, so the logic is tested
without a web UI: ``fid_session`` (reference, banks, scoring, infotext), ``lora_vs_base`` (the
base-vs-LoRA study), ``settings_form`` (the training form generated from the settings),
``requirements`` (what install.py adds and what goes into the trainer's overlay). Process
management of the training child lives in ``trainer/subprocess_runner.py``.
"""
