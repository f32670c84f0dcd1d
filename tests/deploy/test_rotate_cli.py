"""`iotplat rotate` refuses what it cannot do with one line and the right exit code, before touching anything."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import PLATFORM_DIR


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    shutil.copy(PLATFORM_DIR / "platform.yaml", tmp_path / "platform.yaml")
    shutil.copy(PLATFORM_DIR / "devices.csv", tmp_path / "devices.csv")
    return tmp_path / "platform.yaml"


def test_rotate_needs_what(cli) -> None:
    r = cli("rotate")
    assert r.code == 2 and "certs|secrets|device" in r.err


def test_finish_needs_ca(cli, spec: Path, tmp_path: Path) -> None:
    r = cli("rotate", "certs", "--finish", str(spec), "--out", str(tmp_path / "build"))
    assert r.code == 2 and "--ca --finish" in r.err and "Traceback" not in r.err


@pytest.mark.parametrize("what", [("certs",), ("certs", "--ca"), ("secrets",), ("device", "sensor-0001")])
def test_refused_before_a_deploy(cli, spec: Path, tmp_path: Path, what: tuple[str, ...], isolated_state: Path) -> None:
    r = cli("rotate", *what, str(spec), "--out", str(tmp_path / "build"), "--json")
    assert r.code == 1 and "has not been deployed" in r.err and "iotplat up" in r.err
    assert len(r.err.strip().splitlines()) == 1
    secrets = next(isolated_state.rglob("secrets.vault"))
    before = secrets.read_bytes()
    assert cli("rotate", *what, str(spec), "--out", str(tmp_path / "build")).code == 1
    assert secrets.read_bytes() == before  # nothing rotated


@pytest.mark.parametrize("what", [("certs",), ("certs", "--ca"), ("secrets",), ("device", "sensor-1")])
def test_nats_engine_is_rotated_like_mosquitto(cli, tmp_path: Path, what: tuple[str, ...], isolated_state: Path) -> None:
    """broker.engine nats is no longer refused (it was until the nats reload path existed): before a deploy it gets
    the same answer as Mosquitto, nothing rotated. The rotation itself runs on hosts in
    tests/nats/test_cluster_e2e.py; the reload it relies on is tests/nats/test_reload.py."""
    for f in (PLATFORM_DIR / "examples" / "cluster").iterdir():
        shutil.copy(f, tmp_path / f.name)
    r = cli("rotate", *what, str(tmp_path / "platform.yaml"), "--out", str(tmp_path / "build"))
    assert r.code == 1 and "has not been deployed" in r.err and "broker.engine" not in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1


def test_nats_rotation_reloads_node_by_node(tmp_path: Path) -> None:
    """Step 2 on nats is playbooks/nats-reload.yml: one broker node at a time (serial: 1) through the nats role's
    reload task file, which installs the node's files, checks them with `nats-server -t` and applies them with
    tasks/apply.yml (reload, restart only if not applied, /healthz); broker-reload.yml stays Mosquitto's. In `up`,
    apply.yml only decides and the role's throttled handler restarts (one node at a time)."""
    import yaml

    from iotplat.deploy import rotate
    from iotplat.spec.load import load_platform
    from tests.helpers import REPO

    for f in (PLATFORM_DIR / "examples" / "cluster").iterdir():
        shutil.copy(f, tmp_path / f.name)
    p = load_platform(tmp_path / "platform.yaml")
    assert rotate._broker_playbook(p)[0] == "nats-reload.yml"
    assert rotate._broker_playbook(load_platform(PLATFORM_DIR / "platform.yaml"))[0] == "broker-reload.yml"
    play = yaml.safe_load((rotate.PLAYBOOKS / "nats-reload.yml").read_text())[0]
    assert play["hosts"] == "broker" and play["serial"] == 1
    assert play["tasks"][0]["ansible.builtin.include_role"] == {"name": "nats", "tasks_from": "reload"}
    tasks = yaml.safe_load((REPO / "roles" / "nats" / "tasks" / "reload.yml").read_text())
    assert [next(k for k in t if k.startswith("ansible.")) for t in tasks] == [
        "ansible.builtin.include_role", "ansible.builtin.command", "ansible.builtin.include_tasks"]
    assert tasks[1]["ansible.builtin.command"]["argv"][:3] == ["/usr/sbin/nats-server", "-t", "-c"]
    apply = yaml.safe_load((REPO / "roles" / "nats" / "tasks" / "apply.yml").read_text())
    states = [t["ansible.builtin.systemd_service"]["state"] for t in apply if "ansible.builtin.systemd_service" in t]
    assert states == ["reloaded"]
    restart = [t for t in apply if "ansible.builtin.command" in t]  # the rolling restart, when the reload was refused
    assert len(restart) == 1 and restart[0]["ansible.builtin.command"]["argv"] == "{{ __nats_restart_argv }}"
    assert "__nats_restart_needed" in restart[0]["when"] and "__nats_restart_later" in restart[0]["when"]
    handlers = yaml.safe_load((REPO / "roles" / "nats" / "handlers" / "main.yml").read_text())
    throttled = [h for h in handlers if h.get("throttle") == 1]
    assert [h["listen"] for h in throttled] == ["restart nats-server", "reload nats-server"]
    assert all(h["ansible.builtin.command"]["argv"] == "{{ __nats_restart_argv }}" for h in throttled)
