"""Defence in depth for the ports that are never open to the internet (22, 3389, 8086, 3000).

Not only a literal ``0.0.0.0/0``: the stack config refuses admin CIDRs, and the CIDRs of any rule on
a never-world-open port, whose union holds more public IPv4 addresses than a /8 — the same rule
``iotplat validate`` applies to the spec (iotplat/spec/checks.py). Pure Python, offline.
"""

from __future__ import annotations

import copy
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iotplat_stack import config
from iotplat_stack.config import ConfigError
from stacks_harness import load_fixture

from iotplat.cost.table import SIZE_PATTERNS
from iotplat.spec import checks


def _raw(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(load_fixture("aws-3host"))
    raw.update(changes)
    return raw


def test_two_halves_of_the_internet_are_refused_as_admin_cidrs() -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(_raw(**{"iotplat:adminCidrs": ["0.0.0.0/1", "128.0.0.0/1"]}), "aws")
    assert str(caught.value) == (
        "iotplat:adminCidrs: together open SSH (22) to 3,702,390,784 public IPv4 addresses, more than a /8 "
        "(16,777,216); list the operators' networks (private ranges do not count)"
    )


def test_a_literal_slash_zero_keeps_its_own_message() -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(_raw(**{"iotplat:adminCidrs": ["0.0.0.0/0"]}), "aws")
    assert str(caught.value).startswith("iotplat:adminCidrs[0]: 0.0.0.0/0 would open SSH (22)")


def test_devices_on_a_never_open_port_are_held_to_the_same_limit() -> None:
    raw = _raw(**{"iotplat:deviceCidrs": ["0.0.0.0/2", "64.0.0.0/2", "128.0.0.0/2"]})
    raw["iotplat:hosts"][1]["ingress"].append({"port": 8086, "protocol": "tcp", "source": "devices"})
    with pytest.raises(ConfigError) as caught:
        config.parse(raw, "aws")
    assert str(caught.value) == (
        # 0/2 + 64/2 + 128/2 = 3 x 2^30, less 0/8, 10/8, 127/8, 100.64/10, 169.254/16 and 172.16/12
        "iotplat:hosts[1].ingress[1]: port 8086 from devices would be open to 3,165,585,408 public IPv4 "
        "addresses, more than a /8 (16,777,216); ports 22, 3389, 8086, 3000 are never opened to the internet"
    )


def test_devices_may_come_from_anywhere_on_mqtt() -> None:
    cfg = config.parse(_raw(**{"iotplat:deviceCidrs": ["0.0.0.0/1", "128.0.0.0/1"]}), "aws")
    assert [str(c) for c in cfg.device_cidrs] == ["0.0.0.0/1", "128.0.0.0/1"]


@pytest.mark.parametrize(
    ("cidrs", "ok"),
    [
        (["8.0.0.0/8"], True),  # exactly a /8 of public addresses
        (["8.0.0.0/8", "9.0.0.0/32"], False),  # one more
        (["8.0.0.0/8", "8.1.0.0/16"], True),  # overlaps count once
        (["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "8.0.0.0/8"], True),  # private: free
        (["0.0.0.0/4"], False),  # 16 /8s, of which 0/8 (reserved) and 10/8 (private) do not count: 14 public
        (["96.0.0.0/6"], False),
        (["203.0.113.0/24", "198.51.100.7/32"], True),
    ],
)
def test_the_limit_and_what_counts(cidrs: list[str], ok: bool) -> None:
    raw = _raw(**{"iotplat:adminCidrs": cidrs})
    if ok:
        config.parse(raw, "aws")
    else:
        with pytest.raises(ConfigError, match=r"^iotplat:adminCidrs: together open SSH"):
            config.parse(raw, "aws")


def _oracle(cidrs: list[ipaddress.IPv4Network]) -> int:
    """Independent count: subtract every non-public block with address_exclude, then add up."""
    remaining = list(ipaddress.collapse_addresses(cidrs))
    for block in config.NOT_PUBLIC_IPV4:
        nxt: list[ipaddress.IPv4Network] = []
        for net in remaining:
            if net.subnet_of(block):
                continue
            if block.subnet_of(net):
                nxt.extend(net.address_exclude(block))
            else:
                nxt.append(net)
        remaining = nxt
    return sum(n.num_addresses for n in remaining)


_networks = st.builds(
    lambda addr, prefix: ipaddress.IPv4Network((addr, prefix), strict=False),
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=0, max_value=32),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_networks, min_size=1, max_size=6))
def test_the_stack_and_validate_count_public_addresses_alike(nets: list[ipaddress.IPv4Network]) -> None:
    expected = _oracle(nets)
    assert config.public_ipv4_addresses(nets) == expected
    assert checks.public_addresses([str(n) for n in nets])[4] == expected


def test_the_stack_and_validate_share_the_limit_and_the_ranges() -> None:
    assert checks.MAX_PUBLIC_ADDRESSES[4] == config.MAX_PUBLIC_IPV4
    assert checks.NOT_PUBLIC_IPV4 == config.NOT_PUBLIC_IPV4
    assert set(checks.SENSITIVE_PORTS) == set(config.NEVER_WORLD_OPEN)


@pytest.mark.parametrize("cloud", ["aws", "azure"])
def test_validate_names_sizes_like_the_stack(cloud: str) -> None:
    """`iotplat validate` refuses the sizes the stack config would refuse (same naming rule)."""
    assert SIZE_PATTERNS[cloud].pattern == config.TARGETS[cloud].size_pattern.pattern  # type: ignore[index]


@pytest.mark.parametrize(
    ("cidrs", "v4", "v6"),
    [
        (["2001:db8::/32"], 0, 2**96),  # exactly the IPv6 limit (bare metal may list IPv6 admin networks)
        (["fc00::/7", "fe80::/10", "::1/128"], 0, 0),  # unique-local, link-local, loopback: not public
        (["::/0"], 0, 2**128 - 2**121 - 2**118 - 2**120 - 2),
        (["10.0.0.0/8", "2001:db8::/48"], 0, 2**80),
    ],
)
def test_validate_counts_ipv6_too(cidrs: list[str], v4: int, v6: int) -> None:
    assert checks.public_addresses(cidrs) == {4: v4, 6: v6}
