"""The time-series database: InfluxDB 1.x from Debian or 2.x from InfluxData (role `influxdb`, templates/influxdb/)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from iotplat.containers.runtime import (container_files, container_vars, image_version_keys, image_versions,
                                        limits_files, runtime_of)
from iotplat.services.base import BackupStep, Ingress, SecretFile, Service, ServiceFile, TlsPort

if TYPE_CHECKING:
    from pathlib import Path

    from iotplat.deploy.ops import Context
    from iotplat.hosts import Host
    from iotplat.render.engine import Renderer
    from iotplat.spec.platform_model import Platform
    from iotplat.verify.status import Check, Probe

CREDENTIALS = "/etc/iotplat/credentials/influxdb"
REMOTE_DIR = "/var/lib/iotplat-backup"


def package(p: Platform) -> dict[str, Any]:
    """The package pin as the role reads it: {source, versions: {release: version}, path?}."""
    from iotplat.spec.platform_model import release_pins

    pkg = p.influx_package
    out: dict[str, Any] = {"source": pkg.source, "versions": release_pins(pkg.version)}
    if pkg.path:
        out["path"] = pkg.path
    return out


def influx2_env(p: Platform, host: str) -> str:
    """Shell prefix for the `influx` CLI on the InfluxDB 2 host: the operator token comes from its root-only
    credential file into the environment (never into argv), TLS is checked against the platform CA.
    NOTE: InfluxDB 2 cannot be installed on the development machines; this path is not exercised by tests."""
    url = f"https://{host}.{p.spec.network.domain}:{p.spec.influxdb.port}"
    return (f"command -v influx >/dev/null || {{ echo 'the influx CLI is missing on {host}: apt-get install "
            f"influxdb2-cli' >&2; exit 1; }}; export INFLUX_HOST={url} SSL_CERT_FILE=/etc/iotplat/tls/ca.crt "
            f"INFLUX_TOKEN=\"$(cat {CREDENTIALS}/admin-token)\"; ")


def _influxd(p: Platform, folder: str) -> str:
    """`influxd` for a portable backup or restore into/from `folder`: the host's (package), or in a container of the
    service's own image (container runtime: the host has no influxd), on the host network (the backup port listens
    on 127.0.0.1:8088), as the image's user, with `folder` mounted read-write (made theirs first)."""
    if runtime_of(p.spec, "influxdb") != "container":
        return "influxd"
    from iotplat.containers.profiles import INFLUXDB1_UID
    from iotplat.containers.runtime import container_image

    image = container_image(p, "influxdb").run  # a closed value: sha256:<id> or name@sha256:<digest>
    uid = f"{INFLUXDB1_UID}:{INFLUXDB1_UID}"
    return (f"mkdir -p {folder}; chown {uid} {folder}; docker run --rm --network host --user {uid} --cap-drop ALL "
            f"--security-opt no-new-privileges --log-driver none --mount type=bind,source={folder},target={folder} "
            f"--entrypoint influxd {image}")


class InfluxDB(Service):
    name: ClassVar[str] = "influxdb"
    role: ClassVar[str] = "influxdb"
    title: ClassVar[str] = "InfluxDB"
    deploy_order: ClassVar[int] = 20
    single_host: ClassVar[bool] = True
    version_keys: ClassVar[Mapping[str, str]] = {"influxdb": "set influxdb.package.version back to {old} in {spec}",
                                                 **image_version_keys("influxdb")}

    def package_pins(self, gv: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        return {"influxdb": dict(gv["influxdb_package"].get("versions") or {})}

    def versions(self, gv: Mapping[str, Any], wheelhouse: Path | None) -> dict[str, str]:
        """The package pin, and in a container the pinned image (a new digest rolls host by host too)."""
        return {**super().versions(gv, wheelhouse), **image_versions(gv, self.name, self.role)}

    def paths(self) -> Mapping[str, str]:
        return {
            "influxdb1_conf": "/etc/influxdb/influxdb.conf",
            "influxdb2_conf": "/etc/influxdb/config.toml",
            "influxdb_conf_dir": "/etc/influxdb",
            "influxdb1_data": "/var/lib/influxdb",
            "influxdb2_data": "/var/lib/influxdb2",
            "influxdb_credentials": CREDENTIALS,
            "influxdb_key": "/run/credentials/influxdb.service/server.key",
        }

    def files(self, r: Renderer) -> list[ServiceFile]:
        ix = r.p.spec.influxdb
        paths = self.paths()
        if ix.version == 1:
            data = r.template("influxdb/influxdb.conf.j2", port=ix.port, tls_min=r.p.spec.tls.min_version)
            return [ServiceFile(paths["influxdb1_conf"], data), *container_files(r.p, self.name),
                    *limits_files(r.p, self.name)]
        data = r.template("influxdb/config.toml.j2", port=ix.port, tls_min=r.p.spec.tls.min_version)
        return [ServiceFile(paths["influxdb2_conf"], data), *limits_files(r.p, self.name)]

    def secrets(self, p: Platform, host: str) -> list[SecretFile]:
        # in a container influxd (the image's user) reads its key from the read-only mounted folder: group-readable
        mode, group = ("0640", "influxdb") if runtime_of(p.spec, self.name) == "container" else ("0600", "root")
        out = [SecretFile(f"{CREDENTIALS}/server.key", f"host_key:{host}", mode, group),
               SecretFile(f"{CREDENTIALS}/admin-password", "influxdb_admin_password", mode, group),
               SecretFile(f"{CREDENTIALS}/worker-password", "influxdb_worker_password", mode, group),
               SecretFile(f"{CREDENTIALS}/grafana-password", "influxdb_grafana_password", mode, group)]
        if p.spec.influxdb.version == 2:
            out.append(SecretFile(f"{CREDENTIALS}/admin-token", "influxdb_admin_token"))
        return out

    def cert_names(self, p: Platform) -> list[str]:
        return [p.service_name("influxdb")]

    def ingress(self, p: Platform, host: str) -> list[Ingress]:
        return [Ingress(p.spec.influxdb.port, "internal", "InfluxDB HTTPS")]

    def scheduled_backup(self, r: Renderer, host: str) -> BackupStep | None:
        """InfluxDB's portable backup (1.x: the database through the RPC port on loopback; 2.x: the instance)."""
        from iotplat.render.layout import PATHS

        from iotplat.render.engine import Escaped

        ix = r.p.spec.influxdb
        # the step's folder is a shell expression of the backup script ($work: backup.dir, a closed path, and a
        # timestamp); _influxd writes closed values only around it (the image reference, numeric ids)
        script = r.template("influxdb/backup-step.sh.j2", version=ix.version, database=r.p.influx_database,
                            influxd=Escaped(_influxd(r.p, '"$work/influxdb"')),
                            url=f"https://{host}.{r.p.spec.network.domain}:{ix.port}",
                            token_file=f"{CREDENTIALS}/admin-token", ca_cert=PATHS["ca_cert"])
        return BackupStep("InfluxDB", "influxdb.service", script)

    def data_dirs(self, p: Platform) -> tuple[str, ...]:
        return (self.paths()["influxdb1_data"],) if p.spec.influxdb.version == 1 else (self.paths()["influxdb2_data"],)

    def group_vars(self, p: Platform) -> dict[str, Any]:
        from iotplat.spec.platform_model import GRAFANA_INFLUX_USER, INFLUX_ADMIN_USER, WORKER_INFLUX_USER
        from iotplat.spec.units import format_duration

        ix = p.spec.influxdb
        return {
            "influxdb_version": ix.version,
            "influxdb_package": package(p),
            "influxdb_port": ix.port,
            "influxdb_database": p.influx_database,
            "influxdb_retention_policy": p.influx_retention_policy,
            "influxdb_org": p.influx_org,
            "influxdb_bucket": p.influx_bucket,
            "influxdb_retention": format_duration(ix.retention),
            "influxdb_admin_user": INFLUX_ADMIN_USER,
            "influxdb_worker_user": WORKER_INFLUX_USER,
            "influxdb_grafana_user": GRAFANA_INFLUX_USER,
            **container_vars(p, self.name, self.role),
        }

    def units(self, p: Platform, host: str) -> list[str]:
        return ["influxdb"]

    def tls_ports(self, p: Platform) -> list[TlsPort]:
        port = p.spec.influxdb.port
        return [TlsPort(port, f"influxdb :{port}", p.service_name("influxdb"), internal=True)]

    def checks(self, probe: Probe) -> list[Check]:
        """InfluxDB answers a query of the read-only user (Grafana's), through the tunnel."""
        from iotplat.verify.status import Check

        host = probe.platform.host_of("influxdb")
        try:
            probe.query("SHOW MEASUREMENTS")
            return [Check("influxdb query (read-only user)", True, "ok", host=host)]
        except (OSError, RuntimeError, ValueError) as exc:
            return [Check("influxdb query (read-only user)", False, str(exc), host=host)]

    def backup(self, ctx: Context, host: Host) -> dict[str, bytes]:
        """InfluxDB's own portable backup: of the platform's database (1.x), or of the whole instance with the
        operator token (2.x, restored with `influx restore --full`)."""
        import time

        from iotplat.deploy.backup import run_on

        p = ctx.platform
        remote = f"{REMOTE_DIR}/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        if p.spec.influxdb.version == 2:
            dump = f"{influx2_env(p, host.name)}influx backup {remote} >/dev/null"
        else:
            dump = (f"{_influxd(p, remote)} backup -portable -database {p.influx_database} -host 127.0.0.1:8088 "
                    f"{remote} >/dev/null 2>&1")
        return {"influxdb.tar": run_on(host, (
            f"set -e; rm -rf {remote}; mkdir -p {remote}; {dump}; tar -C {remote} -cf - . ; rm -rf {remote}"))}

    def restore(self, ctx: Context, host: Host, members: Mapping[str, bytes], info: Mapping[str, Any]) -> None:
        """1.x: the database is dropped (admin, through the tunnel) and restored from the portable backup; 2.x:
        `influx restore --full` of the whole instance."""
        from iotplat.deploy.backup import run_on

        p = ctx.platform
        remote = f"{REMOTE_DIR}/restore"
        if p.spec.influxdb.version == 2:
            load = f"{influx2_env(p, host.name)}influx restore --full {remote} >/dev/null"
        else:
            from iotplat.hosts.tunnel import forward
            from iotplat.spec.platform_model import INFLUX_ADMIN_USER
            from iotplat.verify.status import TrustStore, influx_query

            trust = TrustStore(ctx.materials.ca_cert_pem)
            try:
                admin_pw = ctx.materials.secrets["influxdb_admin_password"]
                with forward(host, p.spec.influxdb.port) as (address, port):  # InfluxDB is internal: through SSH
                    influx_query(p, address, trust.context(), INFLUX_ADMIN_USER, admin_pw,
                                 f'DROP DATABASE "{p.influx_database}"', method="POST", port=port)
            finally:
                trust.close()
            load = (f"{_influxd(p, remote)} restore -portable -db {info['influxdb']['database']} -host 127.0.0.1:8088 "
                    f"{remote} >/dev/null")
        run_on(host, f"set -e; rm -rf {remote}; mkdir -p {remote}; tar -C {remote} -xf -; {load}; rm -rf {remote}",
               stdin=members["influxdb.tar"])
