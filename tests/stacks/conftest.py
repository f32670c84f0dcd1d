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
