"""Counters and the Prometheus text exposition for /metrics (no client library needed)."""

from __future__ import annotations

import os
import resource
import threading
from typing import Any, Callable


class Histogram:
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.sum = 0.0
        self.n = 0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        i = 0
        for i, b in enumerate(self.BUCKETS):
            if v <= b:
                break
        else:
            i = len(self.BUCKETS)
        with self._lock:
            self.counts[i] += 1
            self.sum += v
            self.n += 1

    def render(self, name: str, help_: str) -> list[str]:
        out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
        acc = 0
        with self._lock:
            for b, c in zip(self.BUCKETS, self.counts):
                acc += c
                out.append(f'{name}_bucket{{le="{b}"}} {acc}')
            out.append(f'{name}_bucket{{le="+Inf"}} {self.n}')
            out.append(f"{name}_sum {self.sum:.6f}")
            out.append(f"{name}_count {self.n}")
        return out


class Metrics:
    """Plain attributes, each written by one thread (or under ``add``'s lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = 0
        self.redeliveries = 0
        self.points_decoded = 0
        self.acked = 0
        self.written = 0
        self.drained = 0
        self.write_requests = 0
        self.spooled = 0
        self.spool_bytes = 0
        self.spool_full_events = 0
        self.dead_letters: dict[str, int] = {}
        self.dead_letters_kept = 0
        self.dead_letters_suppressed = 0
        self.dead_letters_published = 0
        self.influx_errors = 0
        self.connects = 0
        self.connect_failures = 0
        self.sessions_lost = 0
        self.backpressure_waits = 0
        self.health_points_written = 0
        self.health_points_lost = 0
        self.batch_latency = Histogram()
        self.ack_latency = Histogram()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def render(self, gauges: dict[str, tuple[float, str]]) -> str:
        p = "iotplat_worker_"
        lines: list[str] = []

        def counter(name: str, value: float, help_: str, labels: str = "") -> None:
            lines.append(f"# HELP {p}{name} {help_}")
            lines.append(f"# TYPE {p}{name} counter")
            lines.append(f"{p}{name}{labels} {value}")

        counter("messages_received_total", self.received, "MQTT messages received")
        counter("redeliveries_total", self.redeliveries, "messages received with the DUP flag (redeliveries)")
        counter("messages_acked_total", self.acked, "messages acknowledged to the broker")
        counter("points_written_total", self.written, "points (incl. dead letters) written to InfluxDB")
        counter("points_spooled_total", self.spooled, "points appended to the on-disk spool")
        counter("points_drained_total", self.drained, "spooled points written to InfluxDB")
        counter("write_requests_total", self.write_requests, "HTTP write requests sent to InfluxDB")
        counter("influx_errors_total", self.influx_errors, "failed InfluxDB writes (retried or spooled)")
        lines.append(f"# HELP {p}dead_letters_total dead letters by reason (including suppressed ones)")
        lines.append(f"# TYPE {p}dead_letters_total counter")
        for reason, n in sorted(self.dead_letters.items()):
            lines.append(f'{p}dead_letters_total{{reason="{reason}"}} {n}')
        counter("dead_letters_kept_total", self.dead_letters_kept, "dead letters stored in InfluxDB")
        counter("dead_letters_suppressed_total", self.dead_letters_suppressed,
                "dead letters only counted (per-device rate limit)")
        counter("dead_letters_published_total", self.dead_letters_published, "dead letters published to MQTT")
        counter("spool_full_total", self.spool_full_events, "times the spool was full (acks paused)")
        counter("mqtt_connects_total", self.connects, "successful MQTT connections")
        counter("mqtt_connect_failures_total", self.connect_failures, "failed MQTT connection attempts")
        counter("mqtt_sessions_lost_total", self.sessions_lost, "reconnects where the broker had no session")
        counter("backpressure_waits_total", self.backpressure_waits, "waits for room in the in-flight window")
        counter("health_points_written_total", self.health_points_written,
                "points of the worker's own counters written to InfluxDB (not in points_written_total)")
        counter("health_points_lost_total", self.health_points_lost,
                "health points InfluxDB did not take (best-effort; the next one carries the totals)")
        for name, (value, help_) in gauges.items():
            lines.append(f"# HELP {p}{name} {help_}")
            lines.append(f"# TYPE {p}{name} gauge")
            lines.append(f"{p}{name} {value}")
        lines += self.batch_latency.render(p + "batch_write_seconds", "time to write one batch to InfluxDB")
        lines += self.ack_latency.render(p + "ack_latency_seconds", "first receive in a batch to its ack")
        t = os.times()
        lines += ["# HELP process_cpu_seconds_total user+system CPU time", "# TYPE process_cpu_seconds_total counter",
                  f"process_cpu_seconds_total {t.user + t.system:.3f}"]
        rss = _rss_bytes()
        lines += ["# HELP process_resident_memory_bytes resident set size", "# TYPE process_resident_memory_bytes gauge",
                  f"process_resident_memory_bytes {rss}"]
        return "\n".join(lines) + "\n"


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parse_prometheus(text: str) -> dict[str, float]:
    """Tiny parser for tests and the benchmark: 'name{labels}' -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, val = line.rpartition(" ")
        try:
            out[key] = float(val)
        except ValueError:
            continue
    return out


GaugeFn = Callable[[], dict[str, Any]]
