"""The `pulumi` double's CLI contract and failure modes, without materialising anything (no root needed).

Runs the REAL stacks/aws and stacks/azure programs (copies) under Pulumi's mock runtime through the double.
What it proves: the commands, flags, exit codes and output shapes iotplat relies on, the failures a user
meets (no credentials, no passphrase, no Pulumi SDK in the interpreter, a config the program refuses) end as
Pulumi 3.x ends them. What it cannot: that the real CLI words every message exactly so (the texts were taken
from Pulumi's and the providers' sources and issues), or anything the real providers check beyond the table
in tests/support/cloudsim/_providers.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from .conftest import Sim

STACK = "demo-production"


def test_version_and_empty_backend(sim: Sim) -> None:
    done = sim.pulumi("aws", "version")
    assert done.returncode == 0 and done.stdout.strip().startswith("v3.")
    done = sim.pulumi("aws", "stack", "ls", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == []
    done = sim.pulumi("aws", "stack", "select", STACK)
    assert done.returncode == 255 and f"error: no stack named '{STACK}' found" in done.stderr


def test_stack_lifecycle_without_resources(sim: Sim) -> None:
    done = sim.pulumi("aws", "stack", "select", "--create", STACK)
    assert done.returncode == 0, done.stderr
    stacks = json.loads(sim.pulumi("aws", "stack", "ls", "--json").stdout)
    assert [(s["name"], s["current"], s["resourceCount"]) for s in stacks] == [(STACK, True, 0)]
    assert set(stacks[0]) <= {"name", "current", "lastUpdate", "updateInProgress", "resourceCount", "url"}
    # as Pulumi does: the new stack's secrets manager (salt) is written into the project dir
    assert "encryptionsalt: v1:" in (sim.stacks / "aws" / f"Pulumi.{STACK}.yaml").read_text()
    out = sim.pulumi("aws", "stack", "output", "--json", "--stack", STACK)
    assert out.returncode == 0 and json.loads(out.stdout) == {}
    assert sim.pulumi("aws", "stack", "rm", "--yes", STACK).returncode == 0
    assert json.loads(sim.pulumi("aws", "stack", "ls", "--json").stdout) == []
    assert not (sim.stacks / "aws" / f"Pulumi.{STACK}.yaml").exists()


def test_first_preview_is_all_creates_and_writes_the_salt_into_the_config_file(sim: Sim) -> None:
    cfg = sim.config("aws-3host", "aws")
    assert sim.pulumi("aws", "stack", "select", "--create", STACK).returncode == 0
    done = sim.pulumi("aws", "preview", "--stack", STACK, "--config-file", str(cfg), "--json", "--diff")
    assert done.returncode == 0, done.stderr
    digest = json.loads(done.stdout)
    ops = {s["op"] for s in digest["steps"]}
    assert ops == {"create"}
    assert set(digest["changeSummary"]) == {"create"}
    assert digest["changeSummary"]["create"] == len(digest["steps"]) > 40
    types = {s["newState"]["type"] for s in digest["steps"]}
    assert {"pulumi:pulumi:Stack", "aws:ec2/instance:Instance", "aws:ebs/volume:Volume",
            "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"} <= types
    assert not any(t.startswith("pulumi:providers:") for t in types)  # default providers are never shown
    instance = next(s for s in digest["steps"] if s["newState"]["type"] == "aws:ec2/instance:Instance")
    # values that come from resources not created yet are unknown in a preview, as Pulumi shows them
    assert instance["newState"]["inputs"]["subnetId"] == "04da6b54-80e4-46f7-96ec-b56ff0331ba9"
    # real Pulumi writes the secrets manager into the --config-file file that has none (pulumi/pulumi#11220)
    assert cfg.read_text().startswith("encryptionsalt: v1:")
    assert sim.pulumi("aws", "stack", "ls", "--json").returncode == 0


def test_program_error_ends_with_its_message_and_exit_255(sim: Sim) -> None:
    cfg = sim.config("aws-1host", "bad", adminCidrs=["0.0.0.0/0"])
    assert sim.pulumi("aws", "stack", "select", "--create", STACK).returncode == 0
    done = sim.pulumi("aws", "preview", "--stack", STACK, "--config-file", str(cfg), "--json")
    assert done.returncode == 255
    line = "iotplat:adminCidrs[0]: 0.0.0.0/0 would open SSH (22) to the whole internet"
    digest = json.loads(done.stdout)
    assert any(line in d["message"] and d["severity"] == "error" for d in digest["diagnostics"])
    assert line in done.stderr and "Traceback" not in done.stderr  # a RunError: no traceback
    up = sim.pulumi("aws", "up", "--yes", "--skip-preview", "--stack", STACK, "--config-file", str(cfg))
    assert up.returncode == 255 and line in up.stderr


@pytest.mark.parametrize("cloud", ["aws", "azure"])
def test_a_broker_load_balancer_is_refused_in_the_preview(sim: Sim, cloud: str) -> None:
    """The emulated cloud has no load balancer: a cluster's stack stops at its preview with one clear line."""
    cfg = sim.config(f"{cloud}-cluster", "cluster")
    assert sim.pulumi(cloud, "stack", "select", "--create", STACK).returncode == 0
    done = sim.pulumi(cloud, "preview", "--stack", STACK, "--config-file", str(cfg), "--json")
    assert done.returncode == 255
    assert "load balancers are not emulated: a NATS broker cluster on aws/azure" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("cloud,fixture,unset,needle", [
    ("aws", "aws-1host", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"),
     "pulumi:providers:aws resource 'default_"),
    ("azure", "azure-1host", ("ARM_CLIENT_SECRET",), "pulumi:providers:azure-native resource 'default_"),
])
def test_no_credentials(sim: Sim, cloud: str, fixture: str, unset: tuple[str, ...], needle: str) -> None:
    cfg = sim.config(fixture, cloud)
    env = sim.env(cloud, **{k: None for k in unset})
    assert sim.pulumi(cloud, "stack", "select", "--create", STACK, env=env).returncode == 0
    for args in (("preview", "--json"), ("up", "--yes", "--skip-preview")):
        done = sim.pulumi(cloud, *args, "--stack", STACK, "--config-file", str(cfg), env=env)
        assert done.returncode == 255, done.stdout
        assert needle in done.stderr
        assert ("No valid credential sources found" if cloud == "aws" else "ARM_CLIENT_SECRET") in done.stderr
    assert not any(r["type"].startswith("aws:ec2") or r["type"].startswith("azure-native:compute")
                   for r in _state(sim, STACK))


def test_aws_profile_alone_is_a_credential(sim: Sim) -> None:
    cfg = sim.config("aws-1host", "aws")
    env = sim.env("aws", AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None, AWS_PROFILE="ops")
    assert sim.pulumi("aws", "stack", "select", "--create", STACK, env=env).returncode == 0
    done = sim.pulumi("aws", "preview", "--json", "--stack", STACK, "--config-file", str(cfg), env=env)
    assert done.returncode == 0, done.stderr


def test_passphrase_missing_unreadable_and_wrong(sim: Sim) -> None:
    cfg = sim.config("aws-1host", "aws")
    none = sim.env("aws", PULUMI_CONFIG_PASSPHRASE_FILE=None)
    done = sim.pulumi("aws", "stack", "select", "--create", STACK, env=none)
    assert done.returncode == 255
    assert ("passphrase must be set with PULUMI_CONFIG_PASSPHRASE or PULUMI_CONFIG_PASSPHRASE_FILE environment "
            "variables") in done.stderr
    missing = sim.env("aws", PULUMI_CONFIG_PASSPHRASE_FILE=str(sim.home / "nope"))
    done = sim.pulumi("aws", "stack", "select", "--create", STACK, env=missing)
    assert done.returncode == 255 and "unable to read PULUMI_CONFIG_PASSPHRASE_FILE" in done.stderr
    assert sim.pulumi("aws", "stack", "select", "--create", STACK).returncode == 0
    assert sim.pulumi("aws", "preview", "--json", "--stack", STACK, "--config-file", str(cfg)).returncode == 0
    for env in (none, missing):
        done = sim.pulumi("aws", "preview", "--json", "--stack", STACK, "--config-file", str(cfg), env=env)
        assert done.returncode == 255 and "PULUMI_CONFIG_PASSPHRASE" in done.stderr
    wrong = sim.env("aws", PULUMI_CONFIG_PASSPHRASE="not the passphrase")
    done = sim.pulumi("aws", "up", "--yes", "--skip-preview", "--stack", STACK, "--config-file", str(cfg), env=wrong)
    assert done.returncode == 255 and "incorrect passphrase" in done.stderr


def test_python_cmd_unset_uses_python3_from_path(sim: Sim, tmp_path: Path) -> None:
    """Without PULUMI_PYTHON_CMD Pulumi runs `python3` from PATH; one without the SDK fails as the language host
    does. The interpreter is this machine's /usr/bin/python3 (no pulumi installed there) via a PATH dir."""
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    system_python = "/usr/bin/python3"
    check = os.popen(f"{system_python} -c 'import pulumi' 2>&1").read()
    if "No module named" not in check:
        pytest.skip(f"{system_python} has pulumi installed; no interpreter without the SDK to show the failure")
    (bare / "python3").symlink_to(system_python)
    cfg = sim.config("aws-1host", "aws")
    env = sim.env("aws", PULUMI_PYTHON_CMD=None)
    env["PATH"] = f"{sim.bin}:{bare}:/usr/sbin:/sbin"
    assert sim.pulumi("aws", "stack", "select", "--create", STACK, env=env).returncode == 0
    done = sim.pulumi("aws", "preview", "--json", "--stack", STACK, "--config-file", str(cfg), env=env)
    assert done.returncode == 255
    assert "ModuleNotFoundError: No module named 'pulumi'" in done.stderr
    assert "It looks like the Pulumi SDK has not been installed" in done.stderr
    env["PULUMI_PYTHON_CMD"] = sys.executable  # the same call with the venv's interpreter works
    assert sim.pulumi("aws", "preview", "--json", "--stack", STACK, "--config-file", str(cfg), env=env).returncode == 0


def test_up_needs_yes_and_unknown_things_are_errors(sim: Sim) -> None:
    assert sim.pulumi("aws", "stack", "select", "--create", STACK).returncode == 0
    done = sim.pulumi("aws", "up", "--stack", STACK)
    assert done.returncode == 255 and "--yes or --skip-preview must be passed" in done.stderr
    done = sim.pulumi("aws", "frobnicate")
    assert done.returncode == 255 and 'unknown command "frobnicate"' in done.stderr
    done = sim.pulumi("aws", "preview", "--no-such-flag")
    assert done.returncode == 255 and "unknown flag: --no-such-flag" in done.stderr
    env = sim.env("aws", PULUMI_BACKEND_URL=None)
    done = sim.pulumi("aws", "stack", "ls", "--json", env=env)
    assert done.returncode == 255 and "PULUMI_ACCESS_TOKEN must be set" in done.stderr


def _state(sim: Sim, stack: str) -> list[dict]:
    path = sim.backend / ".pulumi" / "stacks" / "iotplat" / f"{stack}.json"
    return json.loads(path.read_text())["checkpoint"]["latest"]["resources"]
