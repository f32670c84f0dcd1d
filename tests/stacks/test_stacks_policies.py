"""docs/policies/ (AWS IAM policy, Azure custom role) stay in step with what the stacks use.

scripts/stack_policies.py runs both stack programs under Pulumi's mocks with every fixture, collects
the resource types and provider functions they use and maps each through its table to API actions.
This test regenerates the documents and compares them with the committed files, so it fails when a
stack starts using a type the tables do not cover, when a table entry is no longer used, or when a
committed file drifts. What it cannot show: that AWS and Azure accept the policies and that the
actions suffice for a real `pulumi up` (the tables are written from the providers' documented API
calls; no cloud account is reachable here).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stack_policies", REPO / "scripts" / "stack_policies.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["stack_policies"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def policies() -> ModuleType:
    return _script()


@pytest.fixture(scope="module")
def documents(policies: ModuleType) -> dict[Path, str]:
    return policies.documents()


def test_committed_policies_are_the_generated_ones(documents: dict[Path, str]) -> None:
    assert {p.name for p in documents} == {"aws-iam-policy.json", "azure-role.json", "README.md"}
    for path, text in documents.items():
        assert path.read_text() == text, f"{path.name} drifted: run python scripts/stack_policies.py --write"


def test_every_type_the_stacks_use_is_covered(policies: ModuleType) -> None:
    for target in ("aws", "azure"):
        types, calls = policies.collect(target)
        assert types, target
        assert set(policies.TABLES[target]) - {"provider"} == types | calls
    types, calls = policies.collect("aws")
    assert {"aws:ec2/natGateway:NatGateway", "aws:ec2/getAmi:getAmi"} <= types | calls  # the 3-host fixture's NAT


def test_a_new_resource_type_stops_the_generator(policies: ModuleType) -> None:
    types, calls = policies.collect("aws")
    with pytest.raises(policies.Uncovered, match=r"stacks/aws uses aws:rds/instance:Instance, which the policy table"):
        policies.grants("aws", types | calls | {"aws:rds/instance:Instance"})


def test_an_unused_table_entry_stops_the_generator(policies: ModuleType) -> None:
    types, calls = policies.collect("azure")
    with pytest.raises(policies.Uncovered, match=r"grants azure-native:network:NatGateway, which stacks/azure no "):
        policies.grants("azure", (types | calls) - {"azure-native:network:NatGateway"})


def test_aws_policy_is_least_privilege(documents: dict[Path, str]) -> None:
    policy = json.loads(next(t for p, t in documents.items() if p.name == "aws-iam-policy.json"))
    actions = [a for s in policy["Statement"] for a in s["Action"]]
    assert all(re.fullmatch(r"(ec2|sts|elasticloadbalancing):[A-Z][A-Za-z]+", a) for a in actions), actions
    assert {s["Effect"] for s in policy["Statement"]} == {"Allow"}
    # nothing that could widen the deployer's own rights or read secrets
    assert not [a for a in actions if a.startswith(("iam:", "kms:", "ssm:", "secretsmanager:")) or "*" in a]
    assert len("".join(json.dumps(policy).split())) < 6144, "IAM managed policies hold at most 6,144 characters"


def test_azure_role_is_least_privilege(documents: dict[Path, str]) -> None:
    role = json.loads(next(t for p, t in documents.items() if p.name == "azure-role.json"))
    actions = role["Actions"]
    assert all(re.fullmatch(r"Microsoft\.(Network|Compute|Resources)/[A-Za-z/]+/(read|write|delete|action)", a)
               for a in actions), actions
    assert not [a for a in actions if "*" in a or "Authorization" in a or "beginGetAccess" in a]
    assert role["IsCustom"] is True and role["DataActions"] == [] and role["NotActions"] == []
