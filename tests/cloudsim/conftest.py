"""Fixtures for the emulated cloud (tests/support/cloudsim): a `pulumi` double on PATH, a file backend, keys.

Each `Sim` is one operator workspace: a copy of stacks/ (Pulumi writes Pulumi.<stack>.yaml into the project
dir, so the tests run the real programs from a copy, as the wheel would), a DIY backend dir, a passphrase
file, an SSH key pair, and the double's cloud dir. Whatever a Sim's stacks created on this machine is
removed by `purge` when the test (or module) ends, and at exit as a last resort.

Environment: IOTPLAT_CLOUDSIM_DIR (the double's machines and disks; default a temp dir under
/var/lib/iotplat/cloudsim-tests so overlayfs accepts it), IOTPLAT_CLOUDSIM_PUBLIC (default 100.80.0.0/16).
Private ranges used by the stack configs here: 10.232.0.0/16 (both clouds: the same CIDR must coexist).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from iotplat.hosts import sysutil
from tests.support.cloudsim import install_shim, purge

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "stacks" / "fixtures"
NETWORK = "10.232.0.0/16"
POOL = os.environ.get("IOTPLAT_CLOUDSIM_PUBLIC", "100.80.0.0/16")
CLOUD_ROOT = Path(os.environ.get("IOTPLAT_CLOUDSIM_DIR", "/var/lib/iotplat/cloudsim-tests"))
CREDS = {
    "aws": {"AWS_ACCESS_KEY_ID": "AKIAEMULATED0000", "AWS_SECRET_ACCESS_KEY": "emulated-secret"},
    "azure": {"ARM_CLIENT_ID": "00000000-0000-0000-0000-00000000c11e", "ARM_CLIENT_SECRET": "emulated",
              "ARM_TENANT_ID": "00000000-0000-0000-0000-0000000000aa",
              "ARM_SUBSCRIPTION_ID": "00000000-0000-0000-0000-0000000000bb"},
}
_live: list[tuple[Path, Path]] = []


def _purge_all() -> None:
    for backend, root in list(_live):
        try:
            purge(backend, root)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"cloudsim purge of {backend} failed: {exc}", file=sys.stderr)


atexit.register(_purge_all)


def why_no_cloud() -> str | None:
    if os.geteuid() != 0:
        return "the emulated cloud needs root (network namespaces, nftables, loop devices, systemd-nspawn)"
    for tool, package in (("systemd-nspawn", "systemd-container"), ("nft", "nftables"), ("mmdebstrap", "mmdebstrap"),
                          ("apt-cacher-ng", "apt-cacher-ng"), ("losetup", "mount")):
        if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin"):
            return f"{tool} not found: apt-get install {package}"
    return None


@pytest.fixture(autouse=True)
def _require_cloud(request):
    if request.node.get_closest_marker("hosts") is None:
        return
    reason = why_no_cloud()
    if reason:
        pytest.skip(reason)


@dataclass
class Sim:
    home: Path
    cloud_root: Path
    key: Path = field(init=False)
    backend: Path = field(init=False)
    stacks: Path = field(init=False)
    bin: Path = field(init=False)

    def __post_init__(self) -> None:
        self.backend = self.home / "backend"
        self.backend.mkdir(parents=True)
        self.stacks = self.home / "stacks"
        shutil.copytree(REPO / "stacks", self.stacks, ignore=shutil.ignore_patterns("__pycache__"))
        self.bin = self.home / "bin"
        install_shim(self.bin)
        self.key = self.home / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cloudsim-test", "-f", str(self.key)],
                       check=True)
        (self.home / "passphrase").write_text("correct horse battery staple\n")
        _live.append((self.backend, self.cloud_root))

    @property
    def public_key(self) -> str:
        return Path(f"{self.key}.pub").read_text().strip()

    def env(self, cloud: str, **overrides: str | None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PULUMI_", "AWS_", "ARM_", "IOTPLAT_CLOUDSIM_"))}
        env.update(PATH=f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}",
                   PULUMI_BACKEND_URL=f"file://{self.backend}",
                   PULUMI_CONFIG_PASSPHRASE_FILE=str(self.home / "passphrase"),
                   PULUMI_PYTHON_CMD=sys.executable, PULUMI_SKIP_UPDATE_CHECK="true",
                   IOTPLAT_CLOUDSIM_DIR=str(self.cloud_root), IOTPLAT_CLOUDSIM_PUBLIC=POOL, **CREDS[cloud])
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def pulumi(self, cloud: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["pulumi", *args], cwd=self.stacks / cloud, env=env or self.env(cloud),
                              capture_output=True, text=True, timeout=timeout)

    def config(self, fixture: str, name: str, **changes: Any) -> Path:
        """A stack config file from a fixture, with this Sim's key, the test network and changes applied."""
        doc = yaml.safe_load((FIXTURES / f"{fixture}.yaml").read_text())
        cfg = doc["config"]
        cfg["iotplat:networkCidr"] = NETWORK
        cfg["iotplat:adminCidrs"] = [POOL]  # the operator (this machine) has an address of the pool
        cfg["iotplat:sshPublicKey"] = self.public_key
        for key, value in changes.items():
            cfg[f"iotplat:{key}"] = value
        path = self.home / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def ssh_config(self, user: str) -> Path:
        path = self.home / f"ssh_config_{user}"
        path.write_text(
            "Host *\n"
            f"  User {user}\n  IdentityFile {self.key}\n  IdentitiesOnly yes\n  BatchMode yes\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  ConnectTimeout 5\n")
        return path

    def ssh(self, user: str, address: str, command: str, jump: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        argv = ["ssh", "-F", str(self.ssh_config(user))]
        if jump:
            argv += ["-J", jump]
        return subprocess.run([*argv, address, command], capture_output=True, text=True, timeout=timeout)


def make_sim(tmp_root: Path, cloud_root: Path | None = None) -> Sim:
    """A workspace; `cloud_root`: share another Sim's cloud dir (one machine-wide cloud, two operators)."""
    parent = CLOUD_ROOT if os.geteuid() == 0 else tmp_root.parent  # the CLI tests run without root too
    parent.mkdir(parents=True, exist_ok=True)
    cloud_root = cloud_root or Path(tempfile.mkdtemp(prefix="sim-", dir=parent))
    return Sim(home=tmp_root, cloud_root=cloud_root)


def finish_sim(sim: Sim, remove_root: bool = True) -> None:
    purge(sim.backend, sim.cloud_root)
    if (sim.backend, sim.cloud_root) in _live:
        _live.remove((sim.backend, sim.cloud_root))
    if remove_root:  # purge unmounted and removed everything of ours under it; the rest are empty dirs
        sysutil.remove_tree(sim.cloud_root)


@pytest.fixture
def sim(tmp_path: Path):
    s = make_sim(tmp_path / "sim")
    try:
        yield s
    finally:
        finish_sim(s)


def outputs(sim: Sim, cloud: str, stack: str) -> dict[str, Any]:
    done = sim.pulumi(cloud, "stack", "output", "--json", "--stack", stack)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
