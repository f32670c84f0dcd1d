"""Backup and restore on real throw-away hosts: deploy, store 10,000 messages, back up, destroy everything
(hosts, data and the state directory), restore onto fresh hosts: every row is back and an old device
credential still works; a tampered archive is refused before anything changes. Then the scheduled backups
of the spec's `backup` section: the timer runs on the host, retention keeps the newest, and a scheduled
InfluxDB backup restores with every row."""

from __future__ import annotations

import json
import shutil
import ssl
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

from iotplat.cli import main
from tests.deploy.conftest import local_platform, module_env, platform_materials
from tests.helpers import PLATFORM_DIR

pytestmark = [pytest.mark.hosts, pytest.mark.slow]
COUNT = 10_000


@pytest.fixture(scope="module")
def platform_dir(tmp_path_factory: pytest.TempPathFactory):
    def edit(spec: dict) -> None:
        spec["name"], spec["target"]["network"] = "bkp", "10.218.0.0/24"
        spec["backup"] = {"schedule": "hourly", "keep": 2}

    yield from local_platform(tmp_path_factory.mktemp("bk"), PLATFORM_DIR / "platform.yaml", edit, devices=["dev-a"])


@pytest.fixture(autouse=True)
def _env(isolated_state, platform_dir: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    module_env(platform_dir, monkeypatch)


def _materials(ctx: dict):
    p, m, _ = platform_materials(ctx)
    return p, m


def _count(p, m, address: str, ts0: int) -> int:
    from iotplat.verify.status import TrustStore, influx_query

    ca = TrustStore(m.ca_cert_pem)
    try:
        res = influx_query(p, address, ca.context(), "iotplat-grafana", m.secrets["influxdb_grafana_password"],
                           f"SELECT count(temperature) FROM telemetry WHERE device = 'dev-a' AND time >= {ts0}ms")
    finally:
        ca.close()
    series = res["results"][0].get("series")
    return series[0]["values"][0][1] if series else 0


def _publish(address: str, ca: str, password: str, ts0: int, n: int) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dev-a", protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    c.tls_set_context(ctx)
    c.username_pw_set("dev-a", password)
    c.max_inflight_messages_set(500)
    c.connect(address, 8883, keepalive=30)
    c.loop_start()
    infos = [c.publish("devices/dev-a/telemetry", json.dumps({"temperature": i, "ts": ts0 + i}), qos=1)
             for i in range(n)]
    for info in infos:
        info.wait_for_publish(timeout=60)
    c.loop_stop()
    c.disconnect()


def test_backup_destroy_restore(platform_dir: dict, capfd) -> None:
    ctx = platform_dir
    code = main(["up", ctx["spec"], "--out", ctx["build"], "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    address = json.loads(out)["hosts"]["core"]
    p, m = _materials(ctx)
    old_password = m.mqtt_users["dev-a"][0]
    ca = str(Path(ctx["build"]) / "hosts/core/etc/iotplat/tls/ca.crt")
    ts0 = int(time.time() * 1000) - COUNT - 60_000
    _publish(address, ca, old_password, ts0, COUNT)
    deadline = time.time() + 60
    while time.time() < deadline and _count(p, m, address, ts0) < COUNT:
        time.sleep(1)
    assert _count(p, m, address, ts0) == COUNT

    code = main(["backup", ctx["spec"], "--out", ctx["build"], "--to", str(ctx["dir"] / "backups"), "--json"])
    out, err = capfd.readouterr()
    assert code == 0, err[-3000:]
    archive = Path(json.loads(out)["archive"])
    assert archive.stat().st_mode & 0o777 == 0o600
    assert old_password.encode() not in archive.read_bytes()

    tampered = archive.with_name("tampered.iotplat-backup")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    code = main(["restore", ctx["spec"], "--out", ctx["build"], "--from", str(tampered), "--yes"])
    _, err = capfd.readouterr()
    assert code == 2 and "integrity check" in err

    assert main(["destroy", ctx["spec"], "--out", ctx["build"], "--yes", "--data"]) == 0
    shutil.rmtree(ctx["env"]["IOTPLAT_STATE_DIR"])  # a fresh controller: everything comes from the archive
    capfd.readouterr()

    code = main(["restore", ctx["spec"], "--out", ctx["build"], "--from", str(archive), "--yes", "--json"])
    out, err = capfd.readouterr()
    assert code == 0, (out + err)[-3000:]
    p, m = _materials(ctx)
    assert m.mqtt_users["dev-a"][0] == old_password
    assert _count(p, m, address, ts0) == COUNT
    _publish(address, ca, old_password, ts0 + COUNT, 10)  # the old credential still works
    deadline = time.time() + 30
    while time.time() < deadline and _count(p, m, address, ts0) < COUNT + 10:
        time.sleep(1)
    assert _count(p, m, address, ts0) == COUNT + 10


def test_scheduled_backups_on_the_host(platform_dir: dict) -> None:
    """Runs after the restore above (the platform holds COUNT + 10 rows). The service is started by hand three
    times instead of waiting for the hourly timer; the InfluxDB part of the newest backup is restored into a
    scratch database on the same server and counted."""
    from iotplat.deploy.targets import local_settings
    from iotplat.hosts import local_provider
    from iotplat.spec.platform_model import INFLUX_ADMIN_USER
    from iotplat.verify.status import TrustStore, influx_query

    ctx = platform_dir
    p, m = _materials(ctx)
    hosts = local_provider(local_settings(p))
    run = lambda *argv, timeout=120: hosts.exec("core", list(argv), timeout=timeout)  # noqa: E731
    assert run("systemctl", "is-active", "iotplat-backup.timer").stdout.strip() == "active"
    assert "hourly" in run("systemctl", "cat", "iotplat-backup.timer").stdout
    for _ in range(3):
        r = run("systemctl", "start", "iotplat-backup.service")
        assert r.returncode == 0, r.stderr + run("journalctl", "-u", "iotplat-backup", "-n", "20", "--no-pager").stdout
        time.sleep(1.1)  # one backup per second at most (the folder is the UTC second)
    kept = run("sh", "-c", "ls -1 /var/backups/iotplat").stdout.split()
    assert len(kept) == 2 and all(k.endswith("Z") for k in kept), kept
    newest = f"/var/backups/iotplat/{sorted(kept)[-1]}"
    check = run("sh", "-c", f"cd {newest} && sha256sum --check --strict SHA256SUMS")
    assert check.returncode == 0 and "mosquitto.db: OK" in check.stdout, check.stdout + check.stderr
    assert run("stat", "-c", "%a %U", "/var/backups/iotplat").stdout.split() == ["700", "root"]
    r = run("influxd", "restore", "-portable", "-db", p.influx_database, "-newdb", "scheduled_check",
            "-host", "127.0.0.1:8088", f"{newest}/influxdb")
    assert r.returncode == 0, r.stdout + r.stderr
    address = next(h.address for h in hosts.hosts() if h.name == "core")
    ca = TrustStore(m.ca_cert_pem)
    try:
        admin = (INFLUX_ADMIN_USER, m.secrets["influxdb_admin_password"])
        res = influx_query(p, address, ca.context(), *admin, "SELECT count(temperature) FROM "
                           f'"scheduled_check"."{p.influx_retention_policy}".telemetry WHERE device = \'dev-a\'')
        influx_query(p, address, ca.context(), *admin, 'DROP DATABASE "scheduled_check"', method="POST")
    finally:
        ca.close()
    assert res["results"][0]["series"][0]["values"][0][1] == COUNT + 10


def test_removing_the_schedule_removes_the_timer_but_keeps_the_backups(platform_dir: dict, capfd) -> None:
    from iotplat.deploy.targets import local_settings
    from iotplat.hosts import local_provider

    ctx = platform_dir
    spec = yaml.safe_load(Path(ctx["spec"]).read_text())
    del spec["backup"]
    Path(ctx["spec"]).write_text(yaml.safe_dump(spec, sort_keys=False))
    code = main(["up", ctx["spec"], "--out", ctx["build"], "--no-verify", "--json"])
    out, err = capfd.readouterr()
    assert code == 0, (out + err)[-3000:]
    p, _ = _materials(ctx)
    hosts = local_provider(local_settings(p))
    gone = hosts.exec("core", ["sh", "-c", "ls /etc/systemd/system/iotplat-backup.* /usr/local/sbin/iotplat-backup "
                                           "/etc/ansible/facts.d/iotplat_backup.fact 2>/dev/null | wc -l"])
    assert gone.stdout.strip() == "0"
    assert hosts.exec("core", ["systemctl", "is-active", "iotplat-backup.timer"]).stdout.strip() == "inactive"
    assert len(hosts.exec("core", ["ls", "-1", "/var/backups/iotplat"]).stdout.split()) == 2  # taken backups stay
    code = main(["up", ctx["spec"], "--out", ctx["build"], "--no-verify", "--json"])
    out, err = capfd.readouterr()
    assert code == 0 and json.loads(out)["changed"] == 0, (out + err)[-3000:]  # nothing left to remove
