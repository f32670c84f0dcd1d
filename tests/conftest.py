"""Shared fixtures: an isolated state root + vault key per test, and an in-process CLI runner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from iotplat.cli import main


def pytest_configure(config: pytest.Config) -> None:
    # Every ansible-playbook the tests start (through `iotplat up` or directly): a hung task fails by
    # name after 5 minutes (the rendered ansible.cfg allows 20), so a CI report says which task hung.
    os.environ.setdefault("ANSIBLE_TASK_TIMEOUT", "300")


# Folders whose modules share one test network (their conftest's) or one machine-wide engine: under pytest-xdist
# their modules run one after the other in one worker.
SHARED_FOLDERS = ("cloudsim", "containers", "hosts")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`.ci/run` runs the suite in two pytest-xdist workers (`--dist loadgroup`): most of its time is spent waiting on
    hosts, not computing. Every test gets a group, so a module's tests (and its module-scoped platform) stay in one
    worker: the module is the group, or its folder when the folder's modules share a network (SHARED_FOLDERS); each
    host module has its own network and platform name otherwise."""
    root = Path(__file__).resolve().parent
    for item in items:
        rel = Path(str(item.path)).resolve().relative_to(root)
        group = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in SHARED_FOLDERS else rel.as_posix()
        item.add_marker(pytest.mark.xdist_group(group))


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
