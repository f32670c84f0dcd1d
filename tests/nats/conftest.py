"""Fixtures for the NATS engine's tests: real nats-server 2.9.10 processes (tests/support/natscluster.py),
a real InfluxDB 1.6.7 and the worker as a real process, all on loopback ports picked free, all killed at
teardown. nats-server comes from Debian's package (.ci/run installs it)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

from support.fixtures import influx, workers  # noqa: E402,F401  (shared with tests/worker)
from support.natscluster import NATS_SERVER, NatsCluster  # noqa: E402

if not shutil.which(NATS_SERVER):  # pragma: no cover - .ci/run installs it
    pytest.fail("nats-server is not installed: apt-get install nats-server (see .ci/run)", pytrace=False)


@pytest.fixture
def clusters():
    """Start clusters through this list (NatsCluster.start(...)); every node is killed at teardown."""
    started: list[NatsCluster] = []
    yield started
    for c in started:
        c.close()
