"""What a configuration reload (SIGHUP, `systemctl reload nats-server`) applies on a real 3-node nats-server
2.9.10 cluster with JetStream and TLS on every listener: the facts `iotplat rotate` on the nats engine and
`iotplat up` after a `device revoke` rest on (roles/nats/tasks/reload.yml reloads node by node).

- a changed password and a removed user apply at once: nats-server re-checks every connected client on a
  reload and closes the ones whose credentials no longer hold (the removed device, the old password), while
  every other MQTT client stays connected (no new CONNECT, its next QoS 1 publish acknowledged);
- a new server certificate and key are served to new connections after the reload (the connection that was
  open keeps its session), and the routes stay up;
- a CA rotation: first every node trusts both CAs (bundle), then the nodes move one by one to a certificate of
  the new CA: the routes between a node on the new certificate and nodes on the old one stay up (mutual TLS,
  both CAs trusted), the JetStream meta leader stays, then the old CA is dropped;
- a change a reload cannot apply (the JetStream store directory) is refused by the running server, which
  keeps its old configuration: /varz's config_load_time does not move, which is how the role tells that a
  restart is needed.

What it cannot show: systemd's ExecReload (Debian's unit sends SIGHUP to the main process, as here)."""

from __future__ import annotations

import signal
import ssl
import socket
import time
from pathlib import Path

import pytest

from support import servers
from support.natscluster import MqttProbe, NatsCluster, NatsNode, reload_node, set_user
from iotplat.secrets.passwords import bcrypt_many

pytestmark = pytest.mark.integration


def _routes(node: NatsNode) -> int:
    return int(node.monitor("/routez")["num_routes"])


def _wait_routes(cluster: NatsCluster, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_routes(x) < n for x in cluster.nodes):
        assert time.monotonic() < deadline, {x.name: _routes(x) for x in cluster.nodes}
        time.sleep(0.1)


def _served_cert(port: int, ca_file: str) -> bytes:
    ctx = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _connack(port: int, user: str, password: str, ca_file: str, retry: float = 0.0) -> int | None:
    """The CONNACK code (paho 2 reports a 3.1.1 code 5 as reason code 135). With `retry`: connects again
    until accepted or `retry` seconds passed: nats-server 2.9 refuses a client id for ~4 s after a reload
    closed its connection ("other session with client ID ... is in the process of connecting": it removes the
    session record first, and waits its JetStream API timeout), so a device back with its new password may
    need a second attempt, as its reconnect loop makes anyway."""
    deadline = time.monotonic() + retry
    while True:
        probe = MqttProbe(port, user, password, ca_file)
        try:
            code = probe.wait_connack()
        finally:
            probe.close()
        if code == 0 or time.monotonic() >= deadline:
            return code
        time.sleep(0.5)


def test_reload_applies_users_and_keeps_other_clients(clusters: list[NatsCluster]) -> None:
    c = NatsCluster.start(size=3, devices=3, workers=1)
    clusters.append(c)
    n1 = c.nodes[0]
    port = n1.mqtt_port
    pw = c.passwords
    stays = MqttProbe(port, "dev002", pw["dev002"], c.ca_file)
    revoked = MqttProbe(port, "dev001", pw["dev001"], c.ca_file)
    changed = MqttProbe(port, "dev000", pw["dev000"], c.ca_file)
    try:
        assert stays.wait_connack() == 0 and revoked.wait_connack() == 0 and changed.wait_connack() == 0
        assert stays.publish("devices/dev002/telemetry", b"{}") == "acked"
        new_pw = "dev000-the-new-password-0123456789"
        new_hash = bcrypt_many([("dev000", new_pw)], 4)["dev000"]
        for n in c.nodes:  # node by node, as roles/nats/tasks/reload.yml
            set_user(n.conf, "dev000", new_hash)
            set_user(n.conf, "dev001", None)
            reload_node(n)
        assert revoked.disconnected.wait(10), "a removed user stays connected after the reload"
        assert changed.disconnected.wait(10), "a client with a changed password stays connected"
        assert not stays.disconnected.is_set()
        assert stays.publish("devices/dev002/telemetry", b"{}") == "acked"
        for n in c.nodes:  # every node refuses the old credentials and takes the new one
            for user, password in (("dev001", pw["dev001"]), ("dev000", pw["dev000"])):
                assert _connack(n.mqtt_port, user, password, c.ca_file) == 135, (n.name, user)  # 5: not authorized
            assert _connack(n.mqtt_port, "dev000", new_pw, c.ca_file, retry=20.0) == 0, n.name
        _wait_routes(c, 2)
    finally:
        for p in (stays, revoked, changed):
            p.close()


def test_reload_serves_new_certificates_and_survives_a_ca_rotation(clusters: list[NatsCluster],
                                                                    tmp_path: Path) -> None:
    c = NatsCluster.start(size=3, devices=1, workers=1)
    clusters.append(c)
    n1 = c.nodes[0]
    old_ca = c.ca["ca"].read_bytes()
    before = _served_cert(n1.mqtt_port, c.ca_file)
    device = MqttProbe(n1.mqtt_port, "dev000", c.passwords["dev000"], c.ca_file)
    try:
        assert device.wait_connack() == 0
        # a renewed certificate and key (same CA), written in place as the common role does
        servers.make_ca(c.ca["ca"].parent, ("localhost", "broker.iotplat.internal"), "serverAuth,clientAuth")
        for n in c.nodes:
            reload_node(n)
        _wait_routes(c, 2)
        assert _served_cert(n1.mqtt_port, c.ca_file) != before
        assert not device.disconnected.is_set()
        assert device.publish("devices/dev000/telemetry", b"{}") == "acked"
        # CA rotation, start: every node trusts the old and the new CA
        new = servers.make_ca(tmp_path / "new-ca", ("localhost", "broker.iotplat.internal"), "serverAuth,clientAuth")
        c.ca["ca"].write_bytes(old_ca + new["ca"].read_bytes())
        for n in c.nodes:
            reload_node(n)
        _wait_routes(c, 2)
        # finish: node by node onto a certificate of the new CA (each node has its own files here)
        for i, n in enumerate(c.nodes):
            text = n.conf.read_text()
            own = n.dir / "tls"
            own.mkdir()
            for key in ("cert", "key"):
                (own / new[key].name).write_bytes(new[key].read_bytes())
            (own / "ca.crt").write_bytes(c.ca["ca"].read_bytes())
            for key, path in (("cert", c.ca["cert"]), ("key", c.ca["key"]), ("ca", c.ca["ca"])):
                target = own / ("ca.crt" if key == "ca" else new[key].name)
                text = text.replace(f'"{path}"', f'"{target}"')
            n.conf.write_text(text)
            reload_node(n)
            _wait_routes(c, 2)  # mixed: nodes on the old CA's certificate and on the new one
            assert c.meta_leader(n), n.name  # JetStream's meta group still has a leader
        for n in c.nodes:  # the old CA dropped everywhere
            (n.dir / "tls" / "ca.crt").write_bytes(new["ca"].read_bytes())
            reload_node(n)
        _wait_routes(c, 2)
        assert _served_cert(n1.mqtt_port, str(new["ca"]))  # verifies against the new CA alone
        (tmp_path / "old-ca.crt").write_bytes(old_ca)
        with pytest.raises(ssl.SSLCertVerificationError):  # and no longer against the old one
            _served_cert(n1.mqtt_port, str(tmp_path / "old-ca.crt"))
        assert not device.disconnected.is_set(), "an open device connection was dropped by a reload"
        assert device.publish("devices/dev000/telemetry", b"{}") == "acked"
    finally:
        device.close()


def test_a_change_reload_cannot_apply_leaves_the_load_time(clusters: list[NatsCluster]) -> None:
    c = NatsCluster.start(size=1, devices=1, workers=1)
    clusters.append(c)
    n = c.nodes[0]
    before = n.monitor("/varz")["config_load_time"]
    n.conf.write_text(n.conf.read_text().replace(f'store_dir: "{n.dir / "js"}"', f'store_dir: "{n.dir / "js2"}"'))
    assert n.proc is not None
    n.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "not supported" not in n.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "not supported" in n.log_text(), n.log_text()[-2000:]
    assert n.alive() and n.monitor("/varz")["config_load_time"] == before
