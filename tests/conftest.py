"""Shared fixtures: an isolated state root + vault key per test, and an in-process CLI runner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from iotplat.cli import main

if TYPE_CHECKING:
    from xdist.remote import Producer
    from xdist.scheduler import Scheduling


def pytest_configure(config: pytest.Config) -> None:
    # Every ansible-playbook the tests start (through `iotplat up` or directly): a hung task fails by
    # name after 5 minutes (the rendered ansible.cfg allows 20), so a CI report says which task hung.
    os.environ.setdefault("ANSIBLE_TASK_TIMEOUT", "300")


# Folders whose modules share one test network (their conftest's) or one machine-wide engine, and modules that share
# a folder's: under pytest-xdist each such set runs one module after the other in one worker. The emulated clouds
# of tests/cloudsim and tests/deploy/test_clouds.py share the public network (100.80.0.0/16) of the cloud double.
SHARED_FOLDERS = ("cloudsim", "containers", "hosts")
SHARED_MODULES = {"tests/deploy/test_clouds.py": "cloudsim"}


def xdist_group(nodeid: str) -> str:
    """The group a test runs in under `--dist loadgroup`: its module, or the shared set its module belongs to."""
    path = nodeid.split("::", 1)[0]
    parts = path.split("/")
    if path in SHARED_MODULES:
        return SHARED_MODULES[path]
    if len(parts) > 2 and parts[0] == "tests" and parts[1] in SHARED_FOLDERS:
        return parts[1]
    return path


def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> Scheduling | None:
    """`.ci/run` runs the suite in two pytest-xdist workers (`--dist loadgroup`): most of its time is spent waiting on
    hosts, not computing. A module's tests (and its module-scoped platform) stay in one worker, and so do the modules
    of a shared set (``xdist_group``); each other host module has a network and a platform name of its own.
    xdist's own loadgroup reads `xdist_group` marks by renaming the test ids, which pytest 9.2 no longer lets it do,
    so the groups come from the test ids here, through xdist's scope scheduler (its documented extension hook)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    return ByGroup(config, log)


@pytest.fixture(autouse=True)
def isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own state root and vault key; nothing touches ~/.local or ~/.config."""
    base = tmp_path_factory.mktemp("iotplat-state")
    key = base / "vault-password"
    key.write_text("test-vault-password-0123456789abcdef\n")
    key.chmod(0o600)
    monkeypatch.setenv("IOTPLAT_STATE_DIR", str(base / "state"))
    monkeypatch.setenv("IOTPLAT_VAULT_PASSWORD_FILE", str(key))
    monkeypatch.delenv("IOTPLAT_ENV", raising=False)
    return base / "state"


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    def run(*args: str) -> CliResult:
        code = main(list(args))
        captured = capsys.readouterr()
        return CliResult(int(code), captured.out, captured.err)

    return run
