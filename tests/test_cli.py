"""Every command is registered the same way: ``<package>/cli_<name>.py`` with ``register``, listed
in ``cli._COMMAND_MODULES`` (``eval``'s own in ``_EVAL_COMMAND_MODULES``); a listed module that is
missing is an error, and no ``cli_*.py`` module is left unregistered."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from facediffuser import cli
from facediffuser.evaluation import cli_eval

PACKAGE = Path(cli.__file__).resolve().parent


def _listed() -> set[str]:
    return set(cli._COMMAND_MODULES) | {f"evaluation.{m}" for m in cli_eval._EVAL_COMMAND_MODULES}


def test_every_command_module_is_a_listed_cli_module_with_register():
    on_disk = {p.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
               for p in PACKAGE.glob("*/cli_*.py") if not p.parts[-2].startswith((".", "tests"))}
    assert on_disk == _listed()  # nothing unregistered, nothing listed that is not there
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == ["train", "make-model", "prep", "eval", "generate", "demo"]
    for name, p in sub.choices.items():
        if name == "eval":
            eval_sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
            assert all(callable(q.get_default("func")) for q in eval_sub.choices.values()) and "table" in eval_sub.choices
        else:
            assert callable(p.get_default("func")), name


def test_a_missing_command_module_is_an_error(monkeypatch):
    monkeypatch.setattr(cli, "_COMMAND_MODULES", cli._COMMAND_MODULES + ["trainer.cli_not_there"])
    with pytest.raises(ModuleNotFoundError, match="cli_not_there"):
        cli.build_parser()
    monkeypatch.setattr(cli_eval, "_EVAL_COMMAND_MODULES", ["cli_not_there_either"])
    with pytest.raises(ModuleNotFoundError, match="cli_not_there_either"):
        cli_eval.register(argparse.ArgumentParser().add_subparsers())
