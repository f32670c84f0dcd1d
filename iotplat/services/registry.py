"""The names of the services iotplat knows, without importing their modules (the spec needs only the names).

Built-in services, in deploy order, then those that plugins register under the entry-point group
`iotplat.services` (`name = package.module:ServiceClass`). Importing this module imports nothing of iotplat's,
so the spec model can use it; `iotplat.services.all_services()` loads the definitions themselves.
"""

from __future__ import annotations

import functools
from importlib import metadata

BUILTIN = ("broker", "worker", "influxdb", "grafana")
ENTRY_POINTS = "iotplat.services"


@functools.lru_cache(maxsize=1)
def plugin_entry_points() -> tuple[metadata.EntryPoint, ...]:
    found = sorted(metadata.entry_points(group=ENTRY_POINTS), key=lambda ep: ep.name)
    return tuple(ep for ep in found if ep.name not in BUILTIN)


def names() -> tuple[str, ...]:
    """Every service name a host may list in the spec, built-ins first."""
    return BUILTIN + tuple(ep.name for ep in plugin_entry_points())


def refresh() -> None:
    """Forget the cached plugin list (a test that installs a plugin at run time)."""
    plugin_entry_points.cache_clear()
