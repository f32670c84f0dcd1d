"""The roles, deployed for real: platform/examples/local (edge: broker + worker, tsdb: InfluxDB, dash:
Grafana) onto three throw-away local hosts, with the exact ansible-playbook invocation of `iotplat up`.

One module-scoped deployment; the tests run in file order and build on each other (first run, InfluxDB rights, a
device message end to end, firewall, drift, rollback, reboot). Budget ~6 min. That a second run changes nothing is
tests/deploy/test_up_local.py::test_03's (the same example and playbook, through `iotplat up`), the second run of the
rollback test here converges, and bare metal, containers and the clouds have their own no-change runs.
"""

from __future__ import annotations

import base64
import functools
import json
import shutil
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

import paho.mqtt.client as mqtt
import pytest

from iotplat.hosts import sysutil
from tests.helpers import EXAMPLES
from tests.roles.conftest import Deployment, new_deployment

pytestmark = [pytest.mark.hosts, pytest.mark.slow]
INSTANCE = "pytest-roles"
SERVICES = {"edge": ["mosquitto", "iotplat-worker@1", "iotplat-worker@2"], "tsdb": ["influxdb"]}


@pytest.fixture(scope="module")
def dep(wheelhouse) -> Deployment:
    from tests.roles.conftest import why_not_runnable

    reason = why_not_runnable()
    if reason:
        pytest.skip(reason)
    d = new_deployment(EXAMPLES / "local" / "platform.yaml", INSTANCE, wheelhouse)
    try:
        d.render()
        d.write_secrets()
        d.up()
        d.plan_fresh = d.playbook("--check", "--diff")  # `iotplat plan` before the first `up`
        d.first = d.playbook()
        yield d
    finally:
        d.down()
        shutil.rmtree(d.work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- helpers
def active(d: Deployment, host: str, unit: str) -> str:
    return d.exec(host, ["systemctl", "is-active", unit]).stdout.strip()


def wait_active(d: Deployment, host: str, units: list[str], timeout: float = 45) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        states = {u: active(d, host, u) for u in units}
        if all(s == "active" for s in states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(1)


def influx(d: Deployment, q: str, user: str | None, password: str | None, *, write: str | None = None,
           method: str = "POST") -> tuple[int, dict | str]:
    """An InfluxDB 1.x API call from the controller over HTTPS, trusting only the platform CA."""
    ctx = ssl.create_default_context(cafile=str(d.build / "hosts/tsdb/etc/iotplat/tls/ca.crt"))
    ctx.check_hostname = False  # the certificate names tsdb.iotplat.internal; we dial its address
    base = f"https://{d.hosts['tsdb'].address}:8086"
    if write is not None:
        url, body = f"{base}/write?db=iot&rp=iotplat&precision=ms", write.encode()
    else:
        url, body = f"{base}/query?db=iot", urllib.parse.urlencode({"q": q}).encode()
    req = urllib.request.Request(url, data=body, method=method)
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            raw = resp.read().decode()
            return resp.status, (json.loads(raw) if raw else "")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def query_error(result: tuple[int, dict | str]) -> bool:
    status, body = result
    return status != 200 or any("error" in r for r in body.get("results", [])) or "error" in body


tcp_open = functools.partial(sysutil.tcp_open, timeout=2.0)  # the hosts package's probe, 2 s per try


# ---------------------------------------------------------------------------------------------- tests
def test_check_mode_on_fresh_hosts_plans_without_failing_or_changing(dep: Deployment) -> None:
    run = dep.plan_fresh
    assert run.returncode == 0 and run.total("failed") == 0 and run.total("ignored") == 0, run.tail()
    assert run.total("changed") > 0  # it does report what `up` would do
    leaked = [v[:6] + "..." for v in _secret_values(dep) if v in run.output]
    assert not leaked, f"secrets in the --check --diff output: {leaked}"


def test_first_run_deploys_the_platform(dep: Deployment) -> None:
    run = dep.first
    assert run.returncode == 0 and run.total("failed") == 0 and run.total("unreachable") == 0, run.tail()
    assert wait_active(dep, "edge", ["mosquitto"]) == {"mosquitto": "active"}
    assert wait_active(dep, "tsdb", ["influxdb"]) == {"influxdb": "active"}
    workers = wait_active(dep, "edge", SERVICES["edge"][1:])
    assert set(workers.values()) == {"active"}, workers
    # Grafana cannot be installed here; grafana.required is false, so it is skipped, visibly, with why
    assert "Grafana skipped on dash:" in run.output and "apt.grafana.com" in run.output, run.tail()
    # persistence directory verified by the role (SIGUSR1 -> mosquitto.db written by user mosquitto)
    owner = dep.exec("edge", ["stat", "-c", "%U", "/var/lib/mosquitto/mosquitto.db"]).stdout.strip()
    assert owner == "mosquitto"
    # the first run changes the configuration (restart) and the password file (reload): the broker restarts and is
    # not reloaded after it. A SIGHUP right after a start re-queues every session restored from mosquitto.db for
    # expiry, which corrupts 2.0.15-2.0.22's expiry list (roles/mosquitto/handlers/main.yml says how)
    journal = dep.exec("edge", ["journalctl", "--unit=mosquitto", "--output=cat", "--no-pager"]).stdout
    assert "Reloading config" not in journal and " running" in journal, journal[-3000:]
    # one descriptor per device connection: Debian's unit alone leaves systemd's soft limit of 1,024 (~1,017 devices).
    # systemd grants LimitNOFILE up to its own hard limit: a test host inherits this machine's (20,000 here), a
    # real server's PID 1 has 524,288 or more
    limits = dep.exec("edge", ["sh", "-c", "grep -h '^Max open files' /proc/1/limits /proc/$(systemctl show -p "
                                           "MainPID --value mosquitto)/limits"]).stdout.splitlines()
    pid1_hard, broker = int(limits[0].split()[4]), limits[1].split()[3:5]
    expected = str(min(65536, pid1_hard))
    assert broker == [expected, expected], limits
    # secrets: root-only on disk, handed to InfluxDB as a systemd credential
    modes = dep.exec("tsdb", ["stat", "-c", "%a %U", "/etc/iotplat/credentials/influxdb/admin-password",
                              "/run/credentials/influxdb.service/server.key"]).stdout.split("\n")
    assert modes[0] == "600 root" and modes[1] == "400 influxdb", modes


def test_influxdb_users_have_least_privilege(dep: Deployment) -> None:
    worker = ("iotplat-worker", dep.secret("influxdb_worker_password"))
    grafana = ("iotplat-grafana", dep.secret("influxdb_grafana_password"))
    point = f"rights_probe value=1 {int(time.time() * 1000)}"
    assert influx(dep, "", *worker, write=point)[0] == 204, "the worker cannot write"
    assert query_error(influx(dep, "SELECT * FROM rights_probe", *worker)), "the worker can read"
    assert not query_error(influx(dep, "SELECT * FROM rights_probe", *grafana)), "grafana cannot read"
    assert influx(dep, "", *grafana, write=point)[0] in (401, 403), "grafana can write"
    assert influx(dep, "SHOW DATABASES", None, None)[0] == 401, "anonymous queries are answered"
    assert influx(dep, "", None, None, write=point)[0] == 401, "anonymous writes are accepted"
    status, body = influx(dep, "SHOW USERS", "iotplat-admin", dep.secret("influxdb_admin_password"))
    users = dict(body["results"][0]["series"][0]["values"])
    assert users == {"iotplat-admin": True, "iotplat-worker": False, "iotplat-grafana": False}
    status, body = influx(dep, "SHOW RETENTION POLICIES ON iot", "iotplat-admin",
                          dep.secret("influxdb_admin_password"))
    rps = {r[0]: r for r in body["results"][0]["series"][0]["values"]}
    assert rps["iotplat"][1] == "720h0m0s" and rps["iotplat"][4] is True, rps


def test_a_device_message_reaches_influxdb(dep: Deployment) -> None:
    device = dep.platform.canary.id
    seen: dict = {"rc": None, "published": False}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(cafile=str(dep.build / "hosts/edge/etc/iotplat/tls/ca.crt"))
    ctx.check_hostname = False  # certificate names broker.iotplat.internal; we dial the address
    c.tls_set_context(ctx)
    c.username_pw_set(device, dep.materials.mqtt_users[device][0])
    c.on_connect = lambda cl, ud, flags, rc, props=None: seen.__setitem__("rc", rc)
    c.on_publish = lambda cl, ud, mid, rc, props=None: seen.__setitem__("published", True)
    c.connect(dep.hosts["edge"].address, 8883, keepalive=30)
    c.loop_start()
    value = round(20 + (time.time() % 1000) / 1000, 3)
    try:
        deadline = time.monotonic() + 10
        while seen["rc"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen["rc"] is not None and not seen["rc"].is_failure, f"connect: {seen['rc']}"
        payload = json.dumps({"ts": int(time.time() * 1000), "temperature": value, "humidity": 41.0})
        c.publish(f"devices/{device}/telemetry", payload, qos=1).wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()
    admin = ("iotplat-admin", dep.secret("influxdb_admin_password"))
    deadline = time.monotonic() + 20
    rows = []
    while time.monotonic() < deadline:
        status, body = influx(dep, 'SELECT * FROM "iotplat"."telemetry" ORDER BY time DESC LIMIT 20', *admin)
        series = body.get("results", [{}])[0].get("series", []) if isinstance(body, dict) else []
        rows = [dict(zip(s["columns"], v)) for s in series for v in s["values"]]
        if any(r.get("temperature") == value for r in rows):
            break
        time.sleep(0.5)
    assert any(r.get("temperature") == value for r in rows), f"not in InfluxDB: {value}; rows: {rows[:3]}"


def test_firewall_opens_only_ssh_and_the_ingress_ports(dep: Deployment) -> None:
    """The role loads its ruleset on the hosts (they have CAP_NET_ADMIN in their own network namespace, as a server
    has): a listener on a port outside iotplat_ingress is unreachable, the declared ports and SSH are open, and the
    platform keeps working behind the rules."""
    assert "Firewall not applied" not in dep.first.output
    edge, tsdb = dep.hosts["edge"].address, dep.hosts["tsdb"].address
    for host in ("edge", "tsdb"):
        table = dep.exec(host, ["nft", "list", "table", "inet", "iotplat"])
        assert table.returncode == 0 and "policy drop" in table.stdout, table.stderr
        # a listener on a port that is NOT in iotplat_ingress (1883 on edge, 9999 on tsdb)
        port = 1883 if host == "edge" else 9999
        dep.exec(host, ["sh", "-c", f"setsid python3 -m http.server {port} >/dev/null 2>&1 < /dev/null &"])
    try:
        deadline = time.monotonic() + 10
        listening = {}
        while time.monotonic() < deadline and len(listening) < 2:  # the control: the listeners run
            for host, port in (("edge", 1883), ("tsdb", 9999)):
                if f":{port} " in dep.exec(host, ["ss", "-ltnH"]).stdout:
                    listening[host] = port
            time.sleep(0.2)
        assert listening == {"edge": 1883, "tsdb": 9999}
        assert not tcp_open(edge, 1883), "1883 on edge is not in iotplat_ingress but reachable"
        assert not tcp_open(tsdb, 9999), "9999 on tsdb is not in iotplat_ingress but reachable"
        assert tcp_open(edge, 8883) and tcp_open(tsdb, 8086) and tcp_open(edge, 22)
        # the platform keeps working behind the rules (worker -> broker, worker -> InfluxDB)
        out = dep.exec("edge", ["python3", "-c", "import urllib.request as u;"
                                "print(u.urlopen('http://127.0.0.1:9464/healthz').read().decode())"]).stdout
        assert '"status": "ok"' in out, out
    finally:
        for host, port in (("edge", 1883), ("tsdb", 9999)):
            dep.exec(host, ["pkill", "-f", f"http.server {port}"])


def test_preflight_fails_early_when_a_vendor_repository_is_unreachable(dep: Deployment) -> None:
    """InfluxDB 2 and a required Grafana cannot be installed here: preflight must say why, change nothing."""
    tokens = dep.write_secrets(dep.work / "secrets-v2.yml",
                               extra=("influxdb_admin_token",))
    v2 = json.dumps({"influxdb_version": 2, "influxdb_package": {
        "source": "upstream", "versions": {"debian-12": "2.7.11-1", "debian-13": "2.7.11-1"}}})
    run = dep.playbook("--limit", "tsdb", "-e", v2, secrets_file=tokens)
    assert run.recap["tsdb"]["failed"] == 1 and run.recap["tsdb"]["changed"] == 0, run.tail()
    assert "InfluxDB 2 cannot be installed on tsdb: the signing key" in run.output, run.tail()
    assert active(dep, "tsdb", "influxdb") == "active"
    run = dep.playbook("--limit", "dash", "-e", json.dumps({"grafana_required": True}))
    assert run.recap["dash"]["failed"] == 1 and run.recap["dash"]["changed"] == 0, run.tail()
    assert "Grafana is required (grafana.required: true) but cannot be installed on dash" in run.output, run.tail()


def _secret_values(dep: Deployment) -> list[str]:
    m = dep.materials
    values = [pw for pw, _ in m.mqtt_users.values()] + list(m.secrets.values())
    values += [line for c in m.host_certs.values() for line in c.key_pem.splitlines() if "PRIVATE" not in line]
    return [v for v in values if len(v) >= 12]


def test_drift_is_reported_by_check_diff_without_secrets(dep: Deployment) -> None:
    conf = "/etc/mosquitto/mosquitto.conf"
    dep.exec("edge", ["sh", "-c", f"echo 'max_keepalive 9999  # hand edit' >> {conf}"])
    run = dep.playbook("--check", "--diff")
    assert run.returncode == 0, run.tail()
    assert run.recap["edge"]["changed"] > 0 and "hand edit" in run.output, run.tail()
    leaked = [v[:6] + "..." for v in _secret_values(dep) if v in run.output]
    assert not leaked, f"secrets in the --check --diff output: {leaked}"
    # check mode changed nothing on the host
    assert "hand edit" in dep.exec("edge", ["cat", conf]).stdout


def test_broken_config_is_rolled_back(dep: Deployment) -> None:
    """A config Mosquitto refuses: the previous one is restored, the broker runs again, the play fails
    naming the broker's reason. (Uses --limit edge to keep the test short.)"""
    rendered = dep.build / "hosts/edge/etc/mosquitto/mosquitto.conf"
    good = rendered.read_bytes()
    rendered.write_bytes(good + b"\nthis_is_not_an_option 1\n")
    try:
        run = dep.playbook("--limit", "edge")
    finally:
        rendered.write_bytes(good)
    assert run.returncode != 0 and run.recap["edge"]["failed"] == 1, run.tail()
    assert "Mosquitto did not start with the new configuration" in run.output, run.tail()
    assert "running again" in run.output and "this_is_not_an_option" in run.output, run.tail()
    assert active(dep, "edge", "mosquitto") == "active"
    on_host = dep.exec("edge", ["cat", "/etc/mosquitto/mosquitto.conf"]).stdout
    assert "this_is_not_an_option" not in on_host and "hand edit" in on_host  # the previous file is back
    # the next normal run converges (drift and all) and stays green (only edge has anything to do)
    run = dep.playbook("--limit", "edge")
    assert run.returncode == 0 and run.total("failed") == 0, run.tail()
    assert "hand edit" not in dep.exec("edge", ["cat", "/etc/mosquitto/mosquitto.conf"]).stdout


def test_services_come_back_after_a_reboot(dep: Deployment) -> None:
    for host in ("edge", "tsdb"):
        dep.provider.restart(host)
        age = int(dep.exec(host, ["ps", "-o", "etimes=", "-p", "1"]).stdout.strip())
        assert age < 60, f"{host} was not rebooted (PID 1 is {age} s old)"
    for host, units in SERVICES.items():
        states = wait_active(dep, host, units, timeout=60)
        assert set(states.values()) == {"active"}, f"{host}: {states}"
    out = dep.exec("edge", ["python3", "-c", "import urllib.request as u;"
                            "print(u.urlopen('http://127.0.0.1:9465/healthz').read().decode())"]).stdout
    assert '"status"' in out, out  # answering; "ok" once it has reconnected to broker and InfluxDB


def test_stale_replicas_are_stopped_and_their_credentials_removed(dep: Deployment) -> None:
    """One replica fewer on edge (as after lowering ingestion.replicas): iotplat-worker@2 is stopped,
    disabled and its credentials deleted; replica 1 keeps running."""
    run = dep.playbook("--limit", "edge", "-e", json.dumps({"worker_replicas": [1]}))
    assert run.returncode == 0, run.tail()
    assert active(dep, "edge", "iotplat-worker@2") != "active"
    assert dep.exec("edge", ["systemctl", "is-enabled", "iotplat-worker@2"]).stdout.strip() != "enabled"
    assert dep.exec("edge", ["test", "-e", "/etc/iotplat/credentials/worker-2"]).returncode == 1
    assert active(dep, "edge", "iotplat-worker@1") == "active"
