"""The ``facediffuser`` command.

Every sub-command is registered the same way: it lives beside the code it drives, in a module
``<package>/cli_<name>.py`` listed in :data:`_COMMAND_MODULES`, whose ``register(subparsers)`` adds
its parser and sets ``func(args) -> int`` (``eval`` registers its own sub-commands the same way,
from ``evaluation/cli_eval.py::_EVAL_COMMAND_MODULES``). A listed module that is missing is an
error, not a silently absent command. Registration modules import only argparse-level things, so
``facediffuser --help`` stays fast; the work is imported when the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from contextlib import contextmanager
from typing import Iterator, Sequence

# Modules relative to this package; the order is the order in --help.
_COMMAND_MODULES = [
    "trainer.cli_train",
    "sd.cli_make_model",
    "faces.cli_prep",
    "evaluation.cli_eval",
    "evaluation.cli_generate",
    "demo.cli_demo",
]


#: Commands whose own process keeps freed memory from the start (:mod:`.allocator`): CPU generation
#: measured 1.11x faster with the same peak RSS. ``train`` switches it on itself, after loading.
KEEP_FREED_MEMORY_FROM_START = {"generate", "eval", "demo"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facediffuser",
        description="Train a face LoRA for Stable Diffusion, use it anywhere, and measure it honestly.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(f".{name}", __package__).register(sub)
    return parser


@contextmanager
def _show_logs(command: str) -> Iterator[None]:
    """The library logs to ``logging.getLogger("facediffuser.*")``; a host decides what to show.
    The command is the host here: INFO and up on stderr as ``facediffuser <command>: <message>``,
    for this call only (tests call :func:`main` many times in one process)."""
    logger = logging.getLogger("facediffuser")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"facediffuser {command}: %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """Run one command. ``own_process``: this process is the command's alone (see :func:`entry`),
    so a command may set it up for its work (``train``: :mod:`.allocator`); hosts and tests leave it off."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.own_process = own_process
    if own_process and args.command in KEEP_FREED_MEMORY_FROM_START:
        from .allocator import keep_freed_memory

        keep_freed_memory()
    with _show_logs(args.command):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
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


def entry() -> int:
    """The ``facediffuser`` console script and ``python -m facediffuser.cli``: a process of our own."""
    return main(own_process=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
