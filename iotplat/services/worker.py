"""The ingestion worker: iotplat's own MQTT -> InfluxDB process, one unit per replica (role `worker`,
templates/worker/)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from iotplat.containers.runtime import (container_files, container_vars, image_version_keys, image_versions,
                                        limits_files, runtime_of)
from iotplat.services.base import SecretFile, Service, ServiceFile

if TYPE_CHECKING:
    from iotplat.deploy.ops import Context
    from iotplat.hosts import Host
    from iotplat.render.engine import Renderer
    from iotplat.spec.platform_model import Platform
    from iotplat.verify.status import Check, Probe

CREDENTIALS = "/etc/iotplat/credentials"
UNIT = "iotplat-worker@{n}"


class Worker(Service):
    name: ClassVar[str] = "worker"
    role: ClassVar[str] = "worker"
    title: ClassVar[str] = "Ingestion worker"
    deploy_order: ClassVar[int] = 30
    version_keys: ClassVar[Mapping[str, str]] = {"worker": "reinstall the iotplat release that deployed worker {old}",
                                                 **image_version_keys("worker")}

    def versions(self, gv: Mapping[str, Any], wheelhouse: Path | None) -> dict[str, str]:
        """The iotplat release, plus the digest of the wheelhouse the role installs (the same SHA256SUMS the
        role compares): new code under the same release number is an upgrade too."""
        version = str(gv["iotplat_version"])
        sums = wheelhouse / "SHA256SUMS" if wheelhouse else None
        if sums and sums.exists():
            version += "+" + hashlib.sha256(sums.read_bytes()).hexdigest()[:12]
        return {"worker": version, **image_versions(gv, self.name, self.role)}  # in a container: its base image

    def rollback(self, key: str, old: str, spec_file: str) -> str:
        if key != "worker":
            return super().rollback(key, old, spec_file)
        return super().rollback(key, old.split("+")[0], spec_file)  # the release, without the wheelhouse digest

    def paths(self) -> Mapping[str, str]:
        return {"worker_conf": "/etc/iotplat/worker.toml", "worker_credentials": CREDENTIALS,
                "worker_home": "/opt/iotplat", "worker_venv": "/opt/iotplat/venv", "worker_data": "/var/lib/iotplat-worker"}

    def files(self, r: Renderer) -> list[ServiceFile]:
        from iotplat.services.nats import worker_section
        from iotplat.spec.platform_model import WORKER_INFLUX_USER, WORKER_USER_PREFIX

        p = r.p
        spec = p.spec
        ing = spec.ingestion
        ix = spec.influxdb
        broker_port = next((lst.port for lst in spec.broker.listeners if lst.protocol == "mqtt"),
                           spec.broker.listeners[0].port)
        data = r.template(
            "worker/worker.toml.j2",
            worker_prefix=WORKER_USER_PREFIX,
            mqtt={
                "host": p.service_name("broker"),
                "port": broker_port,
                "protocol": ing.protocol,
                "inflight": ing.inflight,
                "session_expiry": int(spec.broker.persistence.client_expiration),
            },
            # InfluxDB 2 is written through its 1.x compatibility API (/write?db=<bucket>) with a v1
            # authorization (username + password from the state, write on one bucket): InfluxDB 2 generates
            # every API token itself, so a token iotplat chose could not be given to the worker.
            influx={
                "server_version": ix.version,
                "url": f"https://{p.service_name('influxdb')}:{ix.port}",
                "database": p.influx_database if ix.version == 1 else p.influx_bucket,
                "retention_policy": p.influx_retention_policy if ix.version == 1 else "",
                "username": WORKER_INFLUX_USER,
            },
            batch={"max_points": ing.batch.max_points, "max_delay": ing.batch.max_delay},
            spool=ing.spool,
            dead_letters={
                "measurement": ing.dead_letters.measurement,
                "topic": ing.dead_letters.topic,
                "rate_per_device": ing.dead_letters.rate_per_device,
                "excerpt": ing.dead_letters.excerpt,
            },
            max_payload=ing.max_payload,
            metrics_port=ing.metrics_port,
            health={"interval": ing.health.interval, "measurement": ing.health.measurement},
            subscriptions=[s.model_dump() for s in ing.subscriptions],
            nats=worker_section(p) if spec.broker.engine == "nats" else None,
        )
        return [ServiceFile(self.paths()["worker_conf"], data), *container_files(p, self.name),
                *limits_files(p, self.name)]

    def secrets(self, p: Platform, host: str) -> list[SecretFile]:
        out = []
        # in a container the replica (the image's user, the host's iotplat-worker) reads them through a read-only mount
        mode, group = ("0640", "iotplat-worker") if runtime_of(p.spec, self.name) == "container" else ("0600", "root")
        for r in p.replicas_on(host):
            out.append(SecretFile(f"{CREDENTIALS}/worker-{r.number}/mqtt-password", f"mqtt_password:{r.username}",
                                  mode, group))
            out.append(SecretFile(f"{CREDENTIALS}/worker-{r.number}/influxdb-password", "influxdb_worker_password",
                                  mode, group))
        return out

    def data_dirs(self, p: Platform) -> tuple[str, ...]:
        return (self.paths()["worker_data"],)

    def group_vars(self, p: Platform) -> dict[str, Any]:
        return {"worker_metrics_port": p.spec.ingestion.metrics_port, **container_vars(p, self.name, self.role)}

    def host_vars(self, p: Platform, host: str) -> dict[str, Any]:
        return {"worker_replicas": [r.number for r in p.replicas_on(host)]}

    def units(self, p: Platform, host: str) -> list[str]:
        return [UNIT.format(n=r.number) for r in p.replicas_on(host)]

    def health(self, p: Platform, host: str) -> dict[str, int]:
        return {f"worker {r.number}": p.spec.ingestion.metrics_port + r.number - 1 for r in p.replicas_on(host)}

    def checks(self, probe: Probe) -> list[Check]:
        """Each replica's own counters, written beside the data (ingestion.health), read with the reader."""
        from iotplat.verify.status import worker_counters_checks

        p = probe.platform
        health = p.spec.ingestion.health
        return worker_counters_checks(probe.query, health.measurement, health.interval,
                                      {r.number: r.host for r in p.replicas}, settle=min(health.interval + 2, 20))

    def quiesce(self, ctx: Context, host: Host) -> None:
        from iotplat.deploy.backup import run_on

        units = self.units(ctx.platform, host.name)
        if units:
            run_on(host, "systemctl stop " + " ".join(units))

    def resume(self, ctx: Context, host: Host) -> None:
        from iotplat.deploy.backup import run_on

        units = self.units(ctx.platform, host.name)
        if units:
            run_on(host, "systemctl start " + " ".join(units))
