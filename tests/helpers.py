"""Helpers shared by the test modules (import as tests.helpers)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATFORM_DIR = REPO / "platform"
EXAMPLES = PLATFORM_DIR / "examples"


def run_subprocess(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                   timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iotplat.cli", *args], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_example(name: str, dest: Path) -> Path:
    shutil.copytree(EXAMPLES / name, dest / name)
    return dest / name / "platform.yaml"


def use_private_state(work: Path):
    """Point IOTPLAT_STATE_DIR and the vault key at `work` (for module-scoped fixtures, which cannot use
    monkeypatch); returns a function that restores the previous environment."""
    names = ("IOTPLAT_STATE_DIR", "IOTPLAT_VAULT_PASSWORD_FILE")
    saved = {k: os.environ.get(k) for k in names}
    key = work / "vault-key"
    key.write_text("test-module-vault-password-0123456789")
    key.chmod(0o600)
    os.environ["IOTPLAT_STATE_DIR"] = str(work / "state")
    os.environ["IOTPLAT_VAULT_PASSWORD_FILE"] = str(key)

    def restore() -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return restore


def clear_leftover_instance(instance: str) -> None:
    """Take down the local target's instance `instance` (`<platform>-<env>`) if a killed earlier run left it.

    Each host-test module owns its platform name, so an instance of that name can only be its own leftover;
    without this, `up` rightly refuses hosts that another state directory created (issue 9) and the module fails
    until someone runs the teardown by hand."""
    r = subprocess.run([sys.executable, "-m", "iotplat.hosts", "down", "--instance", instance],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"cannot take down leftover instance {instance}: {r.stderr.strip()[-500:]}")
