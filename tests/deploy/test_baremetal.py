"""The bare-metal target end to end, on servers that are not iotplat's own: a stock Debian 13 server (broker and
worker) and a stock Debian 12 server (InfluxDB, Grafana, and a spare disk for the data), reached only as the
non-root user `ops` with sudo and the key the spec names, as a user's own servers are (tests/support/userhosts.py
says what these stand-ins are and what they cannot prove).

It covers: `up` from nothing (Ansible installs what a stock server lacks; each host gets its own release's pinned
versions), `status` (InfluxDB reached through SSH, never opened), a device's data stored, the firewall (internal
ports only from the platform's own hosts: a foreign address and the operator's machine are refused), the data
disk formatted once and holding InfluxDB's data, a no-change `up`, SSH host keys pinned on first contact (a
changed key stops the deploy), `destroy` (hosts and data kept) and `destroy --data`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

from iotplat.cli import main
from tests.deploy.conftest import module_env, mqtt_connect, platform_materials, run_cli
from tests.support.userhosts import loop_disk, user_servers

pytestmark = [pytest.mark.hosts, pytest.mark.slow]
NETWORK = "10.221.0.0/24"
CONTROLLER = "10.221.0.1"  # this machine's address on the servers' network (the operator)
FOREIGN = "10.221.0.200"  # another machine on the same network, not part of the platform
DISK = "/dev/disk/by-id/virtio-iotplat-data-0001"


def _spec(servers, work: Path) -> Path:
    spec_dir = work / "spec"
    spec_dir.mkdir()
    (spec_dir / "devices.csv").write_text("id\nbm-dev-1\n")
    spec = {
        "apiVersion": "iotplat/v1",
        "name": "bm",
        "target": {
            "kind": "baremetal",
            "ssh_user": "ops",
            "admin_cidrs": [f"{CONTROLLER}/32"],
            "hosts": {
                "edge": {"address": servers.hosts["edge"].address, "ssh_private_key": str(servers.key)},
                "vault": {"address": servers.hosts["vault"].address, "ssh_private_key": str(servers.key),
                          "data_device": DISK},
            },
        },
        "hosts": [{"name": "edge", "services": ["broker", "worker"]},
                  {"name": "vault", "services": ["influxdb", "grafana"]}],
        "broker": {"auth": {"hash_iterations": 1000}},
        "devices": {"registry": "devices.csv"},
        "ingestion": {"subscriptions": [{"name": "telemetry", "topic": "devices/{device}/telemetry",
                                         "measurement": "telemetry", "fields": {"temperature": "float"},
                                         "timestamp": {"field": "ts", "unit": "ms"}}]},
        "influxdb": {"version": 1},
        "grafana": {"required": False},
    }
    path = spec_dir / "platform.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def bm(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("baremetal")
    with loop_disk(work / "disk.img") as loop, \
            user_servers("pytest-bm", NETWORK, {"edge": "trixie", "vault": "bookworm"},
                         disks={"vault": (loop, DISK)}) as servers:
        key = work / "vault-key"
        key.write_text("baremetal-vault-password-0123456789abcdef")
        key.chmod(0o600)
        ctx = {"servers": servers, "spec": str(_spec(servers, work)), "build": str(work / "build"), "work": work,
               "env": {"IOTPLAT_STATE_DIR": str(work / "state"), "IOTPLAT_VAULT_PASSWORD_FILE": str(key)}}
        yield ctx


@pytest.fixture(autouse=True)
def _module_state(isolated_state, bm: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    module_env(bm, monkeypatch)


def _cli(capfd, *args: str) -> tuple[int, str, str]:
    return run_cli(capfd, *args)


def test_01_up_on_stock_debian_12_and_13_servers(bm: dict, capfd) -> None:
    code, out, err = _cli(capfd, "up", bm["spec"], "--out", bm["build"], "--json")
    assert code == 0, (out + err)[-4000:]
    result = json.loads(out)
    assert result["ok"] is True, [c for c in result["status"] if not c["ok"]]
    passed = {(c["host"], c["name"]) for c in result["status"] if c["ok"] and not c["skipped"]}
    assert {("edge", "canary"), ("edge", "unit mosquitto"), ("vault", "unit influxdb"),
            ("edge", "unit iotplat-worker@1")} <= passed
    influx_probe = next(c for c in result["status"] if c["name"].startswith("influxdb :"))
    assert "via SSH" in influx_probe["detail"]
    servers = bm["servers"]
    # each host got the pinned version of its own release
    ver = servers.exec("edge", ["dpkg-query", "-W", "-f", "${Version}", "mosquitto"]).stdout
    assert ver == "2.0.21-1", ver
    ver = servers.exec("vault", ["dpkg-query", "-W", "-f", "${Version}", "influxdb"]).stdout
    assert ver == "1.6.7~rc0-1+b13", ver
    assert servers.exec("edge", ["cat", "/etc/debian_version"]).stdout.startswith("13")
    bm["first"] = result


def test_02_device_data_is_stored_through_the_firewall(bm: dict) -> None:
    from iotplat.hosts.tunnel import forward
    from iotplat.verify.status import TrustStore, influx_query

    servers = bm["servers"]
    p, m, _ = platform_materials(bm)
    edge = servers.hosts["edge"].address
    ca = str(Path(bm["build"]) / "hosts/edge/etc/iotplat/tls/ca.crt")
    c, seen = mqtt_connect(edge, ca, "bm-dev-1", m.mqtt_users["bm-dev-1"][0], protocol=mqtt.MQTTv311)
    assert seen["rc"] == 0
    ts = int(time.time() * 1000)
    c.publish("devices/bm-dev-1/telemetry", json.dumps({"temperature": 21.5, "ts": ts}), qos=1).wait_for_publish(10)
    c.loop_stop()
    c.disconnect()
    trust = TrustStore(m.ca_cert_pem)
    vault = next(h for h in _hosts(bm) if h.name == "vault")
    rows: list = []
    with forward(vault, 8086) as (address, port):
        deadline = time.time() + 30
        while time.time() < deadline and not rows:
            res = influx_query(p, address, trust.context(), "iotplat-grafana", m.secrets["influxdb_grafana_password"],
                               f"SELECT temperature FROM telemetry WHERE device = 'bm-dev-1' AND time = {ts}ms",
                               port=port)
            rows = [v for s in res["results"][0].get("series", []) for v in s["values"]]
            time.sleep(0.5)
    trust.close()
    assert [r[1] for r in rows] == [21.5]


def _hosts(bm: dict):
    from iotplat.deploy.ops import open_context

    ctx = open_context(bm["spec"], None, None, bm["build"], lambda s: None)
    return ctx.hosts()


def _connects(netns: str | None, address: str, port: int) -> bool:
    code = f"import socket; socket.create_connection(('{address}', {port}), timeout=3).close()"
    argv = ["python3", "-c", code]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0


def test_03_internal_ports_only_from_the_platforms_hosts(bm: dict) -> None:
    """The host firewall (the `internal` source class = the inventory's addresses) refuses InfluxDB and SSH to an
    address outside the platform, and InfluxDB to the operator's machine too (status reaches it through SSH)."""
    servers = bm["servers"]
    vault, edge = servers.hosts["vault"].address, servers.hosts["edge"].address
    ns, veth = "pytest-bm-foreign", "pbmforeign0"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns], check=True)
        subprocess.run(["ip", "link", "set", veth, "master", servers.settings.bridge, "up"], check=True)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{FOREIGN}/24", "dev", "eth0"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        assert _connects(ns, edge, 8883)  # devices may come from anywhere (device_cidrs 0.0.0.0/0)
        assert not _connects(ns, vault, 8086)  # internal: refused from a foreign address
        assert not _connects(ns, vault, 22)  # SSH only from admin_cidrs
        assert not _connects(None, vault, 8086)  # the operator is admin, not internal
        assert _connects(None, vault, 22)
        r = servers.exec("edge", ["python3", "-c",
                                  f"import socket; socket.create_connection(('{vault}', 8086), timeout=3).close()"])
        assert r.returncode == 0, r.stderr  # the worker's host reaches InfluxDB
        rules = servers.exec("vault", ["nft", "list", "table", "inet", "iotplat"]).stdout
        assert edge in rules and "8086" in rules, rules
    finally:
        subprocess.run(["ip", "link", "del", veth], check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_04_the_data_disk_holds_influxdb_and_is_formatted_once(bm: dict) -> None:
    servers = bm["servers"]
    blk = servers.exec("vault", ["blkid", "-o", "export", DISK]).stdout
    assert "TYPE=ext4" in blk and "LABEL=iotplat-data" in blk, blk
    uuid = [line for line in blk.splitlines() if line.startswith("UUID=")]
    src = servers.exec("vault", ["findmnt", "-rn", "-o", "SOURCE", "--mountpoint", "/var/lib/influxdb"]).stdout
    assert "/srv/iotplat/influxdb" in src or "[/influxdb]" in src, src
    assert servers.exec("vault", ["sh", "-c", "ls /srv/iotplat/influxdb/data"]).returncode == 0
    bm["disk_uuid"] = uuid


def test_05_second_up_changes_nothing(bm: dict, capfd) -> None:
    code, out, err = _cli(capfd, "up", bm["spec"], "--out", bm["build"], "--json", "--no-verify")
    assert code == 0, (out + err)[-3000:]
    result = json.loads(out)
    assert result["changed"] == 0, result["recap"]
    blk = bm["servers"].exec("vault", ["blkid", "-o", "export", DISK]).stdout
    assert [line for line in blk.splitlines() if line.startswith("UUID=")] == bm["disk_uuid"]  # not reformatted


def test_06_a_changed_host_key_stops_the_deploy(bm: dict, capfd) -> None:
    """Host keys are pinned in the state on first contact: a server that answers with another key (reinstalled,
    or an impostor at its address) is refused before anything runs there, with the fix."""
    servers = bm["servers"]
    state = Path(bm["env"]["IOTPLAT_STATE_DIR"]) / "bm" / "default"
    for host in servers.hosts.values():  # learned on first contact (hashed entries: ask ssh-keygen)
        found = subprocess.run(["ssh-keygen", "-F", host.address, "-f", str(state / "known_hosts")],
                               capture_output=True, text=True)
        assert found.returncode == 0 and "ssh-ed25519" in found.stdout, host.name
    new_keys = ("rm -f /etc/ssh/ssh_host_*; ssh-keygen -q -A; systemctl restart ssh")
    assert servers.exec("vault", ["sh", "-c", new_keys]).returncode == 0
    try:
        code, out, err = _cli(capfd, "plan", bm["spec"], "--out", bm["build"])
        assert code == 1, out + err
        assert "vault" in err and "host key" in err and "ssh-keygen -R" in err, err
    finally:  # the operator's fix, as the message says
        subprocess.run(["ssh-keygen", "-R", servers.hosts["vault"].address, "-f", str(state / "known_hosts")],
                       capture_output=True, check=True)
    code, out, err = _cli(capfd, "status", bm["spec"], "--out", bm["build"], "--no-canary")
    assert code == 0, (out + err)[-3000:]


def test_07_destroy_keeps_hosts_and_data_then_destroy_data_removes_it(bm: dict, capfd) -> None:
    servers = bm["servers"]
    code, out, err = _cli(capfd, "destroy", bm["spec"], "--out", bm["build"], "--yes", "--json")
    assert code == 0, (out + err)[-3000:]
    result = json.loads(out)
    assert any("data" in k for k in result["kept"]) and any("bare-metal hosts" in k for k in result["kept"])
    assert servers.exec("edge", ["systemctl", "is-active", "mosquitto"]).stdout.strip() != "active"
    assert servers.exec("edge", ["test", "-e", "/etc/iotplat"]).returncode == 1
    assert servers.exec("vault", ["sh", "-c", "ls /srv/iotplat/influxdb/data"]).returncode == 0  # data kept
    code, out, err = _cli(capfd, "destroy", bm["spec"], "--out", bm["build"], "--yes", "--data", "--json")
    # nothing is deployed any more: the services' data still go (the hosts are reachable, the spec names them)
    assert code == 0, (out + err)[-3000:]
    blk = servers.exec("vault", ["blkid", "-p", "-o", "export", DISK])
    assert "TYPE=" not in blk.stdout, blk.stdout  # the data disk's file system is erased
    assert servers.exec("vault", ["test", "-e", "/var/lib/influxdb/data"]).returncode == 1
    assert servers.provider.status() == {"edge": "running", "vault": "running"}  # the servers themselves stay
    assert main(["status", bm["spec"], "--out", bm["build"]]) == 1  # not deployed any more
