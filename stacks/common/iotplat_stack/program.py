"""The wiring both programs share: the per-host loop, the host outputs and the stack exports.

Nothing here creates a resource itself. ``build_hosts`` calls the cloud's own ``make_host`` for
each planned host (which creates that cloud's Firewall and Host) and collects what the inventory
needs; ``run`` is what a program does once ``sys.path`` is set (``stacks/common/bootstrap.py``): read the config, plan,
build the cloud's ``Platform``, export the outputs described in docs/stacks.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import pulumi

from . import config, plan
from .config import Host, StackConfig
from .plan import HostPlan, Plan


@dataclass
class PlatformArgs:
    """What a cloud's ``Platform`` component is built from."""

    config: StackConfig
    plan: Plan


class BuiltHost(Protocol):
    """What the outputs need of a cloud's ``Host`` component."""

    public_ip: Any  # None for a host without a public IP
    private_ip: Any
    data_device: Any


def build_hosts(
    name: str,
    cfg: StackConfig,
    layout: Plan,
    make_host: Callable[[str, Host, HostPlan, dict[str, str]], BuiltHost],
) -> pulumi.Output[dict[str, Any]]:
    """One ``make_host(host_name, spec, placed, host_tags)`` per host, in spec order.

    ``host_name`` is ``<name>-<host>`` (the Pulumi logical name of the host's resources) and
    ``host_tags`` are the config's tags plus ``iotplat-host``. Returns the ``hosts`` output:
    ``{host: {"publicIp", "privateIp", "dataDevice"}}``.
    """
    exported: dict[str, Any] = {}
    for spec, placed in zip(cfg.hosts, layout.hosts, strict=True):
        host = make_host(f"{name}-{spec.name}", spec, placed, {**cfg.tags, "iotplat-host": spec.name})
        exported[spec.name] = {
            "publicIp": host.public_ip,
            "privateIp": host.private_ip,
            "dataDevice": host.data_device,
        }
    return pulumi.Output.from_input(exported)


class PlatformComponent(Protocol):
    hosts: pulumi.Output[dict[str, Any]]
    # {"dnsName", "address", "port", "hosts"} of the load balancer in front of the broker nodes, or None
    broker_load_balancer: pulumi.Output[dict[str, Any]] | None


def run(
    target: str,
    platform: Callable[[str, PlatformArgs], PlatformComponent],
    *,
    private_subnet: bool,
    max_rules_per_direction: int,
    health_check_cidr: str | None = None,
) -> None:
    """Read the stack config for ``target``, plan, build ``platform`` and export its outputs."""
    cfg = config.from_pulumi(target)
    layout = plan.plan(cfg, private_subnet=private_subnet, max_rules_per_direction=max_rules_per_direction,
                       health_check_cidr=health_check_cidr)
    built = platform(cfg.name, PlatformArgs(config=cfg, plan=layout))
    pulumi.export("hosts", built.hosts)
    pulumi.export("sshUser", cfg.ssh_user)
    pulumi.export("sshJumpHost", None if cfg.retired else layout.bastion)
    pulumi.export("mode", cfg.mode)
    pulumi.export("brokerLoadBalancer", built.broker_load_balancer)
