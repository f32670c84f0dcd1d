"""The MQTT topic <-> NATS subject mapping (iotplat.worker.nats_subjects) agrees with nats-server 2.9.10 itself:
what an MQTT PUBLISH turns into is read by a NATS subscriber, what a NATS publish turns into is read by an
MQTT subscriber; topics 2.9 refuses ('.' and spaces in a level) are refused by both."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotplat.nats.config import Permissions
from iotplat.worker.nats_subjects import (SubjectError, check_topic_level, durable_name, mqtt_to_subject,
                                          subject_to_mqtt, template_filter_subject)
from support.natscluster import MqttProbe, NatsCluster, NatsObserver

ALL = Permissions(publish=(">",), subscribe=(">",))


@pytest.mark.parametrize("topic, subject", [
    ("a/b", "a.b"), ("devices/dev-1/telemetry", "devices.dev-1.telemetry"), ("/a", "/.a"), ("a/", "a./"),
    ("a//b", "a./.b"), ("/", "/./"), ("//", "/././"), ("a", "a"), ("a$b/ü", "a$b.ü"),
])
def test_mapping_table(topic: str, subject: str) -> None:
    assert mqtt_to_subject(topic) == subject == mqtt_to_subject(topic, dots=False)
    assert subject_to_mqtt(subject) == topic


def test_dots_spaces_and_wildcards() -> None:
    assert mqtt_to_subject("a.b/c") == "a//b.c" and subject_to_mqtt("a//b.c") == "a.b/c"  # the 2.10 rule
    with pytest.raises(SubjectError, match="2.9"):
        mqtt_to_subject("a.b/c", dots=False)
    for bad in ("a b", "a/+/b", "a/#"):
        with pytest.raises(SubjectError):
            mqtt_to_subject(bad)
    assert mqtt_to_subject("a/+/b/#", wildcards=True) == "a.*.b.>"
    assert template_filter_subject("$share/workers/devices/+/telemetry", "$MQTT.msgs.") == "$MQTT.msgs.devices.*.telemetry"
    for bad in ("devices/*/x", "devices/>/x", "devices//x", "devices/a.b/+"):
        with pytest.raises(SubjectError):
            template_filter_subject(bad)


def test_levels_that_would_widen_a_permission_are_refused() -> None:
    for level in ("*", ">", "", "a.b", "a b", "a\tb", "a\nb", "+", "#", "a+", "\x85"):
        assert check_topic_level(level), level
    for level in ("dev-1", "a*b", "x>", "$SYS", "ünï"):
        assert check_topic_level(level) is None, level


def test_durable_names_are_stable_single_tokens() -> None:
    a = durable_name("iotplat", "$MQTT.msgs.devices.*.telemetry")
    assert a == durable_name("iotplat", "$MQTT.msgs.devices.*.telemetry") != durable_name("iotplat", "$MQTT.msgs.x.*")
    assert "." not in a and "*" not in a and a.startswith("iotplat_")


_LEVEL = st.text(st.characters(blacklist_characters="/. +#", blacklist_categories=("Cs", "Cc")), min_size=0, max_size=6)


@given(st.lists(_LEVEL, min_size=1, max_size=6))
def test_round_trip_property(levels: list[str]) -> None:
    topic = "/".join(levels)
    assert subject_to_mqtt(mqtt_to_subject(topic, dots=False)) == topic


def test_mapping_agrees_with_nats_server(clusters: list) -> None:
    """Each MQTT topic, published QoS 1 by an MQTT client, arrives at a NATS subscriber on exactly the
    subject mqtt_to_subject computes; a NATS publish arrives at an MQTT subscriber (#) on exactly the topic
    subject_to_mqtt computes. Topics with '.' or a space: the server closes the connection (no PUBACK)."""
    c = NatsCluster.start(1, devices=0, workers=0, extra_users={
        "mapper": ("mapper-secret-0123456789abcdef", ALL, ("MQTT",)),
        "observer": ("observer-secret-0123456789abcdef", ALL, ("STANDARD",)),
    })
    clusters.append(c)
    node = c.nodes[0]
    obs = NatsObserver(node.client_port, "observer", c.passwords["observer"], c.ca_file)
    pub = MqttProbe(node.mqtt_port, "mapper", c.passwords["mapper"], c.ca_file)
    try:
        assert pub.wait_connack() == 0
        for i, topic in enumerate(["a/b", "/lead", "trail/", "x//y", "/", "dev-1/ü/$x", "a*b/c>"]):
            body = f"m{i}".encode()
            assert pub.publish(topic, body) == "acked", topic
            want = mqtt_to_subject(topic, dots=False)
            assert obs.wait_for(lambda s, d: d == body), (topic, obs.seen[-5:])
            assert obs.wait_for(lambda s, d: d == body and s.startswith("$MQTT.msgs."))
            # delivered on the subject, and stored (QoS 1) in $MQTT_msgs under $MQTT.msgs.<subject>
            assert sorted(s for s, d in obs.seen if d == body) == sorted([want, "$MQTT.msgs." + want]), topic
        sub = MqttProbe(node.mqtt_port, "mapper", c.passwords["mapper"], c.ca_file, client_id="mapper-sub")
        try:
            assert sub.wait_connack() == 0 and sub.subscribe("#") == [0]
            import asyncio

            subjects = ["p.q", "/.lead", "trail./", "x./.y", "dev-1.ü"]
            for s in subjects:
                asyncio.run_coroutine_threadsafe(obs.nc.publish(s, s.encode()), obs._loop).result(5)
            want = [subject_to_mqtt(s) for s in subjects]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # '#' also gets the server's own $MQTT/sess/... (2.9 does not
                got = [t for t, _ in sub.wait_messages(0) if not t.startswith("$")]  # hide '$' topics from '#')
                if len(got) >= len(want):
                    break
                time.sleep(0.05)
            assert got == want
        finally:
            sub.close()
        for bad in ("with.dot", "with space"):
            p = MqttProbe(node.mqtt_port, "mapper", c.passwords["mapper"], c.ca_file, client_id="mapper-bad")
            try:
                assert p.wait_connack() == 0
                assert p.publish(bad, b"x", timeout=5) == "closed", bad
            finally:
                p.close()
    finally:
        pub.close()
        obs.close()
