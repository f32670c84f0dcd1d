"""Every command's `--help` is pinned: tests/cli_help/<command path>.txt holds the exact help of `iotplat`, of each
command and of each subcommand (`iotplat device add`, `iotplat rotate certs`, ...), formatted 100 columns wide.

Flags, their order, defaults, choices and help text are user interface: a change to one of these files is a
change to what users read, reviewed like one. A refactor of build_parser must leave them byte-identical.

To regenerate after an intended change: IOTPLAT_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_cli_help.py
(the run then fails on purpose; review `git diff tests/cli_help` before committing it).

argparse's layout differs between Python versions (3.13 writes `-o, --out OUT` where 3.11 writes `-o OUT, --out OUT`),
so the files are for the project's interpreter, Python 3.11 (.ci/run); on another version the test is skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotplat.cli import build_parser

HELP = Path(__file__).parent / "cli_help"
REGENERATE = os.environ.get("IOTPLAT_REGENERATE_GOLDEN") == "1"
PYTHON = (3, 11)


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("iotplat",)) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield "-".join(path), parser
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _helps(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.delenv("IOTPLAT_ENV", raising=False)  # the default of --env
    return {name: p.format_help() for name, p in _parsers(build_parser())}


@pytest.mark.skipif(sys.version_info[:2] != PYTHON, reason=f"help files are formatted by Python {PYTHON[0]}.{PYTHON[1]}'s argparse")
def test_every_command_help_is_as_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    helps = _helps(monkeypatch)
    assert len(helps) > 20 and "iotplat-device-add" in helps and "iotplat-rotate-certs" in helps
    if REGENERATE:
        for old in HELP.glob("*.txt"):
            old.unlink()
        HELP.mkdir(exist_ok=True)
        for name, text in helps.items():
            (HELP / f"{name}.txt").write_text(text)
        pytest.fail(f"regenerated {len(helps)} help files in {HELP}: review the diff")
    pinned = {p.stem: p.read_text() for p in HELP.glob("*.txt")}
    assert sorted(helps) == sorted(pinned), "commands added or removed: regenerate (see the module docstring)"
    for name, text in helps.items():
        assert text == pinned[name], f"`{name.replace('-', ' ')} --help` changed"
