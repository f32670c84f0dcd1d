"""The stack projects as the Pulumi CLI and the wheel see them, checked offline.

- Pulumi.yaml: the rules the CLI applies when it loads a project and validates a stack config
  against the project's declared config (re-stated here, since the CLI is not installed).
- Self-containment: a copy of stacks/ placed elsewhere (as inside the wheel) runs with the current
  directory set to the stack dir, in a fresh interpreter, against pulumi's mocks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from iotplat_stack import config
from stacks_harness import FIXTURES, STACKS, engine_config, load_fixture

TARGETS = ["aws", "azure"]
CLI_TYPES = {"string", "integer", "boolean", "array"}


def project(target: str) -> dict[str, Any]:
    return yaml.safe_load((STACKS / target / "Pulumi.yaml").read_text())


def cli_accepts(declared: dict[str, Any], value: Any) -> bool:
    """The CLI's check of a stack value against a typed project config declaration."""
    kind = declared["type"]
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list) and all(cli_accepts(declared["items"], item) for item in value)
    raise AssertionError(kind)


@pytest.mark.parametrize("target", TARGETS)
def test_project_file_declares_every_key_the_config_module_reads(target: str) -> None:
    doc = project(target)
    assert doc["name"] == "iotplat"  # the iotplat: namespace must be the project's own
    assert doc["runtime"]["name"] == "python" and doc["description"].strip()
    assert set(doc["config"]) == {f"iotplat:{key}" for key in config.KEYS if key not in config.OPTIONAL_KEYS}
    # an optional key stays undeclared (the CLI requires a declared key without a default) and is explained
    raw_text = (STACKS / target / "Pulumi.yaml").read_text()
    for key in config.OPTIONAL_KEYS:
        assert f"iotplat:{key} is optional" in raw_text, key
    for key, declared in doc["config"].items():
        assert declared["description"].strip(), key
        assert "default" not in declared and "value" not in declared, f"{key} must stay required"
        if "type" in declared:
            assert declared["type"] in CLI_TYPES, key
            if declared["type"] == "array":
                assert declared["items"]["type"] in CLI_TYPES, key


@pytest.mark.parametrize("fixture", ["aws-1host", "aws-3host", "azure-1host", "azure-3host"])
def test_fixture_values_pass_the_cli_type_check(fixture: str) -> None:
    declared = project(fixture.split("-")[0])["config"]
    raw = load_fixture(fixture)
    for key, decl in declared.items():
        assert key in raw, f"{fixture} lacks {key}"
        if "type" in decl:
            assert cli_accepts(decl, raw[key]), key


def test_each_stack_dir_is_a_project_and_shared_code_lives_once() -> None:
    for target in TARGETS:
        assert (STACKS / target / "Pulumi.yaml").is_file() and (STACKS / target / "__main__.py").is_file()
    assert not (STACKS / "common" / "Pulumi.yaml").exists()
    aws_modules = {p.name for p in (STACKS / "aws" / "iotplat_aws").glob("*.py")}
    azure_modules = {p.name for p in (STACKS / "azure" / "iotplat_azure").glob("*.py")}
    shared = {p.name for p in (STACKS / "common" / "iotplat_stack").glob("*.py")} - {"__init__.py"}
    assert not shared & (aws_modules | azure_modules), "config/plan code must not be copied into a stack"


CHILD = """
import json, runpy, sys
from pathlib import Path
import pulumi

class Mocks(pulumi.runtime.Mocks):
    def new_resource(self, args):
        out = dict(args.inputs)
        if args.typ in ("aws:ec2/eip:Eip", "azure-native:network:PublicIPAddress"):
            out.update(publicIp="203.0.113.10", ipAddress="203.0.113.10", allocationId="eipalloc-1")
        return args.name + "-id", out
    def call(self, args):
        if args.token == "aws:ec2/getAmi:getAmi":
            return {"id": "ami-1"}, []
        return {"names": ["zone-a"]}, []

pulumi.runtime.set_all_config(json.loads(sys.argv[1]))
pulumi.runtime.set_mocks(Mocks(), project="iotplat", stack="demo-production", preview=False)
result = {}

@pulumi.runtime.test
def program():
    runpy.run_path("__main__.py", run_name="__main__")
    outputs = pulumi.runtime.settings.get_root_resource().outputs
    return pulumi.Output.from_input(dict(outputs)).apply(result.update)

program()
here = Path.cwd().resolve()
local = {name: str(Path(m.__file__).resolve()) for name, m in sys.modules.items()
         if name.split(".")[0] in ("iotplat_stack", "iotplat_aws", "iotplat_azure")}
print(json.dumps({"outputs": result, "loaded": sorted(local.values()), "stacks": str(here.parent)}))
"""


@pytest.mark.parametrize("target", TARGETS)
def test_program_runs_from_a_copy_of_stacks_with_cwd_at_the_stack(target: str, tmp_path: Path) -> None:
    copy = tmp_path / "site-packages" / "iotplat" / "_data" / "stacks"
    shutil.copytree(STACKS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    raw = engine_config(load_fixture(f"{target}-3host"))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), json.dumps(raw)],
        cwd=copy / target,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # the program's own modules came from the copy, not from the checkout
    assert report["loaded"] and all(path.startswith(report["stacks"] + "/") for path in report["loaded"])
    assert report["stacks"] == str(copy.resolve())
    assert set(report["outputs"]["hosts"]) == {"mqtt", "tsdb", "dash"}
    assert report["outputs"]["sshJumpHost"] == "mqtt"


def test_fixtures_are_pulumi_stack_files() -> None:
    for path in FIXTURES.glob("*.yaml"):
        document = yaml.safe_load(path.read_text())
        assert set(document) == {"config"}, path.name
        assert all(":" in key for key in document["config"]), path.name
