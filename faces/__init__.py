"""Faces: detection, FFHQ alignment, face masks and the face-weighted loss, ``facediffuser prep``.

Used by the trainer (prep, masks, loss) and the evaluation (face metrics). Nothing here imports ComfyUI."""
