"""nats-server.conf rendering: every value closed or escaped, checked by the real nats-server 2.9.10 parser
(``nats-server -t``) and by running it; the rules (cluster sizes, internal monitoring, bcrypt only, no
anonymous access) refuse what they must with a message naming the field."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from iotplat.nats.config import (JetStreamLimits, Listen, NatsConfigError, Node, NodeConfig, Permissions, TlsFiles,
                                 User, quote, render_node)
from iotplat.secrets.passwords import bcrypt_hash
from support.natscluster import NATS_SERVER, NatsCluster, make_ca
from support.servers import free_port, kill_group, wait_port

HASH = bcrypt_hash("device-secret-0123456789abcdef", 4)


def _cfg(tmp: Path, **over: object) -> NodeConfig:
    ca = make_ca(tmp / "tls")
    node = Node("n1", "127.0.0.1", free_port())
    base = NodeConfig(
        cluster_name="c", node=node, nodes=(node,), client=Listen("127.0.0.1", free_port()),
        mqtt=Listen("127.0.0.1", free_port()), cluster_listen=None, monitor=Listen("127.0.0.1", free_port()),
        tls=TlsFiles(str(ca["cert"]), str(ca["key"]), str(ca["ca"])),
        jetstream=JetStreamLimits(str(tmp / "js"), 1 << 30),
        users=(User("dev-1", HASH, Permissions(publish=("devices.dev-1.telemetry",)), ("MQTT",)),))
    return replace(base, **over)  # type: ignore[arg-type]


def _parses(conf: str, tmp: Path) -> subprocess.CompletedProcess:
    path = tmp / "nats.conf"
    path.write_text(conf)
    return subprocess.run([NATS_SERVER, "-t", "-c", str(path)], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("value", [
    'plain', 'with "double" quotes', "back\\slash\\", "$HOME and ${VAR}", "new\nline\r\ttab", "}\ninclude /etc/passwd",
    "ünïcødé ✓", "\x00nul\x7f", "# not a comment", "a: b, c = d; [e] {f}",
])
def test_quote_round_trips_through_the_real_parser(tmp_path: Path, value: str) -> None:
    """Any string, hostile or not, comes back byte for byte: the server reports the quoted value as the
    server name in /varz."""
    cfg = _cfg(tmp_path)
    text = render_node(cfg).replace('server_name: "n1"', f"server_name: {quote(value)}")
    assert "\n" not in quote(value) and "\r" not in quote(value)  # one line, whatever the value
    r = _parses(text, tmp_path)
    assert r.returncode == 0, r.stderr
    conf = tmp_path / "run.conf"
    conf.write_text(text)
    proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_port(cfg.monitor.port, 20, proc=proc, what="nats-server")  # type: ignore[union-attr]
        with urllib.request.urlopen(f"http://127.0.0.1:{cfg.monitor.port}/varz", timeout=5) as resp:  # type: ignore[union-attr]
            assert json.loads(resp.read())["server_name"] == value
    finally:
        kill_group(proc, signal.SIGKILL)


def test_hostile_store_dir_is_one_literal_path(tmp_path: Path) -> None:
    """A path with quotes, a backslash, '$VAR', braces and 'include' is written as one string: the server
    creates exactly that directory and nothing else."""
    evil = tmp_path / 'js "quoted" $HOME ${X} }{ include x \\ end'
    cfg = _cfg(tmp_path, jetstream=JetStreamLimits(str(evil), 1 << 30))
    conf = tmp_path / "evil.conf"
    conf.write_text(render_node(cfg))
    proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_port(cfg.client.port, 20, proc=proc, what="nats-server")
        deadline = time.monotonic() + 10
        while not (evil / "jetstream").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (evil / "jetstream").is_dir()
    finally:
        kill_group(proc, signal.SIGKILL)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted([evil.name, "tls"])


@pytest.mark.parametrize("user", ['dev", password: "x', "dev\n}", "a b", "", "x" * 65, "dev.1", "dev*", ">"])
def test_hostile_user_names_are_refused(tmp_path: Path, user: str) -> None:
    cfg = _cfg(tmp_path, users=(User(user, HASH, Permissions(), ("MQTT",)),))
    with pytest.raises(NatsConfigError, match=r"users\."):
        render_node(cfg)


@pytest.mark.parametrize("subject, why", [
    ("devices.*x.telemetry", "whole tokens"), ("devices.>.telemetry", "last token"), ("devices..x", "empty token"),
    ("devices.a b", "whitespace"), ("devices.a\nb", "whitespace"), ("", "1-1024"),
])
def test_bad_permission_subjects_are_refused(tmp_path: Path, subject: str, why: str) -> None:
    cfg = _cfg(tmp_path, users=(User("dev-1", HASH, Permissions(publish=(subject,)), ("MQTT",)),))
    with pytest.raises(NatsConfigError, match=why):
        render_node(cfg)


def test_only_bcrypt_hashes(tmp_path: Path) -> None:
    for bad in ("plaintext-password", "$2b$03$" + "a" * 53, "$7$1000$abc$def", HASH + "\n"):
        with pytest.raises(NatsConfigError, match="bcrypt"):
            render_node(_cfg(tmp_path, users=(User("dev-1", bad, Permissions(), ("MQTT",)),)))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "8.8.8.8", "broker.example.com", "224.0.0.1"])
def test_monitoring_only_on_an_internal_address(tmp_path: Path, host: str) -> None:
    with pytest.raises(NatsConfigError, match="monitor"):
        render_node(_cfg(tmp_path, monitor=Listen(host, 8222)))
    for ok in ("10.0.0.5", "192.168.1.2", "127.0.0.1", "fd00::5"):
        assert "http: " in render_node(_cfg(tmp_path, monitor=Listen(ok, 8222)))


@pytest.mark.parametrize("size", [2, 4, 6])
def test_cluster_sizes(tmp_path: Path, size: int) -> None:
    nodes = tuple(Node(f"n{i}", "127.0.0.1", 7000 + i) for i in range(size))
    with pytest.raises(NatsConfigError, match="1, 3 or 5"):
        render_node(_cfg(tmp_path, node=nodes[0], nodes=nodes, cluster_listen=Listen("127.0.0.1", 7000)))


def test_no_anonymous_access_and_every_listener_tls(tmp_path: Path) -> None:
    with pytest.raises(NatsConfigError, match="at least one user"):
        render_node(_cfg(tmp_path, users=()))
    text = render_node(_cfg(tmp_path))
    assert "no_auth_user" not in text and "authorization" not in text
    assert text.count("tls {") == 2  # client and MQTT listeners (a single node has no routes)
    nodes = tuple(Node(f"n{i}", f"10.0.0.{i}", 6222) for i in (1, 2, 3))
    three = render_node(_cfg(tmp_path, node=nodes[1], nodes=nodes, cluster_listen=Listen("0.0.0.0", 6222)))
    assert three.count("tls {") == 3 and "verify: true" in three and "no_advertise: true" in three
    assert '"nats-route://10.0.0.1:6222", "nats-route://10.0.0.3:6222"' in three  # the others, not itself
    assert "stream_replicas: 3" in three


def _routes(cluster: NatsCluster) -> list[int]:
    return [n.monitor("/routez").get("num_routes", 0) for n in cluster.nodes]


def test_cluster_routes_need_client_certificates(clusters: list) -> None:
    """Routes verify the peer's certificate both ways: nodes whose certificates carry clientAuth form the
    cluster (a JetStream meta leader); with serverAuth-only certificates (what iotplat issues to hosts
    today) no route comes up. Phase 2: broker hosts' certificates need clientAuth too."""
    good = NatsCluster.start(3, devices=1, workers=1)
    clusters.append(good)
    assert _routes(good) == [2, 2, 2] and good.meta_leader(good.nodes[0])
    bad = NatsCluster.start(3, devices=1, workers=1, ca_usages="serverAuth", launch=False)
    clusters.append(bad)
    for n in bad.nodes:
        n.launch()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:  # routes retry every second; none may come up
        assert _routes(bad) == [0, 0, 0]
        time.sleep(0.5)
    assert "certificate" in "".join(n.log_text() for n in bad.nodes).lower()
