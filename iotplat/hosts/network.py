"""The private network: one bridge per instance, one network namespace + veth pair per host.

The guests' default route points at an address on the bridge that nobody owns: facts such as
ansible_default_ipv4 work, while traffic can only reach the bridge (the host does not forward).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from . import _sys
from .api import HostProviderError
from .settings import LocalSettings

NETNS_DIR = Path("/run/netns")


def _ip(*args: str, what: str, check: bool = True, timeout: float = 20):
    return _sys.run([_sys.which("ip"), *args], what=what, check=check, timeout=timeout)


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def netns_list(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def netns_pids(netns: str) -> list[int]:
    proc = _ip("netns", "pids", netns, what=f"listing processes in netns {netns}", check=False)
    return [int(word) for word in proc.stdout.split() if word.isdigit()]


def check_no_overlap(settings: LocalSettings) -> None:
    """Refuse a network that another interface of this machine already uses (another instance, a LAN)."""
    ours = settings.net
    proc = _ip("-j", "-4", "addr", "show", what="reading this machine's addresses")
    for link in json.loads(proc.stdout or "[]"):
        if link.get("ifname") == settings.bridge:
            continue
        for addr in link.get("addr_info", []):
            other = ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False)
            if other.overlaps(ours):
                raise HostProviderError(
                    f"network {settings.network} overlaps {other} on {link['ifname']}: "
                    "choose another private network for this instance (LocalSettings.network / --network)"
                )


def ensure_bridge(settings: LocalSettings) -> None:
    br = settings.bridge
    what = f"creating bridge {br} for {settings.network}"
    if not link_exists(br):
        check_no_overlap(settings)
        _ip("link", "add", br, "type", "bridge", what=what)
    cidr = f"{settings.bridge_address}/{settings.net.prefixlen}"
    have = _ip("-j", "-4", "addr", "show", "dev", br, what=what).stdout
    if cidr.split("/")[0] not in have:
        _ip("addr", "add", cidr, "dev", br, what=what)
    _ip("link", "set", br, "up", what=what)


def ensure_host_net(settings: LocalSettings, netns: str, veth: str, address: str) -> None:
    """Create the host's netns with eth0 (its veth peer on the bridge), address and dead-gateway route."""
    what = f"creating the network of {netns}"
    delete_host_net(netns, veth)
    _ip("netns", "add", netns, what=what)
    _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns, what=what)
    _ip("link", "set", veth, "master", settings.bridge, "up", what=what)
    n = ("-n", netns)
    _ip(*n, "link", "set", "lo", "up", what=what)
    _ip(*n, "addr", "add", f"{address}/{settings.net.prefixlen}", "dev", "eth0", what=what)
    _ip(*n, "link", "set", "eth0", "up", what=what)
    _ip(*n, "route", "add", "default", "via", settings.gateway, "dev", "eth0", what=what)


def delete_host_net(netns: str, veth: str) -> None:
    if veth and link_exists(veth):
        _ip("link", "del", veth, what=f"deleting {veth}", check=False)
    if netns and (NETNS_DIR / netns).exists():
        _ip("netns", "del", netns, what=f"deleting netns {netns}")


def delete_bridge(settings: LocalSettings) -> None:
    if link_exists(settings.bridge):
        _ip("link", "del", settings.bridge, what=f"deleting bridge {settings.bridge}")


def release_netns_dir() -> None:
    """`ip netns add` turns /run/netns into a mount point; once no netns is left, undo that."""
    if not NETNS_DIR.is_dir() or any(NETNS_DIR.iterdir()):
        return  # someone (maybe another instance) still has a netns
    if _sys.mounts_under(NETNS_DIR):
        _sys.run(["umount", str(NETNS_DIR)], what=f"unmounting {NETNS_DIR}", check=False)
    if not _sys.mounts_under(NETNS_DIR):
        try:
            NETNS_DIR.rmdir()
        except OSError:
            pass
