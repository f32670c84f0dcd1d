"""Render: deterministic, no secrets in the build directory, identical service files on every target."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from iotplat.commands import render
from iotplat.secrets.materials import ensure_materials, secret_content
from iotplat.secrets.state import State
from iotplat.spec.load import load_platform
from tests.helpers import EXAMPLES, PLATFORM_DIR


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_renders_are_byte_identical_wherever_written(tmp_path: Path) -> None:
    spec = str(PLATFORM_DIR / "platform.yaml")
    render(spec, None, out_dir=str(tmp_path / "a"))
    render(spec, None, out_dir=str(tmp_path / "elsewhere" / "b"))
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "elsewhere" / "b")
    assert a == b and len(a) > 10
    for name, data in a.items():
        assert str(tmp_path).encode() not in data, name
        assert str(PLATFORM_DIR).encode() not in data, name


def test_rerender_changes_nothing(tmp_path: Path) -> None:
    spec = str(PLATFORM_DIR / "platform.yaml")
    first = render(spec, None, out_dir=str(tmp_path / "b"))
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("*") if p.is_file()}
    second = render(spec, None, out_dir=str(tmp_path / "b"))
    assert first["written"] and second["written"] == [] and second["removed"] == []
    assert second["hashes_computed"] == 0
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("*") if p.is_file()}


def test_stale_files_are_removed(tmp_path: Path) -> None:
    """Files the previous render wrote and this one does not are removed (their folders too); a file iotplat did
    not write is never removed (tests/render/test_build_dir.py has the hostile cases)."""
    out = tmp_path / "b"
    render(str(EXAMPLES / "local" / "platform.yaml"), None, out_dir=str(out))  # hosts edge, tsdb, dash
    (out / "hosts" / "edge" / "notes.txt").write_text("mine")
    result = render(str(PLATFORM_DIR / "platform.yaml"), None, out_dir=str(out))  # host core only
    assert result["removed"] and all(n.startswith(("hosts/tsdb/", "hosts/dash/", "hosts/edge/")) for n in result["removed"])
    assert not (out / "hosts" / "tsdb").exists() and not (out / "hosts" / "dash").exists()
    assert (out / "hosts" / "edge" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "hosts" / "edge").rglob("*") if p.is_file()) == ["notes.txt"]


def test_manifest_classifies_every_file(tmp_path: Path) -> None:
    render(str(EXAMPLES / "local" / "platform.yaml"), None, out_dir=str(tmp_path / "b"))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    files = manifest["files"]
    assert {f["class"] for f in files} == {"identical", "per-host", "secret"}
    on_disk = {p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b" / "hosts").rglob("*") if p.is_file()}
    listed = {f["path"] for f in files if f["class"] != "secret"}
    assert on_disk == listed
    for f in files:
        if f["class"] == "secret":
            assert "path" not in f and "sha256" not in f and f["secret"]
            assert f["mode"] in ("0600", "0640")
        else:
            data = (tmp_path / "b" / f["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"]
    # the 3-host example: the broker's files only on edge, influxdb's only on tsdb, ...
    by_host = {h: {f["service"] for f in files if f["host"] == h} for h in ("edge", "tsdb", "dash")}
    assert by_host == {"edge": {"common", "broker", "worker"}, "tsdb": {"common", "influxdb"}, "dash": {"common", "grafana"}}
    for name, digest in manifest["artifacts"].items():
        assert hashlib.sha256((tmp_path / "b" / name).read_bytes()).hexdigest() == digest


def test_no_secret_in_build_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_state: Path) -> None:
    """Canary secrets (referenced from the environment) and every generated secret are absent from the
    build directory, in plain, base64 and hex form; the state files are encrypted and 0600."""
    import base64

    canary = "CANARY-grafana-7d1f0c9e2b4a4f6e8c3d"
    monkeypatch.setenv("GRAFANA_PW", canary)
    spec_dir = tmp_path / "spec"
    shutil.copytree(PLATFORM_DIR, spec_dir, ignore=shutil.ignore_patterns("examples"))
    text = (spec_dir / "platform.yaml").read_text() + "secrets:\n  grafana_admin_password: {env: GRAFANA_PW}\n"
    (spec_dir / "platform.yaml").write_text(text)
    render(str(spec_dir / "platform.yaml"), None, out_dir=str(tmp_path / "b"))
    platform = load_platform(spec_dir / "platform.yaml")
    materials = ensure_materials(platform, State.open(isolated_state, platform.name, platform.environment))
    assert materials.secrets["grafana_admin_password"] == canary
    needles = {canary} | set(materials.secrets.values()) | {pw for pw, _ in materials.mqtt_users.values()}
    needles |= {c.key_pem.split("\n")[1] for c in materials.host_certs.values()}
    forms = set()
    for n in needles:
        forms |= {n, base64.b64encode(n.encode()).decode(), n.encode().hex()}
    blob = b"".join(_tree(tmp_path / "b").values()).decode()
    leaked = [n for n in forms if n in blob]
    assert leaked == []
    state_dir = isolated_state / platform.name / platform.environment
    for f in state_dir.iterdir():
        if f.is_file() and f.name != "lock":
            assert f.stat().st_mode & 0o777 == 0o600
            assert canary.encode() not in f.read_bytes()
            assert f.read_bytes().startswith(b"$ANSIBLE_VAULT;1.1;AES256")
    # the deploy step can still produce every secret file the manifest lists
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    for f in manifest["files"]:
        if f["class"] == "secret":
            assert secret_content(f["secret"], materials)


def _service_files(out: Path) -> dict[tuple[str, str], str]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {(f["service"], f["dest"]): f["sha256"] for f in manifest["files"] if f["class"] == "identical"}


def test_service_files_identical_across_targets(tmp_path: Path) -> None:
    """One platform rendered for local, bare metal, AWS and Azure: the service files are byte-identical."""
    base = yaml.safe_load((EXAMPLES / "local" / "platform.yaml").read_text())
    (tmp_path / "id.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEx ops@example\n")
    targets = {
        "local": {"kind": "local"},
        "baremetal": {"kind": "baremetal", "hosts": {h["name"]: {"address": f"192.0.2.{i + 1}"} for i, h in enumerate(base["hosts"])}},
        "aws": {"kind": "aws", "region": "eu-west-1", "admin_cidrs": ["203.0.113.0/24"], "ssh_public_key_file": "id.pub"},
        "azure": {"kind": "azure", "location": "westeurope", "admin_cidrs": ["203.0.113.0/24"], "ssh_public_key_file": "id.pub"},
    }
    results = {}
    for kind, target in targets.items():
        spec = dict(base, target=target)
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(spec))
        # one state for all four: the same platform (name + environment) on different targets
        render(str(path), None, out_dir=str(tmp_path / kind))
        results[kind] = _service_files(tmp_path / kind)
    assert results["local"] and all(r == results["local"] for r in results.values())
    # and inside one render: every host of a service gets the same bytes (the CA everywhere)
    manifest = json.loads((tmp_path / "aws" / "manifest.json").read_text())
    ca = {f["sha256"] for f in manifest["files"] if f["dest"] == "/etc/iotplat/tls/ca.crt"}
    assert len(ca) == 1
    # addresses appear only in the inventory
    for kind in ("baremetal",):
        for name, data in _tree(tmp_path / kind).items():
            if b"192.0.2." in data:
                assert name == "ansible/inventory.yml", name


def test_pulumi_stack_config(tmp_path: Path) -> None:
    render(str(EXAMPLES / "aws" / "platform.yaml"), None, out_dir=str(tmp_path / "b"))
    cfg = yaml.safe_load((tmp_path / "b" / "pulumi" / "aws" / "Pulumi.fleet-default.yaml").read_text())["config"]
    assert cfg["aws:region"] == "eu-west-1"
    hosts = {h["name"]: h for h in cfg["iotplat:hosts"]}
    assert hosts["tsdb"]["size"] == "m6i.large" and hosts["edge"]["size"] == "t3.small"
    assert hosts["edge"]["diskGb"] == 100
    edge_ports = {(r["port"], r["source"]) for r in hosts["edge"]["ingress"]}
    assert edge_ports == {(8883, "devices"), (8883, "internal")}
    tsdb_ports = {(r["port"], r["source"]) for r in hosts["tsdb"]["ingress"]}
    assert tsdb_ports == {(8086, "internal"), (3000, "admin")}
    assert cfg["iotplat:sshPublicKey"].startswith("ssh-ed25519 ")
    assert not any(k.endswith("assword") or "token" in k.lower() for k in cfg)


def test_worker_config_is_the_documented_format(tmp_path: Path) -> None:
    import tomllib

    render(str(EXAMPLES / "aws" / "platform.yaml"), None, out_dir=str(tmp_path / "b"))
    cfg = tomllib.loads((tmp_path / "b" / "hosts" / "edge" / "etc" / "iotplat" / "worker.toml").read_text())
    assert cfg["version"] == 1
    assert cfg["mqtt"]["host"] == "broker.iotplat.internal" and cfg["mqtt"]["tls"] is True
    assert cfg["mqtt"]["username"] == "iotplat-worker-{replica}"
    # InfluxDB 2 is written through its 1.x compatibility API: database = bucket, a v1 authorization
    assert cfg["influxdb"]["version"] == 1 and cfg["influxdb"]["database"] == "telemetry"
    assert cfg["influxdb"]["password_file"] == "influxdb-password" and "token_file" not in cfg["influxdb"]
    assert cfg["influxdb"]["url"] == "https://influxdb.iotplat.internal:8086"
    sub = cfg["subscriptions"][0]
    assert sub["topic"] == "site/{site}/device/{device}/telemetry"
    assert sub["fields"]["temperature"] == {"type": "float", "path": "temperature", "required": True}
    assert sub["timestamp"] == {"field": "ts", "unit": "ms"}
    documented = (Path(__file__).resolve().parents[2] / "docs" / "worker-config.md").read_text()
    doc_cfg = tomllib.loads(documented.split("```toml", 1)[1].split("```", 1)[0])
    for section in ("mqtt", "influxdb", "batch", "spool", "dead_letters", "limits", "http", "health"):
        assert set(cfg[section]) <= set(doc_cfg[section]), section


def test_acl_per_device_when_topics_use_attributes(tmp_path: Path) -> None:
    render(str(EXAMPLES / "aws" / "platform.yaml"), None, out_dir=str(tmp_path / "b"))
    acl = (tmp_path / "b" / "hosts" / "edge" / "etc" / "mosquitto" / "iotplat" / "acl").read_text()
    assert "user truck-003\ntopic write site/south/device/truck-003/telemetry\n" in acl
    assert "user iotplat-canary\ntopic write site/canary/device/iotplat-canary/telemetry\n" in acl
    assert "user iotplat-worker-2\ntopic read site/+/device/+/telemetry\ntopic write iotplat/dead-letters\n" in acl
    assert "pattern" not in re.sub(r"^#.*$", "", acl, flags=re.M)


def test_render_requires_env_when_declared(cli) -> None:
    r = cli("render", str(EXAMPLES / "environments" / "platform.yaml"))
    assert r.code == 2 and "choose one with --env" in r.err
    r = cli("render", str(EXAMPLES / "environments" / "platform.yaml"), "--env", "qa")
    assert r.code == 2 and "declared: production, staging" in r.err


def test_environments_render_separately(tmp_path: Path, isolated_state: Path) -> None:
    spec = str(EXAMPLES / "environments" / "platform.yaml")
    render(spec, "staging", out_dir=str(tmp_path / "s"))
    render(spec, "production", out_dir=str(tmp_path / "p"))
    inv_s = (tmp_path / "s" / "ansible" / "inventory.yml").read_text()
    inv_p = (tmp_path / "p" / "ansible" / "inventory.yml").read_text()
    assert "192.0.2.20" in inv_s and "198.51.100.20" in inv_p
    assert (isolated_state / "metering" / "staging").is_dir() and (isolated_state / "metering" / "production").is_dir()
    gv = yaml.safe_load((tmp_path / "p" / "ansible" / "group_vars" / "all.yml").read_text())
    assert gv["influxdb_retention"] == "730d" and gv["iotplat_environment"] == "production"


def test_scheduled_backup_takes_each_services_step(tmp_path: Path) -> None:
    """A host holding the broker and InfluxDB 2 gets one script with both services' steps (each rendered from
    the service's own template: iotplat/services scheduled_backup), the unit runs after both, and the
    operator token is read from its root-only file, never put on a command line."""
    spec = yaml.safe_load((Path(__file__).parent / "golden/influxdb2/platform.yaml").read_text())
    spec["hosts"] = [{"name": "all", "services": ["broker", "worker", "influxdb", "grafana"]}]
    spec["backup"] = {"schedule": "daily", "keep": 3}
    (tmp_path / "platform.yaml").write_text(yaml.safe_dump(spec))
    render(str(tmp_path / "platform.yaml"), None, out_dir=str(tmp_path / "b"))
    host = tmp_path / "b/hosts/all"
    script = (host / "usr/local/sbin/iotplat-backup").read_text()
    assert 'influx backup "$work/influxdb"' in script and 'INFLUX_TOKEN="$(cat ' in script
    assert "influxd backup" not in script  # the 1.x step is not there
    assert "systemctl kill --kill-whom=main --signal=USR1 mosquitto" in script
    assert script.index('mkdir -p "$work"') < script.index("influx backup") < script.index("sha256sum")
    assert "\n\n\n" not in script
    unit = (host / "etc/systemd/system/iotplat-backup.service").read_text()
    assert "After=" in unit and "influxdb.service" in unit and "mosquitto.service" in unit
    assert "InfluxDB" in unit and "Mosquitto's persistence file" in unit


def test_scheduled_backup_signals_a_containerized_broker_through_docker(tmp_path: Path) -> None:
    """In a container the broker unit's main process is `docker wait`: the scheduled step signals the container
    (the same command `iotplat backup` runs, tested on hosts in tests/containers/test_runtime_e2e.py)."""
    spec = yaml.safe_load((Path(__file__).parents[1] / "spec/cases/valid_container_broker_influxdb/platform.yaml").read_text())
    spec["runtime"]["influxdb"] = "package"
    spec["backup"] = {"schedule": "daily"}
    (tmp_path / "platform.yaml").write_text(yaml.safe_dump(spec))
    render(str(tmp_path / "platform.yaml"), None, out_dir=str(tmp_path / "b"))
    scripts = list((tmp_path / "b/hosts").glob("*/usr/local/sbin/iotplat-backup"))
    text = "".join(s.read_text() for s in scripts)
    assert "docker kill --signal USR1 mosquitto" in text and "systemctl kill" not in text
    assert "influxd backup -portable" in text  # InfluxDB as a package: the host's influxd


def test_scheduled_backup_runs_influxd_in_a_container_of_influxdbs_image(tmp_path: Path) -> None:
    """InfluxDB in a container: the host has no influxd, so the step runs the image's own influxd (the command
    `iotplat backup` runs) with the step's folder mounted; the script is valid sh. On hosts:
    tests/containers/test_runtime_e2e.py starts the scheduled backup and reads the backup it wrote."""
    import subprocess

    case = Path(__file__).parents[1] / "spec/cases/valid_container_influxdb_scheduled_backup/platform.yaml"
    render(str(case), None, out_dir=str(tmp_path / "b"))
    script = next((tmp_path / "b/hosts").glob("*/usr/local/sbin/iotplat-backup")).read_text()
    step = next(line for line in script.splitlines() if "backup -portable" in line)
    assert step.startswith('mkdir -p "$work/influxdb"; chown 1500:1500 "$work/influxdb"; docker run --rm '), step
    assert '--mount type=bind,source="$work/influxdb",target="$work/influxdb" --entrypoint influxd ' in step
    assert "--entrypoint influxd influxdb@sha256:9d1a551e" in step  # pulled by the pinned digest (no archive)
    assert "--user 1500:1500" in step and "--cap-drop ALL" in step
    assert subprocess.run(["sh", "-n"], input=script, text=True, check=False).returncode == 0
