"""The host-provider contract: what the deploy code may rely on, whatever creates the hosts."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from iotplat.errors import IotplatError

HostState = str  # "running" | "stopped" | "absent"


class HostProviderError(IotplatError):
    """Creating, inspecting or removing hosts failed; the message says what failed and how to fix it."""


@dataclass(frozen=True)
class Host:
    """A provisioned host, as the Ansible inventory needs it."""

    name: str  # logical host name (a DNS label) from the spec
    address: str  # IPv4 address the controller reaches it at
    ssh_user: str  # a sudo-capable user (root cannot log in)
    ssh_port: int
    ssh_private_key: str  # path to the private key file (mode 0600)
    ssh_extra_args: str  # extra ssh options (shell words): the known_hosts file and how it is checked, a jump host
    host_keys: tuple[str, ...] = ()  # its SSH host public keys when the provider knows them ("ssh-ed25519 AAAA...")
    private_address: str = ""  # the address other hosts of the platform use ("" = address)
    data_device: str = ""  # a data disk by stable path, formatted and mounted by the common role ("" = none)

    @property
    def internal_address(self) -> str:
        return self.private_address or self.address

    def ssh_argv(self, *command: str) -> list[str]:
        """`ssh` argv that runs a remote command line on this host (ssh joins `command` with spaces and the
        remote shell parses it). Non-interactive: no password prompts, a 10 s connect timeout. Without a key
        file, ssh uses the operator's agent and ~/.ssh/config."""
        key = ["-i", self.ssh_private_key] if self.ssh_private_key else []
        return [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            *key,
            "-p",
            str(self.ssh_port),
            *shlex.split(self.ssh_extra_args),
            f"{self.ssh_user}@{self.address}",
            *command,
        ]

    def remote_argv(self, argv: Sequence[str]) -> list[str]:
        """`ssh` argv that runs exactly `argv` on this host (each word quoted for the remote shell)."""
        return self.ssh_argv(*(shlex.quote(a) for a in argv))


class HostProvider(Protocol):
    def up(self, names: Sequence[str], owner: str | None = None) -> list[Host]:
        """Create (or start) the named hosts and return them in the given order; running hosts are kept.
        `owner` identifies the caller's state: hosts another owner created are refused."""
        ...

    def status(self) -> dict[str, HostState]:
        """Every host this provider knows: name -> "running" | "stopped" | "absent"."""
        ...

    def restart(self, name: str) -> None:
        """Restart one host (stands in for a reboot) and wait until it accepts SSH again."""
        ...

    def down(self, purge: bool = False, owner: str | None = None) -> None:
        """Remove every host and everything created for them (refused for hosts another owner created)."""
        ...

    def exec(self, name: str, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """Run argv inside the host as root (text output captured)."""
        ...
