"""One Debian VM with a static private IP, an encrypted data disk and, if public, a static public IP."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi_azure_native import compute, network

# Debian's own marketplace image (publisher Debian); gen2 for current VM sizes. No purchase plan.
IMAGES = {
    "debian-12": {"publisher": "Debian", "offer": "debian-12", "sku": "12-gen2", "version": "latest"},
    "debian-13": {"publisher": "Debian", "offer": "debian-13", "sku": "13-gen2", "version": "latest"},
}
DATA_DISK_LUN = 0
# Where the data disk appears on a Debian VM with the Azure udev rules (walinuxagent).
DATA_DEVICE = f"/dev/disk/azure/scsi1/lun{DATA_DISK_LUN}"
DISK_SKU = "StandardSSD_LRS"


@dataclass
class HostArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    hostname: str
    vm_size: str
    image: str
    subnet_id: pulumi.Input[str] | None
    private_ip: str
    security_group_id: pulumi.Input[str] | None
    public: bool
    disk_gb: int
    ssh_user: str
    ssh_public_key: str
    tags: Mapping[str, str]
    data_only: bool = False  # a retired platform: the data disk and nothing else
    backend_pool_id: pulumi.Input[str] | None = None  # the broker load balancer's pool the NIC joins, if any

    @classmethod
    def data_only_args(cls, resource_group_name: pulumi.Input[str], location: str, hostname: str, disk_gb: int,
                       tags: Mapping[str, str]) -> HostArgs:
        return cls(resource_group_name=resource_group_name, location=location, hostname=hostname, vm_size="",
                   image="", subnet_id=None, private_ip="", security_group_id=None, public=False, disk_gb=disk_gb,
                   ssh_user="", ssh_public_key="", tags=tags, data_only=True)


def _first_private_ip(configs: Any) -> str:
    return configs[0].private_ip_address


class Host(pulumi.ComponentResource):
    private_ip: pulumi.Output[str]
    public_ip: pulumi.Output[str] | None
    data_device: str

    def __init__(self, name: str, args: HostArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("iotplat:azure:Host", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        common = dict(
            resource_group_name=args.resource_group_name, location=args.location, tags=dict(args.tags)
        )

        disk = compute.Disk(
            f"{name}-data",
            disk_name=f"{args.hostname}-data",
            creation_data={"create_option": "Empty"},
            disk_size_gb=args.disk_gb,
            sku={"name": DISK_SKU},
            # Managed disks are always encrypted at rest; say which keys, and allow no export URL.
            encryption={"type": "EncryptionAtRestWithPlatformKey"},
            network_access_policy="DenyAll",
            public_network_access="Disabled",
            opts=child,
            **common,
        )
        self.data_device = DATA_DEVICE
        if args.data_only:  # retired: the disk keeps the data until the platform comes back or is destroyed
            self.public_ip = None
            self.private_ip = None  # type: ignore[assignment]
            self.register_outputs({"privateIp": None, "publicIp": None, "dataDevice": self.data_device})
            return

        public_ip_ref = None
        self.public_ip = None
        if args.public:
            # Standard SKU: static, and closed to inbound traffic unless the NSG allows it.
            address = network.PublicIPAddress(
                f"{name}-ip",
                public_ip_address_name=f"{args.hostname}-ip",
                sku={"name": "Standard", "tier": "Regional"},
                public_ip_allocation_method="Static",
                public_ip_address_version="IPv4",
                opts=child,
                **common,
            )
            public_ip_ref = {"id": address.id}
            self.public_ip = address.ip_address

        pool = {} if args.backend_pool_id is None else {
            "load_balancer_backend_address_pools": [{"id": args.backend_pool_id}]}
        nic = network.NetworkInterface(
            f"{name}-nic",
            network_interface_name=f"{args.hostname}-nic",
            ip_configurations=[
                {
                    "name": "primary",
                    "primary": True,
                    "subnet": {"id": args.subnet_id},
                    "private_ip_allocation_method": "Static",
                    "private_ip_address": args.private_ip,
                    "private_ip_address_version": "IPv4",
                    "public_ip_address": public_ip_ref,
                    **pool,
                }
            ],
            network_security_group={"id": args.security_group_id},
            enable_ip_forwarding=False,
            opts=child,
            **common,
        )
        compute.VirtualMachine(
            f"{name}-vm",
            vm_name=args.hostname,
            hardware_profile={"vm_size": args.vm_size},
            os_profile={
                "computer_name": args.hostname,
                "admin_username": args.ssh_user,
                "linux_configuration": {
                    "disable_password_authentication": True,
                    "provision_vm_agent": True,
                    "ssh": {
                        "public_keys": [
                            {
                                "path": f"/home/{args.ssh_user}/.ssh/authorized_keys",
                                "key_data": args.ssh_public_key,
                            }
                        ]
                    },
                },
            },
            storage_profile={
                "image_reference": IMAGES[args.image],
                "os_disk": {
                    "create_option": "FromImage",
                    "caching": "ReadWrite",
                    "delete_option": "Delete",
                    "managed_disk": {"storage_account_type": DISK_SKU},
                },
                "data_disks": [
                    {
                        "lun": DATA_DISK_LUN,
                        "create_option": "Attach",
                        "caching": "None",
                        # The Disk resource owns the data: replacing the VM detaches, never deletes.
                        "delete_option": "Detach",
                        "managed_disk": {"id": disk.id},
                    }
                ],
            },
            network_profile={"network_interfaces": [{"id": nic.id, "primary": True}]},
            diagnostics_profile={"boot_diagnostics": {"enabled": True}},
            opts=child,
            **common,
        )

        self.private_ip = nic.ip_configurations.apply(_first_private_ip)
        self.register_outputs(
            {"privateIp": self.private_ip, "publicIp": self.public_ip, "dataDevice": self.data_device}
        )
