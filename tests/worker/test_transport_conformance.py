"""The same conformance tests for both MQTT transports (our native client and paho-mqtt), against a real
Mosquitto 2.0.11: TLS, session present/absent, reconnect, shared subscriptions, in-order PUBACKs on the wire."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import replace

import pytest
from support.mqttload import LoadPublisher
from support.mqttproxy import MqttSniffer

from iotplat.worker.config import MqttConfig
from iotplat.worker.transport import make_transport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def mqtt_cfg(broker, user="worker-1", tls=False, port=None, protocol=5, inflight=200) -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=port or (broker.tls_port if tls else broker.port), protocol=protocol,
                      transport="tcp", tls=tls, ca_file=str(broker.ca["ca"]) if tls else "", server_name="",
                      username=user, password=broker.users[user], client_id=user, keepalive=10,
                      session_expiry=3600, shared_group="", inflight=inflight, reconnect_min=0.1,
                      reconnect_max=1.0)


class Collector:
    """A handler that records everything and acknowledges in arrival order from another thread, in batches."""

    def __init__(self, filters: list[str], window: int = 200) -> None:
        self.filters = filters
        self.window = window
        self.msgs: list[tuple[str, bytes, bool]] = []
        self.sessions: list[bool] = []
        self.granted: list[list[int]] = []
        self.subscribed = threading.Event()
        self.pending: list = []
        self.lock = threading.Lock()
        self.transport = None
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.disconnects = 0
        threading.Thread(target=self._acker, daemon=True).start()

    def on_connected(self, session_present: bool) -> None:
        self.sessions.append(session_present)
        self.transport.subscribe(self.filters)

    def on_subscribed(self, granted: list[int]) -> None:
        self.granted.append(granted)
        self.subscribed.set()

    def on_message(self, topic, payload, dup, token) -> None:
        with self.lock:
            self.msgs.append((topic, payload, dup))
            self.pending.append(token)

    def can_receive(self) -> bool:
        return len(self.pending) < self.window

    def on_disconnected(self, reason: str) -> None:
        self.disconnects += 1

    def on_connect_failed(self, reason: str) -> None:
        self.failures.append(reason)

    def _acker(self) -> None:
        while not self.stop.is_set():
            time.sleep(0.02)
            with self.lock:
                batch, self.pending = self.pending, []
            if batch and self.transport is not None:
                self.transport.ack(batch)
                wake = getattr(self.transport, "wake", None)
                if wake:
                    wake()

    def payloads(self) -> set[bytes]:
        with self.lock:
            return {p for _, p, _ in self.msgs}


_RUNNING: list[Collector] = []


@pytest.fixture(autouse=True)
def _stop_leftover_clients():
    """A failing test must not leave clients reconnecting in the background."""
    yield
    while _RUNNING:
        c = _RUNNING.pop()
        c.stop.set()
        try:
            c.transport.stop(timeout=2)
        except Exception:  # noqa: BLE001 - already stopped
            pass


def start(kind, cfg, filters, window=200) -> Collector:
    c = Collector(filters, window)
    t = make_transport(kind, cfg, c)
    c.transport = t
    _RUNNING.append(c)
    t.start()
    assert c.subscribed.wait(15), f"not subscribed; failures: {c.failures}"
    return c


def stop(c: Collector) -> None:
    time.sleep(0.1)  # let the acker send the last batch
    c.transport.stop()
    c.stop.set()
    if c in _RUNNING:
        _RUNNING.remove(c)


def publish(broker, topic_prefix: str, n: int, start_at: int = 0, **kw) -> None:
    p = LoadPublisher(broker.port, "device", broker.users["device"], "device", **kw)
    p.publish_all((f"{topic_prefix}/{i % 7}", b"m%06d" % i) for i in range(start_at, start_at + n))
    p.disconnect()


def wait_for(pred, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("protocol", [5, 311])
def test_tls_persistent_session_present_and_absent(broker, transport_kind, protocol):
    """TLS with user/password; first connect has no session; after a clean client stop the session is
    present on reconnect and the messages queued meanwhile arrive (0 lost)."""
    cfg = mqtt_cfg(broker, tls=True, protocol=protocol)
    c = start(transport_kind, cfg, ["probe/+"])
    assert c.sessions == [False]
    assert c.granted[0] == [1]
    publish(broker, "probe", 1000)
    wait_for(lambda: len(c.payloads()) == 1000, what="1000 messages")
    stop(c)
    publish(broker, "probe", 700, start_at=1000)  # queued by the broker for the offline session
    c2 = start(transport_kind, cfg, ["probe/+"])
    assert c2.sessions == [True]
    wait_for(lambda: len(c2.payloads()) == 700, what="the 700 queued messages")
    assert c2.payloads() == {b"m%06d" % i for i in range(1000, 1700)}
    stop(c2)


def test_pubacks_in_publish_order_on_the_wire(broker, transport_kind):
    """Read from the wire: every PUBACK the client sends follows the order of the broker's PUBLISHes."""
    sniff = MqttSniffer(broker.port, v5=True)
    try:
        c = start(transport_kind, mqtt_cfg(broker, port=sniff.port), ["probe/+"], window=100)
        publish(broker, "probe", 3000)
        wait_for(lambda: len(c.payloads()) == 3000, what="3000 messages")
        time.sleep(0.3)
        stop(c)
        with sniff.lock:
            pubs = [pid for _, kind, pid, _ in sniff.events if kind == "publish"]
            acks = [pid for _, kind, pid, _ in sniff.events if kind == "puback"]
        assert len(pubs) == 3000
        assert acks == pubs  # same ids, same order
    finally:
        sniff.close()


def test_reconnect_after_graceful_broker_restart(broker, transport_kind):
    c = start(transport_kind, mqtt_cfg(broker), ["probe/+"])
    publish(broker, "probe", 500)
    wait_for(lambda: len(c.payloads()) == 500, what="500 before restart")
    broker.restart()
    wait_for(lambda: len(c.sessions) >= 2, timeout=20, what="reconnect")
    assert c.sessions[-1] is True  # persistence kept the session
    publish(broker, "probe", 500, start_at=500)
    wait_for(lambda: len(c.payloads()) == 1000, what="500 after restart")
    stop(c)


def test_session_absent_resubscribes(broker, transport_kind):
    """The broker loses its state (persistence wiped): session present = 0, the client resubscribes
    through on_connected and messages flow again."""
    c = start(transport_kind, mqtt_cfg(broker), ["probe/+"])
    broker.stop()
    shutil.rmtree(broker.dir / "data" / "mosquitto.db", ignore_errors=True)
    (broker.dir / "data" / "mosquitto.db").unlink(missing_ok=True)
    broker.launch()
    wait_for(lambda: len(c.granted) >= 2, timeout=20, what="resubscribe")
    assert c.sessions[-1] is False
    publish(broker, "probe", 300)
    wait_for(lambda: len(c.payloads()) == 300, what="300 after session loss")
    stop(c)


def test_shared_subscription_splits_load(broker, transport_kind):
    a = start(transport_kind, mqtt_cfg(broker, "worker-1"), ["$share/g/probe/+"])
    b = start(transport_kind, mqtt_cfg(broker, "worker-2"), ["$share/g/probe/+"])
    publish(broker, "probe", 2000)
    wait_for(lambda: len(a.payloads()) + len(b.payloads()) >= 2000, what="2000 across both")
    pa, pb = a.payloads(), b.payloads()
    assert pa | pb == {b"m%06d" % i for i in range(2000)}
    assert len(pa) > 200 and len(pb) > 200, (len(pa), len(pb))
    stop(a)
    stop(b)


def test_connection_cut_redelivers_unacked_with_dup(broker, transport_kind):
    """A network failure mid-stream: the client reconnects by itself and everything arrives; what was not
    acknowledged before the cut comes again with the DUP flag."""
    sniff = MqttSniffer(broker.port, v5=True)
    try:
        cfg = mqtt_cfg(broker, port=sniff.port, inflight=500)  # MQTT 5 Receive Maximum 500
        c = start(transport_kind, cfg, ["probe/+"], window=500)
        c.stop.set()  # no acks at all: everything stays in flight
        publish(broker, "probe", 300)
        wait_for(lambda: len(c.payloads()) == 300, what="300 unacked")
        sniff.cut()
        wait_for(lambda: len(c.sessions) >= 2, timeout=20, what="reconnect after cut")
        c.stop.clear()
        threading.Thread(target=c._acker, daemon=True).start()
        wait_for(lambda: sum(1 for _, _, d in c.msgs if d) >= 300, what="300 redelivered with DUP")
        assert c.payloads() == {b"m%06d" % i for i in range(300)}
        stop(c)
    finally:
        sniff.close()


def test_wrong_password_is_reported_not_fatal(broker, transport_kind):
    cfg = replace(mqtt_cfg(broker), password="wrong")
    c = Collector(["probe/+"])
    t = make_transport(transport_kind, cfg, c)
    c.transport = t
    _RUNNING.append(c)
    t.start()
    wait_for(lambda: len(c.failures) >= 1, timeout=15, what="a connect failure")
    assert not c.subscribed.is_set()
    stop(c)


def test_native_tls_verifies_server_name(broker):
    """mqtt.server_name: the certificate must match it (the test CA's server cert names
    broker.iotplat.internal); a name it does not carry is refused."""
    ok = start("native", replace(mqtt_cfg(broker, tls=True), server_name="broker.iotplat.internal"), ["probe/+"])
    stop(ok)
    c = Collector(["probe/+"])
    t = make_transport("native", replace(mqtt_cfg(broker, tls=True), server_name="other.example"), c)
    c.transport = t
    _RUNNING.append(c)
    t.start()
    wait_for(lambda: len(c.failures) >= 1, timeout=15, what="a TLS failure")
    assert "certificate" in c.failures[0].lower() or "hostname" in c.failures[0].lower(), c.failures
    assert not c.subscribed.is_set()
    stop(c)


class BatchCollector(Collector):
    """A handler with ``on_publishes`` + ``room()`` (what the worker implements): the native transport
    hands it the PUBLISHes of a read in one call, never more than room() of them."""

    def __init__(self, filters: list[str], window: int = 200) -> None:
        super().__init__(filters, window)
        self.calls: list[tuple[int, int]] = []  # (messages delivered, room announced just before)
        self._room_seen = 0

    def room(self) -> int:
        with self.lock:
            self._room_seen = self.window - len(self.pending)
            return self._room_seen

    def on_publishes(self, topics, payloads, tokens, dups) -> None:
        with self.lock:
            self.calls.append((len(topics), self._room_seen))
            for t, p in zip(topics, payloads):
                self.msgs.append((t.decode(), p, False))
            self.pending.extend(tokens)


def test_native_batch_delivery_keeps_wire_order_and_the_window(broker):
    """The worker's path through the native transport: messages arrive in publish order, no call exceeds
    the room the handler announced (so the in-flight window holds), and the PUBACKs read off the wire
    follow the PUBLISHes one for one."""
    from iotplat.worker.mqtt_native import NativeTransport

    sniff = MqttSniffer(broker.port, v5=True)
    try:
        c = BatchCollector(["probe/+"], window=100)
        c.transport = NativeTransport(mqtt_cfg(broker, port=sniff.port, inflight=100), c)
        _RUNNING.append(c)
        c.transport.start()
        assert c.subscribed.wait(15), f"not subscribed; failures: {c.failures}"
        publish(broker, "probe", 3000)
        wait_for(lambda: len(c.payloads()) == 3000, what="3000 messages")
        time.sleep(0.3)
        stop(c)
        with c.lock:
            got = [p for _, p, _ in c.msgs]
            calls = list(c.calls)
        assert got == [b"m%06d" % i for i in range(3000)]  # one publisher: its order, none twice
        assert all(0 < n <= room <= 100 for n, room in calls), calls[:20]
        assert len(calls) < 3000  # messages of one read really do arrive together
        with sniff.lock:
            pubs = [pid for _, kind, pid, _ in sniff.events if kind == "publish"]
            acks = [pid for _, kind, pid, _ in sniff.events if kind == "puback"]
        assert len(pubs) == 3000
        assert acks == pubs
    finally:
        sniff.close()
