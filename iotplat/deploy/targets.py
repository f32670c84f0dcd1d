"""Where each target's hosts come from: one `TargetProvider` per target kind, chosen by `provider_for`.

- local: throw-away systemd-nspawn hosts (iotplat.hosts), keyed by platform-environment and owned by the state
  that created them; their SSH host keys are pinned by the provider itself;
- baremetal: the addresses in the spec; nothing is created or deleted, only services are;
- aws / azure: the Pulumi stack in stacks/<target> (iotplat.deploy.pulumi), then its outputs.

For every target but local, SSH host keys are learned on first contact and pinned in the state directory's
`known_hosts` (StrictHostKeyChecking=accept-new): a host that answers later with another key is refused.
No code outside this module branches on the target kind to find, create or remove hosts.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from iotplat.errors import IotplatError
from iotplat.hosts import Host, LocalSettings, local_provider

if TYPE_CHECKING:
    from iotplat.deploy.pulumi import Preview
    from iotplat.secrets.state import State
    from iotplat.spec.platform_model import Platform

Progress = Callable[[str], None]
KNOWN_HOSTS = "known_hosts"
SUITE_OF_RELEASE = {"debian-12": "bookworm", "debian-13": "trixie"}


class NotDeployed(IotplatError):
    """The platform's hosts do not exist (yet): nothing to check, read or remove there."""


@dataclass
class Released:
    """What `destroy` removed and what it kept, one human line each."""

    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


class TargetProvider(Protocol):
    kind: str
    # destroy runs destroy.yml (every role's tasks/uninstall.yml) on the hosts before release; False: release
    # deletes the hosts with everything on them (local hosts)
    uninstall_first: bool

    def acquire(self, *, create: bool, progress: Progress, allow_replace: bool = False,
                allow_data_loss: bool = False) -> list[Host]:
        """The platform's hosts in spec order. create=True makes them exist (and changes the infrastructure to
        match the spec); create=False only finds them and raises NotDeployed when they do not exist."""
        ...

    def exists(self) -> bool:
        """Whether this target holds any of the platform's hosts or disks (no side effects)."""
        ...

    def preview(self) -> Preview | None:
        """What `acquire(create=True)` would change in the infrastructure (clouds); None: nothing to preview."""
        ...

    def release(self, *, data: bool, progress: Progress) -> Released:
        """Remove what iotplat created for the hosts (services are removed by the destroy playbook first)."""
        ...


def provider_for(platform: Platform, state: State, build: Path) -> TargetProvider:
    kind = platform.target
    if kind == "local":
        return LocalTarget(platform, state)
    if kind == "baremetal":
        return BaremetalTarget(platform, state)
    from iotplat.deploy.pulumi import CloudTarget

    return CloudTarget(platform, state, build)


def known_hosts_args(state: State) -> str:
    """ssh options that pin host keys in the state directory: learned on first contact, refused when changed."""
    path = state.dir / KNOWN_HOSTS
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    return f"-o UserKnownHostsFile={shlex.quote(str(path))} -o StrictHostKeyChecking=accept-new"


def key_args(key: str) -> str:
    """With a key file, offer only that key (an agent with many keys would exhaust the server's MaxAuthTries)."""
    return "-o IdentitiesOnly=yes" if key else ""


# ---------------------------------------------------------------------------------------------- local


def local_settings(platform: Platform) -> LocalSettings:
    t = platform.spec.target
    assert t.kind == "local"
    kwargs: dict = {"instance": f"{platform.name}-{platform.environment}", "network": t.network,
                    "proxy_port": t.proxy_port, "suite": SUITE_OF_RELEASE[t.release]}
    if t.mirror:
        kwargs["mirror"] = t.mirror
    if t.ca_bundle:
        kwargs["ca_bundle"] = Path(t.ca_bundle)
    if os.environ.get("IOTPLAT_LOCAL_STATE_DIR"):
        kwargs["state_dir"] = Path(os.environ["IOTPLAT_LOCAL_STATE_DIR"])
    from iotplat.containers.runtime import container_services

    if container_services(platform):  # a service runs in a container: the hosts may run Docker (hosts/machine.py)
        kwargs["container_engine"] = True
    return LocalSettings(**kwargs)


class LocalTarget:
    kind = "local"
    uninstall_first = False

    def __init__(self, platform: Platform, state: State) -> None:
        self.platform = platform
        self.state = state
        self.provider = local_provider(local_settings(platform))

    def acquire(self, *, create: bool, progress: Progress, allow_replace: bool = False,
                allow_data_loss: bool = False) -> list[Host]:
        names = self.platform.host_names
        if create:
            return self.provider.up(names, owner=self.state.identity())
        status = self.provider.status()
        if not status:
            raise NotDeployed(f"{self.platform.key} has no local hosts; run `iotplat up` first")
        missing = [n for n in names if status.get(n) != "running"]
        if missing:
            raise IotplatError(f"local host(s) {', '.join(missing)} are not running; run `iotplat up` first")
        return self.provider.up(names, owner=self.state.identity())

    def exists(self) -> bool:
        return bool(self.provider.status())

    def preview(self) -> Preview | None:
        return None

    def release(self, *, data: bool, progress: Progress) -> Released:
        had = sorted(self.provider.status())
        self.provider.down(owner=self.state.identity())
        return Released(deleted=[f"local hosts {', '.join(had)} and everything on them" if had else "no local hosts"])


# ------------------------------------------------------------------------------------------ bare metal


class BaremetalTarget:
    kind = "baremetal"
    uninstall_first = True

    def __init__(self, platform: Platform, state: State) -> None:
        self.platform = platform
        self.state = state

    def acquire(self, *, create: bool, progress: Progress, allow_replace: bool = False,
                allow_data_loss: bool = False) -> list[Host]:
        t = self.platform.spec.target
        assert t.kind == "baremetal"
        pin = known_hosts_args(self.state)
        out = []
        for name in self.platform.host_names:
            h = t.hosts[name]
            key = h.ssh_private_key or ""  # "": the operator's ssh agent and ~/.ssh/config
            if key and not Path(key).is_absolute():
                key = str(self.platform.spec_dir / key)
            out.append(Host(name=name, address=h.address, ssh_user=h.ssh_user or t.ssh_user, ssh_port=h.ssh_port,
                            ssh_private_key=key, ssh_extra_args=f"{pin} {key_args(key)}".strip(),
                            data_device=h.data_device or ""))
        return out

    def exists(self) -> bool:
        return self.state.read_json("deployed.json") is not None

    def preview(self) -> Preview | None:
        return None

    def release(self, *, data: bool, progress: Progress) -> Released:
        return Released(kept=[f"the bare-metal hosts {', '.join(self.platform.host_names)} (iotplat does not own them)"])
