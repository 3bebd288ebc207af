"""Load one of our LoRA files with kohya's own sd-scripts and report what it made of every key.

Not part of the test suite: sd-scripts is not on PyPI, so this needs a local checkout of
https://github.com/kohya-ss/sd-scripts (its `networks/` and `library/` folders) and the
transformers version sd-scripts pins (4.x: its text-encoder module names carry `text_model.`).

    PYTHONPATH=/path/to/transformers4 python tools/check_sd_scripts_compat.py \
        --sd-scripts /path/to/sd-scripts --lora face.safetensors

It builds sd-scripts' SD1.x UNet and a CLIP ViT-L text encoder (random weights; only the module
structure matters), calls `networks.lora.create_network_from_weights` exactly as kohya's
train/inference scripts do, loads the state dict and prints: modules created, unexpected and
missing keys, and whether each module's scale equals alpha/rank of the file. Exit code 0 only when
every key was used and every scale matches.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path


def _stub_cv2() -> None:
    # sd-scripts' library/utils.py imports cv2 for image resizing we never call.
    if "cv2" not in sys.modules:
        sys.modules["cv2"] = types.ModuleType("cv2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sd-scripts", required=True, type=Path, help="sd-scripts checkout (with networks/ and library/)")
    ap.add_argument("--lora", required=True, type=Path, help="the .safetensors LoRA to check")
    args = ap.parse_args()

    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    _stub_cv2()  # after transformers, which probes for a real cv2
    sys.path.insert(0, str(args.sd_scripts))
    from library.original_unet import UNet2DConditionModel  # type: ignore[import-not-found]
    from networks import lora as kohya_lora  # type: ignore[import-not-found]

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, attention_head_dim=8, cross_attention_dim=768,
                                use_linear_projection=False, upcast_attention=False)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, max_position_embeddings=77,
                                      projection_dim=768, hidden_act="quick_gelu"))
    weights = load_file(str(args.lora))
    network, _ = kohya_lora.create_network_from_weights(1.0, str(args.lora), None, te, unet, weights_sd=weights)
    network.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    result = network.load_state_dict(weights, strict=False)

    bad_scale = []
    for m in network.text_encoder_loras + network.unet_loras:
        alpha_key = f"{m.lora_name}.alpha"
        rank = weights[f"{m.lora_name}.lora_down.weight"].shape[0]
        alpha = float(weights[alpha_key]) if alpha_key in weights else float(rank)
        if abs(m.scale - alpha / rank) > 1e-6:
            bad_scale.append(m.lora_name)
    report = {
        "transformers": transformers.__version__,
        "keys_in_file": len(weights),
        "modules_created": {"text_encoder": len(network.text_encoder_loras), "unet": len(network.unet_loras)},
        "unexpected_keys": list(result.unexpected_keys),
        "missing_keys": [k for k in result.missing_keys if not k.endswith("org_module.weight")],
        "modules_with_wrong_scale": bad_scale,
    }
    print(json.dumps(report, indent=2))
    ok = not report["unexpected_keys"] and not report["missing_keys"] and not bad_scale
    n_modules = sum(report["modules_created"].values())
    ok = ok and 3 * n_modules == len(weights)
    print("OK: every key loaded by sd-scripts" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
