"""The platform-health dashboard against the numbers of real workers.

Two real worker replicas (processes, shared subscription) consume from a real Mosquitto and write to a real
InfluxDB 1.6.7; each writes its own counters every `ingestion.health.interval`. Then every query of the
generated platform-health dashboard (`health_queries()`), with Grafana's macros expanded the way Grafana
would ($timeFilter -> time > now() - 1h, $__interval -> a value at or above the panel's minimum interval),
runs as a read-only user and must return exactly what was published: messages received and points written
per replica add up to the messages sent, dead letters to the bad ones, nothing spooled.

Grafana itself cannot be installed here; InfluxDB 2 neither: its write path for health points is checked
against VictoriaMetrics' /api/v2/write, a stand-in that accepts the same request (a contract test).
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from support.mqttload import LoadPublisher
from support.waits import wait_until
from support.workerproc import WorkerProc, telemetry, worker_config

from iotplat.render.dashboards import LATEST_FIELDS, health_queries
from iotplat.spec.load import load_platform
from iotplat.verify.status import worker_counters_checks

pytestmark = [pytest.mark.integration]
EXAMPLE = Path(__file__).resolve().parents[2] / "platform" / "examples" / "local" / "platform.yaml"
READER = ("iotplat-grafana", "grafana-reader-pw")
GOOD, BAD = 2000, 6
BUCKET = 2  # seconds: $__interval for the counter panels, twice the health interval (>= the panel minimum)


def _platform(tmp_path: Path, interval: str):
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["ingestion"]["health"] = {"interval": interval}
    (tmp_path / "spec").mkdir()
    spec = tmp_path / "spec" / "platform.yaml"
    spec.write_text(yaml.safe_dump(doc))
    return load_platform(spec)


def _reader_query(influx, q: str) -> dict:
    data = urllib.parse.urlencode({"q": q, "db": influx.database, "epoch": "ms"}).encode()
    req = urllib.request.Request(f"{influx.url}/query", data=data)
    req.add_header("Authorization", "Basic " + base64.b64encode(f"{READER[0]}:{READER[1]}".encode()).decode())
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _publish(broker, messages) -> int:
    p = LoadPublisher(broker.port, "device", broker.users["device"], "device", window=2000)
    n = p.publish_all(messages, timeout=120)
    p.disconnect()
    return n


def _latest(influx, measurement: str) -> dict[str, dict]:
    """replica -> its latest health point (admin read)."""
    out = {}
    for s in influx.series(f'SELECT * FROM "{measurement}" GROUP BY "replica" ORDER BY time DESC LIMIT 1'):
        out[s["tags"]["replica"]] = dict(zip(s["columns"], s["values"][0]))
    return out


def _integral(series: dict) -> float:
    """Sum of rate x bucket width over one series of non_negative_derivative(max(x), 1s) rows: the increase of
    the counter between its first and last bucket."""
    total, prev = 0.0, None
    for t, v in series["values"]:
        width = (t - prev) / 1000 if prev is not None else BUCKET
        total += (v or 0) * width
        prev = t
    return total


@pytest.mark.timeout(240)
def test_every_health_query_returns_the_workers_numbers(tmp_path, broker, influx, workers):
    platform = _platform(tmp_path, "1s")
    health = platform.spec.ingestion.health
    influx.query(f"CREATE USER \"{READER[0]}\" WITH PASSWORD '{READER[1]}'")
    influx.query(f'GRANT READ ON "{influx.database}" TO "{READER[0]}"')
    cfg = worker_config(tmp_path / "w", broker, influx, shared_group="iotplat",
                        extra={"health": {"interval": health.interval, "measurement": health.measurement}})
    w1, w2 = WorkerProc(cfg, replica=1).start(), WorkerProc(cfg, replica=2).start()
    workers += [w1, w2]
    # a few all-zero points first, so the rate panels see every message as an increase
    wait_until(lambda: len(influx.rows(f'SELECT count("received") FROM "{health.measurement}" GROUP BY "replica"')) == 2
          and all(r[1] >= 3 for r in influx.rows(f'SELECT count("received") FROM "{health.measurement}" '
                                                 'GROUP BY "replica"')), 20, "3 health points per replica")
    bad = [(f"devices/bad{i}/telemetry", b"{bad json") for i in range(BAD)]
    assert _publish(broker, list(telemetry(20, GOOD // 20)) + bad) == GOOD + BAD
    total = GOOD + BAD  # received: every message; written: the good points plus the kept dead letters
    wait_until(lambda: sum(p["written"] for p in _latest(influx, health.measurement).values()) == total, 60,
          f"health points adding up to {total} written")
    time.sleep(BUCKET + 0.5)  # one more bucket after the last change
    assert influx.count("telemetry", "seq") == GOOD
    metrics = {"1": w1.metrics(), "2": w2.metrics()}

    queries = health_queries(platform)
    assert len(queries) == 8
    counter_panels = [q for q in queries if q["interval"]]
    assert len(counter_panels) == 5 and all(q["interval"] == "1s" for q in counter_panels)
    seen = {}
    for item in queries:
        interval = f"{BUCKET}s" if item["interval"] else "1m"
        q = item["query"].replace("$timeFilter", "time > now() - 1h").replace("$__interval", interval)
        res = _reader_query(influx, q)["results"][0]
        assert "error" not in res, (item, res)
        assert res.get("series"), f"no data for {item['panel']}: {q}"
        seen[item["panel"]] = res["series"]

    def per_replica(panel: str) -> dict[str, dict]:
        series = seen[panel]
        assert {s["tags"]["host"] for s in series} == {socket.gethostname()}
        by = {s["tags"]["replica"]: s for s in series}
        assert set(by) == {"1", "2"} and len(series) == 2, panel  # one series per replica
        return by

    # the rate panels integrate to exactly what each replica counted
    for panel, field, expected in (("messages received per second, by replica", "received", total),
                                   ("points written per second, by replica", "written", total),
                                   ("dead letters per second, by replica", "dead_letters", BAD)):
        by = per_replica(panel)
        got = {r: _integral(s) for r, s in by.items()}
        assert abs(sum(got.values()) - expected) < 0.01, (panel, got)
        prom = {"received": "iotplat_worker_messages_received_total", "written": "iotplat_worker_points_written_total",
                "dead_letters": None}[field]
        if prom:
            for r in ("1", "2"):
                assert abs(got[r] - metrics[r][prom]) < 0.01, (panel, r, got[r], metrics[r][prom])
    assert min(_integral(s) for s in per_replica("messages received per second, by replica").values()) > 0
    # nothing was spooled; lag stays small and is never negative
    for s in per_replica("spool size (bytes), by replica").values():
        assert s["values"] and all(v == 0 for _, v in s["values"])
    lags = [v for s in per_replica("lag: oldest unacknowledged message (s), by replica").values() for _, v in s["values"]]
    assert lags and all(0 <= v < 5 for v in lags), lags
    # the table of latest totals: exact numbers, equal to each replica's own /metrics
    table = per_replica("replicas: latest totals")
    rows = {r: dict(zip(s["columns"], s["values"][0])) for r, s in table.items()}
    assert set(LATEST_FIELDS) <= set(rows["1"])
    assert sum(r["received"] for r in rows.values()) == total
    assert sum(r["written"] for r in rows.values()) == total
    assert sum(r["dead_letters"] for r in rows.values()) == BAD
    assert all(r["spool_bytes"] == 0 and r["uptime_seconds"] > 0 for r in rows.values())
    for r in ("1", "2"):
        assert rows[r]["received"] == metrics[r]["iotplat_worker_messages_received_total"]
        assert rows[r]["written"] == metrics[r]["iotplat_worker_points_written_total"]
        assert metrics[r]["iotplat_worker_points_spooled_total"] == 0
        assert metrics[r]["iotplat_worker_health_points_written_total"] >= 3
    # the dead-letter panels of the same dashboard
    by_reason = seen["dead letters by reason"]
    assert [s["tags"]["reason"] for s in by_reason] == ["invalid_json"]
    assert sum(v for s in by_reason for _, v in s["values"]) == BAD
    by_device = seen["dead letters by device (top)"]
    assert sorted(s["tags"]["device"] for s in by_device) == [f"bad{i}" for i in range(BAD)]
    # health points are not device data
    assert influx.count("telemetry", "seq") == GOOD
    # `iotplat status` summarises the same numbers; the bad messages of the last minutes are a warning
    checks = worker_counters_checks(lambda q: _reader_query(influx, q), health.measurement, health.interval,
                                    {1: "edge", 2: "edge"})
    assert [c.name for c in checks] == ["worker 1 counters", "worker 2 counters"]
    for c, r in zip(checks, ("1", "2")):
        assert f"received {rows[r]['received']}, written {rows[r]['written']}, " in c.detail, c.detail
        assert f"dead letters {rows[r]['dead_letters']} (+{rows[r]['dead_letters']} in 300s)" in c.detail
        assert c.ok, c.detail
        assert c.warning == (rows[r]["dead_letters"] > 0), c.detail
    print(f"\nhealth: replica 1 received {rows['1']['received']}, replica 2 received {rows['2']['received']}; "
          f"{sum(len(s['values']) for s in seen['spool size (bytes), by replica'])} spool buckets")


@pytest.mark.timeout(120)
def test_final_health_point_on_sigterm_and_v2_write_path_against_victoriametrics(tmp_path, broker, victoria, workers):
    """With an interval far longer than the test, a replica writes exactly two points: one at start (all 0)
    and one on SIGTERM with the final totals. Through InfluxDB 2.x's /api/v2/write path (org, bucket, token)
    against VictoriaMetrics, the stand-in for InfluxDB 2 here (it accepts the same request, ignores
    org/bucket, stores field F of measurement M as M_F; read back with its export API)."""
    cfg = worker_config(tmp_path, broker, victoria, extra={"health": {"interval": 3600, "host": "edge-a"}})
    w = WorkerProc(cfg).start()
    workers.append(w)
    assert w.ready_line.endswith("influxdb v2")
    assert _publish(broker, telemetry(10, 20)) == 200
    w.wait_metric("iotplat_worker_points_written_total", 200, timeout=60)
    assert w.kill(signal.SIGTERM) == 0

    def exported():
        got = {}
        for name in ("received", "written", "dead_letters", "spool_bytes"):
            for s in victoria.export(f'{{__name__="iotplat_worker_{name}"}}'):
                assert s["metric"]["host"] == "edge-a" and s["metric"]["replica"] == "1"
                got[name] = s["values"]
        # every series complete: VictoriaMetrics makes new samples searchable per series, not per request
        return got if all(len(got.get(n, [])) == 2 for n in ("received", "written", "dead_letters", "spool_bytes")) else None

    got = wait_until(exported, 30, "two health points in VictoriaMetrics")
    assert got["received"] == [0, 200] and got["written"] == [0, 200]
    assert got["dead_letters"] == [0, 0] and got["spool_bytes"] == [0, 0]
