"""Policy tests for stacks/aws, run fully offline with pulumi's unit-test mocks.

The program runs in-process against ``RecordingMocks`` (tests/stacks/stacks_harness.py): no
Pulumi CLI, no AWS account, no network. The assertions are about what the program asks AWS for
(resource inputs and stack outputs); whether AWS accepts it is only tested by a real deployment.
"""

from __future__ import annotations

import inspect
import ipaddress
from collections import defaultdict
from typing import Any

import pulumi_aws as aws
import pytest
import yaml
from iotplat_stack import config
from iotplat_stack.config import NEVER_WORLD_OPEN, ConfigError
from stacks_harness import StackRun, load_fixture, run_stack

FIXTURES = ["aws-1host", "aws-3host", "aws-cluster"]
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
INSTANCE = "aws:ec2/instance:Instance"
SG = "aws:ec2/securityGroup:SecurityGroup"
# Resource types that have no tags in AWS (checked against the SDK below).
UNTAGGABLE = {
    "aws:ec2/routeTableAssociation:RouteTableAssociation": aws.ec2.RouteTableAssociation,
    "aws:ec2/volumeAttachment:VolumeAttachment": aws.ec2.VolumeAttachment,
    "aws:lb/targetGroupAttachment:TargetGroupAttachment": aws.lb.TargetGroupAttachment,
}


@pytest.fixture(scope="module")
def runs() -> dict[str, StackRun]:
    return {name: run_stack("aws", load_fixture(name)) for name in FIXTURES}


@pytest.fixture(params=FIXTURES)
def case(request: pytest.FixtureRequest, runs: dict[str, StackRun]) -> tuple[config.StackConfig, StackRun]:
    return config.parse(load_fixture(request.param), "aws"), runs[request.param]


def host_of_group(run: StackRun) -> dict[str, str]:
    """security group id (as the mocks name it) -> logical host name"""
    return {f"{sg.name}-id": sg.inputs["tags"]["iotplat-host"] for sg in run.of_type(SG)}


def rules_by_host(run: StackRun, token: str) -> dict[str, list[dict[str, Any]]]:
    owners = host_of_group(run)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rule in run.of_type(token):
        out[owners[rule.inputs["securityGroupId"]]].append(rule.inputs)
    return out


def instances(run: StackRun) -> dict[str, dict[str, Any]]:
    return {r.inputs["tags"]["iotplat-host"]: r.inputs for r in run.of_type(INSTANCE)}


# --- firewall -----------------------------------------------------------------------------------


def test_no_sensitive_port_is_open_to_the_world(case: tuple[config.StackConfig, StackRun]) -> None:
    _, run = case
    for rule in run.of_type(INGRESS):
        world = ipaddress.ip_network(rule.inputs["cidrIpv4"]).prefixlen == 0
        assert not (world and rule.inputs["fromPort"] in NEVER_WORLD_OPEN), rule.name
        assert "cidrIpv6" not in rule.inputs


def test_only_mqtt_tls_is_open_to_the_world(case: tuple[config.StackConfig, StackRun]) -> None:
    _, run = case
    world = {r.inputs["fromPort"] for r in run.of_type(INGRESS) if r.inputs["cidrIpv4"] == "0.0.0.0/0"}
    assert world == {8883}


def test_only_declared_ports_and_ssh_are_open(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    by_host = rules_by_host(run, INGRESS)
    for spec in cfg.hosts:
        rules = by_host[spec.name]
        assert {(r["fromPort"], r["toPort"]) for r in rules} == {
            (p, p) for p in {i.port for i in spec.ingress} | {22}
        }
        assert {r["ipProtocol"] for r in rules} <= {"tcp", "udp"}  # never "-1" (all traffic)


def test_ssh_comes_only_from_admin_networks_or_the_jump_host(
    case: tuple[config.StackConfig, StackRun],
) -> None:
    cfg, run = case
    jump = run.outputs["sshJumpHost"]
    allowed = {str(c) for c in cfg.admin_cidrs}
    if jump is not None:
        allowed.add(f"{run.outputs['hosts'][jump]['privateIp']}/32")
    assert {r.inputs["cidrIpv4"] for r in run.of_type(INGRESS) if r.inputs["fromPort"] == 22} <= allowed


def test_groups_carry_no_inline_rules_and_default_group_is_emptied(
    case: tuple[config.StackConfig, StackRun],
) -> None:
    _, run = case
    for group in run.of_type(SG):
        assert not group.inputs.get("ingress") and not group.inputs.get("egress")
    (default,) = run.of_type("aws:ec2/defaultSecurityGroup:DefaultSecurityGroup")
    assert not default.inputs.get("ingress") and not default.inputs.get("egress")


def test_egress_to_the_world_is_only_web_and_ntp(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    for rule in run.of_type(EGRESS):
        network = ipaddress.ip_network(rule.inputs["cidrIpv4"])
        if network.prefixlen == 0:
            assert (rule.inputs["ipProtocol"], rule.inputs["fromPort"]) in {
                ("tcp", 80),
                ("tcp", 443),
                ("udp", 123),
            }
        else:
            assert network.prefixlen == 32 and network.subnet_of(cfg.network_cidr), rule.name


# --- hosts --------------------------------------------------------------------------------------


def test_imdsv2_is_required(case: tuple[config.StackConfig, StackRun]) -> None:
    _, run = case
    for instance in run.of_type(INSTANCE):
        assert instance.inputs["metadataOptions"]["httpTokens"] == "required"
        assert instance.inputs["metadataOptions"]["httpPutResponseHopLimit"] == 1


def test_every_disk_is_encrypted(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    for instance in run.of_type(INSTANCE):
        assert instance.inputs["rootBlockDevice"]["encrypted"] is True
    volumes = run.of_type("aws:ebs/volume:Volume")
    assert len(volumes) == len(cfg.hosts)
    assert all(v.inputs["encrypted"] is True for v in volumes)
    assert sorted(v.inputs["size"] for v in volumes) == sorted(h.disk_gb for h in cfg.hosts)


def test_no_user_data_for_the_ami_user(case: tuple[config.StackConfig, StackRun]) -> None:
    _, run = case
    for instance in run.of_type(INSTANCE):
        assert "userData" not in instance.inputs and "userDataBase64" not in instance.inputs


def test_other_ssh_user_gets_only_non_secret_cloud_init() -> None:
    raw = load_fixture("aws-1host") | {"iotplat:sshUser": "iotops"}
    run = run_stack("aws", raw)
    (instance,) = run.of_type(INSTANCE)
    data = instance.inputs["userData"]
    assert data.startswith("#cloud-config\n")
    document = yaml.safe_load(data)
    # Only a user with a public key: no password, hash, chpasswd, write_files or commands.
    assert set(document) == {"users"}
    (user,) = document["users"]
    assert set(user) <= {"name", "groups", "shell", "lock_passwd", "sudo", "ssh_authorized_keys"}
    assert user["name"] == "iotops" and user["lock_passwd"] is True
    assert user["ssh_authorized_keys"] == [raw["iotplat:sshPublicKey"]]
    assert "PRIVATE KEY" not in data
    assert run.outputs["sshUser"] == "iotops"


def test_private_ips_are_static_and_planned(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    by_host = instances(run)
    for spec in cfg.hosts:
        ip = ipaddress.ip_address(by_host[spec.name]["privateIp"])
        assert ip in cfg.network_cidr
        assert run.outputs["hosts"][spec.name]["privateIp"] == str(ip)


def test_public_ip_only_for_hosts_reached_from_outside(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    elastic = {e.name for e in run.of_type("aws:ec2/eip:Eip") if not e.name.endswith("-nat-ip")}
    for spec in cfg.hosts:
        public = any(r.source in ("devices", "admin") for r in spec.ingress)
        assert (f"{cfg.name}-{spec.name}-ip" in elastic) is public
        assert (run.outputs["hosts"][spec.name]["publicIp"] is not None) is public
    assert all(i["associatePublicIpAddress"] is False for i in instances(run).values())
    assert all(s.inputs["mapPublicIpOnLaunch"] is False for s in run.of_type("aws:ec2/subnet:Subnet"))


def test_nat_and_private_subnet_only_when_a_host_has_no_public_ip(
    case: tuple[config.StackConfig, StackRun],
) -> None:
    cfg, run = case
    private_hosts = [h for h in cfg.hosts if not h.is_public]
    assert len(run.of_type("aws:ec2/natGateway:NatGateway")) == (1 if private_hosts else 0)
    subnets = {s.inputs["cidrBlock"] for s in run.of_type("aws:ec2/subnet:Subnet")}
    assert subnets == ({"10.42.0.0/24", "10.42.1.0/24"} if private_hosts else {"10.42.0.0/24"})
    for spec in private_hosts:
        assert instances(run)[spec.name]["subnetId"].endswith("-private-id")
    for nat in run.of_type("aws:ec2/natGateway:NatGateway"):
        # a fixed address outside the hosts' range, so it can never take a host's address
        assert nat.inputs["privateIp"] == "10.42.0.5"
        assert nat.inputs["privateIp"] not in {i["privateIp"] for i in instances(run).values()}


def test_debian_12_ami_from_debian(case: tuple[config.StackConfig, StackRun]) -> None:
    _, run = case
    assert all(i["ami"] == "ami-0123456789abcdef0" for i in instances(run).values())


# --- tags and outputs ---------------------------------------------------------------------------


def test_every_taggable_resource_is_tagged(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    for resource in run.resources:
        if resource.type.startswith("iotplat:") or resource.type in UNTAGGABLE:
            continue
        tags = resource.inputs.get("tags")
        assert tags, f"{resource.type} {resource.name} has no tags"
        assert dict(cfg.tags).items() <= tags.items() and tags.get("Name"), resource.name


@pytest.mark.parametrize("token", sorted(UNTAGGABLE))
def test_untaggable_types_really_take_no_tags(token: str) -> None:
    params = inspect.signature(UNTAGGABLE[token]._internal_init).parameters
    assert "tags" not in params


def test_outputs_feed_the_inventory(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    assert set(run.outputs) == {"hosts", "sshUser", "sshJumpHost", "mode", "brokerLoadBalancer"}
    assert list(run.outputs["hosts"]) == [h.name for h in cfg.hosts]
    for entry in run.outputs["hosts"].values():
        assert set(entry) == {"publicIp", "privateIp", "dataDevice"}
        assert entry["dataDevice"].startswith("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol")
    assert run.outputs["sshUser"] == cfg.ssh_user
    assert run.outputs["mode"] == "active"


@pytest.mark.parametrize("fixture", ["aws-1host", "aws-3host"])
def test_a_retired_stack_keeps_exactly_the_data_volumes(fixture: str) -> None:
    """`iotplat destroy` without --data retires the stack: the same volumes (same logical names and parents, so
    Pulumi keeps them) and nothing that costs compute, addresses or exposes a port."""
    active = run_stack("aws", load_fixture(fixture))
    retired = run_stack("aws", load_fixture(fixture) | {"iotplat:mode": "retired"})
    kept = {r.type for r in retired.resources if not r.type.startswith("iotplat:")}
    assert kept == {"aws:ebs/volume:Volume"}
    assert {r.name: r.inputs for r in retired.of_type("aws:ebs/volume:Volume")} == \
        {r.name: r.inputs for r in active.of_type("aws:ebs/volume:Volume")}
    assert [(r.type, r.name) for r in retired.resources if r.type == "iotplat:aws:Host"] == \
        [(r.type, r.name) for r in active.resources if r.type == "iotplat:aws:Host"]
    assert retired.outputs["mode"] == "retired" and retired.outputs["sshJumpHost"] is None
    for name, entry in retired.outputs["hosts"].items():
        assert entry["publicIp"] is None and entry["privateIp"] is None
        assert entry["dataDevice"] == active.outputs["hosts"][name]["dataDevice"]


def test_debian_13_is_an_image_choice() -> None:
    run = run_stack("aws", load_fixture("aws-1host") | {"iotplat:image": "debian-13"})
    assert run.of_type("aws:ec2/instance:Instance")


def test_config_error_stops_the_program_with_one_line() -> None:
    raw = load_fixture("aws-1host") | {"iotplat:adminCidrs": ["0.0.0.0/0"]}
    with pytest.raises(ConfigError) as caught:
        run_stack("aws", raw)
    assert str(caught.value).startswith("iotplat:adminCidrs[0]: 0.0.0.0/0 would open SSH (22)")
