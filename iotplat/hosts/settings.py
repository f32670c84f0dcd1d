"""Settings of the `local` target: everything machine-specific is a setting, not a constant."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from .api import HostProviderError

# Debian releases the hosts can run: suite -> major version (iotplat supports exactly these on every target)
SUITES = {"bookworm": "12", "trixie": "13"}
SUITE = "bookworm"  # the local target's default: Debian 12
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_STATE_DIR = Path("/var/lib/iotplat/local")
DEFAULT_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEFAULT_PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "openssh-server",
    "sudo",
    "python3",
    "python3-apt",  # Ansible's apt module
    "iproute2",  # ansible_default_ipv4 and friends
    "procps",
    "ca-certificates",
)
# What a fresh Debian server has when an operator first logs in (a cloud image, or a netinst with "SSH
# server"): no python3-apt (Ansible installs it), no iotplat tuning. Bare-metal tests start from this.
STOCK_PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "openssh-server",
    "sudo",
    "python3",
    "iproute2",
    "procps",
    "ca-certificates",
)
PROFILES = ("iotplat", "stock")
SSH_USER = "deploy"
FIRST_HOST_OFFSET = 11  # hosts get <network>+11, +12, ...; +1 is the bridge, the last usable is the dead gateway

_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class ImageSpec:
    """What a base image is built from; its hash names the image (a change builds a new one).

    profile "iotplat": the local target's hosts (sshd key-only, journald capped, apt timers masked, python3-apt, the
    login user baked in); profile "stock": a fresh Debian server as an operator gets it (bare-metal and cloud
    stand-ins): the packages listed and nothing iotplat would otherwise rely on; its login user is created on a
    machine's first boot (as cloud-init or an installer does), so one stock image serves every user name."""

    suite: str = SUITE
    profile: str = "iotplat"
    packages: tuple[str, ...] = DEFAULT_PACKAGES
    user: str | None = SSH_USER

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise HostProviderError(f"unknown Debian suite {self.suite!r}: use one of {', '.join(SUITES)}")
        if self.profile not in PROFILES:
            raise HostProviderError(f"unknown image profile {self.profile!r}: use one of {', '.join(PROFILES)}")
        if self.user is not None and (not _USER_RE.fullmatch(self.user) or self.user == "root"):
            raise HostProviderError(f"invalid login user {self.user!r}: a Linux user name other than root")
        object.__setattr__(self, "packages", tuple(self.packages))

    @classmethod
    def stock(cls, suite: str = SUITE) -> ImageSpec:
        return cls(suite=suite, profile="stock", packages=STOCK_PACKAGES, user=None)


@dataclass(frozen=True)
class LocalSettings:
    """Where and how the local provider builds its hosts."""

    instance: str  # unique key, e.g. "<platform>-<env>"; names the netns, bridge and directories
    network: str = "10.213.0.0/24"  # private IPv4 network of the bridge
    state_dir: Path = DEFAULT_STATE_DIR  # base image, hosts, keys, pid files
    mirror: str | None = None  # Debian mirror URL; None: the one this machine's apt uses
    proxy_port: int = 13142  # apt-cacher-ng, bound to the bridge address only
    ca_bundle: Path | None = DEFAULT_CA_BUNDLE  # extra CAs in it are trusted by the guests (None: none)
    packages: tuple[str, ...] = field(default=DEFAULT_PACKAGES)  # base image packages
    suite: str = SUITE  # Debian release of the hosts (bookworm = 12, trixie = 13)
    profile: str = "iotplat"  # "stock": a fresh server as an operator gets it (see ImageSpec)
    ssh_user: str = SSH_USER  # the login user (passwordless sudo) the hosts are created with
    # Hosts created by this provider may run a container engine (Docker): see machine.py. Opt-in: it lets the
    # guests use the kernel keyring syscalls and remount their cgroup hierarchies read-write.
    container_engine: bool = False

    def __post_init__(self) -> None:
        if not _INSTANCE_RE.fullmatch(self.instance):
            raise HostProviderError(
                f"invalid instance name {self.instance!r}: use letters, digits, '.', '_' and '-' (max 63)"
            )
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        if self.ca_bundle is not None:
            object.__setattr__(self, "ca_bundle", Path(self.ca_bundle))
        object.__setattr__(self, "packages", tuple(self.packages))
        net = self.net  # validates
        if net.prefixlen > 26:
            raise HostProviderError(f"network {self.network} is too small: use a /26 or larger (e.g. a /24)")
        if not net.is_private:
            raise HostProviderError(f"network {self.network} is not a private range: use e.g. 10.213.0.0/24")
        if not 1 <= self.proxy_port <= 65535:
            raise HostProviderError(f"proxy_port {self.proxy_port} is not a TCP port")
        self.image  # validates suite, profile and user

    @property
    def image(self) -> ImageSpec:
        user = self.ssh_user if self.profile == "iotplat" else None  # stock: created on first boot
        if not _USER_RE.fullmatch(self.ssh_user) or self.ssh_user == "root":
            raise HostProviderError(f"invalid login user {self.ssh_user!r}: a Linux user name other than root")
        return ImageSpec(suite=self.suite, profile=self.profile, packages=self.packages, user=user)

    # --- derived names -------------------------------------------------------------------------------
    @property
    def net(self) -> ipaddress.IPv4Network:
        try:
            return ipaddress.IPv4Network(self.network, strict=True)
        except ValueError as exc:
            raise HostProviderError(f"invalid network {self.network!r} ({exc}): use e.g. 10.213.0.0/24") from exc

    @property
    def key(self) -> str:
        """8 hex digits naming this instance's interfaces (Linux keeps interface names <= 15 chars)."""
        return hashlib.sha256(self.instance.encode()).hexdigest()[:8]

    @property
    def instance_dir(self) -> Path:
        return self.state_dir / "instances" / self.instance

    @property
    def bridge(self) -> str:
        return f"ipb{self.key}"

    @property
    def bridge_address(self) -> str:
        return str(self.net.network_address + 1)

    @property
    def gateway(self) -> str:
        """The default route of the guests: an address nobody owns (see docs/local-target.md)."""
        return str(self.net.broadcast_address - 1)

    @property
    def netns_prefix(self) -> str:
        return f"iotplat-{self.key}-"

    @property
    def max_hosts(self) -> int:
        return self.net.num_addresses - FIRST_HOST_OFFSET - 2

    def address_of(self, index: int) -> str:
        return str(self.net.network_address + FIRST_HOST_OFFSET + index)

    def veth_of(self, index: int) -> str:
        return f"ipv{self.key}{index:03x}"


def check_hostname(name: str) -> None:
    if not _HOSTNAME_RE.fullmatch(name):
        raise HostProviderError(
            f"invalid host name {name!r}: use a DNS label (lower-case letters, digits and '-', max 63)"
        )


def apt_mirrors(sources_dir: Path = Path("/etc/apt")) -> tuple[str, str]:
    """(debian mirror, debian-security mirror) as this machine's apt sources name them (any supported suite:
    a machine on Debian 12 serves Debian 13 hosts from the same mirror)."""
    entries: list[tuple[str, list[str]]] = []  # (uri, suites)
    one_line = [sources_dir / "sources.list", *sorted((sources_dir / "sources.list.d").glob("*.list"))]
    for path in one_line:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            line = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0])  # drop "[signed-by=...]" options
            words = line.split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]]))
    for path in sorted((sources_dir / "sources.list.d").glob("*.sources")):
        try:
            text = path.read_text()
        except OSError:
            continue
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                entries.append((uri, fields.get("suites", "").split()))
    mirror = security = None
    for uri, suites in entries:
        if mirror is None and set(SUITES) & set(suites):
            mirror = uri
        if security is None and {f"{s}-security" for s in SUITES} & set(suites):
            security = uri
    mirror = (mirror or DEFAULT_MIRROR).rstrip("/")
    if security is None:
        security = mirror[: -len("/debian")] + "/debian-security" if mirror.endswith("/debian") else (
            "http://deb.debian.org/debian-security"
        )
    return mirror, security.rstrip("/")
