"""Waiting on a condition in a test: polled, bounded, and failing with what was last seen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(cond: Callable[[], T], timeout: float, what: str, last: Callable[[], object] | None = None,
               poll: float = 0.2) -> T:
    """``cond()``'s first truthy result within ``timeout`` seconds; otherwise AssertionError naming ``what``
    and the last state: ``last()`` when given, else ``cond()``'s last result."""
    deadline = time.monotonic() + timeout
    got = cond()
    while not got:
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout}s; last: {last() if last else got!r}")
        time.sleep(poll)
        got = cond()
    return got
