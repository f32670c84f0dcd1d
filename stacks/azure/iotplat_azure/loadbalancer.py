"""The Standard public load balancer in front of the broker nodes of a cluster (``iotplat:brokerLoadBalancer``).

A static Standard public IP as the frontend, a backend pool the broker hosts' NICs join (``Host``), a TCP
probe and one TCP rule on the MQTT over TLS port, floating IP off (the nodes receive the traffic on their own
private address). TLS passes through: the nodes' certificates carry the DNS name devices dial (the spec's
``broker.server_names``, an A record to the exported ``address``). Azure's load balancer keeps the client's
source address, so each node's NSG still admits only ``deviceCidrs`` on that port; the probes come from
168.63.129.16, which the NSG admits as the ``AzureLoadBalancer`` service tag (firewall.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pulumi
from pulumi_azure_native import network

LB_NAME = "broker-lb"
FRONTEND = "mqtt"
POOL = "brokers"
PROBE = "mqtt-tcp"
RULE = "mqtt"
# A node that stops answering leaves the rotation after 2 failed probes 5 s apart.
PROBE_INTERVAL = 5
PROBE_THRESHOLD = 2
# MQTT keepalives are far shorter; the LB resets (TCP RST) a flow it drops, so devices notice at once.
IDLE_TIMEOUT_MINUTES = 30


def sub_resource_id(resource_group_id: str, kind: str, name: str) -> str:
    """The ARM id of a part of the load balancer (its parts refer to each other by id)."""
    return f"{resource_group_id}/providers/Microsoft.Network/loadBalancers/{LB_NAME}/{kind}/{name}"


@dataclass
class LoadBalancerArgs:
    resource_group_name: pulumi.Input[str]
    resource_group_id: pulumi.Input[str]
    location: str
    port: int
    tags: Mapping[str, str]


class LoadBalancer(pulumi.ComponentResource):
    address: pulumi.Output[str]
    backend_pool_id: pulumi.Output[str]

    def __init__(self, name: str, args: LoadBalancerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("iotplat:azure:LoadBalancer", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        common = dict(resource_group_name=args.resource_group_name, location=args.location, tags=dict(args.tags))
        group_id = pulumi.Output.from_input(args.resource_group_id)

        def part(kind: str, part_name: str) -> pulumi.Output[str]:
            return group_id.apply(lambda gid: sub_resource_id(gid, kind, part_name))

        address = network.PublicIPAddress(
            f"{name}-ip",
            public_ip_address_name=f"{LB_NAME}-ip",
            sku={"name": "Standard", "tier": "Regional"},
            public_ip_allocation_method="Static",
            public_ip_address_version="IPv4",
            opts=child,
            **common,
        )
        network.LoadBalancer(
            f"{name}-lb",
            load_balancer_name=LB_NAME,
            sku={"name": "Standard", "tier": "Regional"},
            frontend_ip_configurations=[{"name": FRONTEND, "public_ip_address": {"id": address.id}}],
            backend_address_pools=[{"name": POOL}],
            probes=[
                {
                    "name": PROBE,
                    "protocol": "Tcp",
                    "port": args.port,
                    "interval_in_seconds": PROBE_INTERVAL,
                    "probe_threshold": PROBE_THRESHOLD,
                }
            ],
            load_balancing_rules=[
                {
                    "name": RULE,
                    "protocol": "Tcp",
                    "frontend_port": args.port,
                    "backend_port": args.port,
                    "frontend_ip_configuration": {"id": part("frontendIPConfigurations", FRONTEND)},
                    "backend_address_pool": {"id": part("backendAddressPools", POOL)},
                    "probe": {"id": part("probes", PROBE)},
                    "enable_floating_ip": False,
                    "enable_tcp_reset": True,
                    "idle_timeout_in_minutes": IDLE_TIMEOUT_MINUTES,
                    # outbound goes through each node's own public IP (or the NAT gateway), never the LB
                    "disable_outbound_snat": True,
                    "load_distribution": "Default",
                }
            ],
            opts=child,
            **common,
        )
        self.address = address.ip_address
        self.backend_pool_id = part("backendAddressPools", POOL)
        self.register_outputs({"address": self.address, "backendPoolId": self.backend_pool_id})
