"""Policy tests for stacks/azure, run fully offline with pulumi's unit-test mocks.

The program runs in-process against ``RecordingMocks`` (tests/stacks/stacks_harness.py): no
Pulumi CLI, no Azure subscription, no network. The assertions are about what the program asks
Azure for (resource inputs and stack outputs); whether Azure accepts it is only tested by a real
deployment.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from iotplat_stack import config
from iotplat_stack.config import NEVER_WORLD_OPEN, ConfigError
from stacks_harness import StackRun, load_fixture, run_stack

FIXTURES = ["azure-1host", "azure-3host", "azure-cluster"]
NSG = "azure-native:network:NetworkSecurityGroup"
VM = "azure-native:compute:VirtualMachine"
NIC = "azure-native:network:NetworkInterface"
PIP = "azure-native:network:PublicIPAddress"
WORLD = {"*", "0.0.0.0/0", "Internet", "Any"}
# Azure subnets have no tags.
UNTAGGABLE = {"azure-native:network:Subnet"}


@pytest.fixture(scope="module")
def runs() -> dict[str, StackRun]:
    return {name: run_stack("azure", load_fixture(name)) for name in FIXTURES}


@pytest.fixture(params=FIXTURES)
def case(request: pytest.FixtureRequest, runs: dict[str, StackRun]) -> tuple[config.StackConfig, StackRun]:
    return config.parse(load_fixture(request.param), "azure"), runs[request.param]


def nsg_rules(run: StackRun) -> dict[str, list[dict[str, Any]]]:
    return {g.inputs["tags"]["iotplat-host"]: g.inputs["securityRules"] for g in run.of_type(NSG)}


def allowed(rules: list[dict[str, Any]], direction: str) -> list[dict[str, Any]]:
    return [r for r in rules if r["direction"] == direction and r["access"] == "Allow"]


# --- firewall -----------------------------------------------------------------------------------


def test_no_sensitive_port_is_open_to_the_world(case: tuple[config.StackConfig, StackRun]) -> None:
    _, run = case
    for rules in nsg_rules(run).values():
        for rule in allowed(rules, "Inbound"):
            assert rule["destinationPortRange"] != "*"
            if rule["sourceAddressPrefix"] in WORLD:
                assert int(rule["destinationPortRange"]) not in NEVER_WORLD_OPEN, rule
                assert int(rule["destinationPortRange"]) == 8883


def test_only_declared_ports_and_ssh_are_open(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    by_host = nsg_rules(run)
    for spec in cfg.hosts:
        inbound = allowed(by_host[spec.name], "Inbound")
        assert {int(r["destinationPortRange"]) for r in inbound} == {i.port for i in spec.ingress} | {22}
        assert {r["protocol"] for r in inbound} <= {"Tcp", "Udp"}


def test_everything_else_is_denied_in_both_directions(case: tuple[config.StackConfig, StackRun]) -> None:
    _, run = case
    for rules in nsg_rules(run).values():
        for direction in ("Inbound", "Outbound"):
            deny = [r for r in rules if r["direction"] == direction and r["access"] == "Deny"]
            assert [
                (r["priority"], r["sourceAddressPrefix"], r["destinationAddressPrefix"]) for r in deny
            ] == [(4096, "*", "*")]
            assert all(r["priority"] < 4096 for r in allowed(rules, direction))
            priorities = [r["priority"] for r in rules if r["direction"] == direction]
            assert len(priorities) == len(set(priorities))


def test_egress_to_the_world_is_only_web_and_ntp(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    for rules in nsg_rules(run).values():
        for rule in allowed(rules, "Outbound"):
            destination = rule["destinationAddressPrefix"]
            if destination in WORLD:
                assert (rule["protocol"], rule["destinationPortRange"]) in {
                    ("Tcp", "80"),
                    ("Tcp", "443"),
                    ("Udp", "123"),
                }
            else:
                network = ipaddress.ip_network(destination)
                assert network.prefixlen == 32 and network.subnet_of(cfg.network_cidr)


def test_ssh_comes_only_from_admin_networks_or_the_jump_host(
    case: tuple[config.StackConfig, StackRun],
) -> None:
    cfg, run = case
    sources = {str(c) for c in cfg.admin_cidrs}
    jump = run.outputs["sshJumpHost"]
    if jump is not None:
        sources.add(f"{run.outputs['hosts'][jump]['privateIp']}/32")
    for rules in nsg_rules(run).values():
        for rule in allowed(rules, "Inbound"):
            if rule["destinationPortRange"] == "22":
                assert rule["sourceAddressPrefix"] in sources


# --- hosts --------------------------------------------------------------------------------------


def test_data_disks_are_encrypted_and_not_exportable(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    disks = run.of_type("azure-native:compute:Disk")
    assert sorted(d.inputs["diskSizeGB"] for d in disks) == sorted(h.disk_gb for h in cfg.hosts)
    for disk in disks:
        assert disk.inputs["encryption"]["type"] == "EncryptionAtRestWithPlatformKey"
        assert disk.inputs["networkAccessPolicy"] == "DenyAll"
        assert disk.inputs["publicNetworkAccess"] == "Disabled"


def test_vms_have_no_custom_data_and_no_passwords(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    for vm in run.of_type(VM):
        profile = vm.inputs["osProfile"]
        assert "customData" not in profile and "userData" not in vm.inputs
        assert "adminPassword" not in profile
        linux = profile["linuxConfiguration"]
        assert linux["disablePasswordAuthentication"] is True
        assert [k["keyData"] for k in linux["ssh"]["publicKeys"]] == [cfg.ssh_public_key]
        assert profile["adminUsername"] == cfg.ssh_user
        assert vm.inputs["storageProfile"]["imageReference"] == {
            "publisher": "Debian",
            "offer": "debian-12",
            "sku": "12-gen2",
            "version": "latest",
        }


def test_private_ips_are_static_and_planned(case: tuple[config.StackConfig, StackRun]) -> None:
    _, run = case
    for nic in run.of_type(NIC):
        (ip_config,) = nic.inputs["ipConfigurations"]
        assert ip_config["privateIPAllocationMethod"] == "Static"
        host = nic.inputs["tags"]["iotplat-host"]
        assert run.outputs["hosts"][host]["privateIp"] == ip_config["privateIPAddress"]
        assert ipaddress.ip_address(ip_config["privateIPAddress"]) in ipaddress.ip_network("10.42.0.0/24")


def test_public_ip_only_for_hosts_reached_from_outside(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    nics = {n.inputs["tags"]["iotplat-host"]: n.inputs["ipConfigurations"][0] for n in run.of_type(NIC)}
    for spec in cfg.hosts:
        public = any(r.source in ("devices", "admin") for r in spec.ingress)
        assert ("publicIPAddress" in nics[spec.name]) is public
        assert (run.outputs["hosts"][spec.name]["publicIp"] is not None) is public
    for address in run.of_type(PIP):
        assert address.inputs["publicIPAllocationMethod"] == "Static"
        assert address.inputs["sku"]["name"] == "Standard"  # closed until an NSG rule opens it


def test_outbound_path_without_default_outbound_access(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    (subnet,) = run.of_type("azure-native:network:Subnet")
    assert subnet.inputs["defaultOutboundAccess"] is False
    needs_nat = any(not h.is_public for h in cfg.hosts)
    assert len(run.of_type("azure-native:network:NatGateway")) == (1 if needs_nat else 0)
    assert ("natGateway" in subnet.inputs) is needs_nat


# --- tags and outputs ---------------------------------------------------------------------------


def test_every_taggable_resource_is_tagged(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    for resource in run.resources:
        if resource.type.startswith("iotplat:") or resource.type in UNTAGGABLE:
            continue
        assert dict(cfg.tags).items() <= resource.inputs.get("tags", {}).items(), (
            f"{resource.type} {resource.name}"
        )


def test_outputs_feed_the_inventory(case: tuple[config.StackConfig, StackRun]) -> None:
    cfg, run = case
    assert set(run.outputs) == {"hosts", "sshUser", "sshJumpHost", "mode", "brokerLoadBalancer"}
    assert list(run.outputs["hosts"]) == [h.name for h in cfg.hosts]
    for entry in run.outputs["hosts"].values():
        assert entry["dataDevice"] == "/dev/disk/azure/scsi1/lun0"
    assert run.outputs["sshUser"] == cfg.ssh_user


@pytest.mark.parametrize("fixture", ["azure-1host", "azure-3host"])
def test_a_retired_stack_keeps_exactly_the_data_disks(fixture: str) -> None:
    """Retired (destroy without --data): the resource group and the same managed disks, nothing else."""
    active = run_stack("azure", load_fixture(fixture))
    retired = run_stack("azure", load_fixture(fixture) | {"iotplat:mode": "retired"})
    kept = {r.type for r in retired.resources if not r.type.startswith("iotplat:")}
    assert kept == {"azure-native:resources:ResourceGroup", "azure-native:compute:Disk"}
    assert {r.name: r.inputs for r in retired.of_type("azure-native:compute:Disk")} == \
        {r.name: r.inputs for r in active.of_type("azure-native:compute:Disk")}
    assert retired.outputs["mode"] == "retired" and retired.outputs["sshJumpHost"] is None


def test_debian_13_is_an_image_choice() -> None:
    run = run_stack("azure", load_fixture("azure-1host") | {"iotplat:image": "debian-13"})
    vm = run.of_type("azure-native:compute:VirtualMachine")[0]
    assert vm.inputs["storageProfile"]["imageReference"]["offer"] == "debian-13"


def test_reserved_admin_user_stops_the_program_with_one_line() -> None:
    raw = load_fixture("azure-1host") | {"iotplat:sshUser": "admin"}
    with pytest.raises(ConfigError) as caught:
        run_stack("azure", raw)
    assert (
        str(caught.value) == "iotplat:sshUser: 'admin' is reserved on azure and refused as the VM admin user"
    )
