"""Pure planning (iotplat_stack.plan): subnets, addresses, exposure and firewall rules.

Fully offline, no cloud and not even pulumi's mocks (the planner has no Pulumi in it): tables of
examples plus Hypothesis properties over generated configs.
"""

from __future__ import annotations

import copy
import ipaddress
import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iotplat_stack import config, plan
from iotplat_stack.config import NEVER_WORLD_OPEN, ConfigError
from iotplat_stack.plan import FIRST_HOST_OFFSET, LAST_HOST_OFFSET
from stacks_harness import load_fixture


def parsed(fixture: str) -> config.StackConfig:
    return config.parse(load_fixture(fixture), fixture.split("-")[0])


def aws_plan(cfg: config.StackConfig) -> plan.Plan:
    return plan.plan(cfg, private_subnet=True, max_rules_per_direction=60)


def with_hosts(fixture: str, hosts: list[dict[str, Any]]) -> config.StackConfig:
    raw = copy.deepcopy(load_fixture(fixture))
    raw["iotplat:hosts"] = hosts
    return config.parse(raw, fixture.split("-")[0])


def host(name: str, *sources: str, port: int = 8883) -> dict[str, Any]:
    return {
        "name": name,
        "size": "t3.small",
        "diskGb": 10,
        "services": ["broker"],
        "ingress": [
            {"port": port, "protocol": "tcp", "source": s, "description": f"from {s}"} for s in sources
        ],
    }


def ports(rules: tuple[plan.Rule, ...], cidr: str | None = None) -> set[int]:
    return {r.port for r in rules if cidr is None or r.cidr == cidr}


# --- subnets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "public", "private"),
    [
        ("10.42.0.0/16", "10.42.0.0/24", "10.42.1.0/24"),
        ("192.168.10.0/23", "192.168.10.0/24", "192.168.11.0/24"),
        ("172.16.0.0/20", "172.16.0.0/24", "172.16.1.0/24"),
    ],
)
def test_host_subnets_are_the_first_two_24s(network: str, public: str, private: str) -> None:
    first, second = plan.host_subnets(ipaddress.IPv4Network(network))
    assert (str(first), str(second)) == (public, private)


# --- exposure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sources", "public"),
    [
        ((), False),
        (("internal",), False),
        (("devices",), True),
        (("admin",), True),
        (("internal", "admin"), True),
        (("internal", "devices"), True),
    ],
)
def test_public_ip_only_with_a_devices_or_admin_rule(sources: tuple[str, ...], public: bool) -> None:
    cfg = with_hosts("aws-1host", [host("edge", "devices"), host("other", *sources, port=8443)])
    layout = aws_plan(cfg)
    assert layout.host("other").public is public
    assert layout.host("other").subnet == ("public" if public else "private")


def test_one_host_config_needs_no_nat_private_subnet_or_jump_host() -> None:
    layout = aws_plan(parsed("aws-1host"))
    assert (layout.needs_nat, layout.private_subnet, layout.bastion) == (False, None, None)


def test_three_host_config_puts_influxdb_behind_the_first_public_host() -> None:
    layout = aws_plan(parsed("aws-3host"))
    assert [(h.name, h.public, h.subnet) for h in layout.hosts] == [
        ("mqtt", True, "public"),
        ("tsdb", False, "private"),
        ("dash", True, "public"),
    ]
    assert (layout.needs_nat, layout.private_subnet, layout.bastion) == (True, "10.42.1.0/24", "mqtt")


def test_azure_layout_keeps_every_host_in_one_subnet() -> None:
    layout = plan.plan(parsed("azure-3host"), private_subnet=False, max_rules_per_direction=500)
    assert {h.subnet for h in layout.hosts} == {"public"}
    assert all(
        ipaddress.ip_address(h.private_ip) in ipaddress.ip_network("10.42.0.0/24") for h in layout.hosts
    )
    assert layout.private_subnet is None and layout.needs_nat


# --- addresses ----------------------------------------------------------------------------------


def test_addresses_do_not_depend_on_order_or_on_other_hosts() -> None:
    subnet = ipaddress.IPv4Network("10.0.0.0/24")
    names = ["core", "mqtt", "tsdb", "dash"]
    base = plan.assign_addresses(names, subnet)
    for perm in itertools.permutations(names):
        assert plan.assign_addresses(list(perm), subnet) == base
    assert plan.assign_addresses(["tsdb"], subnet)["tsdb"] == base["tsdb"]
    assert {k: v for k, v in plan.assign_addresses([*names, "extra"], subnet).items() if k != "extra"} == base


def test_a_collision_moves_only_the_later_host() -> None:
    slots: dict[int, str] = {}
    for i in itertools.count():
        name = f"h{i}"
        slot = plan.address_slot(name)
        if slot in slots:
            first, second = slots[slot], name
            break
        slots[slot] = name
    subnet = ipaddress.IPv4Network("10.0.0.0/24")
    addresses = plan.assign_addresses([first, second], subnet)
    assert addresses[first] == str(subnet.network_address + plan.address_slot(first))
    assert addresses[second] != addresses[first]
    assert plan.assign_addresses([second, first], subnet)[second] == addresses[first]


@pytest.mark.parametrize("name", ["core", "mqtt", "a", "x" * 63])
def test_address_slots_avoid_provider_reserved_addresses(name: str) -> None:
    assert FIRST_HOST_OFFSET <= plan.address_slot(name) <= LAST_HOST_OFFSET


# --- firewall rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected_cidrs"),
    [
        ("devices", {"0.0.0.0/0"}),
        ("admin", {"203.0.113.0/24", "198.51.100.7/32"}),
        ("internal", {"10.42.0.0/16"}),
    ],
)
def test_sources_expand_to_their_cidrs(source: str, expected_cidrs: set[str]) -> None:
    cfg = with_hosts("aws-3host", [host("edge", "devices", port=9000), host("x", source, "admin", port=8443)])
    rules = aws_plan(cfg).host("x").ingress
    expected = expected_cidrs | ({"203.0.113.0/24", "198.51.100.7/32"})
    assert {r.cidr for r in rules if r.port == 8443} == expected


def test_ssh_always_comes_from_admin_networks_only() -> None:
    layout = aws_plan(parsed("aws-3host"))
    for placed in layout.hosts:
        ssh_sources = {r.cidr for r in placed.ingress if r.port == 22}
        expected = {"203.0.113.0/24", "198.51.100.7/32"}
        if not placed.public:
            expected.add(f"{layout.host('mqtt').private_ip}/32")  # through the jump host
        assert ssh_sources == expected


def test_open_ports_are_exactly_the_declared_ones_plus_ssh() -> None:
    cfg = parsed("aws-3host")
    layout = aws_plan(cfg)
    for spec in cfg.hosts:
        assert ports(layout.host(spec.name).ingress) == {r.port for r in spec.ingress} | {22}


def test_egress_is_web_and_ntp_anywhere_and_internal_ports_to_single_hosts() -> None:
    layout = aws_plan(parsed("aws-3host"))
    tsdb_ip = layout.host("tsdb").private_ip
    assert {(r.protocol, r.port) for r in layout.host("tsdb").egress} == {
        ("tcp", 80),
        ("tcp", 443),
        ("udp", 123),
    }
    assert {(r.port, r.cidr) for r in layout.host("dash").egress if r.cidr != "0.0.0.0/0"} == {
        (8086, f"{tsdb_ip}/32")
    }
    assert {(r.port, r.cidr) for r in layout.host("mqtt").egress if r.cidr != "0.0.0.0/0"} == {
        (8086, f"{tsdb_ip}/32"),
        (22, f"{tsdb_ip}/32"),  # jump host to the host behind it
    }


def test_same_port_and_cidr_is_one_rule() -> None:
    layout = aws_plan(parsed("aws-1host"))
    keys = [(r.direction, r.protocol, r.port, r.cidr) for r in layout.host("core").rules]
    assert len(keys) == len(set(keys))
    # 8883 from devices and from internal are two rules (different CIDRs), declared once each
    assert {r.cidr for r in layout.host("core").ingress if r.port == 8883} == {"0.0.0.0/0", "10.42.0.0/16"}


def test_rule_quota_is_enforced_with_a_clear_error() -> None:
    raw = copy.deepcopy(load_fixture("aws-1host"))
    raw["iotplat:deviceCidrs"] = [f"100.64.{i}.0/24" for i in range(70)]
    with pytest.raises(ConfigError) as caught:  # 70 device CIDRs + SSH, 3000 from admin, 2 internal
        aws_plan(config.parse(raw, "aws"))
    assert str(caught.value) == (
        "iotplat:hosts[0]: needs 74 inbound rules (one per port and CIDR); aws allows 60, so list fewer CIDRs"
    )


# --- properties over generated configs ----------------------------------------------------------

labels = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True)
sources = st.sampled_from(config.SOURCES)
rule_ports = st.sampled_from([22, 80, 443, 1883, 3000, 3389, 8086, 8883, 9000])


@st.composite
def stack_configs(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(labels, min_size=1, max_size=8, unique=True))
    device_cidrs = draw(
        st.sampled_from([["0.0.0.0/0"], ["100.64.0.0/10"], ["100.64.0.0/10", "192.0.2.0/24"]])
    )
    hosts = []
    for i, name in enumerate(names):
        rules = draw(st.lists(st.tuples(rule_ports, sources), max_size=4))
        if i == 0:
            rules.append((8883, "devices"))  # some host is always public, as in every real platform
        hosts.append(
            {
                "name": name,
                "size": "t3.small",
                "diskGb": 10,
                "services": ["broker"],
                "ingress": [
                    {"port": p, "protocol": "tcp", "source": s, "description": "generated"}
                    for p, s in rules
                    if not (device_cidrs == ["0.0.0.0/0"] and s == "devices" and p in NEVER_WORLD_OPEN)
                ],
            }
        )
    raw = copy.deepcopy(load_fixture("aws-1host"))
    raw["iotplat:deviceCidrs"] = device_cidrs
    raw["iotplat:hosts"] = hosts
    return raw


@settings(max_examples=60, deadline=None)
@given(raw=stack_configs(), private_subnet=st.booleans())
def test_plan_properties(raw: dict[str, Any], private_subnet: bool) -> None:
    cfg = config.parse(raw, "aws")
    layout = plan.plan(cfg, private_subnet=private_subnet, max_rules_per_direction=1000)
    network = cfg.network_cidr

    addresses = [h.private_ip for h in layout.hosts]
    assert len(set(addresses)) == len(addresses)
    for placed, spec in zip(layout.hosts, cfg.hosts, strict=True):
        ip = ipaddress.ip_address(placed.private_ip)
        subnet = ipaddress.ip_network(
            layout.private_subnet if placed.subnet == "private" else layout.public_subnet
        )
        assert ip in subnet and ip in network
        assert FIRST_HOST_OFFSET <= int(ip) - int(subnet.network_address) <= LAST_HOST_OFFSET
        assert placed.public == any(r.source in ("devices", "admin") for r in spec.ingress)
        # never world-open on sensitive ports, and only declared ports (plus SSH) accept traffic
        assert not [r for r in placed.ingress if r.world_open and r.port in NEVER_WORLD_OPEN]
        assert ports(placed.ingress) == {r.port for r in spec.ingress} | {22}
        # egress to anywhere is only web and NTP; everything else goes to single platform hosts
        for rule in placed.egress:
            if rule.world_open:
                assert (rule.protocol, rule.port) in {("tcp", 80), ("tcp", 443), ("udp", 123)}
            else:
                assert rule.cidr.endswith("/32") and ipaddress.ip_network(rule.cidr).subnet_of(network)
    assert (layout.bastion is None) == all(h.public for h in layout.hosts)
    assert layout.needs_nat == (not all(h.public for h in layout.hosts))
