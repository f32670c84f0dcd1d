"""The VPC the platform's hosts live in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from .tags import tagged


@dataclass
class NetworkArgs:
    cidr: str
    public_subnet_cidr: str
    # Hosts without a public IP. AWS routes per subnet, so they cannot share the public subnet's
    # default route (internet gateway); theirs points at a NAT gateway instead.
    private_subnet_cidr: str | None
    nat_private_ip: str | None  # fixed, outside the hosts' range of the public subnet
    tags: Mapping[str, str]
    retired: bool = False  # a retired platform keeps only its data volumes: no VPC, just the zone they are in


class Network(pulumi.ComponentResource):
    vpc_id: pulumi.Output[str]
    availability_zone: pulumi.Output[str]
    public_subnet_id: pulumi.Output[str]
    private_subnet_id: pulumi.Output[str] | None

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("iotplat:aws:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        # All hosts share one zone: the data volumes must sit in the instances' zone, and one
        # zone keeps internal traffic free. The first available zone is stable for a region.
        zones = aws.get_availability_zones_output(
            state="available",
            filters=[{"name": "opt-in-status", "values": ["opt-in-not-required"]}],
            opts=pulumi.InvokeOutputOptions(parent=self),
        )
        self.availability_zone = zones.names[0]
        self.vpc_id = self.public_subnet_id = self.private_subnet_id = None  # type: ignore[assignment]
        if args.retired:
            self.register_outputs({"availabilityZone": self.availability_zone})
            return

        vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=args.cidr,
            enable_dns_support=True,
            enable_dns_hostnames=True,
            tags=tagged(args.tags, f"{name}-vpc"),
            opts=child,
        )
        # Take over the VPC's default security group and leave it without rules, so nothing
        # that lands in it by accident is reachable (CIS AWS Foundations 5.4).
        aws.ec2.DefaultSecurityGroup(
            f"{name}-default-sg",
            vpc_id=vpc.id,
            tags=tagged(args.tags, f"{name}-default-sg-unused"),
            opts=child,
        )
        gateway = aws.ec2.InternetGateway(
            f"{name}-igw", vpc_id=vpc.id, tags=tagged(args.tags, f"{name}-igw"), opts=child
        )
        public_subnet = aws.ec2.Subnet(
            f"{name}-public",
            vpc_id=vpc.id,
            cidr_block=args.public_subnet_cidr,
            availability_zone=self.availability_zone,
            # Public hosts get an Elastic IP (stable across stop/start), never an automatic one.
            map_public_ip_on_launch=False,
            tags=tagged(args.tags, f"{name}-public"),
            opts=child,
        )
        public_routes = aws.ec2.RouteTable(
            f"{name}-public-rt",
            vpc_id=vpc.id,
            routes=[{"cidr_block": "0.0.0.0/0", "gateway_id": gateway.id}],
            tags=tagged(args.tags, f"{name}-public-rt"),
            opts=child,
        )
        aws.ec2.RouteTableAssociation(
            f"{name}-public-rta", subnet_id=public_subnet.id, route_table_id=public_routes.id, opts=child
        )

        self.private_subnet_id = None
        if args.private_subnet_cidr is not None:
            nat_ip = aws.ec2.Eip(
                f"{name}-nat-ip",
                domain="vpc",
                tags=tagged(args.tags, f"{name}-nat-ip"),
                opts=pulumi.ResourceOptions(parent=self, depends_on=[gateway]),
            )
            nat = aws.ec2.NatGateway(
                f"{name}-nat",
                subnet_id=public_subnet.id,
                allocation_id=nat_ip.allocation_id,
                private_ip=args.nat_private_ip,
                tags=tagged(args.tags, f"{name}-nat"),
                opts=pulumi.ResourceOptions(parent=self, depends_on=[gateway]),
            )
            private_subnet = aws.ec2.Subnet(
                f"{name}-private",
                vpc_id=vpc.id,
                cidr_block=args.private_subnet_cidr,
                availability_zone=self.availability_zone,
                map_public_ip_on_launch=False,
                tags=tagged(args.tags, f"{name}-private"),
                opts=child,
            )
            private_routes = aws.ec2.RouteTable(
                f"{name}-private-rt",
                vpc_id=vpc.id,
                routes=[{"cidr_block": "0.0.0.0/0", "nat_gateway_id": nat.id}],
                tags=tagged(args.tags, f"{name}-private-rt"),
                opts=child,
            )
            aws.ec2.RouteTableAssociation(
                f"{name}-private-rta",
                subnet_id=private_subnet.id,
                route_table_id=private_routes.id,
                opts=child,
            )
            self.private_subnet_id = private_subnet.id

        self.vpc_id = vpc.id
        self.public_subnet_id = public_subnet.id
        self.register_outputs(
            {
                "vpcId": self.vpc_id,
                "availabilityZone": self.availability_zone,
                "publicSubnetId": self.public_subnet_id,
                "privateSubnetId": self.private_subnet_id,
            }
        )
