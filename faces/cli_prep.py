"""``facediffuser prep SRC DST``: detect, FFHQ-align and mask every face of a photo folder.

Registration imports argparse only; the detector and torch load when the command runs.
"""

from __future__ import annotations

import argparse

_EPILOG = """\
output, beside each crop DST/<name>.png:
  <name>.json       box, landmarks (crop pixels), score, source file, face index
  <name>.mask.png   face mask for --face-loss-weight in facediffuser train
  DST/prep_summary.json lists every dropped image and why; DST/.debug/ has the --debug-masks overlays.
Re-running the same command skips images already done (resumable).

face detection needs facenet-pytorch (MTCNN; its wheel ships the weights):
  pip install facenet-pytorch==2.5.3

examples:
  facediffuser prep photos/ faces/                       # largest face per photo, 512 px
  facediffuser prep photos/ faces/ --all-faces --min-face 96 --debug-masks
"""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prep",
        help="Detect, FFHQ-align and mask faces in a folder of photos (training data prep).",
        description="Find the faces in SRC (recursively), cut FFHQ-aligned square crops with face masks, "
                    "and write them to DST with per-face metadata and a summary of what was dropped.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="Folder of photos (searched recursively).")
    parser.add_argument("dst", metavar="DST", help="Output folder (created; sub-folders of SRC are mirrored).")
    parser.add_argument("--size", type=int, default=512, metavar="PX", help="Side of the square crops (default: 512, SD1.5's native size).")
    parser.add_argument("--min-face", type=int, default=64, metavar="PX", help="Ignore faces whose detector box is smaller than this, in source pixels (default: 64).")
    parser.add_argument("--min-score", type=float, default=0.9, metavar="P", help="Detector confidence needed to count as a face (default: 0.9).")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--one-face-only", action="store_true", help="Drop photos with more than one face (default: keep the largest face).")
    which.add_argument("--all-faces", action="store_true", help="Write every face, as <name>_0.png, <name>_1.png, ... (default: keep the largest face).")
    parser.add_argument("--debug-masks", action="store_true", help="Also write each crop with its mask and landmarks drawn on it, under DST/.debug/.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar.")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from .prep import PrepSettings, prep_folder

    faces = "all" if args.all_faces else "one-only" if args.one_face_only else "largest"
    settings = PrepSettings(size=args.size, min_face=args.min_face, min_score=args.min_score, faces=faces,
                            debug_masks=args.debug_masks)
    result = prep_folder(args.src, args.dst, settings, progress=not args.no_progress)
    print(result.line())
    if result.faces_written == 0:
        raise UserError(f"no usable face in any of the {result.sources} image(s) in {args.src}; see {result.summary_path}")
    return 0
