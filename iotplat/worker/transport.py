"""The small MQTT transport interface the worker core talks to, and its paho-mqtt implementation.

A transport connects (and reconnects, with backoff) with a persistent session, delivers QoS 1
messages to ``handler.on_message`` WITHOUT acknowledging them, and sends PUBACKs only when the core
calls ``ack`` (always in the order the messages arrived). Every message carries an opaque ``token``;
a token from an earlier connection is ignored by ``ack`` (the broker redelivers that message on the
new connection, with the DUP flag, and the core writes it again: same row).

Handler callbacks (all may run on the transport's network thread):
    on_connected(session_present: bool)       -> the core calls subscribe() from here
    on_subscribed(granted: list[int])         -> reason codes / granted QoS per filter
    on_message(topic: str, payload: bytes, dup: bool, token: object)   may block (backpressure)
    on_disconnected(reason: str)
    on_connect_failed(reason: str)
Optional, used by the native transport when the handler has both (the worker does):
    room() -> int                              how many more messages fit in the in-flight window
    on_publishes(topics: list[bytes], payloads: list[bytes], tokens: list, dups: int)
                                               every PUBLISH of one read (at most room()), in order
"""

from __future__ import annotations

import ssl
import threading
from typing import Any, Protocol

from .config import MqttConfig, WorkerConfig


class Handler(Protocol):
    def on_connected(self, session_present: bool) -> None: ...
    def on_subscribed(self, granted: list[int]) -> None: ...
    def on_message(self, topic: str, payload: bytes, dup: bool, token: Any) -> None: ...
    def on_disconnected(self, reason: str) -> None: ...
    def on_connect_failed(self, reason: str) -> None: ...


class Transport(Protocol):
    name: str

    def start(self) -> None: ...
    def subscribe(self, filters: list[str]) -> None: ...
    def ack(self, tokens: list[Any]) -> None: ...
    def publish(self, topic: str, payload: bytes) -> None: ...
    def stop(self, timeout: float = 5.0) -> None: ...


def tls_context(cfg: MqttConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class PahoTransport:
    """paho-mqtt 2.x with ``manual_ack=True``: the well-kept reference client."""

    name = "paho"

    def __init__(self, cfg: MqttConfig, handler: Handler) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._mqtt = mqtt
        self.cfg = cfg
        self.handler = handler
        self.gen = 0
        self._lock = threading.Lock()
        v5 = cfg.protocol == 5
        kwargs: dict[str, Any] = dict(callback_api_version=CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                                      protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, manual_ack=True)
        if not v5:
            kwargs["clean_session"] = False
        c = mqtt.Client(**kwargs)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            # paho verifies the broker certificate against ``host``; mqtt.server_name is honoured by
            # the native transport only (documented in docs/worker.md).
            c.tls_set_context(tls_context(cfg))
        c.reconnect_delay_set(max(1, int(cfg.reconnect_min)), max(1, int(cfg.reconnect_max)))
        c.max_inflight_messages_set(100)   # our own outgoing (dead-letter) publishes
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        c.on_connect_fail = self._on_connect_fail
        self.client = c

    def start(self) -> None:
        props = None
        if self.cfg.protocol == 5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.cfg.session_expiry
            props.ReceiveMaximum = self.cfg.inflight
            self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive, clean_start=False,
                                      properties=props)
        else:
            self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive)
        self.client.loop_start()

    def subscribe(self, filters: list[str]) -> None:
        if self.cfg.protocol == 5:
            from paho.mqtt.subscribeoptions import SubscribeOptions

            self.client.subscribe([(f, SubscribeOptions(qos=1)) for f in filters])
        else:
            self.client.subscribe([(f, 1) for f in filters])

    def ack(self, tokens: list[Any]) -> None:
        ack = self.client.ack
        with self._lock:
            # ``gen`` changes (under this lock) as soon as paho reports the connection lost, before
            # it reconnects: a PUBACK for an old connection's message never reaches the new one
            gen = self.gen
            for t in tokens:
                if t is not None and t[0] == gen:
                    ack(t[1], 1)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    # -- paho callbacks ----------------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.handler.on_connect_failed(str(reason_code))
            return
        with self._lock:
            self.gen += 1
        self.handler.on_connected(bool(flags.session_present))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self.handler.on_subscribed([rc.value for rc in reason_codes])

    def _on_message(self, client, userdata, msg) -> None:
        token = (self.gen, msg.mid) if msg.qos > 0 else None
        self.handler.on_message(msg.topic, msg.payload, bool(msg.dup), token)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._lock:
            self.gen += 1
        self.handler.on_disconnected(str(reason_code))

    def _on_connect_fail(self, client, userdata) -> None:
        self.handler.on_connect_failed("connection failed")


def make_transport(kind: str, cfg: MqttConfig, handler: Handler, worker: WorkerConfig | None = None) -> Transport:
    """The transport ``kind`` ("native", "paho", or "nats": which reads ``worker.nats``)."""
    if kind == "nats":
        from .nats_transport import NatsTransport

        if worker is None or worker.nats is None:
            raise ValueError("the nats transport needs a config with [nats]")
        return NatsTransport(worker.nats, handler, [worker.subscription_filter(s) for s in worker.subscriptions])
    if kind == "paho":
        return PahoTransport(cfg, handler)
    if kind == "native":
        from .mqtt_native import NativeTransport

        return NativeTransport(cfg, handler)
    raise ValueError(f"unknown transport {kind!r}")
