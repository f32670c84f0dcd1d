"""Cross-checks beyond the schema: rules that span sections, each reported at the line it concerns.

Each check is a function (Platform, Document) -> list[Problem], registered in CHECKS. Adding a rule
means adding a function and one line in CHECKS (and a golden case under tests/spec/cases/).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import TYPE_CHECKING, Literal, NamedTuple, TypeVar

from iotplat.errors import Problem
from iotplat.spec.errors_map import did_you_mean
from iotplat.spec.model import AWS_REGIONS, AZURE_LOCATIONS
from iotplat.spec.platform_model import (
    GRAFANA_INFLUX_USER,
    INFLUX_ADMIN_USER,
    WORKER_INFLUX_USER,
    WORKER_USER_PREFIX,
    Platform,
    filter_covers,
    template_filter,
    template_names,
)
from iotplat.spec.units import format_size
from iotplat.spec.yamlio import Document

if TYPE_CHECKING:
    from iotplat.cost.table import SizeFacts

Check = Callable[[Platform, Document], list[Problem]]
BUILTIN_DECODERS = ("json", "line", "raw")
SENSITIVE_PORTS = (22, 3389, 8086, 3000)


@functools.lru_cache(maxsize=1)
def _plugin_decoders() -> frozenset[str]:
    """Scanning the installed distributions' entry points takes ~20 ms: once per process."""
    return frozenset(ep.name for ep in metadata.entry_points(group="iotplat.decoders"))


def installed_decoders() -> list[str]:
    return sorted(_plugin_decoders() | set(BUILTIN_DECODERS))


def _column_hint(name: str, columns: set[str]) -> str:
    hint = did_you_mean(name, sorted(columns))
    if hint.startswith("did you mean"):
        return hint
    return f"add a {name} column to the registry; columns now: {', '.join(sorted(columns)) or 'id only'}"


def check_placement(p: Platform, doc: Document) -> list[Problem]:
    """Every required service runs somewhere, and a single-host service (the broker, InfluxDB, Grafana) on one."""
    from iotplat.services import all_services

    out: list[Problem] = []
    names = [h.name for h in p.spec.hosts]
    for i, n in enumerate(names):
        if names.index(n) != i:
            out.append(doc.problem(("hosts", i, "name"), f"host name {n!r} is used twice"))
    for svc in all_services():
        if not svc.enabled(p):
            continue
        placed = p.placement[svc.name]
        if not placed and svc.required:
            out.append(doc.problem(("hosts",), f"no host runs the {svc.name} service",
                                   f"add {svc.name!r} to the services of one host"))
        elif svc.single_host and len(placed) > 1 and not _clustered(svc.name, p):
            out.append(doc.problem(("hosts",), f"{svc.name} is placed on {len(placed)} hosts ({', '.join(placed)}); "
                                   "it runs on exactly one", "keep it on one host"))
    return out


def _clustered(service: str, p: Platform) -> bool:
    """The broker on the NATS engine runs on `broker.nodes` hosts (check_broker_engine counts them)."""
    return service == "broker" and p.spec.broker.engine == "nats"


def check_ports(p: Platform, doc: Document) -> list[Problem]:
    out: list[Problem] = []
    for host in p.spec.hosts:
        used: dict[int, str] = {22: "ssh"}
        wanted: list[tuple[int, str, tuple]] = []
        services = p.services_on(host.name)
        if "broker" in services:
            for li, lst in enumerate(p.spec.broker.listeners):
                wanted.append((lst.port, f"broker listener {li}", ("broker", "listeners", li, "port")))
        if "influxdb" in services:
            wanted.append((p.spec.influxdb.port, "influxdb", ("influxdb", "port")))
        if "grafana" in services:
            wanted.append((p.spec.grafana.port, "grafana", ("grafana", "port")))
        for r in p.replicas_on(host.name):
            wanted.append((p.spec.ingestion.metrics_port + r.number - 1, f"worker replica {r.number} metrics",
                           ("ingestion", "metrics_port")))
        for port, what, path in wanted:
            if port in used:
                out.append(doc.problem(path, f"port {port} on host {host.name!r} is already used by {used[port]}",
                                       "give each service on a host its own port"))
            else:
                used[port] = what
    return out


def check_topics(p: Platform, doc: Document) -> list[Problem]:
    out: list[Problem] = []
    subs = p.spec.ingestion.subscriptions
    sub_filters = [template_filter(s.topic) for s in subs]
    columns: set[str] = set()
    for d in p.devices:
        columns.update(k for k, _ in d.attributes)
    have_registry = bool(p.spec.devices.registry)
    for ti, tmpl in enumerate(p.spec.devices.topics):
        names = template_names(tmpl)
        if "device" not in names:
            out.append(doc.problem(("devices", "topics", ti), f"topic {tmpl!r} has no {{device}} level",
                                   "each device publishes under its own id, e.g. devices/{device}/telemetry"))
        if len(names) != len(set(names)):
            out.append(doc.problem(("devices", "topics", ti), "a {name} appears twice in the topic"))
        for n in names:
            if n != "device" and have_registry and n not in columns and p.devices:
                out.append(doc.problem(("devices", "topics", ti), f"{{{n}}} is not a column of the device registry",
                                       _column_hint(n, columns)))
        f = template_filter(tmpl)
        if not any(filter_covers(sf, f) for sf in sub_filters):
            out.append(doc.problem(("devices", "topics", ti),
                                   f"devices publish to {tmpl!r} but no ingestion subscription covers it",
                                   "add a subscription with this topic, or the data would never be stored"))
        if filter_covers(f, template_filter(p.spec.ingestion.dead_letters.topic)) or filter_covers(
            template_filter(p.spec.ingestion.dead_letters.topic), f
        ):
            out.append(doc.problem(("devices", "topics", ti), "device topics overlap the dead-letter topic",
                                   "devices must not write or read dead letters; change ingestion.dead_letters.topic"))
    for d in p.devices:
        for ti, tmpl in enumerate(p.spec.devices.topics):
            for n in template_names(tmpl):
                if n != "device" and not d.attr(n):
                    out.append(doc.problem(("devices", "registry"),
                                           f"device {d.id!r} has no value for {{{n}}} used in {tmpl!r}"))
                    break
            else:
                continue
            break
    decoders = installed_decoders()
    names_seen: dict[str, int] = {}
    for si, sub in enumerate(subs):
        if sub.name in names_seen:
            out.append(doc.problem(("ingestion", "subscriptions", si, "name"), f"subscription name {sub.name!r} is used twice"))
        names_seen[sub.name] = si
        if sub.format not in decoders:
            out.append(doc.problem(("ingestion", "subscriptions", si, "format"), f"unknown payload format {sub.format!r}",
                                   did_you_mean(sub.format, decoders)
                                   or f"installed decoders: {', '.join(decoders)}; plugins register in 'iotplat.decoders'"))
        names = template_names(sub.topic)
        if len(names) != len(set(names)):
            out.append(doc.problem(("ingestion", "subscriptions", si, "topic"), "a {name} appears twice in the topic"))
        sf = sub_filters[si]
        if filter_covers(sf, template_filter(p.spec.ingestion.dead_letters.topic)):
            out.append(doc.problem(("ingestion", "subscriptions", si, "topic"),
                                   "the subscription would read the worker's own dead letters (a loop)",
                                   "change the topic or ingestion.dead_letters.topic"))
        if not any(filter_covers(sf, template_filter(t)) or filter_covers(template_filter(t), sf)
                   for t in p.spec.devices.topics):
            out.append(doc.problem(("ingestion", "subscriptions", si, "topic"),
                                   f"no device may publish to {sub.topic!r}, so this subscription never receives data",
                                   "add the topic to devices.topics"))
        for tag in sub.tags:
            if tag in sub.fields:
                out.append(doc.problem(("ingestion", "subscriptions", si, "tags", tag),
                                       f"{tag!r} is both a tag and a field", "rename one of them", key=True))
        for n in names:
            if n in sub.fields:
                out.append(doc.problem(("ingestion", "subscriptions", si, "fields", n),
                                       f"{n!r} is a topic level (a tag) and a field", "rename the field", key=True))
        if sub.format in ("json", "raw") and not sub.fields:
            out.append(doc.problem(("ingestion", "subscriptions", si), f"format {sub.format} needs at least one entry in `fields`",
                                   "declare the fields and their types, e.g. temperature: float"))
        if sub.format == "raw" and len(sub.fields) > 1:
            out.append(doc.problem(("ingestion", "subscriptions", si, "fields"), "format raw carries one value: declare exactly one field"))
    return out


def check_flow_control(p: Platform, doc: Document) -> list[Problem]:
    out: list[Problem] = []
    ing = p.spec.ingestion
    lim = p.spec.broker.limits
    if ing.batch.max_points > ing.inflight:
        out.append(doc.problem(("ingestion", "batch", "max_points"),
                               f"a batch of {ing.batch.max_points} points needs the worker's in-flight window "
                               f"(ingestion.inflight = {ing.inflight}) to hold at least as many unacknowledged messages",
                               "raise ingestion.inflight or lower batch.max_points"))
    if lim.inflight_messages is not None and lim.inflight_messages != ing.inflight:
        out.append(doc.problem(("broker", "limits", "inflight_messages"),
                               f"the broker's in-flight window ({lim.inflight_messages}) differs from the worker's "
                               f"({ing.inflight}): smaller stalls the worker's batches, larger lets Mosquitto 2.0.11 "
                               "send more than the worker can hold (it ignores MQTT 5 Receive Maximum)",
                               "remove it, it defaults to ingestion.inflight"))
    needed = int(p.per_replica_rate * ing.outage_budget)
    if lim.queue_messages is not None and lim.queue_messages < needed:
        out.append(doc.problem(("broker", "limits", "queue_messages"),
                               f"{lim.queue_messages} queued messages per replica last {lim.queue_messages / p.per_replica_rate:.0f}s "
                               f"at peak rate, less than outage_budget ({ing.outage_budget:.0f}s = {needed} messages); "
                               "the broker would silently drop the rest",
                               "remove it to derive it, or raise it"))
    if lim.queue_bytes is not None and lim.queue_bytes < needed * ing.typical_message:
        out.append(doc.problem(("broker", "limits", "queue_bytes"),
                               f"{format_size(lim.queue_bytes)} cannot queue {needed} messages of ~{format_size(ing.typical_message)}",
                               "remove it to derive it, or raise it"))
    if ing.spool.max_size < p.spool_needed:
        out.append(doc.problem(("ingestion", "spool", "max_size"),
                               f"the spool ({format_size(ing.spool.max_size)}) holds less than outage_budget "
                               f"({ing.outage_budget:.0f}s) of peak traffic per replica (~{format_size(p.spool_needed)})",
                               "raise spool.max_size, or lower peak_rate/outage_budget/typical_message"))
    if ing.spool.segment_size > ing.spool.max_size:
        out.append(doc.problem(("ingestion", "spool", "segment_size"), "a spool segment cannot be larger than spool.max_size"))
    if ing.max_payload > p.spec.broker.limits.message_size:
        out.append(doc.problem(("ingestion", "max_payload"),
                               "ingestion.max_payload is larger than broker.limits.message_size; the broker refuses such "
                               "messages before the worker sees them", "keep max_payload <= message_size"))
    if p.spec.broker.persistence.autosave_interval > 300:
        out.append(doc.problem(("broker", "persistence", "autosave_interval"),
                               "a broker crash loses up to autosave_interval of queued messages; more than 5m is refused",
                               "use 10s (the default) to 60s"))
    if p.spec.broker.persistence.client_expiration < ing.outage_budget:
        out.append(doc.problem(("broker", "persistence", "client_expiration"),
                               "sessions would expire before the outage budget is over, losing the worker's queue",
                               "make client_expiration longer than ingestion.outage_budget"))
    return out


def check_influxdb(p: Platform, doc: Document) -> list[Problem]:
    out: list[Problem] = []
    ix = p.spec.influxdb
    if ix.version == 1:
        for key in ("org", "bucket"):
            if getattr(ix, key) is not None:
                out.append(doc.problem(("influxdb", key), f"{key} applies to InfluxDB 2; version 1 uses database and "
                                       "retention_policy", key=True))
        if ix.package and ix.package.source == "upstream":
            pass  # InfluxData's repository also carries 1.x; allowed.
    else:
        for key in ("database", "retention_policy"):
            if getattr(ix, key) is not None:
                out.append(doc.problem(("influxdb", key), f"{key} applies to InfluxDB 1; version 2 uses org and bucket",
                                       key=True))
        if ix.package and ix.package.source == "distro":
            out.append(doc.problem(("influxdb", "package", "source"), "Debian does not package InfluxDB 2",
                                   "use source: upstream for InfluxData's repository, or local"))
    if ix.version == 1 and p.spec.tls.min_version == "1.3":
        out.append(doc.problem(("tls", "min_version"), "InfluxDB 1.x cannot refuse TLS 1.2 (1.6.7's [tls] min-version "
                               "stops at TLS1.2 and its cipher list cannot name TLS 1.3 suites)",
                               "use tls.min_version: 1.2 (TLS 1.3 is still negotiated with clients that offer it), "
                               "or influxdb.version: 2"))
    if ix.retention < 3600:
        out.append(doc.problem(("influxdb", "retention"), "retention shorter than 1h is refused by InfluxDB"))
    if p.spec.grafana.enabled and p.spec.grafana.package.source == "distro":
        out.append(doc.problem(("grafana", "package", "source"), "Debian does not package Grafana",
                               "use source: upstream for Grafana's repository, or local"))
    return out


def check_target(p: Platform, doc: Document) -> list[Problem]:
    out: list[Problem] = []
    t = p.spec.target
    names = set(p.host_names)
    if t.kind == "local":
        net = ipaddress.ip_network(t.network)
        if net.version != 4 or not net.is_private or net.prefixlen > 26:
            out.append(doc.problem(("target", "network"), f"{t.network} must be a private IPv4 network of /26 or larger",
                                   "e.g. 10.213.0.0/24"))
        elif len(p.host_names) > net.num_addresses - 20:
            out.append(doc.problem(("target", "network"), "the network is too small for the hosts"))
    elif t.kind == "baremetal":
        for n in sorted(names - set(t.hosts)):
            out.append(doc.problem(("target", "hosts"), f"host {n!r} has no address", f"add target.hosts.{n}.address"))
        for n in sorted(set(t.hosts) - names):
            out.append(doc.problem(("target", "hosts", n), f"{n!r} is not one of the spec's hosts",
                                   did_you_mean(n, sorted(names)), key=True))
    else:
        if t.kind == "aws" and t.region not in AWS_REGIONS:
            out.append(doc.problem(("target", "region"), f"unknown AWS region {t.region!r}",
                                   did_you_mean(t.region, AWS_REGIONS) or "e.g. eu-west-1"))
        if t.kind == "azure" and t.location not in AZURE_LOCATIONS:
            out.append(doc.problem(("target", "location"), f"unknown Azure location {t.location!r}",
                                   did_you_mean(t.location, AZURE_LOCATIONS) or "e.g. westeurope"))
        sizes = t.instance_types if t.kind == "aws" else t.vm_sizes
        key = "instance_types" if t.kind == "aws" else "vm_sizes"
        for n in sorted(set(sizes) - names - {"default"}):
            out.append(doc.problem(("target", key, n), f"{n!r} is not one of the spec's hosts",
                                   did_you_mean(n, sorted(names)), key=True))
        if "default" not in sizes and names - set(sizes):
            out.append(doc.problem(("target", key), f"no size for host(s) {', '.join(sorted(names - set(sizes)))}",
                                   "add a `default` entry"))
        for i, cidr in enumerate(t.admin_cidrs):
            if ipaddress.ip_network(cidr).prefixlen == 0:
                out.append(doc.problem(("target", "admin_cidrs", i),
                                       f"{cidr} opens SSH and Grafana to the whole internet",
                                       "list your operators' networks instead"))
        net = ipaddress.ip_network(t.network_cidr)
        if not net.is_private or net.version != 4 or not 16 <= net.prefixlen <= 23:
            out.append(doc.problem(("target", "network_cidr"), "must be a private IPv4 network from /16 to /23, "
                                   "e.g. 10.42.0.0/16 (the stacks carve /24 subnets from it)"))
        for key in ("admin_cidrs", "device_cidrs"):
            for i, cidr in enumerate(getattr(t, key)):
                if ipaddress.ip_network(cidr).version != 4:
                    out.append(doc.problem(("target", key, i), f"{cidr}: the cloud stacks support IPv4 networks only"))
        if t.disk_size < 4 * 1024**3:
            out.append(doc.problem(("target", "disk_size"), "a data disk must be at least 4GiB"))
        if len(p.name) + len(p.environment) + 1 > 60:
            out.append(doc.problem(("name",), f"the stack name {p.name}-{p.environment} is longer than 60 characters",
                                   "shorten the platform or environment name"))
        if t.kind == "azure" and t.ssh_user in ("admin", "administrator", "root", "user", "guest", "test"):
            out.append(doc.problem(("target", "ssh_user"), f"Azure refuses the admin user name {t.ssh_user!r}",
                                   "use e.g. iotplat"))
    return out


def check_names(p: Platform, doc: Document) -> list[Problem]:
    """The canary is an MQTT user like any device: its id names no registry device and no internal user.
    (broker.server_names are DNS names by their schema pattern.)"""
    out: list[Problem] = []
    ids = {d.id for d in p.devices}
    cid = p.canary.id
    if cid in ids:
        out.append(doc.problem(("devices", "canary", "id"), f"the canary id {cid!r} is also a registry device"))
    internal = (INFLUX_ADMIN_USER, GRAFANA_INFLUX_USER, WORKER_INFLUX_USER)
    if cid.startswith(WORKER_USER_PREFIX) or cid in internal:
        out.append(doc.problem(("devices", "canary", "id"),
                               f"the canary id {cid!r} is reserved for iotplat's own users ({WORKER_USER_PREFIX}N for "
                               f"the worker replicas, {', '.join(internal)}): the canary would share that user's "
                               "credential", "keep the default iotplat-canary, or choose another id"))
    return out


def _levels(template: str) -> list[str | None]:
    """The name of each {name} level of a topic template, None for a literal level."""
    return [lvl[1:-1] if lvl.startswith("{") else None for lvl in template.split("/")]


def check_topic_levels(p: Platform, doc: Document) -> list[Problem]:
    """Where a subscription and a device topic overlap, each level means the same thing in both: a level that
    is {device} in one is {device} in the other (else one device's data is stored under another id, or
    under a literal level's text), and a level that is a {name} in both carries the same name."""
    out: list[Problem] = []
    for si, sub in enumerate(p.spec.ingestion.subscriptions):
        sub_levels = _levels(sub.topic)
        sf = template_filter(sub.topic)
        for ti, tmpl in enumerate(p.spec.devices.topics):
            if not _overlap(sf, template_filter(tmpl)):
                continue
            for n, (s_name, t_name) in enumerate(zip(sub_levels, _levels(tmpl)), start=1):
                if s_name == t_name or ("device" not in (s_name, t_name) and None in (s_name, t_name)):
                    continue
                said = f"{{{s_name}}}" if s_name else f"the text {sub.topic.split('/')[n - 1]!r}"
                there = f"{{{t_name}}}" if t_name else f"the text {tmpl.split('/')[n - 1]!r}"
                out.append(doc.problem(("ingestion", "subscriptions", si, "topic"),
                                       f"level {n} is {said} here but {there} in devices.topics[{ti}] {tmpl!r}: the "
                                       "worker would store one value under the other's name",
                                       "use the same {name} at the same level as devices.topics"))
                break
    return out


def _overlap(a: str, b: str) -> bool:
    """True if some topic matches both filters (templates hold no #: same length, each level equal or a +)."""
    la, lb = a.split("/"), b.split("/")
    return len(la) == len(lb) and all(x == y or "+" in (x, y) for x, y in zip(la, lb))


def check_measurements(p: Platform, doc: Document) -> list[Problem]:
    """The worker's counters, the dead letters and the device data each keep their own measurement."""
    out: list[Problem] = []
    ing = p.spec.ingestion
    health = ing.health.measurement
    if health == ing.dead_letters.measurement:
        out.append(doc.problem(("ingestion", "health", "measurement"),
                               f"{health!r} is also ingestion.dead_letters.measurement",
                               "give the worker's counters their own measurement, e.g. iotplat_worker"))
    for i, sub in enumerate(ing.subscriptions):
        if sub.measurement == health:
            out.append(doc.problem(("ingestion", "subscriptions", i, "measurement"),
                                   f"{health!r} is ingestion.health.measurement, the worker's own counters",
                                   "store the devices' data under another measurement"))
    return out


# The ports no spec may open to the internet (SENSITIVE_PORTS: SSH, RDP, InfluxDB, Grafana) accept at most
# this many public addresses in the union of the networks they are opened to: a /8 of IPv4, a /32 of IPv6.
# stacks/common/iotplat_stack/config.py applies the same rule to the stack config (a test keeps them equal).
MAX_PUBLIC_ADDRESSES = {4: 2**24, 6: 2**96}
NOT_PUBLIC_IPV4 = tuple(ipaddress.IPv4Network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4"))
NOT_PUBLIC_IPV6 = tuple(ipaddress.IPv6Network(n) for n in ("::/127", "fc00::/7", "fe80::/10", "ff00::/8"))
_Net = TypeVar("_Net", ipaddress.IPv4Network, ipaddress.IPv6Network)


def _public_in(nets: list[_Net], hidden_blocks: tuple[_Net, ...]) -> int:
    """Two CIDR blocks are either disjoint or one holds the other, so the non-public part of each
    collapsed network is all of it, or the sum of the non-public blocks inside it."""
    total = 0
    for net in ipaddress.collapse_addresses(nets):
        hidden = 0
        for block in hidden_blocks:
            if net.subnet_of(block):
                hidden = net.num_addresses
                break
            if block.subnet_of(net):
                hidden += block.num_addresses
        total += net.num_addresses - hidden
    return total


def public_addresses(cidrs: Iterable[str]) -> dict[int, int]:
    """Public addresses in the union of `cidrs`, per IP version (4, 6); overlapping networks count once."""
    nets = [ipaddress.ip_network(c) for c in cidrs]
    return {4: _public_in([n for n in nets if isinstance(n, ipaddress.IPv4Network)], NOT_PUBLIC_IPV4),
            6: _public_in([n for n in nets if isinstance(n, ipaddress.IPv6Network)], NOT_PUBLIC_IPV6)}


def _too_open(cidrs: Iterable[str]) -> str:
    """'' when the networks stay within MAX_PUBLIC_ADDRESSES, else what they hold."""
    counts = public_addresses(cidrs)
    if counts[4] > MAX_PUBLIC_ADDRESSES[4]:
        return f"{counts[4]:,} public IPv4 addresses, more than a /8 ({MAX_PUBLIC_ADDRESSES[4]:,})"
    if counts[6] > MAX_PUBLIC_ADDRESSES[6]:
        return "more global IPv6 addresses than a /32"
    return ""


def check_cidr_exposure(p: Platform, doc: Document) -> list[Problem]:
    """admin_cidrs (SSH, Grafana) and device_cidrs on a never-world-open port: not (nearly) the whole internet."""
    t = p.spec.target
    if t.kind == "local":
        return []
    out: list[Problem] = []
    literal_world = t.kind != "baremetal" and any(ipaddress.ip_network(c).prefixlen == 0 for c in t.admin_cidrs)
    what = _too_open(t.admin_cidrs)
    if what and not literal_world:  # a cloud's literal /0 is already reported by check_target
        out.append(doc.problem(("target", "admin_cidrs"), f"together these networks hold {what}: SSH and Grafana "
                               "would be open to a large part of the internet",
                               "list your operators' networks; private ranges (e.g. 10/8, 172.16/12, 192.168/16, fc00::/7) do not count"))
    ports = sorted({lst.port for lst in p.spec.broker.listeners if lst.port in SENSITIVE_PORTS})
    what = _too_open(t.device_cidrs)
    if ports and what:
        out.append(doc.problem(("target", "device_cidrs"), f"devices reach port {ports[0]} (a broker listener), which is "
                               f"never opened to the internet, but these networks hold {what}",
                               "move the listener to another port (8883 is MQTT over TLS), or list the devices' networks"))
    return out


_SIZE_NOUN = {"aws": "an EC2 instance type", "azure": "an Azure VM size"}


def check_vm_sizes(p: Platform, doc: Document) -> list[Problem]:
    """Each host's size belongs to the spec's cloud, and runs the image its stack launches."""
    from iotplat.cost.table import SIZE_PATTERNS, STACK_ARCH, equivalent, shipped_sizes

    t = p.spec.target
    if t.kind not in ("aws", "azure"):
        return []
    cloud: Literal["aws", "azure"] = "aws" if t.kind == "aws" else "azure"
    other: Literal["aws", "azure"] = "azure" if cloud == "aws" else "aws"
    key, sizes = ("instance_types", t.instance_types) if t.kind == "aws" else ("vm_sizes", t.vm_sizes)
    own, theirs = shipped_sizes(cloud), shipped_sizes(other)
    example = "t3.small" if cloud == "aws" else "Standard_B2s"
    out: list[Problem] = []
    for host, size in sizes.items():
        path = ("target", key, host)
        if not SIZE_PATTERNS[cloud].match(size):
            foreign = theirs.get(size)
            if foreign is None and not SIZE_PATTERNS[other].match(size):
                out.append(doc.problem(path, f"{size!r} is not {_SIZE_NOUN[cloud]}", f"e.g. {example}"))
                continue
            message = f"{size} is {_SIZE_NOUN[other]}, not {_SIZE_NOUN[cloud]}"
            match = foreign and equivalent(own, vcpus=foreign.vcpus, memory_gib=foreign.memory_gib, family=foreign.family)
            hint = (f"on {cloud}, the equivalent of {size} ({foreign.vcpus} vCPU, {foreign.memory_gib:g} GiB, "
                    f"{foreign.family}) is {match}") if foreign and match else f"e.g. {example}"
            out.append(doc.problem(path, message, hint))
            continue
        facts = own.get(size)
        if facts is not None and facts.arch != STACK_ARCH[cloud]:
            match = equivalent(own, vcpus=facts.vcpus, memory_gib=facts.memory_gib, family=facts.family,
                               arch=STACK_ARCH[cloud])
            out.append(doc.problem(path, f"{size} is an {facts.arch} size, but stacks/{cloud} launches the "
                                   f"{STACK_ARCH[cloud]} Debian image",
                                   f"its {STACK_ARCH[cloud]} equivalent is {match}" if match else f"e.g. {example}"))
    return out


def check_cost_settings(p: Platform, doc: Document) -> list[Problem]:
    names = sorted(p.host_names)
    return [doc.problem(("cost", "hardware", n), f"{n!r} is not one of the spec's hosts",
                        did_you_mean(n, [*names, "default"]), key=True)
            for n in sorted(set(p.spec.cost.hardware) - set(names) - {"default"})]


# Settings only Mosquitto has, refused with broker.engine: nats when the spec sets them: (path, why, hint).
_MOSQUITTO_ONLY: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("broker", "limits", "inflight_messages"), "Mosquitto's per-client in-flight window",
     "remove it: on nats the worker's consumer holds at most ingestion.inflight unacknowledged messages"),
    (("broker", "limits", "queue_messages"), "Mosquitto's per-client queue",
     "remove it: on nats the worker's stream keeps ingestion.outage_budget of peak traffic"),
    (("broker", "limits", "queue_bytes"), "Mosquitto's per-client queue",
     "remove it: on nats the worker's stream keeps ingestion.outage_budget of peak traffic"),
    (("broker", "limits", "max_keepalive"), "Mosquitto's keepalive limit (nats-server has none)", "remove it"),
    (("broker", "persistence", "autosave_interval"), "Mosquitto's persistence file",
     "remove it: JetStream stores a QoS 1 message (on 3 nodes in a cluster) before the device's PUBACK"),
    (("broker", "persistence", "client_expiration"), "Mosquitto's session expiry for the worker",
     "remove it: on nats the worker's durable consumer does not expire"),
    (("broker", "auth", "hash_iterations"), "Mosquitto's PBKDF2 cost",
     "remove it: nats-server checks bcrypt hashes, their cost chosen by the secret's source"),
    (("ingestion", "protocol"), "the worker's MQTT version (on nats the worker speaks the NATS protocol)",
     "remove it"),
)


def _set_in_spec(doc: Document, path: tuple[str, ...]) -> bool:
    node: object = doc.data
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def check_broker_engine(p: Platform, doc: Document) -> list[Problem]:
    """broker.engine and broker.nodes: Mosquitto on one host; NATS on 1, 3 or 5 hosts (JetStream's Raft needs a
    majority), each listing the broker service; Mosquitto-only and MQTT 5-only settings refused for nats; every
    topic level expressible as a NATS subject token; nats-server's own ports free on its hosts."""
    from iotplat.nats.permissions import PermissionError_, device_topics, template_problems
    from iotplat.services import nats

    b = p.spec.broker
    out: list[Problem] = []
    hosts = p.placement["broker"]
    if b.engine == "mosquitto":
        if b.nodes != 1:
            out.append(doc.problem(("broker", "nodes"), f"Mosquitto runs on one host (it has no clustering), not {b.nodes}",
                                   "use broker.engine: nats for a cluster of 3 or 5 nodes, or remove nodes"))
        return out
    if b.nodes % 2 == 0:
        out.append(doc.problem(("broker", "nodes"), f"a NATS cluster of {b.nodes} nodes survives no more node losses "
                               f"than one of {b.nodes - 1} (JetStream needs a majority of its nodes)",
                               "use an odd number: 3 (one node may fail) or 5 (two may), or 1"))
    elif hosts and len(hosts) != b.nodes:
        out.append(doc.problem(("hosts",), f"broker.nodes is {b.nodes} but {len(hosts)} host(s) list the broker "
                               f"service ({', '.join(hosts)})", f"list broker on exactly {b.nodes} hosts"))
    if p.spec.target.kind in ("aws", "azure") and len(hosts) > 1 and not b.server_names:
        # The stack's load balancer passes TLS through (docs/stacks.md): devices verify the nodes' own certificate
        # against the name they dial, so that name must be on it, and only the spec can put it there.
        lb = ("network load balancer's DNS name, the stack output brokerLoadBalancer.dnsName (a CNAME)"
              if p.spec.target.kind == "aws" else
              "load balancer's public IP, the stack output brokerLoadBalancer.address (an A record)")
        out.append(doc.problem(("broker", "server_names"), f"a NATS cluster on {p.spec.target.kind} is reached through "
                               "the stack's load balancer, which passes TLS through to the nodes: their certificates "
                               "need the DNS name devices dial", f"list that name in broker.server_names and point it "
                               f"at the {lb}"))
    mqtt = [i for i, lst in enumerate(b.listeners) if lst.protocol == "mqtt"]
    for i, lst in enumerate(b.listeners):
        if lst.protocol == "websockets":
            out.append(doc.problem(("broker", "listeners", i, "protocol"), "nats-server serves MQTT over TLS only, "
                                   "not over WebSockets", "remove this listener, or use engine: mosquitto"))
    for i in mqtt[1:]:
        out.append(doc.problem(("broker", "listeners", i), "nats-server has one MQTT listener",
                               "keep one listener (port 8883)"))
    for path, what, hint in _MOSQUITTO_ONLY:
        if _set_in_spec(doc, path):
            out.append(doc.problem(path, f"{what} does not apply to broker.engine: nats", hint, key=True))
    size = b.limits.message_size
    if not nats.MIN_PAYLOAD <= size <= nats.MAX_PAYLOAD:
        out.append(doc.problem(("broker", "limits", "message_size"), f"nats-server carries messages of 1KiB to 64MiB, "
                               f"not {format_size(size)}", "choose a size in that range (256KiB by default)"))
    for ti, tmpl in enumerate(p.spec.devices.topics):
        for why in template_problems(tmpl):
            out.append(doc.problem(("devices", "topics", ti), f"{tmpl!r}: {why}: no NATS subject carries it",
                                   "use levels of letters, digits, '_' and '-', or engine: mosquitto"))
    for si, sub in enumerate(p.spec.ingestion.subscriptions):
        for why in template_problems(sub.topic):
            out.append(doc.problem(("ingestion", "subscriptions", si, "topic"),
                                   f"{sub.topic!r}: {why}: no NATS subject carries it",
                                   "use levels of letters, digits, '_' and '-', or engine: mosquitto"))
    for why in template_problems(p.spec.ingestion.dead_letters.topic):
        out.append(doc.problem(("ingestion", "dead_letters", "topic"), f"{why}: no NATS subject carries it",
                               "use levels of letters, digits, '_' and '-'"))
    if not out:
        for d in p.all_devices:
            try:
                device_topics(d.id, dict(d.attributes), p.spec.devices.topics)
            except (PermissionError_, ValueError) as exc:
                where = ("devices", "canary") if d is p.canary else ("devices", "registry")
                out.append(doc.problem(where, f"device {d.id!r}: {exc}",
                                       "registry values used in topics need letters, digits, '_' or '-' on nats"))
                break
    for host in hosts:
        on = p.services_on(host)
        used: dict[int, tuple[str, tuple[str | int, ...]]] = {}
        for svc in ("influxdb", "grafana"):
            if svc in on:
                used[getattr(p.spec, svc).port] = (svc, (svc, "port"))
        for r in p.replicas_on(host):
            used[p.spec.ingestion.metrics_port + r.number - 1] = (f"worker replica {r.number}'s metrics",
                                                                 ("ingestion", "metrics_port"))
        for li, lst in enumerate(b.listeners):
            used[lst.port] = (f"broker listener {li}", ("broker", "listeners", li, "port"))
        for port, what in nats.PORTS.items():
            if port in used:
                other, path = used[port]
                out.append(doc.problem(path, f"port {port} on host {host!r} is nats-server's {what}, not free for "
                                       f"{other}", "choose another port"))
    return out


def check_runtime(p: Platform, doc: Document) -> list[Problem]:
    """The container runtime: only services it supports, images pinned by digest, archives that exist."""
    from iotplat.containers.images import ImageRefError
    from iotplat.containers.runtime import IMAGE_KEYS, UNSUPPORTED, archive_source, container_services, image_ref

    out: list[Problem] = []
    rt = p.spec.runtime

    def where(svc: str) -> tuple[str, ...]:  # the line that put svc in a container (doc.problem falls back upwards)
        return ("runtime", svc) if getattr(rt, svc) is not None else ("runtime", "default")
    for name, key in IMAGE_KEYS.items():  # every pin the spec writes is checked, used or not
        if getattr(p.spec.images, key):
            try:
                image_ref(p.spec, name)
            except ImageRefError as exc:
                out.append(doc.problem(("images", key), exc.message, exc.hint))
    for svc in container_services(p):
        if svc in UNSUPPORTED:
            out.append(doc.problem(where(svc), UNSUPPORTED[svc], f"run {svc} as a package: runtime: {{default: "
                                   f"container, {svc}: package}}"))
            continue
        if svc == "influxdb" and p.spec.influxdb.version != 1:
            out.append(doc.problem(where(svc), "InfluxDB 2 in a container is not supported yet (only 1.x is)",
                                   "use influxdb.version: 1, or run influxdb as a package: runtime: {default: "
                                   "container, influxdb: package}"))
            continue
        if svc == "broker" and getattr(p.spec.broker, "engine", "mosquitto") != "mosquitto":
            out.append(doc.problem(where(svc), "only the Mosquitto broker runs in a container",
                                   "run the broker as a package: runtime: {default: container, broker: package}"))
            continue
        if not getattr(p.spec.images, IMAGE_KEYS[svc]):
            try:
                image_ref(p.spec, svc)
            except ImageRefError as exc:
                out.append(doc.problem(("images",), exc.message, exc.hint))
        source = archive_source(p, svc)
        if svc == "worker" and source is None:
            out.append(doc.problem(where(svc), "the worker's image is built by iotplat on a base image, which must be "
                                   "given as an archive", "set images.archive.worker_base to a `skopeo copy "
                                   "--preserve-digests docker://NAME@DIGEST oci-archive:FILE` archive of "
                                   "images.worker_base (default python:3.13-slim-trixie)"))
        elif source is not None and not source.is_file():
            out.append(doc.problem(("images", "archive", IMAGE_KEYS[svc]), f"{source} is not a file",
                                   "give the path of a `skopeo copy --preserve-digests docker://NAME@DIGEST "
                                   "oci-archive:FILE` archive, relative to the spec"))
    return out


MIB = 1024**2


class HostSize(NamedTuple):
    path: tuple[str, ...]  # where the spec sets it
    name: str
    memory: int  # bytes
    vcpus: int
    sizes: dict[str, SizeFacts]  # the cloud's sizes (for a larger one)


def _host_size(p: Platform, host: str) -> HostSize | None:
    """A host's size where iotplat knows it: a cloud size from its price table."""
    from iotplat.cost.table import shipped_sizes

    t = p.spec.target
    if t.kind not in ("aws", "azure"):
        return None
    key, sizes = ("instance_types", t.instance_types) if t.kind == "aws" else ("vm_sizes", t.vm_sizes)
    name = host if host in sizes else "default"
    size = sizes.get(name)
    own = shipped_sizes("aws" if t.kind == "aws" else "azure")
    facts = own.get(size) if size else None
    if size is None or facts is None:  # not a size iotplat knows (check_vm_sizes says why when it is wrong)
        return None
    return HostSize(("target", key, name), size, int(facts.memory_gib * 1024**3), facts.vcpus, own)


def check_resources(p: Platform, doc: Document) -> list[Problem]:
    """Resource limits (`resources`; a container's defaults count too): no written memory limit below the service's
    floor (runtime.memory_floor; the defaults never are), no CPU limit above the host's cores, and the memory limits
    of one host's services within its size where iotplat knows it (cloud sizes)."""
    from iotplat.containers.runtime import limited, limits_of, memory_floor
    from iotplat.cost.table import equivalent

    out: list[Problem] = []
    res = p.spec.resources
    services = [s for s in ("broker", "worker", "influxdb", "grafana") if p.placement[s] and limited(p.spec, s)]
    for svc in services:
        written = getattr(res, svc)
        floor, why = memory_floor(p, svc)
        if written is not None and written.memory is not None and written.memory < floor:
            out.append(doc.problem(("resources", svc, "memory"), f"{format_size(written.memory)} is too little: {why}",
                                   f"set it to at least {floor // MIB}MiB"))
    for host in p.host_names:
        known = _host_size(p, host)
        if known is None:
            continue
        path, size, host_memory, vcpus, own = known
        parts: list[tuple[str, int]] = []
        for svc in services:
            if host not in p.placement[svc]:
                continue
            lim = limits_of(p, svc)
            count = len(p.replicas_on(host)) if svc == "worker" else 1
            if lim.memory_bytes and count:
                label = f"worker {count} x {format_size(lim.memory_bytes)}" if svc == "worker" else \
                    f"{svc} {format_size(lim.memory_bytes)}"
                parts.append((label, count * lim.memory_bytes))
            if lim.cpus is not None and lim.cpus > vcpus:
                out.append(doc.problem(("resources", svc, "cpus"), f"{lim.cpus:g} CPUs for {svc} on host {host!r}, but {size} "
                                       f"has {vcpus} (docker refuses --cpus above the host's cores)",
                                       f"set resources.{svc}.cpus to at most {vcpus}, or choose a larger size"))
        total = sum(n for _, n in parts)
        if total > host_memory:
            facts = own[size]
            bigger = equivalent(own, vcpus=facts.vcpus, memory_gib=total / 1024**3, family=facts.family,
                                arch=facts.arch)
            written = _set_in_spec(doc, path)
            out.append(doc.problem(path if written else ("target",),
                                   f"the memory limits of the services on host {host!r} add up to "
                                   f"{format_size(total)} ({', '.join(label for label, _ in parts)}), more than "
                                   f"{size}{'' if written else f' (the default {path[1]})'} has "
                                   f"({format_size(host_memory)})",
                                   f"set {'.'.join(path)} to {bigger or 'a larger size'}, lower "
                                   "resources.<service>.memory, or place the services on more hosts"))
    return out


CHECKS: tuple[Check, ...] = (
    check_placement,
    check_ports,
    check_topics,
    check_flow_control,
    check_influxdb,
    check_target,
    check_names,
    check_measurements,
    check_topic_levels,
    check_cidr_exposure,
    check_vm_sizes,
    check_cost_settings,
    check_broker_engine,
    check_runtime,
    check_resources,
)


def run_checks(p: Platform, doc: Document) -> list[Problem]:
    out: list[Problem] = []
    for check in CHECKS:
        out.extend(check(p, doc))
    return out
