"""The whole Azure platform: a resource group, one Network, a Firewall plus a Host per planned host, and for a
broker cluster a Standard public load balancer in front of its nodes."""

from __future__ import annotations

from typing import Any

import pulumi
from iotplat_stack.config import Host as HostSpec
from iotplat_stack.plan import HostPlan
from iotplat_stack.program import PlatformArgs, build_hosts
from pulumi_azure_native import resources

from .firewall import Firewall, FirewallArgs
from .firewall import LB_PROBE_CIDR
from .host import Host, HostArgs
from .loadbalancer import LoadBalancer, LoadBalancerArgs
from .network import Network, NetworkArgs

__all__ = ["Platform", "PlatformArgs"]

# Azure's load balancer probes come from 168.63.129.16 (the AzureLoadBalancer service tag).
HEALTH_CHECK_CIDR = LB_PROBE_CIDR


class Platform(pulumi.ComponentResource):
    """Azure resources are named inside the platform's own resource group (``iotplat-<name>``),
    so their names need no platform prefix; Pulumi's logical names carry it instead."""

    hosts: pulumi.Output[dict[str, Any]]
    broker_load_balancer: pulumi.Output[dict[str, Any]] | None

    def __init__(self, name: str, args: PlatformArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("iotplat:azure:Platform", name, None, opts)
        cfg, plan = args.config, args.plan
        child = pulumi.ResourceOptions(parent=self)
        self.broker_load_balancer = None

        group = resources.ResourceGroup(
            f"{name}-rg",
            resource_group_name=f"iotplat-{name}",
            location=cfg.location,
            tags=dict(cfg.tags),
            opts=child,
        )
        network = Network(
            name,
            NetworkArgs(
                resource_group_name=group.name,
                location=cfg.location,
                cidr=str(cfg.network_cidr),
                subnet_cidr=plan.public_subnet,
                nat_gateway=plan.needs_nat,
                tags=cfg.tags,
                retired=cfg.retired,
            ),
            opts=child,
        )
        if cfg.retired:  # only the data disks stay, under the same parents (same URNs: the same disks)
            def keep_disk(host_name: str, spec: HostSpec, placed: HostPlan, host_tags: dict[str, str]) -> Host:
                return Host(host_name, HostArgs.data_only_args(group.name, cfg.location, spec.name, spec.disk_gb,
                                                               host_tags), opts=child)

            self.hosts = build_hosts(name, cfg, plan, keep_disk)
            self.register_outputs({"hosts": self.hosts, "resourceGroup": group.name})
            return

        lb = plan.load_balancer
        balancer = None
        if lb is not None:
            balancer = LoadBalancer(
                f"{name}-broker",
                LoadBalancerArgs(resource_group_name=group.name, resource_group_id=group.id, location=cfg.location,
                                 port=lb.port, tags=cfg.tags),
                opts=child,
            )
            self.broker_load_balancer = pulumi.Output.from_input(
                {"dnsName": None, "address": balancer.address, "port": lb.port, "hosts": list(lb.hosts)}
            )

        def make_host(host_name: str, spec: HostSpec, placed: HostPlan, host_tags: dict[str, str]) -> Host:
            behind = balancer is not None and lb is not None and spec.name in lb.hosts
            firewall = Firewall(
                host_name,
                FirewallArgs(
                    host=spec.name,
                    resource_group_name=group.name,
                    location=cfg.location,
                    rules=placed.rules,
                    tags=host_tags,
                ),
                opts=child,
            )
            return Host(
                host_name,
                HostArgs(
                    resource_group_name=group.name,
                    location=cfg.location,
                    hostname=spec.name,
                    vm_size=spec.size,
                    image=cfg.image,
                    subnet_id=network.subnet_id,
                    private_ip=placed.private_ip,
                    security_group_id=firewall.security_group_id,
                    public=placed.public,
                    disk_gb=spec.disk_gb,
                    ssh_user=cfg.ssh_user,
                    ssh_public_key=cfg.ssh_public_key,
                    tags=host_tags,
                    backend_pool_id=balancer.backend_pool_id if behind and balancer is not None else None,
                ),
                # Outbound (NAT gateway) must exist before a VM without a public IP boots; a NIC joins the
                # load balancer's pool only once the load balancer exists.
                opts=pulumi.ResourceOptions(parent=self, depends_on=[network, balancer] if behind else [network]),
            )

        self.hosts = build_hosts(name, cfg, plan, make_host)
        self.register_outputs({"hosts": self.hosts, "resourceGroup": group.name,
                               "brokerLoadBalancer": self.broker_load_balancer})
