"""The broker load balancer (``iotplat:brokerLoadBalancer``) on AWS and Azure, under pulumi's mocks.

What this proves: with a broker cluster the programs ask for exactly one load balancer, on the MQTT over TLS
port only, TCP end to end (TLS passes through to the nodes), whose targets are exactly the broker hosts; the
nodes' firewalls admit the health checks; without a cluster, or on a retired stack, nothing of it exists; the
stack output carries its address. What it cannot prove: that AWS or Azure accept these inputs, or that
traffic flows (only a real `pulumi up` shows that; the emulated cloud refuses load balancers, docs/cloudsim.md).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from iotplat_aws.loadbalancer import MAX_NAME, aws_name
from iotplat_azure.loadbalancer import sub_resource_id
from iotplat_stack import config, plan
from stacks_harness import StackRun, load_fixture, run_stack

AWS_LB = "aws:lb/loadBalancer:LoadBalancer"
AWS_TG = "aws:lb/targetGroup:TargetGroup"
AWS_ATTACH = "aws:lb/targetGroupAttachment:TargetGroupAttachment"
AWS_LISTENER = "aws:lb/listener:Listener"
AWS_TYPES = (AWS_LB, AWS_TG, AWS_ATTACH, AWS_LISTENER)
AZ_LB = "azure-native:network:LoadBalancer"
AZ_NIC = "azure-native:network:NetworkInterface"
AZ_NSG = "azure-native:network:NetworkSecurityGroup"
BROKERS = ["core", "b2", "b3"]


@pytest.fixture(scope="module")
def aws_run() -> StackRun:
    return run_stack("aws", load_fixture("aws-cluster"))


@pytest.fixture(scope="module")
def azure_run() -> StackRun:
    return run_stack("azure", load_fixture("azure-cluster"))


def retired(fixture: str) -> dict[str, Any]:
    raw = copy.deepcopy(load_fixture(fixture))
    raw["iotplat:mode"] = "retired"
    return raw


# --- AWS -----------------------------------------------------------------------------------------


def test_aws_network_load_balancer_is_internet_facing_in_the_public_subnet(aws_run: StackRun) -> None:
    (nlb,) = aws_run.of_type(AWS_LB)
    assert nlb.inputs["loadBalancerType"] == "network"
    assert nlb.inputs["internal"] is False and nlb.inputs["ipAddressType"] == "ipv4"
    public = aws_run.named("aws:ec2/subnet:Subnet", "-public")
    assert nlb.inputs["subnets"] == [f"{public.name}-id"]
    assert nlb.inputs["name"] == "demo-production-mqtt"


def test_aws_listener_and_targets_are_tcp_on_the_mqtt_port(aws_run: StackRun) -> None:
    (group,) = aws_run.of_type(AWS_TG)
    assert group.inputs["protocol"] == "TCP" and group.inputs["port"] == 8883
    assert group.inputs["targetType"] == "instance" and group.inputs["preserveClientIp"] == "true"
    assert group.inputs["proxyProtocolV2"] is False
    assert group.inputs["healthCheck"]["protocol"] == "TCP" and group.inputs["healthCheck"]["port"] == "traffic-port"
    (listener,) = aws_run.of_type(AWS_LISTENER)
    (nlb,) = aws_run.of_type(AWS_LB)
    assert listener.inputs["protocol"] == "TCP"  # not TLS: the NLB never terminates TLS
    assert listener.inputs["port"] == 8883
    assert listener.inputs["loadBalancerArn"].endswith(nlb.name)
    group_arn = f"arn:aws:elasticloadbalancing:eu-west-1:123456789012:{group.name}"  # the mocks' ARN
    assert listener.inputs["defaultActions"] == [{"type": "forward", "targetGroupArn": group_arn}]


def test_aws_targets_are_exactly_the_broker_instances(aws_run: StackRun) -> None:
    instances = {r.inputs["tags"]["iotplat-host"]: f"{r.name}-id" for r in aws_run.of_type("aws:ec2/instance:Instance")}
    attachments = aws_run.of_type(AWS_ATTACH)
    assert sorted(a.inputs["targetId"] for a in attachments) == sorted(instances[h] for h in BROKERS)
    assert {a.inputs["port"] for a in attachments} == {8883}


def test_aws_broker_groups_admit_devices_and_the_health_checks(aws_run: StackRun) -> None:
    cfg = config.parse(load_fixture("aws-cluster"), "aws")
    groups = {f"{sg.name}-id": sg.inputs["tags"]["iotplat-host"] for sg in aws_run.of_type("aws:ec2/securityGroup:SecurityGroup")}
    sources: dict[str, set[str]] = {h: set() for h in BROKERS}
    for rule in aws_run.of_type("aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"):
        if rule.inputs["fromPort"] == 8883:
            sources[groups[rule.inputs["securityGroupId"]]].add(rule.inputs["cidrIpv4"])
    # devices (0.0.0.0/0 in the fixture) and the VPC, where the NLB's health checks come from
    assert sources == {h: {"0.0.0.0/0", str(cfg.network_cidr)} for h in BROKERS}


def test_aws_output_names_the_load_balancer(aws_run: StackRun) -> None:
    assert aws_run.outputs["brokerLoadBalancer"] == {
        "dnsName": "demo-production-mqtt-0123456789abcdef.elb.eu-west-1.amazonaws.com",
        "address": None,
        "port": 8883,
        "hosts": BROKERS,
    }


@pytest.mark.parametrize("fixture", ["aws-1host", "aws-3host"])
def test_aws_no_load_balancer_without_a_cluster(fixture: str) -> None:
    run = run_stack("aws", load_fixture(fixture))
    assert not [r for r in run.resources if r.type in AWS_TYPES]
    assert run.outputs["brokerLoadBalancer"] is None


def test_aws_retired_cluster_keeps_no_load_balancer() -> None:
    run = run_stack("aws", retired("aws-cluster"))
    assert not [r for r in run.resources if r.type in AWS_TYPES]
    assert run.outputs["brokerLoadBalancer"] is None


@pytest.mark.parametrize("stack", ["demo-production", "a" * 30 + "-" + "b" * 29, "x-" + "y" * 57])
def test_aws_names_fit_and_stay_distinct(stack: str) -> None:
    names = {aws_name(stack, suffix) for suffix in ("mqtt", "brokers")}
    assert len(names) == 2 and all(len(n) <= MAX_NAME for n in names)
    assert all(n[0].isalnum() and n[-1].isalnum() and "--" not in n for n in names)
    assert aws_name(stack, "mqtt") != aws_name(stack + "z", "mqtt")


# --- Azure ---------------------------------------------------------------------------------------


def test_azure_standard_load_balancer_with_one_tcp_rule(azure_run: StackRun) -> None:
    (lb,) = azure_run.of_type(AZ_LB)
    inputs = lb.inputs
    assert inputs["sku"] == {"name": "Standard", "tier": "Regional"}
    (frontend,) = inputs["frontendIPConfigurations"]
    ip = azure_run.named("azure-native:network:PublicIPAddress", "-broker-ip")
    assert frontend == {"name": "mqtt", "publicIPAddress": {"id": f"{ip.name}-id"}}
    assert ip.inputs["sku"]["name"] == "Standard" and ip.inputs["publicIPAllocationMethod"] == "Static"
    (probe,) = inputs["probes"]
    assert probe["protocol"] == "Tcp" and probe["port"] == 8883
    (rule,) = inputs["loadBalancingRules"]
    assert rule["protocol"] == "Tcp" and rule["frontendPort"] == rule["backendPort"] == 8883
    assert rule["enableFloatingIP"] is False and rule["disableOutboundSnat"] is True
    group = azure_run.named("azure-native:resources:ResourceGroup", "-rg")
    group_id = f"/subscriptions/0000/resourceGroups/rg/providers/mock/{group.name}"
    assert rule["frontendIPConfiguration"]["id"] == sub_resource_id(group_id, "frontendIPConfigurations", "mqtt")
    assert rule["backendAddressPool"]["id"] == sub_resource_id(group_id, "backendAddressPools", "brokers")
    assert rule["probe"]["id"] == sub_resource_id(group_id, "probes", "mqtt-tcp")
    assert [p["name"] for p in inputs["backendAddressPools"]] == ["brokers"]


def test_azure_pool_holds_exactly_the_broker_nics(azure_run: StackRun) -> None:
    pools = {
        nic.inputs["tags"]["iotplat-host"]: [p["id"] for p in nic.inputs["ipConfigurations"][0].get(
            "loadBalancerBackendAddressPools", [])]
        for nic in azure_run.of_type(AZ_NIC)
    }
    assert set(pools) == set(BROKERS)
    assert all(len(ids) == 1 and ids[0].endswith("/loadBalancers/broker-lb/backendAddressPools/brokers")
               for ids in pools.values())


def test_azure_nsgs_admit_the_probes_by_service_tag(azure_run: StackRun) -> None:
    for nsg in azure_run.of_type(AZ_NSG):
        inbound = [r for r in nsg.inputs["securityRules"] if r["direction"] == "Inbound" and r["access"] == "Allow"]
        probes = [r for r in inbound if r["sourceAddressPrefix"] == "AzureLoadBalancer"]
        assert [(r["destinationPortRange"], r["protocol"]) for r in probes] == [("8883", "Tcp")]
        assert probes[0]["priority"] < 4096  # before the deny-all


def test_azure_output_names_the_load_balancer(azure_run: StackRun) -> None:
    out = azure_run.outputs["brokerLoadBalancer"]
    ip = azure_run.named("azure-native:network:PublicIPAddress", "-broker-ip")
    assert out["address"].startswith("203.0.113.") and out["dnsName"] is None
    assert out == {"dnsName": None, "address": out["address"], "port": 8883, "hosts": BROKERS}
    assert ip.name.endswith("-broker-ip")


@pytest.mark.parametrize("fixture", ["azure-1host", "azure-3host"])
def test_azure_no_load_balancer_without_a_cluster(fixture: str) -> None:
    run = run_stack("azure", load_fixture(fixture))
    assert not run.of_type(AZ_LB)
    assert all("loadBalancerBackendAddressPools" not in n.inputs["ipConfigurations"][0] for n in run.of_type(AZ_NIC))
    assert all(r["sourceAddressPrefix"] != "AzureLoadBalancer" for g in run.of_type(AZ_NSG)
               for r in g.inputs["securityRules"])
    assert run.outputs["brokerLoadBalancer"] is None


def test_azure_retired_cluster_keeps_no_load_balancer() -> None:
    run = run_stack("azure", retired("azure-cluster"))
    assert not run.of_type(AZ_LB) and run.outputs["brokerLoadBalancer"] is None


# --- the plan ------------------------------------------------------------------------------------


def test_plan_health_check_rules_only_on_load_balanced_hosts() -> None:
    raw = copy.deepcopy(load_fixture("azure-cluster"))
    raw["iotplat:brokerLoadBalancer"]["hosts"] = ["core", "b2"]
    cfg = config.parse(raw, "azure")
    layout = plan.plan(cfg, private_subnet=False, max_rules_per_direction=500, health_check_cidr="168.63.129.16/32")
    probe = plan.Rule("ingress", "tcp", 8883, "168.63.129.16/32", "load balancer health checks")
    assert [probe in layout.host(h).ingress for h in BROKERS] == [True, True, False]
    assert layout.load_balancer == config.LoadBalancer(port=8883, hosts=("core", "b2"))


def test_plan_aws_health_checks_ride_on_the_internal_rule() -> None:
    cfg = config.parse(load_fixture("aws-cluster"), "aws")
    without = plan.plan(config.parse({**load_fixture("aws-cluster"), "iotplat:brokerLoadBalancer": None}, "aws"),
                        private_subnet=True, max_rules_per_direction=60)
    layout = plan.plan(cfg, private_subnet=True, max_rules_per_direction=60)
    # the network CIDR on 8883 is already the broker's internal rule: the same rules, nothing added
    assert [h.ingress for h in layout.hosts] == [h.ingress for h in without.hosts]
    assert all(any(r.port == 8883 and r.cidr == str(cfg.network_cidr) for r in h.ingress) for h in layout.hosts)


# --- what `iotplat render` writes ----------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
SPEC_CASES = REPO / "tests" / "spec" / "cases"


def _rendered(cli: Any, case: str, kind: str, tmp_path: Path, changes: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    folder = tmp_path / case
    shutil.copytree(SPEC_CASES / case, folder)
    spec = folder / "platform.yaml"
    for old, new in changes:
        assert old in spec.read_text(), old
        spec.write_text(spec.read_text().replace(old, new))
    shutil.copy(REPO / "platform" / "examples" / "aws" / "id_ed25519.pub", folder / "key.pub")
    result = cli("render", str(folder / "platform.yaml"), "--out", str(tmp_path / "build"))
    assert result.code == 0, result.err
    (config_file,) = (tmp_path / "build" / "pulumi" / kind).glob("Pulumi.*.yaml")
    return dict(yaml.safe_load(config_file.read_text())["config"])


@pytest.mark.parametrize("kind", ["aws", "azure"])
def test_render_writes_the_load_balancer_of_a_nats_cluster(kind: str, cli: Any, tmp_path: Path) -> None:
    """The spec case the check accepts renders to a stack config the stacks accept, with the load balancer on
    the MQTT listener's port in front of exactly the broker hosts; its hosts' ingress is the fixture's."""
    raw = _rendered(cli, f"valid_nats_cluster_{kind}", kind, tmp_path)
    assert raw["iotplat:brokerLoadBalancer"] == {"port": 8883, "hosts": BROKERS}
    cfg = config.parse(raw, kind)
    assert cfg.broker_load_balancer == config.LoadBalancer(port=8883, hosts=tuple(BROKERS))
    fixture = config.parse(load_fixture(f"{kind}-cluster"), kind)
    assert [set(h.ingress) for h in cfg.hosts] == [set(h.ingress) for h in fixture.hosts]


def test_render_writes_no_load_balancer_for_one_node(cli: Any, tmp_path: Path) -> None:
    """One NATS node: devices dial that host, no load balancer (and no server name needed)."""
    raw = _rendered(cli, "valid_nats_cluster_aws", "aws", tmp_path, (
        ("  nodes: 3\n", "  nodes: 1\n"), ("  server_names: [mqtt.example.com]\n", ""),
        ("services: [broker, worker]\n", "services: [worker]\n"), ("services: [broker]\n", "services: [worker]\n")))
    assert [h["name"] for h in raw["iotplat:hosts"] if "broker" in h["services"]] == ["core"]
    assert "iotplat:brokerLoadBalancer" not in raw
