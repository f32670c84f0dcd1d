"""Read and validate the stack config that ``iotplat render`` writes.

The contract (docs/stacks.md) is a ``Pulumi.<platform>-<env>.yaml`` whose ``iotplat:*`` keys are
plain values. ``parse`` checks every key and returns a frozen ``StackConfig``; the first problem
raises ``ConfigError`` with one line that names the key, e.g.
``iotplat:hosts[0].ingress[1].source: must be one of devices, admin, internal (got 'world')``.

``ConfigError`` is a ``pulumi.RunError``, so ``pulumi up`` prints the message without a traceback.
``parse`` itself needs no engine: tests feed it the ``config:`` mapping of a fixture file.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.errors import RunError

NS = "iotplat"
SOURCES = ("devices", "admin", "internal")
PROTOCOLS = ("tcp", "udp")
IMAGES = ("debian-13", "debian-12")
# active: the whole platform; retired: only the data disks (and what holds them) are kept, every VM, address,
# network and firewall is deleted. `iotplat destroy` without --data retires a stack; the next `up` reattaches.
MODES = ("active", "retired")
# Ports that must never be reachable from the whole internet (SSH, RDP, InfluxDB, Grafana).
NEVER_WORLD_OPEN = (22, 3389, 8086, 3000)
SSH_PORT = 22
# Not only a literal /0: the union of the CIDRs a NEVER_WORLD_OPEN port is opened to may hold at most
# a /8's worth of public IPv4 addresses. Private, shared, loopback, link-local, multicast and reserved
# ranges do not count. `iotplat validate` applies the same rule to the spec (iotplat/spec/checks.py).
MAX_PUBLIC_IPV4 = 2**24
NOT_PUBLIC_IPV4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
)

_DNS_LABEL = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
_LINUX_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SSH_KEY = re.compile(r"^(ssh-ed25519|ssh-rsa) [A-Za-z0-9+/]+={0,3}( [^\n\r]*)?$")
# The intersection of what AWS security-group rule descriptions and Azure NSG rules accept.
_DESCRIPTION = re.compile(r"^[A-Za-z0-9 ._\-:/()#,@\[\]+=&;{}!$*]{1,140}$")
_TAG_FORBIDDEN = re.compile(r"[<>%&\\?/]")


class ConfigError(RunError):
    """The stack config breaks the contract; the message is one line and names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


# Azure refuses these as a VM's admin username.
AZURE_RESERVED_USERS = frozenset(
    (  # noqa: SIM905 (a word list reads better than 32 quoted strings)
        "administrator admin user user1 test user2 test1 user3 admin1 1 123 a actuser adm admin2 "
        "aspnet backup console david guest john owner root server sql support support_388945a0 sys "
        "test2 test3 user4 user5"
    ).split()
)


@dataclass(frozen=True)
class TargetRules:
    """What differs between clouds in what the config may say."""

    name: str
    location_key: str  # provider config key the stack also needs
    size_pattern: re.Pattern[str]
    size_example: str
    disk_gb_min: int
    disk_gb_max: int
    reserved_users: frozenset[str] = frozenset()


TARGETS: dict[str, TargetRules] = {
    "aws": TargetRules(
        name="aws",
        location_key="aws:region",
        size_pattern=re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$"),
        size_example="t3.small",
        disk_gb_min=1,
        disk_gb_max=16384,
    ),
    "azure": TargetRules(
        name="azure",
        location_key="azure-native:location",
        size_pattern=re.compile(r"^(Standard|Basic)_[A-Za-z0-9_]+$"),
        size_example="Standard_B2s",
        disk_gb_min=4,
        disk_gb_max=16384,
        reserved_users=AZURE_RESERVED_USERS,
    ),
}


@dataclass(frozen=True)
class Ingress:
    port: int
    protocol: str
    source: str  # one of SOURCES
    description: str


@dataclass(frozen=True)
class Host:
    name: str
    size: str
    disk_gb: int
    services: tuple[str, ...]
    ingress: tuple[Ingress, ...]

    @property
    def is_public(self) -> bool:
        """A host gets a public IP only if something outside the network must reach it."""
        return any(rule.source in ("devices", "admin") for rule in self.ingress)


@dataclass(frozen=True)
class LoadBalancer:
    """A TCP load balancer in front of a broker cluster: devices reach every node through one address.

    TLS passes through (the load balancer does not terminate it), so the nodes' certificates carry
    the DNS name devices dial; the spec's ``broker.server_names`` holds it (iotplat validate).
    """

    port: int  # the MQTT over TLS port, the same on the load balancer and on the nodes
    hosts: tuple[str, ...]  # the broker nodes, in spec order


@dataclass(frozen=True)
class StackConfig:
    target: str
    location: str
    platform: str
    environment: str
    network_cidr: ipaddress.IPv4Network
    admin_cidrs: tuple[ipaddress.IPv4Network, ...]
    device_cidrs: tuple[ipaddress.IPv4Network, ...]
    ssh_user: str
    ssh_public_key: str
    image: str
    tags: Mapping[str, str]
    hosts: tuple[Host, ...]
    mode: str = "active"
    broker_load_balancer: LoadBalancer | None = None

    @property
    def retired(self) -> bool:
        return self.mode == "retired"

    @property
    def name(self) -> str:
        """``<platform>-<environment>``, also the Pulumi stack name."""
        return f"{self.platform}-{self.environment}"

    def cidrs_for(self, source: str) -> tuple[ipaddress.IPv4Network, ...]:
        if source == "devices":
            return self.device_cidrs
        if source == "admin":
            return self.admin_cidrs
        if source == "internal":
            return (self.network_cidr,)
        raise ValueError(source)


# Keys read from the iotplat namespace; structured ones arrive from the engine as JSON text.
PLAIN_KEYS = ("platform", "environment", "networkCidr", "sshUser", "sshPublicKey", "image", "mode")
OBJECT_KEYS = ("adminCidrs", "deviceCidrs", "tags", "hosts", "brokerLoadBalancer")
KEYS = PLAIN_KEYS + OBJECT_KEYS
# Keys a stack config may leave out. Pulumi.yaml does not declare them: the CLI requires every declared key
# that has no default, and `iotplat render` writes brokerLoadBalancer only for a broker cluster.
OPTIONAL_KEYS = ("brokerLoadBalancer",)


def parse(raw: Mapping[str, Any], target: str) -> StackConfig:
    """Validate the ``config:`` mapping of a stack config file (full keys, decoded values)."""
    rules = TARGETS[target]
    unknown = sorted(k for k in raw if k.startswith(f"{NS}:") and k.split(":", 1)[1] not in KEYS)
    if unknown:
        raise ConfigError(unknown[0], f"unknown key; known keys are {', '.join(f'{NS}:{k}' for k in KEYS)}")

    location = _require_str(raw, rules.location_key)
    platform = _dns_label(raw, f"{NS}:platform")
    environment = _dns_label(raw, f"{NS}:environment")
    if len(f"{platform}-{environment}") > 60:
        raise ConfigError(
            f"{NS}:environment",
            "<platform>-<environment> must be at most 60 characters (resource names derive from it)",
        )
    network = _network_cidr(raw)
    admin_cidrs = _cidr_list(raw, f"{NS}:adminCidrs")
    for i, cidr in enumerate(admin_cidrs):
        if cidr.prefixlen == 0:
            raise ConfigError(
                f"{NS}:adminCidrs[{i}]",
                f"{cidr} would open SSH (22) to the whole internet; list the operators' networks",
            )
    exposed = public_ipv4_addresses(admin_cidrs)
    if exposed > MAX_PUBLIC_IPV4:
        raise ConfigError(
            f"{NS}:adminCidrs",
            f"together open SSH (22) to {exposed:,} public IPv4 addresses, more than a /8 "
            f"({MAX_PUBLIC_IPV4:,}); list the operators' networks (private ranges do not count)",
        )
    device_cidrs = _cidr_list(raw, f"{NS}:deviceCidrs")
    ssh_user = _ssh_user(raw, rules)
    ssh_key = _ssh_public_key(raw)
    image = _require_str(raw, f"{NS}:image")
    if image not in IMAGES:
        raise ConfigError(f"{NS}:image", f"must be one of {', '.join(IMAGES)} (got {image!r})")
    tags = _tags(raw)
    cfg_hosts = _hosts(raw, rules)
    mode = raw.get(f"{NS}:mode", "active")
    if mode not in MODES:
        raise ConfigError(f"{NS}:mode", f"must be one of {', '.join(MODES)} (got {mode!r})")

    cfg = StackConfig(
        target=target,
        location=location,
        platform=platform,
        environment=environment,
        network_cidr=network,
        admin_cidrs=admin_cidrs,
        device_cidrs=device_cidrs,
        ssh_user=ssh_user,
        ssh_public_key=ssh_key,
        image=image,
        tags=tags,
        hosts=cfg_hosts,
        mode=mode,
        broker_load_balancer=_load_balancer(raw, cfg_hosts),
    )
    _check_world_open(cfg)
    if not any(h.is_public for h in cfg.hosts):
        raise ConfigError(
            f"{NS}:hosts",
            "no host has a devices or admin ingress rule, so none gets a public IP and nothing can reach "
            "the platform (one public host is also the SSH jump host for the others)",
        )
    return cfg


def from_pulumi(target: str) -> StackConfig:
    """Read the running stack's config through ``pulumi.Config`` and validate it."""
    rules = TARGETS[target]
    raw: dict[str, Any] = {}
    provider_ns, provider_key = rules.location_key.split(":", 1)
    location = pulumi.Config(provider_ns).get(provider_key)
    if location is not None:
        raw[rules.location_key] = location
    config = pulumi.Config(NS)
    for key in PLAIN_KEYS:
        value = config.get(key)
        if value is not None:
            raw[f"{NS}:{key}"] = value
    for key in OBJECT_KEYS:
        text = config.get(key)
        if text is None:
            continue
        try:
            raw[f"{NS}:{key}"] = json.loads(text)
        except json.JSONDecodeError as exc:
            kind = "mapping" if key in ("tags", "brokerLoadBalancer") else "list"
            raise ConfigError(
                f"{NS}:{key}", f"must be a YAML {kind}, got text that is not one ({exc.msg})"
            ) from None
    return parse(raw, target)


# --- helpers: each raises ConfigError naming the key --------------------------------------------


def _require(raw: Mapping[str, Any], key: str) -> Any:
    if key not in raw or raw[key] is None:
        raise ConfigError(key, "is required")
    return raw[key]


def _require_str(raw: Mapping[str, Any], key: str) -> str:
    return _str(_require(raw, key), key)


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"must be a non-empty string (got {value!r})")
    return value


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer (got {value!r})")
    if not lo <= value <= hi:
        raise ConfigError(key, f"must be between {lo} and {hi} (got {value})")
    return value


def _list(value: Any, key: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise ConfigError(key, f"must be a list (got {type(value).__name__})")
    return value


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping (got {type(value).__name__})")
    return value


def _dns_label(raw: Mapping[str, Any], key: str) -> str:
    return _label(_require(raw, key), key)


def _label(value: Any, key: str) -> str:
    text = _str(value, key)
    if not _DNS_LABEL.match(text):
        raise ConfigError(
            key, f"must be a DNS label: a-z, 0-9 and '-', starting with a letter (got {text!r})"
        )
    return text


def _cidr(value: Any, key: str) -> ipaddress.IPv4Network:
    text = _str(value, key)
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ConfigError(key, f"is not a valid CIDR: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise ConfigError(key, f"{text} is IPv6; hosts have IPv4 addresses only, so list IPv4 CIDRs")
    return net


def _network_cidr(raw: Mapping[str, Any]) -> ipaddress.IPv4Network:
    key = f"{NS}:networkCidr"
    net = _cidr(_require(raw, key), key)
    if not net.is_private:
        raise ConfigError(key, f"{net} is not a private (RFC 1918) range")
    if not 16 <= net.prefixlen <= 23:
        raise ConfigError(key, f"{net} must be between /16 and /23 so it holds the hosts' /24 subnets")
    return net


def _cidr_list(raw: Mapping[str, Any], key: str) -> tuple[ipaddress.IPv4Network, ...]:
    items = _list(_require(raw, key), key)
    if not items:
        raise ConfigError(key, "must list at least one CIDR")
    return tuple(_cidr(item, f"{key}[{i}]") for i, item in enumerate(items))


def _ssh_user(raw: Mapping[str, Any], rules: TargetRules) -> str:
    key = f"{NS}:sshUser"
    user = _require_str(raw, key)
    if not _LINUX_USER.match(user):
        raise ConfigError(key, f"must be a Linux user name: a-z, 0-9, '_' and '-', at most 32 (got {user!r})")
    if user in rules.reserved_users:
        raise ConfigError(key, f"{user!r} is reserved on {rules.name} and refused as the VM admin user")
    if user == "root":
        raise ConfigError(key, "must not be root")
    return user


def _ssh_public_key(raw: Mapping[str, Any]) -> str:
    key = f"{NS}:sshPublicKey"
    text = _require_str(raw, key).strip()
    if "PRIVATE KEY" in text:
        raise ConfigError(key, "looks like a private key; give the public key (the .pub file)")
    if not _SSH_KEY.match(text):
        raise ConfigError(
            key, "must be one OpenSSH public key line: 'ssh-ed25519 AAAA... comment' (or ssh-rsa)"
        )
    return text


def _tags(raw: Mapping[str, Any]) -> Mapping[str, str]:
    key = f"{NS}:tags"
    tags = _mapping(_require(raw, key), key)
    if len(tags) > 40:
        raise ConfigError(key, f"has {len(tags)} tags; at most 40 leave room for the ones the stack adds")
    out: dict[str, str] = {}
    for name, value in tags.items():
        sub = f"{key}.{name}"
        if not isinstance(name, str) or not name or len(name) > 128 or _TAG_FORBIDDEN.search(name):
            raise ConfigError(sub, "tag names must be 1-128 characters without < > % & \\ ? /")
        if name.lower().startswith(("aws:", "azure", "microsoft", "windows")):
            raise ConfigError(
                sub, "tag names must not use a cloud-reserved prefix (aws:, azure, microsoft, windows)"
            )
        if not isinstance(value, str) or len(value) > 256:
            raise ConfigError(sub, f"tag values must be strings of at most 256 characters (got {value!r})")
        out[name] = value
    return out


def _hosts(raw: Mapping[str, Any], rules: TargetRules) -> tuple[Host, ...]:
    key = f"{NS}:hosts"
    items = _list(_require(raw, key), key)
    if not items:
        raise ConfigError(key, "must list at least one host")
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        hkey = f"{key}[{i}]"
        data = _mapping(item, hkey)
        extra = sorted(set(data) - {"name", "size", "diskGb", "services", "ingress"})
        if extra:
            raise ConfigError(
                f"{hkey}.{extra[0]}", "unknown key; a host has name, size, diskGb, services, ingress"
            )
        name = _label(_require_nested(data, "name", hkey), f"{hkey}.name")
        if name in seen:
            raise ConfigError(f"{hkey}.name", f"duplicate host name {name!r} (also {key}[{seen[name]}])")
        seen[name] = i
        size = _str(_require_nested(data, "size", hkey), f"{hkey}.size")
        if not rules.size_pattern.match(size):
            raise ConfigError(
                f"{hkey}.size", f"{size!r} is not a {rules.name} size (e.g. {rules.size_example})"
            )
        disk_gb = _int(
            _require_nested(data, "diskGb", hkey), f"{hkey}.diskGb", rules.disk_gb_min, rules.disk_gb_max
        )
        services = tuple(
            _label(s, f"{hkey}.services[{j}]")
            for j, s in enumerate(_list(_require_nested(data, "services", hkey), f"{hkey}.services"))
        )
        ingress = tuple(
            _ingress(rule, f"{hkey}.ingress[{j}]")
            for j, rule in enumerate(_list(data.get("ingress", []), f"{hkey}.ingress"))
        )
        hosts.append(Host(name=name, size=size, disk_gb=disk_gb, services=services, ingress=ingress))
    return tuple(hosts)


def _load_balancer(raw: Mapping[str, Any], hosts: Sequence[Host]) -> LoadBalancer | None:
    """``iotplat:brokerLoadBalancer``: optional; ``{port, hosts}`` naming two or more hosts that each accept
    TCP on ``port`` from ``devices`` (what the load balancer forwards) and from ``internal`` (where AWS's
    health checks come from; iotplat's broker rules always have both)."""
    key = f"{NS}:brokerLoadBalancer"
    if raw.get(key) is None:
        return None
    data = _mapping(raw[key], key)
    extra = sorted(set(data) - {"port", "hosts"})
    if extra:
        raise ConfigError(f"{key}.{extra[0]}", "unknown key; the load balancer has port, hosts")
    port = _int(_require_nested(data, "port", key), f"{key}.port", 1, 65535)
    if port in NEVER_WORLD_OPEN:
        raise ConfigError(
            f"{key}.port",
            f"{port} is one of {', '.join(map(str, NEVER_WORLD_OPEN))}, never put behind a public load balancer",
        )
    names = _list(_require_nested(data, "hosts", key), f"{key}.hosts")
    if len(names) < 2:
        raise ConfigError(f"{key}.hosts", f"must list at least two hosts (got {len(names)}); one node needs none")
    by_name = {h.name: h for h in hosts}
    seen: set[str] = set()
    for i, name in enumerate(names):
        hkey = f"{key}.hosts[{i}]"
        if not isinstance(name, str) or name not in by_name:
            raise ConfigError(hkey, f"{name!r} is not a host of {NS}:hosts")
        if name in seen:
            raise ConfigError(hkey, f"duplicate host {name!r}")
        seen.add(name)
        for source in ("devices", "internal"):
            if not any(r.port == port and r.protocol == "tcp" and r.source == source for r in by_name[name].ingress):
                raise ConfigError(
                    hkey,
                    f"host {name!r} has no tcp ingress on {port} from {source}; the load balancer "
                    + ("forwards devices there" if source == "devices" else "checks the port from inside the network"),
                )
    return LoadBalancer(port=port, hosts=tuple(names))


def _require_nested(data: Mapping[str, Any], field: str, parent: str) -> Any:
    if field not in data or data[field] is None:
        raise ConfigError(f"{parent}.{field}", "is required")
    return data[field]


def _ingress(item: Any, key: str) -> Ingress:
    data = _mapping(item, key)
    extra = sorted(set(data) - {"port", "protocol", "source", "description"})
    if extra:
        raise ConfigError(f"{key}.{extra[0]}", "unknown key; a rule has port, protocol, source, description")
    port = _int(_require_nested(data, "port", key), f"{key}.port", 1, 65535)
    protocol = data.get("protocol", "tcp")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{key}.protocol", f"must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
    source = _require_nested(data, "source", key)
    if source not in SOURCES:
        raise ConfigError(f"{key}.source", f"must be one of {', '.join(SOURCES)} (got {source!r})")
    description = _str(data.get("description", f"{protocol}/{port} from {source}"), f"{key}.description")
    if not _DESCRIPTION.match(description):
        raise ConfigError(
            f"{key}.description",
            "must be 1-140 characters of letters, digits, spaces and ._-:/()#,@[]+=&;{}!$*",
        )
    return Ingress(port=port, protocol=protocol, source=source, description=description)


def _check_world_open(cfg: StackConfig) -> None:
    for i, host in enumerate(cfg.hosts):
        for j, rule in enumerate(host.ingress):
            if rule.port not in NEVER_WORLD_OPEN:
                continue
            for cidr in cfg.cidrs_for(rule.source):
                if cidr.prefixlen == 0:
                    raise ConfigError(
                        f"{NS}:hosts[{i}].ingress[{j}]",
                        f"port {rule.port} from {rule.source} would be open to {cidr}; ports "
                        f"{', '.join(map(str, NEVER_WORLD_OPEN))} are never opened to the whole internet",
                    )
            exposed = public_ipv4_addresses(cfg.cidrs_for(rule.source))
            if exposed > MAX_PUBLIC_IPV4:
                raise ConfigError(
                    f"{NS}:hosts[{i}].ingress[{j}]",
                    f"port {rule.port} from {rule.source} would be open to {exposed:,} public IPv4 "
                    f"addresses, more than a /8 ({MAX_PUBLIC_IPV4:,}); ports "
                    f"{', '.join(map(str, NEVER_WORLD_OPEN))} are never opened to the internet",
                )


def public_ipv4_addresses(cidrs: Sequence[ipaddress.IPv4Network]) -> int:
    """Public addresses in the union of ``cidrs``; overlapping networks count once.

    Two CIDR blocks are either disjoint or one holds the other, so the non-public part of each
    collapsed block is all of it, or the sum of the non-public blocks inside it.
    """
    total = 0
    for net in ipaddress.collapse_addresses(cidrs):
        hidden = 0
        for block in NOT_PUBLIC_IPV4:
            if net.subnet_of(block):
                hidden = net.num_addresses
                break
            if block.subnet_of(net):
                hidden += block.num_addresses
        total += net.num_addresses - hidden
    return total
