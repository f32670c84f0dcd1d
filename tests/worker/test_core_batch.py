"""The worker core's batch entry point (``on_publishes``), in-process: no broker, no InfluxDB, nothing started.

What it proves: a read's messages go through the per-topic fast route when there is one and through the
generic decoder or a dead letter otherwise, with the same line bytes the generic decoder makes, in arrival
order, every ack token kept in order, and the counters and the in-flight window (room()) right. What it
cannot: anything on the wire (tests/worker/test_transport_conformance.py and the integration tests do that).
"""

from __future__ import annotations

import io
import json
import re
import time

import pytest
from support.workerproc import TELEMETRY_SUB, render_config

from iotplat.worker.config import load_config
from iotplat.worker.core import Worker
from iotplat.worker.decoders import JsonDecoder
from iotplat.worker.logs import Log

RAW_SUB = {"name": "raw", "topic": "sensors/{device}/value", "format": "raw", "measurement": "raw"}


@pytest.fixture
def worker(tmp_path):
    (tmp_path / "pw").write_text("x\n")
    (tmp_path / "ipw").write_text("x\n")
    path = render_config(tmp_path / "w.toml", {
        "mqtt": {"host": "127.0.0.1", "port": 1, "protocol": 5, "username": "w", "password_file": "pw",
                 "inflight": 10},
        "influxdb": {"version": 1, "url": "http://127.0.0.1:1", "database": "d", "username": "u",
                     "password_file": "ipw"},
        "batch": {"max_points": 5000, "max_delay": 0.2},
        "spool": {"dir": str(tmp_path / "spool")},
        "dead_letters": {"topic": ""},
        "http": {"listen": "127.0.0.1", "port": 0}}, [TELEMETRY_SUB, RAW_SUB])
    w = Worker(load_config(path, 1), Log(stream=io.StringIO(), replica=1), transport_kind="native")
    yield w
    w.spool.close()


def test_on_publishes_fast_route_generic_path_and_dead_letters_in_order(worker):
    ts = time.time_ns() // 1_000_000 - 1000
    good = [json.dumps({"ts": ts + i, "seq": i, "temp": 20.5 + i}).encode() for i in range(3)]
    topics = [b"devices/dev001/telemetry", b"sensors/s1/value", b"devices/dev002/telemetry",
              b"devices/dev001/telemetry", b"nobody/listens/here", b"devices/dev002/telemetry"]
    payloads = [good[0], b"21.5", good[1], b'{"ts": 1, "seq": NaN}', b"{}", good[2]]
    now = time.time_ns()
    worker.on_publishes(topics, payloads, [101, 102, 103, 104, 105, None], 2)

    dec = worker.decoders["telemetry"]
    assert type(dec) is JsonDecoder
    generic = [dec.decode_generic(p, {"device": d}, now)[0] for p, d in ((good[0], "dev001"), (good[1], "dev002"),
                                                                         (good[2], "dev002"))]
    lines = worker.lines
    # telemetry points: byte-identical to the generic decoder's, in arrival order
    assert [ln for ln in lines if ln.startswith(b"telemetry,")] == generic
    # raw takes the generic path (no fast route); its line sits between the first two telemetry points
    assert lines[1].startswith(b"raw,device=s1 value=21.5 ")
    # two dead letters, kept in InfluxDB's measurement, in the order their messages came
    dl = [ln for ln in lines if ln.startswith(b"iotplat_dead_letters,")]
    assert [re.search(rb"reason=(\w+)", ln).group(1) for ln in dl] == [b"non_finite", b"no_matching_topic"]
    assert worker.tokens == [101, 102, 103, 104, 105, None]
    assert worker.inflight == 6 and worker.room() == 4
    m = worker.metrics
    assert (m.received, m.redeliveries, m.points_decoded) == (6, 2, 4)
    assert m.dead_letters == {"non_finite": 1, "no_matching_topic": 1}
    # the routes: a fast one for the JSON subscription's topics, none for raw or an unknown topic
    assert worker.routes[b"devices/dev001/telemetry"] is not None
    assert worker.routes[b"sensors/s1/value"] is None
    assert worker.routes[b"nobody/listens/here"] is None


def test_on_publishes_drops_a_read_after_close_and_room_is_zero(worker):
    worker.closed = True
    assert worker.room() == 0
    worker.on_publishes([b"devices/dev001/telemetry"], [b'{"seq": 1}'], [1], 0)
    assert worker.tokens == [] and worker.inflight == 0  # not acknowledged: the broker redelivers it
