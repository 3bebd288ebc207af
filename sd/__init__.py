"""Stable Diffusion itself: model loading, LDM <-> diffusers key layout, tokenizers, random test models,
shipped model files, safetensors headers, prompt files. torch-only: nothing here imports ComfyUI."""
