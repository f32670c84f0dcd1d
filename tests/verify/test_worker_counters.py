"""`iotplat status`' worker-counter checks (worker_counters_checks) against a real InfluxDB 1.6.7.

Health points as the worker writes them (docs/worker.md#platform-health) are written with the worker's
write-only user; the checks read them with a read-only user, as `iotplat status` does with Grafana's. No
deployed hosts needed: the function only needs a query callable.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
import urllib.request

import pytest

from iotplat.verify.status import worker_counters_checks
from tests.support.servers import Influx1

pytestmark = pytest.mark.integration
READER = ("iotplat-grafana", "reader-pw")


@pytest.fixture(scope="module")
def influx():
    i = Influx1.start()
    i.query(f"CREATE USER \"{READER[0]}\" WITH PASSWORD '{READER[1]}'")
    i.query(f'GRANT READ ON "{i.database}" TO "{READER[0]}"')
    yield i
    i.close()


def reader(influx, password: str = READER[1]):
    def query(q: str) -> dict:
        data = urllib.parse.urlencode({"q": q, "db": influx.database, "epoch": "ms"}).encode()
        req = urllib.request.Request(f"{influx.url}/query", data=data)
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{READER[0]}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    return query


def write(influx, lines: list[str]) -> None:
    req = urllib.request.Request(f"{influx.url}/write?db={influx.database}&rp={influx.rp}&precision=ms",
                                 data="\n".join(lines).encode())
    cred = base64.b64encode(f"{influx.worker[0]}:{influx.worker[1]}".encode()).decode()
    req.add_header("Authorization", f"Basic {cred}")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 204


def point(replica: int, host: str, t_ms: int, received: int, written: int, dead: int, spool: int = 0,
          lag: float = 0.0) -> str:
    return (f"iotplat_worker,host={host},replica={replica} received={received}i,written={written}i,"
            f"dead_letters={dead}i,spool_bytes={spool}i,lag_seconds={lag} {t_ms}")


def test_counters_summarised_stale_and_growing_dead_letters_fail(influx):
    now = int(time.time() * 1000)
    write(influx, [
        # 1: healthy, 4 old dead letters that did not grow in the window
        point(1, "edge", now - 25_000, 100, 96, 4), point(1, "edge", now - 15_000, 200, 196, 4),
        point(1, "edge", now - 5_000, 300, 296, 4, spool=4096, lag=0.25),
        # 2: last point 45 s ago with a 10 s interval: stale
        point(2, "edge", now - 55_000, 10, 10, 0), point(2, "edge", now - 45_000, 20, 20, 0),
        # 3: dead letters 0 -> 2 -> 5 within the window
        point(3, "edge2", now - 25_000, 10, 10, 0), point(3, "edge2", now - 15_000, 20, 22, 2),
        point(3, "edge2", now - 5_000, 30, 35, 5),
        # 4: only a point older than the window
        point(4, "edge2", now - 400_000, 1, 1, 0),
        # 5: restarted (counter 7 -> 0): not growth
        point(5, "edge", now - 25_000, 70, 70, 7), point(5, "edge", now - 15_000, 0, 0, 0),
        point(5, "edge", now - 5_000, 5, 5, 0),
    ])
    checks = worker_counters_checks(reader(influx), "iotplat_worker", 10.0,
                                    {1: "edge", 2: "edge", 3: "edge2", 4: "edge2", 5: "edge"}, now_ms=now)
    by = {c.name: c for c in checks}
    assert list(by) == [f"worker {n} counters" for n in range(1, 6)]
    c1 = by["worker 1 counters"]
    assert c1.ok and not c1.warning and c1.host == "edge"
    assert c1.detail == ("received 300, written 296, dead letters 4 (+0 in 300s), spool 4.0 KiB, lag 0.2s; "
                         "last point 5s ago from edge")
    assert not by["worker 2 counters"].ok
    assert by["worker 2 counters"].detail.startswith("stale: older than 3 x 10s; received 20, written 20,")
    assert "last point 45s ago" in by["worker 2 counters"].detail
    c3 = by["worker 3 counters"]
    assert c3.ok and c3.warning and c3.detail.startswith("dead letters grew") and "dead letters 5 (+5 in 300s)" in c3.detail
    c4 = by["worker 4 counters"]
    assert not c4.ok and c4.detail.startswith("no iotplat_worker point in the last 300s") and c4.host == "edge2"
    assert by["worker 5 counters"].ok and "(+0 in 300s)" in by["worker 5 counters"].detail
    assert all("\n" not in c.detail for c in checks)


def test_window_grows_with_a_long_interval_and_errors_are_one_check(influx):
    now = int(time.time() * 1000)
    write(influx, [point(7, "edge", now - 500_000, 0, 0, 0), point(7, "edge", now - 330_000, 1, 1, 0),
                   point(7, "edge", now - 100_000, 2, 2, 1)])
    # interval 60 s: window 360 s (the 330 s old point is inside it, the 500 s one is not), stale after 180 s
    [c] = worker_counters_checks(reader(influx), "iotplat_worker", 60.0, {7: "edge"}, now_ms=now)
    assert c.ok and c.warning and c.detail.startswith("dead letters grew") and "(+1 in 360s)" in c.detail
    assert "last point 100s ago" in c.detail
    # interval 10 s: window 300 s holds only the last point (no growth seen), which is stale
    [c] = worker_counters_checks(reader(influx), "iotplat_worker", 10.0, {7: "edge"}, now_ms=now)
    assert not c.ok and c.detail.startswith("stale: older than 3 x 10s; ") and "(+0 in 300s)" in c.detail
    [bad] = worker_counters_checks(reader(influx, "wrong-password"), "iotplat_worker", 10.0, {1: "edge"})
    assert not bad.ok and bad.name == "worker counters" and "cannot read iotplat_worker" in bad.detail
    assert "wrong-password" not in bad.detail


def test_settle_looks_again_once_for_a_replica_without_a_recent_point(influx):
    """As after a deploy or restore: the replica's first point arrives while status is looking."""
    writer = threading.Timer(1.5, lambda: write(influx, [point(9, "edge", int(time.time() * 1000), 3, 3, 0)]))
    writer.start()
    try:
        [first] = worker_counters_checks(reader(influx), "iotplat_worker", 10.0, {9: "edge"})
        t = time.monotonic()
        [c] = worker_counters_checks(reader(influx), "iotplat_worker", 10.0, {9: "edge"}, settle=3.0)
    finally:
        writer.join()
    assert not first.ok and first.detail.startswith("no iotplat_worker point")
    assert c.ok and c.detail.startswith("received 3, written 3, dead letters 0 (+0 in 300s)"), c.detail
    assert 2.5 < time.monotonic() - t < 10
