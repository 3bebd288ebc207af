"""Where the nodes may read and write, and the model folders the pack adds to ComfyUI.

Path rule for folder inputs (a dataset, a folder of real images):

* a **relative** path is taken under ComfyUI's ``input`` folder (``faces`` -> ``input/faces``);
* an **absolute** path must lie inside the input folder or inside one of the roots listed in
  ``$FACEDIFFUSER_DATASET_ROOTS`` (``os.pathsep``-separated, e.g. ``/data/faces:/mnt/sets``);
* both are resolved (``..`` and symlinks) *before* the check, so ``../../etc/passwd`` or a link
  pointing out of the input folder is refused with a one-line error naming the rule.

Names the nodes write (a LoRA file name, a feature-bank name) are plain relative names: no
absolute paths, no ``..``, no hidden parts; the result must stay inside its folder.

Model folders registered in ComfyUI (by :func:`register_model_folders`, called lazily from the
nodes' ``INPUT_TYPES``, so importing the pack never needs ComfyUI):

* ``fid_stats`` -> ``models/fid_stats``, ``.npz`` only. ``folder_paths.add_model_folder_path`` gives
  a *new* name an empty extension set, which lists every file; we set the set explicitly, also when
  a user's ``extra_model_paths.yaml`` created the name first.
* ``inception`` -> ``models/inception``, ``.pth`` only: the FID Inception weights
  (``weights-inception-2015-12-05-6726825d.pth``).

Everything here except :func:`register_model_folders` and the ``comfy_*`` helpers is pure Python
(tested without ComfyUI).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from ..errors import UserError

DATASET_ROOTS_ENV = "FACEDIFFUSER_DATASET_ROOTS"
FID_STATS_FOLDER = "fid_stats"
INCEPTION_FOLDER = "inception"
FOLDER_EXTENSIONS = {FID_STATS_FOLDER: {".npz"}, INCEPTION_FOLDER: {".pth"}}
BANKS_SUBDIR = "facediffuser_fid_banks"  # under ComfyUI's output folder
TRAIN_STATE_SUBDIR = "facediffuser_train"  # under ComfyUI's output folder: caches, resumable state

_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-+()]*$")


def env_roots(environ: dict | None = None) -> list[Path]:
    """The extra allowed roots from ``$FACEDIFFUSER_DATASET_ROOTS`` (empty entries ignored)."""
    raw = (environ if environ is not None else os.environ).get(DATASET_ROOTS_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def resolve_user_folder(value: str, *, input_dir: str | os.PathLike, extra_roots: Iterable[str | os.PathLike] = (),
                        what: str = "folder") -> Path:
    """The real path of a folder input, if it is allowed (see the module docstring) and exists."""
    text = str(value or "").strip()
    if not text:
        raise UserError(f"no {what} given: type a folder name under ComfyUI's input folder (e.g. faces)")
    if "\x00" in text:
        raise UserError(f"{what} {text!r} contains a NUL character")
    base = Path(input_dir).resolve()
    roots = [base] + [Path(r).expanduser().resolve() for r in extra_roots]
    given = Path(text).expanduser()
    candidate = (given if given.is_absolute() else base / given).resolve()
    if not any(candidate.is_relative_to(r) for r in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise UserError(
            f"{what} {text!r} is outside the allowed folders ({allowed}): use a folder under ComfyUI's input "
            f"folder, or add its parent to ${DATASET_ROOTS_ENV}"
        )
    if not candidate.exists():
        raise UserError(f"{what} {text!r} not found (looked for {candidate})")
    if not candidate.is_dir():
        raise UserError(f"{what} {text!r} is not a folder ({candidate})")
    return candidate


def check_relative_name(name: str, *, what: str = "name", strict: bool = True) -> str:
    """A relative, forward-slash name with no ``..`` and no absolute part; ``strict`` (names we
    write) also allows only plain characters and no hidden parts."""
    text = str(name or "").strip().replace("\\", "/")
    if not text:
        raise UserError(f"no {what} given")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise UserError(f"{what} {name!r} must be a relative name, not an absolute path")
    parts = text.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UserError(f"{what} {name!r} may not contain empty, '.' or '..' parts")
        if strict and not _NAME_PART.match(part):
            raise UserError(f"{what} {name!r}: use letters, digits, spaces and _ . - + ( ) only (no hidden names)")
    return "/".join(parts)


def safe_join(root: str | os.PathLike, name: str, *, what: str = "name") -> Path:
    """``root/name`` for a checked relative name, guaranteed to stay inside ``root``."""
    rel = check_relative_name(name, what=what)
    base = Path(root).resolve()
    out = (base / rel).resolve()
    if not out.is_relative_to(base):
        raise UserError(f"{what} {name!r} leads outside {base}")
    return out


def lora_file_name(output_name: str) -> str:
    """The name a trained LoRA gets in the loras folder: ``<output_name>.safetensors``."""
    rel = check_relative_name(output_name, what="output name")
    return rel if rel.endswith(".safetensors") else rel + ".safetensors"


def bank_file_name(bank_name: str) -> str:
    rel = check_relative_name(bank_name, what="bank name")
    if "/" in rel:
        raise UserError(f"bank name {bank_name!r} may not contain '/'")
    return rel + ".npz"


def stats_file_name(name: str) -> str:
    rel = check_relative_name(name, what="stats name")
    return rel if rel.endswith(".npz") else rel + ".npz"


# --- ComfyUI side (imports folder_paths inside functions) ------------------------------------------

def register_model_folders() -> None:
    """Add ``fid_stats`` (.npz) and ``inception`` (.pth) to ComfyUI's model folders (idempotent)."""
    import folder_paths

    for name, exts in FOLDER_EXTENSIONS.items():
        default = os.path.join(folder_paths.models_dir, name)
        entry = folder_paths.folder_names_and_paths.get(name)
        if entry is None:
            folder_paths.folder_names_and_paths[name] = ([default], set(exts))
            continue
        paths, current = entry[0], entry[1]
        if set(current) != exts:  # created by add_model_folder_path / a yaml: empty set = every file
            folder_paths.folder_names_and_paths[name] = (paths, set(exts))
            cache = getattr(folder_paths, "filename_list_cache", None)
            if isinstance(cache, dict):
                cache.pop(name, None)


def comfy_folder_path(name: str) -> Path:
    """The first (writable, default) path of a registered ComfyUI model folder, created if missing."""
    import folder_paths

    register_model_folders()
    paths = folder_paths.get_folder_paths(name)
    if not paths:
        raise UserError(f"ComfyUI has no {name} folder configured")
    p = Path(paths[0])
    p.mkdir(parents=True, exist_ok=True)
    return p


def comfy_filename_list(name: str) -> list[str]:
    import folder_paths

    register_model_folders()
    return list(folder_paths.get_filename_list(name))


def comfy_full_path(folder: str, name: str, *, what: str) -> Path:
    """The path of a listed model file; a UserError naming the folder when it is not there."""
    import folder_paths

    check_relative_name(name, what=what, strict=False)
    p = folder_paths.get_full_path(folder, name)
    if p is None or not os.path.isfile(p):
        where = ", ".join(folder_paths.get_folder_paths(folder))
        raise UserError(f"{what} {name!r} not found in ComfyUI's {folder} folder ({where})")
    return Path(p)


def comfy_input_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


def comfy_output_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory())


def comfy_user_folder(value: str, *, what: str) -> Path:
    """:func:`resolve_user_folder` with ComfyUI's input folder and ``$FACEDIFFUSER_DATASET_ROOTS``."""
    return resolve_user_folder(value, input_dir=comfy_input_dir(), extra_roots=env_roots(), what=what)
