"""NATS's MQTT topic <-> subject mapping, and the names the worker's JetStream consumers get.

Stdlib only: the worker (NATS transport) and the controller (``iotplat.nats``: permissions, stream plan)
share this one implementation, so a device's permission, the stream's filter and the topic the worker
routes on cannot disagree.

nats-server's MQTT layer turns a PUBLISH topic into a NATS subject (server/mqtt.go,
``mqttToNATSSubjectConversion``; the same in 2.9 and 2.10 except for ``.``):

- ``/`` between two levels becomes ``.``  (``a/b`` -> ``a.b``);
- an empty level keeps a ``/`` inside the token: a leading ``/`` becomes ``/.``, a ``/`` before another
  ``/`` or at the end becomes ``./``  (``/a`` -> ``/.a``, ``a//b`` -> ``a./.b``, ``a/`` -> ``a./``);
- ``.`` inside a level: refused by 2.9 (the PUBLISH is an error and the connection is closed); 2.10 maps it
  to ``//``  (``a.b/c`` -> ``a//b.c``);
- a space anywhere: refused by both;
- ``+`` and ``#`` in a topic name: refused; in a filter they become ``*`` and ``>``.

A NATS wildcard is a whole token ``*`` or ``>``. A topic level that is exactly ``*`` or ``>`` is legal in
MQTT but turns into a wildcard token in NATS: in a permission or a stream filter it would grant far more
than one device's topic. Such levels (and ``.``, spaces, control characters, empty levels) are refused by
:func:`check_topic_level`; the spec validator and the permission builder both call it.

QoS 1 messages are stored by the MQTT layer in the stream ``$MQTT_msgs`` under ``$MQTT.msgs.<subject>``
*before* it sends the PUBACK (server/mqtt.go, ``mqttProcessPub``/``mqttInitiateMsgDelivery``): that is the
stream the worker consumes, so a device's PUBACK means the message is in the stream the worker reads.
"""

from __future__ import annotations

import hashlib

MQTT_STREAM = "$MQTT_msgs"
MQTT_STREAM_PREFIX = "$MQTT.msgs."


class SubjectError(ValueError):
    """A topic or filter that has no faithful NATS subject (the message says why)."""


def check_topic_level(level: str) -> str | None:
    """Why one concrete MQTT topic level cannot be carried through NATS as one literal token, or None."""
    if not level:
        return "an empty level (NATS keeps a '/' inside the token; iotplat refuses it)"
    if level in ("*", ">"):
        return f"the level {level!r} is a NATS wildcard token"
    if "." in level:
        return "'.' inside a level (nats-server 2.9 refuses the PUBLISH; 2.10 maps it to '//')"
    for ch in level:
        if ch in " \t" or ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
            return f"a space or control character ({ch!r}) inside a level"
        if ch in "+#":
            return f"an MQTT wildcard ({ch!r}) in a topic name"
    return None


def mqtt_to_subject(topic: str, *, dots: bool = True, wildcards: bool = False) -> str:
    """The NATS subject nats-server gives the MQTT topic (or, with ``wildcards``, the topic filter).

    ``dots``: the 2.10 rule (``.`` -> ``//``); False: the 2.9 rule (a ``.`` is refused)."""
    out: list[str] = []
    n = len(topic)
    for i, ch in enumerate(topic):
        if ch == "/":
            if i == 0 or (out and out[-1].endswith(".")):
                out.append("/.")
            elif i == n - 1 or topic[i + 1] == "/":
                out.append("./")
            else:
                out.append(".")
        elif ch == " ":
            raise SubjectError(f"{topic!r}: a space cannot be mapped to a NATS subject")
        elif ch == ".":
            if not dots:
                raise SubjectError(f"{topic!r}: nats-server 2.9 refuses '.' in an MQTT topic")
            out.append("//")
        elif ch in "+#":
            if not wildcards:
                raise SubjectError(f"{topic!r}: wildcards are not allowed in a topic name")
            out.append("*" if ch == "+" else ">")
        else:
            out.append(ch)
    subject = "".join(out)
    if subject.endswith("."):  # the topic "/" (or one ending in an empty level after "/."): as nats-server
        subject += "/"
    return subject


def subject_to_mqtt(subject: str) -> str:
    """The MQTT topic of a NATS subject (the reverse of :func:`mqtt_to_subject`, as nats-server does it)."""
    if "/" not in subject:
        return subject.replace(".", "/")
    out: list[str] = []
    i, n = 0, len(subject)
    while i < n:
        ch = subject[i]
        if ch == "/":
            if i + 1 < n and subject[i + 1] in "./":
                out.append("/" if subject[i + 1] == "." else ".")
                i += 2
                continue
            i += 1  # the '/' that marks an empty level next to a separator
            continue
        out.append("/" if ch == "." else ch)
        i += 1
    return "".join(out)


def template_filter_subject(filter_: str, prefix: str = "") -> str:
    """A stream/consumer filter subject for an MQTT filter (``devices/+/telemetry``); a ``$share/<g>/``
    prefix is dropped (a JetStream consumer shared by every replica replaces MQTT's shared subscription)."""
    if filter_.startswith("$share/"):
        parts = filter_.split("/", 2)
        if len(parts) < 3 or not parts[2]:
            raise SubjectError(f"{filter_!r}: a shared subscription needs a filter after the group")
        filter_ = parts[2]
    for level in filter_.split("/"):
        if level in ("+", "#"):
            continue
        why = check_topic_level(level)
        if why:
            raise SubjectError(f"{filter_!r}: {why}")
    return prefix + mqtt_to_subject(filter_, wildcards=True)


def durable_name(prefix: str, filter_subject: str) -> str:
    """The durable consumer for one filter subject: stable for the filter (not its position in a list),
    a single subject token (letters, digits, ``-``, ``_``), and computable by the permission builder."""
    digest = hashlib.sha256(filter_subject.encode()).hexdigest()[:12]
    return f"{prefix}_{digest}"
