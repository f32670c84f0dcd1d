"""The worker's own counters (health points): their line protocol, the [health] config section, and one
point written by the worker's health writer to a real InfluxDB 1.6.7 and read back."""

from __future__ import annotations

import signal
import time

import pytest
from support.servers import Influx1, Mosquitto
from support.workerproc import worker_config

from iotplat.worker.config import ConfigError, load_config
from iotplat.worker.core import Worker
from iotplat.worker.health import COUNTERS, GAUGES, health_line, snapshot
from iotplat.worker.logs import Log


def test_health_line_is_exact_line_protocol():
    fields = {"received": 12, "written": 10, "dead_letters": 2, "spool_bytes": 0, "lag_seconds": 0.25,
              "uptime_seconds": 3.5}
    line = health_line("iotplat_worker", "edge 1", 2, fields, 1_700_000_000_000_000_000)
    assert line == (b"iotplat_worker,host=edge\\ 1,replica=2 received=12i,written=10i,dead_letters=2i,"
                    b"spool_bytes=0i,lag_seconds=0.25,uptime_seconds=3.5 1700000000000000000")


def _cfg(tmp_path, text_extra: str = "", sub_measurement: str = "telemetry"):
    (tmp_path / "pw").write_text("x\n")
    p = tmp_path / "worker.toml"
    p.write_text(f"""version = 1
[mqtt]
host = "127.0.0.1"
tls = false
username = "w"
password_file = "pw"
[influxdb]
url = "http://127.0.0.1:1"
database = "iot"
[spool]
dir = "{tmp_path}/spool"
{text_extra}
[[subscriptions]]
name = "t"
topic = "devices/{{device}}/telemetry"
measurement = "{sub_measurement}"
""")
    return p


def test_health_section_defaults(tmp_path):
    cfg = load_config(_cfg(tmp_path), replica=3)
    assert (cfg.health.interval, cfg.health.measurement, cfg.health.host) == (10.0, "iotplat_worker", "")
    cfg = load_config(_cfg(tmp_path, '[health]\ninterval = 0\nhost = "gw-{replica}"'), replica=3)
    assert cfg.health.interval == 0.0 and cfg.health.host == "gw-3"


@pytest.mark.parametrize("extra,sub,key,words", [
    ("[health]\ninterval = 0.05", "telemetry", "health.interval", "must be 0 (off) or between 0.1 and 86400"),
    ("[health]\ninterval = -1", "telemetry", "health.interval", "must be 0 (off)"),
    ('[health]\nmeasurement = "iotplat_dead_letters"', "telemetry", "health.measurement", "dead_letters.measurement"),
    ('[health]\nmeasurement = "bad name"', "telemetry", "health.measurement", "not a usable measurement"),
    ('[health]\nhost = "a/b"', "telemetry", "health.host", "use letters, digits"),
    ('[health]\nintervall = 5', "telemetry", "health.intervall", "did you mean 'interval'?"),
    ("", "iotplat_worker", "subscriptions[0].measurement", "the worker's own counters"),
])
def test_health_section_errors_are_one_line(tmp_path, extra, sub, key, words):
    p = _cfg(tmp_path, extra, sub)
    with pytest.raises(ConfigError) as ei:
        load_config(p, replica=1)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(f"{p}: {key}: ") and words in msg, msg


@pytest.mark.integration
def test_health_point_written_to_real_influxdb_and_not_counted_as_data(tmp_path):
    """The health writer's point lands in the data's database/retention policy with integer counters and
    float gauges; it is not counted in `written`; with InfluxDB gone it is dropped and counted as lost,
    within the (interval-bounded) timeout, without touching the spool; the reporter thread tries again
    within a second (not a whole interval) until InfluxDB takes it, and writes a last point when stopped."""
    influx = Influx1.start()
    broker = Mosquitto.start()  # only for the config's credentials; the worker's transport is never started
    try:
        cfg_path = worker_config(tmp_path, broker, influx, extra={"health": {"interval": 30.0, "host": "edge"}})
        cfg = load_config(cfg_path, replica=2)
        w = Worker(cfg, Log(level="error", replica=2), transport_kind="paho")
        try:
            w.metrics.received, w.metrics.written, w.metrics.dead_letters = 7, 5, {"invalid_json": 2}
            assert w.health_reporter.write_once()
            rows = influx.series('SELECT * FROM "iotplat"."iotplat_worker"')
            assert len(rows) == 1 and len(rows[0]["values"]) == 1
            got = dict(zip(rows[0]["columns"], rows[0]["values"][0]))
            assert got["host"] == "edge" and got["replica"] == "2"
            assert (got["received"], got["written"], got["dead_letters"], got["decode_errors"]) == (7, 5, 2, 2)
            assert set(COUNTERS) | set(GAUGES) <= set(got)
            assert got["spool_bytes"] == 0 and got["influxdb_up"] == 1 and got["lag_seconds"] == 0
            assert isinstance(got["received"], int)
            types = {r[0]: r[1] for r in influx.rows('SHOW FIELD KEYS FROM "iotplat"."iotplat_worker"')}
            assert types["received"] == "integer" and types["lag_seconds"] == "float"
            assert w.metrics.written == 5 and w.metrics.health_points_written == 1  # not counted as data
            assert snapshot(w)["received"] == 7

            influx.stop(signal.SIGKILL)
            t = time.monotonic()
            assert not w.health_reporter.write_once()
            assert time.monotonic() - t < 3.0
            assert w.metrics.health_points_lost == 1 and w.spool.empty()

            w.health_reporter.start()  # its first point is lost too: InfluxDB is still down
            time.sleep(1.5)
            assert w.metrics.health_points_lost >= 2
            influx.launch()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and w.metrics.health_points_written < 2:
                time.sleep(0.1)
            assert w.metrics.health_points_written == 2, "no retry within a second of a lost point"
            w.metrics.received = 9
            w.health_reporter.stop(final=True)
            assert w.metrics.health_points_written == 3
            assert [r[1] for r in influx.rows('SELECT "received" FROM "iotplat"."iotplat_worker"')] == [7, 7, 9]
        finally:
            w.spool.close()
            w.writer.close()
            w.health_reporter.writer.close()
    finally:
        broker.close()
        influx.close()


@pytest.mark.integration
def test_health_writer_honours_and_propagates_retry_after(tmp_path):
    """A 503 + Retry-After answered to a health point (through a fault proxy in front of a real InfluxDB)
    holds back the health writer and the data path alike; while the data path knows InfluxDB fails, the
    health writer sends nothing."""
    from support.httpfault import FaultProxy

    influx = Influx1.start()
    broker = Mosquitto.start()
    proxy = FaultProxy(influx.port, [(503, {"Retry-After": "2"})])
    try:
        cfg_path = worker_config(tmp_path, broker, influx, extra={"health": {"interval": 30.0}})
        cfg_path.write_text(cfg_path.read_text().replace(influx.url, proxy.url))
        w = Worker(load_config(cfg_path, replica=1), Log(level="error", replica=1), transport_kind="paho")
        try:
            t = time.monotonic()
            assert not w.health_reporter.write_once()
            assert w.influx_not_before >= t + 1.9  # the data path's direct writes and the drainer wait too
            assert not w.health_reporter.write_once()  # no request while it is pending
            time.sleep(0.2)  # the proxy logs a request after it has answered it
            with proxy.lock:
                assert [st for _, st in proxy.log] == [503]
            time.sleep(w.influx_not_before + 1.05 - time.monotonic())  # Retry-After + the writer's second
            assert w.health_reporter.write_once()
            w.influx_ok = False  # as after a failed data write: the drainer probes, the health writer waits
            assert not w.health_reporter.write_once()
            deadline = time.monotonic() + 5  # the proxy logs a request after it has answered it
            while len(proxy.log) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            with proxy.lock:
                assert [st for _, st in proxy.log] == [503, 204]
            assert (w.metrics.health_points_written, w.metrics.health_points_lost) == (1, 3)
        finally:
            w.spool.close()
            w.writer.close()
            w.health_reporter.writer.close()
    finally:
        proxy.close()
        broker.close()
        influx.close()
