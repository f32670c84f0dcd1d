"""One EC2 instance with its encrypted data volume and, if it is public, an Elastic IP."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from .tags import tagged

# The default user of Debian's official AMIs; the key pair's key is installed for it.
AMI_DEFAULT_USER = "admin"
DATA_DEVICE_NAME = "/dev/sdf"


def user_data(ssh_user: str, ssh_public_key: str) -> str | None:
    """Cloud-init user data, or None when the AMI's default user is the wanted SSH user.

    Only a user name and a public key go in: user data is readable by anything on the host
    through IMDS and is stored in Pulumi state, so it must never carry a secret.
    """
    if ssh_user == AMI_DEFAULT_USER:
        return None
    return (
        "#cloud-config\n"
        "users:\n"
        f"  - name: {ssh_user}\n"
        "    groups: [sudo]\n"
        "    shell: /bin/bash\n"
        "    lock_passwd: true\n"
        "    sudo: 'ALL=(ALL) NOPASSWD:ALL'\n"
        "    ssh_authorized_keys:\n"
        f"      - {ssh_public_key}\n"
    )


def data_device_path(volume_id: str) -> str:
    """Where the data volume appears on Nitro instances (every current type, t3 included)."""
    return f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{volume_id.replace('-', '')}"


@dataclass
class HostArgs:
    ami_id: pulumi.Input[str] | None
    instance_type: str
    subnet_id: pulumi.Input[str] | None
    availability_zone: pulumi.Input[str]
    private_ip: str
    security_group_id: pulumi.Input[str] | None
    key_name: pulumi.Input[str] | None
    public: bool
    disk_gb: int
    ssh_user: str
    ssh_public_key: str
    tags: Mapping[str, str]
    data_only: bool = False  # a retired platform: the data volume and nothing else

    @classmethod
    def data_only_args(cls, availability_zone: pulumi.Input[str], disk_gb: int, tags: Mapping[str, str]) -> HostArgs:
        return cls(ami_id=None, instance_type="", subnet_id=None, availability_zone=availability_zone,
                   private_ip="", security_group_id=None, key_name=None, public=False, disk_gb=disk_gb,
                   ssh_user="", ssh_public_key="", tags=tags, data_only=True)


class Host(pulumi.ComponentResource):
    instance_id: pulumi.Output[str] | None  # None for a retired host (its data volume only)
    private_ip: pulumi.Output[str]
    public_ip: pulumi.Output[str] | None
    data_device: pulumi.Output[str]

    def __init__(self, name: str, args: HostArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("iotplat:aws:Host", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        volume = aws.ebs.Volume(
            f"{name}-data",
            availability_zone=args.availability_zone,
            size=args.disk_gb,
            type="gp3",
            encrypted=True,
            tags=tagged(args.tags, f"{name}-data"),
            opts=child,
        )
        self.data_device = volume.id.apply(data_device_path)
        self.public_ip = None
        self.instance_id = None
        if args.data_only:  # retired: the volume keeps the data until the platform comes back or is destroyed
            self.private_ip = None  # type: ignore[assignment]
            self.register_outputs({"privateIp": None, "publicIp": None, "dataDevice": self.data_device})
            return

        instance = aws.ec2.Instance(
            f"{name}-vm",
            ami=args.ami_id,
            instance_type=args.instance_type,
            subnet_id=args.subnet_id,
            private_ip=args.private_ip,
            vpc_security_group_ids=[args.security_group_id],
            associate_public_ip_address=False,
            key_name=args.key_name,
            user_data=user_data(args.ssh_user, args.ssh_public_key),
            # cloud-init creates users on the first boot only: a changed user must be a new instance
            user_data_replace_on_change=True,
            metadata_options={
                "http_endpoint": "enabled",
                "http_tokens": "required",  # IMDSv2 only
                "http_put_response_hop_limit": 1,  # tokens do not reach containers
            },
            root_block_device={
                "encrypted": True,
                "volume_type": "gp3",
                "delete_on_termination": True,
                "tags": tagged(args.tags, f"{name}-root"),
            },
            tags=tagged(args.tags, name),
            # A newer Debian AMI must not replace running hosts on the next `up`: new hosts start
            # from the latest image, existing ones are upgraded in place by Ansible.
            opts=pulumi.ResourceOptions(parent=self, ignore_changes=["ami"]),
        )
        aws.ec2.VolumeAttachment(
            f"{name}-data-attachment",
            device_name=DATA_DEVICE_NAME,
            volume_id=volume.id,
            instance_id=instance.id,
            # Stop the instance rather than yank a mounted filesystem when the attachment goes.
            stop_instance_before_detaching=True,
            # A replaced instance: the volume can be attached to one instance at a time (VolumeInUse otherwise)
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
        )

        if args.public:
            address = aws.ec2.Eip(
                f"{name}-ip",
                domain="vpc",
                instance=instance.id,
                tags=tagged(args.tags, f"{name}-ip"),
                opts=child,
            )
            self.public_ip = address.public_ip

        self.instance_id = instance.id
        self.private_ip = instance.private_ip
        self.register_outputs(
            {"privateIp": self.private_ip, "publicIp": self.public_ip, "dataDevice": self.data_device}
        )
