"""The services of a platform: one registry that render, status, logs, backup/restore and destroy loop over.

`all_services()` is every service iotplat knows, built-ins (below) and those plugins register under the
entry-point group `iotplat.services` (a `Service` subclass; its role and templates next to it: see
`Service.roles_path`, `Service.templates_path`). `placed(platform)` is the services a platform runs, in the registry's
order; `by_deploy_order` sorts them the way site.yml configures a host. See base.py for what a service declares
and docs/architecture.md for how to add one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from iotplat.services.base import Ingress, SecretFile, Service, ServiceFile, TlsPort
from iotplat.services.broker import Broker
from iotplat.services.grafana import Grafana
from iotplat.services.influxdb import InfluxDB
from iotplat.services.registry import BUILTIN, names, plugin_entry_points, refresh
from iotplat.services.worker import Worker

if TYPE_CHECKING:
    from iotplat.spec.platform_model import Platform

__all__ = ["BUILTIN", "Ingress", "SecretFile", "Service", "ServiceFile", "TlsPort", "all_services",
           "by_deploy_order", "get", "names", "placed", "refresh", "roles_path", "template_paths"]

_BUILTINS: tuple[Service, ...] = (Broker(), Worker(), InfluxDB(), Grafana())
assert tuple(s.name for s in _BUILTINS) == BUILTIN


@functools.lru_cache(maxsize=1)
def _plugins() -> tuple[Service, ...]:
    out = []
    for ep in plugin_entry_points():
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Service)) or cls.name != ep.name:
            raise TypeError(f"entry point {ep.name} = {ep.value} in group iotplat.services is not a Service subclass "
                            f"named {ep.name!r}")
        out.append(cls())
    return tuple(out)


def all_services() -> tuple[Service, ...]:
    return _BUILTINS + _plugins()


def roles_path() -> str:
    """ANSIBLE_ROLES_PATH: iotplat's roles, then every plugin's folder of roles."""
    from iotplat.resources import data_dir

    extra = [str(s.roles_path) for s in all_services() if s.roles_path is not None]
    return os.pathsep.join(dict.fromkeys([str(data_dir("roles")), *extra]))


def template_paths() -> list[str]:
    """Where templates are looked up: iotplat's templates/, then every plugin's."""
    from iotplat.resources import data_dir

    extra = [str(s.templates_path) for s in all_services() if s.templates_path is not None]
    return list(dict.fromkeys([str(data_dir("templates")), *extra]))


def reload_plugins() -> None:
    """Forget the loaded plugins (a test that installs one at run time)."""
    refresh()
    _plugins.cache_clear()


def get(name: str) -> Service:
    for svc in all_services():
        if svc.name == name:
            return svc
    raise KeyError(name)


def placed(p: Platform) -> list[Service]:
    """The services this platform runs (enabled and on some host), in the registry's order."""
    return [s for s in all_services() if s.enabled(p) and p.placement.get(s.name)]


def by_deploy_order(services: Iterable[Service]) -> list[Service]:
    return sorted(services, key=lambda s: (s.deploy_order, s.name))
