"""The worker's NATS JetStream transport: the same interface as the MQTT ones (transport.py), over nats-py.

What it consumes: nats-server's MQTT layer stores every QoS 1 PUBLISH in the stream ``$MQTT_msgs`` (subject
``$MQTT.msgs.<subject>``) and only then sends the device its PUBACK (nats_subjects.py says where in
nats-server). The worker reads that stream through one durable pull consumer per subscription filter,
shared by every replica: whichever replica asks first gets the next messages, and a message a replica took
but never acknowledged (it crashed) is redelivered to any replica after ``ack_wait``. So replicas give
failover as well as throughput, unlike MQTT's ``$share`` on Mosquitto, which keeps a stopped replica's share
for that replica.

How it maps the interface:
- ``start()`` runs an asyncio loop on a thread of its own; nats-py connects (TLS, user/password) to any of
  ``servers`` and reconnects by itself after a lost connection; the first connect is retried here with jittered
  backoff and each failure reported through ``on_connect_failed``. nats-py closes its client for good on an
  -ERR from the server (an "Authorization Violation" after a reload that refused our password): then a new
  client is made the same way. So is one whose pull requests do not reach the consumer (``WATCH_IDLE``).
- On every (re)connect the stream is ensured (created with its limits if missing, its limits brought back
  to the config's if someone changed them) and ``on_connected(session_present)`` is called, where "session
  present" means every durable consumer existed already (a missing one means its backlog is gone: the
  core then logs ``mqtt_session_lost``, as for an MQTT broker that lost the session).
- ``subscribe(filters)`` creates the missing consumers (explicit acks, ``ack_wait``, ``max_ack_pending``
  shared by all replicas) and starts pulling; ``on_subscribed`` gets QoS 1 per filter, or 0x80 for a filter
  the server refused (the core stops with an error).
- Pulling, into a reply subject of the connection's own: at most one pull request per consumer is outstanding,
  for at most what the handler's ``room()`` leaves (the in-flight window) minus what is already requested: the
  server never sends more than the window, so backpressure needs no blocking. Messages are handed to ``on_publishes`` in arrival order, each
  with an integer token; a redelivery (the server's delivery count > 1) counts as a DUP.
- ``ack(tokens)`` sends ``+ACK`` to each message's reply subject. Acknowledgements stay valid across
  reconnects (the consumer's state lives in the cluster), so unlike MQTT they are sent after a reconnect
  too: fewer redeliveries, and a late ack of a message already redelivered elsewhere is harmless.
- ``publish(topic, payload)`` (dead letters) is a core NATS publish on the topic's subject: MQTT subscribers
  get it at QoS 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import threading
from typing import TYPE_CHECKING, Any, Callable

from .config import NatsConfig
from .nats_subjects import (MQTT_STREAM, SubjectError, durable_name, mqtt_to_subject, subject_to_mqtt,
                            template_filter_subject)

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js.manager import JetStreamManager

# A pull request lingers this long on the server before it answers 408 for what it could not fill.
PULL_EXPIRES = 5.0
# A connection whose server stopped answering (its host cut off the network: nothing is closed, TCP would take
# minutes) is declared stale by nats-py after PING_INTERVAL x (MAX_OUTSTANDING_PINGS + 1) = 9 s at most (its
# defaults here were 10 s x 4 = 40 s). Until then this replica pulls nothing: every pull request goes down the
# dead connection. A live server answers a PING in milliseconds, even on a loaded host.
PING_INTERVAL = 3.0
MAX_OUTSTANDING_PINGS = 2
# nats-py then closes the old TLS connection and waits for that before it reconnects. On a dead path the close
# lasts asyncio's TLS shutdown timeout (30 s by default: the peer's close_notify never comes), so a replica stayed
# idle ~40 s after its server's host was cut off (tests/nats/test_failover.py, the silent-connection test:
# 39.0 s to connected again through another node). nats-py has no option for it and asyncio reads it from
# asyncio.constants when the TLS transport is made, so this process (the worker's only asyncio TLS user) sets
# it: a live server answers close_notify in milliseconds.
TLS_SHUTDOWN_TIMEOUT = 2.0
# Pull requests that never reach the consumer. nats-server before 2.9.17 (Debian 12 ships 2.9.10) can lose the
# cluster-wide interest in a subject when clients subscribe and unsubscribe it while the server reloads its
# configuration (upstream 95e4f2d, "Fixed accounts configuration reload ... subscription interest not properly
# propagated"). A worker replica refused by one reload and accepted by the next (`rotate`, a credential fixed by
# hand) reconnects during the reloads; if the interest in its pull inbox is lost, the consumer's leader drops its
# pull requests (a request whose reply subject nobody hears is discarded), so the replica looks connected and
# subscribed and never receives a message. Reproduced on loopback (tests/nats/test_failover.py) in about one round
# in three, and it outlived new connections that reused the same inbox subject. So each connection pulls into a
# reply subject of its own (a new interest, announced afresh), and a watchdog replaces a connection whose pull
# requests do not arrive: when a consumer has had no message for WATCH_IDLE s, it asks the consumer's leader, while
# one of our pull requests should be waiting there, how many wait; none, twice in a row, and the replica connects
# again with a new client.
WATCH_IDLE = 10.0
WATCH_POLL = 1.0
WATCH_STRIKES = 2


class _Consumer:
    __slots__ = ("durable", "filter_subject", "next_subject", "inbox", "outstanding", "requested_at", "sub",
                 "pulls", "received", "received_at", "since", "checked", "strikes")

    def __init__(self, stream: str, durable: str, filter_subject: str) -> None:
        self.durable = durable
        self.filter_subject = filter_subject
        self.next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = ""
        self.outstanding = 0  # messages asked for and not arrived yet (one request at a time)
        self.requested_at = 0.0
        self.sub: Any = None
        self.pulls = 0  # pull requests sent (diagnostics)
        self.received = 0  # messages received (diagnostics)
        self.received_at = 0.0
        self.since = 0.0  # when this connection subscribed (the watchdog counts idle time from it)
        self.checked = 0.0  # the pull request (its requested_at) the watchdog last asked about
        self.strikes = 0  # checks in a row that found none of our pull requests waiting


class NatsTransport:
    name = "nats"

    def __init__(self, cfg: NatsConfig, handler: Any, filters: list[str] | None = None) -> None:
        self.cfg = cfg
        self.handler = handler
        self._on_publishes: Callable[[list[bytes], list[bytes], list[int | None], int], None] = handler.on_publishes
        self._room: Callable[[], int] = handler.room
        self._filters = list(filters or [])
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Client | None = None
        self._jsm: JetStreamManager | None = None
        self._stopping = threading.Event()
        self._stop_event: asyncio.Event | None = None
        self._closed_event: asyncio.Event | None = None  # nats-py closed the client for good (see _main)
        self._wake_event: asyncio.Event | None = None
        self._lock = threading.Lock()
        self._replies: dict[int, str] = {}
        self._next_token = 0
        self._consumers: dict[str, _Consumer] = {}
        self._pulling = False
        self._buf_topics: list[bytes] = []
        self._buf_payloads: list[bytes] = []
        self._buf_tokens: list[int | None] = []
        self._buf_dups = 0
        self._flush_scheduled = False
        self._topics: dict[str, bytes] = {}
        self._prefix_len = len(cfg.subject_prefix)
        self._pending_acks: set[asyncio.Task[None]] = set()
        self._generation = 0
        self._perm_error = ""
        self._pull_error = ""
        self._pull_restarts = 0
        self._puller: asyncio.Task[None] | None = None
        self._renew_reason = ""  # why the watchdog closed the connection (see WATCH_IDLE)
        self.renewals = 0  # connections the watchdog replaced
        self.connected = False

    # ------------------------------------------------------------------ the Transport interface
    def start(self) -> None:
        # asyncio warns on stderr, outside the worker's JSON log, each time a TLS peer closes ("returning true
        # from eof_received() has no effect when using ssl"): keep its errors only
        logging.getLogger("asyncio").setLevel(logging.ERROR)
        self._thread = threading.Thread(target=self._run, name="iotplat-nats", daemon=True)
        self._thread.start()

    def subscribe(self, filters: list[str]) -> None:
        self._filters = list(filters)
        self._call(self._subscribe(list(filters)))

    def ack(self, tokens: list[Any]) -> None:
        with self._lock:
            pop = self._replies.pop
            replies = [r for r in (pop(t, None) for t in tokens if t is not None) if r]
        if replies and self._loop is not None:
            self._loop.call_soon_threadsafe(self._send_acks, replies)

    def publish(self, topic: str, payload: bytes) -> None:
        subject = mqtt_to_subject(topic)
        if self._nc is None or self._loop is None:
            raise ConnectionError("not connected to NATS")
        self._call(self._nc.publish(subject, payload))

    def wake(self) -> None:
        loop, ev = self._loop, self._wake_event
        if loop is not None and ev is not None:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # the loop has closed
                pass

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        loop, ev = self._loop, self._stop_event
        if loop is not None and ev is not None:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(timeout + 2)

    def diagnostics(self) -> dict[str, Any]:
        """What the worker's /healthz shows of this transport: enough to tell a replica that stopped pulling
        (its requests outstanding for long, no message for long, the pull loop gone) from an idle one."""
        loop, nc = self._loop, self._nc
        now = loop.time() if loop is not None else 0.0

        def ago(t: float) -> float | None:
            return round(now - t, 1) if t else None

        puller = self._puller
        return {
            "connected": self.connected,
            "client": ("closed" if nc.is_closed else "connected" if nc.is_connected else
                       "reconnecting" if nc.is_reconnecting else "connecting") if nc is not None else "none",
            "server": nc.connected_url.netloc if nc is not None and nc.connected_url is not None else "",
            "client_stats": dict(nc.stats) if nc is not None else {},  # nats-py's counters: messages, bytes, reconnects
            "pulling": self._pulling,
            "pull_loop": ("not started" if puller is None else "running" if not puller.done() else
                          f"ended: {self._pull_error or 'cancelled'}"),
            "pull_loop_restarts": self._pull_restarts,  # failures of the loop, each restarted (see _pull_forever)
            "pull_error": self._pull_error,  # the last one ("" = none)
            "unacked": len(self._replies),
            "renewed_connections": self.renewals,
            "consumers": {c.durable: {"outstanding": c.outstanding, "pulls": c.pulls, "received": c.received,
                                      "last_pull_s": ago(c.requested_at), "last_message_s": ago(c.received_at)}
                          for c in list(self._consumers.values())},
        }

    # ------------------------------------------------------------------ the loop thread
    def _call(self, coro: Any) -> None:
        loop = self._loop
        if loop is None:
            coro.close()
            return

        def schedule() -> None:
            task = loop.create_task(coro)
            self._pending_acks.add(task)
            task.add_done_callback(self._pending_acks.discard)

        loop.call_soon_threadsafe(schedule)

    def _run(self) -> None:
        import asyncio.constants

        asyncio.constants.SSL_SHUTDOWN_TIMEOUT = TLS_SHUTDOWN_TIMEOUT  # see TLS_SHUTDOWN_TIMEOUT
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        finally:
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stop_event = asyncio.Event()
        self._wake_event = asyncio.Event()
        self._closed_event = asyncio.Event()
        self._loop = loop
        self._puller = loop.create_task(self._pull_forever())
        watchdog = loop.create_task(self._watch_pulls())
        while not self._stopping.is_set():
            await self._connect_retrying()
            if self._nc is None:
                break  # stopping
            await self._on_connect()
            stop = loop.create_task(self._stop_event.wait())
            closed = loop.create_task(self._closed_event.wait())
            await asyncio.wait((stop, closed), return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            closed.cancel()
            if self._stopping.is_set():
                break
            # nats-py gave the connection up for good: it does so on any -ERR from the server but a stale
            # connection or a permissions violation (an "Authorization Violation" when a reload no longer
            # accepts our password, a server's limits). It never reconnects after that; a new client does.
            if self._renew_reason:
                self.handler.on_connect_failed(self._renew_reason)
                self._renew_reason = ""
            else:
                why = _reason(self._nc.last_error) if self._nc.last_error is not None else "closed"
                self.handler.on_connect_failed(f"the NATS server closed the connection ({why}); connecting again")
            self._closed_event.clear()
            self._pulling = False
            self._consumers.clear()  # their inbox subscriptions were the old client's: subscribe() makes new ones
            try:
                await asyncio.wait_for(self._stop_event.wait(), self.cfg.reconnect_min)
            except asyncio.TimeoutError:
                pass
        self._puller.cancel()
        watchdog.cancel()
        await self._shutdown()

    async def _connect_retrying(self) -> None:
        """Connect (a new client) until connected, with jittered backoff; self._nc is None if stopping."""
        assert self._stop_event is not None
        delay = self.cfg.reconnect_min
        while not self._stopping.is_set():
            try:
                await self._connect()
                return
            except Exception as e:  # nats-py raises several kinds (no servers, auth, TLS, timeouts)
                self._nc = None
                self.handler.on_connect_failed(_reason(e))
                try:
                    await asyncio.wait_for(self._stop_event.wait(), random.uniform(delay / 2, delay))
                except asyncio.TimeoutError:
                    pass
                delay = min(self.cfg.reconnect_max, delay * 2)
        self._nc = None

    async def _connect(self) -> None:
        import nats

        c = self.cfg
        ctx = None
        if c.tls:
            ctx = ssl.create_default_context(cafile=c.ca_file or None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        scheme = "tls" if c.tls else "nats"
        self._nc = await nats.connect(
            servers=[f"{scheme}://{s}" for s in c.servers],
            tls=ctx, tls_hostname=c.server_name or None,
            user=c.username or None, password=c.password,
            name=c.client_id, inbox_prefix=c.inbox_prefix,
            allow_reconnect=True, max_reconnect_attempts=-1,
            reconnect_time_wait=max(0.1, c.reconnect_min),  # type: ignore[arg-type]
            connect_timeout=5, ping_interval=PING_INTERVAL, max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            error_cb=self._error_cb, disconnected_cb=self._disconnected_cb,
            reconnected_cb=self._reconnected_cb, closed_cb=self._closed_cb,
        )
        self._jsm = self._nc.jsm(timeout=10)

    async def _on_connect(self) -> None:
        """After a connect or reconnect: ensure the stream, report whether every consumer still exists.

        JetStream may not answer for a while after a node was lost (the cluster elects new leaders: ~10 s
        measured here after a kill -9): that is retried with backoff, reported through on_connect_failed,
        and never taken for a lost session or a refused subscription."""
        self._generation += 1
        gen = self._generation
        self.connected = True
        for con in self._consumers.values():
            con.outstanding = 0  # requests of the old connection are gone (or come back as extra messages)
        present = await self._retrying(gen, "JetStream", self._consumers_present)
        if present is None or gen != self._generation:
            return
        self.handler.on_connected(present)

    async def _consumers_present(self) -> bool:
        await self._ensure_stream()
        present = True
        for filter_ in self._filters:
            durable, _ = self._names(filter_)
            if not await self._consumer_exists(durable):
                present = False
        return present

    async def _retrying(self, gen: int, what: str, call: Callable[[], Any]) -> Any:
        """``await call()`` until it succeeds (None if stopping, superseded by a newer connection, or refused
        for good: a permissions violation reported by the server, which is reported as fatal)."""
        delay = self.cfg.reconnect_min
        assert self._stop_event is not None
        while not self._stopping.is_set() and gen == self._generation:
            self._perm_error = ""
            try:
                return await call()
            except Exception as e:
                if self._perm_error:
                    self.handler.on_connect_failed(f"{what}: {self._perm_error}")
                    self.handler.on_subscribed([0x80])  # the core stops: the grant is wrong, retrying cannot help
                    return None
                self.handler.on_connect_failed(f"{what}: {_reason(e)} (retrying)")
            try:
                await asyncio.wait_for(self._stop_event.wait(), random.uniform(delay / 2, delay))
            except asyncio.TimeoutError:
                pass
            delay = min(self.cfg.reconnect_max, delay * 2)
        return None

    async def _shutdown(self) -> None:
        nc = self._nc
        if self._pending_acks:
            await asyncio.wait(list(self._pending_acks), timeout=5)
        if nc is not None:
            try:
                await nc.flush(timeout=5)
            except Exception:
                pass
            try:
                await nc.close()
            except Exception:
                pass
        self.connected = False

    # ------------------------------------------------------------------ nats-py callbacks
    async def _error_cb(self, e: Exception) -> None:
        text = _reason(e)
        if "permissions violation" in text.lower():
            self._perm_error = text
        if not self.connected:
            self.handler.on_connect_failed(_reason(e))

    async def _disconnected_cb(self) -> None:
        if self.connected and not self._stopping.is_set():
            self.connected = False
            self.handler.on_disconnected("connection to the NATS server lost; reconnecting")

    async def _reconnected_cb(self) -> None:
        if self._loop is not None and not self._stopping.is_set():
            self._loop.create_task(self._on_connect())

    async def _closed_cb(self) -> None:
        self.connected = False
        if not self._stopping.is_set() and self._closed_event is not None:
            self._generation += 1  # what was being retried on this client stops (_retrying)
            self._closed_event.set()

    # ------------------------------------------------------------------ JetStream objects
    def _names(self, filter_: str) -> tuple[str, str]:
        subject = template_filter_subject(filter_, self.cfg.subject_prefix)
        return durable_name(self.cfg.durable_prefix, subject), subject

    async def _ensure_stream(self) -> None:
        from nats.js import api
        from nats.js.errors import BadRequestError, NotFoundError

        c = self.cfg
        assert self._jsm is not None
        if not c.stream_manage:
            return
        wanted = {"max_bytes": c.stream_max_bytes, "max_msgs": c.stream_max_msgs,
                  "max_msg_size": c.stream_max_msg_size, "discard": api.DiscardPolicy(c.stream_discard)}
        for _ in range(3):
            try:
                info = await self._jsm.stream_info(c.stream)
            except NotFoundError:
                mqtt = c.stream == MQTT_STREAM
                subjects = [c.subject_prefix + ">"] if c.subject_prefix else \
                    sorted({self._names(f)[1] for f in self._filters})
                cfg = api.StreamConfig(
                    name=c.stream, subjects=subjects, storage=api.StorageType.FILE, num_replicas=c.stream_replicas,
                    # $MQTT_msgs keeps a message while a consumer (ours, an MQTT session's) still wants it
                    retention=api.RetentionPolicy.INTEREST if mqtt else api.RetentionPolicy.LIMITS, **wanted)
                try:
                    await self._jsm.add_stream(cfg)
                    return
                except BadRequestError:  # created meanwhile (another replica, the MQTT layer): update it
                    continue
            have = info.config
            if any(getattr(have, k) != v for k, v in wanted.items()):
                await self._jsm.update_stream(have.evolve(**wanted))
            return

    async def _consumer_exists(self, durable: str) -> bool:
        from nats.js.errors import NotFoundError

        assert self._jsm is not None
        try:
            await self._jsm.consumer_info(self.cfg.stream, durable)
            return True
        except NotFoundError:
            return False

    async def _subscribe(self, filters: list[str]) -> None:
        from nats.js import api

        c = self.cfg
        assert self._nc is not None and self._jsm is not None
        gen = self._generation
        granted: list[int] = []
        for filter_ in filters:
            try:
                durable, subject = self._names(filter_)
            except SubjectError as e:
                self.handler.on_connect_failed(f"subscription {filter_!r}: {e}")
                granted.append(0x80)
                continue

            async def ensure(durable: str = durable, subject: str = subject) -> bool:
                assert self._jsm is not None
                if not await self._consumer_exists(durable):
                    await self._jsm.add_consumer(c.stream, api.ConsumerConfig(
                        durable_name=durable, filter_subject=subject, ack_policy=api.AckPolicy.EXPLICIT,
                        ack_wait=c.ack_wait, max_ack_pending=c.max_ack_pending,
                        max_deliver=c.max_deliver, deliver_policy=api.DeliverPolicy.ALL,
                        description="iotplat worker replicas (shared)"))
                return True

            if await self._retrying(gen, f"JetStream consumer {durable}", ensure) is None:
                return  # stopping, a newer connection took over, or refused for good (already reported)
            con = self._consumers.get(durable)
            if con is None:
                con = self._consumers[durable] = _Consumer(c.stream, durable, subject)
                con.since = asyncio.get_running_loop().time()
                # a new reply subject per connection (nats-py: <inbox_prefix>.<nuid>): see WATCH_IDLE
                con.inbox = self._nc.new_inbox()
                con.sub = await self._nc.subscribe(con.inbox, cb=self._make_cb(con),
                                                   pending_msgs_limit=-1, pending_bytes_limit=-1)
            granted.append(1)
        self._pulling = True
        self.handler.on_subscribed(granted)
        if self._wake_event is not None:
            self._wake_event.set()

    # ------------------------------------------------------------------ pulling and delivering
    async def _pull_forever(self) -> None:
        """The pull loop, started again if it ever fails: a replica that stopped pulling would hold nothing and
        take nothing, and look healthy (connected, subscribed) while its share waits for ``ack_wait``."""
        assert self._stop_event is not None
        while not self._stopping.is_set():
            try:
                await self._pull_loop()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a defect: reported, and pulling goes on
                self._pull_error = _reason(e)
                self._pull_restarts += 1
                self.handler.on_connect_failed(f"pull loop failed: {self._pull_error} (restarting it)")
                try:
                    await asyncio.wait_for(self._stop_event.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass

    async def _watch_pulls(self) -> None:
        """Replace a connection whose pull requests do not reach the consumer (see WATCH_IDLE)."""
        assert self._stop_event is not None and self._loop is not None
        loop = self._loop
        while not self._stopping.is_set():
            try:
                await asyncio.wait_for(self._stop_event.wait(), WATCH_POLL)
            except asyncio.TimeoutError:
                pass
            nc, jsm = self._nc, self._jsm
            if not (self._pulling and nc is not None and nc.is_connected and self.connected and jsm is not None):
                continue
            for con in list(self._consumers.values()):
                now = loop.time()
                age = now - con.requested_at
                # one of our requests should be waiting at the leader now: asked (and not answered) long enough ago
                # to have arrived, long enough before its expiry, and nothing received for a while
                if (not con.outstanding or con.received_at >= con.requested_at
                        or now - max(con.received_at, con.since) < WATCH_IDLE
                        or not 0.5 <= age <= PULL_EXPIRES - 1.5 or con.checked == con.requested_at):
                    continue
                con.checked = con.requested_at
                try:
                    info = await jsm.consumer_info(self.cfg.stream, con.durable, timeout=2)
                except Exception:  # no answer (an election, a lost node): no verdict
                    continue
                if con.checked != con.requested_at or con.received_at >= con.requested_at:
                    continue  # answered or asked again meanwhile
                if (info.num_waiting or 0) > 0:
                    con.strikes = 0
                    continue
                con.strikes += 1
                if con.strikes >= WATCH_STRIKES and nc is self._nc:
                    self.renewals += 1
                    self._renew_reason = (f"pull requests for {con.durable} through {_server(nc)} do not reach the "
                                          f"consumer ({con.strikes} checks found none waiting while "
                                          f"{info.num_pending} messages are pending): connecting again")
                    try:
                        await nc.close()  # _closed_cb: _main makes a new client
                    except Exception:
                        pass
                    break

    async def _pull_loop(self) -> None:
        assert self._wake_event is not None and self._loop is not None
        loop = self._loop
        max_batch = max(1, self.cfg.inflight // 2)
        while True:
            self._wake_event.clear()
            nc = self._nc
            if self._pulling and nc is not None and nc.is_connected and self.connected:
                now = loop.time()
                cons = list(self._consumers.values())
                asked = sum(c.outstanding for c in cons)
                free = self._room() - asked - len(self._buf_tokens)
                for con in cons:
                    if con.outstanding and now - con.requested_at > PULL_EXPIRES + 2:
                        con.outstanding = 0  # no answer (a leader change, a lost request): ask again
                    if con.outstanding or free <= 0:
                        continue
                    n = min(max_batch, max(1, free // len(cons)))
                    req = json.dumps({"batch": n, "expires": int(PULL_EXPIRES * 1e9)}).encode()
                    try:
                        await nc.publish(con.next_subject, req, reply=con.inbox)
                    except Exception:
                        break
                    con.outstanding = n
                    con.requested_at = now
                    con.pulls += 1
                    free -= n
            try:
                await asyncio.wait_for(self._wake_event.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    def _make_cb(self, con: _Consumer) -> Callable[[Msg], Any]:
        async def on_msg(msg: Msg) -> None:
            reply = msg.reply
            if not reply:  # a status from the server: this pull request is over (404, 408, 409)
                con.outstanding = 0
                if self._wake_event is not None:
                    self._wake_event.set()
                return
            con.received += 1
            con.received_at = self._loop.time() if self._loop is not None else 0.0
            if con.outstanding > 0:
                con.outstanding -= 1
                if con.outstanding == 0 and self._wake_event is not None:
                    self._wake_event.set()
            subject = msg.subject
            topic = self._topics.get(subject)
            if topic is None:
                topic = subject_to_mqtt(subject[self._prefix_len:]).encode("utf-8", "surrogateescape")
                if len(self._topics) >= 100_000:
                    self._topics.clear()
                self._topics[subject] = topic
            with self._lock:
                self._next_token += 1
                token = self._next_token
                self._replies[token] = reply
            self._buf_topics.append(topic)
            self._buf_payloads.append(msg.data)
            self._buf_tokens.append(token)
            if _delivery_count(reply) > 1:
                self._buf_dups += 1
            if not self._flush_scheduled:
                self._flush_scheduled = True
                assert self._loop is not None
                self._loop.call_soon(self._deliver)
        return on_msg

    def _deliver(self) -> None:
        """Every message received in this turn of the loop, to the handler in one call."""
        self._flush_scheduled = False
        topics, payloads, tokens, dups = self._buf_topics, self._buf_payloads, self._buf_tokens, self._buf_dups
        if not topics:
            return
        self._buf_topics, self._buf_payloads, self._buf_tokens, self._buf_dups = [], [], [], 0
        self._on_publishes(topics, payloads, tokens, dups)

    def _send_acks(self, replies: list[str]) -> None:
        nc = self._nc
        if nc is None or self._loop is None:
            return
        task = self._loop.create_task(_publish_all(nc, replies, b"+ACK"))
        self._pending_acks.add(task)
        task.add_done_callback(self._pending_acks.discard)
        if self._wake_event is not None:
            self._wake_event.set()


async def _publish_all(nc: Client, subjects: list[str], payload: bytes) -> None:
    publish = nc.publish
    for s in subjects:
        try:
            await publish(s, payload)
        except Exception:  # not connected: the server redelivers what was not acknowledged
            return


def _delivery_count(reply: str) -> int:
    """How often the server has delivered this message, from the ``$JS.ACK`` reply subject (v1: 9 tokens,
    v2 with domain and account: 12)."""
    parts = reply.split(".")
    try:
        if len(parts) == 9:
            return int(parts[4])
        if len(parts) >= 11:
            return int(parts[6])
    except ValueError:
        pass
    return 1


def _server(nc: Client) -> str:
    url = nc.connected_url
    return url.netloc if url is not None else "?"


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())[:200]
