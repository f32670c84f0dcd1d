"""Real nats-server processes (Debian's 2.9.10) on loopback: one node or a 3/5-node JetStream cluster, TLS on
every listener (client, MQTT, routes with verification both ways), configs rendered by iotplat.nats.config.

Each node runs as its own process group with its own store dir on free ports, and is killed by ``close()``.
Nothing here touches the system's nats-server service.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from iotplat.nats.config import JetStreamLimits, Listen, Node, NodeConfig, Permissions, TlsFiles, User, render_node
from iotplat.nats.permissions import WorkerGrant, device_permissions, device_topics, worker_permissions
from iotplat.secrets.passwords import bcrypt_many
from . import servers
from .servers import free_port, kill_group, wait_port

NATS_SERVER = shutil.which("nats-server") or "/usr/bin/nats-server"
WARMUP_USER = "warmup"
TELEMETRY = "devices/{device}/telemetry"


def make_ca(directory: Path, names: tuple[str, ...] = ("localhost", "broker.iotplat.internal"),
            usages: str = "serverAuth,clientAuth") -> dict[str, Path]:
    """servers.make_ca for broker nodes: they present the certificate to each other on the cluster routes, so
    it carries clientAuth as well as serverAuth."""
    return servers.make_ca(directory, names, usages)


@dataclass
class NatsNode:
    name: str
    dir: Path
    client_port: int
    mqtt_port: int
    route_port: int
    http_port: int
    conf: Path = field(init=False)
    proc: subprocess.Popen | None = None
    launches: int = 0

    def __post_init__(self) -> None:
        self.conf = self.dir / "nats-server.conf"

    @property
    def log(self) -> Path:
        return self.dir / "nats.log"

    def launch(self, wait: bool = True) -> None:
        self.proc = subprocess.Popen([NATS_SERVER, "-c", str(self.conf), "-l", str(self.log)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.launches += 1
        if wait:
            for port in (self.client_port, self.mqtt_port, self.http_port):
                wait_port(port, 30, proc=self.proc, what=f"nats-server {self.name}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        kill_group(self.proc, sig, timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class NatsCluster:
    dir: Path
    nodes: list[NatsNode]
    ca: dict[str, Path]
    passwords: dict[str, str]

    @property
    def ca_file(self) -> str:
        return str(self.ca["ca"])

    def servers(self) -> list[str]:
        """host:port of every node's client listener (what the worker config lists)."""
        return [f"127.0.0.1:{n.client_port}" for n in self.nodes]

    @classmethod
    def start(cls, size: int = 3, devices: int = 4, workers: int = 2,
              extra_users: dict[str, tuple[str, Permissions, tuple[str, ...]]] | None = None,
              topics: tuple[str, ...] = (TELEMETRY,), dead_letter_topic: str = "iotplat/dead-letters",
              max_file_store: int = 1 << 30, ca_usages: str = "serverAuth,clientAuth",
              stream: str = "$MQTT_msgs", subject_prefix: str = "$MQTT.msgs.",
              launch: bool = True, **options: object) -> "NatsCluster":
        d = Path(tempfile.mkdtemp(prefix="iotplat-nats-"))
        ca = make_ca(d / "tls", usages=ca_usages)
        passwords = {f"dev{i:03d}": f"device-{i:03d}-secret-pw-0123456789" for i in range(devices)}
        passwords.update({f"iotplat-worker-{i}": f"worker-{i}-secret-pw-0123456789" for i in range(1, workers + 1)})
        passwords[WARMUP_USER] = "warmup-secret-pw-0123456789abcdef"
        extra = dict(extra_users or {})
        passwords.update({name: pw for name, (pw, _, _) in extra.items()})
        hashes = bcrypt_many(passwords.items(), 4)
        users: list[User] = []
        for name in passwords:
            if name == WARMUP_USER:  # MQTT only, may do nothing
                users.append(User(name, hashes[name], Permissions(), ("MQTT",)))
            elif name in extra:
                users.append(User(name, hashes[name], extra[name][1], extra[name][2]))
            elif name.startswith("iotplat-worker-"):
                perms = worker_permissions(WorkerGrant(name, stream, subject_prefix), ["devices/+/telemetry"],
                                           dead_letter_topic)
                users.append(User(name, hashes[name], perms, ("STANDARD",)))
            else:
                perms = device_permissions(device_topics(name, {}, topics))
                users.append(User(name, hashes[name], perms, ("MQTT",)))
        nodes = [NatsNode(f"n{i + 1}", d / f"n{i + 1}", free_port(), free_port(), free_port(), free_port())
                 for i in range(size)]
        members = tuple(Node(n.name, "127.0.0.1", n.route_port) for n in nodes)
        tls = TlsFiles(str(ca["cert"]), str(ca["key"]), str(ca["ca"]))
        for n, member in zip(nodes, members):
            n.dir.mkdir(parents=True)
            cfg = NodeConfig(cluster_name="iotplat-test", node=member, nodes=members,
                             client=Listen("127.0.0.1", n.client_port), mqtt=Listen("127.0.0.1", n.mqtt_port),
                             cluster_listen=Listen("127.0.0.1", n.route_port) if size > 1 else None,
                             monitor=Listen("127.0.0.1", n.http_port), tls=tls,
                             jetstream=JetStreamLimits(str(n.dir / "js"), max_file_store), users=tuple(users),
                             **options)  # type: ignore[arg-type]
            n.conf.write_text(render_node(cfg))
        c = cls(d, nodes, ca, passwords)
        if launch:
            try:
                for n in nodes:
                    n.launch(wait=False)
                for n in nodes:
                    for port in (n.client_port, n.mqtt_port, n.http_port):
                        wait_port(port, 30, proc=n.proc, what=f"nats-server {n.name}")
                c.wait_ready()
                c.warm_mqtt()
            except BaseException:
                c.close()
                raise
        return c

    def wait_ready(self, timeout: float = 60.0, nodes: list[NatsNode] | None = None) -> None:
        """Every running node answers /healthz?js-enabled-only=true (JetStream up; in a cluster: a meta leader)."""
        deadline = time.monotonic() + timeout
        pending = [n for n in (nodes or self.nodes) if n.alive()]
        last = ""
        while pending and time.monotonic() < deadline:
            for n in list(pending):
                try:
                    st = n.monitor("/healthz?js-enabled-only=true")
                    if st.get("status") == "ok" and (len(self.nodes) == 1 or self.meta_leader(n)):
                        pending.remove(n)
                except OSError as e:
                    last = str(e)
            time.sleep(0.1)
        if pending:
            raise TimeoutError(f"nats nodes not ready: {[n.name for n in pending]} ({last})\n"
                               + "\n".join(n.log_text()[-2000:] for n in pending))

    def warm_mqtt(self, timeout: float = 60.0) -> None:
        """One MQTT connection, retried until accepted: the MQTT layer creates its streams ($MQTT_sess,
        $MQTT_msgs, $MQTT_rmsgs, R3) on an account's first MQTT connect, and a connect racing that creation
        on another node can be refused after its 4 s JetStream API timeout (measured: 1 in 4 fresh clusters
        with two devices connecting at once). A deployment's canary does the same before devices arrive."""
        deadline = time.monotonic() + timeout
        while True:
            p = MqttProbe(self.nodes[0].mqtt_port, WARMUP_USER, self.passwords[WARMUP_USER], self.ca_file)
            try:
                if p.wait_connack(max(1.0, deadline - time.monotonic())) == 0:
                    return
            finally:
                p.close()
            if time.monotonic() > deadline:
                raise TimeoutError("no MQTT connection accepted by the cluster")

    @staticmethod
    def meta_leader(n: NatsNode) -> str:
        try:
            return n.monitor("/jsz").get("meta_cluster", {}).get("leader", "") or ""
        except OSError:
            return ""

    def stream_leader(self, stream: str = "$MQTT_msgs") -> str:
        for n in self.nodes:
            if not n.alive():
                continue
            try:
                js = n.monitor("/jsz?streams=true&accounts=true")
            except OSError:
                continue
            for acc in js.get("account_details", []):
                for s in acc.get("stream_detail", []):
                    if s.get("name") == stream and s.get("cluster", {}).get("leader"):
                        return s["cluster"]["leader"]
        return ""

    def node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)

    def close(self) -> None:
        for n in self.nodes:
            n.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


def reload_node(node: NatsNode, timeout: float = 15.0) -> None:
    """SIGHUP, then wait until /varz shows the new config_load_time (the reload was applied)."""
    before = node.monitor("/varz")["config_load_time"]
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while node.monitor("/varz")["config_load_time"] == before:
        assert time.monotonic() < deadline, f"{node.name}: reload not applied\n{node.log_text()[-2000:]}"
        time.sleep(0.05)


def set_user(conf: Path, user: str, new_hash: str | None) -> None:
    """Replace a user's bcrypt hash in a rendered nats-server.conf, or remove the user (None)."""
    text = conf.read_text()
    line = re.compile(r'^      \{user: "' + re.escape(user) + r'", password: "([^"]+)".*\n', re.M)
    assert line.search(text), user
    if new_hash is None:
        text = line.sub("", text)
    else:
        text = line.sub(lambda m: m.group(0).replace(m.group(1), new_hash), text)
    conf.write_text(text)


def nats_worker_config(tmp: Path, cluster: NatsCluster, influx, *, inflight: int = 1000, replicas: int = 2,
                       ack_wait: float = 10.0, stream_replicas: int | None = None, max_points: int = 5000,
                       max_delay: float = 0.1, http_port: int | None = None, name: str = "worker.toml",
                       nats_extra: dict | None = None, subscriptions: list | None = None) -> Path:
    """A worker.toml with a [nats] section (docs/worker-config.md); secrets in files next to it."""
    from .workerproc import TELEMETRY_SUB

    tmp.mkdir(parents=True, exist_ok=True)
    for i in range(1, 4):
        (tmp / f"nats-password-{i}").write_text(cluster.passwords.get(f"iotplat-worker-{i}", "x") + "\n")
    (tmp / "influxdb-password").write_text(influx.worker[1] + "\n")
    nats = {"servers": cluster.servers(), "tls": True, "ca_file": cluster.ca_file, "username": "iotplat-worker-{replica}",
            "password_file": "nats-password-{replica}", "inflight": inflight, "reconnect_min": 0.2,
            "reconnect_max": 2.0, "ack_wait": ack_wait, "max_ack_pending": inflight * replicas,
            "stream_replicas": stream_replicas or min(3, len(cluster.nodes)), "stream_max_bytes": 256 << 20,
            "stream_discard": "new"}
    nats.update(nats_extra or {})
    sections = {
        "nats": nats,
        "influxdb": {"version": 1, "url": influx.url, "timeout": 5.0, "database": influx.database,
                     "retention_policy": influx.rp, "username": influx.worker[0], "password_file": "influxdb-password"},
        "batch": {"max_points": max_points, "max_delay": max_delay},
        "spool": {"dir": str(tmp / "spool-{replica}"), "max_bytes": 256 << 20, "segment_bytes": 4 << 20,
                  "mode": "outage"},
        "dead_letters": {"measurement": "iotplat_dead_letters", "topic": "iotplat/dead-letters",
                         "rate_per_device": 100000.0, "excerpt_bytes": 256},
        "limits": {"max_payload": 65536, "max_json_depth": 16, "max_fields": 200},
        "http": {"listen": "127.0.0.1", "port": http_port if http_port is not None else free_port()},
    }
    out = ["version = 1"]
    for sect, values in sections.items():
        _toml(sect, values, out)
    for sub in subscriptions or [TELEMETRY_SUB]:
        _toml("subscriptions", sub, out, array=True)
    path = tmp / name
    path.write_text("\n".join(out) + "\n")
    return path


def _toml(prefix: str, table: dict, out: list[str], array: bool = False) -> None:
    """A TOML table of strings, numbers, booleans, string arrays and sub-tables (JSON's string escapes are
    TOML basic strings')."""
    out.append(f"[[{prefix}]]" if array else f"[{prefix}]")
    for k, v in table.items():
        if not isinstance(v, dict):
            out.append(f"{k} = {('true' if v else 'false') if isinstance(v, bool) else json.dumps(v)}")
    for k, v in table.items():
        if isinstance(v, dict):
            _toml(f"{prefix}.{k}", v, out)


class MqttProbe:
    """A paho-mqtt 3.1.1 client over TLS for checks: connect (the CONNACK code), publish QoS 1 and learn
    whether a PUBACK came or the server closed the connection, subscribe and collect (topic, payload)."""

    def __init__(self, port: int, username: str | None, password: str | None, ca_file: str,
                 client_id: str | None = None, clean: bool = True) -> None:
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.connack: int | None = None
        self.disconnected = threading.Event()
        self.connected = threading.Event()
        self.acked: set[int] = set()
        self.suback: list[int] | None = None
        self.messages: list[tuple[str, bytes]] = []
        self._cv = threading.Condition()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or username or "probe",
                        protocol=mqtt.MQTTv311, clean_session=clean)
        if username is not None:
            c.username_pw_set(username, password)
        c.tls_set(ca_certs=ca_file)
        c.reconnect_delay_set(60, 120)  # a probe never reconnects by itself

        def on_connect(client, userdata, flags, rc, props=None):
            self.connack = rc.value if hasattr(rc, "value") else int(rc)
            (self.connected if self.connack == 0 else self.disconnected).set()

        def on_disconnect(client, userdata, flags, rc, props=None):
            self.disconnected.set()

        def on_publish(client, userdata, mid, rc=None, props=None):
            with self._cv:
                self.acked.add(mid)
                self._cv.notify_all()

        def on_subscribe(client, userdata, mid, rcs, props=None):
            with self._cv:
                self.suback = [r.value if hasattr(r, "value") else int(r) for r in rcs]
                self._cv.notify_all()

        def on_message(client, userdata, msg):
            with self._cv:
                self.messages.append((msg.topic, msg.payload))
                self._cv.notify_all()

        c.on_connect, c.on_disconnect, c.on_publish = on_connect, on_disconnect, on_publish
        c.on_subscribe, c.on_message = on_subscribe, on_message
        self.client = c
        c.connect_async("127.0.0.1", port, keepalive=30)
        c.loop_start()

    def wait_connack(self, timeout: float = 15.0) -> int | None:
        deadline = time.monotonic() + timeout
        while self.connack is None and not self.disconnected.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.connack

    def publish(self, topic: str, payload: bytes, timeout: float = 10.0) -> str:
        """'acked', 'closed' (the server dropped the connection) or 'timeout'."""
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + timeout
        with self._cv:
            while info.mid not in self.acked and not self.disconnected.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                self._cv.wait(min(left, 0.1))
        return "acked" if info.mid in self.acked else "closed"

    def subscribe(self, filter_: str, qos: int = 0, timeout: float = 10.0) -> list[int] | None:
        self.suback = None
        self.client.subscribe(filter_, qos)
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.suback is None and time.monotonic() < deadline:
                self._cv.wait(0.1)
        return self.suback

    def wait_messages(self, n: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        with self._cv:
            while len(self.messages) < n and time.monotonic() < deadline:
                self._cv.wait(0.1)
            return list(self.messages)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


class NatsObserver:
    """A NATS-protocol subscriber (nats-py, on a thread of its own) that records every message it sees."""

    def __init__(self, port: int, user: str, password: str, ca_file: str, subject: str = ">") -> None:
        import asyncio
        import ssl
        import threading

        self.seen: list[tuple[str, bytes]] = []
        self._cv = threading.Condition()
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.error: BaseException | None = None

        async def main() -> None:
            import nats

            ctx = ssl.create_default_context(cafile=ca_file)
            try:
                self.nc = await nats.connect(f"tls://127.0.0.1:{port}", tls=ctx, user=user, password=password,
                                             allow_reconnect=False, connect_timeout=5)

                async def cb(msg) -> None:
                    with self._cv:
                        self.seen.append((msg.subject, msg.data))
                        self._cv.notify_all()

                await self.nc.subscribe(subject, cb=cb)
                await self.nc.flush()
            except BaseException as e:  # reported to the test thread
                self.error = e
            ready.set()

        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(main(), self._loop)
        ready.wait(15)
        if self.error is not None:
            self.close()
            raise self.error

    def wait_for(self, pred, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not any(pred(s, d) for s, d in self.seen):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.1))
            return True

    def subjects(self) -> list[str]:
        with self._cv:
            return [s for s, _ in self.seen]

    def close(self) -> None:
        import asyncio

        async def shut() -> None:
            nc = getattr(self, "nc", None)
            if nc is not None and not nc.is_closed:
                await nc.close()

        try:
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class FailoverPublisher:
    """One device: QoS 1 JSON telemetry at a steady rate through ``ports`` (MQTT/TLS), moving to the next
    node when its node goes away (the device kit lists every node), re-sending unacknowledged messages with
    DUP. Records which sequence numbers the broker acknowledged and the longest gap between two acks."""

    def __init__(self, ports: list[int], device: str, password: str, ca_file: str, seqs: range,
                 rate: float, window: int = 100) -> None:
        from .mqttload import LoadPublisher

        self.device, self.seqs, self.rate = device, seqs, rate
        self.ports = list(ports)
        self.acked: set[int] = set()
        self.sent_at: dict[int, int] = {}  # pid -> seq of its latest send
        self.last_ack = 0.0
        self.max_gap = 0.0
        self.error: BaseException | None = None
        self.done = False
        class Rotating(LoadPublisher):
            def _connect_once(inner) -> None:
                try:
                    super()._connect_once()
                except (OSError, ConnectionError):
                    self.ports.append(self.ports.pop(0))  # the next node for the next attempt
                    inner.port = self.ports[0]
                    raise

        pub = Rotating(self.ports[0], device, password, client_id=device, ca_file=ca_file, window=window)
        pub.on_ack = self._on_ack
        self.pub = pub
        self._thread: object = None

    def _on_ack(self, pid: int, t: float) -> None:
        seq = self.sent_at.get(pid)
        if seq is not None:
            self.acked.add(seq)
        if self.last_ack:
            self.max_gap = max(self.max_gap, t - self.last_ack)
        self.last_ack = t

    def messages(self, base_ms: int):
        for seq in self.seqs:
            yield (f"devices/{self.device}/telemetry",
                   b'{"ts":%d,"seq":%d,"temp":%.2f}' % (base_ms + seq, seq, 20 + (seq % 100) / 10))

    def start(self, base_ms: int, timeout: float = 300.0) -> "FailoverPublisher":
        import threading

        def on_sent(index: int, pid: int, t: float) -> None:
            self.sent_at[pid] = self.seqs[index]

        def run() -> None:
            try:
                self.pub.publish_all(self.messages(base_ms), rate=self.rate, timeout=timeout, on_sent=on_sent)
                self.done = True
            except BaseException as e:  # reported by join()
                self.error = e
            finally:
                self.pub.disconnect()

        th = threading.Thread(target=run, name=f"pub-{self.device}", daemon=True)
        th.start()
        self._thread = th
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)  # type: ignore[attr-defined]
        if self.error is not None:
            raise self.error
        assert self.done, f"{self.device}: still publishing after {timeout}s"
