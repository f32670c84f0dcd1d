"""Version changes between the last deploy and this one, and the host-by-host order of a rolling upgrade.

What is deployed is recorded in the state directory (deployed.json, "versions"): what each service declares
(`Service.versions`: the pinned packages, the digest of the worker's wheelhouse). When `iotplat up` finds one of
them changed, it does not configure every host at once: it runs the playbook on one host at a time (hosts of the
changed services first, in deploy order: broker -> InfluxDB -> worker -> Grafana), runs the end-to-end canary
after each, and stops at the first failure, saying how to roll back (pin the previous version again; `up` rolls
back the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from iotplat.services import Service, all_services
from iotplat.services.base import pin_text
from iotplat.spec.platform_model import Platform

__all__ = ["Change", "changes", "pin_text", "rollback_hint", "rolling_order", "versions"]


@dataclass(frozen=True)
class Change:
    service: str  # the version key (Service.version_keys): mosquitto, influxdb, worker, grafana, a plugin's
    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.service} {self.old} -> {self.new}"


def _owners() -> dict[str, Service]:
    return {key: svc for svc in all_services() for key in svc.version_keys}


def versions(build: Path, wheelhouse: Path | None) -> dict[str, str]:
    """The versions this render deploys, read from the rendered group_vars (the roles' own inputs)."""
    gv = yaml.safe_load((build / "ansible" / "group_vars" / "all.yml").read_text())
    out: dict[str, str] = {}
    for svc in all_services():
        out.update(svc.versions(gv, wheelhouse))
    return out


def changes(deployed: dict | None, current: dict[str, str], platform: Platform) -> list[Change]:
    """Services whose version differs from the last deploy (none on a first deploy or an old state), in deploy
    order."""
    before = (deployed or {}).get("versions") or {}
    owners = _owners()
    changed = [Change(s, before[s], v) for s, v in current.items()
               if s in before and before[s] != v and s in owners and platform.placement.get(owners[s].name)]
    return sorted(changed, key=lambda c: (owners[c.service].deploy_order, c.service))


def rolling_order(platform: Platform, hosts: list[str], changed: list[Change]) -> list[str]:
    """Every host once: those running a changed service first (in deploy order), then the rest."""
    owners = _owners()
    order: list[str] = []
    for c in sorted(changed, key=lambda c: (owners[c.service].deploy_order, c.service)):
        for h in platform.placement[owners[c.service].name]:
            if h not in order:
                order.append(h)
    return order + [h for h in hosts if h not in order]


def rollback_hint(changed: list[Change], spec_file: str) -> str:
    owners = _owners()
    steps = [owners[c.service].rollback(c.service, c.old, spec_file) for c in changed]
    return f"to roll back: {'; '.join(steps)}; then run `iotplat up` again (it rolls back host by host the same way)"
