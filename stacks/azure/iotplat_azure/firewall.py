"""One network security group per host, holding exactly the rules the plan lists."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
from iotplat_stack.plan import Rule
from pulumi_azure_native import network

# An NSG holds at most 1000 rules; keep half for each direction.
MAX_RULES_PER_DIRECTION = 500
FIRST_PRIORITY = 100
DENY_ALL_PRIORITY = 4096
# Where Azure's load balancer probes come from; the NSG names it by its service tag.
LB_PROBE_CIDR = "168.63.129.16/32"
LB_PROBE_TAG = "AzureLoadBalancer"


def _source(rule: Rule) -> str:
    return LB_PROBE_TAG if rule.cidr == LB_PROBE_CIDR else rule.cidr


def security_rules(rules: Sequence[Rule]) -> list[dict[str, Any]]:
    """NSG rules for the plan's rules, each direction closed by an explicit deny-all.

    Azure's default rules allow all traffic inside the virtual network and all outbound traffic
    to the internet; the two deny rules at the last user priority override them, so only the
    planned rules are open (the load balancer's probes too: the plan's rule from 168.63.129.16 becomes the
    ``AzureLoadBalancer`` service tag). Platform traffic to 168.63.129.16 (DNS, VM agent) and IMDS is not
    subject to NSG rules, per Azure's documentation.
    """
    out: list[dict[str, Any]] = []
    counters = {"ingress": 0, "egress": 0}
    for rule in rules:
        priority = FIRST_PRIORITY + counters[rule.direction]
        counters[rule.direction] += 1
        inbound = rule.direction == "ingress"
        out.append(
            {
                "name": f"{'in' if inbound else 'out'}-{priority}-{rule.protocol}-{rule.port}",
                "priority": priority,
                "direction": "Inbound" if inbound else "Outbound",
                "access": "Allow",
                "protocol": rule.protocol.capitalize(),
                "source_address_prefix": _source(rule) if inbound else "*",
                "source_port_range": "*",
                "destination_address_prefix": "*" if inbound else rule.cidr,
                "destination_port_range": str(rule.port),
                "description": rule.description,
            }
        )
    for direction in ("Inbound", "Outbound"):
        out.append(
            {
                "name": f"deny-all-{direction.lower()}",
                "priority": DENY_ALL_PRIORITY,
                "direction": direction,
                "access": "Deny",
                "protocol": "*",
                "source_address_prefix": "*",
                "source_port_range": "*",
                "destination_address_prefix": "*",
                "destination_port_range": "*",
                "description": "Nothing else is open",
            }
        )
    return out


@dataclass
class FirewallArgs:
    host: str
    resource_group_name: pulumi.Input[str]
    location: str
    rules: Sequence[Rule]
    tags: Mapping[str, str]


class Firewall(pulumi.ComponentResource):
    security_group_id: pulumi.Output[str]

    def __init__(self, name: str, args: FirewallArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("iotplat:azure:Firewall", name, None, opts)
        # Rules are inline so that the group and its rules change in one atomic update.
        group = network.NetworkSecurityGroup(
            f"{name}-nsg",
            network_security_group_name=f"{args.host}-nsg",
            resource_group_name=args.resource_group_name,
            location=args.location,
            security_rules=security_rules(args.rules),
            tags=dict(args.tags),
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.security_group_id = group.id
        self.register_outputs({"securityGroupId": self.security_group_id})
