"""The frozen, resolved platform: the validated spec of one environment plus everything derived from it.

Every later stage (render, deploy, verify) reads a Platform, never raw YAML. Derived values (queue
sizes, placement, replica-to-host assignment, InfluxDB names and package pins) are computed here,
once, so the broker, the worker and the checks cannot disagree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from iotplat.spec.devices import Device
from iotplat.spec.model import RELEASES, SERVICES, Package, PlatformSpec

# Pinned package versions deployed when the spec does not pin its own: per Debian release, the version that
# release's archive (with its security updates) ships. A host is configured with its own release's pin.
MOSQUITTO_PINS = {"debian-12": "2.0.11-1.2+deb12u2", "debian-13": "2.0.21-1"}
# nats-server (broker.engine: nats): Debian 12's 2.9.10 and Debian 13's 2.10.27 (the archives' builds).
NATS_PINS = {"debian-12": "2.9.10-1+b3", "debian-13": "2.10.27-1+b2"}
INFLUXDB1_PINS = {"debian-12": "1.6.7~rc0-1+b13", "debian-13": "1.6.7~rc0-2+b12"}
INFLUXDB1_PACKAGE = Package(source="distro", version=dict(INFLUXDB1_PINS))  # type: ignore[arg-type]
INFLUXDB2_PACKAGE = Package(source="upstream", version="2.7.11-1")


def release_pins(version: str | dict[str, str]) -> dict[str, str]:
    """A spec's version pin as {release: version}: one version applies to every release; a mapping names its
    releases (a release it leaves out cannot be deployed: the role's preflight says so)."""
    if isinstance(version, str):
        return {r: version for r in RELEASES}
    return {r: version[r] for r in RELEASES if r in version}


WORKER_USER_PREFIX = "iotplat-worker-"
GRAFANA_INFLUX_USER = "iotplat-grafana"
INFLUX_ADMIN_USER = "iotplat-admin"
WORKER_INFLUX_USER = "iotplat-worker"

_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


def template_names(template: str) -> list[str]:
    return _PLACEHOLDER.findall(template)


def template_filter(template: str) -> str:
    """devices/{device}/telemetry -> devices/+/telemetry"""
    return _PLACEHOLDER.sub("+", template)


def filter_covers(outer: str, inner: str) -> bool:
    """True if every topic matched by filter `inner` is matched by filter `outer`."""
    o, i = outer.split("/"), inner.split("/")
    for n, level in enumerate(o):
        if level == "#":
            return True
        if n >= len(i):
            return False
        if level == "+":
            if i[n] == "#":
                return False
            continue
        if level != i[n]:
            return False
    return len(o) == len(i)


def topic_matches(filter_: str, topic: str) -> bool:
    return filter_covers(filter_, topic)


@dataclass(frozen=True)
class Replica:
    number: int  # 1..N
    host: str

    @property
    def username(self) -> str:
        return f"{WORKER_USER_PREFIX}{self.number}"


@dataclass(frozen=True)
class Platform:
    spec: PlatformSpec
    environment: str
    spec_file: str  # as the user named it (used in messages only)
    spec_dir: Path
    devices: tuple[Device, ...] = field(repr=False)

    # ---- identity
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def key(self) -> str:
        """platform/environment: the key of everything iotplat keeps."""
        return f"{self.spec.name}/{self.environment}"

    @property
    def target(self) -> str:
        return self.spec.target.kind

    # ---- placement
    @cached_property
    def placement(self) -> dict[str, list[str]]:
        """service -> the hosts that run it (none for a service the spec switches off, e.g. grafana.enabled)."""
        from iotplat.services import get

        out: dict[str, list[str]] = {s: [] for s in SERVICES}
        for host in self.spec.hosts:
            for svc in host.services:
                out[svc].append(host.name)
        for name in out:
            if not get(name).enabled(self):
                out[name] = []
        return out

    def host_of(self, service: str) -> str:
        return self.placement[service][0]

    def services_on(self, host: str) -> list[str]:
        if host not in self.host_names:
            raise KeyError(host)
        return [s for s in SERVICES if host in self.placement[s]]

    @property
    def host_names(self) -> list[str]:
        return [h.name for h in self.spec.hosts]

    @cached_property
    def replicas(self) -> tuple[Replica, ...]:
        hosts = self.placement["worker"]
        if not hosts:
            return ()
        return tuple(Replica(n, hosts[(n - 1) % len(hosts)]) for n in range(1, self.spec.ingestion.replicas + 1))

    def replicas_on(self, host: str) -> list[Replica]:
        return [r for r in self.replicas if r.host == host]

    # ---- logical names
    def service_name(self, service: str) -> str:
        return f"{service}.{self.spec.network.domain}"

    def host_fqdn(self, host: str) -> str:
        return f"{host}.{self.spec.network.domain}"

    # ---- derived broker limits (one place, so broker and worker agree)
    @property
    def inflight(self) -> int:
        return self.spec.broker.limits.inflight_messages or self.spec.ingestion.inflight

    @property
    def per_replica_rate(self) -> float:
        return self.spec.ingestion.peak_rate / self.spec.ingestion.replicas

    @property
    def queue_messages(self) -> int:
        explicit = self.spec.broker.limits.queue_messages
        if explicit:
            return explicit
        needed = math.ceil(self.per_replica_rate * self.spec.ingestion.outage_budget * 1.25)
        return max(1000, needed)

    @property
    def queue_bytes(self) -> int:
        explicit = self.spec.broker.limits.queue_bytes
        if explicit:
            return explicit
        return self.queue_messages * max(256, self.spec.ingestion.typical_message) * 2

    @property
    def spool_needed(self) -> int:
        """Spool bytes one replica needs to ride out `outage_budget` of InfluxDB at peak rate."""
        return math.ceil(self.per_replica_rate * self.spec.ingestion.outage_budget * self.spec.ingestion.typical_message)

    # ---- influxdb
    @property
    def influx_database(self) -> str:
        return self.spec.influxdb.database or "iot"

    @property
    def influx_retention_policy(self) -> str:
        return self.spec.influxdb.retention_policy or "iotplat"

    @property
    def influx_org(self) -> str:
        return self.spec.influxdb.org or "iotplat"

    @property
    def influx_bucket(self) -> str:
        return self.spec.influxdb.bucket or "iot"

    @property
    def mosquitto_pins(self) -> dict[str, str]:
        v = self.spec.broker.version
        return dict(MOSQUITTO_PINS) if v is None else release_pins(v)

    @property
    def nats_pins(self) -> dict[str, str]:
        """nats-server's pins (broker.engine: nats): broker.version pins the engine's package."""
        v = self.spec.broker.version
        return dict(NATS_PINS) if v is None else release_pins(v)

    @property
    def influx_package(self) -> Package:
        if self.spec.influxdb.package:
            return self.spec.influxdb.package
        return INFLUXDB1_PACKAGE if self.spec.influxdb.version == 1 else INFLUXDB2_PACKAGE

    # ---- devices
    @cached_property
    def canary(self) -> Device:
        c = self.spec.devices.canary
        names = {n for t in self.spec.devices.topics for n in template_names(t)} - {"device"}
        attrs = {n: c.attributes.get(n, "canary") for n in sorted(names)}
        return Device(c.id, tuple(sorted(attrs.items())))

    @property
    def all_devices(self) -> tuple[Device, ...]:
        """Registry devices plus the canary (which goes through exactly the same ACL and pipeline)."""
        return (*self.devices, self.canary)
