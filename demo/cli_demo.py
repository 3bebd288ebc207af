"""``facediffuser demo``: the whole product loop, offline, in a few minutes on a laptop CPU.

data -> train a face LoRA (the real trainer) -> kohya file -> evaluation table (same sampler
settings for base and fine-tuned) -> one folder with ``report.md``, ``results.json``, the bar chart,
the sample grid, the loss curve and the LoRA.

Whatever the user does not give is replaced by a clearly labelled stand-in, and ``report.md`` says
at the top which parts were real and which were stand-ins:

* model: :func:`.demo_model.make_demo_checkpoint` — a tiny SD1.5-shaped model trained once on
  procedurally drawn non-face scenes (:mod:`.toy_scenes`), shipped with the package, so the base
  column of the sample grid shows houses and trees and the fine-tuned column shows what the LoRA
  learned;
* data: :mod:`.toy_faces` (cartoon faces, train and held-out splits);
* features: the FID Inception architecture with seeded random weights
  (:mod:`.standin_inception`) when no FID Inception weights are found.

Beside the table it measures the samples in pixel space (:mod:`.pixel_measures`), which needs no
feature extractor at all.
Registration imports argparse only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

#: Tuned on the shipped scene model (2026-12-08, 2 cores). With the old settings (attention-only LoRA, 80 steps,
#: DDIM, CFG 1) the fine-tuned samples looked like the base ones; with DDIM even 1000 steps of LoRA + LoCon
#: kept, per seed, the base model's layout (our reading: the layout comes from the seed's noise, which the
#: SD1.5 schedule never fully removes in training). euler_a's fresh noise let the LoRA's faces through, and
#: the LoCon adapters on the ResNet convs (conv_rank) carry most of the change. N = 32: at N = 16 the
#: Fréchet distances sat near the noise floor. Total about 2 min.
DEMO_DEFAULTS = dict(n_train=48, n_heldout=64, size=64, n=32, train_steps=300, rank=16, conv_rank=32, lr=3e-3, batch=16,
                     sample_steps=20, sampler="euler_a", cfg=2.5, seed=0)


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="Run the whole loop offline (data -> LoRA -> FID table) and write one report folder.",
        description="Trains a face LoRA and evaluates it against held-out images, writing report.md, results.json, "
                    "charts, samples, the loss curve and the LoRA into one folder. Anything not given is replaced by a "
                    "labelled stand-in (a tiny shipped model trained on toy scenes, toy faces, random-weight Inception), so it runs "
                    "anywhere in minutes.",
    )
    p.add_argument("--out", default="facediffuser-demo", metavar="DIR", help="Output folder (default: ./facediffuser-demo).")
    p.add_argument("--model", metavar="CKPT", help="Your SD1.5 checkpoint (default: the tiny shipped demo model, which draws toy scenes; "
                   "a real one needs a GPU).")
    p.add_argument("--data", metavar="DIR", help="Your face images: a folder with train/ and heldout/, or one folder to split "
                   "in half (default: generated toy faces).")
    p.add_argument("--inception", metavar="FILE", help="FID Inception weights (default: searched as in eval; else a labelled stand-in).")
    p.add_argument("--steps", type=int, default=DEMO_DEFAULTS["train_steps"], metavar="N", help="Training steps (default: %(default)s).")
    p.add_argument("--n", type=int, default=DEMO_DEFAULTS["n"], metavar="N", help="Images generated per model (default: %(default)s).")
    p.add_argument("--size", type=int, default=DEMO_DEFAULTS["size"], metavar="PX", help="Training and sampling size (default: %(default)s).")
    p.add_argument("--seed", type=int, default=DEMO_DEFAULTS["seed"], metavar="S", help="Seed of everything (default: 0).")
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    result = run_demo(Path(args.out), model=args.model, data=args.data, inception=args.inception, train_steps=args.steps,
                      n=args.n, size=args.size, seed=args.seed, progress=not args.quiet)
    print(f"demo finished in {result['seconds']:.0f}s: open {result['report']}")
    return 0


def _split_user_data(data: Path, out: Path) -> tuple[Path, Path, str]:
    """``data/train`` + ``data/heldout`` as given; or one folder split in half by content so the
    held-out half never meets the trainer. Returns (train, heldout, what was done).

    The split is by SHA-256 of the file bytes, not by name: byte-identical files are kept once (so a
    duplicate cannot land on both sides), the half with the smaller hashes trains, and the same
    images give the same split wherever they live. Files are hard-linked (else copied) into
    ``out/data/{train,heldout}`` under content-derived names, captions (``<stem>.txt``) and prep
    masks beside them; those two folders are emptied first so no earlier run's images mix in."""
    import os
    import shutil

    from ..errors import UserError
    from ..fileio import file_sha256
    from ..image_files import MASK_SUFFIX, list_images

    if (data / "train").is_dir() and (data / "heldout").is_dir():
        return data / "train", data / "heldout", "your train/ and heldout/ folders, as given"
    root = out / "data"
    if data.resolve().is_relative_to(root.resolve()):
        raise UserError(f"--data {data} lies inside the demo's own data folder {root}; pass a folder outside --out")
    files = list_images(data)
    by_digest: dict[str, Path] = {}
    for f in files:
        by_digest.setdefault(file_sha256(f), f)
    if len(by_digest) < 8:
        raise UserError(f"--data {data}: need at least 8 distinct images to split into train and held-out halves, "
                        f"found {len(by_digest)}")
    digests = sorted(by_digest)
    half = len(digests) // 2
    dirs = (root / "train", root / "heldout")
    for d, chunk in zip(dirs, (digests[:half], digests[half:])):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for digest in chunk:
            f = by_digest[digest]
            stem = digest[:20]
            for src, dst in ((f, d / f"{stem}{f.suffix.lower()}"), (f.with_suffix(".txt"), d / f"{stem}.txt"),
                             (f.with_name(f.stem + MASK_SUFFIX), d / f"{stem}{MASK_SUFFIX}")):
                if src.is_file():
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copy2(src, dst)
    dropped = len(files) - len(digests)
    how = (f"one folder of {len(files)} images split in half by content hash ({half} train / {len(digests) - half} held out"
           + (f"; {dropped} byte-identical duplicates kept once" if dropped else "") + ")")
    return dirs[0], dirs[1], how


def run_demo(out: Path, *, model: str | None = None, data: str | None = None, inception: str | None = None,
             train_steps: int = DEMO_DEFAULTS["train_steps"], n: int = DEMO_DEFAULTS["n"], size: int = DEMO_DEFAULTS["size"],
             seed: int = 0, progress: bool = True, sample_steps: int = DEMO_DEFAULTS["sample_steps"]) -> dict[str, Any]:
    """Run the loop into ``out``; returns paths, the results and what was a stand-in."""
    from ..errors import UserError
    from ..evaluation.generation import SamplerSettings
    from ..evaluation.inception import InceptionFeatures, find_inception_weights
    from ..evaluation.table import FeatureCaveat, TableConfig, run_table
    from .toy_faces import make_splits
    from ..trainer.config import TrainConfig
    from ..trainer.training_loop import train

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    provenance: dict[str, str] = {}
    scene_model = False  # the shipped demo model that draws toy scenes
    timings: dict[str, float] = {}

    if model:
        model_path = Path(model)
        provenance["model"] = f"REAL: your checkpoint {model_path}"
    else:
        model_path, provenance["model"], scene_model = _demo_base_model(out, seed)
    if data:
        train_dir, heldout_dir, how = _split_user_data(Path(data), out)
        provenance["data"] = f"REAL: your images, {how} ({train_dir} for training, {heldout_dir} held out)"
    else:
        import shutil

        for d in (out / "data" / "train", out / "data" / "heldout"):  # never mix in an earlier run's images
            if d.exists():
                shutil.rmtree(d)
        train_dir, heldout_dir = make_splits(out / "data", n_train=DEMO_DEFAULTS["n_train"], n_heldout=DEMO_DEFAULTS["n_heldout"],
                                             seed=seed, size=size)
        provenance["data"] = (f"STAND-IN: {DEMO_DEFAULTS['n_train']} + {DEMO_DEFAULTS['n_heldout']} procedurally drawn CARTOON "
                              f"faces ({size} px, demo/toy_faces.py), not photographs")
    caveat = None
    try:
        weights = find_inception_weights(inception)
        provenance["features"] = f"REAL: FID Inception weights {weights}"
    except UserError:
        if inception:
            raise
        from .standin_inception import STANDIN_NOTE, standin_description

        weights = None
        caveat = FeatureCaveat("STAND-IN random-weight features", STANDIN_NOTE, standin_description())
        provenance["features"] = ("STAND-IN: the FID Inception v3 architecture with SEEDED RANDOM weights (no FID weights "
                                  "found; output scaled to a familiar range, demo/standin_inception.py); distances "
                                  "are NOT FID")
    timings["setup"] = time.perf_counter() - t0

    t = time.perf_counter()
    lora = out / "face_lora.safetensors"
    result = train(TrainConfig(
        model=str(model_path), data=str(train_dir), output=str(lora), cache_dir=str(out / ".cache"),
        steps=train_steps, rank=DEMO_DEFAULTS["rank"], conv_rank=DEMO_DEFAULTS["conv_rank"], lr=DEMO_DEFAULTS["lr"], batch_size=DEMO_DEFAULTS["batch"],
        resolution=size, seed=seed, caption_dropout=0.1, save_precision="fp32",
    ))
    timings["train"] = time.perf_counter() - t
    if result.status != "finished" or result.output is None:
        raise UserError(f"demo training did not finish ({result.status})")

    t = time.perf_counter()
    settings = SamplerSettings(steps=sample_steps, cfg=DEMO_DEFAULTS["cfg"], size=size, sampler=DEMO_DEFAULTS["sampler"], seed=seed)

    def make_extractor():  # the FID Inception if found, else the labelled stand-in (built once, cached)
        from .standin_inception import default_standin_dir, standin_weights

        return InceptionFeatures(weights or standin_weights(default_standin_dir()), progress=progress)

    results = run_table(TableConfig(
        model=str(model_path), lora=str(lora), real=str(heldout_dir), out=str(out), n=n, settings=settings,
        progress=progress, batch_size=8,
    ), make_extractor, caveat=caveat)
    timings["evaluate"] = time.perf_counter() - t
    pixel = pixel_check(out, results, heldout_dir, scenes=scene_model, seed=seed)
    timings["total"] = time.perf_counter() - t0
    report = write_demo_report(out, results, provenance, result, timings, pixel, scene_model=scene_model)
    return {"report": report, "results": results, "provenance": provenance, "lora": lora, "loss_plot": result.loss_plot,
            "seconds": timings["total"], "timings": timings, "pixel": pixel}


def _demo_base_model(out: Path, seed: int) -> tuple[Path, str, bool]:
    """The shipped scene model (:mod:`.demo_model`) as a checkpoint in ``out``, its provenance line
    and True; where it is not installed, the random fallback (:mod:`.random_demo_model`), labelled so."""
    from .demo_model import BASE_NOTE, DEMO_BASE_FILE, base_model_recipe, make_demo_checkpoint

    if DEMO_BASE_FILE.is_file():
        path = make_demo_checkpoint(out / "demo-model.safetensors")
        recipe = base_model_recipe()
        return path, (f"STAND-IN: {BASE_NOTE} (VAE reconstruction PSNR {recipe['vae_psnr_heldout_scenes_db']:.1f} dB on "
                      f"held-out scenes, {recipe['vae_psnr_toy_faces_db']:.1f} dB on toy faces it never saw)"), True
    from .random_demo_model import DEMO_VAE_NOTE, make_random_demo_checkpoint

    path = make_random_demo_checkpoint(out / "demo-model.safetensors", seed=seed)
    return path, ("STAND-IN: tiny SD1.5-shaped model with RANDOM UNet and text-encoder weights (make-model seed "
                  f"{seed}) and a {DEMO_VAE_NOTE}; the trained demo base model ({DEMO_BASE_FILE.name}) is not installed: "
                  "build it with tools/make_demo_base_model.py"), False


#: seed of the toy scenes the pixel check compares with (not the base model's training scenes)
PIXEL_SCENE_SEED = 777
SCENES_PER_REAL = 4


def pixel_check(out: Path, results: dict[str, Any], heldout_dir: Path, *, scenes: bool, seed: int) -> dict[str, Any]:
    """:func:`.pixel_measures.pixel_summary` of the base and fine-tuned samples against the
    held-out reals (and, with the demo base model, against ``SCENES_PER_REAL`` times as many toy
    scenes: scenes vary more than the faces, and with as few scenes as faces about one scene in six
    is nearer to some face than to any scene)."""
    from ..evaluation.images import load_image
    from ..image_files import list_images
    from .pixel_measures import pixel_summary
    from .toy_scenes import toy_scene_array

    reals = [load_image(p) for p in list_images(heldout_dir)]
    scene_imgs = list(toy_scene_array(SCENES_PER_REAL * len(reals), seed=PIXEL_SCENE_SEED + seed)[0]) if scenes else None
    summary: dict[str, Any] = {"thumbnail": 16, "n_real": len(reals), "n_scenes": len(scene_imgs) if scene_imgs else 0}
    for name, folder in (("base", "base"), ("finetuned", "finetuned")):
        files = [out / "generated" / folder / f for f in results["files"][name]]
        summary[name] = pixel_summary([load_image(f) for f in files], reals, scene_imgs)
    return summary


def write_demo_report(out: Path, results: dict[str, Any], provenance: dict[str, str], train_result: Any,
                      timings: dict[str, float], pixel: dict[str, Any] | None = None, *, scene_model: bool = False) -> Path:
    """``report.md``: what was real and what was a stand-in FIRST, then the table and the pictures."""
    from ..fileio import atomic_write_text
    from ..evaluation.report import markdown_table

    stand_ins = [k for k, v in provenance.items() if v.startswith("STAND-IN")]
    lines = ["# FaceDiffuser demo report", ""]
    if stand_ins:
        lines += [f"> **This run used stand-ins for: {', '.join(stand_ins)}.** It shows that the loop works "
                  "(data → LoRA → evaluation); its numbers say nothing about face quality and must not be quoted as FID.", ""]
    lines += ["| part | what was used |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in provenance.items()]
    lines += ["", "## Training", f"- LoRA: `{Path(train_result.output).name}` ({train_result.steps} steps, final loss "
              f"{train_result.final_loss:.4f}); loss curve: `{Path(train_result.loss_plot).name if train_result.loss_plot else 'n/a'}`",
              "", "![loss](" + (Path(train_result.loss_plot).name if train_result.loss_plot else "") + ")", ""]
    table = markdown_table(results).split("\n", 1)[1]  # our own heading instead of the table's
    lines += ["## Evaluation", table, "![FID bar chart](fid_bar_chart.png)", ""]
    if scene_model:
        lines += ["Samples: real | base | fine-tuned (same prompt and seed in a row). The demo base model was trained on "
                  "houses, trees, mountains, boats, flowers and shapes and never saw a face, so its column shows scenes; "
                  "the fine-tuned column shows what the LoRA learned from the toy faces.", ""]
    lines += ["![samples: real | base | fine-tuned](samples_grid.png)", ""]
    if pixel:
        lines += ["## Pixel check (no feature extractor)",
                  f"Mean RMS distance (0–255) of each sample's {pixel['thumbnail']}×{pixel['thumbnail']} thumbnail to the "
                  f"nearest of the {pixel['n_real']} held-out real images"
                  + (f"; and the share of samples that are nearer to a held-out toy face than to any of {pixel['n_scenes']} "
                     "toy scenes (a nearest-neighbour classifier in pixel space)" if pixel["n_scenes"] else "") + ".", "",
                  "| Set | N | nearest-real RMS ↓ |" + (" nearer to a face ↑ |" if pixel["n_scenes"] else ""),
                  "|---|---|---|" + ("---|" if pixel["n_scenes"] else "")]
        for name, label in (("base", "base"), ("finetuned", "fine-tuned")):
            row = pixel[name]
            lines.append(f"| {label} | {row['n']} | {row['nearest_real_rms']:.1f} |"
                         + (f" {row['nearer_face_share']:.0%} |" if "nearer_face_share" in row else ""))
        lines.append("")
    lines += ["## Time", "- " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()), ""]
    results_path = out / "results.json"
    data = json.loads(results_path.read_text(encoding="utf-8"))
    data["demo"] = {"provenance": provenance, "timings_s": {k: round(v, 1) for k, v in timings.items()},
                    "train_steps": train_result.steps, "final_loss": train_result.final_loss, "pixel": pixel}
    atomic_write_text(results_path, json.dumps(data, indent=2, default=str) + "\n")
    return atomic_write_text(out / "report.md", "\n".join(lines))
