"""The NATS engine as iotplat renders it (platform/examples/cluster: broker.engine nats on three hosts), run.

`iotplat render` of the example (a fresh state) gives each broker host a nats-server.conf as a SECRET (it holds
the users' bcrypt hashes), the worker a `[nats]` section, and the broker role `nats`. Here the three rendered
configurations run as real nats-server 2.9.10 processes on loopback:

- each process sees /etc/hosts mapping the three hosts' logical names (n1.iotplat.internal, ...) to 127.0.0.1
  (a private mount namespace per process, `unshare -m`; the machine's /etc/hosts is not touched), so the routes
  dial the names the file lists and verify each peer's certificate for that name with the platform CA, both
  ways (the server certificates iotplat issues carry clientAuth for that);
- what differs from a host is rewritten, each rewrite asserted to hit exactly what it should: the listen
  addresses and ports (three nodes share one loopback: client, MQTT, route and monitoring ports become free
  ports, the routes' ports with them), and the paths of the TLS files and the JetStream store (temp files
  holding the state's CA, each host's certificate and key). Users, permissions, TLS settings, JetStream and
  MQTT settings are the rendered bytes.

Proves: the rendered cluster forms (routes up, a JetStream meta leader), the canary (a device like any other,
password from the state) publishes QoS 1 over MQTT 3.1.1/TLS and gets its PUBACK, the message is in the
stream the worker reads, replicated on three nodes; a worker replica authenticates over the NATS protocol with
its state password; the rendered worker.toml loads with the worker's own config loader. It cannot prove the
role, the firewall or systemd (tests/nats/test_cluster_e2e.py on local hosts does, when it exists).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iotplat.commands import prepare
from iotplat.services import nats
from support.natscluster import NATS_SERVER
from support.servers import free_port, kill_group, wait_port
from tests.helpers import EXAMPLES, use_private_state

SPEC = EXAMPLES / "cluster" / "platform.yaml"
HOSTS = ("n1", "n2", "n3")


@dataclass
class Node:
    host: str
    dir: Path
    client: int
    mqtt: int
    route: int
    http: int
    proc: subprocess.Popen | None = None

    def monitor(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=5) as r:
            return json.loads(r.read())


def _replace(text: str, old: str, new: str, count: int) -> str:
    assert text.count(old) == count, f"expected {count} x {old!r} in the rendered file, found {text.count(old)}"
    return text.replace(old, new)


@dataclass
class Rendered:
    prepared: object
    nodes: list[Node]
    ca_file: Path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rendered]:
    base = tmp_path_factory.mktemp("nats-rendered")
    restore = use_private_state(base)
    try:
        prepared = prepare(str(SPEC), None, out_dir=str(base / "build"))
    finally:
        restore()
    p, m = prepared.platform, prepared.materials
    ca_file = base / "ca.crt"
    ca_file.write_text(m.ca_cert_pem)
    nodes = [Node(h, base / h, free_port(), free_port(), free_port(), free_port()) for h in HOSTS]
    hosts_file = base / "hosts"
    hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"127.0.0.1 {p.host_fqdn(h)}\n" for h in HOSTS))
    for n in nodes:
        n.dir.mkdir()
        (n.dir / "server.crt").write_text(m.host_certs[n.host].cert_pem)
        (n.dir / "server.key").write_text(m.host_certs[n.host].key_pem)
        (n.dir / "server.key").chmod(0o600)
        conf = m.secrets[nats.secret_key(n.host)]
        conf = _replace(conf, '"/etc/iotplat/tls/server.crt"', json.dumps(str(n.dir / "server.crt")), 3)
        conf = _replace(conf, f'"{nats.KEY}"', json.dumps(str(n.dir / "server.key")), 3)
        conf = _replace(conf, '"/etc/iotplat/tls/ca.crt"', json.dumps(str(ca_file)), 3)
        conf = _replace(conf, f'"{nats.STORE_DIR}"', json.dumps(str(n.dir / "js")), 1)
        conf = _replace(conf, f'listen: "0.0.0.0:{nats.CLIENT_PORT}"', f'listen: "127.0.0.1:{n.client}"', 1)
        conf = _replace(conf, 'listen: "0.0.0.0:8883"', f'listen: "127.0.0.1:{n.mqtt}"', 1)
        conf = _replace(conf, f'listen: "0.0.0.0:{nats.ROUTE_PORT}"', f'listen: "127.0.0.1:{n.route}"', 1)
        conf = _replace(conf, f'http: "127.0.0.1:{nats.MONITOR_PORT}"', f'http: "127.0.0.1:{n.http}"', 1)
        advertise = f'advertise: "{p.host_fqdn(n.host)}:{nats.ROUTE_PORT}"'
        conf = _replace(conf, advertise, f'advertise: "{p.host_fqdn(n.host)}:{n.route}"', 1)
        for other in nodes:
            route = f"nats-route://{p.host_fqdn(other.host)}:{nats.ROUTE_PORT}"
            conf = _replace(conf, route, f"nats-route://{p.host_fqdn(other.host)}:{other.route}",
                            0 if other is n else 1)
        (n.dir / "nats-server.conf").write_text(conf)
    try:
        for n in nodes:
            script = 'mount --bind "$1" /etc/hosts && exec "$2" -c "$3" -l "$4"'
            n.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(hosts_file), NATS_SERVER,
                 str(n.dir / "nats-server.conf"), str(n.dir / "nats.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for n in nodes:
            for port in (n.client, n.mqtt, n.http):
                wait_port(port, 30, proc=n.proc, what=f"nats-server {n.host}")
        yield Rendered(prepared, nodes, ca_file)
    finally:
        for n in nodes:
            if n.proc is not None:
                kill_group(n.proc)
        shutil.rmtree(base, ignore_errors=True)


def _wait(cond, timeout: float, what: str, nodes: list[Node]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except OSError:
            pass
        time.sleep(0.2)
    logs = "\n".join((n.dir / "nats.log").read_text()[-1500:] for n in nodes if (n.dir / "nats.log").exists())
    raise AssertionError(f"{what} not within {timeout:.0f}s\n{logs}")


def test_the_rendered_nodes_form_a_cluster_over_verified_routes(rendered: Rendered) -> None:
    nodes = rendered.nodes
    _wait(lambda: all(len(n.monitor("/routez").get("routes", [])) == 2 for n in nodes), 60, "routes", nodes)
    _wait(lambda: all(n.monitor("/jsz").get("meta_cluster", {}).get("leader") for n in nodes), 60,
          "a JetStream meta leader", nodes)
    for n in nodes:
        varz = n.monitor("/varz")
        assert varz["server_name"] == n.host
        assert varz["tls_required"] and varz["cluster"]["tls_required"] and varz["cluster"]["tls_verify"], varz
    leader = nodes[0].monitor("/jsz")["meta_cluster"]
    assert leader["cluster_size"] == 3 and leader["leader"] in HOSTS, leader


def _worker_config(rendered: Rendered, tmp_path: Path, password: str) -> Path:
    """The rendered worker.toml of n1 with the CA file's path pointed at the test's copy (asserted: twice, in
    [nats] and [influxdb]), the credentials in a CREDENTIALS_DIRECTORY as systemd gives them."""
    src = rendered.prepared.out / "hosts" / "n1" / "etc" / "iotplat" / "worker.toml"  # type: ignore[attr-defined]
    text = _replace(src.read_text(), '"/etc/iotplat/tls/ca.crt"', json.dumps(str(rendered.ca_file)), 2)
    (tmp_path / "worker.toml").write_text(text)
    (tmp_path / "mqtt-password").write_text(password)
    (tmp_path / "influxdb-password").write_text("x" * 32)
    return tmp_path / "worker.toml"


class _Handler:
    """What the worker's core is to its transport, reduced to recording: every message, acknowledged at once."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.messages: list[tuple[bytes, bytes]] = []
        self.subscribed: list[int] | None = None
        self.failures: list[str] = []
        self.transport: object = None

    def room(self) -> int:
        return 100

    def on_publishes(self, topics: list[bytes], payloads: list[bytes], tokens: list[int | None], dups: int) -> None:
        with self.cond:
            self.messages += list(zip(topics, payloads))
            self.cond.notify_all()
        self.transport.ack(tokens)  # type: ignore[attr-defined]

    def on_connected(self, session_present: bool) -> None:
        self.transport.subscribe(self.filters)  # type: ignore[attr-defined]

    def on_subscribed(self, codes: list[int]) -> None:
        with self.cond:
            self.subscribed = list(codes)
            self.cond.notify_all()

    def on_connect_failed(self, reason: str) -> None:
        self.failures.append(reason)

    def on_disconnected(self, *args: object) -> None:
        pass


def test_the_canary_reaches_a_worker_replica_through_the_replicated_stream(rendered: Rendered, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's real NATS transport, configured by the rendered worker.toml (only its server addresses
    pointed at the loopback nodes, the certificate checked for the broker's logical name), creates its durable
    consumer; the canary publishes QoS 1 over MQTT 3.1.1/TLS to another node; the replica receives it. The pull
    loop's first run fails (an injected defect): it is started again, and the transport's diagnostics (the
    worker's /healthz) say so, with the error, while the loop runs."""
    import dataclasses

    import paho.mqtt.client as mqtt

    from iotplat.spec.platform_model import template_filter
    from iotplat.verify.status import TrustStore, canary_payload
    from iotplat.worker.config import load_config
    from iotplat.worker.nats_transport import NatsTransport

    p, m = rendered.prepared.platform, rendered.prepared.materials  # type: ignore[attr-defined]
    nodes = rendered.nodes
    _wait(lambda: all(n.monitor("/jsz").get("meta_cluster", {}).get("leader") for n in nodes), 60,
          "a JetStream meta leader", nodes)
    conf = _worker_config(rendered, tmp_path, m.mqtt_users[p.replicas[0].username][0])
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = load_config(conf, replica=1)
    assert cfg.nats is not None
    ncfg = dataclasses.replace(cfg.nats, servers=tuple(f"127.0.0.1:{n.client}" for n in nodes),
                               server_name=p.service_name("broker"), ca_file=str(rendered.ca_file))
    handler = _Handler()
    handler.filters = [template_filter(s.topic) for s in p.spec.ingestion.subscriptions]  # type: ignore[attr-defined]
    transport = NatsTransport(ncfg, handler, handler.filters)  # type: ignore[attr-defined]
    real_loop, runs = transport._pull_loop, []

    async def failing_once() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise RuntimeError("injected pull loop defect")
        await real_loop()

    monkeypatch.setattr(transport, "_pull_loop", failing_once)
    handler.transport = transport
    transport.start()
    trust = TrustStore(m.ca_cert_pem)
    try:
        with handler.cond:
            assert handler.cond.wait_for(lambda: handler.subscribed is not None, 60), handler.failures
        assert handler.subscribed == [1], handler.subscribed
        made = canary_payload(p, int(time.time() * 1000))
        assert made is not None
        topic, payload = made
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=p.canary.id, protocol=mqtt.MQTTv311)
        c.tls_set_context(trust.for_name(p.service_name("broker")))
        c.username_pw_set(p.canary.id, m.mqtt_users[p.canary.id][0])
        c.connect("127.0.0.1", nodes[1].mqtt, keepalive=30)
        c.loop_start()
        try:
            info = c.publish(topic, payload, qos=1)
            info.wait_for_publish(timeout=20)
            assert info.is_published(), "the canary's QoS 1 PUBLISH was not acknowledged"
        finally:
            c.loop_stop()
            c.disconnect()
        with handler.cond:
            assert handler.cond.wait_for(lambda: handler.messages, 30), "the replica received nothing"
        assert handler.messages == [(topic.encode(), payload if isinstance(payload, bytes) else payload.encode())]
        shown = transport.diagnostics()
        assert (shown["pull_loop"], shown["pull_loop_restarts"]) == ("running", 1), shown
        assert "injected pull loop defect" in shown["pull_error"], shown
        assert any("pull loop failed" in f for f in handler.failures), handler.failures
    finally:
        transport.stop()
        trust.close()
    stream = {}
    for acc in nodes[0].monitor("/jsz?streams=true&accounts=true&config=true").get("account_details", []):
        stream.update({s["name"]: s for s in acc.get("stream_detail", [])})
    msgs = stream["$MQTT_msgs"]
    assert msgs["config"]["num_replicas"] == 3 and len(msgs["cluster"].get("replicas", [])) == 2, msgs
    assert msgs["config"]["max_msgs"] == nats.stream_limits(p)["max_msgs"], msgs["config"]


def test_a_worker_replica_authenticates_with_its_state_password(rendered: Rendered) -> None:
    import asyncio
    import ssl

    import nats as nats_py

    p, m = rendered.prepared.platform, rendered.prepared.materials  # type: ignore[attr-defined]
    user = p.replicas[0].username
    ctx = ssl.create_default_context(cafile=str(rendered.ca_file))

    async def check(password: str) -> dict:
        nc = await nats_py.connect(f"tls://127.0.0.1:{rendered.nodes[2].client}", user=user, password=password,
                                   tls=ctx, tls_hostname=p.host_fqdn("n3"), allow_reconnect=False,
                                   inbox_prefix=f"_INBOX.{user}",
                                   connect_timeout=5, max_reconnect_attempts=0)
        try:
            info = await nc.jetstream().stream_info("$MQTT_msgs")
            return {"replicas": info.config.num_replicas}
        finally:
            await nc.close()

    assert asyncio.run(check(m.mqtt_users[user][0])) == {"replicas": 3}
    with pytest.raises(Exception):  # a wrong password is refused (no anonymous or partial access)
        asyncio.run(check("not-the-password-0123456789abcdef"))


def test_the_rendered_worker_config_loads(rendered: Rendered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iotplat.worker.config import load_config

    conf = _worker_config(rendered, tmp_path, "x" * 32)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = load_config(conf, replica=1)
    assert cfg.nats is not None
    assert cfg.nats.servers == ("n1.iotplat.internal:4222", "n2.iotplat.internal:4222", "n3.iotplat.internal:4222")
    assert cfg.nats.username == "iotplat-worker-1" and cfg.nats.stream_replicas == 3
    assert cfg.nats.max_ack_pending == 2 * cfg.nats.inflight


def test_no_bcrypt_hash_or_node_config_in_the_build(rendered: Rendered) -> None:
    out = rendered.prepared.out  # type: ignore[attr-defined]
    for f in out.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert b"$2b$" not in data and b"$2a$" not in data, f
    assert not list(out.rglob("nats-server.conf"))
    site = (out / "ansible" / "site.yml").read_text()
    assert "name: nats\n" in site and "mosquitto" not in site


def _answers(nodes: list[Node]) -> dict[str, object]:
    from iotplat.verify.nats_cluster import MONITOR_PATHS

    from tests.nats.natsmonitor import monitor_answers

    return {n.host: monitor_answers(n.http, MONITOR_PATHS) for n in nodes}


def test_status_cluster_checks_report_a_stopped_node(rendered: Rendered) -> None:
    """`status`'s cluster checks (iotplat/verify/nats_cluster.py) on what the real nodes answer: all ok on the
    healthy cluster; with one node stopped (SIGTERM, last test of the module) that node is down by name, the
    others miss their route to it, a meta leader is still agreed, and the stream names its lagging replica."""
    from iotplat.verify.nats_cluster import cluster_checks

    import paho.mqtt.client as mqtt

    from iotplat.verify.status import TrustStore

    p, m = rendered.prepared.platform, rendered.prepared.materials  # type: ignore[attr-defined]
    nodes = rendered.nodes
    _wait(lambda: all(len(n.monitor("/routez").get("routes", [])) == 2 for n in nodes), 60, "routes", nodes)
    trust = TrustStore(m.ca_cert_pem)
    try:  # the MQTT layer creates its streams on the account's first MQTT connection (if no test did yet)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=p.canary.id, protocol=mqtt.MQTTv311)
        c.tls_set_context(trust.for_name(p.service_name("broker")))
        c.username_pw_set(p.canary.id, m.mqtt_users[p.canary.id][0])
        c.connect("127.0.0.1", nodes[0].mqtt, keepalive=30)
        c.loop_start()
        try:
            deadline = time.monotonic() + 30
            while not c.is_connected() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert c.is_connected(), "the canary's MQTT connection was not accepted"
        finally:
            c.disconnect()
            c.loop_stop()
    finally:
        trust.close()
    _wait(lambda: all(c.ok for c in cluster_checks(list(HOSTS), _answers(nodes))), 60,  # type: ignore[arg-type]
          "a healthy cluster", nodes)
    healthy = cluster_checks(list(HOSTS), _answers(nodes))  # type: ignore[arg-type]
    assert {c.name for c in healthy} == {"nats node", "nats routes", "nats JetStream meta leader",
                                         "nats stream $MQTT_msgs", "nats-server /healthz"}
    assert sorted(c.host for c in healthy if c.name == "nats-server /healthz") == sorted(HOSTS)
    stopped = nodes[2]
    assert stopped.proc is not None
    stopped.proc.terminate()
    stopped.proc.wait(timeout=60)
    rest = nodes[:2]

    seen: list = []

    def degraded() -> bool:
        checks = cluster_checks(list(HOSTS), _answers(nodes))  # type: ignore[arg-type]
        seen[:] = checks
        leader = next(c for c in checks if c.name == "nats JetStream meta leader")
        stream = next(c for c in checks if c.name == "nats stream $MQTT_msgs")
        return leader.ok and "not current: n3" in stream.detail

    _wait(degraded, 60, "a new meta leader and the stream's lagging replica", rest)
    checks = seen
    bad = {(c.name, c.host) for c in checks if not c.ok}
    assert ("nats node", "n3") in bad
    assert ("nats routes", "n1") in bad and ("nats routes", "n2") in bad
    assert ("nats-server /healthz", "n3") in bad  # down: not serving
    assert ("nats-server /healthz", "n1") not in bad and ("nats-server /healthz", "n2") not in bad, checks
    stream = next(c for c in checks if c.name == "nats stream $MQTT_msgs")
    assert not stream.ok and "not current: n3" in stream.detail, stream
