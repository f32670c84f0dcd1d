"""The price table: the shipped, dated prices.yaml plus the user's price files merged over it.

`load_table(overrides)` reads iotplat's own table and merges each override file onto it (JSON merge
patch, RFC 7396: mappings merge, lists and values replace, null removes), validating after each, so
every problem is reported in the file that caused it as `FILE:LINE:COL: path: message (hint)`.

The table also holds the VM size table (vCPUs, memory, kind, architecture per instance type / VM
size); `iotplat validate` uses the shipped one (`shipped_sizes`) and the naming rules below, so the
sizes validate accepts and the sizes cost prices come from one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from iotplat.errors import InvalidInput, Problem, SpecInvalid
from iotplat.spec.errors_map import did_you_mean
from iotplat.spec.yamlio import Document, PathT, dotted, load_yaml_file

Cloud = Literal["aws", "azure"]
CLOUDS: tuple[Cloud, ...] = ("aws", "azure")
Family = Literal["burstable", "general", "compute"]
Arch = Literal["x86_64", "arm64"]

SHIPPED = Path(__file__).resolve().parent / "prices.yaml"
MAX_PRICE_FILE = 1024 * 1024

# How each cloud names its sizes: the same rules stacks/common/iotplat_stack/config.py applies to
# `iotplat:hosts[].size` (a test keeps the two in step), so validate refuses what `pulumi up` would.
SIZE_PATTERNS: dict[Cloud, re.Pattern[str]] = {
    "aws": re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$"),
    "azure": re.compile(r"^(Standard|Basic)_[A-Za-z0-9_]+$"),
}
# The architecture of the image each stack launches (stacks/aws: the x86_64 Debian AMI; stacks/azure:
# Debian's x64 gen2 image).
STACK_ARCH: dict[Cloud, Arch] = {"aws": "x86_64", "azure": "x86_64"}



class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


Price = Annotated[float, Field(ge=0, le=1_000_000)]
SizeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
RegionName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{1,40}$")]


class SizeFacts(_Base):
    vcpus: int = Field(ge=1, le=1024)
    memory_gib: float = Field(gt=0, le=65536)
    family: Family
    arch: Arch = "x86_64"


class DiskTier(_Base):
    name: str = Field(pattern=r"^[A-Za-z0-9]{1,8}$")
    max_gib: int = Field(ge=1, le=65536)
    month: Price


class DiskPrices(_Base):
    kind: str = Field(min_length=1, max_length=40)
    per_gib_month: float | None = Field(None, ge=0, le=1000)
    tiers: list[DiskTier] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_model(self) -> DiskPrices:
        if (self.per_gib_month is None) == (self.tiers is None):
            raise ValueError("give exactly one of per_gib_month (priced per GiB) or tiers (priced per size tier)")
        if self.tiers is not None:
            sizes = [t.max_gib for t in self.tiers]
            if sizes != sorted(set(sizes)):
                raise ValueError("tiers must be listed by max_gib, smallest first, each size once")
        return self


class EgressTier(_Base):
    up_to_gb: float | None = Field(gt=0)
    per_gb: Price


class RegionPrices(_Base):
    counterpart: RegionName | None = None
    compute: dict[SizeName, Price] = Field(default_factory=dict)
    disk: DiskPrices
    public_ipv4_hour: Price
    nat_gateway_hour: Price
    nat_gateway_gb: Price
    # the broker cluster's load balancer (AWS network LB, Azure Standard LB): per hour, and per GB it carries;
    # optional, so a price file written before they existed still loads (a cluster is then not priced there)
    load_balancer_hour: Price | None = None
    load_balancer_gb: Price | None = None
    egress: list[EgressTier] = Field(min_length=1)

    @field_validator("egress")
    @classmethod
    def _tiers(cls, v: list[EgressTier]) -> list[EgressTier]:
        bounds = [t.up_to_gb for t in v]
        if bounds[-1] is not None or None in bounds[:-1]:
            raise ValueError("only the last tier has up_to_gb: null (no upper bound), and it must have it")
        finite = [b for b in bounds if b is not None]
        if finite != sorted(set(finite)):
            raise ValueError("tiers must be listed by up_to_gb, smallest first")
        return v


class CloudPrices(_Base):
    label: str = Field(min_length=1, max_length=20)
    root_disk_gib: int = Field(ge=1, le=4096)
    default_region: RegionName
    sizes: dict[SizeName, SizeFacts]
    regions: dict[RegionName, RegionPrices]

    @model_validator(mode="after")
    def _default_known(self) -> CloudPrices:
        if self.default_region not in self.regions:
            raise ValueError(f"default_region {self.default_region!r} has no prices under regions")
        return self


class BareMetalSize(_Base):
    vcpus: int = Field(ge=1, le=1024)
    memory_gib: float = Field(gt=0, le=65536)


class Assumptions(_Base):
    hours_per_month: float = Field(gt=0, le=744)
    average_rate: float = Field(gt=0, le=1)
    egress_share: float = Field(ge=0, le=10)
    nat_gb_per_private_host: float = Field(ge=0, le=1_000_000)
    bare_metal_host: BareMetalSize
    bare_metal_family: Family


class PriceTable(_Base):
    currency: Literal["USD"]
    as_of: str = Field(pattern=r"^[0-9]{4}-[0-9]{2}(-[0-9]{2})?$")
    taken: str = Field(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
    note: str = Field(min_length=1, max_length=200)
    sources: list[str] = Field(min_length=1)
    assumptions: Assumptions
    aws: CloudPrices
    azure: CloudPrices

    def cloud(self, cloud: Cloud) -> CloudPrices:
        return self.aws if cloud == "aws" else self.azure


def money(value: float) -> Decimal:
    """A price from the table as an exact decimal (the shortest repr of the float: 0.0228, not 0.02279...)."""
    return Decimal(repr(value))


# ------------------------------------------------------------------------------------------- loading


def merge_patch(base: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch (a dozen lines; no library is worth a dependency for it)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _read(path: Path, display: str) -> Document:
    if not path.exists():
        raise InvalidInput(f"{display}: no such price file (start from the layout of {SHIPPED.name} in iotplat/cost/)")
    return load_yaml_file(path, display, max_bytes=MAX_PRICE_FILE)


def _validate(data: dict[str, Any], doc: Document) -> PriceTable:
    try:
        return PriceTable.model_validate(data)
    except ValidationError as exc:
        raise SpecInvalid(_problems(exc, doc)) from None


@lru_cache(maxsize=1)
def _shipped() -> tuple[dict[str, Any], PriceTable]:
    doc = _read(SHIPPED, str(SHIPPED))
    return doc.data, _validate(doc.data, doc)


def shipped_table() -> PriceTable:
    return _shipped()[1]


def shipped_sizes(cloud: Cloud) -> dict[str, SizeFacts]:
    """The size table `iotplat validate` checks against (iotplat's own, without user overrides)."""
    return shipped_table().cloud(cloud).sizes


@dataclass(frozen=True)
class LoadedPrices:
    table: PriceTable
    overrides: tuple[str, ...]  # the price files merged over iotplat's table, in order


def load_table(overrides: list[tuple[Path, str]]) -> LoadedPrices:
    """iotplat's table with each (path, display name) merged over it in order; SpecInvalid names the file."""
    data, table = _shipped()
    for path, display in overrides:
        doc = _read(path, display)
        data = merge_patch(data, doc.data)
        table = _validate(data, doc)
    return LoadedPrices(table, tuple(display for _, display in overrides))


# ------------------------------------------------------------------------------------------- errors


_TYPE_TEXT = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _problems(exc: ValidationError, doc: Document) -> list[Problem]:
    out: list[Problem] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        key = "[key]" in loc
        path: PathT = tuple(p for p in loc if not (isinstance(p, str) and (p.startswith("function-") or p == "[key]")))
        etype = err["type"]
        ctx = err.get("ctx") or {}
        hint = ""
        if etype == "extra_forbidden":
            name = str(path[-1])
            message = f"unknown key {name!r}"
            hint = did_you_mean(name, _allowed_keys(path[:-1]))
            key = True
        elif etype == "missing":
            message = f"missing required key {str(path[-1])!r}"
            line, col = doc.where(path[:-1])
            out.append(Problem(doc.file, line, col, dotted(path), message,
                               "see iotplat/cost/prices.yaml for the layout"))
            continue
        elif etype in _TYPE_TEXT:
            message = f"expected {_TYPE_TEXT[etype]}, got {err.get('input')!r}"
        elif etype == "literal_error":
            message = f"must be one of {ctx.get('expected', '')} (got {err.get('input')!r})"
        elif etype in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
            op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[etype]
            message = f"must be {op} {next(iter(ctx.values()), '')} (got {err.get('input')!r})"
        elif etype == "string_pattern_mismatch":
            what = "name" if key else "value"
            message = f"{err.get('input')!r} is not a valid {what} here (letters, digits, '.', '_' and '-')"
        elif etype == "value_error":
            message = str(ctx.get("error") or err["msg"]).removeprefix("Value error, ")
        else:
            message = err["msg"]
        line, col = doc.where(path, key=key)
        out.append(Problem(doc.file, line, col, dotted(path), message, hint))
    return out


def _allowed_keys(path: PathT) -> list[str]:
    """Keys the price-file layout allows in the mapping at `path` (for "did you mean")."""
    schema = PriceTable.model_json_schema()
    nodes: list[dict[str, Any]] = [schema]

    def resolve(node: dict[str, Any]) -> list[dict[str, Any]]:
        if "$ref" in node:
            return resolve(schema["$defs"][node["$ref"].split("/")[-1]])
        if "anyOf" in node:
            return [n for v in node["anyOf"] for n in resolve(v)]
        return [node]

    for part in path:
        nxt: list[dict[str, Any]] = []
        for node in (n for raw in nodes for n in resolve(raw)):
            if isinstance(part, int) and "items" in node:
                nxt.append(node["items"])
            elif isinstance(part, str) and part in node.get("properties", {}):
                nxt.append(node["properties"][part])
            elif isinstance(part, str) and isinstance(node.get("additionalProperties"), dict):
                nxt.append(node["additionalProperties"])
        nodes = nxt
    keys = {k for raw in nodes for n in resolve(raw) for k in n.get("properties", {})}
    return sorted(keys)


def equivalent(sizes: dict[str, SizeFacts], *, vcpus: int, memory_gib: float, family: Family,
               arch: Arch = "x86_64") -> str | None:
    """The smallest size of the same kind and architecture with at least `vcpus` and `memory_gib`."""
    fits = [(f.vcpus, f.memory_gib, name) for name, f in sizes.items()
            if f.family == family and f.arch == arch and f.vcpus >= vcpus and f.memory_gib >= memory_gib]
    return min(fits)[2] if fits else None
