"""The use case behind `iotplat cost`: a validated Platform and a price table in, a typed CostReport out.

What is counted, per target (each figure a `Line` with the quantity and unit price it came from):
- cloud (aws, azure): per host compute, root disk, data disk (`target.disk_size`), a public IPv4 address
  for each host the stacks give one; a NAT gateway (hourly, its own public address, data processed) when
  some host has none; for a broker cluster (broker.engine: nats on more than one host) the stacks' load
  balancer (hourly, its public address, the devices' bytes it carries); internet egress from the spec's
  traffic. The spec's own cloud is priced with its sizes and region; the other cloud with the equivalent
  sizes (same kind, at least as many vCPUs and as much memory) in the table's counterpart region.
- bare metal: the user's own monthly cost per host (spec `cost.hardware` or `--hardware-cost`).

Which hosts get a public address (and so whether a NAT gateway exists) is the stacks' decision
(stacks/common/iotplat_stack/plan.py: public iff an ingress rule comes from devices or admin, NAT iff
some host is not public), computed here from the same rendered ingress rules the stack config carries
(iotplat.render.engine.host_ingress). tests/cost checks it against plan.plan on the rendered config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from iotplat.cost.table import (
    CLOUDS,
    Cloud,
    CloudPrices,
    Family,
    PriceTable,
    RegionPrices,
    equivalent,
    load_table,
    money,
)
from iotplat.errors import InvalidInput
from iotplat.resources import default_spec_path
from iotplat.spec.model import AwsTarget, AzureTarget
from iotplat.spec.units import parse_size

if TYPE_CHECKING:
    from iotplat.spec.platform_model import Platform

TargetName = Literal["aws", "azure", "baremetal"]
# The ingress sources that make the stacks give a host a public address (iotplat_stack.config.Host.is_public).
PUBLIC_SOURCES = ("devices", "admin")
GB = Decimal(10**9)
GIB = 1024**3
CENT = Decimal("0.01")
NOUN = {"aws": "instance type", "azure": "VM size"}
HOW_TO_ADD = "to a price file and pass it with --prices FILE or cost.prices in the spec"


def fmt(value: Decimal) -> str:
    """A quantity as people read it: no exponent, no trailing zeros, thousands separated: 2,628,000 and 0.0228."""
    text = format(value, ",f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def cents(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Line:
    host: str | None  # None: platform-wide (NAT gateway, egress)
    item: str
    detail: str
    monthly: Decimal

    def as_dict(self) -> dict[str, object]:
        return {"host": self.host, "item": self.item, "detail": self.detail, "monthly": float(self.monthly)}


@dataclass(frozen=True)
class Option:
    """One column: the platform's monthly cost on one target (or why it cannot be given)."""

    target: TargetName
    region: str | None
    role: str  # why this column is here, e.g. "the spec's target", "equivalent sizes", "your hardware"
    spec_target: bool
    sizes: Mapping[str, str] = field(default_factory=dict)  # host -> instance type / VM size
    lines: tuple[Line, ...] = ()
    error: str | None = None

    @property
    def title(self) -> str:
        where = {"aws": "AWS", "azure": "Azure", "baremetal": "bare metal"}[self.target]
        return f"{where} {self.region}" if self.region else where

    @property
    def monthly(self) -> Decimal | None:
        return None if self.error else sum((line.monthly for line in self.lines), Decimal(0))

    def as_dict(self) -> dict[str, object]:
        total = self.monthly
        return {"target": self.target, "region": self.region, "role": self.role, "spec_target": self.spec_target,
                "sizes": dict(self.sizes), "lines": [line.as_dict() for line in self.lines],
                "monthly": None if total is None else float(total), "error": self.error}


@dataclass(frozen=True)
class Exposure:
    public: tuple[str, ...]
    private: tuple[str, ...]

    @property
    def nat_gateway(self) -> bool:
        return bool(self.private)


@dataclass(frozen=True)
class Traffic:
    peak_rate: int
    average_rate: Decimal  # messages per second
    message_bytes: int
    seconds: Decimal
    inbound_gb: Decimal
    egress_gb: Decimal


@dataclass(frozen=True)
class CostReport:
    platform: str
    environment: str
    target: str
    currency: str
    as_of: str
    taken: str
    note: str
    sources: tuple[str, ...]
    overrides: tuple[str, ...]
    exposure: Exposure
    traffic: Traffic
    options: tuple[Option, ...]
    assumptions: tuple[str, ...]
    not_counted: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        t = self.traffic
        return {
            "platform": self.platform, "environment": self.environment, "target": self.target,
            "currency": self.currency,
            "prices": {"as_of": self.as_of, "taken": self.taken, "note": self.note, "sources": list(self.sources),
                       "overrides": list(self.overrides)},
            "exposure": {"public": list(self.exposure.public), "private": list(self.exposure.private),
                         "nat_gateway": self.exposure.nat_gateway},
            "traffic": {"peak_rate": t.peak_rate, "average_rate": float(t.average_rate),
                        "message_bytes": t.message_bytes, "inbound_gb": float(cents(t.inbound_gb)),
                        "egress_gb": float(cents(t.egress_gb))},
            "options": [o.as_dict() for o in self.options],
            "assumptions": list(self.assumptions),
            "not_counted": list(self.not_counted),
        }


@dataclass(frozen=True)
class HostShape:
    """What a host needs, to find its equivalent elsewhere."""

    vcpus: int
    memory_gib: float
    family: Family
    origin: str  # where the shape came from, for the assumptions


class _Unpriced(Exception):
    """A price or size the table lacks; the message says what and how to add it."""


# ----------------------------------------------------------------------------------------- decisions


def exposure(p: Platform) -> Exposure:
    from iotplat.render.engine import host_ingress

    public = tuple(h for h in p.host_names if any(r["source"] in PUBLIC_SOURCES for r in host_ingress(p, h)))
    return Exposure(public, tuple(h for h in p.host_names if h not in public))


def load_balancer_hosts(p: Platform) -> list[str]:
    """The broker hosts behind the stacks' load balancer, as the rendered stack config names them (none: no
    load balancer)."""
    from iotplat.render.targets import broker_load_balancer

    lb = broker_load_balancer(p)
    return list(lb["hosts"]) if lb else []


def traffic(p: Platform, table: PriceTable) -> Traffic:
    a = table.assumptions
    ing = p.spec.ingestion
    rate = Decimal(ing.peak_rate) * money(a.average_rate)
    seconds = money(a.hours_per_month) * 3600
    inbound = rate * ing.typical_message * seconds / GB
    return Traffic(ing.peak_rate, rate, ing.typical_message, seconds, inbound, inbound * money(a.egress_share))


def data_disk_gib(p: Platform) -> int:
    """The data disk per host, in GiB, as the rendered stack config asks for it (diskGb)."""
    t = p.spec.target
    if isinstance(t, (AwsTarget, AzureTarget)):
        size = t.disk_size
    else:  # bare metal, local: compared with the cloud targets' default disk
        size = parse_size(AwsTarget.model_fields["disk_size"].default)
    return max(1, size // GIB)


# ----------------------------------------------------------------------------------------- pricing


def _region(cloud: Cloud, prices: CloudPrices, region: str) -> RegionPrices:
    found = prices.regions.get(region)
    if found is None:
        raise _Unpriced(f"no {cloud} prices for region {region} (the table has {', '.join(prices.regions)}): add "
                        f"{cloud}: {{regions: {{{region}: ...}}}} with the keys of iotplat/cost/prices.yaml "
                        f"{HOW_TO_ADD}")
    return found


def _disk(region: RegionPrices, gib: int) -> tuple[str, Decimal]:
    d = region.disk
    if d.per_gib_month is not None:
        return f"{d.kind} {gib} GiB x {fmt(money(d.per_gib_month))}/GiB", gib * money(d.per_gib_month)
    assert d.tiers is not None  # the table's validator guarantees one of the two
    for tier in d.tiers:
        if gib <= tier.max_gib:
            return f"{d.kind} {tier.name} ({tier.max_gib} GiB) for {gib} GiB", money(tier.month)
    raise _Unpriced(f"no {d.kind} tier holds {gib} GiB (the largest is {d.tiers[-1].max_gib} GiB): add a larger tier "
                    f"{HOW_TO_ADD}")


def _egress(region: RegionPrices, gb: Decimal) -> tuple[str, Decimal]:
    parts: list[str] = []
    total = Decimal(0)
    floor = Decimal(0)
    for tier in region.egress:
        cap = Decimal(math.inf) if tier.up_to_gb is None else money(tier.up_to_gb)
        amount = min(gb, cap) - floor
        if amount > 0:
            rate = money(tier.per_gb)
            total += amount * rate
            parts.append(f"{fmt(cents(amount))} GB free" if rate == 0 else f"{fmt(cents(amount))} GB x {fmt(rate)}/GB")
        floor = cap
        if gb <= cap:
            break
    return f"{fmt(cents(gb))} GB: " + " + ".join(parts or ["0 GB"]), total


def price_cloud(p: Platform, table: PriceTable, cloud: Cloud, region_name: str, sizes: Mapping[str, str],
                expo: Exposure, flow: Traffic) -> tuple[Line, ...]:
    prices = table.cloud(cloud)
    region = _region(cloud, prices, region_name)
    hours = money(table.assumptions.hours_per_month)
    h = fmt(hours)
    lines: list[Line] = []
    disk_gib = data_disk_gib(p)
    ip_hour = money(region.public_ipv4_hour)
    for host in p.host_names:
        size = sizes[host]
        rate = region.compute.get(size)
        if rate is None:
            add = f"{cloud}: {{regions: {{{region_name}: {{compute: {{{size}: USD_PER_HOUR}}}}}}}}"
            raise _Unpriced(f"no price for {cloud} {NOUN[cloud]} {size} in {region_name} (host {host}): add {add} "
                            f"{HOW_TO_ADD}")
        lines.append(Line(host, "compute", f"{size}: {h} h x {fmt(money(rate))}/h", cents(hours * money(rate))))
        detail, amount = _disk(region, prices.root_disk_gib)
        lines.append(Line(host, "root disk", detail, cents(amount)))
        detail, amount = _disk(region, disk_gib)
        lines.append(Line(host, "data disk", detail, cents(amount)))
        if host in expo.public:
            lines.append(Line(host, "public IPv4", f"{h} h x {fmt(ip_hour)}/h", cents(hours * ip_hour)))
    if expo.nat_gateway:
        nat_hour = money(region.nat_gateway_hour)
        lines.append(Line(None, "NAT gateway", f"{h} h x {fmt(nat_hour)}/h", cents(hours * nat_hour)))
        lines.append(Line(None, "NAT public IPv4", f"{h} h x {fmt(ip_hour)}/h", cents(hours * ip_hour)))
        gb = money(table.assumptions.nat_gb_per_private_host) * len(expo.private)
        lines.append(Line(None, "NAT data", f"{fmt(gb)} GB x {fmt(money(region.nat_gateway_gb))}/GB",
                          cents(gb * money(region.nat_gateway_gb))))
    if load_balancer_hosts(p):
        if region.load_balancer_hour is None or region.load_balancer_gb is None:
            raise _Unpriced(f"no {cloud} load balancer prices for region {region_name} (the broker cluster has one): "
                            f"add {cloud}: {{regions: {{{region_name}: {{load_balancer_hour: USD_PER_HOUR, "
                            f"load_balancer_gb: USD_PER_GB}}}}}} {HOW_TO_ADD}")
        lb_hour, lb_gb = money(region.load_balancer_hour), money(region.load_balancer_gb)
        lines.append(Line(None, "load balancer", f"{h} h x {fmt(lb_hour)}/h", cents(hours * lb_hour)))
        lines.append(Line(None, "LB public IPv4", f"{h} h x {fmt(ip_hour)}/h", cents(hours * ip_hour)))
        gb = cents(flow.inbound_gb)
        lines.append(Line(None, "LB data", f"{fmt(gb)} GB x {fmt(lb_gb)}/GB", cents(gb * lb_gb)))
    detail, amount = _egress(region, flow.egress_gb)
    lines.append(Line(None, "egress", detail, cents(amount)))
    return tuple(lines)


# ----------------------------------------------------------------------------------------- the use case


def _hardware(p: Platform, flags: Mapping[str, Decimal]) -> tuple[dict[str, Decimal], list[str]]:
    """Monthly own-hardware cost per host: --hardware-cost HOST, --hardware-cost default, spec host, spec default."""
    spec = p.spec.cost.hardware
    found: dict[str, Decimal] = {}
    missing: list[str] = []
    for host in p.host_names:
        if host in flags:
            found[host] = flags[host]
        elif "default" in flags:
            found[host] = flags["default"]
        elif host in spec or "default" in spec:
            found[host] = money((spec.get(host) or spec["default"]).monthly)
        else:
            missing.append(host)
    return found, missing


def _shapes(p: Platform, table: PriceTable) -> dict[str, HostShape | None]:
    """Each host's vCPUs/memory/kind: from its cloud size, or (bare metal, local) from cost.hardware."""
    t = p.spec.target
    out: dict[str, HostShape | None] = {}
    if t.kind in ("aws", "azure"):
        own = table.cloud(t.kind).sizes
        for host, size in _spec_sizes(p).items():
            f = own.get(size)
            out[host] = HostShape(f.vcpus, f.memory_gib, f.family, size) if f else None
        return out
    a = table.assumptions
    spec = p.spec.cost.hardware
    for host in p.host_names:
        hw = spec.get(host) or spec.get("default")
        vcpus = hw.vcpus if hw and hw.vcpus else a.bare_metal_host.vcpus
        memory = hw.memory / GIB if hw and hw.memory else a.bare_metal_host.memory_gib
        given = [k for k in ("vcpus", "memory") if hw and getattr(hw, k)]
        origin = ("cost.hardware" if len(given) == 2 else
                  f"cost.hardware ({given[0]}) and the price table's bare-metal host" if given else
                  "the price table's bare-metal host")
        out[host] = HostShape(vcpus, memory, a.bare_metal_family, origin)
    return out


def _spec_sizes(p: Platform) -> dict[str, str]:
    """Each host's size on the spec's own cloud (validate guarantees a `default` or an entry per host)."""
    t = p.spec.target
    if isinstance(t, AwsTarget):
        sizes = t.instance_types
    elif isinstance(t, AzureTarget):
        sizes = t.vm_sizes
    else:
        return {}
    return {h: sizes[h] if h in sizes else sizes["default"] for h in p.host_names}


def _spec_region(p: Platform) -> str | None:
    t = p.spec.target
    return t.region if isinstance(t, AwsTarget) else t.location if isinstance(t, AzureTarget) else None


def _equivalents(p: Platform, table: PriceTable, cloud: Cloud,
                 shapes: Mapping[str, HostShape | None]) -> dict[str, str]:
    sizes = table.cloud(cloud).sizes
    out: dict[str, str] = {}
    own = _spec_sizes(p) if p.target in CLOUDS else {}
    for host, shape in shapes.items():
        if shape is None:
            size = own[host]
            raise _Unpriced(f"no {cloud} equivalent of {size} (host {host}): it is not in the size table; add "
                            f"{p.target}: {{sizes: {{{size}: {{vcpus: N, memory_gib: N, family: "
                            f"burstable|general|compute}}}}}} {HOW_TO_ADD}")
        match = equivalent(sizes, vcpus=shape.vcpus, memory_gib=shape.memory_gib, family=shape.family)
        if match is None:
            raise _Unpriced(f"no {cloud} {shape.family} size with {shape.vcpus} vCPUs and {shape.memory_gib:g} GiB in "
                            f"the size table (host {host}): add one {HOW_TO_ADD}")
        out[host] = match
    return out


def _region_for(p: Platform, table: PriceTable, cloud: Cloud) -> tuple[str, str]:
    """(region, why) where `cloud` is priced: the spec's own, its counterpart, or the table's default."""
    kind, spec_region = p.spec.target.kind, _spec_region(p)
    if kind == cloud and spec_region:
        return spec_region, "the spec's target"
    if (kind == "aws" or kind == "azure") and spec_region:
        prices = table.cloud(kind).regions.get(spec_region)
        if prices is not None and prices.counterpart:
            return prices.counterpart, f"equivalent sizes, in the counterpart of {spec_region}"
    return table.cloud(cloud).default_region, "equivalent sizes, in the price table's default region"


def estimate(p: Platform, table: PriceTable, *, hardware: Mapping[str, Decimal] | None = None,
             overrides: tuple[str, ...] = ()) -> CostReport:
    """The monthly cost of `p` on its target and side by side on the other targets.

    A price or size missing for the spec's own target raises InvalidInput (naming it and how to add it);
    for another target it becomes that column's `error`. Nothing missing is ever priced as zero."""
    flags = dict(hardware or {})
    unknown = sorted(set(flags) - set(p.host_names) - {"default"})
    if unknown:
        raise InvalidInput(f"--hardware-cost: {unknown[0]!r} is not one of the spec's hosts "
                           f"({', '.join(p.host_names)}); write HOST=AMOUNT, or AMOUNT for every host")
    expo = exposure(p)
    flow = traffic(p, table)
    shapes = _shapes(p, table)
    options: list[Option] = []
    targets: tuple[TargetName, ...] = ("aws", "azure", "baremetal")
    order = sorted(targets, key=lambda t: t != p.target)  # the spec's own target first, the rest in this order
    for target in order:
        own = target == p.target
        if target == "baremetal":
            costs, missing = _hardware(p, flags)
            if missing:
                error = (f"no hardware cost for host(s) {', '.join(missing)}: give --hardware-cost AMOUNT "
                         "(per host and month) or cost.hardware in the spec")
                if own:
                    raise InvalidInput(f"{p.spec_file}: cost: {error}")
                options.append(Option("baremetal", None, "your hardware", own, error=error))
                continue
            lines = tuple(Line(h, "hardware", "your cost a month", cents(costs[h])) for h in p.host_names)
            options.append(Option("baremetal", None, "your hardware", own, lines=lines))
            continue
        region, role = _region_for(p, table, target)
        try:
            sizes = _spec_sizes(p) if own else _equivalents(p, table, target, shapes)
            lines = price_cloud(p, table, target, region, sizes, expo, flow)
        except _Unpriced as exc:
            if own:
                raise InvalidInput(f"{p.spec_file}: {exc}") from None
            options.append(Option(target, region, role, own, error=str(exc)))
            continue
        options.append(Option(target, region, role, own, sizes=sizes, lines=lines))
    return CostReport(
        platform=p.name, environment=p.environment, target=p.target, currency=table.currency,
        as_of=table.as_of, taken=table.taken, note=table.note, sources=tuple(table.sources), overrides=overrides,
        exposure=expo, traffic=flow, options=tuple(options),
        assumptions=_assumptions(p, table, expo, flow, shapes),
        not_counted=NOT_COUNTED,
    )


NOT_COUNTED = (
    "taxes, support plans, reserved-instance and savings-plan discounts",
    "backups and snapshots stored in the cloud, Azure Standard SSD transactions, DNS",
    "MQTT and TLS framing (only payload bytes are counted), traffic between availability zones or regions",
    "data transfer out of the NAT gateway beyond the package updates stated above",
)


def _assumptions(p: Platform, table: PriceTable, expo: Exposure, flow: Traffic,
                 shapes: Mapping[str, HostShape | None]) -> tuple[str, ...]:
    a = table.assumptions
    pct = fmt(money(a.average_rate) * 100)
    share = fmt(money(a.egress_share) * 100)
    out = [
        f"{fmt(money(a.hours_per_month))} hours a month; 1 GB = 10^9 bytes",
        "public IPv4 address for " + (", ".join(expo.public) or "no host")
        + " (an ingress rule from devices or admins); NAT gateway: "
        + (f"yes, for {', '.join(expo.private)} (no public address), with "
           f"{fmt(money(a.nat_gb_per_private_host))} GB of package updates per such host"
           if expo.nat_gateway else "none (every host has a public address)"),
        f"message rate: {pct}% of ingestion.peak_rate ({flow.peak_rate:,}/s) on average = {fmt(flow.average_rate)}/s",
        f"inbound from devices: {fmt(flow.average_rate)}/s x {flow.message_bytes} B (ingestion.typical_message) x "
        f"{fmt(flow.seconds)} s = {fmt(cents(flow.inbound_gb))} GB a month (free on AWS and Azure)",
        f"egress to the internet: {share}% of inbound = {fmt(cents(flow.egress_gb))} GB a month (acknowledgements, "
        "dashboards, API reads); the free 100 GB is counted for this platform alone (both clouds apply it per account)",
        "traffic between hosts stays on private addresses in one zone (AWS) or one virtual network (Azure): free",
        *([f"load balancer in front of the broker nodes {', '.join(load_balancer_hosts(p))} (clouds only), with its "
           "public IPv4 address, carrying the inbound bytes; AWS counts NLCUs by bytes only (1 GB an hour each): "
           "the connection dimensions (800 new or 100,000 active TCP flows per NLCU) are not counted"]
          if load_balancer_hosts(p) else []),
        f"data disk: {data_disk_gib(p)} GiB per host"
        + (" (target.disk_size)" if p.target in CLOUDS else " (the cloud targets' default disk_size)")
        + f"; root disk: {table.aws.root_disk_gib} GiB on AWS, {table.azure.root_disk_gib} GiB on Azure "
        "(the Debian images)",
        "equivalent sizes: the smallest of the same kind (burstable, general, compute) with at least as many vCPUs "
        "and as much memory",
    ]
    if p.target not in CLOUDS:
        described = "; ".join(f"{h} {s.vcpus} vCPU, {s.memory_gib:g} GiB ({s.origin})" for h, s in shapes.items() if s)
        out.append(f"hosts without a cloud size are compared as {a.bare_metal_family}-purpose sizes: {described}")
    out.append("bare metal: your cost per host and month (hardware, power, rack space, bandwidth), "
               f"in {table.currency}")
    return tuple(out)


def run(spec: str | None, env: str | None, *, prices: str | None = None,
        hardware: Mapping[str, Decimal] | None = None) -> CostReport:
    """`iotplat cost`: load the spec (default ./platform.yaml, else the shipped one), merge the price files
    (iotplat's table, then the spec's cost.prices, then `prices`), estimate."""
    from iotplat.spec.load import load_platform

    if spec:
        path, display = Path(spec), spec
    elif Path("platform.yaml").exists():
        path, display = Path("platform.yaml"), "platform.yaml"
    else:
        path = default_spec_path()
        display = str(path)
    p = load_platform(path, env, display)
    files: list[tuple[Path, str]] = []
    if p.spec.cost.prices:
        own = Path(p.spec.cost.prices)
        files.append((own if own.is_absolute() else p.spec_dir / own,
                      str(own) if own.is_absolute() else str(Path(p.spec_file).parent / own)))
    if prices:
        files.append((Path(prices), prices))
    loaded = load_table(files)
    return estimate(p, loaded.table, hardware=hardware, overrides=loaded.overrides)
