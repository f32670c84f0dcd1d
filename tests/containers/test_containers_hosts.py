"""The container runtime on real hosts: Debian 12 (docker.io 20.10) and Debian 13 (docker.io 26.1) nspawn hosts.

Stand-in images (tests/support/images.py: Debian packages under the upstream names) reach the hosts as verified
archives and run under the units iotplat writes, with the files iotplat renders. What this proves: archive
verification and loading, the units (create/start/wait, restart, reload, limits, capabilities, read-only root),
mounts of the rendered files and secrets, logs in the journal, TLS and ACLs through the container, the worker image
and an ingest through it into a real InfluxDB 1.6.7. What it cannot: the upstream images' own entrypoints, users
and versions (see tests/support/images.py), and Docker engines other than Debian's.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import ssl
import tarfile
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from iotplat.commands import render
from iotplat.containers.archive import ArchiveError, prepare_archive
from iotplat.containers.engine import engine_problem
from iotplat.containers.oci import Platform
from iotplat.containers.profiles import broker_service, influxdb1_service, worker_service
from iotplat.containers.units import ContainerService, container_unit
from iotplat.containers.worker_image import build_worker_image
from iotplat.deploy.wheelhouse import build_wheelhouse
from iotplat.render.layout import CREDENTIALS_DIR
from iotplat.secrets.materials import ensure_materials, secret_content
from iotplat.secrets.state import State
from iotplat.spec.load import load_platform
from tests.helpers import PLATFORM_DIR, use_private_state
from tests.support.images import stand_in

from .conftest import Lab

pytestmark = pytest.mark.hosts
HOSTS = ("c12", "c13")
GROUPS = {"mosquitto": 1883}
_container_ids: set[str] = set()


@pytest.fixture(scope="module")
def images(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> dict:
    started = time.monotonic()
    out = {k: stand_in(k) for k in ("mosquitto", "influxdb", "python")}
    wheelhouse = build_wheelhouse(Path.home() / ".cache" / "iotplat" / "wheelhouse")
    worker = build_worker_image(wheelhouse, out["python"].archive, out["python"].ref, Platform(),
                                lab.images_dir.parent / "worker")
    out["worker"] = worker
    out["load"] = {k: prepare_archive(out[k].archive, out[k].ref, Platform(), lab.images_dir)
                   for k in ("mosquitto", "influxdb")}
    out["load"]["worker"] = prepare_archive(worker.archive, worker.ref, Platform(), lab.images_dir)
    print(f"\nimages ready: {time.monotonic() - started:.1f} s")
    return out


@pytest.fixture(scope="module")
def platform(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default spec (one host `core` with every service) rendered by iotplat, its secrets from the state."""
    work = tmp_path_factory.mktemp("ctr-render")
    restore = use_private_state(work)
    try:
        spec = work / "platform.yaml"
        shutil.copy(PLATFORM_DIR / "platform.yaml", spec)
        shutil.copy(PLATFORM_DIR / "devices.csv", work / "devices.csv")
        out = work / "build"
        render(str(spec), None, out_dir=str(out))
        p = load_platform(spec)
        m = ensure_materials(p, State.open(work / "state", p.name, p.environment))
    finally:
        restore()
    manifest = json.loads((out / "manifest.json").read_text())
    files = []
    for f in manifest["files"]:
        if f["host"] != "core" or f["service"] not in ("broker", "influxdb", "worker", "common"):
            continue
        data = secret_content(f["secret"], m) if f["class"] == "secret" else (out / f["path"]).read_bytes()
        files.append((f, data))
    worker_conf = tomllib.loads((out / "hosts/core/etc/iotplat/worker.toml").read_text())
    names = {worker_conf["mqtt"]["host"], urllib.parse.urlsplit(worker_conf["influxdb"]["url"]).hostname}
    return {"platform": p, "materials": m, "files": files, "names": sorted(names), "worker_conf": worker_conf}


def install_files(lab: Lab, host: str, platform: dict, containers) -> None:  # noqa: ANN001
    """What the roles do for the container runtime: the rendered files at their paths, secrets root-only, the
    directories the containers use owned by their user ids."""
    lab.mkdir(host, CREDENTIALS_DIR, 0o700)
    for f, data in platform["files"]:
        gid = GROUPS.get(f["group"], 0)
        lab.put(host, f["dest"], data, int(f["mode"], 8), 0, gid)
    for c in containers:
        for own in c.owned:
            if "{instance}" in own.path:
                continue
            lab.mkdir(host, own.path, own.mode, own.uid, own.gid)
            for child in (lab.root(host) / own.path.lstrip("/")).iterdir():
                if child.is_file() and own.uid == 0:  # a secret directory: files readable by the container's group
                    os.chown(child, 0, own.gid)
                    os.chmod(child, 0o640)
    hosts = lab.root(host) / "etc/hosts"
    text = hosts.read_text()
    line = "127.0.0.1 " + " ".join(platform["names"]) + "\n"
    if line not in text:
        hosts.write_text(text + line)


def start_unit(lab: Lab, host: str, svc: ContainerService, instance: str = "") -> str:
    lab.put(host, f"/etc/systemd/system/{svc.unit}", container_unit(svc).encode())
    unit = svc.unit.replace("@.service", f"@{instance}.service") if instance else svc.unit
    lab.sh(host, f"systemctl daemon-reload && systemctl restart {unit}")
    name = svc.name.replace("{instance}", instance)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        proc = lab.sh(host, f"docker inspect --format '{{{{.Id}}}} {{{{.State.Running}}}}' {name}", check=False)
        if proc.returncode == 0 and proc.stdout.split()[1] == "true":
            _container_ids.add(proc.stdout.split()[0])
            return unit
        time.sleep(0.2)
    raise AssertionError(f"{host}: {unit} did not start: " + lab.sh(host, f"journalctl -u {unit} -n 30 --no-pager",
                                                                     check=False).stdout)


def wait_for(cond, timeout: float = 30, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out: {what}")


# --- the engine ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", HOSTS)
def test_engine_runs_without_touching_the_network(lab: Lab, host: str):
    info = lab.sh(host, "docker info --format '{{json .}}'").stdout
    assert engine_problem(info) is None
    data = json.loads(info)
    assert data["Driver"] == "overlay2", "the /var/lib/docker bind gives overlay2, not vfs"
    assert data["ServerVersion"].startswith({"c12": "20.10.", "c13": "26.1."}[host])
    assert data["LoggingDriver"] == "journald"
    nets = lab.sh(host, "docker network ls --format '{{.Name}}'").stdout.split()
    assert "bridge" not in nets and "host" in nets
    rules = lab.sh(host, "iptables-save 2>/dev/null; nft list ruleset 2>/dev/null; cat /proc/sys/net/ipv4/ip_forward",
                   check=False).stdout
    assert "DOCKER" not in rules and rules.strip().endswith("0")


# --- archives ------------------------------------------------------------------------------------------------


def test_a_wrong_archive_is_refused_before_anything_is_loaded(lab: Lab, images: dict, tmp_path: Path):
    mq = images["mosquitto"]
    # 1. a layer changed after the digest was pinned
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(mq.archive) as src, tarfile.open(tampered, "w") as dst:
        for member in src:
            data = src.extractfile(member).read() if member.isfile() else None
            if data is not None and len(data) > 1_000_000:  # the layer
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.addfile(member, None if data is None else io.BytesIO(data))
    # 2. a good archive of another image where the broker's is pinned
    before = sorted(p.name for p in lab.images_dir.iterdir())
    for archive, ref in ((tampered, mq.ref), (images["influxdb"].archive, mq.ref)):
        with pytest.raises(ArchiveError) as info:
            prepare_archive(archive, ref, Platform(), lab.images_dir)
        assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert sorted(p.name for p in lab.images_dir.iterdir()) == before, "nothing was written for the host"
    assert lab.sh("c12", f"docker image inspect {mq.ref.tagged}", check=False).returncode != 0, "nothing was loaded"


@pytest.mark.parametrize("host", HOSTS)
def test_verified_archives_load_and_show_the_verified_image(lab: Lab, images: dict, host: str):
    for key in ("mosquitto", "influxdb", "worker"):
        archive = images["load"][key]
        seconds = lab.load(host, archive)  # check_loaded: Id == the verified config digest, tagged, platform
        image = json.loads(lab.sh(host, f"docker image inspect {archive.image.image_id}").stdout)[0]
        assert image["Id"] == archive.image.config_digest
        print(f"{host}: loaded {key} in {seconds:.1f} s")


# --- the broker ----------------------------------------------------------------------------------------------


def _client(host_addr: str, ca: str, user: str, password: str) -> tuple[mqtt.Client, dict]:
    seen: dict = {"connect": None, "messages": [], "suback": None}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False  # the certificate names the service; we dial the host's address
    c.tls_set_context(ctx)
    c.username_pw_set(user, password)
    c.on_connect = lambda cl, ud, flags, rc, props=None: seen.__setitem__("connect", rc)
    c.on_message = lambda cl, ud, msg: seen["messages"].append((msg.topic, msg.payload))
    c.on_subscribe = lambda cl, ud, mid, rcs, props=None: seen.__setitem__("suback", rcs)
    c.connect(host_addr, 8883, keepalive=30)
    c.loop_start()
    wait_for(lambda: seen["connect"] is not None, 10, f"CONNACK from {host_addr}")
    return c, seen


@pytest.mark.parametrize("host", HOSTS)
def test_broker_container_serves_tls_with_the_rendered_acl(lab: Lab, images: dict, platform: dict, host: str,
                                                           tmp_path: Path):
    if (host, images["mosquitto"].ref.tagged) not in lab.loaded:
        lab.load(host, images["load"]["mosquitto"])
    broker = broker_service(images["load"]["mosquitto"].image.image_id, (8883,))
    install_files(lab, host, platform, [broker])
    unit = start_unit(lab, host, broker.unit)
    addr = lab.addresses[host]
    wait_for(lambda: lab.sh(host, "ss -ltn | grep -q ':8883 '", check=False).returncode == 0, 20, "listener 8883")
    m = platform["materials"]
    ca = tmp_path / "ca.crt"
    ca.write_text(m.ca_cert_pem)
    devices = sorted(u for u in m.mqtt_users if u.startswith("sensor-"))
    worker_user = next(u for u in m.mqtt_users if u.startswith("iotplat-worker"))
    sub, sub_seen = _client(addr, str(ca), worker_user, m.mqtt_users[worker_user][0])
    dev, dev_seen = _client(addr, str(ca), devices[0], m.mqtt_users[devices[0]][0])
    bad, bad_seen = _client(addr, str(ca), devices[1], "not-the-password-0123456789")
    try:
        assert sub_seen["connect"] == 0 and dev_seen["connect"] == 0
        assert bad_seen["connect"] != 0, "a wrong password is refused"
        sub.subscribe("devices/+/telemetry", qos=1)
        wait_for(lambda: sub_seen["suback"] is not None, 10, "SUBACK")
        dev.publish(f"devices/{devices[0]}/telemetry", b'{"ts": 1, "temperature": 20.5}', qos=1).wait_for_publish(5)
        dev.publish(f"devices/{devices[1]}/telemetry", b'{"ts": 2, "temperature": 99}', qos=1).wait_for_publish(5)
        wait_for(lambda: len(sub_seen["messages"]) >= 1, 10, "the device's own message")
        time.sleep(0.5)  # the forbidden publish would arrive within this; it must not
        topics = [t for t, _ in sub_seen["messages"]]
        assert topics == [f"devices/{devices[0]}/telemetry"], f"ACL: a device writes only its own topic: {topics}"
        dev.subscribe("devices/#", qos=1)  # Mosquitto answers SUBACK and then delivers nothing the ACL denies
        wait_for(lambda: dev_seen["suback"] is not None, 10, "device SUBACK")
        dev.publish(f"devices/{devices[0]}/telemetry", b'{"ts": 3}', qos=1).wait_for_publish(5)
        wait_for(lambda: len(sub_seen["messages"]) >= 2, 10, "the second message at the worker")
        time.sleep(0.5)
        assert dev_seen["messages"] == [], "devices read nothing, not even their own topic"
    finally:
        for c in (sub, dev, bad):
            c.loop_stop()
            c.disconnect()
    # the service's output is in the unit's journal (and docker logs), once
    journal = lab.sh(host, f"journalctl -u {unit} -o cat --no-pager").stdout
    assert journal.count("mosquitto version 2.0.11 running") == 1, journal[-2000:]
    assert "Opening ipv4 listen socket on port 8883" in journal
    assert lab.sh(host, "docker logs mosquitto 2>&1").stdout.count("mosquitto version 2.0.11 running") == 1
    # the broker dropped root to uid 1883, which owns its data; the root file system is read-only
    pid = lab.sh(host, "docker inspect -f '{{.State.Pid}}' mosquitto").stdout.strip()
    assert lab.sh(host, f"ps -o uid= --ppid {pid}; ps -o uid= -p {pid}").stdout.split()[0] in ("1883", "0")
    assert "1883" in lab.sh(host, "ps -eo uid,args | grep '[/]usr/sbin/mosquitto -c'").stdout
    cfg = json.loads(lab.sh(host, "docker inspect mosquitto").stdout)[0]["HostConfig"]
    assert cfg["ReadonlyRootfs"] and cfg["CapDrop"] == ["ALL"] and not cfg["Privileged"]
    assert sorted(cfg["CapAdd"]) == ["CAP_KILL", "CAP_SETGID", "CAP_SETUID"] or sorted(cfg["CapAdd"]) == [
        "KILL", "SETGID", "SETUID"]
    # a reload reaches Mosquitto through tini (SIGHUP: it re-reads the password file); a restart keeps the data
    lab.sh(host, f"systemctl reload {unit}")
    wait_for(lambda: "Reloading config" in lab.sh(host, f"journalctl -u {unit} -o cat --no-pager").stdout, 10,
             "SIGHUP reached mosquitto")
    lab.sh(host, f"systemctl restart {unit}")
    owner = lab.sh(host, "stat -c '%u:%g' /var/lib/mosquitto/mosquitto.db").stdout.strip()
    assert owner == "1883:1883", "persistence written by the container's user on shutdown"


# --- the worker image and an ingest through it -----------------------------------------------------------------


def test_worker_image_is_small_non_root_and_compiler_free(lab: Lab, images: dict):
    worker = images["worker"]
    host = "c12"
    if (host, worker.ref.tagged) not in lab.loaded:
        lab.load(host, images["load"]["worker"])
    image = json.loads(lab.sh(host, f"docker image inspect {worker.config_digest}").stdout)[0]
    print(f"\nworker image: {image['Size'] / 1e6:.1f} MB (built: {worker.size / 1e6:.1f} MB)")
    assert image["Size"] < 150_000_000
    assert image["Config"]["User"] == "10001:10001"
    found = lab.sh(host, f"docker run --rm --network none --entrypoint /bin/sh {worker.config_digest} -c "
                         "'id -u; for c in gcc cc g++ c++ clang make ld as; do command -v $c; done; true'").stdout.split()
    assert found == ["10001"], f"non-root and no compiler: {found}"
    # reproducible: the same wheelhouse and base give the same image
    again = build_worker_image(build_wheelhouse(Path.home() / ".cache" / "iotplat" / "wheelhouse"),
                               images["python"].archive, images["python"].ref, Platform(),
                               lab.images_dir.parent / "worker-again")
    assert (again.config_digest, again.ref.digest) == (worker.config_digest, worker.ref.digest)


def _influx(addr: str, ca: str, q: str, user: str, password: str, db: str = "") -> dict:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    params = {"q": q, **({"db": db} if db else {})}
    req = urllib.request.Request(f"https://{addr}:8086/query?" + urllib.parse.urlencode(params), method="POST")
    import base64

    req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        return json.loads(resp.read())


def test_worker_container_ingests_into_influxdb_in_a_container(lab: Lab, images: dict, platform: dict, tmp_path: Path):
    host = "c12"
    for key in ("mosquitto", "influxdb", "worker"):
        if (host, images[key].ref.tagged if key != "worker" else images["worker"].ref.tagged) not in lab.loaded:
            lab.load(host, images["load"][key])
    broker = broker_service(images["load"]["mosquitto"].image.image_id, (8883,))
    influx = influxdb1_service(images["load"]["influxdb"].image.image_id, 8086)
    worker = worker_service(images["worker"].config_digest, 9464)
    install_files(lab, host, platform, [broker, influx, worker])
    for r in (1,):  # the replica's own directories ({instance} = 1)
        for own in worker.owned:
            lab.mkdir(host, own.path.replace("{instance}", str(r)), own.mode, own.uid, own.gid)
        cred = lab.root(host) / f"{CREDENTIALS_DIR.lstrip('/')}/worker-{r}"
        for child in cred.iterdir():
            os.chown(child, 0, 10001)
            os.chmod(child, 0o640)
    if lab.sh(host, "systemctl is-active mosquitto.service", check=False).stdout.strip() != "active":
        start_unit(lab, host, broker.unit)
    start_unit(lab, host, influx.unit)
    addr, m, p = lab.addresses[host], platform["materials"], platform["platform"]
    ca = tmp_path / "ca.crt"
    ca.write_text(m.ca_cert_pem)
    admin, apw = "iotplat-admin", m.secrets["influxdb_admin_password"]

    def influx_up() -> bool:
        try:
            _influx(addr, str(ca), "SHOW DATABASES", admin, apw)
            return True
        except OSError as exc:
            return "401" in str(exc) or "403" in str(exc)

    wait_for(influx_up, 60, "InfluxDB over HTTPS")
    db = p.influx_database
    # what the influxdb role does: the first admin, the database, the worker's write-only user
    for q in (f"CREATE USER \"{admin}\" WITH PASSWORD '{apw}' WITH ALL PRIVILEGES",
              f'CREATE DATABASE "{db}" WITH DURATION 30d NAME "{p.influx_retention_policy}"',
              f"CREATE USER \"iotplat-worker\" WITH PASSWORD '{m.secrets['influxdb_worker_password']}'",
              f'GRANT WRITE ON "{db}" TO "iotplat-worker"'):
        body = _influx(addr, str(ca), q, admin, apw)
        assert "error" not in json.dumps(body), (q, body)
    unit = start_unit(lab, host, worker.unit, "1")
    health = "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:9464/healthz', timeout=2).status)\""
    wait_for(lambda: lab.sh(host, health, check=False).stdout.strip() == "200", 60, "worker /healthz")
    device = sorted(u for u in m.mqtt_users if u.startswith("sensor-"))[0]
    dev, seen = _client(addr, str(ca), device, m.mqtt_users[device][0])
    n = 50
    now_ms = int(time.time() * 1000)
    try:
        for i in range(n):
            payload = json.dumps({"ts": now_ms - i, "temperature": 20 + i / 10, "humidity": 40.0,
                                  "power": {"battery": 3.3}}).encode()
            dev.publish(f"devices/{device}/telemetry", payload, qos=1).wait_for_publish(5)
    finally:
        dev.loop_stop()
        dev.disconnect()

    def stored() -> int:
        body = _influx(addr, str(ca), f'SELECT count("temperature") FROM "telemetry" WHERE "device" = \'{device}\'',
                       admin, apw, db)
        series = body["results"][0].get("series") or []
        return series[0]["values"][0][1] if series else 0

    wait_for(lambda: stored() >= n, 60, f"{n} rows in InfluxDB")
    assert stored() == n
    uid = lab.sh(host, "ps -eo uid,args | grep '[i]otplat.worker'").stdout.split()[0]
    assert uid == "10001", "the worker runs as the image's non-root user"
    journal = lab.sh(host, f"journalctl -u {unit} -o cat --no-pager").stdout
    assert journal.strip(), "the worker's log lines are in its unit's journal"



def test_worker_container_loses_nothing_when_killed_or_when_influxdb_is_away(lab: Lab, platform: dict,
                                                                              tmp_path: Path):
    """The worker's own promises inside its container (after the test above started it on c12): a device publishes
    QoS 1 while the worker's process is killed with SIGKILL (`docker kill`: no goodbye, its unit starts a new
    container) and while InfluxDB's container is stopped; every message the broker acknowledged is in InfluxDB,
    once. The broker keeps the worker's persistent session meanwhile; the worker spools what InfluxDB refuses."""
    host, addr, m, p = "c12", lab.addresses["c12"], platform["materials"], platform["platform"]
    ca = tmp_path / "ca.crt"
    ca.write_text(m.ca_cert_pem)
    admin, apw = "iotplat-admin", m.secrets["influxdb_admin_password"]
    device = sorted(u for u in m.mqtt_users if u.startswith("sensor-"))[1]  # not the test above's device
    health = "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:9464/healthz', timeout=2).status)\""

    def worker_pid() -> str:
        return lab.sh(host, "docker inspect -f '{{.State.Pid}}' iotplat-worker-1", check=False).stdout.strip()

    def stored() -> int:
        try:
            body = _influx(addr, str(ca), f'SELECT count("temperature") FROM "telemetry" WHERE "device" = '
                           f"'{device}'", admin, apw, p.influx_database)
        except OSError:
            return -1  # InfluxDB is away
        series = body["results"][0].get("series") or []
        return series[0]["values"][0][1] if series else 0

    dev, _ = _client(addr, str(ca), device, m.mqtt_users[device][0])
    base, sent = int(time.time() * 1000) - 10_000, 0

    def publish(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            payload = json.dumps({"ts": base + sent, "temperature": float(sent), "humidity": 40.0,
                                  "power": {"battery": 3.3}}).encode()
            dev.publish(f"devices/{device}/telemetry", payload, qos=1).wait_for_publish(5)
            sent += 1

    try:
        publish(50)
        killed = worker_pid()
        assert killed not in ("", "0"), "the worker's container runs"
        lab.sh(host, "docker kill --signal KILL iotplat-worker-1")
        publish(50)  # while no worker runs: the broker queues them in the worker's session
        wait_for(lambda: worker_pid() not in ("", "0", killed)
                 and lab.sh(host, health, check=False).stdout.strip() == "200", 90, "a new worker container")
        publish(50)
        lab.sh(host, "systemctl stop influxdb.service")
        wait_for(lambda: stored() == -1, 30, "InfluxDB away")
        publish(100)  # the worker cannot write these: it spools them
        lab.sh(host, "systemctl start influxdb.service")
        publish(50)
    finally:
        dev.loop_stop()
        dev.disconnect()
    wait_for(lambda: stored() >= sent, 180, f"{sent} rows of {device} in InfluxDB")
    assert stored() == sent, "each acknowledged message once"
    assert worker_pid() not in ("", "0", killed)


# --- secrets, escaping, cleanup --------------------------------------------------------------------------------


def test_no_secret_in_docker_inspect_or_the_journal(lab: Lab, platform: dict):
    secrets = platform["materials"].secret_values()
    assert len(secrets) > 5
    for host in HOSTS:
        names = lab.sh(host, "docker ps --format '{{.Names}}'").stdout.split()
        assert names, f"{host} runs containers"
        inspect = lab.sh(host, "docker inspect " + " ".join(names)).stdout
        journal = lab.sh(host, "journalctl --no-pager -o verbose", timeout=120).stdout
        for value in secrets:
            for line in value.strip().splitlines()[1:2] or [value]:  # a key's first base64 line, or the value
                assert line not in inspect, f"{host}: a secret is in docker inspect"
                assert line not in journal, f"{host}: a secret is in the journal"


def test_hostile_words_reach_the_container_verbatim(lab: Lab, images: dict):
    """systemd splits ExecStart itself (no shell) and expands % and $: every word must arrive as written."""
    host = "c12"
    words = ("$HOME", "${PATH}", "%n", "%i", "a b", 'say "hi"', "it's", "back\\slash", ";", "$$", "--privileged",
             "&& id", "`id`", "x=$(id)", "\\n")
    svc = ContainerService(unit="iotplat-hostile.service", name="iotplat-hostile", description="hostile 100% $X",
                           image=images["load"]["mosquitto"].image.image_id, entrypoint="/usr/bin/printf",
                           command=("[%s]\\n", *words), env=(("IOTPLAT_NOTE", "$HOME %i a b"),))
    lab.put(host, f"/etc/systemd/system/{svc.unit}", container_unit(svc).encode())
    lab.sh(host, f"systemctl daemon-reload && systemctl start {svc.unit}")
    expected = "".join(f"[{w}]\n" for w in words)

    def printed() -> str:
        """The container's lines in the unit's journal. The unit's own output (`docker create` prints the container
        id, `docker start` its name) may fall between them: the container starts printing before `docker start`
        returns."""
        out = lab.sh(host, f"journalctl -u {svc.unit} -o json --no-pager", check=False).stdout
        entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return "".join(f"{e['MESSAGE']}\n" for e in entries if e.get("CONTAINER_NAME") == svc.name)

    deadline = time.monotonic() + 20
    while expected not in (got := printed()) and time.monotonic() < deadline:
        time.sleep(0.2)
    lab.sh(host, f"systemctl stop {svc.unit}", check=False)
    assert expected in got, got


def test_down_leaves_no_container_cgroups(lab: Lab):
    """Last: `down` stops the hosts and removes the empty cgroups their containers left at this machine's top level."""
    assert _container_ids
    lab.provider.down()
    left = [str(p) for cid in _container_ids for p in Path("/sys/fs/cgroup").glob(f"*/docker/{cid}")]
    assert not left, left
    assert not lab.provider.leftovers()
