"""Generate the least-privilege policies for the account that runs the stacks (docs/policies/).

    python scripts/stack_policies.py            # print what would be written
    python scripts/stack_policies.py --write    # write docs/policies/{aws-iam-policy.json,azure-role.json,README.md}
    python scripts/stack_policies.py --check    # exit 1 if the committed files differ (what the test does)

How: run the real stack programs (stacks/aws, stacks/azure) under Pulumi's mocks, as the stack tests do
(tests/stacks/stacks_harness.py), with every fixture config (one host; three hosts, one of them private,
which adds the NAT gateway; a broker cluster, which adds the load balancer), and collect the resource type tokens they register and the provider
functions (invokes) they call. Each token is looked up in the tables below, which give the API actions
Pulumi's provider needs to create, read (refresh, import), update, delete and tag that type, with the
reason for each. A token the tables do not cover stops the script, so a stack that starts using a new
type cannot be deployed with a policy that silently lacks it.

The tables are written from the providers' documented API calls (pulumi-aws wraps the Terraform AWS
provider; azure-native calls the ARM REST API), not observed against a real account: no cloud account
is reachable from the machines this was written on. docs/stacks.md says how to apply the policies and
what they cannot guarantee.

Requires a checkout with the `pulumi` extra installed (pulumi, pulumi-aws, pulumi-azure-native).
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "policies"
FIXTURES = {"aws": ("aws-1host", "aws-3host", "aws-cluster"), "azure": ("azure-1host", "azure-3host", "azure-cluster")}
COMPONENT_PREFIX = "iotplat:"  # the stacks' own ComponentResources: no cloud API behind them


@dataclass(frozen=True)
class Grant:
    actions: tuple[str, ...]
    why: str


def _g(why: str, *actions: str) -> Grant:
    return Grant(actions, why)


EC2_TAGS = _g("tags: set at create (TagSpecifications) and changed in place", "ec2:CreateTags", "ec2:DeleteTags")

# Pulumi type token (or invoke token, or "provider") -> what pulumi-aws calls for it.
AWS: dict[str, tuple[Grant, ...]] = {
    "provider": (
        _g("the provider validates its credentials and learns the account id at start", "sts:GetCallerIdentity"),
    ),
    "aws:ec2/getAmi:getAmi": (_g("find the newest Debian AMI", "ec2:DescribeImages"),),
    "aws:index/getAvailabilityZones:getAvailabilityZones": (
        _g("pick the zone all hosts and volumes share", "ec2:DescribeAvailabilityZones"),
    ),
    "aws:ec2/vpc:Vpc": (
        _g("create, read and delete the VPC", "ec2:CreateVpc", "ec2:DescribeVpcs", "ec2:DeleteVpc"),
        _g("enable DNS support and hostnames (read back on refresh)", "ec2:ModifyVpcAttribute",
           "ec2:DescribeVpcAttribute"),
        _g("read the VPC's default network ACL, main route table and default security group (attributes of "
           "the VPC)", "ec2:DescribeNetworkAcls", "ec2:DescribeRouteTables", "ec2:DescribeSecurityGroups"),
        EC2_TAGS,
    ),
    "aws:ec2/defaultSecurityGroup:DefaultSecurityGroup": (
        _g("adopt the VPC's default security group", "ec2:DescribeSecurityGroups"),
        _g("remove every rule from it (CIS AWS 5.4)", "ec2:RevokeSecurityGroupIngress",
           "ec2:RevokeSecurityGroupEgress"),
        EC2_TAGS,
    ),
    "aws:ec2/internetGateway:InternetGateway": (
        _g("create, attach, read, detach and delete the internet gateway", "ec2:CreateInternetGateway",
           "ec2:AttachInternetGateway", "ec2:DescribeInternetGateways", "ec2:DetachInternetGateway",
           "ec2:DeleteInternetGateway"),
        EC2_TAGS,
    ),
    "aws:ec2/subnet:Subnet": (
        _g("create, read and delete the subnets", "ec2:CreateSubnet", "ec2:DescribeSubnets", "ec2:DeleteSubnet"),
        _g("set subnet attributes (no automatic public IPs)", "ec2:ModifySubnetAttribute"),
        _g("on delete the provider looks for network interfaces still in the subnet",
           "ec2:DescribeNetworkInterfaces"),
        EC2_TAGS,
    ),
    "aws:ec2/routeTable:RouteTable": (
        _g("create, read and delete the route tables", "ec2:CreateRouteTable", "ec2:DescribeRouteTables",
           "ec2:DeleteRouteTable"),
        _g("the default routes (internet gateway, NAT gateway)", "ec2:CreateRoute", "ec2:ReplaceRoute",
           "ec2:DeleteRoute"),
        EC2_TAGS,
    ),
    "aws:ec2/routeTableAssociation:RouteTableAssociation": (
        _g("associate a route table with its subnet (untaggable)", "ec2:AssociateRouteTable",
           "ec2:ReplaceRouteTableAssociation", "ec2:DisassociateRouteTable", "ec2:DescribeRouteTables"),
    ),
    "aws:ec2/eip:Eip": (
        _g("allocate, read and release the Elastic IPs", "ec2:AllocateAddress", "ec2:DescribeAddresses",
           "ec2:DescribeAddressesAttribute", "ec2:ReleaseAddress"),
        _g("associate a public host's address with its instance", "ec2:AssociateAddress",
           "ec2:DisassociateAddress"),
        EC2_TAGS,
    ),
    "aws:ec2/natGateway:NatGateway": (
        _g("create, read and delete the NAT gateway (only when some host has no public IP)",
           "ec2:CreateNatGateway", "ec2:DescribeNatGateways", "ec2:DeleteNatGateway"),
        EC2_TAGS,
    ),
    "aws:ec2/securityGroup:SecurityGroup": (
        _g("create, read and delete each host's security group", "ec2:CreateSecurityGroup",
           "ec2:DescribeSecurityGroups", "ec2:DeleteSecurityGroup"),
        _g("remove the allow-all egress rule AWS adds to a new group", "ec2:RevokeSecurityGroupEgress"),
        _g("on delete the provider waits for network interfaces that still use the group",
           "ec2:DescribeNetworkInterfaces"),
        EC2_TAGS,
    ),
    "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule": (
        _g("create, read, change (description) and delete one inbound rule", "ec2:AuthorizeSecurityGroupIngress",
           "ec2:DescribeSecurityGroupRules", "ec2:ModifySecurityGroupRules", "ec2:RevokeSecurityGroupIngress"),
        EC2_TAGS,
    ),
    "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule": (
        _g("create, read, change (description) and delete one outbound rule", "ec2:AuthorizeSecurityGroupEgress",
           "ec2:DescribeSecurityGroupRules", "ec2:ModifySecurityGroupRules", "ec2:RevokeSecurityGroupEgress"),
        EC2_TAGS,
    ),
    "aws:ec2/keyPair:KeyPair": (
        _g("import, read and delete the admin's public key", "ec2:ImportKeyPair", "ec2:DescribeKeyPairs",
           "ec2:DeleteKeyPair"),
        EC2_TAGS,
    ),
    "aws:ec2/instance:Instance": (
        _g("launch, read and terminate the VMs", "ec2:RunInstances", "ec2:DescribeInstances",
           "ec2:DescribeInstanceAttribute", "ec2:TerminateInstances"),
        _g("the provider reads the instance type, the AMI's root device and the root volume",
           "ec2:DescribeInstanceTypes", "ec2:DescribeImages", "ec2:DescribeVolumes", "ec2:DescribeNetworkInterfaces"),
        _g("T-family CPU credits (t3 is the default size)", "ec2:DescribeInstanceCreditSpecifications",
           "ec2:ModifyInstanceCreditSpecification"),
        _g("in-place updates: instance type (stop, modify, start), metadata options (IMDSv2), root volume",
           "ec2:StopInstances", "ec2:StartInstances", "ec2:ModifyInstanceAttribute",
           "ec2:ModifyInstanceMetadataOptions", "ec2:ModifyVolume"),
        EC2_TAGS,
    ),
    "aws:ebs/volume:Volume": (
        _g("create, read, resize and delete the encrypted data volumes (AWS-managed key aws/ebs: its key policy "
           "lets EC2 use it for the account, so no kms: action is needed)", "ec2:CreateVolume",
           "ec2:DescribeVolumes", "ec2:ModifyVolume", "ec2:DescribeVolumesModifications", "ec2:DeleteVolume"),
        EC2_TAGS,
    ),
    "aws:lb/loadBalancer:LoadBalancer": (
        _g("create, read, change and delete the broker cluster's network load balancer (with tags)",
           "elasticloadbalancing:CreateLoadBalancer", "elasticloadbalancing:DescribeLoadBalancers",
           "elasticloadbalancing:DescribeLoadBalancerAttributes", "elasticloadbalancing:ModifyLoadBalancerAttributes",
           "elasticloadbalancing:DeleteLoadBalancer", "elasticloadbalancing:AddTags",
           "elasticloadbalancing:RemoveTags", "elasticloadbalancing:DescribeTags"),
        _g("place it in the public subnet", "ec2:DescribeSubnets", "ec2:DescribeInternetGateways",
           "ec2:DescribeNetworkInterfaces"),
    ),
    "aws:lb/targetGroup:TargetGroup": (
        _g("create, read, change and delete the TCP target group of the broker instances (with tags)",
           "elasticloadbalancing:CreateTargetGroup", "elasticloadbalancing:DescribeTargetGroups",
           "elasticloadbalancing:DescribeTargetGroupAttributes", "elasticloadbalancing:ModifyTargetGroup",
           "elasticloadbalancing:ModifyTargetGroupAttributes", "elasticloadbalancing:DeleteTargetGroup",
           "elasticloadbalancing:AddTags", "elasticloadbalancing:RemoveTags", "elasticloadbalancing:DescribeTags"),
    ),
    "aws:lb/targetGroupAttachment:TargetGroupAttachment": (
        _g("register each broker instance as a target (untaggable)", "elasticloadbalancing:RegisterTargets",
           "elasticloadbalancing:DeregisterTargets", "elasticloadbalancing:DescribeTargetHealth"),
    ),
    "aws:lb/listener:Listener": (
        _g("create, read, change and delete the TCP listener on the MQTT port (with tags)",
           "elasticloadbalancing:CreateListener", "elasticloadbalancing:DescribeListeners",
           "elasticloadbalancing:DescribeListenerAttributes", "elasticloadbalancing:ModifyListener",
           "elasticloadbalancing:DeleteListener", "elasticloadbalancing:AddTags", "elasticloadbalancing:RemoveTags",
           "elasticloadbalancing:DescribeTags"),
    ),
    "aws:ec2/volumeAttachment:VolumeAttachment": (
        _g("attach and detach the data volume (untaggable)", "ec2:AttachVolume", "ec2:DetachVolume",
           "ec2:DescribeVolumes", "ec2:DescribeInstances"),
        _g("stop_instance_before_detaching: the instance is stopped, not the mounted filesystem yanked",
           "ec2:StopInstances", "ec2:StartInstances"),
    ),
}

_N = "Microsoft.Network"
_C = "Microsoft.Compute"

# Pulumi type token (or "provider") -> the Azure RBAC operations the ARM calls of azure-native need.
AZURE: dict[str, tuple[Grant, ...]] = {
    "provider": (
        _g("poll long-running ARM operations (the Azure-AsyncOperation and Location URLs)",
           f"{_N}/locations/operations/read", f"{_N}/locations/operationResults/read",
           f"{_C}/locations/operations/read"),
    ),
    "azure-native:resources:ResourceGroup": (
        _g("create (with tags), read and delete the platform's resource group",
           "Microsoft.Resources/subscriptions/resourceGroups/read",
           "Microsoft.Resources/subscriptions/resourceGroups/write",
           "Microsoft.Resources/subscriptions/resourceGroups/delete"),
    ),
    "azure-native:network:VirtualNetwork": (
        _g("create, read and delete the VNet", f"{_N}/virtualNetworks/read", f"{_N}/virtualNetworks/write",
           f"{_N}/virtualNetworks/delete"),
    ),
    "azure-native:network:Subnet": (
        _g("create, read and delete the hosts' subnet", f"{_N}/virtualNetworks/subnets/read",
           f"{_N}/virtualNetworks/subnets/write", f"{_N}/virtualNetworks/subnets/delete"),
        _g("place each NIC in the subnet", f"{_N}/virtualNetworks/subnets/join/action"),
    ),
    "azure-native:network:NatGateway": (
        _g("create, read and delete the NAT gateway (only when some host has no public IP)",
           f"{_N}/natGateways/read", f"{_N}/natGateways/write", f"{_N}/natGateways/delete"),
        _g("attach it to the subnet", f"{_N}/natGateways/join/action"),
    ),
    "azure-native:network:PublicIPAddress": (
        _g("create, read and delete the static public IPs", f"{_N}/publicIPAddresses/read",
           f"{_N}/publicIPAddresses/write", f"{_N}/publicIPAddresses/delete"),
        _g("attach one to a NIC, to the NAT gateway or to the load balancer's frontend", f"{_N}/publicIPAddresses/join/action"),
    ),
    "azure-native:network:NetworkSecurityGroup": (
        _g("create, read and delete each host's NSG", f"{_N}/networkSecurityGroups/read",
           f"{_N}/networkSecurityGroups/write", f"{_N}/networkSecurityGroups/delete"),
        _g("its rules are inline; ARM may authorize them as child resources",
           f"{_N}/networkSecurityGroups/securityRules/read", f"{_N}/networkSecurityGroups/securityRules/write",
           f"{_N}/networkSecurityGroups/securityRules/delete"),
        _g("attach it to the host's NIC", f"{_N}/networkSecurityGroups/join/action"),
    ),
    "azure-native:network:NetworkInterface": (
        _g("create, read and delete each host's NIC (static private IP)", f"{_N}/networkInterfaces/read",
           f"{_N}/networkInterfaces/write", f"{_N}/networkInterfaces/delete"),
        _g("attach it to the VM", f"{_N}/networkInterfaces/join/action"),
    ),
    "azure-native:network:LoadBalancer": (
        _g("create, read and delete the broker cluster's load balancer (its frontend, pool, probe and rule are "
           "inline)", f"{_N}/loadBalancers/read", f"{_N}/loadBalancers/write", f"{_N}/loadBalancers/delete"),
        _g("its rule refers to its own frontend, pool and probe", f"{_N}/loadBalancers/frontendIPConfigurations/join/action",
           f"{_N}/loadBalancers/probes/join/action"),
        _g("each broker NIC joins the backend pool", f"{_N}/loadBalancers/backendAddressPools/join/action"),
    ),
    "azure-native:compute:Disk": (
        _g("create, read, resize and delete the data disks (no export: beginGetAccess is not granted)",
           f"{_C}/disks/read", f"{_C}/disks/write", f"{_C}/disks/delete"),
    ),
    "azure-native:compute:VirtualMachine": (
        _g("create, read, update and delete the VMs (the OS disk is created and deleted with the VM)",
           f"{_C}/virtualMachines/read", f"{_C}/virtualMachines/write", f"{_C}/virtualMachines/delete"),
    ),
}

TABLES = {"aws": AWS, "azure": AZURE}


# ---------------------------------------------------------------------------------------- collecting


@cache
def collect(target: str) -> tuple[frozenset[str], frozenset[str]]:
    """(resource types, invoke tokens) the stack program for `target` uses, over all its fixtures."""
    stacks_tests = REPO / "tests" / "stacks"
    if str(stacks_tests) not in sys.path:
        sys.path.insert(0, str(stacks_tests))
    import pulumi
    from pulumi.runtime import settings as pulumi_settings
    from stacks_harness import STACKS, RecordingMocks, engine_config, load_fixture

    types: set[str] = set()
    calls: set[str] = set()
    for fixture in FIXTURES[target]:
        mocks = RecordingMocks()
        pulumi.runtime.set_all_config(engine_config(load_fixture(fixture)))
        pulumi_settings.ROOT.set(None)
        pulumi.runtime.set_mocks(mocks, project="iotplat", stack="demo-production", preview=False)

        @pulumi.runtime.test
        def program() -> None:
            runpy.run_path(str(STACKS / target / "__main__.py"), run_name="__main__")

        program()
        types.update(r.type for r in mocks.resources if not r.type.startswith(COMPONENT_PREFIX))
        calls.update(mocks.calls)
    return frozenset(types), frozenset(calls)


class Uncovered(Exception):
    pass


def grants(target: str, used: frozenset[str] | set[str]) -> list[tuple[str, Grant]]:
    table = TABLES[target]
    missing = sorted(used - set(table))
    if missing:
        raise Uncovered(f"stacks/{target} uses {', '.join(missing)}, which the policy table in "
                        f"scripts/stack_policies.py does not cover: add the API actions Pulumi needs for it")
    stale = sorted(set(table) - used - {"provider"})
    if stale:
        raise Uncovered(f"the policy table for {target} grants {', '.join(stale)}, which stacks/{target} no longer "
                        "uses: remove it (least privilege)")
    return [(token, g) for token in ["provider", *sorted(used)] for g in table[token]]


# ---------------------------------------------------------------------------------------- documents


def aws_policy(rows: list[tuple[str, Grant]]) -> dict[str, object]:
    by_service: dict[str, set[str]] = {}
    for _, g in rows:
        for action in g.actions:
            by_service.setdefault(action.split(":", 1)[0], set()).add(action)
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": f"IotplatStacks{service.capitalize()}", "Effect": "Allow", "Action": sorted(actions),
             "Resource": "*"}
            for service, actions in sorted(by_service.items())
        ],
    }


def azure_role(rows: list[tuple[str, Grant]]) -> dict[str, object]:
    return {
        "Name": "iotplat stack deployer",
        "IsCustom": True,
        "Description": "What the iotplat Pulumi stack (stacks/azure) needs to create, read, update, delete and tag "
                       "its resources. Generated by scripts/stack_policies.py; see docs/stacks.md.",
        "Actions": sorted({a for _, g in rows for a in g.actions}),
        "NotActions": [],
        "DataActions": [],
        "NotDataActions": [],
        "AssignableScopes": ["/subscriptions/00000000-0000-0000-0000-000000000000"],
    }


def readme(rows: dict[str, list[tuple[str, Grant]]]) -> str:
    out = [
        "# Policies for the account that runs the stacks",
        "",
        "Generated by `python scripts/stack_policies.py --write` (do not edit; a test regenerates and compares).",
        "How to apply them and what they cannot guarantee: "
        "[docs/stacks.md](../stacks.md#the-deploying-accounts-permissions).",
        "",
        "- `aws-iam-policy.json`: an IAM policy for the user or role that runs `pulumi up` on stacks/aws.",
        "- `azure-role.json`: an Azure custom role for the principal that runs `pulumi up` on stacks/azure.",
        "",
        "Each Pulumi resource type (or provider function) the stacks use, and why each action is granted:",
    ]
    for target in ("aws", "azure"):
        out += ["", f"## {target}", "", "| used by the stack | actions | why |", "|---|---|---|"]
        for token, g in rows[target]:
            out.append(f"| `{token}` | {', '.join(f'`{a}`' for a in g.actions)} | {g.why} |")
    return "\n".join(out) + "\n"


def documents() -> dict[Path, str]:
    rows: dict[str, list[tuple[str, Grant]]] = {}
    for target in ("aws", "azure"):
        types, calls = collect(target)
        rows[target] = grants(target, types | calls)
    return {
        OUT / "aws-iam-policy.json": json.dumps(aws_policy(rows["aws"]), indent=2) + "\n",
        OUT / "azure-role.json": json.dumps(azure_role(rows["azure"]), indent=2) + "\n",
        OUT / "README.md": readme(rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the files under docs/policies/")
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed files differ")
    args = parser.parse_args(argv)
    try:
        docs = documents()
    except Uncovered as exc:
        print(f"stack_policies: {exc}", file=sys.stderr)
        return 1
    if args.write:
        OUT.mkdir(parents=True, exist_ok=True)
        for path, text in docs.items():
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
        return 0
    if args.check:
        stale = [p for p, text in docs.items() if not p.exists() or p.read_text() != text]
        for path in stale:
            print(f"{path.relative_to(REPO)} is out of date: run python scripts/stack_policies.py --write",
                  file=sys.stderr)
        return 1 if stale else 0
    for path, text in docs.items():
        print(f"==> {path.relative_to(REPO)}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
