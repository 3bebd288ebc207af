"""FaceDiffuser: a face LoRA for Stable Diffusion, as a ComfyUI node pack and a Python library.

ComfyUI imports this file by folder name (not via sys.path), so everything below is a relative
import, and nothing heavy (torch, diffusers, ComfyUI) is imported here: node modules import those
lazily when a node runs.
"""

__version__ = "0.1.0"

if __package__:  # a package: ComfyUI (imported by folder name) or ``import facediffuser``
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # a bare ``__init__`` module: pytest collecting a checkout whose folder name is no identifier
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
