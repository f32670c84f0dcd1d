"""Deploy-test helpers for the Ansible roles: render a spec, bring up throw-away local hosts, and run
site.yml exactly as `iotplat up` does (see docs/roles.md "The invocation contract").

Environment:
  IOTPLAT_ROLES_TEST_NETWORK  private /24 for the role tests' hosts (default 10.215.0.0/24; the host
                              tests use 10.213.0.0/24, so both can run on one machine)
  IOTPLAT_TEST_STATE_DIR      local-target state dir (default /var/lib/iotplat/local: shares the base image)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from iotplat.deploy.ansible import parse_recap  # the one PLAY RECAP parser: PlaybookRun.recap comes from it

REPO = Path(__file__).resolve().parents[2]
ROLES = REPO / "roles"
VENV_BIN = Path(sys.executable).parent
NETWORK = os.environ.get("IOTPLAT_ROLES_TEST_NETWORK", "10.215.0.0/24")
STATE_DIR = Path(os.environ.get("IOTPLAT_TEST_STATE_DIR", "/var/lib/iotplat/local"))


def why_not_runnable() -> str | None:
    if os.geteuid() != 0:
        return "local hosts need root (network namespaces, overlay mounts, systemd-nspawn)"
    if not shutil.which("systemd-nspawn"):
        return "systemd-nspawn not found: apt-get install systemd-container"
    if not (VENV_BIN / "ansible-playbook").exists():
        return f"ansible-playbook not found next to {sys.executable}"
    return None


@pytest.fixture(autouse=True)
def _require_nspawn(request):
    if request.node.get_closest_marker("hosts") is None:
        return
    reason = why_not_runnable()
    if reason:
        pytest.skip(reason)


# ---------------------------------------------------------------------------------------------- results
@dataclass
class PlaybookRun:
    argv: list[str]
    returncode: int
    output: str
    recap: dict[str, dict[str, int]]
    seconds: float = 0.0

    def total(self, what: str) -> int:
        return sum(counts.get(what, 0) for counts in self.recap.values())

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-lines:])

    def changed_tasks(self) -> list[str]:
        """Names of the tasks that reported `changed` (for assertion messages)."""
        out, task = [], ""
        for line in self.output.splitlines():
            if line.startswith("TASK ["):
                task = line[6:].split("]")[0]
            elif line.startswith("changed:"):
                out.append(f"{task}: {line[:120]}")
        return out


# ---------------------------------------------------------------------------------------------- deployment
@dataclass
class Deployment:
    """One rendered platform on throw-away hosts, and the exact ansible-playbook invocation of `iotplat up`."""

    spec: Path
    work: Path
    build: Path
    state_root: Path
    key_file: Path
    wheelhouse: Path
    instance: str
    network: str = NETWORK
    hosts: dict = field(default_factory=dict)  # name -> iotplat.hosts.Host
    provider: object = None
    platform: object = None
    materials: object = None
    manifest: dict = field(default_factory=dict)

    @property
    def addresses_file(self) -> Path:
        return self.work / "addresses.yml"

    @property
    def secrets_file(self) -> Path:
        return self.work / "secrets.yml"

    def render(self) -> None:
        from iotplat.commands import render
        from iotplat.secrets.materials import ensure_materials
        from iotplat.secrets.state import State
        from iotplat.spec.load import load_platform

        saved = os.environ.get("IOTPLAT_VAULT_PASSWORD_FILE")
        os.environ["IOTPLAT_VAULT_PASSWORD_FILE"] = str(self.key_file)
        try:
            render(str(self.spec), None, out_dir=str(self.build), state_dir=str(self.state_root))
            self.platform = load_platform(self.spec)
            self.materials = ensure_materials(
                self.platform, State.open(self.state_root, self.platform.name, self.platform.environment))
        finally:
            if saved is None:
                os.environ.pop("IOTPLAT_VAULT_PASSWORD_FILE", None)
            else:
                os.environ["IOTPLAT_VAULT_PASSWORD_FILE"] = saved
        self.manifest = json.loads((self.build / "manifest.json").read_text())

    def write_secrets(self, path: Path | None = None, extra: tuple[str, ...] = ()) -> Path:
        """secrets.yml: one vault-encrypted variable `iotplat_secrets` {manifest secret name: content}
        (plus the named `extra` service secrets, for tests that switch a role to another mode)."""
        from iotplat.secrets.materials import secret_content
        from iotplat.secrets.vault import Vault

        names = sorted({f["secret"] for f in self.manifest["files"] if f["class"] == "secret"} | set(extra))
        data = {"iotplat_secrets": {n: secret_content(n, self.materials).decode() for n in names}}
        text = yaml.safe_dump(data, default_flow_style=False).encode()
        path = path or self.secrets_file
        path.write_bytes(Vault(self.key_file.read_bytes().strip()).encrypt(text))
        path.chmod(0o600)
        return path

    def up(self) -> None:
        from iotplat.hosts import LocalSettings, local_provider

        settings = LocalSettings(instance=self.instance, network=self.network, state_dir=STATE_DIR)
        self.provider = local_provider(settings)
        self.provider.down()  # leftovers of an earlier, killed run
        _live.append(self.provider)
        names = list(self.manifest["hosts"])
        self.hosts = {h.name: h for h in self.provider.up(names)}
        from iotplat.deploy.ansible import addresses_inventory  # exactly what `iotplat up` writes

        self.addresses_file.write_text(yaml.safe_dump(addresses_inventory(list(self.hosts.values())),
                                                      default_flow_style=False))

    def down(self) -> None:
        if self.provider is not None:
            self.provider.down()
            if self.provider in _live:
                _live.remove(self.provider)

    def argv(self, *extra: str, secrets_file: Path | None = None) -> list[str]:
        a = self.build / "ansible"
        return [str(VENV_BIN / "ansible-playbook"), "-i", str(a / "inventory.yml"), "-i", str(self.addresses_file),
                "-e", f"@{secrets_file or self.secrets_file}", "--vault-password-file", str(self.key_file),
                "-e", f"iotplat_build_dir={self.build.resolve()}",
                "-e", f"iotplat_worker_wheelhouse={self.wheelhouse.resolve()}",
                str(a / "site.yml"), *extra]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
        env.update(ANSIBLE_ROLES_PATH=str(ROLES), ANSIBLE_CONFIG=str(self.build / "ansible" / "ansible.cfg"),
                   ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1", PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
                   # tighter than ansible.cfg's 20 minutes: a hung task fails by name well inside the
                   # playbook's own deadline, so the report says which task and host hung
                   ANSIBLE_TASK_TIMEOUT="300")
        return env

    def playbook(self, *extra: str, timeout: float = 600, secrets_file: Path | None = None) -> PlaybookRun:
        """Run site.yml; output goes to a log file as it comes, so a run that overstays `timeout` is stopped
        (with its whole session) and the failure shows where it was."""
        argv = self.argv(*extra, secrets_file=secrets_file)
        log = self.work / f"playbook-{len(list(self.work.glob('playbook-*.log'))) + 1}.log"
        started = time.monotonic()
        with log.open("w") as out:
            proc = subprocess.Popen(argv, env=self.env(), stdout=out, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=5)
                        break
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
                pytest.fail(f"ansible-playbook {' '.join(extra)} overstayed {timeout:.0f}s and was stopped; "
                            f"its output ended with:\n{tail}", pytrace=False)
        text = log.read_text(errors="replace")
        return PlaybookRun(argv, proc.returncode, text, parse_recap(text), time.monotonic() - started)

    def exec(self, host: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return self.provider.exec(host, argv, timeout=timeout)

    def secret(self, name: str) -> str:
        from iotplat.secrets.materials import secret_content

        return secret_content(name, self.materials).decode()


_live: list = []


def _down_all() -> None:
    for provider in list(_live):
        try:
            provider.down()
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"teardown failed: {exc}", file=sys.stderr)


atexit.register(_down_all)


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheelhouse `iotplat up` ships (same code)."""
    from iotplat.deploy.wheelhouse import build_wheelhouse

    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


def new_deployment(spec: Path, instance: str, wheelhouse: Path) -> Deployment:
    work = Path(tempfile.mkdtemp(prefix=f"iotplat-{instance}-"))
    key = work / "vault-password"
    key.write_text("roles-test-vault-password-0123456789abcdef\n")
    key.chmod(0o600)
    # the rendered firewall allows the spec's network: make it the network these hosts really use
    shutil.copytree(spec.parent, work / "spec")
    spec = work / "spec" / spec.name
    data = yaml.safe_load(spec.read_text())
    if data["target"]["kind"] == "local":
        data["target"]["network"] = NETWORK
        spec.write_text(yaml.safe_dump(data, sort_keys=False))
    return Deployment(spec=spec, work=work, build=work / "build", state_root=work / "state", key_file=key,
                      wheelhouse=wheelhouse, instance=instance)
