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

from typing import Final

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
