"""``facediffuser eval``: ``stats`` (embed a folder into a stats file) and ``fid`` (compare two sets).

More ``eval`` sub-commands plug in the way top-level commands do: a module in
``_EVAL_COMMAND_MODULES`` with ``register(eval_subparsers)``; it may reuse
:func:`add_extractor_arguments` and :func:`extractor_factory`. Registration imports argparse only.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any, Callable

from .inception import DEFAULT_RESIZE, RESIZE_MODES  # light: torch is imported inside its functions
from .kid import DEFAULT_SEED, DEFAULT_SUBSET_SIZE, DEFAULT_SUBSETS

# eval sub-commands defined elsewhere (relative to this package), in --help order.
_EVAL_COMMAND_MODULES = ["cli_eval_table"]


def register(subparsers: Any) -> argparse._SubParsersAction:
    """Add ``eval`` and its sub-commands; returns the eval sub-parsers so others can add more."""
    p = subparsers.add_parser(
        "eval",
        help="FID/KID evaluation with the standard Inception (stats files, comparisons).",
        description="FID and KID with the standard FID Inception v3, computed in float64. FID is biased at small N: "
        "always compare at equal N and read KID (unbiased) beside it.",
    )
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    sub.required = True

    s = sub.add_parser("stats", help="Embed a folder of images into an FID stats file (.npz, pytorch-fid compatible).",
                       description="Write mu, sigma, N, the features (for KID) and the protocol of a folder of images.")
    s.add_argument("folder", metavar="DIR", help="Folder of images (searched recursively).")
    s.add_argument("--out", required=True, metavar="FILE.npz", help="Stats file to write (readable by pytorch-fid).")
    s.add_argument("--no-features", action="store_true", help="Store only mu/sigma (smaller file, but no KID against it).")
    add_extractor_arguments(s)
    s.set_defaults(func=_run_stats)

    f = sub.add_parser("fid", help="FID (and KID) between two sets, each a folder of images or a stats file.",
                       description="Print FID with N, KID ± std when both sides have features, and the protocol.")
    f.add_argument("a", metavar="A", help="Folder of images or .npz stats file.")
    f.add_argument("b", metavar="B", help="Folder of images or .npz stats file.")
    add_kid_arguments(f)
    f.add_argument("--seed", type=int, default=DEFAULT_SEED, metavar="S", help="KID subset seed (default: %(default)s, torch-fidelity's).")
    f.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    add_extractor_arguments(f)
    f.set_defaults(func=_run_fid)

    for name in _EVAL_COMMAND_MODULES:
        importlib.import_module(f".{name}", __package__).register(sub)
    return sub


def add_extractor_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that embeds images."""
    parser.add_argument("--inception", metavar="FILE", help="FID Inception weights (weights-inception-2015-12-05-6726825d.pth "
                        "or pt_inception-…); default: $FACEDIFFUSER_INCEPTION, then $TORCH_HOME/hub/checkpoints.")
    parser.add_argument("--batch-size", type=int, default=50, metavar="B", help="Images per Inception batch (default: 50).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    add_resize_argument(parser)
    parser.add_argument("--cache-dir", metavar="DIR", help="Feature cache (default: $FACEDIFFUSER_CACHE or ~/.cache/facediffuser/features).")
    parser.add_argument("--no-cache", action="store_true", help="Neither read nor write the feature cache.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")


def add_resize_argument(parser: argparse.ArgumentParser) -> None:
    """``--resize``, its choices and their meaning from :data:`.inception.RESIZE_MODES`."""
    parser.add_argument("--resize", choices=tuple(RESIZE_MODES), default=DEFAULT_RESIZE,
                        help="Resize/normalisation convention of the Inception input (default: %(default)s): "
                        + "; ".join(f"{k} = {v}" for k, v in RESIZE_MODES.items()) + ".")


def add_kid_arguments(parser: argparse.ArgumentParser) -> None:
    """``--kid-subsets`` and ``--kid-subset-size`` with the defaults of :mod:`.kid`."""
    parser.add_argument("--kid-subsets", type=int, default=DEFAULT_SUBSETS, metavar="K",
                        help="KID: number of random subsets (default: %(default)s).")
    parser.add_argument("--kid-subset-size", type=int, default=DEFAULT_SUBSET_SIZE, metavar="M",
                        help="KID: subset size, capped at the smaller N (default: %(default)s).")


def extractor_factory(args: argparse.Namespace) -> Callable[[], Any]:
    """A memoised builder of the InceptionFeatures the flags describe (built on first use)."""
    built: list[Any] = []

    def make() -> Any:
        if not built:
            from .inception import InceptionFeatures

            built.append(InceptionFeatures(args.inception, device=args.device, batch_size=args.batch_size,
                                           resize=args.resize, progress=not args.quiet))
        return built[0]

    return make


def protocol_line(protocol: dict | None) -> str:
    if not protocol:
        return "protocol: unknown (stats file without a recorded protocol)"
    sha = str(protocol.get("weights_sha256", "?"))
    return (f"protocol: {protocol.get('extractor', '?')}; weights {protocol.get('weights', '?')} sha256 {sha[:16]}…; "
            f"resize {protocol.get('resize', '?')} ({protocol.get('resize_description', '')}); {protocol.get('dtype', '')}")


def _run_stats(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .stats import FeatureStats, folder_features, save_stats

    feats, protocol = folder_features(args.folder, extractor_factory(args)(), cache_dir=args.cache_dir, use_cache=not args.no_cache)
    stats = FeatureStats.from_features(feats, protocol=protocol, source=args.folder)
    out = save_stats(stats, Path(args.out), include_features=not args.no_features)
    print(f"wrote {out}: N={stats.n}, D={stats.dim}{'' if args.no_features else ', with features'}")
    print(protocol_line(stats.protocol))
    return 0


def _run_fid(args: argparse.Namespace) -> int:
    import json

    from ..errors import UserError
    from .stats import compare, stats_for

    if args.kid_subsets < 1 or args.kid_subset_size < 2:
        raise UserError("--kid-subsets must be >= 1 and --kid-subset-size >= 2")
    make = extractor_factory(args)
    a = stats_for(args.a, make, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    b = stats_for(args.b, make, cache_dir=args.cache_dir, use_cache=not args.no_cache)
    res = compare(a, b, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size, seed=args.seed)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, sort_keys=True))
    else:
        na, nb = res.n_a if res.n_a is not None else "?", res.n_b if res.n_b is not None else "?"
        print(f"FID {res.fid:.4f}  (A: N={na}, B: N={nb}; FID is biased at small N: compare at equal N)")
        if res.kid_mean is not None:
            print(f"KID {res.kid_text()}  ({res.kid_subsets} subsets of {res.kid_subset_size}, seed {res.kid_seed})")
        else:
            print("KID n/a  (a side has only mu/sigma; write stats with features: facediffuser eval stats DIR --out FILE)")
        print(protocol_line(res.protocol))
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return 0
