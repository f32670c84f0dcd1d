"""Fixtures for the local target's hosts (systemd-nspawn). Need root; skipped otherwise.

Environment:
  IOTPLAT_TEST_NETWORK    the private /24 the tests may use (default 10.213.0.0/24); its lower /25 is
                          used by the main instance, its upper /25 by the teardown and coexistence tests
  IOTPLAT_TEST_STATE_DIR  state dir (default /var/lib/iotplat/local: the base image cache is shared)
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iotplat.hosts import LocalSettings, local_provider

NETWORK = ipaddress.IPv4Network(os.environ.get("IOTPLAT_TEST_NETWORK", "10.213.0.0/24"))
LOW, HIGH = (str(n) for n in NETWORK.subnets(new_prefix=NETWORK.prefixlen + 1))
STATE_DIR = Path(os.environ.get("IOTPLAT_TEST_STATE_DIR", "/var/lib/iotplat/local"))
REPO = Path(__file__).resolve().parents[2]

_created: dict[str, LocalSettings] = {}


def _down_all() -> None:
    """Last resort (atexit): whatever a test created must not outlive the test run."""
    for settings in list(_created.values()):
        try:
            local_provider(settings).down()
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            print(f"teardown of {settings.instance} failed: {exc}", file=sys.stderr)


atexit.register(_down_all)


def why_not_runnable() -> str | None:
    if os.geteuid() != 0:
        return "local hosts need root (network namespaces, overlay mounts, systemd-nspawn)"
    if not shutil.which("systemd-nspawn"):
        return "systemd-nspawn not found: apt-get install systemd-container"
    return None


@pytest.fixture(autouse=True)
def _require_nspawn(request):
    if request.node.get_closest_marker("hosts") is None:
        return  # plain unit tests run everywhere
    reason = why_not_runnable()
    if reason:
        pytest.skip(reason)


def _down_killed_runs(network: ipaddress.IPv4Network) -> None:
    """Remove the test instances (`pytest-*`) that an earlier, killed test run left on `network`: their bridge
    would make this run's instance refuse the network as taken (a CI run failed so, on a leftover of the
    SIGKILL test's instance from a run ended mid-way). Instances of this run and other networks are left alone."""
    for state_file in sorted((STATE_DIR / "instances").glob("pytest-*/state.json")):
        name = state_file.parent.name
        try:
            other = ipaddress.IPv4Network(json.loads(state_file.read_text())["network"])
        except (OSError, ValueError, KeyError):
            continue
        if name not in _created and other.overlaps(network):
            local_provider(LocalSettings(instance=name, network=str(other), state_dir=STATE_DIR)).down()


@pytest.fixture
def make_settings():
    """LocalSettings for a test instance; the instance is torn down after the test (and at exit)."""
    made: list[LocalSettings] = []

    def make(instance: str, network: str) -> LocalSettings:
        settings = LocalSettings(instance=instance, network=network, state_dir=STATE_DIR)
        _down_killed_runs(ipaddress.IPv4Network(network))
        local_provider(settings).down()  # leftovers of an earlier, killed run
        _created[instance] = settings
        made.append(settings)
        return settings

    yield make
    for settings in made:
        local_provider(settings).down(purge=True)
        _created.pop(settings.instance, None)


def system_leftovers(settings: LocalSettings) -> list[str]:
    """What of an instance the machine still has, asked of the system tools (not of the provider)."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in netns.splitlines() if settings.netns_prefix in line]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if settings.key in line]
    mounts = Path("/proc/self/mounts").read_text()
    found += [f"mount {line.split()[1]}" for line in mounts.splitlines() if str(settings.instance_dir) in line]
    ps = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        pid, stat, args = line.split(None, 2)
        if (str(settings.instance_dir) + "/") in args + "/" and not stat.startswith("Z") and int(pid) != os.getpid():
            found.append(f"process {pid} {args[:80]}")
    if settings.instance_dir.exists():
        found += [f"file {p}" for p in settings.instance_dir.rglob("*.pid")]
    found += [f"dir {p}" for p in Path("/run/systemd/nspawn/propagate").glob(settings.netns_prefix + "*")]
    return found
