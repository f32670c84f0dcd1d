"""One error hierarchy and one exit-code table for the whole CLI.

Every error a user can cause is an IotplatError subclass whose str() is one line that says what is
wrong and how to fix it. iotplat.cli is the only place that turns them into exit codes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # something went wrong while doing the work (deploy failed, a probe failed, ...)
    INVALID = 2  # the input (spec, device registry, flags, files) is invalid; nothing was changed
    DRIFT = 3  # `plan`: the hosts differ from what was last deployed
    INTERRUPTED = 130  # Ctrl-C


class IotplatError(Exception):
    """Base class: a one-line, user-facing message."""

    exit_code: ExitCode = ExitCode.FAILURE


class InvalidInput(IotplatError):
    exit_code = ExitCode.INVALID


class StateError(IotplatError):
    """The state directory is missing, locked, corrupt or cannot be decrypted."""


def _one_line(text: str) -> str:
    """Escape control characters so a problem is always exactly one line (no log/terminal injection)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


@dataclass(frozen=True, order=True)
class Problem:
    """One problem found in a user's file, reported as FILE:LINE:COL: path: message."""

    file: str
    line: int  # 1-based
    column: int  # 1-based
    path: str  # dotted path into the spec, e.g. broker.listeners[0].port; "" for the whole document
    message: str
    hint: str = field(default="", compare=False)

    def __str__(self) -> str:
        where = self.path or "(document)"
        text = f"{self.file}:{self.line}:{self.column}: {where}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return _one_line(text)

    def as_dict(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "column": self.column,
            "path": self.path,
            "message": self.message,
            "hint": self.hint,
        }


class SpecInvalid(InvalidInput):
    """A spec (or a file it references) has one or more problems; all are reported at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(set(problems))
        super().__init__(f"{len(self.problems)} problem(s) in the spec")

    def lines(self, limit: int | None = None) -> list[str]:
        shown = self.problems if limit is None else self.problems[:limit]
        out = [str(p) for p in shown]
        if limit is not None and len(self.problems) > limit:
            out.append(f"... and {len(self.problems) - limit} more")
        return out
