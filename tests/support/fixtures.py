"""Fixtures shared by the test folders that start real servers (tests/worker, tests/nats): import them into a
conftest.py (`from support.fixtures import influx, workers`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .servers import Influx1
from .workerproc import WorkerProc


@pytest.fixture
def influx() -> Iterator[Influx1]:
    """A real InfluxDB 1.6.7 on loopback ports picked free, stopped at teardown."""
    i = Influx1.start()
    yield i
    i.close()


@pytest.fixture
def workers() -> Iterator[list[WorkerProc]]:
    """Start workers through this list; every one is killed at teardown."""
    started: list[WorkerProc] = []
    yield started
    for w in started:
        w.close()
