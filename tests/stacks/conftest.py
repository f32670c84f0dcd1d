"""Shared setup for the Pulumi stack tests: put the stacks' modules on sys.path (via the harness)."""

import stacks_harness  # noqa: F401  (imported for its sys.path side effect)

import asyncio

import pytest


@pytest.fixture(autouse=True, scope="session")
def _an_event_loop():
    """Pulumi's mocks call asyncio.get_event_loop(). In the main thread that creates a loop only if no test has
    set one before; `asyncio.run()` (the NATS tests use it) sets None at its end, after which get_event_loop()
    raises. Give the stack tests a loop of their own, closed at the end."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()



@pytest.fixture(autouse=True, scope="module")
def _the_loop_is_current(_an_event_loop: asyncio.AbstractEventLoop) -> None:
    """The stacks' loop is current for every stack module, before its own fixtures: a module run between two of them
    (pytest-xdist runs the modules of different folders in one worker in any order) may have left none
    (`asyncio.run()`); a module's tests run one after the other."""
    asyncio.set_event_loop(_an_event_loop)
