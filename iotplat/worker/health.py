"""The replica's own counters as line protocol, written where Grafana and ``iotplat status`` read them.

Every ``health.interval`` seconds (and once more on a clean shutdown) the worker writes one point

    <health.measurement>,host=<host>,replica=<N> received=..i,written=..i,dead_letters=..i,... <now ns>

into the same database/bucket (and retention policy) as the device data. Counters are cumulative since the
process started (Grafana plots them with ``non_negative_derivative``; a restart shows as a reset to 0, which
``non_negative_derivative`` ignores); gauges (spool, lag, in-flight) are the value at that moment.

The path is **best-effort, beside the data path**: a thread of its own with its own HTTP connection writes
the point directly to InfluxDB. It never enters a batch or the spool, so it cannot delay, reorder or
displace device data, never holds an acknowledgement back, and is not counted in ``received``/``written``.
If InfluxDB does not take it (down, Retry-After pending, any error), the point is dropped and counted in
``health_points_lost``; nothing is lost by that, because the next point carries the cumulative totals.
It adds no load to a failing InfluxDB: while the data path knows InfluxDB fails, or a Retry-After is
pending, no request is sent at all; a Retry-After it receives itself is honoured by the data path too.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .lineproto import Point, encode_point
from .writer import InfluxWriter, Transient

if TYPE_CHECKING:
    from .core import Worker

# Field name -> what it holds (also the documentation table in docs/worker.md).
COUNTERS = ("received", "redeliveries", "acked", "written", "spooled", "drained", "dead_letters",
            "dead_letters_kept", "decode_errors", "write_errors", "write_requests", "mqtt_connects")
GAUGES = ("spool_bytes", "spool_records", "inflight", "lag_seconds", "influxdb_up", "mqtt_connected",
          "uptime_seconds")
RETRY_SECONDS = 1.0  # the next attempt after a point InfluxDB did not take


def snapshot(worker: "Worker") -> dict[str, Any]:
    """The fields of one health point, read from the worker's counters (ints) and state (gauges)."""
    m = worker.metrics
    dead = dict(m.dead_letters)
    total_dead = sum(dead.values())
    return {
        "received": m.received,
        "redeliveries": m.redeliveries,
        "acked": m.acked,
        "written": m.written,
        "spooled": m.spooled,
        "drained": m.drained,
        "dead_letters": total_dead,
        "dead_letters_kept": m.dead_letters_kept,
        "decode_errors": total_dead - dead.get("influx_rejected", 0),
        "write_errors": m.influx_errors,
        "write_requests": m.write_requests,
        "mqtt_connects": m.connects,
        "spool_bytes": worker.spool.bytes,
        "spool_records": worker.spool.pending_records,
        "inflight": worker.inflight,
        "lag_seconds": round(float(worker.lag()), 6),
        "influxdb_up": 1 if worker.influx_ok else 0,
        "mqtt_connected": 1 if worker.connected else 0,
        "uptime_seconds": round(time.monotonic() - worker.started, 3),
    }


def health_line(measurement: str, host: str, replica: int, fields: dict[str, Any], ts_ns: int) -> bytes:
    """One line of line protocol: ints stay InfluxDB integers (``42i``), ``lag_seconds``/``uptime_seconds``
    are floats."""
    return encode_point(Point(measurement, {"host": host, "replica": str(replica)}, fields, ts_ns), ts_ns)


class HealthReporter:
    """The thread that writes the health points (see the module docstring)."""

    def __init__(self, worker: "Worker") -> None:
        cfg = worker.cfg
        self.worker = worker
        self.interval = cfg.health.interval
        self.measurement = cfg.health.measurement
        self.host = cfg.health.host or socket.gethostname() or "unknown"
        self.replica = cfg.replica
        # at most one interval, 5 s and the configured timeout per attempt: a slow InfluxDB only delays the
        # next health point (and a stop by at most twice that), never the data path, which has its own
        # connections
        timeout = min(cfg.influxdb.timeout, max(1.0, self.interval), 5.0)
        self.writer = InfluxWriter(dataclasses.replace(cfg.influxdb, timeout=timeout))
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.last_ns = 0
        self.lock = threading.Lock()

    def line(self) -> bytes:
        now = time.time_ns()
        ts = now if now > self.last_ns else self.last_ns + 1  # one row per point, even on a clock step back
        self.last_ns = ts
        return health_line(self.measurement, self.host, self.replica, snapshot(self.worker), ts)

    def write_once(self) -> bool:
        """Write one point of the counters as they are now. True if InfluxDB took it."""
        with self.lock:
            return self._send(self.line())

    def _send(self, line: bytes) -> bool:
        """One attempt (caller holds ``self.lock``); a failure only counts the point as lost."""
        w, m = self.worker, self.worker.metrics
        # Add no load to a failing InfluxDB: while the data path knows it fails (its drainer probes it, with
        # backoff) or a Retry-After is pending (plus a second, so we never race the drainer when it ends),
        # the point is dropped without a request.
        if not w.influx_ok or time.monotonic() < w.influx_not_before + RETRY_SECONDS:
            m.add("health_points_lost")
            return False
        try:
            out = self.writer.write_lines([line])
        except Transient as e:
            m.add("health_points_lost")
            if e.retry_after:  # honoured by the data path and the drainer as well
                w.influx_not_before = max(w.influx_not_before, time.monotonic() + e.retry_after)
            w.log.every("health_write", 60, "warning", "health_point_lost", error=str(e)[:200])
            return False
        if out.rejected:
            m.add("health_points_lost")
            w.log.every("health_rejected", 60, "warning", "health_point_rejected", detail=out.rejected[0][1][:200])
            return False
        m.add("health_points_written")
        return True

    def _run(self, first: bytes) -> None:
        with self.lock:  # a point at start: the series exists at once, and a restart shows as a reset
            ok = self._send(first)
        # after a lost point try again within a second (e.g. InfluxDB still starting after a deploy), so the
        # counters show up as soon as it takes writes; a failing attempt itself lasts up to its timeout
        while not self.stop_event.wait(self.interval if ok else min(self.interval, RETRY_SECONDS)):
            ok = self.write_once()

    def start(self) -> None:
        if self.interval <= 0:
            return
        with self.lock:
            first = self.line()  # taken now, before the transport starts: all counters are 0
        self.thread = threading.Thread(target=self._run, args=(first,), name="iotplat-health", daemon=True)
        self.thread.start()

    def stop(self, final: bool = True) -> None:
        """Stop the thread; with ``final`` write one last point (the totals at shutdown)."""
        if self.thread is None:
            return
        self.stop_event.set()
        self.thread.join(self.writer.cfg.timeout + 1)
        if final and self.worker.influx_ok and not self.thread.is_alive():  # alive: InfluxDB hangs, skip it
            self.write_once()
        self.writer.close()
