"""Check that Automatic1111 maps every module of one of our LoRA files onto the SD model.

Not part of the test suite: A1111 is not on PyPI. Point it at A1111's Lora extension source
(`extensions-builtin/Lora/networks.py` in upstream A1111, or `lora_convert.py` in forks that moved
it there): this script takes A1111's own `convert_diffusers_name_to_compvis` function (and the
module-level names it uses) out of that file with `ast` and runs it — nothing of A1111 is copied
into this repository.

    python tools/check_a1111_compat.py --a1111-source .../extensions-builtin/Lora/networks.py \
        --checkpoint sd15.safetensors --lora face.safetensors

It mirrors how A1111's Lora extension matches keys for an original-layout (LDM) model: the part
of each key before the first '.' is converted to a compvis name and looked up among the model's
module names (`diffusion_model_*` from the UNet, `transformer_text_model_*` from the CLIP
wrapper), with A1111's `_[qkv]_proj` fallback for SD2. Exit 0 only when every key matched.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path


def _load_a1111_converter(source: Path):
    tree = ast.parse(source.read_text())
    wanted = {"convert_diffusers_name_to_compvis", "suffix_conversion", "re_digits", "re_x_proj", "re_compiled"}
    body = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in wanted:
            body.append(node)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in wanted for t in node.targets):
            body.append(node)
    names = {getattr(n, "name", None) or n.targets[0].id for n in body}
    if "convert_diffusers_name_to_compvis" not in names:
        raise SystemExit(f"{source}: no convert_diffusers_name_to_compvis in this file")
    namespace: dict = {"re": re}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(source), "exec"), namespace)  # noqa: S102
    namespace.setdefault("re_x_proj", re.compile(r"(.*)_([qkv]_proj)$"))
    return namespace["convert_diffusers_name_to_compvis"], namespace["re_x_proj"]


def _compvis_module_names(checkpoint: Path) -> set[str]:
    from safetensors import safe_open

    names = set()
    with safe_open(str(checkpoint), "pt") as fh:
        for key in fh.keys():
            if not key.endswith(".weight"):
                continue
            mod = key[: -len(".weight")]
            if mod.startswith("model.diffusion_model."):
                names.add(mod[len("model."):].replace(".", "_"))
            elif mod.startswith("cond_stage_model."):
                names.add(mod[len("cond_stage_model."):].replace(".", "_"))
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a1111-source", required=True, type=Path, help="A1111's networks.py (or a fork's lora_convert.py)")
    ap.add_argument("--checkpoint", required=True, type=Path, help="an SD checkpoint in the original single-file layout")
    ap.add_argument("--lora", required=True, type=Path)
    args = ap.parse_args()

    from safetensors import safe_open

    convert, re_x_proj = _load_a1111_converter(args.a1111_source)
    modules = _compvis_module_names(args.checkpoint)
    is_sd2 = any(m.startswith("model_transformer_resblocks") for m in modules)
    with safe_open(str(args.lora), "pt") as fh:
        keys = list(fh.keys())
    unmatched, matched = [], set()
    for key in keys:
        base = key.split(".", 1)[0]
        name = convert(base, is_sd2)
        if name not in modules:
            m = re_x_proj.match(name)
            name = m.group(1) if m and m.group(1) in modules else None
        if name is None:
            unmatched.append(key)
        else:
            matched.add(name)
    report = {"keys": len(keys), "modules_matched": len(matched), "unmatched_keys": unmatched[:20],
              "unmatched_count": len(unmatched)}
    print(json.dumps(report, indent=2))
    print("OK: A1111 maps every key" if not unmatched else "FAIL")
    return 0 if not unmatched else 1


if __name__ == "__main__":
    sys.exit(main())
