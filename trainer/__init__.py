"""The face LoRA trainer: model loading, data, caches, LoRA <-> kohya format, the training loop.

torch-only: nothing here imports ComfyUI.
"""
