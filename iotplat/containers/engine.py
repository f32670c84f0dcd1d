"""The Docker engine on a host: which package, its daemon.json, and the checks before iotplat uses it.

- Package: the distribution's own (`docker.io` on Debian 12/13 and Ubuntu; Debian 12 ships 20.10, Debian 13
  26.1), installed `--no-install-recommends`. Other distributions: their packaged Docker (RHEL-likes: moby-engine
  or Docker CE's repository), any version from 20.10 on, with the graph-driver image store (the default before
  Docker 29's fresh installs). docs/containers.md has the list.
- daemon.json (daemon_json()): iptables and ip-forward off and no default bridge -- containers use the host's
  network, so dockerd never touches the host's firewall (a dockerd with its defaults sets FORWARD to DROP and adds
  NAT rules, which breaks other networks on the host: shared/research/docker.md); journald as the default log
  driver; no-new-privileges by default; the graph-driver image store (image ID = config digest, which the
  archives are checked against); live-restore off (systemd owns the containers' lifecycle).
"""

from __future__ import annotations

import json
from typing import Any

# Per Debian release: Debian 13 split the CLI into docker-cli (only a Recommends of docker.io, so an install with
# --no-install-recommends has a daemon and no `docker` command). tini (docker-init), runc, containerd come along.
ENGINE_PACKAGES = {"debian-12": ("docker.io",), "debian-13": ("docker.io", "docker-cli")}
DAEMON_JSON_PATH = "/etc/docker/daemon.json"


def daemon_json() -> bytes:
    """The bytes of /etc/docker/daemon.json on every container host (identical everywhere)."""
    config: dict[str, Any] = {
        "bridge": "none",
        "iptables": False,
        "ip-forward": False,
        "ip-masq": False,
        "userland-proxy": False,
        "log-driver": "journald",
        "no-new-privileges": True,
        "live-restore": False,
        "features": {"containerd-snapshotter": False},
    }
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def engine_problem(info_output: str) -> str | None:
    """None when `docker info --format '{{json .}}'` shows an engine iotplat can use, else one line with the fix."""
    try:
        info = json.loads(info_output)
    except ValueError:
        return "`docker info` printed no JSON: is dockerd running? (`systemctl status docker`)"
    if not isinstance(info, dict):
        return "`docker info` printed no engine description"
    if str(info.get("OSType") or "linux") != "linux":
        return f"the Docker engine runs {info.get('OSType')} containers, not linux"
    status = {str(k): str(v) for k, v in (info.get("DriverStatus") or []) if isinstance(k, str)}
    if "io.containerd.snapshotter" in status.get("driver-type", ""):
        return ("the Docker engine uses the containerd image store; iotplat checks loaded images by the graph-driver "
                "store's image IDs: set \"features\": {\"containerd-snapshotter\": false} in /etc/docker/daemon.json")
    version = str(info.get("ServerVersion") or "")
    major = version.split(".", 1)[0]
    if major.isdigit() and int(major) < 20:
        return f"Docker {version} is too old: iotplat needs 20.10 or newer (Debian 12's docker.io)"
    if info.get("LoggingDriver") not in (None, "journald"):
        return f"the engine's default log driver is {info.get('LoggingDriver')}, not journald: install iotplat's daemon.json"
    return None
