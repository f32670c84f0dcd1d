"""Device isolation and credentials on a real 3-node nats-server 2.9.10 cluster, proven from the subscriber side:
an observer allowed to read every subject of the account (``>``, which also shows what the MQTT layer stores in
``$MQTT_msgs``) sees a device's own publish and never one outside its grant."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from iotplat.nats.config import Permissions
from iotplat.nats.permissions import (PermissionError_, WorkerGrant, device_permissions, device_topics,
                                      template_problems, worker_permissions)
from support.natscluster import MqttProbe, NatsCluster, NatsObserver

OBSERVER = {"observer": ("observer-secret-0123456789abcdef", Permissions(publish=(), subscribe=(">",)), ("STANDARD",))}


def test_device_permissions_from_templates() -> None:
    t = device_topics("sensor-7", {"site": "berlin"}, ["site/{site}/device/{device}/telemetry", "devices/{device}/status"])
    assert t.topics == ("site/berlin/device/sensor-7/telemetry", "devices/sensor-7/status")
    p = device_permissions(t)
    assert p.publish == ("site.berlin.device.sensor-7.telemetry", "devices.sensor-7.status") and p.subscribe == ()


@pytest.mark.parametrize("device, attrs, template", [
    ("*", {}, "devices/{device}/telemetry"),           # would be devices.*.telemetry: every device's subject
    (">", {}, "devices/{device}"),                      # would be devices.>: everything under devices
    ("a.b", {}, "devices/{device}/telemetry"),          # a '.' splits the token: devices.a.b.telemetry
    ("a b", {}, "devices/{device}/telemetry"),
    ("dev\n1", {}, "devices/{device}/telemetry"),
    ("", {}, "devices/{device}/telemetry"),
    ("dev1", {"site": "*"}, "site/{site}/{device}"),
    ("dev1", {"site": "x.y"}, "site/{site}/{device}"),
    ("dev1", {}, "devices/*/{device}"),                 # a literal '*' level in the template itself
    ("dev1", {}, "devices/>/{device}"),
])
def test_hostile_ids_values_and_templates_cannot_widen(device: str, attrs: dict, template: str) -> None:
    with pytest.raises(PermissionError_):
        device_permissions(device_topics(device, attrs, [template]))


def test_template_problems_for_the_spec_validator() -> None:
    assert template_problems("devices/{device}/telemetry") == []
    assert template_problems("site/{site}/{device}") == []
    assert len(template_problems("devices/*/{device}/a.b")) == 2


def test_worker_grant_is_exact() -> None:
    p = worker_permissions(WorkerGrant("iotplat-worker-2"), ["devices/+/telemetry"], "iotplat/dead-letters")
    assert p.subscribe == ("_INBOX.iotplat-worker-2.>",)
    assert "iotplat.dead-letters" in p.publish
    assert all(s.startswith(("$JS.API.STREAM.", "$JS.API.CONSUMER.", "$JS.ACK.$MQTT_msgs.iotplat_", "iotplat."))
               for s in p.publish)
    assert not any(s.endswith((".*", "$MQTT_msgs.>")) or s == ">" for s in p.publish)


def test_isolation_from_the_subscriber_side(clusters: list) -> None:
    """dev000 (on node 1) publishes its own topic, then dev001's, a topic with a level beyond its own, and
    literal '*' / '>' levels; dev001's own publish (node 2) is the marker that everything before it has
    been delivered. The observer (node 3) gets dev000's and dev001's own messages, stored in $MQTT_msgs, and
    nothing else, although NATS answers every QoS 1 PUBLISH with a PUBACK (as Mosquitto does)."""
    c = NatsCluster.start(3, devices=2, workers=0, extra_users=OBSERVER)
    clusters.append(c)
    n1, n2, n3 = c.nodes
    obs = NatsObserver(n3.client_port, "observer", c.passwords["observer"], c.ca_file)
    a = MqttProbe(n1.mqtt_port, "dev000", c.passwords["dev000"], c.ca_file)
    b = MqttProbe(n2.mqtt_port, "dev001", c.passwords["dev001"], c.ca_file)
    try:
        assert a.wait_connack(30) == 0 and b.wait_connack(30) == 0
        assert a.publish("devices/dev000/telemetry", b"own") == "acked"
        assert obs.wait_for(lambda s, d: d == b"own" and s == "$MQTT.msgs.devices.dev000.telemetry", 20)
        for topic in ("devices/dev001/telemetry", "devices/dev000/telemetry/more", "devices/*/telemetry",
                      "devices/>/telemetry", "devices/dev000", "other/dev000/telemetry"):
            assert a.publish(topic, b"forbidden") == "acked", topic
        assert b.publish("devices/dev001/telemetry", b"marker") == "acked"
        assert a.publish("devices/dev000/telemetry", b"marker-a") == "acked"
        assert obs.wait_for(lambda s, d: d == b"marker" and s == "$MQTT.msgs.devices.dev001.telemetry", 20)
        assert obs.wait_for(lambda s, d: d == b"marker-a" and s == "$MQTT.msgs.devices.dev000.telemetry", 20)
        assert [s for s, d in obs.seen if d == b"forbidden"] == []
        # a device subscribes to nothing, not even its own topic
        assert a.subscribe("devices/dev001/telemetry") == [0x80] and a.subscribe("#") == [0x80]
    finally:
        for x in (a, b, obs):
            x.close()


def _nats_connect(port: int, user: str, password: str, ca: str) -> str:
    async def go() -> str:
        import nats

        try:
            nc = await nats.connect(f"tls://127.0.0.1:{port}", tls=ssl.create_default_context(cafile=ca), user=user,
                                    password=password, allow_reconnect=False, connect_timeout=5, max_reconnect_attempts=0)
        except Exception as e:
            return f"refused: {e}"
        await nc.close()
        return "connected"
    return asyncio.run(go())


def test_credentials_refused(clusters: list) -> None:
    """Over MQTT: a wrong password, an unknown user and no credentials at all are refused (CONNACK 5, not
    authorized), a worker's credential too (NATS protocol only); over the NATS protocol a device's credential
    is refused (MQTT only). The right credential connects, on every node."""
    c = NatsCluster.start(3, devices=2, workers=1)
    clusters.append(c)
    for n in c.nodes:
        ok = MqttProbe(n.mqtt_port, "dev000", c.passwords["dev000"], c.ca_file)
        assert ok.wait_connack(30) == 0
        ok.close()
    node = c.nodes[1]
    for user, pw in (("dev000", "wrong-password-0123456789abcdef"), ("dev000", c.passwords["dev001"]),
                     ("nobody", "nobody-password-0123456789abcdef"), (None, None),
                     ("iotplat-worker-1", c.passwords["iotplat-worker-1"])):
        p = MqttProbe(node.mqtt_port, user, pw, c.ca_file, client_id=f"probe-{user}")
        try:
            assert p.wait_connack() in (4, 5, 0x86, 0x87), user  # paho 2 reports 3.1.1 codes as v5 reason codes
        finally:
            p.close()
    assert _nats_connect(node.client_port, "iotplat-worker-1", c.passwords["iotplat-worker-1"], c.ca_file) == "connected"
    assert _nats_connect(node.client_port, "dev000", c.passwords["dev000"], c.ca_file).startswith("refused")
    assert _nats_connect(node.client_port, "iotplat-worker-1", "wrong-0123456789", c.ca_file).startswith("refused")
