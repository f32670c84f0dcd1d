"""The worker core: decode -> batch -> write to InfluxDB or spool -> acknowledge, in order.

Threads:
  * the transport's network thread calls ``on_message``: it decodes the payload (or builds a dead
    letter), appends the lines and the message's ack token to the open batch, and blocks while
    ``mqtt.inflight`` messages are unacknowledged (backpressure, also when the spool is full);
  * the flusher closes the batch when it holds ``batch.max_points`` points, half the in-flight window
    of messages, or is ``batch.max_delay`` old; it writes the batch to InfluxDB (outage mode, spool
    empty) or appends it to the spool (always mode, or an outage is going on, or the spool still
    holds older data), THEN acknowledges the batch's messages in arrival order. There is exactly one
    flusher, so acknowledgements never overtake each other;
  * the drainer writes spooled records to InfluxDB, oldest first, with backoff that honours
    Retry-After, and deletes them once written;
  * the HTTP thread serves /healthz and /metrics;
  * the health thread writes the replica's own counters to InfluxDB every ``health.interval``, best-effort
    and beside the data path (``health.py``).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import deque
from typing import Any, Callable

from .config import Subscription, WorkerConfig, topic_variable
from .decoders import JsonDecoder, build_decoders
from .health import HealthReporter
from .lineproto import Point, Reason, Rejected, encode_point, excerpt
from .logs import Log
from .metrics import Metrics
from .spool import Spool, SpoolError
from .writer import InfluxWriter, Transient


class StartupError(Exception):
    """A problem found at start-up that is not the config file's syntax (exit code 1 or 2)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Router:
    """Topic -> (subscription, tags) through the subscriptions' templates (cached per topic)."""

    def __init__(self, subs: tuple[Subscription, ...]) -> None:
        self.templates = []
        for s in subs:
            segs = s.topic.split("/")
            self.templates.append((s, len(segs), [(topic_variable(seg), seg) for seg in segs]))
        self.cache: dict[str, tuple[Subscription, dict[str, str]] | None] = {}

    def match(self, topic: str) -> tuple[Subscription, dict[str, str]] | None:
        hit = self.cache.get(topic, False)
        if hit is not False:
            return hit  # type: ignore[return-value]
        levels = topic.split("/")
        found = None
        for sub, n, segs in self.templates:
            if n != len(levels):
                continue
            tags: dict[str, str] = {}
            for (var, lit), lev in zip(segs, levels):
                if var is None:
                    if lit != lev:
                        break
                elif not lev:
                    break
                else:
                    tags[var] = lev
            else:
                for k, v in sub.tags.items():
                    tags[k] = _PLACEHOLDER.sub(lambda m: tags.get(m.group(1), m.group(0)), v) if "{" in v else v
                found = (sub, tags)
                break
        if len(self.cache) > 100_000:
            self.cache.clear()
        self.cache[topic] = found
        return found


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class RateLimiter:
    """Token bucket per key (bounded number of keys)."""

    def __init__(self, rate: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self.buckets: dict[str, list[float]] = {}
        self.max_keys = max_keys

    def allow(self, key: str, now: float) -> bool:
        if self.rate <= 0:
            return False
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= self.max_keys:
                self.buckets.clear()
            b = self.buckets[key] = [self.burst, now]
        b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
        b[1] = now
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True
        return False


class Backoff:
    def __init__(self, lo: float = 0.5, hi: float = 5.0) -> None:
        self.lo, self.hi, self.n = lo, hi, 0

    def next(self, retry_after: float | None = None) -> float:
        d = random.uniform(self.lo, min(self.hi, self.lo * (2 ** self.n)))
        self.n = min(self.n + 1, 16)
        if retry_after is not None:
            d = max(d, retry_after)
        return d

    def reset(self) -> None:
        self.n = 0


class Worker:
    def __init__(self, cfg: WorkerConfig, log: Log, transport_kind: str = "paho",
                 ready: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.log = log
        self.metrics = Metrics()
        self.ready_cb = ready
        self.decoders: dict[str, Any] = build_decoders(cfg)  # ConfigError: a decoder missing or refusing its options
        self.router = Router(cfg.subscriptions)
        self.routes: dict[bytes, tuple[Callable[[bytes, int, str], bytes | None], str] | None] = {}
        try:
            self.spool = Spool(cfg.spool.dir, cfg.spool.max_bytes, cfg.spool.segment_bytes, log)
        except (SpoolError, OSError) as e:
            raise StartupError(f"{cfg.path}: spool.dir: {e}") from None
        self.writer = InfluxWriter(cfg.influxdb)
        self.drain_writer = self.writer.clone()
        self.always = cfg.spool.mode == "always"
        self.dl = cfg.dead_letters
        self.dl_prefix = self.dl.measurement
        self.limiter = RateLimiter(self.dl.rate_per_device)
        self.max_payload = cfg.limits.max_payload
        self.inflight_max = cfg.inflight
        self.flush_msgs = max(1, cfg.inflight // 2)
        self.max_points = cfg.batch.max_points
        self.max_delay = cfg.batch.max_delay

        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)      # on_message waits here for room
        self.flush_cv = threading.Condition(self.lock)  # the flusher waits here for work
        self.lines: list[bytes] = []
        self.tokens: list[Any] = []
        self.batch_t0 = 0.0
        self.inflight = 0
        self.oldest: deque[float] = deque()  # first-receive time of each unacked batch
        self.last_dl_ns = 0
        self.dl_lock = threading.Lock()

        self.stopping = threading.Event()
        self.closed = False
        self.drain_stop = threading.Event()
        self.drain_wake = threading.Event()
        self.draining = False
        self.drain_lock = threading.Lock()
        self.influx_ok = True
        self.influx_error = ""
        self.influx_not_before = 0.0
        self.spool_full = False
        self.connected = False
        self.connects = 0
        self.subscribed = threading.Event()
        self.fatal: str | None = None
        self.fatal_event = threading.Event()
        self._last_full_log = 0.0
        self.started = time.monotonic()
        self.health_reporter = HealthReporter(self)

        from .transport import make_transport
        self.transport = make_transport(transport_kind, cfg.mqtt, self, cfg)
        self.block_when_full = transport_kind == "paho"
        self.wake_transport = getattr(self.transport, "wake", None)
        self.metrics.spool_bytes = self.spool.bytes
        if not self.spool.empty():
            log.info("spool_found", records=self.spool.pending_records, bytes=self.spool.bytes)

    # ------------------------------------------------------------------ transport callbacks
    def on_connected(self, session_present: bool) -> None:
        self.connected = True
        self.connects += 1
        self.metrics.connects += 1
        marker = self.spool.dir / "session"
        if not session_present:
            if self.connects > 1 or marker.exists():
                self.metrics.sessions_lost += 1
                self.log.warning("mqtt_session_lost", detail="broker has no session for us (session present "
                                 "= 0): messages queued while we were away may be gone; resubscribing")
            else:
                self.log.info("mqtt_connected", session_present=False,
                              detail="no session on the broker yet (first start or expired); subscribing")
        else:
            self.log.info("mqtt_connected", session_present=True)
        if self.connects == 1 and not marker.exists():
            try:  # remembers across restarts that the broker had a session for this client id
                marker.write_text(self.cfg.client_id + "\n")
            except OSError:
                pass
        self.transport.subscribe([self.cfg.subscription_filter(s) for s in self.cfg.subscriptions])

    def on_subscribed(self, granted: list[int]) -> None:
        bad = [g for g in granted if g >= 0x80 or g == 0]
        if bad:
            msg = (f"broker refused subscription(s) (reason codes {bad}); check the worker's ACL "
                   "('topic read ...' for its user) and the topic filters")
            self.log.error("mqtt_subscribe_refused", codes=granted)
            self.fatal = msg
            self.fatal_event.set()
            return
        self.log.info("mqtt_subscribed", filters=[self.cfg.subscription_filter(s) for s in self.cfg.subscriptions])
        if not self.subscribed.is_set():
            self.subscribed.set()
            if self.ready_cb:
                self.ready_cb(f"iotplat-worker ready: replica {self.cfg.replica}, {len(self.cfg.subscriptions)} "
                              f"subscription(s), influxdb v{self.cfg.influxdb.version}")

    def on_disconnected(self, reason: str) -> None:
        if self.connected:
            self.log.warning("mqtt_disconnected", reason=reason)
        self.connected = False

    def on_connect_failed(self, reason: str) -> None:
        self.connected = False
        self.metrics.connect_failures += 1
        self.log.every("connect_failed", 10.0, "error", "mqtt_connect_failed", reason=reason,
                       broker=self.cfg.broker)

    def on_message(self, topic: str, payload: bytes, dup: bool, token: Any) -> None:
        """One message (the paho transport); blocks while the in-flight window is full."""
        self.on_publishes([topic.encode("utf-8", "surrogateescape")], [payload], [token], 1 if dup else 0)
        if self.block_when_full and self.inflight >= self.inflight_max:
            with self.lock:
                # paho delivers from inside its network loop: block it (the native transport instead
                # stops reading while room() is 0, and keeps PINGs and PUBACKs flowing)
                while self.inflight >= self.inflight_max and not self.closed:
                    self.cond.wait(1.0)

    def on_publishes(self, topics: list[bytes], payloads: list[bytes], tokens: list[Any], dups: int) -> None:
        """The messages of one socket read, in arrival order (never more than ``room()``): each is decoded
        (or becomes a dead letter) and appended with its ack token to the open batch."""
        m = self.metrics
        m.received += len(topics)
        m.redeliveries += dups
        now_ns = time.time_ns()
        routes = self.routes
        max_payload = self.max_payload
        lines: list[bytes] = []
        add = lines.append
        fast_points = 0
        for topic, payload in zip(topics, payloads):
            route = routes.get(topic, False)
            if route is False:
                route = self._route(topic)
            if route is not None and len(payload) <= max_payload:
                line = route[0](payload, now_ns, route[1])
                if line is not None:
                    add(line)
                    fast_points += 1
                    continue
            lines += self._lines_for(topic.decode("utf-8", "surrogateescape"), payload, now_ns)
        m.points_decoded += fast_points
        with self.lock:
            if self.closed:
                return  # shutting down: not acknowledged, the broker redelivers them later
            if not self.tokens and not self.lines:
                self.batch_t0 = time.monotonic()
            self.lines += lines
            self.tokens += tokens
            self.inflight += len(tokens)
            if len(self.lines) >= self.max_points or len(self.tokens) >= self.flush_msgs:
                self.flush_cv.notify()
            if self.inflight >= self.inflight_max:
                m.backpressure_waits += 1

    def can_receive(self) -> bool:
        return self.inflight < self.inflight_max and not self.closed

    def room(self) -> int:
        """How many more messages may be received before the in-flight window is full."""
        return 0 if self.closed else self.inflight_max - self.inflight

    def _route(self, topic: bytes) -> tuple[Callable[[bytes, int, str], bytes | None], str] | None:
        """The fast path for a topic: its subscription's generated decoder and its escaped line prefix
        (``measurement,tags``), or None (no template matches, a plugin decoder, undeclared fields, a tag
        line protocol cannot carry: the generic path decides). Cached per topic, bounded."""
        route = None
        hit = self.router.match(topic.decode("utf-8", "surrogateescape"))
        if hit is not None:
            sub, tags = hit
            dec = self.decoders[sub.name]
            if type(dec) is JsonDecoder and dec.fast is not None:  # not a subclass: it may override decode
                try:
                    route = (dec.fast, dec.line_prefix(tags))
                except Rejected:
                    route = None
        if len(self.routes) >= 100_000:
            self.routes.clear()
        self.routes[topic] = route
        return route

    def _lines_for(self, topic: str, payload: bytes, now_ns: int) -> list[bytes]:
        """The generic path: the subscription's decoder, or a dead letter."""
        try:
            return self._decode(topic, payload, now_ns)
        except Rejected as r:
            return self._dead_letter(r, topic, payload, now_ns)
        except Exception as e:  # never let one message kill the network thread
            r = Rejected(Reason.DECODER_ERROR, f"{type(e).__name__}: {e}")
            return self._dead_letter(r, topic, payload, now_ns)

    # ------------------------------------------------------------------ decoding
    def _decode(self, topic: str, payload: bytes, now_ns: int) -> list[bytes]:
        if len(payload) > self.max_payload:
            raise Rejected(Reason.TOO_LARGE, f"{len(payload)} bytes > limits.max_payload {self.max_payload}")
        if not payload:
            raise Rejected(Reason.EMPTY_PAYLOAD, "empty payload")
        hit = self.router.match(topic)
        if hit is None:
            raise Rejected(Reason.NO_MATCHING_TOPIC, "topic fits no subscription template")
        sub, tags = hit
        try:
            out = self.decoders[sub.name].decode(payload, tags, now_ns)
        except Rejected:
            raise
        except RecursionError:
            raise Rejected(Reason.TOO_COMPLEX, "nested too deeply") from None
        except Exception as e:  # a plugin bug must not kill the worker
            raise Rejected(Reason.DECODER_ERROR, f"{type(e).__name__}: {e}") from None
        lines: list[bytes] = []
        for item in out:
            if type(item) is bytes:
                lines.append(item)
            else:
                lines.append(encode_point(item, now_ns))
        self.metrics.points_decoded += len(lines)
        return lines

    def _device_of(self, topic: str) -> str:
        hit = self.router.match(topic)
        if hit is not None:
            return hit[1].get("device", topic)
        return topic

    def _dead_letter(self, r: Rejected, topic: str, payload: bytes, now_ns: int,
                     key: str | None = None) -> list[bytes]:
        """Count a dead letter; keep it (InfluxDB line + DLQ publish) unless rate-limited."""
        with self.dl_lock:
            return self._dead_letter_locked(r, topic, payload, now_ns, key)

    def _dead_letter_locked(self, r: Rejected, topic: str, payload: bytes, now_ns: int,
                            key: str | None) -> list[bytes]:
        m = self.metrics
        m.dead_letters[r.reason.value] = m.dead_letters.get(r.reason.value, 0) + 1
        hit = self.router.match(topic) if topic else None
        sub = hit[0].name if hit else ""
        device = hit[1].get("device", "") if hit else ""
        if not self.limiter.allow(key or device or topic or "-", time.monotonic()):
            m.dead_letters_suppressed += 1
            return []
        ts = now_ns if now_ns > self.last_dl_ns else self.last_dl_ns + 1
        self.last_dl_ns = ts
        exc = excerpt(payload, self.dl.excerpt_bytes)
        tags = {"reason": r.reason.value}
        if device:
            tags["device"] = device
        if sub:
            tags["subscription"] = sub
        safe_topic = excerpt(topic.encode("utf-8", "surrogateescape"), 512)
        fields = {"topic": safe_topic, "excerpt": exc, "detail": excerpt(r.detail.encode(), 300),
                  "bytes": len(payload)}
        line = encode_point(Point(self.dl_prefix, tags, fields, ts), ts)
        if self.dl.topic:
            doc = {"reason": r.reason.value, "detail": r.detail, "topic": safe_topic, "device": device,
                   "subscription": sub, "received_at": ts / 1e9, "bytes": len(payload), "excerpt": exc}
            try:
                self.transport.publish(self.dl.topic, json.dumps(doc, separators=(",", ":")).encode())
                m.dead_letters_published += 1
            except Exception as e:  # the durable copy is the InfluxDB line
                self.log.every("dlq_publish", 60, "warning", "dead_letter_publish_failed", error=str(e)[:200])
        m.dead_letters_kept += 1
        return [line]

    # ------------------------------------------------------------------ flushing
    def _flusher(self) -> None:
        while True:
            with self.lock:
                while True:
                    if self.tokens or self.lines:
                        age = time.monotonic() - self.batch_t0
                        if (self.stopping.is_set() or len(self.lines) >= self.max_points
                                or len(self.tokens) >= self.flush_msgs or age >= self.max_delay):
                            break
                        self.flush_cv.wait(self.max_delay - age)
                    elif self.stopping.is_set():
                        self.closed = True
                        self.cond.notify_all()
                        return
                    else:
                        self.flush_cv.wait(0.5)
                lines, tokens, t0 = self.lines, self.tokens, self.batch_t0
                self.lines, self.tokens = [], []
                self.oldest.append(t0)
            ok = self._persist(lines)
            with self.lock:
                self.oldest.popleft()
                if not ok:
                    # only when stopping with a full spool: leave these unacknowledged (redelivered later)
                    self.closed = True
                    self.cond.notify_all()
                    self.log.error("shutdown_unpersisted", messages=len(tokens))
                    return
            self.transport.ack(tokens)
            self.metrics.acked += len(tokens)
            self.metrics.ack_latency.observe(time.monotonic() - t0)
            with self.lock:
                self.inflight -= len(tokens)
                self.cond.notify_all()
            if self.wake_transport is not None:
                self.wake_transport()

    def _persist(self, lines: list[bytes]) -> bool:
        """Write to InfluxDB or append to the spool. True once the data is safe."""
        if not lines:
            return True
        with self.drain_lock:
            # not while a Retry-After is pending (the health writer may have got it): spool and let the
            # drainer write once it has passed
            direct = (not self.always and self.spool.empty() and not self.draining
                      and time.monotonic() >= self.influx_not_before)
        if direct:
            t = time.monotonic()
            try:
                out = self.writer.write_lines(lines)
            except Transient as e:
                self._influx_failed(e)
            else:
                self.metrics.batch_latency.observe(time.monotonic() - t)
                self.metrics.add("written", out.written)
                self.metrics.add("write_requests", out.requests)
                self._influx_recovered()
                if out.rejected:
                    dls = self._rejected_lines(out.rejected)
                    if dls:
                        try:
                            self.writer.write_lines(dls)
                            self.metrics.add("written", len(dls))
                        except Transient as e:
                            self._influx_failed(e)
                            return self._spool(dls)
                return True
        return self._spool(lines)

    def _spool(self, lines: list[bytes]) -> bool:
        while True:
            try:
                ok = self.spool.append(lines)
            except OSError as e:
                ok = False
                self.log.every("spool_io", 60, "error", "spool_write_failed", error=str(e)[:200])
            if ok:
                self.metrics.spooled += len(lines)
                self.metrics.spool_bytes = self.spool.bytes
                if self.spool_full:
                    self.spool_full = False
                    self.log.info("spool_accepting", bytes=self.spool.bytes)
                self.drain_wake.set()
                return True
            if not self.spool_full:
                self.spool_full = True
                self.metrics.spool_full_events += 1
            now = time.monotonic()
            if now - self._last_full_log >= 60:
                self._last_full_log = now
                self.log.error("spool_full", bytes=self.spool.bytes, max_bytes=self.cfg.spool.max_bytes,
                               detail="not acknowledging: the broker queues for us until InfluxDB drains the spool")
            if self.stopping.is_set():
                return False
            time.sleep(0.2)

    def _rejected_lines(self, rejected: list[tuple[bytes, str]]) -> list[bytes]:
        out: list[bytes] = []
        now = time.time_ns()
        for line, msg in rejected:
            r = Rejected(Reason.INFLUX_REJECTED, msg)
            series = line.split(b" ", 1)[0][:200].decode("utf-8", "replace")
            self.log.every("influx_rejected", 10, "warning", "influx_rejected_line", detail=msg[:200])
            out.extend(self._dead_letter(r, "", line, now, key="influx:" + series))
        return out

    def _influx_failed(self, e: Transient) -> None:
        self.metrics.add("influx_errors")
        if e.retry_after:
            # honoured by every writer: the drainer does not try again before this
            self.influx_not_before = max(self.influx_not_before, time.monotonic() + e.retry_after)
        if self.influx_ok or str(e) != self.influx_error:
            level = "error" if e.auth else "warning"
            self.log.log(level, "influx_unavailable", error=str(e)[:200], status=e.status,
                         detail="spooling to disk; acknowledgements continue" if not e.auth else
                         "credentials or database/bucket wrong: spooling, fix the deployment")
        self.influx_ok = False
        self.influx_error = str(e)

    def _influx_recovered(self) -> None:
        if not self.influx_ok:
            self.influx_ok = True
            self.influx_error = ""
            self.log.info("influx_available")

    # ------------------------------------------------------------------ draining
    def _drainer(self) -> None:
        backoff = Backoff()
        while not self.drain_stop.is_set():
            if self.spool.empty():
                self.drain_wake.wait(0.5)
                self.drain_wake.clear()
                continue
            pause = self.influx_not_before - time.monotonic()
            if pause > 0:
                self.drain_stop.wait(pause)
                continue
            with self.drain_lock:
                self.draining = True
            try:
                try:
                    batch = self.spool.read()
                except SpoolError as e:
                    self.log.every("spool_corrupt", 60, "error", "spool_read_failed", error=str(e))
                    self.drain_stop.wait(5)
                    continue
                if batch is None:
                    continue
                t = time.monotonic()
                try:
                    out = self.drain_writer.write_lines(batch.body.split(b"\n"), body=batch.body)
                except Transient as e:
                    self._influx_failed(e)
                    self.drain_stop.wait(backoff.next(e.retry_after))
                    continue
                self.metrics.batch_latency.observe(time.monotonic() - t)
                self.metrics.add("written", out.written)
                self.metrics.drained += batch.lines
                self.metrics.add("write_requests", out.requests)
                if out.rejected:
                    dls = self._rejected_lines(out.rejected)
                    if dls:
                        try:
                            self.drain_writer.write_lines(dls)
                        except Transient as e:
                            self._influx_failed(e)
                            self.drain_stop.wait(backoff.next(e.retry_after))
                            continue
                self.spool.commit(batch)
                self.metrics.spool_bytes = self.spool.bytes
                self._influx_recovered()
                backoff.reset()
            finally:
                with self.drain_lock:
                    self.draining = False

    # ------------------------------------------------------------------ lifecycle
    def lag(self) -> float:
        with self.lock:
            ts = list(self.oldest)
            if self.tokens:
                ts.append(self.batch_t0)
        return max(0.0, time.monotonic() - min(ts)) if ts else 0.0

    def health(self) -> tuple[bool, dict[str, Any]]:
        state = {
            "mqtt_connected": self.connected,
            "subscribed": self.subscribed.is_set(),
            "influxdb_ok": self.influx_ok,
            "spool_bytes": self.spool.bytes,
            "spool_full": self.spool_full,
            "inflight": self.inflight,
        }
        if self.influx_error:
            state["influxdb_error"] = self.influx_error[:200]
        diagnostics = getattr(self.transport, "diagnostics", None)  # the NATS transport's pull state
        if diagnostics is not None:
            state["transport"] = diagnostics()
        ok = self.connected and self.subscribed.is_set() and not self.spool_full and self.fatal is None
        state["status"] = "ok" if ok and self.influx_ok else ("degraded" if ok else "failing")
        return ok, state

    def start(self) -> None:
        self.threads = [
            threading.Thread(target=self._flusher, name="iotplat-flusher", daemon=True),
            threading.Thread(target=self._drainer, name="iotplat-drainer", daemon=True),
        ]
        for t in self.threads:
            t.start()
        self.health_reporter.start()  # its first point (all 0) is taken before the first message can arrive
        self.transport.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Graceful stop: flush and acknowledge what was received, then disconnect."""
        self.log.info("shutdown_started")
        with self.lock:
            self.closed = True  # accept nothing more: what is not in a batch yet is redelivered later
            self.cond.notify_all()
        self.stopping.set()
        with self.lock:
            self.flush_cv.notify_all()
        self.threads[0].join(timeout)
        with self.lock:
            self.closed = True
            self.cond.notify_all()
        try:
            self.transport.stop(timeout=min(5.0, timeout))
        except Exception as e:  # pragma: no cover - best effort
            self.log.warning("mqtt_disconnect_failed", error=str(e)[:200])
        self.drain_stop.set()
        self.drain_wake.set()
        self.threads[1].join(timeout)
        self.health_reporter.stop(final=True)  # after the flusher and drainer: the final totals
        self.spool.close()
        self.writer.close()
        self.drain_writer.close()
        self.log.info("shutdown_complete", received=self.metrics.received, acked=self.metrics.acked,
                      spool_bytes=self.spool.bytes)
