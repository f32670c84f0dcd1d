"""The whole AWS platform: one Network, a Firewall plus a Host per planned host, and for a broker cluster a
network load balancer in front of its nodes."""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_aws as aws
from iotplat_stack.config import Host as HostSpec
from iotplat_stack.plan import HostPlan
from iotplat_stack.program import PlatformArgs, build_hosts

from .firewall import Firewall, FirewallArgs
from .host import Host, HostArgs
from .loadbalancer import LoadBalancer, LoadBalancerArgs
from .network import Network, NetworkArgs
from .tags import tagged

# Debian's official AMIs are published by this account (https://wiki.debian.org/Cloud/AmazonEC2Image).
DEBIAN_OWNER = "136693071363"
AMI_NAME_PATTERNS = {"debian-12": "debian-12-amd64-*", "debian-13": "debian-13-amd64-*"}
# The NLB's health checks come from its own private addresses in the public subnet: the network (the default).
HEALTH_CHECK_CIDR = None

__all__ = ["Platform", "PlatformArgs"]


class Platform(pulumi.ComponentResource):
    hosts: pulumi.Output[dict[str, Any]]
    broker_load_balancer: pulumi.Output[dict[str, Any]] | None

    def __init__(self, name: str, args: PlatformArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("iotplat:aws:Platform", name, None, opts)
        cfg, plan = args.config, args.plan
        child = pulumi.ResourceOptions(parent=self)
        self.broker_load_balancer = None

        network = Network(
            name,
            NetworkArgs(
                cidr=str(cfg.network_cidr),
                public_subnet_cidr=plan.public_subnet,
                private_subnet_cidr=plan.private_subnet,
                nat_private_ip=plan.nat_private_ip,
                tags=cfg.tags,
                retired=cfg.retired,
            ),
            opts=child,
        )
        if cfg.retired:  # only the data volumes stay, under the same parents (same URNs: the same volumes)
            def keep_disk(host_name: str, spec: HostSpec, placed: HostPlan, host_tags: dict[str, str]) -> Host:
                return Host(host_name, HostArgs.data_only_args(network.availability_zone, spec.disk_gb, host_tags),
                            opts=child)

            self.hosts = build_hosts(name, cfg, plan, keep_disk)
            self.register_outputs({"hosts": self.hosts})
            return
        image = aws.ec2.get_ami_output(
            most_recent=True,
            owners=[DEBIAN_OWNER],
            filters=[
                {"name": "name", "values": [AMI_NAME_PATTERNS[cfg.image]]},
                {"name": "architecture", "values": ["x86_64"]},
                {"name": "virtualization-type", "values": ["hvm"]},
                {"name": "root-device-type", "values": ["ebs"]},
            ],
            opts=pulumi.InvokeOutputOptions(parent=self),
        )
        key = aws.ec2.KeyPair(
            f"{name}-ssh",
            public_key=cfg.ssh_public_key,
            tags=tagged(cfg.tags, f"{name}-ssh"),
            opts=child,
        )

        instance_ids: dict[str, pulumi.Output[str]] = {}

        def make_host(host_name: str, spec: HostSpec, placed: HostPlan, host_tags: dict[str, str]) -> Host:
            firewall = Firewall(
                host_name,
                FirewallArgs(vpc_id=network.vpc_id, host=spec.name, rules=placed.rules, tags=host_tags),
                opts=child,
            )
            subnet_id = network.private_subnet_id if placed.subnet == "private" else network.public_subnet_id
            assert subnet_id is not None
            host = Host(
                host_name,
                HostArgs(
                    ami_id=image.id,
                    instance_type=spec.size,
                    subnet_id=subnet_id,
                    availability_zone=network.availability_zone,
                    private_ip=placed.private_ip,
                    security_group_id=firewall.security_group_id,
                    key_name=key.key_name,
                    public=placed.public,
                    disk_gb=spec.disk_gb,
                    ssh_user=cfg.ssh_user,
                    ssh_public_key=cfg.ssh_public_key,
                    tags=host_tags,
                ),
                # Elastic IPs and the NAT path need the internet gateway and routes first.
                opts=pulumi.ResourceOptions(parent=self, depends_on=[network]),
            )
            assert host.instance_id is not None
            instance_ids[spec.name] = host.instance_id
            return host

        self.hosts = build_hosts(name, cfg, plan, make_host)
        lb = plan.load_balancer
        if lb is not None:
            assert network.public_subnet_id is not None
            balancer = LoadBalancer(
                f"{name}-broker",
                LoadBalancerArgs(
                    stack=name,
                    vpc_id=network.vpc_id,
                    subnet_id=network.public_subnet_id,
                    port=lb.port,
                    targets={host: instance_ids[host] for host in lb.hosts},
                    tags=cfg.tags,
                ),
                opts=child,
            )
            self.broker_load_balancer = pulumi.Output.from_input(
                {"dnsName": balancer.dns_name, "address": None, "port": lb.port, "hosts": list(lb.hosts)}
            )
        self.register_outputs({"hosts": self.hosts, "brokerLoadBalancer": self.broker_load_balancer})
