"""What each target adds to a render, one class per target kind (the deploy side is iotplat/deploy/targets.py).

A target decides three things the render needs and nothing else: where each ingress `source` class may come
from (the hosts' nftables firewall), the inventory variables it knows before any host exists (the user's own
addresses on bare metal), and the infrastructure config it renders (the Pulumi stack config of a cloud). The
renderer asks `for_platform(p)` and names no target; a new target is one class here plus one line in TARGETS
(and its TargetProvider in iotplat/deploy/targets.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from iotplat.errors import InvalidInput
from iotplat.spec.model import AwsTarget, AzureTarget, BaremetalTarget, LocalTarget
from iotplat.spec.platform_model import Platform

# host -> its ingress rules (iotplat.render.engine.host_ingress)
Ingress = Callable[[str], list[dict[str, Any]]]


class RenderTarget:
    """The defaults: no fixed addresses, no infrastructure config."""

    kind: ClassVar[str]

    def firewall_sources(self, p: Platform) -> dict[str, list[str]]:
        """Where each ingress `source` may come from. A class left out (e.g. `internal`) is filled in by the
        common role from the inventory: every host's iotplat_private_address, known only at deploy time."""
        raise NotImplementedError

    def host_vars(self, p: Platform, host: str) -> dict[str, Any]:
        """Inventory variables of `host` known at render time (addresses of cloud and local hosts come at deploy
        time)."""
        return {}

    def stack_config(self, p: Platform, ingress: Ingress) -> tuple[str, dict[str, Any]] | None:
        """(path in the build dir, Pulumi stack config) for a target with infrastructure to create, else None."""
        return None


class Local(RenderTarget):
    kind: ClassVar[str] = "local"

    def firewall_sources(self, p: Platform) -> dict[str, list[str]]:
        t = p.spec.target
        assert isinstance(t, LocalTarget)
        return {k: [t.network] for k in ("devices", "internal", "admin", "ssh")}


class Baremetal(RenderTarget):
    kind: ClassVar[str] = "baremetal"

    def firewall_sources(self, p: Platform) -> dict[str, list[str]]:
        t = p.spec.target
        assert isinstance(t, BaremetalTarget)
        return {"devices": list(t.device_cidrs), "admin": list(t.admin_cidrs), "ssh": list(t.admin_cidrs)}

    def host_vars(self, p: Platform, host: str) -> dict[str, Any]:
        """The user's own addresses, users, ports, keys and data disks."""
        t = p.spec.target
        assert isinstance(t, BaremetalTarget)
        bm = t.hosts[host]
        hv: dict[str, Any] = {"ansible_host": bm.address, "ansible_user": bm.ssh_user or t.ssh_user,
                              "ansible_port": bm.ssh_port}
        if bm.ssh_private_key:
            hv["ansible_ssh_private_key_file"] = bm.ssh_private_key
        if bm.data_device:
            hv["iotplat_data_device"] = bm.data_device
        return hv


class Cloud(RenderTarget):
    """AWS and Azure share the stack config's shape; they differ in the size table and the region key."""

    sizes_field: ClassVar[str]  # the target's size table: instance_types | vm_sizes
    region_field: ClassVar[str]  # the target's region: region | location
    region_key: ClassVar[str]  # the provider's region setting in the stack config

    def _target(self, p: Platform) -> AwsTarget | AzureTarget:
        t = p.spec.target
        assert isinstance(t, (AwsTarget, AzureTarget))
        return t

    def firewall_sources(self, p: Platform) -> dict[str, list[str]]:
        """SSH also comes from inside the private network: hosts without a public address are reached through
        the jump host (the cloud firewall admits only the jump host there)."""
        t = self._target(p)
        return {"devices": list(t.device_cidrs), "admin": list(t.admin_cidrs),
                "ssh": [*t.admin_cidrs, t.network_cidr]}

    def stack_config(self, p: Platform, ingress: Ingress) -> tuple[str, dict[str, Any]] | None:
        t = self._target(p)
        sizes: dict[str, str] = getattr(t, self.sizes_field)
        key_path = Path(t.ssh_public_key_file)
        key_path = key_path if key_path.is_absolute() else p.spec_dir / key_path
        try:
            pubkey = key_path.read_text().strip()
        except OSError as exc:
            raise InvalidInput(f"{p.spec_file}: target.ssh_public_key_file: cannot read {key_path}: {exc.strerror}") from None
        if not pubkey.startswith(("ssh-ed25519 ", "ssh-rsa ")):
            raise InvalidInput(f"{p.spec_file}: target.ssh_public_key_file: {key_path} is not an ssh-ed25519 or ssh-rsa "
                               "public key (the .pub file)")
        config: dict[str, Any] = {
            "iotplat:platform": p.name,
            "iotplat:environment": p.environment,
            "iotplat:networkCidr": t.network_cidr,
            "iotplat:adminCidrs": list(t.admin_cidrs),
            "iotplat:deviceCidrs": list(t.device_cidrs),
            "iotplat:sshUser": t.ssh_user,
            "iotplat:sshPublicKey": pubkey,
            "iotplat:image": t.image,
            "iotplat:mode": "active",
            "iotplat:tags": {"platform": p.name, "environment": p.environment, "managed-by": "iotplat"},
            "iotplat:hosts": [
                {
                    "name": h,
                    "size": sizes.get(h, sizes.get("default")),
                    "diskGb": max(1, t.disk_size // (1024**3)),
                    "services": p.services_on(h),
                    "ingress": ingress(h),
                }
                for h in p.host_names
            ],
            self.region_key: getattr(t, self.region_field),
        }
        lb = broker_load_balancer(p)
        if lb is not None:
            config["iotplat:brokerLoadBalancer"] = lb
        return f"pulumi/{self.kind}/Pulumi.{p.name}-{p.environment}.yaml", config


def broker_load_balancer(p: Platform) -> dict[str, Any] | None:
    """The stack's load balancer in front of a broker cluster (broker.engine: nats on more than one host): the
    MQTT over TLS listener's port and the broker hosts; None for one broker (devices dial that host)."""
    b = p.spec.broker
    hosts = list(p.placement["broker"])
    if b.engine != "nats" or len(hosts) < 2:
        return None
    port = next(lst.port for lst in b.listeners if lst.protocol == "mqtt")
    return {"port": port, "hosts": hosts}


class Aws(Cloud):
    kind: ClassVar[str] = "aws"
    sizes_field: ClassVar[str] = "instance_types"
    region_field: ClassVar[str] = "region"
    region_key: ClassVar[str] = "aws:region"


class Azure(Cloud):
    kind: ClassVar[str] = "azure"
    sizes_field: ClassVar[str] = "vm_sizes"
    region_field: ClassVar[str] = "location"
    region_key: ClassVar[str] = "azure-native:location"


TARGETS: dict[str, RenderTarget] = {t.kind: t for t in (Local(), Baremetal(), Aws(), Azure())}


def for_platform(p: Platform) -> RenderTarget:
    return TARGETS[p.spec.target.kind]
