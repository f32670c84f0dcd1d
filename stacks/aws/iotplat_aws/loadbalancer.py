"""The network load balancer in front of the broker nodes of a cluster (``iotplat:brokerLoadBalancer``).

Internet-facing in the public subnet, one TCP listener on the MQTT over TLS port forwarding to a TCP
target group of the broker instances. TLS passes through: the NLB never sees a certificate, the
nodes' own certificates carry the DNS name devices dial (the spec's ``broker.server_names``, a CNAME
to the exported ``dnsName``). Instance targets keep the client's source address, so each node's
security group still admits only ``deviceCidrs`` on that port; the NLB's health checks come from
its own addresses in the VPC, which the broker's ``internal`` rule on the same port admits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from .tags import tagged

# Load balancer and target group names: at most 32 letters, digits and '-', unique in the account and region.
MAX_NAME = 32
# A node that stops answering leaves the rotation after 2 failed checks 10 s apart; devices reconnect
# to the others (the kit's reconnect settings). Connections to a deregistered node get 30 s to drain.
HEALTH_CHECK_INTERVAL = 10
HEALTHY_THRESHOLD = 2
UNHEALTHY_THRESHOLD = 2
DEREGISTRATION_DELAY = 30


def aws_name(stack: str, suffix: str) -> str:
    """``<stack>-<suffix>``, shortened with a hash of the stack name when it would exceed 32 characters."""
    full = f"{stack}-{suffix}"
    if len(full) <= MAX_NAME:
        return full
    digest = hashlib.sha256(stack.encode()).hexdigest()[:8]
    head = stack[: MAX_NAME - len(suffix) - len(digest) - 2].rstrip("-")
    return f"{head}-{digest}-{suffix}"


@dataclass
class LoadBalancerArgs:
    stack: str  # <platform>-<environment>
    vpc_id: pulumi.Input[str]
    subnet_id: pulumi.Input[str]
    port: int
    targets: Mapping[str, pulumi.Input[str]]  # broker host -> its instance id, in spec order
    tags: Mapping[str, str]


class LoadBalancer(pulumi.ComponentResource):
    dns_name: pulumi.Output[str]

    def __init__(self, name: str, args: LoadBalancerArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("iotplat:aws:LoadBalancer", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        balancer = aws.lb.LoadBalancer(
            f"{name}-nlb",
            name=aws_name(args.stack, "mqtt"),
            load_balancer_type="network",
            internal=False,
            ip_address_type="ipv4",
            subnets=[args.subnet_id],
            tags=tagged(args.tags, f"{name}-nlb"),
            opts=child,
        )
        group = aws.lb.TargetGroup(
            f"{name}-targets",
            name=aws_name(args.stack, "brokers"),
            vpc_id=args.vpc_id,
            port=args.port,
            protocol="TCP",
            target_type="instance",
            preserve_client_ip="true",
            proxy_protocol_v2=False,
            deregistration_delay=DEREGISTRATION_DELAY,
            health_check={
                "enabled": True,
                "protocol": "TCP",
                "port": "traffic-port",
                "interval": HEALTH_CHECK_INTERVAL,
                "healthy_threshold": HEALTHY_THRESHOLD,
                "unhealthy_threshold": UNHEALTHY_THRESHOLD,
            },
            tags=tagged(args.tags, f"{name}-targets"),
            opts=child,
        )
        for host, instance_id in args.targets.items():
            aws.lb.TargetGroupAttachment(
                f"{name}-target-{host}",
                target_group_arn=group.arn,
                target_id=instance_id,
                port=args.port,
                opts=child,
            )
        aws.lb.Listener(
            f"{name}-listener",
            load_balancer_arn=balancer.arn,
            port=args.port,
            protocol="TCP",  # not TLS: the nodes terminate TLS themselves
            default_actions=[{"type": "forward", "target_group_arn": group.arn}],
            tags=tagged(args.tags, f"{name}-listener"),
            opts=child,
        )
        self.dns_name = balancer.dns_name
        self.register_outputs({"dnsName": self.dns_name})

