"""Host providers: where the hosts of a platform come from.

`target: local` uses LocalProvider (systemd-nspawn hosts on this machine, see docs/local-target.md);
cloud targets get their hosts from Pulumi and bare metal from the inventory, all as `Host` records.
"""

from __future__ import annotations

from .api import Host, HostProvider, HostProviderError, HostState
from .settings import DEFAULT_PACKAGES, STOCK_PACKAGES, SUITES, ImageSpec, LocalSettings


def local_provider(settings: LocalSettings) -> HostProvider:
    """The provider of the `local` target (needs root; see docs/local-target.md)."""
    from .local import LocalProvider

    return LocalProvider(settings)


__all__ = [
    "DEFAULT_PACKAGES",
    "Host",
    "HostProvider",
    "HostProviderError",
    "HostState",
    "ImageSpec",
    "LocalSettings",
    "STOCK_PACKAGES",
    "SUITES",
    "local_provider",
]
