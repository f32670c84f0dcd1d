"""Version changes between the last deploy and this one, and the host-by-host order of a rolling upgrade.

What is deployed is recorded in the state directory (deployed.json, "versions"): the pinned package of each
service and the digest of the worker's wheelhouse. When `iotplat up` finds one of them changed, it does not
configure every host at once: it runs the playbook on one host at a time (hosts of the changed services first,
in service order broker -> InfluxDB -> worker -> Grafana), runs the end-to-end canary after each, and stops at
the first failure, saying how to roll back (pin the previous version again; `up` rolls back the same way).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from iotplat.spec.platform_model import Platform

# service -> the placement group that runs it
SERVICE_GROUP = {"mosquitto": "broker", "influxdb": "influxdb", "worker": "worker", "grafana": "grafana"}
# where each version is pinned in the spec (for the roll-back hint)
SPEC_FIELD = {"mosquitto": "broker.version", "influxdb": "influxdb.package.version",
              "grafana": "grafana.package.version", "worker": "the iotplat release (its worker wheel)"}


@dataclass(frozen=True)
class Change:
    service: str
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.service} {self.old} -> {self.new}"


def pin_text(versions: dict[str, str]) -> str:
    """A per-release pin as one comparable string: the version when every release has the same one, else
    `debian-12=<v>,debian-13=<v>` (a change of either release's pin is an upgrade)."""
    values = {str(v) for v in versions.values()}
    if len(values) == 1:
        return values.pop()
    return ",".join(f"{r}={versions[r]}" for r in sorted(versions))


def versions(build: Path, wheelhouse: Path | None) -> dict[str, str]:
    """The versions this render deploys, read from the rendered group_vars (the roles' own inputs)."""
    gv = yaml.safe_load((build / "ansible" / "group_vars" / "all.yml").read_text())
    out = {
        "mosquitto": pin_text(gv["mosquitto_package_versions"]),
        "influxdb": pin_text(gv["influxdb_package"].get("versions") or {}),
        "grafana": pin_text(gv["grafana_package"].get("versions") or {}),
        "worker": str(gv["iotplat_version"]),
    }
    sums = wheelhouse / "SHA256SUMS" if wheelhouse else None
    if sums and sums.exists():  # the same wheelhouse digest the worker role compares
        out["worker"] += "+" + hashlib.sha256(sums.read_bytes()).hexdigest()[:12]
    return out


def changes(deployed: dict | None, current: dict[str, str], platform: Platform) -> list[Change]:
    """Services whose version differs from the last deploy (none on a first deploy or an old state)."""
    before = (deployed or {}).get("versions") or {}
    return [Change(s, before[s], v) for s, v in current.items()
            if s in before and before[s] != v and platform.placement.get(SERVICE_GROUP[s])]


def rolling_order(platform: Platform, hosts: list[str], changed: list[Change]) -> list[str]:
    """Every host once: those running a changed service first (in service order), then the rest."""
    order: list[str] = []
    for c in sorted(changed, key=lambda c: list(SERVICE_GROUP).index(c.service)):
        for h in platform.placement[SERVICE_GROUP[c.service]]:
            if h not in order:
                order.append(h)
    return order + [h for h in hosts if h not in order]


def rollback_hint(changed: list[Change], spec_file: str) -> str:
    steps = [f"set {SPEC_FIELD[c.service]} back to {c.old} in {spec_file}" if c.service != "worker"
             else f"reinstall the iotplat release that deployed worker {c.old.split('+')[0]}" for c in changed]
    return f"to roll back: {'; '.join(steps)}; then run `iotplat up` again (it rolls back host by host the same way)"
