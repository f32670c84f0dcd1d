"""The roles' contract with the renderer, checked without hosts.

- every variable the renderer emits (group_vars and per-host inventory vars of every example spec and
  platform/platform.yaml), plus the variables of the invocation contract, that a role mentions is declared
  in that role's meta/argument_specs.yml, and every declared option has a description;
- each role has the standard files, role-prefixed defaults, and only ansible.builtin modules by FQCN;
- ansible-playbook --syntax-check passes on every rendered site.yml.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from iotplat.commands import render
from tests.helpers import EXAMPLES, PLATFORM_DIR
from tests.roles.conftest import ROLES, VENV_BIN

ROLE_NAMES = ("common", "mosquitto", "nats", "influxdb", "grafana", "worker")
SPECS = [PLATFORM_DIR / "platform.yaml", *sorted(EXAMPLES.glob("*/platform.yaml"))]
# Variables of the invocation contract (docs/roles.md): -e, the addresses inventory and secrets.yml.
CONTRACT_VARS = {"iotplat_build_dir", "iotplat_worker_wheelhouse", "iotplat_secrets", "iotplat_private_address"}
# Keyword-ish names a task file may contain that are not variables of ours.
ANSIBLE_KEYS = {"name", "when", "loop", "register", "notify", "listen", "vars", "block", "rescue", "always", "tags",
                "loop_control", "changed_when", "failed_when", "check_mode", "no_log", "diff", "become",
                "delegate_to", "ignore_errors", "until", "retries", "delay", "args", "environment", "run_once",
                "throttle"}


def _builds(tmp: Path) -> list[Path]:
    out = []
    for spec in SPECS:
        data = yaml.safe_load(spec.read_text())
        envs = sorted(data.get("environments") or {}) or [None]
        for env in envs:
            build = tmp / f"{spec.parent.name}-{env or 'default'}"
            render(str(spec), env, out_dir=str(build))
            out.append(build)
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("role-contract")
    key = base / "vault-password"
    key.write_text("static-roles-test-vault-password-0123456789\n")
    key.chmod(0o600)
    saved = {k: os.environ.get(k) for k in ("IOTPLAT_STATE_DIR", "IOTPLAT_VAULT_PASSWORD_FILE")}
    os.environ.update(IOTPLAT_STATE_DIR=str(base / "state"), IOTPLAT_VAULT_PASSWORD_FILE=str(key))
    try:
        return _builds(base)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def emitted_vars(build: Path) -> set[str]:
    names = set(yaml.safe_load((build / "ansible/group_vars/all.yml").read_text()))
    inventory = yaml.safe_load((build / "ansible/inventory.yml").read_text())
    for hv in inventory["all"]["hosts"].values():
        names |= set(hv or {})
    return {n for n in names if not n.startswith("ansible_")}


def role_text(role: str) -> str:
    parts = []
    for sub in ("tasks", "handlers", "templates", "defaults", "vars"):
        for f in sorted((ROLES / role / sub).rglob("*")):
            if f.is_file():
                parts.append(f.read_text())
    return "\n".join(parts)


def spec_options(role: str) -> dict:
    data = yaml.safe_load((ROLES / role / "meta/argument_specs.yml").read_text())
    return data["argument_specs"]["main"]["options"]


def test_every_role_has_the_standard_files() -> None:
    for role in ROLE_NAMES:
        for rel in ("defaults/main.yml", "meta/main.yml", "meta/argument_specs.yml", "tasks/main.yml"):
            assert (ROLES / role / rel).is_file(), f"roles/{role}/{rel} missing"


def test_renderer_variables_used_by_a_role_are_declared(builds: list[Path]) -> None:
    emitted = set().union(*(emitted_vars(b) for b in builds)) | CONTRACT_VARS
    missing = []
    for role in ROLE_NAMES:
        text = role_text(role)
        declared = set(spec_options(role))
        for var in sorted(emitted):
            if re.search(rf"(?<![\w.]){re.escape(var)}\b", text) and var not in declared:
                missing.append(f"{role}: {var}")
    assert not missing, "used but not declared in meta/argument_specs.yml: " + ", ".join(missing)


def test_every_declared_option_has_a_description() -> None:
    def walk(options: dict, where: str) -> list[str]:
        bad = []
        for name, spec in options.items():
            if not str(spec.get("description", "")).strip():
                bad.append(f"{where}.{name}")
            if isinstance(spec.get("options"), dict):
                bad += walk(spec["options"], f"{where}.{name}")
        return bad

    bad = [b for role in ROLE_NAMES for b in walk(spec_options(role), role)]
    assert not bad, "options without a description: " + ", ".join(bad)


def test_defaults_are_declared_and_role_prefixed() -> None:
    problems = []
    for role in ROLE_NAMES:
        defaults = yaml.safe_load((ROLES / role / "defaults/main.yml").read_text()) or {}
        declared = spec_options(role)
        for name in defaults:
            if not name.startswith(f"{role}_"):
                problems.append(f"{role}: default {name} is not prefixed {role}_")
            if name not in declared:
                problems.append(f"{role}: default {name} not in argument_specs")
    assert not problems, "; ".join(problems)


def _tasks(node) -> list[dict]:
    out = []
    if isinstance(node, list):
        for item in node:
            out += _tasks(item)
    elif isinstance(node, dict):
        out.append(node)
        for key in ("block", "rescue", "always"):
            if key in node:
                out += _tasks(node[key])
    return out


def test_only_builtin_modules_by_fqcn() -> None:
    bad = []
    for role in ROLE_NAMES:
        for sub in ("tasks", "handlers"):
            for f in sorted((ROLES / role / sub).glob("*.yml")):
                for task in _tasks(yaml.safe_load(f.read_text()) or []):
                    if any(k in task for k in ("block",)):
                        continue
                    modules = [k for k in task if k not in ANSIBLE_KEYS]
                    if len(modules) != 1 or not modules[0].startswith("ansible.builtin."):
                        bad.append(f"{f.relative_to(ROLES)}: {task.get('name')}: {modules}")
    assert not bad, "tasks not using one ansible.builtin.* module: " + "; ".join(bad)


def test_site_yml_syntax_check(builds: list[Path]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    for build in builds:
        env.update(ANSIBLE_ROLES_PATH=str(ROLES), ANSIBLE_CONFIG=str(build / "ansible/ansible.cfg"))
        proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(build / "ansible/inventory.yml"),
                               "--syntax-check", str(build / "ansible/site.yml")],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{build.name}: {proc.stdout}{proc.stderr}"


def _code(text: str) -> str:
    """Role text without comment lines (comments may name a path to explain it)."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def test_roles_read_paths_from_the_layout_table() -> None:
    """render/layout.py is the one table of host paths: the roles read it as iotplat_paths (every name they use
    exists) and never spell one of its paths themselves."""
    from iotplat.render.layout import paths

    table = paths()
    unknown, spelled = [], []
    for role in ROLE_NAMES:
        text = _code(role_text(role))
        unknown += [f"{role}: iotplat_paths.{n}" for n in sorted(set(re.findall(r"iotplat_paths\.(\w+)", text)))
                    if n not in table]
        spelled += [f"{role}: {path} ({name})" for name, path in table.items()
                    if re.search(rf"(?<![\w/.-]){re.escape(path)}(?![\w/.-])", text)]
    assert not unknown, "not in iotplat.render.layout.paths(): " + ", ".join(unknown)
    assert not spelled, "paths of the layout table spelled in a role (read iotplat_paths instead): " + ", ".join(spelled)
