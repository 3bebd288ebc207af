"""The face LoRA trainer: settings, data, caches, LoRA <-> kohya format, LoRA targets, checkpoints, the loop.

torch-only: nothing here imports ComfyUI.
"""
