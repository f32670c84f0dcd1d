"""The stack-config contract: iotplat_stack.config accepts the fixtures and refuses bad input with
one line that names the key. Pure Python, offline; the last test reads config through
``pulumi.Config`` with pulumi's in-process config store (no engine, no CLI, no cloud).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pulumi
import pytest
from iotplat_stack import config
from iotplat_stack.config import ConfigError
from stacks_harness import engine_config, load_fixture

Mutation = Callable[[dict[str, Any]], None]


def mutated(fixture: str, change: Mutation) -> dict[str, Any]:
    raw = copy.deepcopy(load_fixture(fixture))
    change(raw)
    return raw


def setter(key: str, value: Any) -> Mutation:
    def change(raw: dict[str, Any]) -> None:
        raw[key] = value

    return change


def host_setter(index: int, field: str, value: Any) -> Mutation:
    def change(raw: dict[str, Any]) -> None:
        raw["iotplat:hosts"][index][field] = value

    return change


def ingress_setter(host: int, rule: int, field: str, value: Any) -> Mutation:
    def change(raw: dict[str, Any]) -> None:
        raw["iotplat:hosts"][host]["ingress"][rule][field] = value

    return change


def deleter(key: str) -> Mutation:
    def change(raw: dict[str, Any]) -> None:
        del raw[key]

    return change


def duplicate_first_host(raw: dict[str, Any]) -> None:
    raw["iotplat:hosts"].append(copy.deepcopy(raw["iotplat:hosts"][0]))


def all_internal(raw: dict[str, Any]) -> None:
    for host in raw["iotplat:hosts"]:
        host["ingress"] = [{"port": 8086, "protocol": "tcp", "source": "internal", "description": "x"}]


@pytest.mark.parametrize("fixture", ["aws-1host", "aws-3host", "aws-cluster", "azure-1host", "azure-3host",
                                     "azure-cluster"])
def test_fixtures_are_valid(fixture: str) -> None:
    cfg = config.parse(load_fixture(fixture), fixture.split("-")[0])
    assert cfg.name == "demo-production"
    assert cfg.hosts and all(h.ingress for h in cfg.hosts)


# (mutation of aws-1host, exact one-line message)
ERRORS: list[tuple[str, Mutation, str]] = [
    (
        "bad network CIDR",
        setter("iotplat:networkCidr", "10.42.0.0/33"),
        "iotplat:networkCidr: is not a valid CIDR: "
        "'10.42.0.0/33' does not appear to be an IPv4 or IPv6 network",
    ),
    (
        "network CIDR with host bits",
        setter("iotplat:networkCidr", "10.42.0.1/16"),
        "iotplat:networkCidr: is not a valid CIDR: 10.42.0.1/16 has host bits set",
    ),
    (
        "public network range",
        setter("iotplat:networkCidr", "8.8.0.0/16"),
        "iotplat:networkCidr: 8.8.0.0/16 is not a private (RFC 1918) range",
    ),
    (
        "network too small for two /24",
        setter("iotplat:networkCidr", "10.42.0.0/24"),
        "iotplat:networkCidr: 10.42.0.0/24 must be between /16 and /23 so it holds the hosts' /24 subnets",
    ),
    (
        "bad admin CIDR",
        setter("iotplat:adminCidrs", ["203.0.113.0/24", "not-a-cidr"]),
        "iotplat:adminCidrs[1]: is not a valid CIDR: "
        "'not-a-cidr' does not appear to be an IPv4 or IPv6 network",
    ),
    (
        "world-open SSH",
        setter("iotplat:adminCidrs", ["0.0.0.0/0"]),
        "iotplat:adminCidrs[0]: 0.0.0.0/0 would open SSH (22) to the whole internet; "
        "list the operators' networks",
    ),
    (
        "IPv6 world",
        setter("iotplat:deviceCidrs", ["::/0"]),
        "iotplat:deviceCidrs[0]: ::/0 is IPv6; hosts have IPv4 addresses only, so list IPv4 CIDRs",
    ),
    (
        "world-open InfluxDB through devices",
        ingress_setter(0, 2, "source", "devices"),
        "iotplat:hosts[0].ingress[2]: port 8086 from devices would be open to 0.0.0.0/0; "
        "ports 22, 3389, 8086, 3000 are never opened to the whole internet",
    ),
    (
        "world-open SSH as a declared rule",
        ingress_setter(0, 0, "port", 22),
        "iotplat:hosts[0].ingress[0]: port 22 from devices would be open to 0.0.0.0/0; "
        "ports 22, 3389, 8086, 3000 are never opened to the whole internet",
    ),
    (
        "unknown source",
        ingress_setter(0, 1, "source", "world"),
        "iotplat:hosts[0].ingress[1].source: must be one of devices, admin, internal (got 'world')",
    ),
    (
        "unknown protocol",
        ingress_setter(0, 1, "protocol", "icmp"),
        "iotplat:hosts[0].ingress[1].protocol: must be one of tcp, udp (got 'icmp')",
    ),
    (
        "port out of range",
        ingress_setter(0, 3, "port", 70000),
        "iotplat:hosts[0].ingress[3].port: must be between 1 and 65535 (got 70000)",
    ),
    (
        "duplicate host names",
        duplicate_first_host,
        "iotplat:hosts[1].name: duplicate host name 'core' (also iotplat:hosts[0])",
    ),
    (
        "host name not a DNS label",
        host_setter(0, "name", "Core_1"),
        "iotplat:hosts[0].name: must be a DNS label: a-z, 0-9 and '-', starting with a letter (got 'Core_1')",
    ),
    (
        "azure size on aws",
        host_setter(0, "size", "Standard_B2s"),
        "iotplat:hosts[0].size: 'Standard_B2s' is not a aws size (e.g. t3.small)",
    ),
    (
        "disk size not an integer",
        host_setter(0, "diskGb", "30"),
        "iotplat:hosts[0].diskGb: must be an integer (got '30')",
    ),
    (
        "unknown host key",
        host_setter(0, "publicIp", True),
        "iotplat:hosts[0].publicIp: unknown key; a host has name, size, diskGb, services, ingress",
    ),
    (
        "no public host",
        all_internal,
        "iotplat:hosts: no host has a devices or admin ingress rule, so none gets a public IP and nothing "
        "can reach the platform (one public host is also the SSH jump host for the others)",
    ),
    ("missing region", deleter("aws:region"), "aws:region: is required"),
    ("missing hosts", deleter("iotplat:hosts"), "iotplat:hosts: is required"),
    (
        "unknown iotplat key",
        setter("iotplat:sshPassword", "hunter2"),
        "iotplat:sshPassword: unknown key; known keys are iotplat:platform, iotplat:environment, "
        "iotplat:networkCidr, iotplat:sshUser, iotplat:sshPublicKey, iotplat:image, iotplat:mode, iotplat:adminCidrs, "
        "iotplat:deviceCidrs, iotplat:tags, iotplat:hosts, iotplat:brokerLoadBalancer",
    ),
    (
        "private key instead of public",
        setter("iotplat:sshPublicKey", "-----BEGIN OPENSSH PRIVATE KEY-----"),
        "iotplat:sshPublicKey: looks like a private key; give the public key (the .pub file)",
    ),
    (
        "unknown image",
        setter("iotplat:image", "ubuntu-24.04"),
        "iotplat:image: must be one of debian-13, debian-12 (got 'ubuntu-24.04')",
    ),
    (
        "platform not a DNS label",
        setter("iotplat:platform", "Demo"),
        "iotplat:platform: must be a DNS label: a-z, 0-9 and '-', starting with a letter (got 'Demo')",
    ),
    (
        "tag value not a string",
        setter("iotplat:tags", {"cost-center": 42}),
        "iotplat:tags.cost-center: tag values must be strings of at most 256 characters (got 42)",
    ),
]


@pytest.mark.parametrize(("change", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_config_is_refused_with_one_line_naming_the_key(change: Mutation, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(mutated("aws-1host", change), "aws")
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


def test_config_error_is_a_pulumi_run_error() -> None:
    # RunError makes `pulumi up` print the message without a Python traceback.
    assert issubclass(ConfigError, pulumi.RunError)


@pytest.mark.parametrize("user", ["admin", "root", "administrator"])
def test_azure_refuses_reserved_admin_users(user: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(mutated("azure-1host", setter("iotplat:sshUser", user)), "azure")
    assert (
        str(caught.value)
        == f"iotplat:sshUser: {user!r} is reserved on azure and refused as the VM admin user"
    )


def test_aws_accepts_the_debian_ami_user() -> None:
    assert config.parse(load_fixture("aws-1host"), "aws").ssh_user == "admin"


def test_azure_needs_its_location() -> None:
    with pytest.raises(ConfigError, match=r"^azure-native:location: is required$"):
        config.parse(mutated("azure-1host", deleter("azure-native:location")), "azure")


@pytest.mark.parametrize("fixture", ["aws-3host", "azure-3host", "aws-cluster", "azure-cluster"])
def test_reading_through_pulumi_config_matches_parsing_the_file(fixture: str) -> None:
    raw = load_fixture(fixture)
    target = fixture.split("-")[0]
    pulumi.runtime.set_all_config(engine_config(raw))
    try:
        assert config.from_pulumi(target) == config.parse(raw, target)
    finally:
        pulumi.runtime.set_all_config({})


def test_structured_value_that_is_not_json_is_named() -> None:
    raw = engine_config(load_fixture("aws-1host"))
    raw["iotplat:hosts"] = "- name: core"  # YAML text where the CLI would pass JSON
    pulumi.runtime.set_all_config(raw)
    try:
        with pytest.raises(
            ConfigError, match=r"^iotplat:hosts: must be a YAML list, got text that is not one \("
        ):
            config.from_pulumi("aws")
    finally:
        pulumi.runtime.set_all_config({})


# --- iotplat:brokerLoadBalancer ---------------------------------------------------------------


def lb_setter(field: str, value: Any) -> Mutation:
    def change(raw: dict[str, Any]) -> None:
        raw["iotplat:brokerLoadBalancer"][field] = value

    return change


def drop_ingress(host: int, port: int, source: str) -> Mutation:
    def change(raw: dict[str, Any]) -> None:
        rules = raw["iotplat:hosts"][host]["ingress"]
        raw["iotplat:hosts"][host]["ingress"] = [
            r for r in rules if not (r["port"] == port and r["source"] == source)
        ]

    return change


LB = "iotplat:brokerLoadBalancer"
LB_ERRORS: list[tuple[str, Mutation, str]] = [
    ("not a mapping", setter(LB, [8883]), f"{LB}: must be a mapping (got list)"),
    ("unknown key", lb_setter("tls", True), f"{LB}.tls: unknown key; the load balancer has port, hosts"),
    ("port missing", lambda raw: raw[LB].pop("port"), f"{LB}.port: is required"),
    ("port not a number", lb_setter("port", "8883"), f"{LB}.port: must be an integer (got '8883')"),
    ("port out of range", lb_setter("port", 70000), f"{LB}.port: must be between 1 and 65535 (got 70000)"),
    (
        "never-world-open port",
        lb_setter("port", 8086),
        f"{LB}.port: 8086 is one of 22, 3389, 8086, 3000, never put behind a public load balancer",
    ),
    ("hosts not a list", lb_setter("hosts", "core"), f"{LB}.hosts: must be a list (got str)"),
    (
        "one host",
        lb_setter("hosts", ["core"]),
        f"{LB}.hosts: must list at least two hosts (got 1); one node needs none",
    ),
    ("unknown host", lb_setter("hosts", ["core", "b9"]), f"{LB}.hosts[1]: 'b9' is not a host of iotplat:hosts"),
    ("duplicate host", lb_setter("hosts", ["b2", "b2"]), f"{LB}.hosts[1]: duplicate host 'b2'"),
    (
        "port closed to devices",
        drop_ingress(2, 8883, "devices"),
        f"{LB}.hosts[2]: host 'b3' has no tcp ingress on 8883 from devices; the load balancer forwards "
        "devices there",
    ),
    (
        "port closed to the network",
        drop_ingress(1, 8883, "internal"),
        f"{LB}.hosts[1]: host 'b2' has no tcp ingress on 8883 from internal; the load balancer checks the "
        "port from inside the network",
    ),
    (
        "other port than the listener",
        lb_setter("port", 8884),
        f"{LB}.hosts[0]: host 'core' has no tcp ingress on 8884 from devices; the load balancer forwards "
        "devices there",
    ),
]


@pytest.mark.parametrize("target", ["aws", "azure"])
@pytest.mark.parametrize(("change", "message"), [e[1:] for e in LB_ERRORS], ids=[e[0] for e in LB_ERRORS])
def test_bad_load_balancer_is_refused_with_one_line(target: str, change: Mutation, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(mutated(f"{target}-cluster", change), target)
    assert str(caught.value) == message


@pytest.mark.parametrize("target", ["aws", "azure"])
def test_load_balancer_is_optional_and_parsed(target: str) -> None:
    cluster = config.parse(load_fixture(f"{target}-cluster"), target)
    assert cluster.broker_load_balancer == config.LoadBalancer(port=8883, hosts=("core", "b2", "b3"))
    assert config.parse(load_fixture(f"{target}-3host"), target).broker_load_balancer is None
    assert config.parse(mutated(f"{target}-cluster", setter(LB, None)), target).broker_load_balancer is None
