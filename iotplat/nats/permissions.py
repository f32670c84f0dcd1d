"""NATS subject permissions derived from the platform: what each device, worker replica and the canary may do.

Devices (and the canary, which goes through exactly the same rules): publish to the subjects of their own
topics only (``devices.topics`` with ``{device}`` and the registry columns filled in), subscribe to
nothing, connect over MQTT only. nats-server applies a user's publish permissions to the subject its MQTT
layer derives from the topic, and still answers a refused QoS 1 PUBLISH with a PUBACK (as Mosquitto does):
the message is dropped, never delivered or stored. The MQTT layer's own subjects (``$MQTT.sess.*``,
``$MQTT.msgs.*``, the JetStream API it calls) are used by the server's internal clients, not with the
device's permissions, so a publish-only device needs no ``$MQTT.`` grant; an MQTT *subscriber* with QoS 1
would need ``$MQTT.sub.>`` (none is granted here: devices only publish, as with Mosquitto's ACL).

Worker replicas: the NATS protocol only; exactly the JetStream API subjects of their stream and durable
consumers (info, create, pull, ack), publish to the dead-letter subject, and subscribe only to their own
reply inbox ``_INBOX.<user>.>`` (so one replica cannot read what another pulled).

Every concrete topic level is checked by :func:`iotplat.worker.nats_subjects.check_topic_level`: a device
id or registry value that would become a NATS wildcard (``*``, ``>``), contain ``.`` (a token separator) or
a space is refused with :class:`PermissionError_`, never turned into a wider permission.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from iotplat.nats.config import Permissions, check_subject
from iotplat.worker.nats_subjects import (MQTT_STREAM, MQTT_STREAM_PREFIX, check_topic_level, durable_name,
                                          mqtt_to_subject, template_filter_subject)

_NAMED_PREFIX = "{"


class PermissionError_(ValueError):
    """A device, template or value whose permission cannot be expressed exactly (the message says which)."""


@dataclass(frozen=True)
class DeviceTopics:
    """A device's concrete MQTT topics and the NATS subjects they become."""

    device: str
    topics: tuple[str, ...]
    subjects: tuple[str, ...]


def fill_template(template: str, values: Mapping[str, str]) -> str:
    """``site/{site}/device/{device}/telemetry`` with the values put in; every level checked."""
    levels = []
    for level in template.split("/"):
        if level.startswith(_NAMED_PREFIX) and level.endswith("}"):
            name = level[1:-1]
            if name not in values:
                raise PermissionError_(f"{template!r}: no value for {{{name}}}")
            value = values[name]
            why = check_topic_level(value)
            if why:
                raise PermissionError_(f"{template!r}: {{{name}}} = {value!r}: {why}")
            levels.append(value)
        else:
            why = check_topic_level(level)
            if why:
                raise PermissionError_(f"{template!r}: level {level!r}: {why}")
            levels.append(level)
    return "/".join(levels)


def template_problems(template: str) -> list[str]:
    """What keeps a ``devices.topics`` template from working on the NATS engine (empty = fine); for the
    spec validator, which reports each with the template's position."""
    problems = []
    for level in template.split("/"):
        if level.startswith(_NAMED_PREFIX) and level.endswith("}"):
            continue
        why = check_topic_level(level)
        if why:
            problems.append(f"level {level!r}: {why}")
    return problems


def device_topics(device: str, attributes: Mapping[str, str], templates: Iterable[str]) -> DeviceTopics:
    values = {**attributes, "device": device}
    topics = tuple(fill_template(t, values) for t in templates)
    subjects = tuple(mqtt_to_subject(t, dots=False) for t in topics)
    for s in subjects:
        check_subject(s, f"device {device!r}")
        if any(tok in ("*", ">") for tok in s.split(".")):  # check_topic_level already refuses them
            raise PermissionError_(f"device {device!r}: {s!r} would be a wildcard permission")
    return DeviceTopics(device, topics, subjects)


def device_permissions(topics: DeviceTopics) -> Permissions:
    """Publish to its own subjects only; subscribe to nothing."""
    return Permissions(publish=tuple(dict.fromkeys(topics.subjects)), subscribe=())


@dataclass(frozen=True)
class WorkerGrant:
    user: str  # the replica's NATS user, also its connection name and reply-inbox token
    stream: str = MQTT_STREAM
    subject_prefix: str = MQTT_STREAM_PREFIX
    durable_prefix: str = "iotplat"


def worker_permissions(grant: WorkerGrant, subscription_filters: Iterable[str], dead_letter_topic: str) -> Permissions:
    """A worker replica's grant: its stream's and consumers' JetStream API, acks, dead letters, own inbox."""
    s = grant.stream
    publish = [f"$JS.API.STREAM.INFO.{s}", f"$JS.API.STREAM.CREATE.{s}", f"$JS.API.STREAM.UPDATE.{s}"]
    for f in subscription_filters:
        subject = template_filter_subject(f, grant.subject_prefix)
        d = durable_name(grant.durable_prefix, subject)
        publish += [f"$JS.API.CONSUMER.INFO.{s}.{d}", f"$JS.API.CONSUMER.DURABLE.CREATE.{s}.{d}",
                    f"$JS.API.CONSUMER.MSG.NEXT.{s}.{d}", f"$JS.ACK.{s}.{d}.>"]
    if dead_letter_topic:
        publish.append(mqtt_to_subject(fill_template(dead_letter_topic, {}), dots=False))
    inbox = f"_INBOX.{grant.user}.>"
    for subj in publish + [inbox]:
        check_subject(subj, f"worker {grant.user!r}")
    return Permissions(publish=tuple(dict.fromkeys(publish)), subscribe=(inbox,))
