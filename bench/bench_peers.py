"""Our trainer against kohya's sd-scripts and diffusers' LoRA script, timed the same way, side by side.

What a user compares: each trainer runs as its own program (its own process, one after another,
in rounds: ours, sd-scripts, diffusers, ours, sd-scripts, ...), on the same generated model and
the same images, with the same settings as far as each script allows:

* batch 1, LoRA rank 4 = alpha, fp32 (``--mixed-precision no`` / ``--mixed_precision no``), AdamW
  lr 1e-4 (weight decay 0.01, every script's default), constant schedule, gradient clipping at 1.0,
  seed 0, the resolution given (default 256), ``--steps`` optimizer steps (default 8);
* the modules: kohya's 192 UNet modules (every Linear/Conv2d inside each Transformer2DModel).
  sd-scripts trains them with ``--network_train_unet_only``; ours by default; diffusers' script
  hard-codes 4 attention projections (128 modules), so this harness hands its ``LoraConfig`` the
  same 192 names (``--diffusers-modules script`` keeps the script's own 128);
* sd-scripts runs with ``--sdpa --cache_latents`` (latents cached in RAM before training; its text
  encoder still runs every step); ours caches latents and text embeddings (a fresh cache folder per
  run, so the cache build is part of "first step at"); diffusers' script encodes with the VAE and
  the text encoder every step (that is how it is written).

The same hook in every process (``torch.optim.Optimizer`` global step post-hook) stamps the wall
clock, the process CPU time and the load average after every ``optimizer.step()``; a sampler
thread records the RSS every 50 ms. Per run: ``s/step`` = median of the step times of steps
2..N (step k's time = stamp k - stamp k-1), their min-max, ``first step at`` = stamp 1 minus the
moment the parent started the process (interpreter start, imports, model load, cache build and
the first step), ``train RSS`` = peak RSS between stamp 1 and stamp N, ``peak RSS`` = the
process's ``ru_maxrss``. After stamp N the process exits at once (no saving: the scripts save in
different ways, and it is not what is compared).

Peers come from local checkouts (never part of this project):

  --sd-scripts DIR    a checkout of https://github.com/kohya-ss/sd-scripts
  --sd-overlay DIR    a ``pip install --target DIR`` folder with the transformers/diffusers/accelerate
                      versions sd-scripts pins (it does not import under transformers 5); put on
                      PYTHONPATH for the sd-scripts process only
  --diffusers DIR     a checkout of https://github.com/huggingface/diffusers (uses
                      examples/text_to_image/train_text_to_image_lora.py with the installed diffusers)
  --diffusers-overlay DIR   extra packages only that process needs (``datasets``)

  python bench/bench_peers.py --trainers ours --steps 3 --size tiny --resolution 64          # smoke
  python bench/bench_peers.py --sd-scripts $BENCH_TMP/peers/sd-scripts --sd-overlay $BENCH_TMP/sd-overlay \\
      --diffusers $BENCH_TMP/peers/diffusers --diffusers-overlay $BENCH_TMP/diffusers-overlay \\
      --rounds 2 --json bench/results/peers-256.json
  python bench/bench_peers.py --trainers ours,sd-scripts --ours fp32= --ours "bf16=--mixed-precision bf16" ...

``--ours NAME=FLAGS`` (repeatable) adds variants of our trainer (extra ``facediffuser train`` flags);
every variant runs in every round, so each ratio compares runs that sat next to each other.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PEERS = ("sd-scripts", "diffusers")
RSS_INTERVAL_S = 0.05


# --- the child: one trainer in this process, with the step hook -------------------------------------

class _Recorder:
    """Stamps after every optimizer step; after ``steps`` stamps writes the JSON and exits."""

    def __init__(self, out: Path, steps: int, t0_wall: float) -> None:
        import psutil

        self.out, self.steps, self.t0_wall = out, steps, t0_wall
        self.proc = psutil.Process()
        self.stamps: list[dict] = []
        self.rss: list[tuple[float, int]] = []
        self.owner: int | None = None  # id of the optimizer whose steps count (an accelerate wrapper may nest one)
        self.meta: dict = {}
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.rss.append((time.perf_counter(), self.proc.memory_info().rss))
            time.sleep(RSS_INTERVAL_S)

    def hook(self, optimizer, args, kwargs) -> None:  # torch's global optimizer step post-hook signature
        if self.owner is None:
            self.owner = id(optimizer)
            self.meta["optimizer"] = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
            self.meta["optimizer_defaults"] = {k: v for k, v in optimizer.defaults.items() if isinstance(v, (int, float, bool, str, type(None)))}
            params = [p for g in optimizer.param_groups for p in g["params"]]
            self.meta["trained_tensors"] = len(params)
            self.meta["trained_params"] = int(sum(p.numel() for p in params))
            self.meta["param_dtypes"] = sorted({str(p.dtype) for p in params})
        if id(optimizer) != self.owner:
            return
        import resource

        self.stamps.append({"perf": time.perf_counter(), "wall": time.time(), "cpu": time.process_time(),
                            "load1": os.getloadavg()[0], "rss": self.proc.memory_info().rss,
                            "minflt": resource.getrusage(resource.RUSAGE_SELF).ru_minflt})
        if len(self.stamps) >= self.steps:
            self.finish()

    def finish(self) -> None:
        import resource

        import torch

        p0, p1 = self.stamps[0]["perf"], self.stamps[-1]["perf"]
        result = {
            "stamps": self.stamps, "t0_wall": self.t0_wall,
            "first_step_s": self.stamps[0]["wall"] - self.t0_wall,
            "train_peak_rss": max((r for t, r in self.rss if p0 <= t <= p1), default=self.stamps[-1]["rss"]),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "torch_threads": torch.get_num_threads(), **self.meta,
        }
        self.out.write_text(json.dumps(result) + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # no saving, no teardown: not what is compared


def _child(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rec = _Recorder(Path(args.child_json), args.steps, float(os.environ["FD_BENCH_T0"]))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(rec.hook)
    kind = args.child
    if kind == "ours":
        from facediffuser.cli import main as cli_main

        code = cli_main(argv, own_process=True)  # what the facediffuser command's entry point does
    else:
        import runpy

        script = Path(argv[0])
        sys.argv = [str(script), *argv[1:]]
        sys.path.insert(0, str(script.parent))
        if kind == "diffusers" and args.diffusers_modules == "kohya":
            _diffusers_kohya_modules(args.diffusers_model)
        runpy.run_path(str(script), run_name="__main__")
        code = 0
    # only reached when the trainer stopped before the last step
    raise SystemExit(f"{kind} ended after {len(rec.stamps)} of {args.steps} optimizer steps (exit {code})")


def _diffusers_kohya_modules(model_dir: str) -> None:
    """diffusers' script builds ``LoraConfig(target_modules=[to_k, to_q, to_v, to_out.0])``; give it
    kohya's 192 names instead (from the same UNet config, built on the meta device)."""
    import peft
    import torch
    from diffusers import UNet2DConditionModel

    from facediffuser.trainer.lora_targets import unet_target_modules

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_dir, subfolder="unet"))
    names = unet_target_modules(unet)
    original = peft.LoraConfig

    def kohya_config(*a, **kw):
        if sorted(kw.get("target_modules") or []) == sorted(["to_k", "to_q", "to_v", "to_out.0"]):
            kw["target_modules"] = names
        return original(*a, **kw)

    peft.LoraConfig = kohya_config  # this process only; it exits after the timed steps


# --- the parent: data, models, commands, rounds, the table ------------------------------------------

def _default_model(args: argparse.Namespace) -> str:
    from facediffuser.sd.make_model import make_checkpoint

    dtype = "fp16" if args.size == "full" else "fp32"
    cache = Path(args.cache) / "models"
    for name in (f"sd15-{args.size}-seed0-{dtype}-layout1.safetensors", f"bench-sd15-{args.size}-seed0-{dtype}.safetensors"):
        if (cache / name).is_file():  # the test suite's copy (same maker, same seed)
            return str(cache / name)
    path = cache / f"bench-sd15-{args.size}-seed0-{dtype}.safetensors"
    make_checkpoint(path, arch="sd15", size=args.size, dtype=dtype, seed=0)
    return str(path)


def _prepare_data(work: Path, n: int, resolution: int) -> dict[str, Path]:
    """The same images and captions in the layouts each trainer reads: kohya's ``<repeats>_<name>``
    folder (ours reads it too: it searches recursively) and a datasets ``imagefolder`` with
    ``metadata.jsonl`` for diffusers."""
    import shutil

    from facediffuser.demo.toy_faces import write_toy_faces

    root = work / f"data-{n}-{resolution}"
    kohya, hf = root / "kohya" / "1_face", root / "hf"
    if not (root / "done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        write_toy_faces(kohya, n, size=resolution)
        hf.mkdir(parents=True)
        lines = []
        for img in sorted(kohya.glob("*.png")):
            shutil.copyfile(img, hf / img.name)
            lines.append(json.dumps({"file_name": img.name, "text": img.with_suffix(".txt").read_text(encoding="utf-8").strip()}))
        (hf / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (root / "done").write_text("")
    return {"kohya": kohya.parent, "hf": hf}


def _tokenizer_dir(work: Path) -> Path:
    """Our shipped SD1 CLIP tokenizer files where sd-scripts' ``--tokenizer_cache_dir`` looks (offline)."""
    import shutil

    from facediffuser.sd.tokenizer import tokenizer_files_dir

    out = work / "tokenizers" / "openai_clip-vit-large-patch14"
    if not out.is_dir():
        shutil.copytree(tokenizer_files_dir(), out)
    return out.parent


def _diffusers_folder(model: str, work: Path) -> Path:
    """The single file as a diffusers folder (fp32), which diffusers' script needs; made once."""
    out = work / ("diffusers-" + Path(model).stem)
    if not (out / "model_index.json").is_file():
        from facediffuser.sd.model_loading import load_pipeline

        pipe = load_pipeline(model, dtype="float32", device="cpu")
        pipe.save_pretrained(str(out), safe_serialization=True)
        del pipe
    return out


def _commands(args: argparse.Namespace, name: str, extra: list[str], run_dir: Path, data: dict[str, Path],
              paths: dict[str, Path]) -> list[str]:
    """The trainer's own command line (argv after the program name) for one run."""
    r, n = str(args.resolution), str(args.steps)
    if name == "sd-scripts":
        return [str(Path(args.sd_scripts) / "train_network.py"),
                "--pretrained_model_name_or_path", args.model, "--train_data_dir", str(data["kohya"]),
                "--resolution", f"{r},{r}", "--output_dir", str(run_dir), "--output_name", "lora",
                "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4",
                "--network_train_unet_only", "--learning_rate", "1e-4", "--unet_lr", "1e-4",
                "--optimizer_type", "AdamW", "--lr_scheduler", "constant", "--train_batch_size", "1",
                "--max_train_steps", n, "--max_grad_norm", "1.0", "--mixed_precision", "no", "--save_precision", "fp16",
                "--sdpa", "--cache_latents", "--seed", "0", "--tokenizer_cache_dir", str(paths["tokenizers"]),
                "--caption_extension", ".txt", "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors",
                *extra]
    if name == "diffusers":
        return [str(Path(args.diffusers) / "examples" / "text_to_image" / "train_text_to_image_lora.py"),
                "--pretrained_model_name_or_path", str(paths["diffusers_model"]), "--train_data_dir", str(data["hf"]),
                "--caption_column", "text", "--image_column", "image", "--resolution", r, "--center_crop",
                "--train_batch_size", "1", "--max_train_steps", n, "--learning_rate", "1e-4", "--lr_scheduler", "constant",
                "--lr_warmup_steps", "0", "--rank", "4", "--max_grad_norm", "1.0", "--mixed_precision", "no", "--seed", "0",
                "--output_dir", str(run_dir), "--dataloader_num_workers", "0", "--checkpointing_steps", "1000000",
                "--cache_dir", str(run_dir / "hf-cache"), *extra]
    return ["train", "--model", args.model, "--data", str(data["kohya"]), "--output", str(run_dir / "lora.safetensors"),
            "--cache-dir", str(run_dir / "cache"), "--state-dir", str(run_dir / "state"), "--steps", n,
            "--rank", "4", "--alpha", "4", "--lr", "1e-4", "--lr-scheduler", "constant", "--batch-size", "1",
            "--max-grad-norm", "1.0", "--resolution", r, "--mixed-precision", "no", "--seed", "0", *extra]


def _run_one(args: argparse.Namespace, label: str, kind: str, argv: list[str], run_dir: Path, paths: dict[str, Path]) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    out_json = run_dir / "stamps.json"
    extra_env = dict(a[4:].split("=", 1) for a in argv if a.startswith("ENV:"))
    argv = [a for a in argv if not a.startswith("ENV:")]
    env = dict(os.environ, **extra_env, FD_BENCH_T0=repr(time.time()), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(run_dir / "hf-home"), CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    overlay = {"sd-scripts": args.sd_overlay, "diffusers": args.diffusers_overlay}.get(kind)
    if overlay:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(overlay).resolve()), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-json", str(out_json),
           "--steps", str(args.steps), "--threads", str(args.threads), "--diffusers-modules", args.diffusers_modules,
           "--diffusers-model", str(paths.get("diffusers_model", "")), "--", *argv]
    load_before = os.getloadavg()
    t0 = time.time()
    with open(run_dir / "log.txt", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=str(Path(argv[0]).parent) if kind != "ours" else None)
    wall = time.time() - t0
    row = {"label": label, "kind": kind, "argv": argv, "env": extra_env, "exit": proc.returncode, "wall_s": wall,
           "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
    if proc.returncode or not out_json.is_file():
        row["error"] = (run_dir / "log.txt").read_text(errors="replace")[-2500:]
        print(f"  {label}: FAILED (exit {proc.returncode}); log {run_dir / 'log.txt'}", file=sys.stderr)
        return row
    raw = json.loads(out_json.read_text())
    st = raw.pop("stamps")
    steps = [b["perf"] - a["perf"] for a, b in zip(st, st[1:])]  # steps 2..N
    cpus = [b["cpu"] - a["cpu"] for a, b in zip(st, st[1:])]
    faults = [b["minflt"] - a["minflt"] for a, b in zip(st, st[1:])]
    row.update(raw, step_s=steps, cpu_step_s=cpus, minor_faults_per_step=faults, s_per_step=statistics.median(steps) if steps else None,
               cpu_s_per_step=statistics.median(cpus) if cpus else None, load1_during=[s["load1"] for s in st])
    print(f"  {label}: {row['s_per_step']:.3f} s/step (min {min(steps):.3f}, max {max(steps):.3f}), first step at "
          f"{row['first_step_s']:.1f} s, train RSS {row['train_peak_rss'] / 2**30:.2f} GiB, load "
          f"{load_before[0]:.1f} -> {row['loadavg_after'][0]:.1f}", file=sys.stderr, flush=True)
    return row


def _summarise(rows: list[dict], labels: list[str], ref: str | None) -> tuple[list[dict], dict]:
    table, ratios = [], {}
    for label in labels:
        ok = [r for r in rows if r["label"] == label and r.get("s_per_step")]
        if not ok:
            table.append({"label": label, "runs": 0})
            continue
        every = [s for r in ok for s in r["step_s"]]
        table.append({
            "label": label, "runs": len(ok), "s_per_step_runs": [r["s_per_step"] for r in ok],
            "s_per_step": statistics.median(r["s_per_step"] for r in ok), "step_min": min(every), "step_max": max(every),
            "cpu_s_per_step": statistics.median(r["cpu_s_per_step"] for r in ok),
            "first_step_s": [r["first_step_s"] for r in ok], "train_peak_rss_gib": [r["train_peak_rss"] / 2**30 for r in ok],
            "peak_rss_gib": [r["peak_rss"] / 2**30 for r in ok], "trained_tensors": ok[0].get("trained_tensors"),
            "trained_params": ok[0].get("trained_params"), "param_dtypes": ok[0].get("param_dtypes"),
        })
    if ref:
        for label in labels:
            if label == ref:
                continue
            pairs = [(a["s_per_step"], b["s_per_step"]) for a, b in _pairs(rows, label, ref)]
            if pairs:
                ratios[f"{label} / {ref} (s/step, per round)"] = [a / b for a, b in pairs]
                ratios[f"{label} / {ref} (s/step, median)"] = statistics.median(a / b for a, b in pairs)
            firsts = [(a["first_step_s"], b["first_step_s"]) for a, b in _pairs(rows, label, ref)]
            if firsts:
                ratios[f"{label} / {ref} (first step)"] = statistics.median(a / b for a, b in firsts)
    return table, ratios


def _pairs(rows: list[dict], a: str, b: str) -> list[tuple[dict, dict]]:
    by_round: dict[int, dict[str, dict]] = {}
    for r in rows:
        if r.get("s_per_step"):
            by_round.setdefault(r["round"], {})[r["label"]] = r
    return [(v[a], v[b]) for _, v in sorted(by_round.items()) if a in v and b in v]


def _print_table(table: list[dict], ratios: dict, args: argparse.Namespace, flops: float | None) -> None:
    gib = lambda xs: "-".join(f"{x:.2f}" for x in (min(xs), max(xs))) if len(xs) > 1 else f"{xs[0]:.2f}"  # noqa: E731
    print(f"\n{args.resolution} px, batch 1, rank 4 = alpha, fp32 unless the label says, {args.steps} steps, "
          f"{args.threads or 'default'} threads, {args.rounds} round(s)")
    print(f"| trainer | s/step (median of runs) | runs | step min-max | cpu s/step | first step at s | train RSS GiB | peak RSS GiB | LoRA tensors |")
    print("|---|---:|---|---|---:|---|---|---|---:|")
    for t in table:
        if not t["runs"]:
            print(f"| {t['label']} | FAILED | | | | | | | |")
            continue
        print(f"| {t['label']} | {t['s_per_step']:.3f} | {', '.join(f'{x:.2f}' for x in t['s_per_step_runs'])} | "
              f"{t['step_min']:.2f}-{t['step_max']:.2f} | {t['cpu_s_per_step']:.2f} | "
              f"{', '.join(f'{x:.1f}' for x in t['first_step_s'])} | {gib(t['train_peak_rss_gib'])} | {gib(t['peak_rss_gib'])} | "
              f"{t['trained_tensors']} |")
    for k, v in ratios.items():
        print(f"{k}: " + (", ".join(f"{x:.3f}" for x in v) if isinstance(v, list) else f"{v:.3f}"))
    if flops:
        for t in table:
            if t["runs"]:
                print(f"{t['label']}: {flops / t['s_per_step'] / 1e9:.0f} GFLOP/s useful (2 x UNet forward = {flops / 1e9:.1f} GFLOP/step)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="SD1.5 single file (default: the full-size random model, made once into --cache).")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--cache", default=os.environ.get("FACEDIFFUSER_TEST_CACHE", ".cache/tests"))
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="Optimizer steps per run; s/step is the median of steps 2..N.")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="Rounds; each runs every trainer once, in --trainers order.")
    p.add_argument("--trainers", default="ours,sd-scripts,diffusers")
    p.add_argument("--ours", action="append", metavar="NAME=FLAGS",
                   help="A variant of our trainer with extra flags (repeatable; default: one run named 'ours').")
    p.add_argument("--sd-scripts", metavar="DIR")
    p.add_argument("--sd-overlay", metavar="DIR")
    p.add_argument("--sd-scripts-args", default="", help="Extra flags for train_network.py.")
    p.add_argument("--sd-scripts-variant", action="append", metavar="NAME=FLAGS",
                   help="Another sd-scripts run per round, labelled sd-scripts-NAME, with extra flags / ENV:K=V tokens.")
    p.add_argument("--diffusers", metavar="DIR")
    p.add_argument("--diffusers-overlay", metavar="DIR")
    p.add_argument("--diffusers-modules", choices=("kohya", "script"), default="kohya")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads and torch.set_num_threads in every process (0 = default).")
    p.add_argument("--workdir", default=None, help="Data, converted model, runs (default: /tmp/fd-bench-peers).")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-json", help=argparse.SUPPRESS)
    p.add_argument("--diffusers-model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args, tail)
    if args.steps < 3:
        p.error("--steps must be at least 3 (step 1 is not timed; the median needs steps 2..N)")
    work = Path(args.workdir or "/tmp/fd-bench-peers")
    work.mkdir(parents=True, exist_ok=True)
    if not args.model:
        args.model = _default_model(args)
    args.model = str(Path(args.model).resolve())

    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    runs: list[tuple[str, str, list[str]]] = []  # (label, kind, extra flags)
    for t in trainers:
        if t == "ours":
            for spec in args.ours or ["ours="]:
                name, _, flags = spec.partition("=")
                runs.append((name if name.startswith("ours") else f"ours-{name}", "ours", shlex.split(flags)))
                # ENV:K=V tokens set the process environment instead of a flag (e.g. malloc tunables)
        elif t == "sd-scripts":
            if not (args.sd_scripts and args.sd_overlay):
                p.error("sd-scripts needs --sd-scripts DIR and --sd-overlay DIR")
            runs.append(("sd-scripts", t, shlex.split(args.sd_scripts_args)))
            for spec in args.sd_scripts_variant or []:  # e.g. glibc malloc tunables: sd-scripts as a user could tune it
                name, _, flags = spec.partition("=")
                runs.append((f"sd-scripts-{name}", t, shlex.split(args.sd_scripts_args) + shlex.split(flags)))
        elif t == "diffusers":
            if not args.diffusers:
                p.error("diffusers needs --diffusers DIR")
            runs.append(("diffusers", t, []))
        else:
            p.error(f"unknown trainer {t!r} (ours, sd-scripts, diffusers)")

    data = _prepare_data(work, args.images, args.resolution)
    paths: dict[str, Path] = {}
    if any(k == "sd-scripts" for _, k, _ in runs):
        paths["tokenizers"] = _tokenizer_dir(work)
    if any(k == "diffusers" for _, k, _ in runs):
        paths["diffusers_model"] = _diffusers_folder(args.model, work)

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    rows = []
    for rnd in range(args.rounds):
        for label, kind, extra in runs:
            run_dir = work / "runs" / f"r{rnd}-{label}"
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = _commands(args, kind, extra, run_dir, data, paths)
            row = _run_one(args, label, kind, cmd, run_dir, paths)
            row["round"] = rnd
            rows.append(row)
    labels = list(dict.fromkeys(label for label, _, _ in runs))
    ref = "sd-scripts" if "sd-scripts" in labels else None
    table, ratios = _summarise(rows, labels, ref)
    flops = None
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_train import count_flops

        flops = 2 * count_flops(args.model, args.resolution)["unet_forward"]
    except Exception as exc:  # noqa: BLE001 - the table does not depend on it
        print(f"FLOP count skipped: {exc}", file=sys.stderr)
    _print_table(table, ratios, args, flops)
    if args.json:
        from bench_train import _machine

        report = {"argv": sys.argv[1:], "date": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "machine": _machine(), "model": args.model, "resolution": args.resolution, "steps": args.steps,
                  "threads": args.threads, "train_flops_per_step": flops, "table": table, "ratios": ratios, "runs": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
