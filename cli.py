"""The ``facediffuser`` command.

Each sub-command lives beside the code it drives, in a module with a ``register(subparsers)``
function that adds its parser and sets ``func``. Registration modules import only argparse-level
things, so ``facediffuser --help`` stays fast; the work is imported when the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# Modules relative to this package; the order is the order in --help.
_COMMAND_MODULES = [
    "trainer.cli_train",
    "sd.cli_make_model",
    "faces.cli_prep",
    "evaluation.cli_eval",
    "evaluation.cli_generate",
    "demo.cli_demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facediffuser",
        description="Train a face LoRA for Stable Diffusion, use it anywhere, and measure it honestly.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as exc:  # a command not built yet in this checkout
            if exc.name and exc.name.endswith(name.split(".")[-1]):
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("facediffuser: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for errors we raise on purpose; a traceback otherwise
        if _is_user_error(exc):
            print(f"facediffuser {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise
    return int(result or 0)


def _is_user_error(exc: Exception) -> bool:
    from .errors import UserError

    return isinstance(exc, UserError)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
