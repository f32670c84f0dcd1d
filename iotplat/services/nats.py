"""The broker's NATS engine (``broker.engine: nats``): what differs from Mosquitto, in one place.

The spec checks (iotplat/spec/checks.py ``check_broker_engine``) and the broker service read these facts, so
the ports the validator keeps free are the ports the nodes listen on.

- devices: MQTT 3.1.1 over TLS on the spec's MQTT listener (8883 by default), QoS 0 and 1;
- the worker replicas: the NATS protocol over TLS on ``CLIENT_PORT`` (internal: the platform's hosts only);
- the routes between nodes: ``ROUTE_PORT``, mutual TLS with the platform CA (internal);
- monitoring (``/varz``, ``/routez``, ``/jsz``; no authentication in nats-server 2.9): ``MONITOR_PORT`` on
  the host's loopback only, read by ``status`` through SSH.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from iotplat.spec.platform_model import Platform

CLIENT_PORT: Final = 4222
ROUTE_PORT: Final = 6222
MONITOR_PORT: Final = 8222
PORTS: Final = {CLIENT_PORT: "client port (the workers)", ROUTE_PORT: "cluster route port",
                MONITOR_PORT: "monitoring port"}
UNIT: Final = "nats-server"
STORE_DIR: Final = "/var/lib/nats"  # JetStream's store: a data dir (the data disk's bind mount)
CONF: Final = "/etc/nats-server.conf"
# nats-server's max_payload: at least 1 KiB, at most 64 MiB (it warns above 8 MiB).
MIN_PAYLOAD: Final = 1024
MAX_PAYLOAD: Final = 64 << 20

# ----------------------------------------------------------------------------------------- derived values
# Everything below derives from the Platform only (plus the users' bcrypt hashes from the state), so the node
# configurations, the worker's [nats] section and the spec checks agree.

KEY: Final = "/etc/nats-server/iotplat/server.key"  # the host's TLS key (root:nats 0640)
CONF_DIR: Final = "/etc/nats-server/iotplat"
STORE_SLACK: Final = 256 << 20  # JetStream store beyond the device stream: MQTT sessions, retained, meta


def stream_limits(p: Platform) -> dict[str, int]:
    """The device stream's limits: ``ingestion.outage_budget`` of peak traffic from the whole fleet (one stream
    shared by every replica, so the fleet's rate, not a replica's share), with Mosquitto's queue margin (x1.25
    messages, x2 bytes per typical message); ``discard: new`` when full, so devices get no PUBACK and retry
    instead of old messages being dropped."""
    ing = p.spec.ingestion
    msgs = max(1000, math.ceil(ing.peak_rate * ing.outage_budget * 1.25))
    return {"max_msgs": msgs, "max_bytes": msgs * max(256, ing.typical_message) * 2,
            "max_msg_size": p.spec.broker.limits.message_size}


def replicas(p: Platform) -> int:
    """Stream replicas: R3 on a cluster (R5 would add write cost and no safety the issue asks for), R1 alone."""
    return min(3, len(p.placement["broker"]) or 1)


def worker_section(p: Platform) -> dict[str, Any]:
    """The worker's ``[nats]`` (iotplat/worker/config.py): every broker host's client port, TLS verified
    against the platform CA for each host's own name; the shared durable consumer's window from
    ``ingestion.inflight``; the stream kept at ``stream_limits``. The worker creates or updates the stream on
    start (idempotent: STREAM.INFO, then CREATE or UPDATE), so the cluster needs no separate setup step and a
    changed outage budget reaches the stream with the next worker restart."""
    limits = stream_limits(p)
    ing = p.spec.ingestion
    return {
        "servers": [f"{p.host_fqdn(h)}:{CLIENT_PORT}" for h in p.placement["broker"]],
        "inflight": ing.inflight,
        "max_ack_pending": ing.inflight * max(1, ing.replicas),
        "stream_replicas": replicas(p),
        "stream_max_msgs": limits["max_msgs"],
        "stream_max_bytes": limits["max_bytes"],
        "stream_max_msg_size": limits["max_msg_size"],
    }


def usernames(p: Platform) -> list[str]:
    """Every NATS user: the devices and the canary (MQTT only), the worker replicas (NATS protocol only)."""
    return [d.id for d in p.all_devices] + [r.username for r in p.replicas]


def node_configs(p: Platform, hashes: dict[str, str]) -> dict[str, str]:
    """{broker host: its nats-server.conf} from the platform and every user's bcrypt hash (``usernames``).

    The files hold the users' bcrypt hashes, so they are secrets of each broker host (like Mosquitto's password
    file): produced at deploy time from the state, never written to the build directory."""
    from iotplat.nats.config import JetStreamLimits, Listen, Node, TlsFiles, User, cluster_configs
    from iotplat.nats.permissions import WorkerGrant, device_permissions, device_topics, worker_permissions
    from iotplat.render.layout import COMMON_PATHS
    from iotplat.spec.platform_model import template_filter

    spec = p.spec
    users: list[User] = []
    for d in p.all_devices:
        topics = device_topics(d.id, dict(d.attributes), spec.devices.topics)
        users.append(User(d.id, hashes[d.id], device_permissions(topics), ("MQTT",)))
    filters = sorted({template_filter(s.topic) for s in spec.ingestion.subscriptions})
    for r in p.replicas:
        perms = worker_permissions(WorkerGrant(r.username), filters, spec.ingestion.dead_letters.topic)
        users.append(User(r.username, hashes[r.username], perms, ("STANDARD",)))
    hosts = p.placement["broker"]
    nodes = tuple(Node(h, p.host_fqdn(h), ROUTE_PORT) for h in hosts)
    listener = next(lst for lst in spec.broker.listeners if lst.protocol == "mqtt")
    limits = stream_limits(p)
    options: dict[str, object] = {"mqtt_max_ack_pending": min(0xFFFF, max(1, spec.ingestion.inflight)),
                                  "max_payload": spec.broker.limits.message_size}
    if spec.broker.limits.max_connections > 0:
        options["max_connections"] = spec.broker.limits.max_connections
    return cluster_configs(
        p.name, nodes, client_port=CLIENT_PORT, mqtt_port=listener.port, bind=listener.bind,
        monitor={h: Listen("127.0.0.1", MONITOR_PORT) for h in hosts},
        tls=TlsFiles(COMMON_PATHS["server_cert"], KEY, COMMON_PATHS["ca_cert"]),
        jetstream=JetStreamLimits(STORE_DIR, limits["max_bytes"] + STORE_SLACK), users=tuple(users), **options)


def secret_key(host: str) -> str:
    """The key of a broker host's nats-server.conf among the state's secrets (secret_content)."""
    return f"nats_conf:{host}"
