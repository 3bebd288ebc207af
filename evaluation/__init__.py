"""FID, KID and face metrics: Inception features, Fréchet distance, stats files, the FID table.

torch-only: nothing here imports ComfyUI.
"""
