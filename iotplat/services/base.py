"""What a service is to iotplat: one class that states everything the other layers need to know about it.

A service (the broker, InfluxDB, the worker, Grafana, or a plugin's) declares, in one module:

- its placement rules (must every platform have it? on one host only?) and when it is enabled;
- the Ansible role that deploys it, and that role's inputs (`group_vars`);
- the files it renders, ONCE, from templates/ (the same bytes on every host of the service and every target),
  the secret files each of its hosts receives from the state, and the paths they live at (`paths`: the one
  table the renderer and the roles share: the roles read it from group_vars `iotplat_paths`);
- the ports it serves and to whom (the host firewall, the clouds' security groups, `iotplat cost`);
- where its data lives (`data_dirs`: the data disk, `destroy --data`);
- its systemd units (`status`, `logs`, `destroy`), the TLS ports and health endpoints `status` probes, and the
  checks only it knows how to make;
- its backup and restore hooks (`iotplat backup` / `restore`);
- the versions it deploys (`versions`), which `up` compares with the last deploy to roll an upgrade out host by
  host, and how to roll each back.

Render, status, logs, backup/restore and destroy loop over `iotplat.services.all_services()`; none of them
names a service. Adding a service is this one module (registered in iotplat/services/__init__.py, or by a
plugin under the entry-point group `iotplat.services`), one role and one template folder
(docs/architecture.md). Every hook has a default that does nothing, so a service states only what it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from iotplat.deploy.ops import Context
    from iotplat.hosts import Host
    from iotplat.render.engine import Renderer
    from iotplat.spec.platform_model import Platform
    from iotplat.verify.status import Check, Probe


def pin_text(versions: Mapping[str, str]) -> str:
    """A per-release pin as one comparable string: the version when every release has the same one, else
    `debian-12=<v>,debian-13=<v>` (a change of either release's pin is an upgrade)."""
    values = {str(v) for v in versions.values()}
    if len(values) == 1:
        return values.pop()
    return ",".join(f"{r}={versions[r]}" for r in sorted(versions))


@dataclass(frozen=True)
class ServiceFile:
    """A file rendered once for the service: the same bytes on every host of it."""

    dest: str
    content: bytes
    mode: str = "0644"
    owner: str = "root"
    group: str = "root"


@dataclass(frozen=True)
class SecretFile:
    """A secret a host of the service receives: never in the build directory, installed from the state."""

    dest: str
    secret: str  # key in the state (iotplat.secrets.materials.secret_content)
    mode: str = "0600"
    group: str = "root"


@dataclass(frozen=True)
class BackupStep:
    """A service's part of a host's scheduled backup (spec `backup.schedule`): a shell fragment, rendered from the
    service's own template, that writes its files into "$work"; what it saves (for the unit's description) and
    the unit the backup runs after."""

    what: str
    after: str
    script: bytes


@dataclass(frozen=True)
class Ingress:
    """A port a host accepts, and from whom: devices, admin (admin_cidrs) or internal (the platform's hosts)."""

    port: int
    source: str
    description: str
    protocol: str = "tcp"

    def as_dict(self) -> dict[str, Any]:
        return {"port": self.port, "protocol": self.protocol, "source": self.source, "description": self.description}


@dataclass(frozen=True)
class TlsPort:
    """A port whose TLS `status` checks: the chain for `name` against the platform CA, and the expiry. An internal
    port is reached through an SSH tunnel to its host, never opened."""

    port: int
    label: str
    name: str  # the logical name the certificate must carry
    internal: bool = False


class Service:
    """The default of every hook: nothing. Subclasses set the class attributes and override what they have."""

    name: ClassVar[str]  # the placement label in the spec (hosts[].services)
    role: ClassVar[str]  # the Ansible role that deploys it
    title: ClassVar[str]  # human name (site.yml's task, messages)
    deploy_order: ClassVar[int] = 50  # site.yml configures a host's services in this order (broker 10 ... grafana 40)
    required: ClassVar[bool] = True  # every platform runs it (validate says so when no host does)
    single_host: ClassVar[bool] = False  # placed on exactly one host
    # A plugin's own folders: roles_path holds its role (<roles_path>/<role>/), templates_path its templates
    # (<templates_path>/<name>/...). None: iotplat's (roles/ and templates/ of the package).
    roles_path: ClassVar[Path | None] = None
    templates_path: ClassVar[Path | None] = None

    # What `up` records and compares per deploy (deployed.json "versions"): key -> how to roll it back, with
    # {old} (the previous version) and {spec} (the spec file). Keys stay stable across releases (they name
    # what is versioned: mosquitto, influxdb, grafana, worker), or an upgrade would go unnoticed once.
    version_keys: ClassVar[Mapping[str, str]] = {}

    def role_for(self, p: Platform) -> str:
        """The role that deploys it on this platform (a service with engine variants chooses one; site.yml,
        destroy.yml)."""
        return self.role

    def enabled(self, p: Platform) -> bool:
        """False: the spec switches it off (then no host runs it, whatever the placement says)."""
        return True

    # --- render ----------------------------------------------------------------------------------------
    def paths(self) -> Mapping[str, str]:
        """Named paths on the hosts that the renderer and the role share (iotplat_paths in group_vars)."""
        return {}

    def files(self, r: Renderer) -> list[ServiceFile]:
        return []

    def secrets(self, p: Platform, host: str) -> list[SecretFile]:
        return []

    def ingress(self, p: Platform, host: str) -> list[Ingress]:
        return []

    def data_dirs(self, p: Platform) -> tuple[str, ...]:
        return ()

    def group_vars(self, p: Platform) -> dict[str, Any]:
        """The role's inputs (its defaults' names), from the spec."""
        return {}

    def host_vars(self, p: Platform, host: str) -> dict[str, Any]:
        """Inputs that differ per host (e.g. the worker replicas placed on it)."""
        return {}

    def scheduled_backup(self, r: Renderer, host: str) -> BackupStep | None:
        """Its step in the host's scheduled backup, or None when it has nothing to save there."""
        return None

    # --- hosts -----------------------------------------------------------------------------------------
    def units(self, p: Platform, host: str) -> list[str]:
        """The systemd units the service runs on `host` (what status checks, logs reads, destroy stops)."""
        return []

    def tls_ports(self, p: Platform) -> list[TlsPort]:
        return []

    def cert_names(self, p: Platform) -> list[str]:
        """DNS names its TLS server must answer to (beside the host's own name), for the host certificate the
        state issues; none: the service serves no TLS and needs no certificate."""
        return []

    def health(self, p: Platform, host: str) -> dict[str, int]:
        """HTTP health endpoints on the host's loopback: label -> port (GET /healthz must say status ok)."""
        return {}

    def skipped(self, probe: Probe) -> str:
        """Why status skips this service on this deployment ("" = it does not): e.g. Grafana skipped at deploy."""
        return ""

    def checks(self, probe: Probe) -> list[Check]:
        """Checks only this service knows how to make (run by status after the generic ones)."""
        return []

    # --- versions ----------------------------------------------------------------------------------------
    def package_pins(self, gv: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        """The Debian packages it installs, read from the rendered group_vars (what the role is told to
        install): {package: {debian release: version}}; `plan` prints them."""
        return {}

    def versions(self, gv: Mapping[str, Any], wheelhouse: Path | None) -> dict[str, str]:
        """{version key: comparable text} for `up`'s rolling upgrade; by default one per package pin."""
        return {k: pin_text(v) for k, v in self.package_pins(gv).items()}

    def rollback(self, key: str, old: str, spec_file: str) -> str:
        """How to go back to version `old` of `key` (the hint a failed rolling upgrade prints)."""
        return self.version_keys[key].format(old=old, spec=spec_file)

    # --- backup and restore ----------------------------------------------------------------------------
    def backup(self, ctx: Context, host: Host) -> dict[str, bytes]:
        """Archive members this service contributes, read from its host (name -> bytes)."""
        return {}

    def restore_members(self, p: Platform) -> tuple[str, ...]:
        """Archive members `restore` cannot do without for this service on `p` (checked, with the platform known,
        before anything changes); none by default: what `backup` adds beyond them is restored when present."""
        return ()

    def quiesce(self, ctx: Context, host: Host) -> None:
        """Stop writing while a restore replaces data (the worker stops its replicas)."""

    def restore(self, ctx: Context, host: Host, members: Mapping[str, bytes], info: Mapping[str, Any]) -> None:
        """Put this service's members of an archive back onto its host."""

    def resume(self, ctx: Context, host: Host) -> None:
        """Undo `quiesce` after a restore."""
