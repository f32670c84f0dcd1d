"""End to end on real throw-away hosts: platform/examples/cluster (broker.engine nats on three hosts, two worker
replicas, InfluxDB) deployed by `iotplat up` with the real roles onto systemd-nspawn hosts (10.238.0.0/24).

One platform for the whole module. Proves: `up` and `status` green with the canary (published over MQTT 3.1.1/TLS
to a broker host, read back from InfluxDB) and the cluster checks; two devices publish QoS 1 with a sequence number
at a steady bounded rate while `systemctl stop nats-server` stops the node they are connected to: every message
the cluster acknowledged is in InfluxDB (counted per sequence number), the devices reconnect to another node,
`status` names the stopped node (and the canary uses another node); then, with the cluster green again, kill -9
of the node the devices use (systemd restarts it) together with kill -9 of worker replica 1: again every
acknowledged message is in InfluxDB (replica 2 takes over through the shared durable consumer). At the end the
fixture runs `destroy --yes`. A host cut off the network is not covered here.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.deploy.conftest import local_platform, module_env, platform_materials, run_cli
from tests.helpers import EXAMPLES

pytestmark = [pytest.mark.hosts, pytest.mark.slow]
NETWORK = "10.238.0.0/24"
DEVICES = ["dev-a", "dev-b"]
RATE = 40.0  # messages per second per device
COUNT = 1200  # per device: 30 s at RATE


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory):
    def edit(spec: dict) -> None:
        spec["name"], spec["target"]["network"] = "natse2e", NETWORK

    yield from local_platform(tmp_path_factory.mktemp("nats-e2e"), EXAMPLES / "cluster" / "platform.yaml", edit,
                              devices=DEVICES)


@pytest.fixture(autouse=True)
def _module_state(isolated_state, deployed: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    module_env(deployed, monkeypatch)


class Device:
    """One device of the kit: QoS 1 JSON telemetry with a sequence number at a steady rate, connected to one of
    the broker hosts; when its node goes away it moves to the next host in the list and re-sends what was not
    acknowledged (with DUP). Records the sequence numbers the cluster acknowledged and every host it used."""

    def __init__(self, hosts: list[str], tls_name: str, device: str, password: str, ca_file: str) -> None:
        from support.mqttload import LoadPublisher

        self.device, self.hosts = device, list(hosts)
        self.acked: set[int] = set()
        self.used: list[str] = [self.hosts[0]]
        self.sent_at: dict[int, int] = {}
        self.error: BaseException | None = None
        self.done = False
        outer = self

        class Rotating(LoadPublisher):
            def _connect_once(inner) -> None:
                try:
                    super()._connect_once()
                except (OSError, ConnectionError):
                    outer.hosts.append(outer.hosts.pop(0))
                    inner.host = outer.hosts[0]
                    outer.used.append(inner.host)
                    raise

        self.pub = Rotating(8883, device, password, client_id=device, ca_file=ca_file, window=100,
                            host=self.hosts[0], tls_name=tls_name)
        self.pub.on_ack = lambda pid, t: self.acked.add(self.sent_at[pid]) if pid in self.sent_at else None
        self._thread: threading.Thread | None = None

    def start(self, base_ms: int) -> Device:
        def messages():
            for seq in range(COUNT):
                yield (f"devices/{self.device}/telemetry",
                       b'{"ts":%d,"seq":%d,"temperature":%.2f}' % (base_ms + seq, seq, 20 + (seq % 100) / 10))

        def on_sent(index: int, pid: int, t: float) -> None:
            self.sent_at[pid] = index

        def run() -> None:
            try:
                self.pub.publish_all(messages(), rate=RATE, timeout=240, on_sent=on_sent)
                self.done = True
            except BaseException as e:  # reported by join()
                self.error = e
            finally:
                self.pub.disconnect()

        self._thread = threading.Thread(target=run, name=f"pub-{self.device}", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        assert self.done, f"{self.device}: still publishing after {timeout}s"


def test_01_up_deploys_the_cluster_and_status_is_green(deployed: dict, capfd) -> None:
    code, out, err = run_cli(capfd, "up", deployed["spec"], "--out", deployed["build"], "--json")
    assert code == 0, (out + err)[-4000:]
    result = json.loads(out)
    deployed["hosts"] = result["hosts"]
    assert result["ok"] is True
    ok = {(c["host"], c["name"]) for c in result["status"] if c["ok"] and not c["skipped"]}
    for host in ("n1", "n2", "n3"):
        assert (host, "unit nats-server") in ok and (host, "nats-server /healthz") in ok, host
        assert (host, "nats node") in ok and (host, "nats routes") in ok, host
    assert ("", "nats JetStream meta leader") in ok and ("", "nats stream $MQTT_msgs") in ok
    assert any(name == "canary" for _, name in ok)
    assert ("n1", "unit iotplat-worker@1") in ok and ("n2", "unit iotplat-worker@2") in ok


def _under_load(deployed: dict, first: str, lose) -> tuple[list[Device], object]:
    """Two devices publish COUNT messages each, connected first to `first`; once a quarter is acknowledged,
    `lose(provider)` breaks something. Returns the devices (joined) after every acknowledged message was found
    in InfluxDB by its sequence number (asserted), and the provider."""
    from iotplat.deploy.targets import local_settings
    from iotplat.hosts import local_provider
    from iotplat.spec.load import load_platform
    from iotplat.verify.status import TrustStore, influx_query

    p, m, _ = platform_materials(deployed)
    hosts = deployed["hosts"]
    ca = str(Path(deployed["build"]) / "hosts/n1/etc/iotplat/tls/ca.crt")
    names = ["n1", "n2", "n3"]
    order = [hosts[h] for h in names[names.index(first):] + names[:names.index(first)]]
    base_ms = int(time.time() * 1000) - 10 * COUNT  # device timestamps in the recent past, one ms apart
    devs = [Device(order, p.service_name("broker"), d, m.mqtt_users[d][0], ca).start(base_ms) for d in DEVICES]
    deadline = time.monotonic() + 60
    while min(len(d.acked) for d in devs) < COUNT // 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert min(len(d.acked) for d in devs) >= COUNT // 4, "devices are not being acknowledged"
    provider = local_provider(local_settings(load_platform(Path(deployed["spec"]))))
    lose(provider)
    for d in devs:
        d.join(240)
    trust = TrustStore(m.ca_cert_pem)
    reader = m.secrets["influxdb_grafana_password"]

    def stored(device: str) -> set[int]:
        res = influx_query(p, hosts["n3"], trust.context(), "iotplat-grafana", reader,
                           f"SELECT seq FROM telemetry WHERE device = '{device}' AND time >= {base_ms}ms")
        return {int(v[1]) for s in res["results"][0].get("series", []) for v in s["values"]}

    try:
        deadline = time.monotonic() + 120
        missing: dict[str, list[int]] = {}
        while time.monotonic() < deadline:
            missing = {d.device: sorted(d.acked - stored(d.device)) for d in devs}
            if not any(missing.values()):
                break
            time.sleep(2)
    finally:
        trust.close()
    assert all(len(d.acked) == COUNT for d in devs), {d.device: len(d.acked) for d in devs}
    assert not any(missing.values()), {k: (len(v), v[:10]) for k, v in missing.items()}
    print(f"{first}: {sum(len(d.acked) for d in devs)} acknowledged, all in InfluxDB; hosts used: "  # figures
          + "; ".join(f"{d.device} {d.used}" for d in devs), file=sys.stderr)  # (stdout is the CLI's JSON)
    return devs, provider


def test_02_a_stopped_node_loses_no_acknowledged_message(deployed: dict, capfd) -> None:
    hosts = deployed["hosts"]
    devs, provider = _under_load(deployed, "n1", lambda prov: prov.exec("n1", ["systemctl", "stop", "nats-server"]))
    for d in devs:
        assert hosts["n1"] in d.used and len(d.used) >= 2, d.used  # moved to another node
    code, out, err = run_cli(capfd, "status", deployed["spec"], "--out", deployed["build"], "--json")
    assert code == 1, (out + err)[-3000:]
    report = json.loads(out)
    failed = {(c["host"], c["name"]) for c in report["checks"] if not c["ok"]}
    assert ("n1", "nats node") in failed and ("n1", "unit nats-server") in failed, failed
    assert any(c["name"] == "canary" and c["ok"] for c in report["checks"]), "the canary uses another node"
    provider.exec("n1", ["systemctl", "start", "nats-server"])  # type: ignore[attr-defined]


def test_03_node_and_worker_killed_lose_no_acknowledged_message(deployed: dict, capfd) -> None:
    """kill -9 of the node the devices use (systemd restarts it: Restart=on-failure) and of worker replica 1
    at the same moment: the devices move on, replica 2 takes over replica 1's messages, nothing acknowledged lost."""
    deadline = time.monotonic() + 120
    while True:  # n1, started again by the last test, back in the cluster
        code, out, _ = run_cli(capfd, "status", deployed["spec"], "--out", deployed["build"], "--json")
        if code == 0 or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert code == 0, out[-3000:]
    hosts = deployed["hosts"]

    def kill(prov) -> None:
        prov.exec("n2", ["systemctl", "kill", "--signal=KILL", "nats-server"])
        prov.exec("n1", ["systemctl", "kill", "--signal=KILL", "iotplat-worker@1"])

    devs, _ = _under_load(deployed, "n2", kill)  # (a device may find n2 restarted before it tries another node)
    assert all(d.used[0] == hosts["n2"] for d in devs)
