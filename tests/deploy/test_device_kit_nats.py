"""`iotplat device kit` on broker.engine nats lists every broker node (any node serves every device) and says
how to fail over; Mosquitto keeps its one `broker` and gets a one-entry `brokers` list."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import EXAMPLES, PLATFORM_DIR

ADDRESSES = {"n1": "10.238.0.11", "n2": "10.238.0.12", "n3": "10.238.0.13"}


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    for f in (EXAMPLES / "cluster").iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "devices.csv").write_text("id\ntruck-1\n")
    spec = yaml.safe_load((tmp_path / "platform.yaml").read_text())
    spec["devices"]["registry"] = "devices.csv"
    (tmp_path / "platform.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tmp_path / "platform.yaml"


def _deployed(spec: Path, addresses: dict[str, str]) -> None:
    """What `iotplat up` records: the hosts' addresses (deployed.json in the platform's state)."""
    from iotplat.secrets.state import State, resolve_state_root
    from iotplat.spec.load import load_platform

    p = load_platform(spec)
    state = State.open(resolve_state_root(None, p.spec.state.dir, p.spec_dir), p.name, p.environment)
    with state.lock("test"):
        state.write_json("deployed.json", {"hosts": addresses})


def test_nats_kit_lists_every_node(cli, cluster: Path, isolated_state: Path) -> None:
    r = cli("device", "kit", "truck-1", str(cluster), "--json")
    assert r.code == 1 and "not known yet" in r.err  # before a deploy: no address to give
    _deployed(cluster, ADDRESSES)
    r = cli("device", "kit", "truck-1", str(cluster), "--json")
    assert r.code == 0, r.err
    kit = json.loads(r.out)
    assert kit["brokers"] == [{"address": a, "port": 8883, "tls_name": kit["broker"]["tls_name"]}
                              for a in ADDRESSES.values()]
    assert kit["broker"] == kit["brokers"][0]
    assert kit["broker"]["tls_name"].startswith("broker."), kit["broker"]
    assert "-V mqttv311" in kit["example"]  # nats-server's MQTT has no version 5
    text = cli("device", "kit", "truck-1", str(cluster)).out
    assert "brokers:   10.238.0.11:8883, 10.238.0.12:8883, 10.238.0.13:8883" in text
    assert "client library the whole list" in text and "mosquitto_pub takes one -h" in text
    assert "MQTT 3.1.1, TLS only" in text


def test_nats_kit_with_a_server_name_before_a_deploy(cli, cluster: Path, isolated_state: Path) -> None:
    """A DNS round-robin name (or a load balancer) in broker.server_names: the one entry until the nodes'
    addresses are known, then every node (the name verifies them all)."""
    spec = yaml.safe_load(cluster.read_text())
    spec["broker"]["server_names"] = ["mqtt.fleet.example.com"]
    cluster.write_text(yaml.safe_dump(spec, sort_keys=False))
    kit = json.loads(cli("device", "kit", "truck-1", str(cluster), "--json").out)
    assert kit["brokers"] == [{"address": "mqtt.fleet.example.com", "port": 8883, "tls_name": "mqtt.fleet.example.com"}]
    _deployed(cluster, ADDRESSES)
    kit = json.loads(cli("device", "kit", "truck-1", str(cluster), "--json").out)
    assert [b["address"] for b in kit["brokers"]] == list(ADDRESSES.values())
    assert {b["tls_name"] for b in kit["brokers"]} == {"mqtt.fleet.example.com"}


def test_mosquitto_kit_has_one_broker(cli, tmp_path: Path, isolated_state: Path) -> None:
    shutil.copytree(EXAMPLES / "aws", tmp_path / "a")
    kit = json.loads(cli("device", "kit", "truck-002", str(tmp_path / "a" / "platform.yaml"), "--json").out)
    assert kit["brokers"] == [kit["broker"]] and "-V mqttv5" in kit["example"]
    shutil.copy(PLATFORM_DIR / "platform.yaml", tmp_path / "platform.yaml")
    shutil.copy(PLATFORM_DIR / "devices.csv", tmp_path / "devices.csv")
    spec = tmp_path / "platform.yaml"
    _deployed(spec, {"core": "10.1.2.3"})
    r = cli("device", "kit", "sensor-0001", str(spec), "--json")
    assert r.code == 0, r.err
    kit = json.loads(r.out)
    assert kit["brokers"] == [kit["broker"]] and kit["broker"]["address"] == "10.1.2.3"
    assert "brokers:" not in cli("device", "kit", "sensor-0001", str(spec)).out
