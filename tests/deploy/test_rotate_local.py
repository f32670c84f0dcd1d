"""`iotplat rotate` on real throw-away hosts (one systemd-nspawn host with all services, two worker replicas).

- the broker's certificate and then the service credentials (the worker's InfluxDB password, Grafana's reader,
  the InfluxDB admin) are rotated while a device publishes at a steady rate and another one keeps
  connecting: every message sent is in InfluxDB, exactly once, the broker never restarts and every connect
  succeeds; the worker replicas restart one at a time;
- a device whose credential is reissued is refused with its old password at its next connect and gets in
  with the new one from its kit; a revoked device is refused; the other devices stay connected;
- a CA rotation: during the overlap devices with the old ca.crt and devices with the new kit (bundle) both
  connect; after --finish the servers use the new CA and the old ca.crt no longer verifies them.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509

from tests.deploy.conftest import local_platform, module_env, mqtt_connect, platform_materials, run_cli
from tests.helpers import PLATFORM_DIR
from tests.support.mqttload import LoadPublisher

pytestmark = [pytest.mark.hosts, pytest.mark.slow]
NETWORK = "10.219.0.0/24"
RATE = 20  # messages/s from the publishing device
MAX_MESSAGES = 20_000  # bounds the publisher (1000 s at RATE) even if a rotation hangs


@pytest.fixture(scope="module")
def rot(tmp_path_factory: pytest.TempPathFactory):
    def edit(spec: dict) -> None:
        spec["name"], spec["target"]["network"] = "rot", NETWORK
        spec["ingestion"]["replicas"] = 2

    yield from local_platform(tmp_path_factory.mktemp("rot"), PLATFORM_DIR / "platform.yaml", edit,
                              devices=["dev-a", "dev-b", "dev-c", "dev-d"])


@pytest.fixture(autouse=True)
def _env(isolated_state, rot: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    module_env(rot, monkeypatch)


def _materials(ctx: dict):
    p, m, st = platform_materials(ctx)
    st.save()
    return p, m


def _provider(ctx: dict):
    from iotplat.deploy.targets import local_settings
    from iotplat.hosts import local_provider
    from iotplat.spec.load import load_platform

    return local_provider(local_settings(load_platform(Path(ctx["spec"]))))


def _ca_file(ctx: dict, pem: str, name: str) -> str:
    path = ctx["dir"] / name
    path.write_text(pem)
    return str(path)


def _accepted(seen: dict) -> bool:
    rc = seen["rc"]
    return rc is not None and not isinstance(rc, Exception) and not rc.is_failure


def _try(addr: str, ca_file: str, user: str, password: str) -> bool:
    c, seen = mqtt_connect(addr, ca_file, user, password, protocol=mqtt.MQTTv311)
    ok = _accepted(seen)
    c.loop_stop()
    c.disconnect()
    return ok


def _server_cert(addr: str, name: str, ca_file: str) -> x509.Certificate:
    """The broker's certificate, verified (chain and name) against ca_file; raises ssl.SSLError if it does not."""
    ctx = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection((addr, 8883), timeout=10) as s, ctx.wrap_socket(s, server_hostname=name) as t:
        return x509.load_der_x509_certificate(t.getpeercert(binary_form=True))


def _count(p, m, addr: str, ts0: int, n: int) -> int:
    from iotplat.verify.status import TrustStore, influx_query

    ca = TrustStore(m.ca_cert_pem)
    try:
        res = influx_query(p, addr, ca.context(), "iotplat-grafana", m.secrets["influxdb_grafana_password"],
                           f"SELECT count(temperature) FROM telemetry WHERE device = 'dev-a' "
                           f"AND time >= {ts0}ms AND time < {ts0 + n}ms")
    finally:
        ca.close()
    series = res["results"][0].get("series")
    return series[0]["values"][0][1] if series else 0


def _influx_auth(p, m, addr: str, user: str, password: str) -> int:
    from iotplat.verify.status import TrustStore, influx_query

    ca = TrustStore(m.ca_cert_pem)
    try:
        influx_query(p, addr, ca.context(), user, password, "SHOW MEASUREMENTS")
        return 200
    except RuntimeError as exc:
        return int(str(exc).split()[2].rstrip(":"))
    finally:
        ca.close()


def _broker_pid(ctx: dict) -> int:
    return int(_provider(ctx).exec("core", ["systemctl", "show", "-p", "MainPID", "--value", "mosquitto"]).stdout)


def _active_since(ctx: dict, unit: str) -> int:
    out = _provider(ctx).exec("core", ["systemctl", "show", "-p", "ActiveEnterTimestampMonotonic", "--value", unit])
    return int(out.stdout.strip() or 0)


def _now_monotonic_us(ctx: dict) -> int:
    # the container shares the machine's monotonic clock
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)


def test_01_up(rot: dict, capfd) -> None:
    code, out, err = run_cli(capfd, "up", rot["spec"], "--out", rot["build"], "--json")
    assert code == 0, (out + err)[-3000:]
    result = json.loads(out)
    assert result["ok"] is True
    rot["addr"] = result["hosts"]["core"]


def test_02_rotate_broker_cert_and_worker_credentials_under_load(rot: dict, capfd) -> None:
    p, before = _materials(rot)
    addr = rot["addr"]
    name = p.service_name("broker")
    ca = _ca_file(rot, before.ca_cert_pem, "ca-before.crt")
    cert_before = _server_cert(addr, name, ca)
    workers = [r.username for r in p.replicas]
    assert len(workers) == 2
    broker_pid = _broker_pid(rot)

    # a device publishing at a steady rate, QoS 1, persistent session, re-sending unacknowledged messages
    stop = threading.Event()
    ts0 = int(time.time() * 1000) - 3_600_000  # one ms per message, an hour back: unique points
    pub = LoadPublisher(8883, "dev-a", before.mqtt_users["dev-a"][0], client_id="dev-a", ca_file=ca, window=500,
                        host=addr, tls_name=name)
    published: dict = {}

    def messages():
        for i in range(MAX_MESSAGES):
            if stop.is_set():
                return
            yield "devices/dev-a/telemetry", json.dumps({"ts": ts0 + i, "temperature": float(i)}).encode()

    def publish() -> None:
        try:
            published["count"] = pub.publish_all(messages(), rate=RATE, timeout=1200)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            published["error"] = repr(exc)

    # a device that connects again and again (a fresh connection every second)
    attempts: list[tuple[float, bool]] = []

    def reconnect_loop() -> None:
        for _ in range(2000):
            if stop.is_set():
                return
            attempts.append((time.time(), _try(addr, ca, "dev-b", before.mqtt_users["dev-b"][0])))
            time.sleep(1)

    threads = [threading.Thread(target=publish, daemon=True), threading.Thread(target=reconnect_loop, daemon=True)]
    for t in threads:
        t.start()
    time.sleep(10)
    t_certs = time.time()
    code, out, err = run_cli(capfd, "rotate", "certs", rot["spec"], "--out", rot["build"], "--json")
    assert code == 0, (out + err)[-3000:]
    certs = json.loads(out)
    assert certs["ok"] is True and certs["renewed"] == ["core"]
    time.sleep(5)
    t_secrets = time.time()
    restart_mark = _now_monotonic_us(rot)
    code, out, err = run_cli(capfd, "rotate", "secrets", rot["spec"], "--out", rot["build"], "--json")
    assert code == 0, (out + err)[-3000:]
    secrets = json.loads(out)
    assert secrets["ok"] is True
    assert sorted(secrets["rotated"]) == ["influxdb_admin_password", "influxdb_grafana_password",
                                          "influxdb_worker_password"]
    assert [w["replica"] for w in secrets["workers_restarted"]] == [1, 2]
    time.sleep(10)
    t_stop = time.time()
    stop.set()
    for t in threads:
        t.join(300)
    assert "error" not in published, published
    sent = published["count"]
    pub.disconnect()

    p, after = _materials(rot)
    deadline = time.time() + 180
    stored = _count(p, after, addr, ts0, sent)
    while stored < sent and time.time() < deadline:
        time.sleep(2)
        stored = _count(p, after, addr, ts0, sent)
    after_certs = [ok for t, ok in attempts if t > t_secrets]
    after_all = [ok for t, ok in attempts if t > t_stop - 10]
    figures = {"sent": sent, "stored": stored, "seconds": round(t_stop - t_certs, 1),
               "publisher_reconnects": pub.reconnects, "connect_attempts": len(attempts),
               "connects_refused": sum(1 for _, ok in attempts if not ok),
               "rotate_certs_s": certs["seconds"], "rotate_secrets_s": secrets["seconds"]}
    with capfd.disabled():
        print("\nrotation under load:", json.dumps(figures))
    assert sent >= RATE * 60, figures  # at least a minute of traffic went through the rotations
    assert stored == sent, figures  # 0 messages lost (and none counted twice: one point per ts)
    assert _broker_pid(rot) == broker_pid  # new certificate by reload: the broker never restarted
    assert pub.reconnects == 0, figures
    assert after_certs and after_all and all(ok for _, ok in attempts), figures  # every connect succeeded

    # the broker serves a new certificate (new key) from the same CA, verified by name
    cert_after = _server_cert(addr, name, ca)
    assert cert_after.serial_number != cert_before.serial_number
    assert cert_after.public_key().public_numbers() != cert_before.public_key().public_numbers()
    # every InfluxDB credential changed: the old ones are refused, the new ones work; the workers' MQTT
    # passwords are left alone (see MQTT_WORKER_NOTE in iotplat/deploy/rotate.py)
    assert all(after.mqtt_users[u] == before.mqtt_users[u] for u in workers)
    for secret, user in (("influxdb_worker_password", "iotplat-worker"), ("influxdb_grafana_password", "iotplat-grafana"),
                         ("influxdb_admin_password", "iotplat-admin")):
        assert after.secrets[secret] != before.secrets[secret]
        old_status = _influx_auth(p, after, addr, user, before.secrets[secret])
        new_status = _influx_auth(p, after, addr, user, after.secrets[secret])
        # 401: wrong password; the worker's user may only write, so its query is 403 once it authenticates
        assert (old_status, new_status) == (401, 403 if user == "iotplat-worker" else 200), user
    # both replicas were restarted by `rotate secrets`, one after the other
    started = [_active_since(rot, f"iotplat-worker@{n}") for n in (1, 2)]
    assert all(s > restart_mark for s in started) and started[1] - started[0] >= 1_000_000, started
    # and the platform is healthy with the new credentials
    code, out, err = run_cli(capfd, "status", rot["spec"], "--out", rot["build"], "--json")
    assert code == 0, out[-3000:]


def test_03_reissued_and_revoked_devices_are_refused_others_unaffected(rot: dict, capfd) -> None:
    p, before = _materials(rot)
    addr = rot["addr"]
    ca = _ca_file(rot, before.ca_cert_pem, "ca.crt")
    bystander, seen_b = mqtt_connect(addr, ca, "dev-b", before.mqtt_users["dev-b"][0], protocol=mqtt.MQTTv311)
    assert _accepted(seen_b)
    old_c = before.mqtt_users["dev-c"][0]
    broker_pid = _broker_pid(rot)
    # dev-c leaves a persistent session behind (offline): the case that made Mosquitto 2.0.11 abort
    c, seen = mqtt_connect(addr, ca, "dev-c", old_c, protocol=mqtt.MQTTv311, clean=False)
    assert _accepted(seen)
    c.loop_stop()
    c.disconnect()

    code, out, err = run_cli(capfd, "rotate", "device", "dev-c", rot["spec"], "--out", rot["build"], "--json")
    assert code == 0, (out + err)[-3000:]
    result = json.loads(out)
    assert result["session_ended"] is True
    assert any(f"iotplat device kit dev-c {rot['spec']}" in line for line in result["lines"])
    code, out, err = run_cli(capfd, "device", "kit", "dev-c", rot["spec"], "--json")
    assert code == 0, err
    new_c = json.loads(out)["password"]
    assert new_c != old_c
    assert not _try(addr, ca, "dev-c", old_c)  # refused at its next connect
    assert _try(addr, ca, "dev-c", new_c)
    assert _try(addr, ca, "dev-a", before.mqtt_users["dev-a"][0])  # others unaffected
    assert bystander.is_connected() and seen_b["disconnects"] == 0
    time.sleep(3)
    assert _try(addr, ca, "dev-c", new_c) and _broker_pid(rot) == broker_pid  # the broker is still the same

    old_d = before.mqtt_users["dev-d"][0]
    assert _try(addr, ca, "dev-d", old_d)
    code, out, err = run_cli(capfd, "device", "revoke", "dev-d", rot["spec"])
    assert code == 0, err
    code, out, err = run_cli(capfd, "up", rot["spec"], "--out", rot["build"], "--no-verify")
    assert code == 0, (out + err)[-3000:]
    assert not _try(addr, ca, "dev-d", old_d)  # revoked: refused at its next connect
    # (not dev-b itself: a second connection with its client id would take its session over)
    assert _try(addr, ca, "dev-c", new_c) and _try(addr, ca, "dev-a", before.mqtt_users["dev-a"][0])
    assert bystander.is_connected() and seen_b["disconnects"] == 0
    bystander.loop_stop()
    bystander.disconnect()


def test_04_ca_rotation_with_overlap(rot: dict, capfd) -> None:
    p, before = _materials(rot)
    addr = rot["addr"]
    name = p.service_name("broker")
    old_ca = _ca_file(rot, before.ca_cert_pem, "ca-old.crt")
    dev_a = before.mqtt_users["dev-a"][0]

    code, out, err = run_cli(capfd, "rotate", "certs", "--ca", rot["spec"], "--out", rot["build"], "--json")
    assert code == 0, (out + err)[-3000:]
    assert json.loads(out)["ok"] is True
    on_host = _provider(rot).exec("core", ["cat", "/etc/iotplat/tls/ca.crt"]).stdout
    bundle = x509.load_pem_x509_certificates(on_host.encode())
    assert len(bundle) == 2 and bundle[0] == x509.load_pem_x509_certificate(before.ca_cert_pem.encode())
    code, out, err = run_cli(capfd, "device", "kit", "dev-a", rot["spec"], "--json")
    assert code == 0, err
    kit_ca = _ca_file(rot, json.loads(out)["ca_cert"], "ca-kit.crt")
    assert x509.load_pem_x509_certificates(Path(kit_ca).read_bytes()) == bundle
    # overlap: the broker still has its old-CA certificate; old and new kits both verify it and connect
    _server_cert(addr, name, old_ca)
    _server_cert(addr, name, kit_ca)
    assert _try(addr, old_ca, "dev-a", dev_a) and _try(addr, kit_ca, "dev-a", dev_a)
    code, out, err = run_cli(capfd, "status", rot["spec"], "--out", rot["build"], "--json")
    assert code == 0, out[-3000:]
    assert any(c["name"] == "CA rotation" for c in json.loads(out)["checks"])

    code, out, err = run_cli(capfd, "rotate", "certs", "--ca", "--finish", rot["spec"], "--out", rot["build"], "--json")
    assert code == 0, (out + err)[-3000:]
    assert json.loads(out)["ok"] is True
    on_host = _provider(rot).exec("core", ["cat", "/etc/iotplat/tls/ca.crt"]).stdout
    assert x509.load_pem_x509_certificates(on_host.encode()) == [bundle[1]]
    new_ca = _ca_file(rot, on_host, "ca-new.crt")
    served = _server_cert(addr, name, new_ca)  # issued by the new CA, verified by name
    assert served.issuer == bundle[1].subject
    assert _try(addr, kit_ca, "dev-a", dev_a) and _try(addr, new_ca, "dev-a", dev_a)
    with pytest.raises(ssl.SSLCertVerificationError):
        _server_cert(addr, name, old_ca)  # the old CA is not trusted for anything any more
    assert not _try(addr, old_ca, "dev-a", dev_a)
    code, out, err = run_cli(capfd, "status", rot["spec"], "--out", rot["build"], "--json")
    assert code == 0, out[-3000:]
    # what rotate deployed is exactly what `up` would: a following up changes nothing, restarts nothing
    broker_pid = _broker_pid(rot)
    code, out, err = run_cli(capfd, "up", rot["spec"], "--out", rot["build"], "--json", "--no-verify")
    assert code == 0, (out + err)[-3000:]
    assert json.loads(out)["changed"] == 0, json.loads(out)["recap"]
    assert _broker_pid(rot) == broker_pid
