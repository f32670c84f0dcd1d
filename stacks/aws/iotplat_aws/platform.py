"""The whole AWS platform: one Network, and a Firewall plus a Host per planned host."""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_aws as aws
from iotplat_stack.config import Host as HostSpec
from iotplat_stack.plan import HostPlan
from iotplat_stack.program import PlatformArgs, build_hosts

from .firewall import Firewall, FirewallArgs
from .host import Host, HostArgs
from .network import Network, NetworkArgs
from .tags import tagged

# Debian's official AMIs are published by this account (https://wiki.debian.org/Cloud/AmazonEC2Image).
DEBIAN_OWNER = "136693071363"
AMI_NAME_PATTERNS = {"debian-12": "debian-12-amd64-*", "debian-13": "debian-13-amd64-*"}

__all__ = ["Platform", "PlatformArgs"]


class Platform(pulumi.ComponentResource):
    hosts: pulumi.Output[dict[str, Any]]

    def __init__(self, name: str, args: PlatformArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("iotplat:aws:Platform", name, None, opts)
        cfg, plan = args.config, args.plan
        child = pulumi.ResourceOptions(parent=self)

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

        def make_host(host_name: str, spec: HostSpec, placed: HostPlan, host_tags: dict[str, str]) -> Host:
            firewall = Firewall(
                host_name,
                FirewallArgs(vpc_id=network.vpc_id, host=spec.name, rules=placed.rules, tags=host_tags),
                opts=child,
            )
            subnet_id = network.private_subnet_id if placed.subnet == "private" else network.public_subnet_id
            assert subnet_id is not None
            return Host(
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

        self.hosts = build_hosts(name, cfg, plan, make_host)
        self.register_outputs({"hosts": self.hosts})
