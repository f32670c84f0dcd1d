"""One security group per host, holding exactly the rules the plan lists."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws
from iotplat_stack.plan import Rule

from .tags import tagged

# Default per-security-group quota for inbound and for outbound rules.
MAX_RULES_PER_DIRECTION = 60


@dataclass
class FirewallArgs:
    vpc_id: pulumi.Input[str]
    host: str
    rules: Sequence[Rule]
    tags: Mapping[str, str]


def rule_name(prefix: str, rule: Rule) -> str:
    """A logical name that depends only on what the rule allows, so reordering causes no churn."""
    cidr = rule.cidr.replace("/", "-")
    return f"{prefix}-{'in' if rule.direction == 'ingress' else 'out'}-{rule.protocol}-{rule.port}-{cidr}"


class Firewall(pulumi.ComponentResource):
    security_group_id: pulumi.Output[str]

    def __init__(self, name: str, args: FirewallArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("iotplat:aws:Firewall", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        # Without inline rules the provider also removes the allow-all egress rule AWS adds to
        # every new group, so the standalone rules below are the whole policy.
        group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            vpc_id=args.vpc_id,
            description=f"iotplat host {args.host}: declared ports only",
            tags=tagged(args.tags, f"{name}-sg"),
            opts=child,
        )
        for rule in args.rules:
            common = dict(
                security_group_id=group.id,
                ip_protocol=rule.protocol,
                from_port=rule.port,
                to_port=rule.port,
                cidr_ipv4=rule.cidr,
                description=rule.description,
                tags=tagged(args.tags, f"{name} {rule.description}"[:255]),
                opts=child,
            )
            if rule.direction == "ingress":
                aws.vpc.SecurityGroupIngressRule(rule_name(name, rule), **common)
            else:
                aws.vpc.SecurityGroupEgressRule(rule_name(name, rule), **common)

        self.security_group_id = group.id
        self.register_outputs({"securityGroupId": self.security_group_id})
