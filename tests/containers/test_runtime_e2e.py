"""End to end: platform/examples/containers (the broker and InfluxDB 1.x in containers, the worker as a package: a
mixed platform) deployed by `iotplat up` onto two local nspawn hosts, with the stand-in images given as archives --
the air-gapped path, for real: verified on the controller, copied, loaded and checked by image ID on the hosts.

What it proves: the spec's runtime and images reach the hosts (then the worker moves from its package into the
container iotplat builds for it from the same wheelhouse) through render and the roles; Docker is installed
from Debian with iotplat's daemon.json; the units run the verified images by ID under the package's unit names, so
`status` (units, TLS, canary: a real message through the containerized broker into the containerized InfluxDB),
`logs` and `destroy` work unchanged; no secret is in `docker inspect`; a changed digest is drift for `plan`; a new
build of the broker image (new digest, same tag) rolls out host by host with the canary after each; `rotate certs`
and `rotate secrets` reload the broker container without restarting it; backup -> `destroy --data` -> `restore`
gives the rows back; the roles' uninstall path removes containers, units and images. What it cannot: the upstream
images themselves (tests/support/images.py says how the stand-ins differ), hosts other than Debian 12, a registry
pull (none is reachable here).

Network 10.237.0.0/24 only. One platform for the module (recreated by the restore test). The whole module: 11
tests in 13 min 18 s on this 2-core machine with other host suites running (load average 3-7), stand-ins cached;
the longest are the rolling upgrade (186 s), backup/restore (176 s) and destroy --data + restore (168 s).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.deploy.conftest import local_platform, module_env, platform_materials, run_cli
from tests.helpers import EXAMPLES

pytestmark = [pytest.mark.hosts, pytest.mark.slow]
NETWORK = "10.237.0.0/24"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        pytest.skip("needs root and systemd-nspawn")
    from tests.support.images import stand_in

    broker, influx = stand_in("mosquitto"), stand_in("influxdb")
    work = tmp_path_factory.mktemp("ctr-up")

    def edit(spec: dict) -> None:
        spec["name"], spec["target"]["network"] = "ctr", NETWORK
        spec["images"] = {"broker": str(broker.ref), "influxdb": str(influx.ref),
                          "archive": {"broker": str(broker.archive), "influxdb": str(influx.archive)}}
        spec["backup"] = {"schedule": "daily", "keep": 2}  # the scheduled steps run the images' own tools

    for ctx in local_platform(work, EXAMPLES / "containers" / "platform.yaml", edit, devices=["dev-a", "dev-b"],
                              env={"IOTPLAT_IMAGE_CACHE": str(work / "image-cache")}, destroy_data=True):
        ctx["standins"] = {"broker": broker, "influxdb": influx}
        yield ctx  # then `iotplat destroy --data` deletes the hosts


@pytest.fixture(autouse=True)
def _module_state(isolated_state, deployed: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    module_env(deployed, monkeypatch)


def _exec(deployed: dict, host: str, script: str) -> str:
    from iotplat.deploy.targets import local_settings
    from iotplat.hosts import local_provider
    from iotplat.spec.load import load_platform

    provider = local_provider(local_settings(load_platform(Path(deployed["spec"]))))
    r = provider.exec(host, ["sh", "-c", script], timeout=120)
    assert r.returncode == 0, (script, r.stderr)
    return r.stdout


def test_01_up_runs_broker_and_influxdb_in_containers_and_status_is_green(deployed: dict, capfd) -> None:
    code, out, err = run_cli(capfd, "up", deployed["spec"], "--out", deployed["build"], "--json")
    assert code == 0, (out + err)[-4000:]
    result = json.loads(out)
    deployed["hosts"] = result["hosts"]
    assert result["ok"] is True
    ok = {(c["host"], c["name"]) for c in result["status"] if c["ok"] and not c["skipped"]}
    assert ("edge", "unit mosquitto") in ok and ("tsdb", "unit influxdb") in ok, result["status"]
    assert ("edge", "canary") in ok  # a real message: device -> broker container -> worker -> InfluxDB container
    # the units run the verified images by ID, in containers
    for host, name, which in (("edge", "mosquitto", "broker"), ("tsdb", "influxdb", "influxdb")):
        image = _exec(deployed, host, f"docker inspect --format '{{{{.Image}}}}' {name}").strip()
        assert image == deployed["standins"][which].config_digest
        assert _exec(deployed, host, f"systemctl show -p ExecStart --value {name}.service").count("docker wait") == 1
    # the worker stays a package (mixed platform)
    assert _exec(deployed, "edge", "systemctl is-active iotplat-worker@1.service").strip() == "active"
    assert "docker" not in _exec(deployed, "edge", "systemctl cat iotplat-worker@1.service")


def test_02_no_secret_in_docker_inspect_the_journal_or_the_build_dir(deployed: dict) -> None:
    _, m, _ = platform_materials(deployed)
    inspect = _exec(deployed, "edge", "docker inspect mosquitto") + _exec(deployed, "tsdb", "docker inspect influxdb")
    values = [v for v in m.secrets.values() if isinstance(v, str) and len(v) >= 8]
    values += [pw for pw, _ in m.mqtt_users.values()]
    assert values and not [v for v in values if v in inspect]
    journals = _exec(deployed, "edge", "journalctl --no-pager -o cat") + _exec(deployed, "tsdb", "journalctl --no-pager -o cat")
    assert "mosquitto version" in journals and not [v for v in values if v in journals]
    build = "".join(f.read_text(errors="replace") for f in Path(deployed["build"]).rglob("*") if f.is_file())
    assert not [v for v in values if v in build]
    env = json.loads(_exec(deployed, "tsdb", "docker inspect influxdb"))[0]["Config"]["Env"] or []
    assert not [e for e in env if e.split("=", 1)[0].startswith("INFLUXDB_")]


def test_03_second_up_changes_nothing(deployed: dict, capfd) -> None:
    code, out, err = run_cli(capfd, "up", deployed["spec"], "--out", deployed["build"], "--json", "--no-verify")
    assert code == 0, err[-3000:]
    assert json.loads(out)["changed"] == 0, json.loads(out).get("recap")


def test_04_logs_show_the_containers_journal(deployed: dict, capfd) -> None:
    code, out, err = run_cli(capfd, "logs", deployed["spec"], "--out", deployed["build"], "--service", "broker",
                             "--since", "1 hour ago", "--lines", "200")
    assert code == 0, err
    lines = out.splitlines()
    assert lines and all(" edge/broker: " in line for line in lines)
    # Mosquitto's own start-up lines, written by the container through Docker's journald driver
    assert any("mosquitto version" in line and "running" in line for line in lines), out[-2000:]


def test_04b_scheduled_backups_run_inside_the_images(deployed: dict) -> None:
    """The spec's backup schedule on container hosts: the step of InfluxDB runs influxd in a throw-away container
    of InfluxDB's image (the host has none), the broker's signals its container to save; each host's backup
    folder verifies against its SHA256SUMS and no container is left behind."""
    for host, member in (("tsdb", "influxdb/*.manifest"), ("edge", "mosquitto.db")):
        _exec(deployed, host, "systemctl start iotplat-backup.service")
        newest = _exec(deployed, host, "ls -1d /var/backups/iotplat/2*Z | tail -n 1").strip()
        _exec(deployed, host, f"cd {newest} && ls {member} && sha256sum --quiet -c SHA256SUMS")
    assert _exec(deployed, "tsdb", "docker ps -a --format '{{.Names}}'").split() == ["influxdb"]  # --rm: gone


def test_05_a_changed_digest_is_drift(deployed: dict, capfd) -> None:
    import yaml

    # (no drift before: test_03's no-change `up` showed that)
    spec_path = Path(deployed["spec"])
    original = spec_path.read_text()
    spec = yaml.safe_load(original)
    ref = deployed["standins"]["broker"].ref
    spec["images"]["broker"] = f"{ref.familiar_name}:{ref.tag}@sha256:{'1' * 64}"  # a new pin, pulled (no archive)
    del spec["images"]["archive"]["broker"]
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    try:
        code, out, err = run_cli(capfd, "plan", deployed["spec"], "--out", deployed["build"], "--json")
        assert code == 3, (out + err)[-3000:]
        result = json.loads(out)
        assert any(c["host"] == "edge" for c in result["changes"])
        assert "sha256:" + "1" * 64 in "\n".join(result["diff"])  # the unit's new image
    finally:
        spec_path.write_text(original)
        run_cli(capfd, "render", deployed["spec"], "--out", deployed["build"])


def test_05b_the_worker_moves_into_a_container(deployed: dict, capfd) -> None:
    """runtime.worker: container on the running platform: iotplat builds the worker image from the same wheelhouse on
    the stand-in python base, `up` replaces the package's replicas with containers (same unit names), the canary
    passes through them, and they run as the image's non-root user."""
    import yaml

    from tests.support.images import stand_in

    python = stand_in("python")
    spec_path = Path(deployed["spec"])
    spec = yaml.safe_load(spec_path.read_text())
    spec["runtime"]["worker"] = "container"
    spec["images"]["worker_base"] = str(python.ref)
    spec["images"]["archive"]["worker_base"] = str(python.archive)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    code, out, err = run_cli(capfd, "up", deployed["spec"], "--out", deployed["build"], "--json")
    if code != 0:  # what the replica said, for the failure message
        err += _exec(deployed, "edge", "journalctl -u iotplat-worker@1 -n 40 --no-pager -o cat; docker ps -a || true")
    assert code == 0, (out + err)[-6000:]
    result = json.loads(out)
    ok = {(c["host"], c["name"]) for c in result["status"] if c["ok"] and not c["skipped"]}
    assert ("edge", "canary") in ok and ("edge", "unit iotplat-worker@1") in ok, result["status"]
    gv = yaml.safe_load((Path(deployed["build"]) / "ansible/group_vars/all.yml").read_text())
    image_id = gv["worker_container"]["image"]["image_id"]
    assert _exec(deployed, "edge", "docker inspect --format '{{.Image}}' iotplat-worker-1").strip() == image_id
    assert _exec(deployed, "edge", "docker exec iotplat-worker-1 id -u").strip() == "10001"
    size = int(_exec(deployed, "edge", f"docker image inspect --format '{{{{.Size}}}}' {image_id}"))
    assert size < 150_000_000


def test_05c_backup_runs_inside_the_images(deployed: dict, capfd) -> None:
    """`backup` on the all-container platform: InfluxDB's portable backup runs in a container of its own image (the
    host has no influxd), the broker saves through `docker kill --signal USR1`; the archive holds both. Its restore,
    in a container of InfluxDB's image too, is test_05f's (onto hosts whose data is gone, so the rows can only come
    from the archive; restoring onto running hosts is the same hook, which drops the database first, and
    tests/nats/test_cluster_e2e.py::test_08 runs it)."""
    import time

    import paho.mqtt.client as mqtt

    from iotplat.verify.status import TrustStore, influx_query
    from tests.deploy.conftest import mqtt_connect

    p, m, _ = platform_materials(deployed)
    edge, tsdb = deployed["hosts"]["edge"], deployed["hosts"]["tsdb"]
    ca = str(Path(deployed["build"]) / "hosts/edge/etc/iotplat/tls/ca.crt")
    ts0 = int(time.time() * 1000) - 600_000
    c, seen = mqtt_connect(edge, ca, "dev-a", m.mqtt_users["dev-a"][0], protocol=mqtt.MQTTv311)
    assert seen["rc"] == 0
    for i in range(20):
        c.publish("devices/dev-a/telemetry", json.dumps({"temperature": i, "humidity": 1, "ts": ts0 + i}),
                  qos=1).wait_for_publish(10)
    c.loop_stop()
    c.disconnect()
    trust = TrustStore(m.ca_cert_pem)

    def count() -> int:
        res = influx_query(p, tsdb, trust.context(), "iotplat-grafana", m.secrets["influxdb_grafana_password"],
                           f"SELECT count(temperature) FROM telemetry WHERE device = 'dev-a' AND time >= {ts0}ms "
                           f"AND time < {ts0 + 20}ms")
        series = res["results"][0].get("series") or [{"values": [[0, 0]]}]
        return int(series[0]["values"][0][1])

    try:
        deadline = time.time() + 60
        while count() < 20 and time.time() < deadline:
            time.sleep(1)
        assert count() == 20
        deployed["rows"] = ts0  # test_05f brings these rows back after `destroy --data`
        code, out, err = run_cli(capfd, "backup", deployed["spec"], "--out", deployed["build"], "--to",
                                 str(Path(deployed["work"]) / "backups"), "--json")
        assert code == 0, (out + err)[-3000:]
        members = json.loads(out)["members"]  # name -> sha256, sealed in the archive (checked by restore)
        assert {"state.tar", "influxdb.tar", "mosquitto.db"} <= set(members), members
    finally:
        trust.close()


def _addresses(deployed: dict) -> dict[str, str]:
    from iotplat.deploy.ops import open_context

    return {h.name: h.address for h in open_context(deployed["spec"], None, None, deployed["build"],
                                                     lambda s: None).hosts()}


def _rows(deployed: dict, device: str, ts0: int, n: int, *, publish: bool = False) -> int:
    """Rows of `device` in [ts0, ts0 + n) ms in InfluxDB, after publishing them over TLS first when asked; waits
    up to 60 s for n rows. Credentials and addresses as the state and the hosts are now (after a rotation or a
    restore)."""
    import time

    import paho.mqtt.client as mqtt

    from iotplat.verify.status import TrustStore, influx_query
    from tests.deploy.conftest import mqtt_connect

    p, m, _ = platform_materials(deployed)
    addr = _addresses(deployed)
    if publish:
        ca = str(Path(deployed["build"]) / "hosts/edge/etc/iotplat/tls/ca.crt")
        c, seen = mqtt_connect(addr["edge"], ca, device, m.mqtt_users[device][0], protocol=mqtt.MQTTv311)
        assert seen["rc"] == 0, seen
        for i in range(n):
            c.publish(f"devices/{device}/telemetry", json.dumps({"temperature": i, "humidity": 1, "ts": ts0 + i}),
                      qos=1).wait_for_publish(10)
        c.loop_stop()
        c.disconnect()
    trust = TrustStore(m.ca_cert_pem)
    try:
        deadline = time.monotonic() + 60
        while True:
            res = influx_query(p, addr["tsdb"], trust.context(), "iotplat-grafana", m.secrets["influxdb_grafana_password"],
                               f"SELECT count(temperature) FROM telemetry WHERE device = '{device}' AND time >= {ts0}ms "
                               f"AND time < {ts0 + n}ms")
            series = res["results"][0].get("series") or [{"values": [[0, 0]]}]
            got = int(series[0]["values"][0][1])
            if got >= n or time.monotonic() > deadline:
                return got
            time.sleep(1)
    finally:
        trust.close()


def _set_broker_image(deployed: dict, image) -> None:
    import yaml

    spec_path = Path(deployed["spec"])
    spec = yaml.safe_load(spec_path.read_text())
    spec["images"]["broker"] = str(image.ref)
    spec["images"]["archive"]["broker"] = str(image.archive)
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))


def test_05d_a_digest_bump_rolls_host_by_host_with_the_canary(deployed: dict, capfd) -> None:
    """A new build of the broker image under the same tag (a stand-in variant: one label changed, so a new image ID
    and registry digest) through the archive: `plan` names the digest (exit 3), `up` rolls it out one host at a
    time -- the broker's host first -- with the canary green after each, and the container runs the new image ID.
    (Setting the old pin back takes the same path: it was run here once, up and back, then left out to keep the
    module's time down; the rest of the module runs on the new image.)"""
    from tests.support.images import variant

    old, new = deployed["standins"]["broker"], variant("mosquitto", "digest-bump")
    assert new.ref.tag == old.ref.tag and new.ref.digest != old.ref.digest and new.config_digest != old.config_digest
    bump = {"service": "broker-image", "old": str(old.ref), "new": str(new.ref)}
    _set_broker_image(deployed, new)
    code, out, err = run_cli(capfd, "plan", deployed["spec"], "--out", deployed["build"], "--json")
    assert code == 3, (out + err)[-3000:]
    assert json.loads(out)["upgrades"] == [bump]
    assert new.ref.digest in err  # "upgrade  broker-image ... -> ...@sha256:<new>"
    code, out, err = run_cli(capfd, "up", deployed["spec"], "--out", deployed["build"], "--json")
    assert code == 0, (out + err)[-4000:]
    result = json.loads(out)
    assert result["upgraded"] == [bump] and result["ok"] is True, result.get("status")
    assert "one host at a time, canary after each" in err
    positions = [err.index(s) for s in ("[1/2] edge", "canary ok after edge", "[2/2] tsdb", "canary ok after tsdb")]
    assert positions == sorted(positions), err[-3000:]
    assert _exec(deployed, "edge", "docker inspect --format '{{.Image}}' mosquitto").strip() == new.config_digest
    deployed["standins"]["broker"] = new  # what the broker runs from here on


def test_05e_rotate_certs_and_secrets_reload_the_broker_container(deployed: dict, capfd) -> None:
    """`rotate certs` then `rotate secrets` on the container platform: the broker serves the new certificate while
    its container keeps running (reloaded by SIGHUP, not restarted: same container start time), InfluxDB and the
    worker containers take their new credentials, status is green and a device's rows reach InfluxDB."""
    import ssl
    import time

    edge = _addresses(deployed)["edge"]

    def served() -> str:
        return ssl.get_server_certificate((edge, 8883), timeout=10)

    started = _exec(deployed, "edge", "docker inspect --format '{{.State.StartedAt}}' mosquitto").strip()
    cert = served()
    code, out, err = run_cli(capfd, "rotate", "certs", deployed["spec"], "--out", deployed["build"], "--json")
    assert code == 0, (out + err)[-4000:]
    assert json.loads(out)["ok"] is True
    assert served() != cert  # the broker serves the new certificate ...
    code, out, err = run_cli(capfd, "rotate", "secrets", deployed["spec"], "--out", deployed["build"], "--json")
    assert code == 0, (out + err)[-4000:]
    result = json.loads(out)
    assert result["ok"] is True and result["workers_restarted"], result
    # ... from the same container: reloaded, never restarted
    assert _exec(deployed, "edge", "docker inspect --format '{{.State.StartedAt}}' mosquitto").strip() == started
    assert _exec(deployed, "edge", "systemctl is-active mosquitto.service").strip() == "active"
    ts0 = int(time.time() * 1000) - 300_000
    assert _rows(deployed, "dev-b", ts0, 10, publish=True) == 10


def test_05f_backup_destroy_data_restore_gives_the_rows_back(deployed: dict, capfd) -> None:
    """backup -> `destroy --data` (the hosts and their data disks are gone) -> `restore`: the platform is deployed
    again with the archive's credentials, the images loaded from the archives again, InfluxDB's data restored in a
    container of its image, and the rows test_05c wrote are back."""
    ts0 = deployed["rows"]
    assert _rows(deployed, "dev-a", ts0, 20) == 20
    code, out, err = run_cli(capfd, "backup", deployed["spec"], "--out", deployed["build"], "--to",
                             str(Path(deployed["work"]) / "backups-2"), "--json")
    assert code == 0, (out + err)[-3000:]
    archive = json.loads(out)["archive"]
    code, out, err = run_cli(capfd, "destroy", deployed["spec"], "--out", deployed["build"], "--yes", "--data", "--json")
    assert code == 0, (out + err)[-3000:]
    code, out, err = run_cli(capfd, "restore", deployed["spec"], "--out", deployed["build"], "--from", archive,
                             "--yes", "--json")
    assert code == 0, (out + err)[-4000:]
    assert json.loads(out)["ok"] is True
    assert _rows(deployed, "dev-a", ts0, 20) == 20
    for host, name, which in (("edge", "mosquitto", "broker"), ("tsdb", "influxdb", "influxdb")):
        image = _exec(deployed, host, f"docker inspect --format '{{{{.Image}}}}' {name}").strip()
        assert image == deployed["standins"][which].config_digest


def test_06_uninstall_keeps_images_when_asked_then_removes_them(deployed: dict) -> None:
    """The roles' uninstall path (destroy.yml, which `iotplat destroy` runs on bare-metal and cloud hosts; local hosts
    are deleted whole, so it is run here directly on the live hosts first)."""
    from iotplat.deploy.ansible import run_playbook
    from iotplat.deploy.ops import open_context

    ctx = open_context(deployed["spec"], None, None, deployed["build"], lambda s: None)
    hosts = ctx.target().acquire(create=False, progress=lambda s: None)
    # `destroy --keep-images`: containers and units go, the loaded images stay
    result = run_playbook(ctx.build, hosts, ctx.materials, ctx.state.dir, None, playbook="destroy.yml",
                          extra_vars={"iotplat_destroy_data": False, "iotplat_keep_images": True})
    assert result.returncode == 0, result.failures
    for host, name, which in (("edge", "mosquitto", "broker"), ("tsdb", "influxdb", "influxdb")):
        assert _exec(deployed, host, "docker ps -aq").strip() == ""
        assert deployed["standins"][which].config_digest in _exec(deployed, host, "docker images -q --no-trunc")
        assert _exec(deployed, host, f"test -e /etc/systemd/system/{name}.service && echo yes || echo no").strip() == "no"
    # a plain destroy (run again: the uninstall is idempotent) removes the images too
    result = run_playbook(ctx.build, hosts, ctx.materials, ctx.state.dir, None, playbook="destroy.yml",
                          extra_vars={"iotplat_destroy_data": False, "iotplat_keep_images": False})
    assert result.returncode == 0, result.failures
    for host, name, which in (("edge", "mosquitto", "broker"), ("tsdb", "influxdb", "influxdb")):
        assert _exec(deployed, host, "docker ps -aq").strip() == ""
        assert deployed["standins"][which].config_digest not in _exec(deployed, host, "docker images -q --no-trunc")
        assert _exec(deployed, host, f"test -e /etc/systemd/system/{name}.service && echo yes || echo no").strip() == "no"
    assert _exec(deployed, "edge", "docker images -q").strip() == ""  # the worker image too
