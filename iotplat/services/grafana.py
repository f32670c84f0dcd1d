"""Dashboards: Grafana from Grafana Labs' repository (role `grafana`, templates/grafana/, generated dashboards).

Grafana may be skipped at deploy time (`grafana.required: false` and its package source unreachable): the deploy
records why, status shows it as skipped, backup leaves its database out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from iotplat.containers.runtime import limits_files
from iotplat.services.base import Ingress, SecretFile, Service, ServiceFile, TlsPort

if TYPE_CHECKING:
    from iotplat.deploy.ops import Context
    from iotplat.hosts import Host
    from iotplat.render.engine import Renderer
    from iotplat.spec.platform_model import Platform
    from iotplat.verify.status import Probe

CREDENTIALS = "/etc/iotplat/credentials/grafana"
DATABASE = "/var/lib/grafana/grafana.db"


def deployed(ctx: Context) -> bool:
    """Whether the last deploy installed Grafana (it may have been skipped, see the module docstring)."""
    record = ctx.state.read_json("deployed.json") or {}
    return bool(record.get("grafana", {}).get("deployed"))


class Grafana(Service):
    name: ClassVar[str] = "grafana"
    role: ClassVar[str] = "grafana"
    title: ClassVar[str] = "Grafana"
    deploy_order: ClassVar[int] = 40
    single_host: ClassVar[bool] = True
    version_keys: ClassVar[Mapping[str, str]] = {"grafana": "set grafana.package.version back to {old} in {spec}"}

    def package_pins(self, gv: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        return {"grafana": dict(gv["grafana_package"].get("versions") or {})} if gv.get("grafana_enabled") else {}

    def enabled(self, p: Platform) -> bool:
        return p.spec.grafana.enabled

    def paths(self) -> Mapping[str, str]:
        return {
            "grafana_conf_dir": "/etc/grafana",
            "grafana_provisioning": "/etc/grafana/provisioning",
            "grafana_ini": "/etc/grafana/grafana.ini",
            "grafana_datasource": "/etc/grafana/provisioning/datasources/iotplat.yaml",
            "grafana_dashboard_provider": "/etc/grafana/provisioning/dashboards/iotplat.yaml",
            "grafana_dashboards": "/etc/iotplat/dashboards",
            "grafana_credentials": "/run/credentials/grafana-server.service",
            "grafana_credentials_dir": CREDENTIALS,
        }

    def files(self, r: Renderer) -> list[ServiceFile]:
        from iotplat.render import dashboards
        from iotplat.spec.platform_model import GRAFANA_INFLUX_USER

        p = r.p
        g = p.spec.grafana
        ix = p.spec.influxdb
        paths = self.paths()
        url = f"https://{p.service_name('influxdb')}:{ix.port}"
        files = [
            ServiceFile(paths["grafana_ini"], r.template("grafana/grafana.ini.j2", port=g.port,
                                                         domain=g.domain or p.service_name("grafana"),
                                                         admin_user=g.admin_user, home_dashboard="platform-health.json",
                                                         tls_min=p.spec.tls.min_version), "0640", "root", "grafana"),
            ServiceFile(paths["grafana_datasource"], r.template("grafana/datasource.yaml.j2",
                                                                uid=dashboards.DATASOURCE_UID, url=url,
                                                                version=ix.version, user=GRAFANA_INFLUX_USER,
                                                                database=p.influx_database, bucket=p.influx_bucket),
                        "0640", "root", "grafana"),
            ServiceFile(paths["grafana_dashboard_provider"], r.template("grafana/dashboards.yaml.j2", folder=p.name),
                        "0640", "root", "grafana"),
        ]
        for name, board in sorted(dashboards.build_dashboards(p).items()):
            files.append(ServiceFile(f"{paths['grafana_dashboards']}/{name}", dashboards.dashboard_bytes(board)))
        return [*files, *limits_files(p, self.name)]  # resources.grafana: the limits' drop-in

    def secrets(self, p: Platform, host: str) -> list[SecretFile]:
        return [SecretFile(f"{CREDENTIALS}/server.key", f"host_key:{host}"),
                SecretFile(f"{CREDENTIALS}/admin-password", "grafana_admin_password"),
                SecretFile(f"{CREDENTIALS}/secret-key", "grafana_secret_key"),
                SecretFile(f"{CREDENTIALS}/influxdb-password", "influxdb_grafana_password")]

    def ingress(self, p: Platform, host: str) -> list[Ingress]:
        return [Ingress(p.spec.grafana.port, "admin", "Grafana HTTPS")]

    def data_dirs(self, p: Platform) -> tuple[str, ...]:
        return ("/var/lib/grafana",)

    def group_vars(self, p: Platform) -> dict[str, Any]:
        from iotplat.spec.platform_model import release_pins

        g = p.spec.grafana
        pkg: dict[str, Any] = {"source": g.package.source, "versions": release_pins(g.package.version)}
        if g.package.path:
            pkg["path"] = g.package.path
        return {"grafana_enabled": g.enabled, "grafana_required": g.required, "grafana_package": pkg,
                "grafana_port": g.port, "grafana_admin_user": g.admin_user}

    def units(self, p: Platform, host: str) -> list[str]:
        return ["grafana-server"]

    def cert_names(self, p: Platform) -> list[str]:
        return [p.service_name("grafana"), *([p.spec.grafana.domain] if p.spec.grafana.domain else [])]

    def tls_ports(self, p: Platform) -> list[TlsPort]:
        return [TlsPort(p.spec.grafana.port, f"grafana :{p.spec.grafana.port}", p.service_name("grafana"))]

    def skipped(self, probe: Probe) -> str:
        if probe.grafana_deployed:
            return ""
        return f"skipped at deploy: {probe.grafana_reason or 'see the output of iotplat up'}"

    def backup(self, ctx: Context, host: Host) -> dict[str, bytes]:
        from iotplat.deploy.backup import run_on

        return {"grafana.db": run_on(host, f"cat {DATABASE}")} if deployed(ctx) else {}

    def restore(self, ctx: Context, host: Host, members: Mapping[str, bytes], info: Mapping[str, Any]) -> None:
        from iotplat.deploy.backup import run_on

        if "grafana.db" in members:
            run_on(host, (f"set -e; systemctl stop grafana-server; cat > {DATABASE}; "
                          f"chown grafana:grafana {DATABASE}; systemctl start grafana-server"), stdin=members["grafana.db"])
