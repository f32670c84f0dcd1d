"""The virtual network the platform's hosts live in."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pulumi
from pulumi_azure_native import network


@dataclass
class NetworkArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    cidr: str
    subnet_cidr: str
    # Hosts without a public IP still need outbound access to package mirrors. The subnet turns
    # Azure's implicit "default outbound access" off, so a NAT gateway provides it.
    nat_gateway: bool
    tags: Mapping[str, str]
    retired: bool = False  # a retired platform keeps only its data disks: no network




class Network(pulumi.ComponentResource):
    subnet_id: pulumi.Output[str]

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("iotplat:azure:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        common = dict(
            resource_group_name=args.resource_group_name, location=args.location, tags=dict(args.tags)
        )
        if args.retired:
            self.subnet_id = None  # type: ignore[assignment]
            self.register_outputs({})
            return

        vnet = network.VirtualNetwork(
            f"{name}-vnet",
            virtual_network_name="vnet",
            address_space={"address_prefixes": [args.cidr]},
            opts=child,
            **common,
        )
        nat_ref = None
        if args.nat_gateway:
            nat_ip = network.PublicIPAddress(
                f"{name}-nat-ip",
                public_ip_address_name="nat-ip",
                sku={"name": "Standard", "tier": "Regional"},
                public_ip_allocation_method="Static",
                public_ip_address_version="IPv4",
                opts=child,
                **common,
            )
            nat = network.NatGateway(
                f"{name}-nat",
                nat_gateway_name="nat",
                sku={"name": "Standard"},
                public_ip_addresses=[{"id": nat_ip.id}],
                opts=child,
                **common,
            )
            nat_ref = {"id": nat.id}
        # Subnets take no tags in Azure; the firewall sits on each host's NIC, not here.
        subnet = network.Subnet(
            f"{name}-hosts",
            subnet_name="hosts",
            resource_group_name=args.resource_group_name,
            virtual_network_name=vnet.name,
            address_prefix=args.subnet_cidr,
            default_outbound_access=False,
            nat_gateway=nat_ref,
            opts=child,
        )

        self.subnet_id = subnet.id
        self.register_outputs({"virtualNetworkId": vnet.id, "subnetId": self.subnet_id})
