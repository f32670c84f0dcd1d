"""`iotplat device add|list|revoke|kit` edit the registry (the source of truth) and the state's credentials."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import EXAMPLES, PLATFORM_DIR


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    shutil.copy(PLATFORM_DIR / "platform.yaml", tmp_path / "platform.yaml")
    shutil.copy(PLATFORM_DIR / "devices.csv", tmp_path / "devices.csv")
    return tmp_path / "platform.yaml"


def test_add_list_revoke_csv(cli, spec: Path) -> None:
    reg = spec.parent / "devices.csv"
    before = reg.read_text()
    assert cli("device", "add", "sensor-0100", str(spec)).code == 0
    assert reg.read_text() == before + "sensor-0100\n"  # appended, the rest untouched
    r = cli("device", "list", str(spec), "--json")
    assert [d["id"] for d in json.loads(r.out)["devices"]][-1] == "sensor-0100"
    assert cli("device", "revoke", "sensor-0002", str(spec)).code == 0
    assert "sensor-0002" not in reg.read_text() and reg.read_text().startswith("# The device registry")


def test_bad_add_leaves_registry_untouched(cli, spec: Path) -> None:
    reg = spec.parent / "devices.csv"
    before = reg.read_text()
    for args in (("bad id",), ("sensor-0001",), ("iotplat-x",), ("ok-1", "--attr", "site=north")):
        r = cli("device", "add", *args[:1], str(spec), *args[1:])
        assert r.code == 2, args
        assert reg.read_text() == before
        assert "Traceback" not in r.err and len(r.err.strip().splitlines()) >= 1


def test_revoked_device_gets_a_new_credential_when_readded(cli, spec: Path, tmp_path: Path, isolated_state: Path) -> None:
    from iotplat.secrets.materials import ensure_materials
    from iotplat.secrets.state import State
    from iotplat.spec.load import load_platform

    def password(dev: str) -> str:
        p = load_platform(spec)
        return ensure_materials(p, State.open(isolated_state, p.name, p.environment)).mqtt_users[dev][0]

    first = password("sensor-0003")
    assert cli("device", "revoke", "sensor-0003", str(spec)).code == 0
    assert cli("device", "add", "sensor-0003", str(spec)).code == 0
    assert password("sensor-0003") != first


def test_yaml_registry_with_attributes(cli, tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "device-file", tmp_path / "d")
    spec = tmp_path / "d" / "platform.yaml"
    assert cli("device", "add", "room-201", str(spec), "--attr", "building=annex").code == 0
    assert "  - {id: room-201, building: annex}\n" in (tmp_path / "d" / "devices.yaml").read_text()
    r = cli("device", "add", "room-202", str(spec))  # no building: its topic could not be formed
    assert r.code == 2 and "room-202" not in (tmp_path / "d" / "devices.yaml").read_text()
    assert cli("device", "revoke", "lab-1", str(spec)).code == 0
    assert "lab-1" not in (tmp_path / "d" / "devices.yaml").read_text()
    assert cli("validate", str(spec)).code == 0


def test_kit_shows_credential_topics_and_ca(cli, tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "aws", tmp_path / "a")
    spec = tmp_path / "a" / "platform.yaml"
    r = cli("device", "kit", "truck-002", str(spec), "--json")
    assert r.code == 0
    kit = json.loads(r.out)
    assert kit["broker"] == {"address": "mqtt.fleet.example.com", "port": 8883, "tls_name": "mqtt.fleet.example.com"}
    assert kit["topics"] == ["site/north/device/truck-002/telemetry"]
    assert kit["ca_cert"].startswith("-----BEGIN CERTIFICATE-----") and len(kit["password"]) >= 32
    assert "mosquitto_pub" in kit["example"] and kit["password"] in kit["example"]
    assert cli("device", "kit", "nope", str(spec)).code == 2


# ---------------------------------------------------------------------------- hostile registries (issue 9)


def _users(state_root: Path, platform: str = "demo") -> dict:
    from iotplat.secrets.state import State

    return State.open(state_root, platform, "default").doc("users").get("users", {})


def test_revoke_finds_the_row_by_id_not_by_the_first_column(cli, spec: Path, isolated_state: Path) -> None:
    """With a `site,id` header the old revoke said "revoked", left the row, deleted the credential, and the next
    render issued a new one: the device stayed authorised. With a site named like a device it removed the wrong
    row."""
    reg = spec.parent / "devices.csv"
    reg.write_text("site,id\ndev-x,dev-1\nsouth,dev-x\nnorth,dev-2\n")
    assert cli("render", str(spec), "--out", str(spec.parent / "build")).code == 0
    assert {"dev-1", "dev-x", "dev-2"} <= set(_users(isolated_state))
    r = cli("device", "revoke", "dev-x", str(spec))
    assert r.code == 0, r.err
    assert reg.read_text() == "site,id\ndev-x,dev-1\nnorth,dev-2\n"
    assert "dev-x" not in _users(isolated_state) and "dev-1" in _users(isolated_state)
    assert cli("render", str(spec), "--out", str(spec.parent / "build")).code == 0
    assert "dev-x" not in _users(isolated_state)  # not re-issued: it is gone from the registry
    from iotplat.secrets.materials import ensure_materials
    from iotplat.secrets.state import State
    from iotplat.spec.load import load_platform

    p = load_platform(spec)  # the broker's password file (what `up` installs) has no line for it
    passwd = ensure_materials(p, State.open(isolated_state, p.name, p.environment)).passwd_file().decode()
    assert "dev-x:" not in passwd and "dev-1:" in passwd and "dev-2:" in passwd
    r = cli("device", "revoke", "north", str(spec))  # an attribute value is not a device
    assert r.code == 2 and "no device 'north'" in r.err and "north,dev-2" in reg.read_text()


def test_yaml_registry_keeps_comments_and_yaml_1_1_values(cli, tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "device-file", tmp_path / "d")
    spec = tmp_path / "d" / "platform.yaml"
    reg = tmp_path / "d" / "devices.yaml"
    reg.write_text("# rooms, reviewed like code\ndevices:\n  # main building\n  - {id: room-101, building: main}\n"
                   "  - {id: \"on\", building: \"1.2\"}  # the odd one\n  - {id: lab-1, building: science}\n")
    assert cli("device", "add", "off", str(spec), "--attr", "building=yes").code == 0
    assert cli("device", "revoke", "room-101", str(spec)).code == 0
    text = reg.read_text()
    assert text == ("# rooms, reviewed like code\ndevices:\n  # main building\n"
                    "  - {id: \"on\", building: \"1.2\"}  # the odd one\n  - {id: lab-1, building: science}\n"
                    "  - {id: \"off\", building: \"yes\"}\n")
    assert yaml.safe_load(text)["devices"][0] == {"id": "on", "building": "1.2"}  # a YAML 1.1 reader agrees
    r = cli("device", "list", str(spec), "--json")
    assert [d["id"] for d in json.loads(r.out)["devices"]] == ["on", "lab-1", "off"]


@pytest.mark.parametrize("attr", ["Bad=x", "id=x", "site\n=x", "x: y=z", "site=a b", "site=", "site", "a.b=1", "building=x"])
def test_add_checks_attribute_names_and_values(cli, tmp_path: Path, attr: str) -> None:
    shutil.copytree(EXAMPLES / "device-file", tmp_path / "d")
    spec = tmp_path / "d" / "platform.yaml"
    reg = tmp_path / "d" / "devices.yaml"
    before = reg.read_bytes()
    r = cli("device", "add", "room-9", str(spec), "--attr", "building=annex", "--attr", attr)
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, r.err
    assert reg.read_bytes() == before


def test_add_with_a_missing_vault_key_or_secret_changes_nothing(cli, spec: Path, isolated_state: Path,
                                                                   monkeypatch) -> None:
    import os

    reg = spec.parent / "devices.csv"
    before = reg.read_bytes()
    with monkeypatch.context() as m:
        m.setenv("IOTPLAT_VAULT_PASSWORD_FILE", str(spec.parent / "no-such-key"))
        r = cli("device", "add", "sensor-0100", str(spec))
    assert r.code == 1 and "vault password file not found" in r.err and len(r.err.strip().splitlines()) == 1
    assert reg.read_bytes() == before and not (isolated_state / "demo").exists()
    monkeypatch.delenv("GRAFANA_PW_TEST", raising=False)
    spec.write_text(spec.read_text() + "secrets:\n  grafana_admin_password: {env: GRAFANA_PW_TEST}\n")
    r = cli("device", "add", "sensor-0100", str(spec))
    assert r.code == 2 and "GRAFANA_PW_TEST" in r.err and reg.read_bytes() == before
    assert "sensor-0100" not in _users(isolated_state)
    assert not [n for n in os.listdir(spec.parent) if "iotplat-new" in n]


def test_the_registry_is_validated_before_it_is_replaced(cli, tmp_path: Path, monkeypatch) -> None:
    """While the whole spec is validated with the new registry, the file in place is still the old one (the old
    code renamed first and validated after: a reader in between saw an unvalidated registry)."""
    from iotplat.spec import load

    shutil.copytree(EXAMPLES / "device-file", tmp_path / "d")
    spec = tmp_path / "d" / "platform.yaml"
    reg = tmp_path / "d" / "devices.yaml"
    before = reg.read_bytes()
    seen = []
    real = load.validate_spec

    def spy(*a, **k):
        seen.append(reg.read_bytes())
        return real(*a, **k)

    monkeypatch.setattr(load, "validate_spec", spy)
    assert cli("device", "add", "room-7", str(spec), "--attr", "building=annex").code == 0
    assert seen == [before] and reg.read_bytes() != before
    seen.clear()
    r = cli("device", "add", "room-8", str(spec))  # no building: its topic cannot be formed
    assert r.code == 2 and "room-8" not in reg.read_text() and len(seen) == 1


def test_a_failed_state_commit_puts_the_old_registry_back(cli, spec: Path, isolated_state: Path,
                                                          monkeypatch) -> None:
    from iotplat.secrets.state import State

    reg = spec.parent / "devices.csv"
    assert cli("render", str(spec), "--out", str(spec.parent / "b")).code == 0
    before, users = reg.read_bytes(), dict(_users(isolated_state))

    def broken_save(self) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(State, "save", broken_save)
        for args in (("add", "sensor-0100"), ("revoke", "sensor-0002")):
            r = cli("device", *args, str(spec))
            assert r.code == 1 and "Traceback" not in r.err
            assert reg.read_bytes() == before
    assert _users(isolated_state) == users


_CRASHER = """
import os, sys
import iotplat.spec.load as load
limit, calls = int(sys.argv[1]), [0]
def crash_at(fn):
    def step(*a, **k):
        calls[0] += 1
        if calls[0] == limit:
            os._exit(99)  # the process dies here: no cleanup, no finally
        return fn(*a, **k)
    return step
os.replace, os.fsync = crash_at(os.replace), crash_at(os.fsync)
load.load_platform, load.validate_spec = crash_at(load.load_platform), crash_at(load.validate_spec)
from iotplat.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _crash_each_step(spec: Path, args: tuple[str, ...], before_each, after_each) -> int:
    """Run `iotplat device ARGS` killed at its 1st, 2nd, ... spec load/validation, fsync or rename, until a run
    completes; returns the exit code of that run."""
    import subprocess
    import sys

    from tests.helpers import REPO

    for n in range(1, 40):
        before_each()
        r = subprocess.run([sys.executable, "-c", _CRASHER, str(n), "device", *args, str(spec)], cwd=REPO,
                           capture_output=True, text=True, timeout=120, check=False)
        after_each(n, r.returncode)
        if r.returncode != 99:
            assert n >= 4, n  # it crashed at least at: load, temp fsync, validation, rename
            return r.returncode
    raise AssertionError("the command never completed")


def test_a_crash_at_any_step_leaves_a_valid_registry(cli, spec: Path, isolated_state: Path) -> None:
    """`device add` / `device revoke` killed at every step in turn: the registry is always the old or the new file
    (never half written, never unvalidated) and the spec validates; a device whose revoke died after the registry
    changed but before the state was saved still gets a new credential when it is added again."""
    reg = spec.parent / "devices.csv"
    assert cli("render", str(spec), "--out", str(spec.parent / "b")).code == 0
    start = reg.read_text()
    pristine = spec.parent / "pristine-state"
    shutil.copytree(isolated_state, pristine)
    old_password = _users(isolated_state)["sensor-0002"]["password"]

    def reset() -> None:
        reg.write_text(start)
        shutil.rmtree(isolated_state)
        shutil.copytree(pristine, isolated_state)

    def check_add(n: int, code: int) -> None:
        assert reg.read_text() in (start, start + "sensor-0100\n"), n
        assert cli("validate", str(spec)).code == 0

    assert _crash_each_step(spec, ("add", "sensor-0100"), reset, check_add) == 0
    assert reg.read_text() == start + "sensor-0100\n"

    def check_revoke(n: int, code: int) -> None:
        assert reg.read_text() in (start, start.replace("sensor-0002\n", "")), n
        assert cli("validate", str(spec)).code == 0
        if "sensor-0002" not in reg.read_text():  # whether or not the state was saved
            assert cli("device", "add", "sensor-0002", str(spec)).code == 0
            assert _users(isolated_state)["sensor-0002"]["password"] != old_password, n

    assert _crash_each_step(spec, ("revoke", "sensor-0002"), reset, check_revoke) == 0


def test_a_crash_during_a_refused_edit_leaves_the_old_registry(tmp_path: Path) -> None:
    """An edit that fails validation (a device without the attribute its topic needs), killed at every step: the
    registry on disk is never the unvalidated one (the old code renamed it into place, then validated)."""
    shutil.copytree(EXAMPLES / "device-file", tmp_path / "d")
    spec = tmp_path / "d" / "platform.yaml"
    reg = tmp_path / "d" / "devices.yaml"
    start = reg.read_bytes()

    def check(n: int, code: int) -> None:
        assert reg.read_bytes() == start, (n, reg.read_text())

    assert _crash_each_step(spec, ("add", "room-8"), lambda: None, check) == 2


def test_kit_refuses_the_canary(cli, tmp_path: Path) -> None:
    shutil.copytree(EXAMPLES / "aws", tmp_path / "a")
    spec = tmp_path / "a" / "platform.yaml"
    for dev in ("iotplat-canary", "iotplat-worker-1"):
        r = cli("device", "kit", dev, str(spec), "--json")
        assert r.code == 2, r.out
        data = json.loads(r.out)
        assert "password" not in data and data["exit_code"] == 2
    assert "canary" in json.loads(cli("device", "kit", "iotplat-canary", str(spec), "--json").out)["error"]
