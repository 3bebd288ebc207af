"""Benchmark: our Fréchet distance vs scipy ``sqrtm`` and torchmetrics, and Inception throughput
vs pytorch-fid on the same device.

    python bench/bench_fid.py [--sizes 1000 10000] [--images 32] [--device cpu] [--json out.json]

Fréchet part: synthetic 2048-d features (a 1/i spectrum, like Inception's), two sets of N each;
stats are computed once, then each method is timed on the same stats. Throughput part: images/s
of ``InceptionFeatures`` (tf1 resize, default channels_last) and of pytorch-fid's ``InceptionV3``
on the same 299x299 uint8 batch. Without real weights (``--inception`` / the usual places) a
random-weight file of the same layout is used: speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _timed(fn, repeats: int = 1):
    best, value = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t)
    return best, value


def bench_frechet(n: int, d: int = 2048, seed: int = 0) -> dict:
    import numpy as np
    import scipy.linalg
    import torch
    from torchmetrics.image.fid import _compute_fid

    from facediffuser.evaluation.frechet import frechet_distance
    from facediffuser.evaluation.stats import FeatureStats, fid

    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(np.arange(1, d + 1))
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    fa = ((rng.standard_normal((n, d)) * scale) @ q.T + 0.5).astype(np.float32)
    fb = ((rng.standard_normal((n, d)) * scale * 1.1) @ q.T + 0.52).astype(np.float32)
    t_stats, (a, b) = _timed(lambda: (FeatureStats.from_features(fa), FeatureStats.from_features(fb)))

    def scipy_fd():
        covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)
        return float((a.mu - b.mu) @ (a.mu - b.mu) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean).real)

    def tm_fd():
        return float(_compute_fid(torch.from_numpy(a.mu), torch.from_numpy(a.sigma), torch.from_numpy(b.mu), torch.from_numpy(b.sigma)))

    t_ours, v_ours = _timed(lambda: frechet_distance(a.mu, a.sigma, b.mu, b.sigma))
    t_auto, v_auto = _timed(lambda: fid(a, b))  # Gram route when N < D
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_scipy, v_scipy = _timed(scipy_fd)
    t_tm, v_tm = _timed(tm_fd)
    return {
        "n": n, "d": d, "stats_s": t_stats,
        "ours_eigh_s": t_ours, "ours_auto_s": t_auto, "ours_auto_route": "gram (N x N)" if n < d else "eigh (D x D)",
        "scipy_sqrtm_s": t_scipy, "torchmetrics_s": t_tm,
        "speedup_vs_scipy": t_scipy / t_ours, "speedup_vs_torchmetrics": t_tm / t_ours,
        "auto_speedup_vs_scipy": t_scipy / t_auto, "auto_speedup_vs_torchmetrics": t_tm / t_auto,
        "fid": {"ours_eigh": v_ours, "ours_auto": v_auto, "scipy": v_scipy, "torchmetrics": v_tm},
        "rel_diff_vs_scipy": abs(v_ours - v_scipy) / abs(v_scipy),
        "rel_diff_auto_vs_scipy": abs(v_auto - v_scipy) / abs(v_scipy),
    }


def _weights_or_random(given: str | None, tmp: Path) -> tuple[Path, bool]:
    from facediffuser.errors import UserError
    from facediffuser.evaluation.inception import find_inception_weights

    try:
        return find_inception_weights(given), False
    except UserError:
        import torch

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from fixtures_inception import build_random_inception_state_dict

        path = tmp / "weights-inception-2015-12-05-6726825d.pth"
        torch.save(build_random_inception_state_dict(0), path)
        return path, True


def bench_throughput(n_images: int, batch_size: int, device: str | None, weights: str | None) -> dict:
    import torch

    from facediffuser.evaluation.inception import InceptionFeatures

    with tempfile.TemporaryDirectory() as tmp:
        path, random_weights = _weights_or_random(weights, Path(tmp))
        home = Path(tmp) / "torch_home" / "hub" / "checkpoints"  # pytorch-fid reads only the hub cache
        home.mkdir(parents=True)
        os.symlink(path.resolve(), home / "pt_inception-2015-12-05-6726825d.pth")
        os.environ["TORCH_HOME"] = str(Path(tmp) / "torch_home")
        from pytorch_fid.inception import InceptionV3

        ours = InceptionFeatures(path, device=device, batch_size=batch_size, progress=False)
        dev = ours.device
        ref = InceptionV3([3]).to(dev).eval()
        x = torch.randint(0, 256, (n_images, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

        def run_ref():
            with torch.no_grad():
                for i in range(0, n_images, batch_size):
                    ref(x[i:i + batch_size].to(dev).float() / 255)[0]
            if dev.type == "cuda":
                torch.cuda.synchronize()

        def run_ours():
            ours(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        ours(x[:batch_size]); run_ref()  # warm-up (kernels, allocator)
        t_ours, _ = _timed(run_ours)
        t_ref, _ = _timed(run_ref)
    return {
        "device": str(dev), "images": n_images, "batch_size": batch_size, "random_weights": random_weights,
        "ours_img_per_s": n_images / t_ours, "pytorch_fid_img_per_s": n_images / t_ref, "ratio_vs_pytorch_fid": t_ref / t_ours,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="Feature-set sizes N (default: 1000 10000).")
    ap.add_argument("--images", type=int, default=32, help="Images for the throughput part (default: 32; 0 = skip).")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--inception", default=None, help="Real weights file (default: the usual places, else random weights).")
    ap.add_argument("--json", metavar="FILE", help="Also write the results as JSON.")
    args = ap.parse_args(argv)

    import torch

    results: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                                 "torch_threads": torch.get_num_threads()}, "frechet": [], "throughput": None}
    for n in args.sizes:
        r = bench_frechet(n)
        results["frechet"].append(r)
        print(f"Fréchet N={n:>6} D=2048: ours(eigh) {r['ours_eigh_s']:.2f}s, ours(auto, {r['ours_auto_route']}) {r['ours_auto_s']:.2f}s, "
              f"scipy sqrtm {r['scipy_sqrtm_s']:.2f}s, torchmetrics {r['torchmetrics_s']:.2f}s | "
              f"eigh x{r['speedup_vs_scipy']:.1f} vs scipy, x{r['speedup_vs_torchmetrics']:.2f} vs torchmetrics; "
              f"auto x{r['auto_speedup_vs_scipy']:.1f} / x{r['auto_speedup_vs_torchmetrics']:.2f} | "
              f"FID {r['fid']['ours_eigh']:.6f}, rel. diff vs scipy {r['rel_diff_vs_scipy']:.1e} (auto {r['rel_diff_auto_vs_scipy']:.1e})",
              flush=True)
    if args.images:
        t = bench_throughput(args.images, args.batch_size, args.device, args.inception)
        results["throughput"] = t
        print(f"Inception features on {t['device']} ({t['images']} images 299x299, batch {t['batch_size']}"
              f"{', random weights' if t['random_weights'] else ''}): ours {t['ours_img_per_s']:.1f} img/s, "
              f"pytorch-fid {t['pytorch_fid_img_per_s']:.1f} img/s, ratio x{t['ratio_vs_pytorch_fid']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
