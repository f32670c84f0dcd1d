"""Servers as a user has them, for the bare-metal target's end-to-end test: stock Debian 12 and 13 machines.

Built with the local target's machinery (iotplat.hosts: systemd-nspawn, a bridge, overlay roots) but from a
*stock* root file system (`ImageSpec.stock`): the login user with passwordless sudo and a fresh server's packages,
nothing the local target's image adds (no python3-apt, no journald drop-in folder, apt timers not masked,
sshd as Debian ships it). iotplat reaches them only as that non-root user, with the key the spec names, and
learns their host keys on first contact like any real server.

What a stand-in host cannot prove: real hardware, a real reboot, kernel or firmware differences, a provider's
image customisations. A data disk here is a loop device over a sparse file, bound into the host at a stable
/dev/disk/by-id path (the role formats, mounts and binds it exactly as on a real disk).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from iotplat.hosts import Host, ImageSpec, LocalSettings, local_provider
from iotplat.hosts.machine import Bind

STATE_DIR = Path("/var/lib/iotplat/local")


@dataclass
class UserHosts:
    provider: object
    settings: LocalSettings
    hosts: dict[str, Host]
    key: Path  # the login user's private key (what the spec's ssh_private_key names)
    loops: list[str] = field(default_factory=list)

    def exec(self, host: str, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return self.provider.exec(host, argv, timeout=timeout)  # type: ignore[attr-defined]


@contextlib.contextmanager
def loop_disk(path: Path, size: str = "2G") -> Iterator[str]:
    """A block device backed by a sparse file (a spare disk); detached afterwards."""
    subprocess.run(["truncate", "-s", size, str(path)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def user_servers(instance: str, network: str, suites: Mapping[str, str], *, user: str = "ops",
                 disks: Mapping[str, tuple[str, str]] | None = None) -> Iterator[UserHosts]:
    """Stock servers named after `suites` ({host: bookworm|trixie}) on a private /24; `disks` binds a block
    device into a host at a path ({host: (device, path in the host)}). Removed afterwards."""
    settings = LocalSettings(instance=instance, network=network, state_dir=STATE_DIR, profile="stock",
                             ssh_user=user, packages=ImageSpec.stock().packages)
    provider = local_provider(settings)
    provider.down()  # leftovers of an earlier, killed run
    try:
        images = {name: ImageSpec.stock(suite) for name, suite in suites.items()}
        binds = {name: [Bind(dev, target)] for name, (dev, target) in (disks or {}).items()}
        hosts = provider.up(list(suites), images=images, binds=binds)  # type: ignore[call-arg]
        yield UserHosts(provider, settings, {h.name: h for h in hosts}, Path(hosts[0].ssh_private_key))
    finally:
        provider.down(purge=False)
