"""Run the Pulumi programs in stacks/ against pulumi's unit-test mocks, fully offline.

No Pulumi CLI, no cloud, no credentials: ``pulumi.runtime.set_mocks`` replaces the engine, the
``RecordingMocks`` below answer resource registrations and provider calls (AMI lookup,
availability zones) with fake values and record every resource's inputs. A run therefore shows
what the program *asks for*; it cannot show what AWS or Azure would accept. The config is handed
over the way the CLI does it: plain strings, structured values as JSON text.
"""

from __future__ import annotations

import hashlib
import json
import runpy
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime import settings as pulumi_settings

# pulumi_aws announces, when the module is first loaded, a deprecated resource the stack does not
# use; load it once here, quietly, so the warning does not clutter every test run.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import pulumi_aws.ec2.encryption_control  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
STACKS = ROOT / "stacks"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The stacks' own modules, importable by the tests as the programs import them.
for _path in (STACKS / "common", STACKS / "aws", STACKS / "azure"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def load_fixture(name: str) -> dict[str, Any]:
    """The ``config:`` mapping of tests/stacks/fixtures/<name>.yaml (a Pulumi stack config file)."""
    document = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())
    return dict(document["config"])


def engine_config(raw: Mapping[str, Any]) -> dict[str, str]:
    """Config as the Pulumi CLI passes it to a program: strings, objects and lists as JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in raw.items()}


@dataclass(frozen=True)
class Recorded:
    type: str
    name: str
    inputs: dict[str, Any]


def _fake_ip(seed: str) -> str:
    return f"203.0.113.{hashlib.sha256(seed.encode()).digest()[0] % 200 + 20}"


class RecordingMocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[Recorded] = []
        self.calls: list[str] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(Recorded(args.typ, args.name, dict(args.inputs)))
        outputs = dict(args.inputs)
        resource_id = f"{args.name}-id"
        if args.typ == "aws:ebs/volume:Volume":
            resource_id = "vol-" + hashlib.sha256(args.name.encode()).hexdigest()[:17]
        elif args.typ == "aws:ec2/eip:Eip":
            outputs.update(publicIp=_fake_ip(args.name), allocationId=f"eipalloc-{args.name}")
        elif args.typ == "aws:ec2/keyPair:KeyPair":
            outputs.setdefault("keyName", args.name)
        elif args.typ in ("aws:lb/loadBalancer:LoadBalancer", "aws:lb/targetGroup:TargetGroup"):
            resource_id = f"arn:aws:elasticloadbalancing:eu-west-1:123456789012:{args.name}"
            outputs.update(arn=resource_id)
            if args.typ == "aws:lb/loadBalancer:LoadBalancer":
                outputs.update(dnsName=f"{args.inputs['name']}-0123456789abcdef.elb.eu-west-1.amazonaws.com")
        elif args.typ == "azure-native:network:PublicIPAddress":
            outputs.update(ipAddress=_fake_ip(args.name))
        elif args.typ.startswith("azure-native:"):
            resource_id = f"/subscriptions/0000/resourceGroups/rg/providers/mock/{args.name}"
        return resource_id, outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        self.calls.append(args.token)
        if args.token == "aws:ec2/getAmi:getAmi":
            return {"id": "ami-0123456789abcdef0", "name": "debian-12-amd64-20260101-0000"}, []
        if args.token == "aws:index/getAvailabilityZones:getAvailabilityZones":
            return {
                "id": "eu-west-1",
                "names": ["eu-west-1a", "eu-west-1b"],
                "zoneIds": ["euw1-az1", "euw1-az2"],
            }, []
        raise AssertionError(f"unexpected provider call {args.token}")


@dataclass
class StackRun:
    resources: list[Recorded]
    outputs: dict[str, Any] = field(default_factory=dict)

    def of_type(self, token: str) -> list[Recorded]:
        return [r for r in self.resources if r.type == token]

    def named(self, token: str, suffix: str) -> Recorded:
        matches = [r for r in self.of_type(token) if r.name.endswith(suffix)]
        assert len(matches) == 1, f"{token} *{suffix}: {[r.name for r in self.of_type(token)]}"
        return matches[0]


def run_stack(target: str, raw: Mapping[str, Any], stack: str = "demo-production") -> StackRun:
    """Run stacks/<target>/__main__.py with ``raw`` as its stack config; return what it registered."""
    mocks = RecordingMocks()
    pulumi.runtime.set_all_config(engine_config(raw))
    pulumi_settings.ROOT.set(None)  # a fresh root Stack resource for every run
    pulumi.runtime.set_mocks(mocks, project="iotplat", stack=stack, preview=False)
    run = StackRun(resources=mocks.resources)

    @pulumi.runtime.test
    def program() -> pulumi.Output[Any]:
        runpy.run_path(str(STACKS / target / "__main__.py"), run_name="__main__")
        root = pulumi_settings.get_root_resource()
        return pulumi.Output.from_input(dict(root.outputs)).apply(run.outputs.update)

    program()
    return run
