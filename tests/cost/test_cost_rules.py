"""The rules behind the figures: the shipped table is whole and consistent, the exposure (public address,
NAT gateway) is the one the stacks plan from the rendered stack config, egress tiers add up, removed
prices become errors (never zeros), and the CLI's flags fail as invalid input."""

from __future__ import annotations

import shutil
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from iotplat.cost import table as price_table
from iotplat.cost.estimate import _egress, estimate, exposure
from iotplat.cost.table import CLOUDS, load_table, shipped_table
from iotplat.errors import InvalidInput
from iotplat.spec.load import load_platform
from tests.helpers import EXAMPLES, REPO

CASES = Path(__file__).parent / "cases"


# ------------------------------------------------------------------------------------- the shipped table


def test_the_shipped_table_is_dated_and_says_to_verify() -> None:
    t = shipped_table()
    assert t.note == f"list prices as of {t.as_of}, verify before you rely on it"
    assert len(t.sources) >= 9 and all("https://" in s for s in t.sources)
    assert "PROVENANCE" in price_table.SHIPPED.read_text()


@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_size_is_priced_in_every_region_and_every_price_has_a_size(cloud: str) -> None:
    prices = shipped_table().cloud(cloud)  # type: ignore[arg-type]
    for name, region in prices.regions.items():
        assert set(region.compute) == set(prices.sizes), name
        assert all(v > 0 for v in region.compute.values()), name
        assert region.egress[0].per_gb == 0 and region.egress[0].up_to_gb == 100, "the first 100 GB are free"


@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_counterpart_region_has_prices(cloud: str) -> None:
    t = shipped_table()
    other = "azure" if cloud == "aws" else "aws"
    for name, region in t.cloud(cloud).regions.items():  # type: ignore[arg-type]
        assert region.counterpart in t.cloud(other).regions, name  # type: ignore[arg-type]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_x86_size_has_an_equivalent_on_the_other_cloud(cloud: str) -> None:
    t = shipped_table()
    other = t.cloud("azure" if cloud == "aws" else "aws")
    for name, facts in t.cloud(cloud).sizes.items():  # type: ignore[arg-type]
        if facts.arch == "x86_64":
            match = price_table.equivalent(other.sizes, vcpus=facts.vcpus, memory_gib=facts.memory_gib,
                                           family=facts.family)
            assert match is not None, name
            assert other.sizes[match].vcpus >= facts.vcpus and other.sizes[match].memory_gib >= facts.memory_gib


# ------------------------------------------------------------------------------------- exposure = the stacks'


def _render_stack_config(cli, spec: Path, out: Path, kind: str) -> dict:
    result = cli("render", str(spec), "--out", str(out))
    assert result.code == 0, result.err
    (config_file,) = (out / "pulumi" / kind).glob("Pulumi.*.yaml")
    return yaml.safe_load(config_file.read_text())["config"]


def _private_host_spec(tmp_path: Path, kind: str) -> Path:
    """The overrides case (tsdb runs InfluxDB only: no public address, so a NAT gateway), on `kind`."""
    folder = tmp_path / kind
    folder.mkdir()
    text = (CASES / "spec_and_flag_overrides" / "platform.yaml").read_text()
    text = text.replace("  prices: team-prices.yaml\n", "  prices: null\n")
    text = text.replace("tsdb: r6i.large", "tsdb: m6i.large")
    if kind == "azure":
        text = text.replace("kind: aws\n  region: eu-west-1", "kind: azure\n  location: westeurope")
        text = text.replace("instance_types: {default: t3.small, tsdb: m6i.large}", "vm_sizes: {default: Standard_B2s}")
    (folder / "platform.yaml").write_text(text)
    shutil.copy(EXAMPLES / "aws" / "id_ed25519.pub", folder / "key.pub")
    return folder / "platform.yaml"


@pytest.mark.parametrize("which", ["aws-example", "azure-example", "aws-private-host", "azure-private-host"])
def test_public_addresses_and_nat_are_what_the_stack_plans(which: str, cli, tmp_path: Path) -> None:
    """Render the spec, plan the rendered stack config with the stacks' own planner, compare."""
    pytest.importorskip("pulumi")
    common = str(REPO / "stacks" / "common")
    if common not in sys.path:
        sys.path.insert(0, common)
    from iotplat_stack import config as stack_config
    from iotplat_stack import plan as stack_plan

    kind, variant = which.split("-", 1)
    spec = EXAMPLES / kind / "platform.yaml" if variant == "example" else _private_host_spec(tmp_path, kind)
    raw = _render_stack_config(cli, spec, tmp_path / "build", kind)
    layout = stack_plan.plan(stack_config.parse(raw, kind), private_subnet=kind == "aws", max_rules_per_direction=60)

    platform = load_platform(spec)
    expo = exposure(platform)
    assert set(expo.public) == {h.name for h in layout.hosts if h.public}
    assert set(expo.private) == {h.name for h in layout.hosts if not h.public}
    assert expo.nat_gateway == layout.needs_nat
    if variant == "private-host":
        assert expo.nat_gateway
    # the sizes and data disks priced are the ones the stack config asks for
    own = estimate(platform, shipped_table(), hardware={"default": Decimal(1)}).options[0]
    assert own.target == kind and own.error is None
    assert dict(own.sizes) == {h["name"]: h["size"] for h in raw["iotplat:hosts"]}
    disk_lines = [line.detail for line in own.lines if line.item == "data disk"]
    assert [f"{h['diskGb']} GiB" in d for h, d in zip(raw["iotplat:hosts"], disk_lines, strict=True)] == \
        [True] * len(raw["iotplat:hosts"])
    public_ip_hosts = {line.host for line in own.lines if line.item == "public IPv4"}
    assert public_ip_hosts == set(expo.public)
    assert any(line.item == "NAT gateway" for line in own.lines) == layout.needs_nat


# ------------------------------------------------------------------------------------- arithmetic and errors


def test_egress_tiers_add_up() -> None:
    region = shipped_table().aws.regions["us-east-1"]
    assert _egress(region, Decimal(100))[1] == 0
    detail, amount = _egress(region, Decimal(60_000))
    # 100 free, 10,140 x 0.09, 40,960 x 0.085, 8,800 x 0.07
    expected = Decimal(10_140) * Decimal("0.09") + Decimal(40_960) * Decimal("0.085") + Decimal(8_800) * Decimal("0.07")
    assert amount == expected
    assert detail == "60,000 GB: 100 GB free + 10,140 GB x 0.09/GB + 40,960 GB x 0.085/GB + 8,800 GB x 0.07/GB"


def test_a_price_removed_by_a_price_file_is_an_error_not_a_zero(cli, tmp_path: Path) -> None:
    override = tmp_path / "prices.yaml"
    override.write_text("aws:\n  regions:\n    eu-west-1:\n      compute:\n        t3.small: null\n")
    result = cli("cost", str(EXAMPLES / "aws" / "platform.yaml"), "--prices", str(override))
    assert result.code == 2
    assert "no price for aws instance type t3.small in eu-west-1 (host edge)" in result.err
    assert load_table([(override, "prices.yaml")]).overrides == ("prices.yaml",)


def test_a_missing_comparison_is_reported_not_zeroed(tmp_path: Path) -> None:
    override = tmp_path / "prices.yaml"
    override.write_text("azure:\n  regions:\n    northeurope:\n      compute:\n        Standard_B2s: null\n")
    platform = load_platform(EXAMPLES / "aws" / "platform.yaml")
    report = estimate(platform, load_table([(override, "prices.yaml")]).table)
    azure = next(o for o in report.options if o.target == "azure")
    assert azure.monthly is None and azure.lines == ()
    assert azure.error and "no price for azure VM size Standard_B2s in northeurope" in azure.error
    assert report.as_dict()["options"][1]["monthly"] is None  # type: ignore[index]


def test_unknown_host_in_hardware_cost_is_invalid_input(cli) -> None:
    result = cli("cost", str(EXAMPLES / "aws" / "platform.yaml"), "--hardware-cost", "tdsb=80")
    assert result.code == 2
    assert result.err == ("iotplat: error: --hardware-cost: 'tdsb' is not one of the spec's hosts (edge, tsdb); "
                          "write HOST=AMOUNT, or AMOUNT for every host\n")


@pytest.mark.parametrize("value", ["-5", "abc", "edge=", "nan", "1e9"])
def test_bad_hardware_cost_values_exit_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from iotplat.cli import main

    code = main(["cost", str(EXAMPLES / "aws" / "platform.yaml"), "--hardware-cost", value])
    assert code == 2  # a usage error: main returns it (no SystemExit), with one line on stderr
    assert "write AMOUNT or HOST=AMOUNT" in capsys.readouterr().err


def test_the_spec_price_file_is_read_relative_to_the_spec(cli, tmp_path: Path) -> None:
    case = tmp_path / "case"
    shutil.copytree(CASES / "spec_and_flag_overrides", case)
    result = cli("cost", str(case / "platform.yaml"), "--json")
    assert result.code == 0, result.err
    assert f"{case}/team-prices.yaml" in result.out


def test_the_readme_example_is_true(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (REPO / "README.md").read_text()
    block = readme.split("$ iotplat cost ", 1)[1].split("```", 1)[0].splitlines()
    args, shown = block[0].split(), [line for line in block[1:] if line and line != "..."]
    monkeypatch.chdir(REPO)
    result = cli("cost", *args)
    assert result.code == 0, result.err
    assert shown and all(line in result.out.splitlines() for line in shown), shown


# ------------------------------------------------------------------------------------- the broker load balancer


def test_a_broker_cluster_pays_for_the_stacks_load_balancer_and_one_node_does_not(tmp_path: Path) -> None:
    """The load balancer lines appear exactly when the rendered stack config has iotplat:brokerLoadBalancer, and
    a region without load balancer prices (an older price file) says what to add instead of pricing it at 0."""
    cluster = load_platform(CASES / "aws_nats_cluster" / "platform.yaml")
    table = shipped_table()
    own = estimate(cluster, table).options[0]
    items = [line.item for line in own.lines if line.host is None]
    assert items[:3] == ["load balancer", "LB public IPv4", "LB data"]
    assert own.lines[-4].monthly == Decimal("18.40")  # 730 h x 0.0252/h, eu-west-1
    assert all(o.error is None and [ln.item for ln in o.lines].count("load balancer") == 1
               for o in estimate(cluster, table).options if o.target != "baremetal")

    text = (CASES / "aws_nats_cluster" / "platform.yaml").read_text()
    text = text.replace("  nodes: 3\n", "  nodes: 1\n").replace("services: [broker, worker]\n", "services: [worker]\n")
    (tmp_path / "platform.yaml").write_text(text.replace("services: [broker]\n", "services: [worker]\n"))
    single = estimate(load_platform(tmp_path / "platform.yaml"), table).options[0]
    assert single.error is None and not [ln for ln in single.lines if "load balancer" in ln.item or "LB" in ln.item]

    region = table.aws.regions["eu-west-1"].model_copy(update={"load_balancer_hour": None})
    old = table.model_copy(update={"aws": table.aws.model_copy(update={"regions": {"eu-west-1": region}})})
    with pytest.raises(InvalidInput, match=r"no aws load balancer prices for region eu-west-1 \(the broker cluster has "
                                        r"one\): add aws: \{regions: \{eu-west-1: \{load_balancer_hour"):
        estimate(cluster, old)
