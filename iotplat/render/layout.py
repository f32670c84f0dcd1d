"""Where files live on the hosts: the one table the templates, the roles and the manifest share.

The table is the common paths below plus every service's own (`Service.paths()`): templates read it as `paths`,
the roles as the group variable `iotplat_paths` (their vars/main.yml name no path of their own), and the manifest
lists the files at those paths. tests/roles/test_roles_static.py ties the roles to it.

Secret files live under /etc/iotplat/credentials/ (root-only, 0600) and reach services through systemd
`LoadCredential=` (they then appear under /run/credentials/<unit>/). Mosquitto is the exception: it
drops root itself and re-reads its password file on SIGHUP, so its key and password file are
root:mosquitto 0640 under /etc/mosquitto/iotplat/.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

CREDENTIALS_DIR = "/etc/iotplat/credentials"

# Paths every host has, whatever its services.
COMMON_PATHS = MappingProxyType(
    {
        "ca_cert": "/etc/iotplat/tls/ca.crt",
        "server_cert": "/etc/iotplat/tls/server.crt",
        "config_dir": "/etc/iotplat",
        "credentials_dir": CREDENTIALS_DIR,
    }
)

# Where a data disk is mounted; each service's data folders (Service.data_dirs) are bind-mounted from it.
DATA_MOUNT = "/srv/iotplat"


def paths() -> Mapping[str, str]:
    """The whole table: the common paths and every registered service's (a name may be defined only once)."""
    from iotplat.services import all_services

    out = dict(COMMON_PATHS)
    for svc in all_services():
        for name, path in svc.paths().items():
            if name in out and out[name] != path:
                raise ValueError(f"path {name!r} of service {svc.name} is already {out[name]!r}")
            out[name] = path
    return MappingProxyType(out)


class _Paths(Mapping[str, str]):
    """`PATHS`: the table, read when used (plugins register services after this module is imported)."""

    def __getitem__(self, key: str) -> str:
        return paths()[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(paths())

    def __len__(self) -> int:
        return len(paths())


PATHS: Mapping[str, str] = _Paths()


def mount_unit(path: str) -> str:
    """The systemd mount unit name of a path (`systemd-escape --path --suffix=mount`)."""
    parts = []
    for i, ch in enumerate(path.strip("/")):
        if ch == "/":
            parts.append("-")
        elif ch.isascii() and (ch.isalnum() or ch in ":_" or (ch == "." and i > 0)):
            parts.append(ch)
        else:
            parts.append("".join(f"\\x{b:02x}" for b in ch.encode()))
    return ("".join(parts) or "-") + ".mount"
