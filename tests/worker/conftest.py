"""Fixtures for the worker's tests. Servers come from tests/support (real Mosquitto, InfluxDB 1.6.7,
VictoriaMetrics), each on random loopback ports in its own temp dir, killed at teardown."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The shared helpers are imported as the top-level package "support" (the benchmarks import them the same
# way). tests/ goes at the END of sys.path: first, its folders (tests/secrets, ...) would shadow standard
# library modules of the same name (`import secrets`) for every test that runs after this one.
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

from support.fixtures import influx, workers  # noqa: E402,F401  (shared with tests/nats)
from support.servers import Mosquitto, Victoria  # noqa: E402


@pytest.fixture
def broker():
    b = Mosquitto.start()
    yield b
    b.close()


@pytest.fixture
def victoria():
    v = Victoria.start()
    yield v
    v.close()


@pytest.fixture(params=["native", "paho"])
def transport_kind(request):
    return request.param
