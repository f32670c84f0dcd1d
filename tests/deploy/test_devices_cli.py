"""`iotplat device add|list|revoke|kit` edit the registry (the source of truth) and the state's credentials."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

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
