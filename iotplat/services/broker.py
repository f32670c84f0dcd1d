"""The MQTT broker: Mosquitto (role `mosquitto`, templates/mosquitto/), or with `broker.engine: nats` a NATS
JetStream cluster on `broker.nodes` hosts (role `nats`; what differs lives in iotplat/services/nats.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from iotplat.containers.runtime import (container_files, container_vars, image_version_keys, image_versions,
                                        limits_files, runtime_of)
from iotplat.services import nats
from iotplat.services.base import BackupStep, Ingress, SecretFile, Service, ServiceFile, TlsPort

if TYPE_CHECKING:
    from pathlib import Path

    from iotplat.deploy.ops import Context
    from iotplat.hosts import Host
    from iotplat.render.engine import Renderer
    from iotplat.spec.platform_model import Platform
    from iotplat.verify.status import Check, Probe

PERSISTENCE = "/var/lib/mosquitto"
PERSISTENCE_FILE = f"{PERSISTENCE}/mosquitto.db"


def _duration(seconds: float) -> str:
    """persistent_client_expiration takes h d w m y: rounded up to hours."""
    hours = max(1, int(-(-seconds // 3600)))
    return f"{hours // 24}d" if hours % 24 == 0 else f"{hours}h"


def acl_rules(p: Platform) -> tuple[list[str], list[dict[str, Any]], list[str]]:
    """(device patterns, per-device rules, worker read filters) of the ACL: a topic template that names only
    {device} becomes a `pattern` line with %u; one that names registry columns is written per device."""
    from iotplat.spec.platform_model import template_filter, template_names

    patterns: list[str] = []
    per_device: list[dict[str, Any]] = []
    needs_attrs = [t for t in p.spec.devices.topics if set(template_names(t)) - {"device"}]
    for t in p.spec.devices.topics:
        if t not in needs_attrs:
            patterns.append(t.replace("{device}", "%u"))
    if needs_attrs:
        for d in sorted(p.all_devices, key=lambda d: d.id):
            values = {"device": d.id, **dict(d.attributes)}
            per_device.append({"user": d.id, "topics": [t.format(**values) for t in needs_attrs]})
    reads = sorted({template_filter(s.topic) for s in p.spec.ingestion.subscriptions})
    return patterns, per_device, reads


def _save_signal(p: Platform) -> str:
    """The command that makes Mosquitto write its persistence file now (SIGUSR1 to its main process). In a
    container the unit's main process is `docker wait`: the signal goes to the container instead."""
    if runtime_of(p.spec, Broker.name) == "container":
        return "docker kill --signal USR1 mosquitto >/dev/null"
    return "systemctl kill --kill-whom=main -s USR1 mosquitto"


OPEN_FILES_FLOOR = 65536
OPEN_FILES_CEILING = 1 << 20  # the kernel's default nr_open: no process may hold more


def open_files(p: Platform) -> int:
    """The broker's file-descriptor limit (one per device connection, plus its own files): at least 65,536, more
    when broker.limits.max_connections asks for more. Without it Mosquitto keeps systemd's default soft limit of
    1,024 and refuses devices past ~1,017 (measured by bench/connection_storm.py; Mosquitto does not raise it).
    The package runtime's unit gets it (LimitNOFILE: systemd grants at most its own hard limit); a container keeps
    dockerd's default (raising a hard limit needs CAP_SYS_RESOURCE, which hosts such as this machine's test
    hosts lack, so a fixed --ulimit could keep the container from starting)."""
    wanted = p.spec.broker.limits.max_connections
    return min(OPEN_FILES_CEILING, max(OPEN_FILES_FLOOR, wanted + 1024)) if wanted > 0 else OPEN_FILES_FLOOR


def _nats(p: Platform) -> bool:
    return p.spec.broker.engine == "nats"


DRAIN_TIMEOUT = 120.0  # seconds `backup` waits for the worker to catch up on nats


def _drain_nats(ctx: Context, host: Host, timeout: float = DRAIN_TIMEOUT, poll: float = 1.0) -> None:
    """`backup` on nats archives no broker member: JetStream's store is replicated on the nodes and holds only
    what the worker has not written yet. Instead it waits (``timeout`` at most) until the worker's durable
    consumer acknowledged every message the stream held when the backup started, read from the broker nodes'
    /jsz (loopback, over SSH; ``_read_jsz``: any node that answers, and the stream's and consumers' leaders when
    they answer): the worker acks after writing to InfluxDB (or after spooling, when InfluxDB is unreachable), so
    every message a device got a PUBACK for before the backup started is in InfluxDB's backup, which is taken
    after it (`backup` goes through the services in the registry's order, the broker first). Raises
    IotplatError, naming the consumer, when it does not catch up in time (e.g. no worker replica running), or
    naming every node when none answers."""
    import time

    from iotplat.errors import IotplatError
    from iotplat.verify import nats_cluster

    nodes = _BrokerNodes(ctx, host)
    jsz = _read_jsz(nodes)
    upto = nats_cluster.stream_last_seq(jsz)
    if upto is None:
        raise IotplatError("backup: no answering broker node holds the worker's stream; check `iotplat status`")
    deadline = time.monotonic() + timeout
    while True:
        left = nats_cluster.unacked_through(_read_jsz(nodes), upto)
        if not left:
            return
        if time.monotonic() >= deadline:
            raise IotplatError(f"backup: the worker has not acknowledged every message stored before the backup "
                               f"started (through stream sequence {upto}) after {timeout:.0f}s: {'; '.join(left)}; "
                               "check the worker replicas (`iotplat status`) and run backup again")
        time.sleep(poll)


class _BrokerNodes:
    """The broker hosts `backup` may read, ``first`` (the host the backup hook got: the first broker host)
    first; the others are looked up (``ctx.hosts()``) only when one is needed, and the last that answered is
    tried first on the next read."""

    def __init__(self, ctx: Context, first: Host) -> None:
        self.ctx, self.first = ctx, first
        self._all: dict[str, Host] | None = None
        self.preferred = first.name

    def names(self) -> list[str]:
        names = list(self.ctx.platform.placement["broker"]) or [self.first.name]
        return sorted(names, key=lambda n: n != self.preferred)

    def get(self, name: str) -> Host | None:
        if name == self.first.name:
            return self.first
        if self._all is None:
            self._all = {h.name: h for h in self.ctx.hosts()}
        return self._all.get(name)


def _read_jsz(nodes: _BrokerNodes) -> dict[str, Any]:
    """The worker stream's /jsz (``nats_cluster.leaders_jsz``) from the first broker node that answers, plus the
    stream's and its consumers' leaders when that node names others (a follower's counts trail its leader's);
    IotplatError naming each node and why when none answers."""
    from iotplat.errors import IotplatError
    from iotplat.verify import nats_cluster

    def one(name: str) -> dict[str, Any]:
        h = nodes.get(name)
        if h is None:
            raise RuntimeError("no address")
        return nats_cluster.read_monitor(h)[nats_cluster.JSZ_CONSUMERS]

    views: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for name in nodes.names():
        try:
            views[name] = one(name)
        except (RuntimeError, OSError, ValueError) as exc:
            errors.append(f"{name}: {exc}")
            continue
        nodes.preferred = name
        break
    if not views:
        raise IotplatError(f"backup: cannot read JetStream's state on any broker node ({'; '.join(errors)}); "
                           "check `iotplat status`")
    for name in sorted(nats_cluster.leaders_needed(views) & set(nodes.names())):
        try:
            views[name] = one(name)
        except (RuntimeError, OSError, ValueError):
            pass  # a leader that does not answer: the answering node's view until one is elected among those
            # that answer (seconds), which the next poll reads
    return nats_cluster.leaders_jsz(views)


class Broker(Service):
    name: ClassVar[str] = "broker"
    role: ClassVar[str] = "mosquitto"
    title: ClassVar[str] = "MQTT broker"
    deploy_order: ClassVar[int] = 10
    single_host: ClassVar[bool] = True
    version_keys: ClassVar[Mapping[str, str]] = {"mosquitto": "set broker.version back to {old} in {spec}",
                                                 "nats-server": "set broker.version back to {old} in {spec}",
                                                 **image_version_keys("broker")}

    def paths(self) -> Mapping[str, str]:
        return {
            "mosquitto_conf": "/etc/mosquitto/mosquitto.conf",
            "mosquitto_dir": "/etc/mosquitto/iotplat",
            "mosquitto_acl": "/etc/mosquitto/iotplat/acl",
            "mosquitto_passwd": "/etc/mosquitto/iotplat/passwd",
            "mosquitto_key": "/etc/mosquitto/iotplat/server.key",
            "mosquitto_persistence": PERSISTENCE,
            "nats_conf": nats.CONF,
            "nats_dir": nats.CONF_DIR,
            "nats_key": nats.KEY,
            "nats_store": nats.STORE_DIR,
        }

    def role_for(self, p: Platform) -> str:
        return "nats" if _nats(p) else self.role

    def files(self, r: Renderer) -> list[ServiceFile]:
        p = r.p
        spec = p.spec
        if _nats(p):  # nats-server.conf differs per node and holds the users' bcrypt hashes: a secret (below)
            return limits_files(p, self.name)  # resources.broker: a drop-in of nats-server.service
        conf = r.template(
            "mosquitto/mosquitto.conf.j2",
            broker=spec.broker,
            listeners=spec.broker.listeners,
            limits=spec.broker.limits,
            autosave_interval=max(1, int(spec.broker.persistence.autosave_interval)),
            client_expiration=_duration(spec.broker.persistence.client_expiration),
            inflight=p.inflight,
            queue_messages=p.queue_messages,
            queue_bytes=p.queue_bytes,
            message_size=spec.broker.limits.message_size,
            tls_min=spec.tls.min_version,
        )
        patterns, per_device, reads = acl_rules(p)
        acl = r.template(
            "mosquitto/acl.j2",
            patterns=patterns,
            device_rules=per_device,
            workers=[rep.username for rep in p.replicas],
            worker_reads=reads,
            dead_letter_topic=spec.ingestion.dead_letters.topic,
        )
        paths = self.paths()
        return [ServiceFile(paths["mosquitto_conf"], conf),
                ServiceFile(paths["mosquitto_acl"], acl, "0640", "root", "mosquitto"),
                *container_files(p, self.name),  # runtime: container adds the unit that runs the image
                *limits_files(p, self.name)]  # package with resources.broker: the limits' drop-in

    def secrets(self, p: Platform, host: str) -> list[SecretFile]:
        paths = self.paths()
        if _nats(p):
            return [SecretFile(paths["nats_conf"], nats.secret_key(host), "0640", "nats"),
                    SecretFile(paths["nats_key"], f"host_key:{host}", "0640", "nats")]
        return [SecretFile(paths["mosquitto_passwd"], "mosquitto_passwd", "0640", "mosquitto"),
                SecretFile(paths["mosquitto_key"], f"host_key:{host}", "0640", "mosquitto")]

    def ingress(self, p: Platform, host: str) -> list[Ingress]:
        rules = []
        if _nats(p):  # monitoring listens on loopback only: no rule
            rules.append(Ingress(nats.CLIENT_PORT, "internal", "NATS over TLS (worker replicas)"))
            if len(p.placement["broker"]) > 1:
                rules.append(Ingress(nats.ROUTE_PORT, "internal", "NATS cluster routes (mutual TLS)"))
        for lst in p.spec.broker.listeners:
            label = "MQTT over TLS" if lst.protocol == "mqtt" else "MQTT over secure WebSockets"
            rules.append(Ingress(lst.port, "devices", label))
            rules.append(Ingress(lst.port, "internal", f"{label} (worker, canary)"))
        return rules

    def data_dirs(self, p: Platform) -> tuple[str, ...]:
        return (nats.STORE_DIR,) if _nats(p) else (PERSISTENCE,)

    def group_vars(self, p: Platform) -> dict[str, Any]:
        if _nats(p):
            return {"nats_package_versions": p.nats_pins}
        return {"mosquitto_package_versions": p.mosquitto_pins, "mosquitto_open_files": open_files(p),
                **container_vars(p, self.name, self.role)}

    def scheduled_backup(self, r: Renderer, host: str) -> BackupStep | None:
        if _nats(r.p):  # JetStream's store is replicated on the nodes; not archived (as `iotplat backup`)
            return None
        return BackupStep("Mosquitto's persistence file", "mosquitto.service",
                          r.template("mosquitto/backup-step.sh.j2", persistence_file=PERSISTENCE_FILE,
                                     container=runtime_of(r.p.spec, self.name) == "container"))

    def package_pins(self, gv: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        """The engine's package: a changed pin of either is a rolling upgrade, node by node with the canary."""
        if "nats_package_versions" in gv:
            return {"nats-server": dict(gv["nats_package_versions"])}
        return {"mosquitto": dict(gv["mosquitto_package_versions"])}

    def versions(self, gv: Mapping[str, Any], wheelhouse: Path | None) -> dict[str, str]:
        """The package pin, and in a container the pinned image (a new digest rolls host by host too)."""
        return {**super().versions(gv, wheelhouse), **image_versions(gv, self.name, self.role)}

    def units(self, p: Platform, host: str) -> list[str]:
        return [nats.UNIT] if _nats(p) else ["mosquitto"]

    def health(self, p: Platform, host: str) -> dict[str, int]:
        """None read by the generic /healthz probe: on nats each node's ``nats-server /healthz`` check comes from
        ``checks`` (iotplat/verify/nats_cluster.py), which reads ``/healthz?js-server-only=true`` and judges the
        node's replicas of the worker's stream and consumers, not the full /healthz (which also waits for the MQTT
        layer's retained-message consumer: red for minutes after a kill -9 while the node serves)."""
        return {}

    def cert_names(self, p: Platform) -> list[str]:
        return [p.service_name("broker"), *p.spec.broker.server_names]

    def tls_ports(self, p: Platform) -> list[TlsPort]:
        # not nats's client port: the NATS protocol sends its INFO line in the clear before the TLS handshake
        # (2.9), so a TLS probe cannot read it; the workers' health and the cluster checks cover it
        return [TlsPort(lst.port, f"broker {lst.protocol} :{lst.port}", p.service_name("broker"))
                for lst in p.spec.broker.listeners]

    def checks(self, probe: Probe) -> list[Check]:
        """On nats: the cluster's health (iotplat/verify/nats_cluster.py): nodes, routes, meta leader, stream."""
        if not _nats(probe.platform):
            return []
        from iotplat.verify import nats_cluster

        return nats_cluster.checks(probe)

    def backup(self, ctx: Context, host: Host) -> dict[str, bytes]:
        """The persistence file (queued messages, sessions), saved first with SIGUSR1 to the broker's main
        process; waits (5 s at most) for the file to change. On nats: no member (``_drain_nats``)."""
        from iotplat.deploy.backup import run_on

        if _nats(ctx.platform):
            _drain_nats(ctx, host)
            return {}
        save = _save_signal(ctx.platform)
        return {"mosquitto.db": run_on(host, (
            f"set -e; f={PERSISTENCE_FILE}; old=$(stat -c %Y $f 2>/dev/null || echo 0); "
            f"{save}; i=0; "
            "while [ $i -lt 50 ] && [ \"$(stat -c %Y $f 2>/dev/null || echo 0)\" = \"$old\" ]; do sleep 0.1; i=$((i+1)); done; "
            "cat $f"))}

    def restore_members(self, p: Platform) -> tuple[str, ...]:
        return () if _nats(p) else ("mosquitto.db",)

    def restore(self, ctx: Context, host: Host, members: Mapping[str, bytes], info: Mapping[str, Any]) -> None:
        from iotplat.deploy.backup import run_on

        if "mosquitto.db" not in members or _nats(ctx.platform):
            return
        run_on(host, (f"set -e; systemctl stop mosquitto; cat > {PERSISTENCE_FILE}; "
                      f"chown mosquitto:mosquitto {PERSISTENCE_FILE}; chmod 0600 {PERSISTENCE_FILE}; "
                      "systemctl start mosquitto"), stdin=members["mosquitto.db"])
