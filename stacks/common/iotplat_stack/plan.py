"""Pure planning: from a validated ``StackConfig`` to subnets, addresses, exposure and firewall rules.

No Pulumi here. The stacks translate a ``Plan`` into resources one to one, so every policy the
platform promises (what is open, to whom, which host has a public IP) is decided, and tested, here.

Decisions, in short (docs/stacks.md has the reasons):
- A host gets a public IP only if one of its ingress rules has source ``devices`` or ``admin``.
  The first such host (in spec order) is the SSH jump host for the others.
- Hosts live in the first /24 of ``networkCidr``. Where routing is per subnet (AWS), hosts
  without a public IP go in the second /24, whose default route is a NAT gateway.
- A host's private IP is derived from its name (not its position), so adding, removing or
  reordering other hosts does not move it; on a hash collision the later host in spec order
  takes the next free address.
- Ingress: exactly the declared rules, one per CIDR, plus SSH from ``adminCidrs`` (and from the
  jump host's address on hosts without a public IP). Egress: HTTP/HTTPS/NTP anywhere (package
  mirrors, PyPI, ACME and time have no fixed addresses), the declared internal ports only to the
  hosts that accept them, and SSH from the jump host to the hosts behind it.
- A broker cluster (``iotplat:brokerLoadBalancer``) gets a TCP load balancer on its MQTT port; each
  node also accepts that port from where the cloud's health checks come (``health_check_cidr``:
  AWS's NLB probes from its own addresses inside the network, Azure's from 168.63.129.16).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .config import NEVER_WORLD_OPEN, NS, SSH_PORT, ConfigError, Host, LoadBalancer, StackConfig

# Usable host offsets inside a /24. Both clouds reserve .0-.3 and .255; .4-.9 are kept for
# infrastructure: the AWS NAT gateway gets .5 of the public subnet, so it can never take an
# address a host is about to claim.
NAT_OFFSET = 5
FIRST_HOST_OFFSET = 10
LAST_HOST_OFFSET = 250
ANYWHERE = "0.0.0.0/0"

# Outbound to the internet: what hosts need to install and run the platform.
INTERNET_EGRESS: tuple[tuple[str, int, str], ...] = (
    ("tcp", 80, "package mirrors (HTTP)"),
    ("tcp", 443, "package mirrors, PyPI and ACME (HTTPS)"),
    ("udp", 123, "NTP"),
)


@dataclass(frozen=True, order=True)
class Rule:
    direction: str  # "ingress" | "egress"
    protocol: str  # "tcp" | "udp"
    port: int
    cidr: str  # the remote side: source for ingress, destination for egress
    description: str

    @property
    def world_open(self) -> bool:
        return ipaddress.ip_network(self.cidr).prefixlen == 0


@dataclass(frozen=True)
class HostPlan:
    name: str
    public: bool
    subnet: str  # "public" | "private"
    private_ip: str
    ingress: tuple[Rule, ...]
    egress: tuple[Rule, ...]

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self.ingress + self.egress


@dataclass(frozen=True)
class Plan:
    public_subnet: str
    private_subnet: str | None  # only when hosts without a public IP need their own route table
    needs_nat: bool  # hosts without a public IP still need outbound for package mirrors
    nat_private_ip: str | None  # where a NAT gateway sits in the public subnet (AWS)
    bastion: str | None  # SSH jump host, when some host has no public IP
    hosts: tuple[HostPlan, ...]
    load_balancer: LoadBalancer | None = None  # in front of the broker nodes (a cluster), else None

    def host(self, name: str) -> HostPlan:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)


def host_subnets(network: ipaddress.IPv4Network) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Network]:
    """The first and second /24 of the network (the config guarantees a /23 or larger)."""
    subnets = network.subnets(new_prefix=24)
    return next(subnets), next(subnets)


def address_slot(name: str) -> int:
    """The preferred host offset for ``name``: stable, spread over the usable range."""
    span = LAST_HOST_OFFSET - FIRST_HOST_OFFSET + 1
    digest = hashlib.sha256(name.encode()).digest()
    return FIRST_HOST_OFFSET + int.from_bytes(digest[:8], "big") % span


def assign_addresses(names: Sequence[str], subnet: ipaddress.IPv4Network) -> dict[str, str]:
    """Give each name an address in ``subnet``; earlier names win collisions."""
    if subnet.prefixlen != 24:
        raise ValueError(f"expected a /24, got {subnet}")
    span = LAST_HOST_OFFSET - FIRST_HOST_OFFSET + 1
    if len(names) > span:
        raise ConfigError(f"{NS}:hosts", f"at most {span} hosts fit in one /24 subnet (got {len(names)})")
    taken: set[int] = set()
    out: dict[str, str] = {}
    for name in names:
        offset = address_slot(name)
        while offset in taken:
            offset = FIRST_HOST_OFFSET + (offset - FIRST_HOST_OFFSET + 1) % span
        taken.add(offset)
        out[name] = str(subnet.network_address + offset)
    return out


def plan(
    cfg: StackConfig, *, private_subnet: bool, max_rules_per_direction: int, health_check_cidr: str | None = None
) -> Plan:
    """Lay out the platform. ``private_subnet``: put hosts without a public IP in their own /24.
    ``health_check_cidr``: where the cloud's load balancer health checks come from (default: the network)."""
    public_net, private_net = host_subnets(cfg.network_cidr)
    public_names = [h.name for h in cfg.hosts if h.is_public]
    private_names = [h.name for h in cfg.hosts if not h.is_public]
    if private_subnet:
        addresses = assign_addresses(public_names, public_net) | assign_addresses(private_names, private_net)
    else:
        addresses = assign_addresses([h.name for h in cfg.hosts], public_net)
    bastion = public_names[0] if private_names else None

    hosts = []
    for index, host in enumerate(cfg.hosts):
        ingress = _dedupe(ingress_rules(cfg, host, addresses, bastion) + health_check_rules(cfg, host, health_check_cidr))
        egress = _dedupe(egress_rules(cfg, host, addresses, bastion))
        for direction, rules in (("inbound", ingress), ("outbound", egress)):
            if len(rules) > max_rules_per_direction:
                raise ConfigError(
                    f"{NS}:hosts[{index}]",
                    f"needs {len(rules)} {direction} rules (one per port and CIDR); {cfg.target} allows "
                    f"{max_rules_per_direction}, so list fewer CIDRs",
                )
        hosts.append(
            HostPlan(
                name=host.name,
                public=host.is_public,
                subnet="private" if (private_subnet and not host.is_public) else "public",
                private_ip=addresses[host.name],
                ingress=ingress,
                egress=egress,
            )
        )
    result = Plan(
        public_subnet=str(public_net),
        private_subnet=str(private_net) if (private_subnet and private_names) else None,
        needs_nat=bool(private_names),
        nat_private_ip=str(public_net.network_address + NAT_OFFSET) if private_names else None,
        bastion=bastion,
        hosts=tuple(hosts),
        load_balancer=cfg.broker_load_balancer,
    )
    assert_policies(result)
    return result


def ingress_rules(cfg: StackConfig, host: Host, addresses: dict[str, str], bastion: str | None) -> list[Rule]:
    rules = [
        Rule("ingress", "tcp", SSH_PORT, str(cidr), "SSH from admin networks") for cidr in cfg.admin_cidrs
    ]
    if bastion is not None and not host.is_public:
        rules.append(
            Rule("ingress", "tcp", SSH_PORT, f"{addresses[bastion]}/32", f"SSH via jump host {bastion}")
        )
    for declared in host.ingress:
        rules.extend(
            Rule("ingress", declared.protocol, declared.port, str(cidr), declared.description)
            for cidr in cfg.cidrs_for(declared.source)
        )
    return rules


def health_check_rules(cfg: StackConfig, host: Host, health_check_cidr: str | None) -> list[Rule]:
    """The load balancer's health checks on a node's MQTT port. On AWS they come from the network (the NLB's
    own addresses in the public subnet), which the broker's ``internal`` rule already admits: deduplicated."""
    lb = cfg.broker_load_balancer
    if lb is None or host.name not in lb.hosts:
        return []
    cidr = health_check_cidr or str(cfg.network_cidr)
    return [Rule("ingress", "tcp", lb.port, cidr, "load balancer health checks")]


def egress_rules(cfg: StackConfig, host: Host, addresses: dict[str, str], bastion: str | None) -> list[Rule]:
    rules = [Rule("egress", proto, port, ANYWHERE, why) for proto, port, why in INTERNET_EGRESS]
    for other in cfg.hosts:
        if other.name == host.name:
            continue  # traffic to its own address never leaves the host
        for declared in other.ingress:
            if declared.source == "internal":
                rules.append(
                    Rule(
                        "egress",
                        declared.protocol,
                        declared.port,
                        f"{addresses[other.name]}/32",
                        f"to {other.name}: {declared.description}"[:140],
                    )
                )
        if host.name == bastion and not other.is_public:
            rules.append(
                Rule("egress", "tcp", SSH_PORT, f"{addresses[other.name]}/32", f"SSH jump to {other.name}")
            )
    return rules


def _dedupe(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    """One rule per (direction, protocol, port, cidr); the first description wins."""
    seen: dict[tuple[str, str, int, str], Rule] = {}
    for rule in rules:
        seen.setdefault((rule.direction, rule.protocol, rule.port, rule.cidr), rule)
    return tuple(seen.values())


def assert_policies(result: Plan) -> None:
    """Last line of defence: refuse a plan that breaks a policy, whatever the config said."""
    for host in result.hosts:
        for rule in host.ingress:
            if rule.world_open and rule.port in NEVER_WORLD_OPEN:
                raise ConfigError(
                    f"{NS}:hosts", f"{host.name} would accept port {rule.port} from {rule.cidr}"
                )
