"""Networks of the hosts: bridges, and one network namespace + veth pair per host.

The local target has one bridge per instance; the guests' default route points at an address on it
that nobody owns: facts such as ansible_default_ipv4 work, while traffic can only reach the bridge (the
machine does not forward). Other layouts (the emulated cloud in the tests: a private network behind a
router namespace) use the same functions with their own bridges and gateways.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from . import sysutil
from .api import HostProviderError

NETNS_DIR = Path("/run/netns")


def _ip(*args: str, what: str, check: bool = True, timeout: float = 20):
    return sysutil.run([sysutil.which("ip"), *args], what=what, check=check, timeout=timeout)


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def netns_list(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def netns_pids(netns: str) -> list[int]:
    proc = _ip("netns", "pids", netns, what=f"listing processes in netns {netns}", check=False)
    return [int(word) for word in proc.stdout.split() if word.isdigit()]


def check_no_overlap(network: ipaddress.IPv4Network, own_link: str) -> None:
    """Refuse a network that another interface of this machine already uses (another instance, a LAN)."""
    proc = _ip("-j", "-4", "addr", "show", what="reading this machine's addresses")
    for link in json.loads(proc.stdout or "[]"):
        if link.get("ifname") == own_link:
            continue
        for addr in link.get("addr_info", []):
            other = ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False)
            if other.overlaps(network):
                raise HostProviderError(
                    f"network {network} overlaps {other} on {link['ifname']}: "
                    "choose another private network for this instance (LocalSettings.network / --network)"
                )


def ensure_bridge(bridge: str, network: ipaddress.IPv4Network, address: str | None) -> None:
    """The bridge, up; with `address` (this machine's own address on it) or none (a network this machine
    is not part of, e.g. an emulated cloud's private network)."""
    what = f"creating bridge {bridge} for {network}"
    if not link_exists(bridge):
        check_no_overlap(network, bridge)
        _ip("link", "add", bridge, "type", "bridge", what=what)
    if address is not None:
        have = _ip("-j", "-4", "addr", "show", "dev", bridge, what=what).stdout
        if f'"{address}"' not in have:
            _ip("addr", "add", f"{address}/{network.prefixlen}", "dev", bridge, what=what)
    _ip("link", "set", bridge, "up", what=what)


def ensure_host_net(netns: str, veth: str, bridge: str, address: str, prefixlen: int, gateway: str) -> None:
    """Create the host's netns with eth0 (its veth peer on `bridge`), its address and default route."""
    what = f"creating the network of {netns}"
    delete_host_net(netns, veth)
    _ip("netns", "add", netns, what=what)
    _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns, what=what)
    _ip("link", "set", veth, "master", bridge, "up", what=what)
    n = ("-n", netns)
    _ip(*n, "link", "set", "lo", "up", what=what)
    _ip(*n, "addr", "add", f"{address}/{prefixlen}", "dev", "eth0", what=what)
    _ip(*n, "link", "set", "eth0", "up", what=what)
    _ip(*n, "route", "add", "default", "via", gateway, "dev", "eth0", what=what)


def delete_host_net(netns: str, veth: str) -> None:
    if veth and link_exists(veth):
        _ip("link", "del", veth, what=f"deleting {veth}", check=False)
    if netns and (NETNS_DIR / netns).exists():
        _ip("netns", "del", netns, what=f"deleting netns {netns}")


def delete_bridge(bridge: str) -> None:
    if link_exists(bridge):
        _ip("link", "del", bridge, what=f"deleting bridge {bridge}")


def release_netns_dir() -> None:
    """`ip netns add` turns /run/netns into a mount point; once no netns is left, undo that."""
    if not NETNS_DIR.is_dir() or any(NETNS_DIR.iterdir()):
        return  # someone (maybe another instance) still has a netns
    if sysutil.mounts_under(NETNS_DIR):
        sysutil.run(["umount", str(NETNS_DIR)], what=f"unmounting {NETNS_DIR}", check=False)
    if not sysutil.mounts_under(NETNS_DIR):
        try:
            NETNS_DIR.rmdir()
        except OSError:
            pass
