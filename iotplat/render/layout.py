"""Where files live on the hosts: the one table the templates, the roles and the manifest share.

Secret files live under /etc/iotplat/credentials/ (root-only, 0600) and reach services through systemd
`LoadCredential=` (they then appear under /run/credentials/<unit>/). Mosquitto is the exception: it
drops root itself and re-reads its password file on SIGHUP, so its key and password file are
root:mosquitto 0640 under /etc/mosquitto/iotplat/.
"""

from __future__ import annotations

from types import MappingProxyType

CREDENTIALS_DIR = "/etc/iotplat/credentials"

PATHS = MappingProxyType(
    {
        "ca_cert": "/etc/iotplat/tls/ca.crt",
        "server_cert": "/etc/iotplat/tls/server.crt",
        "mosquitto_conf": "/etc/mosquitto/mosquitto.conf",
        "mosquitto_acl": "/etc/mosquitto/iotplat/acl",
        "mosquitto_passwd": "/etc/mosquitto/iotplat/passwd",
        "mosquitto_key": "/etc/mosquitto/iotplat/server.key",
        "influxdb1_conf": "/etc/influxdb/influxdb.conf",
        "influxdb2_conf": "/etc/influxdb/config.toml",
        "influxdb_key": "/run/credentials/influxdb.service/server.key",
        "grafana_ini": "/etc/grafana/grafana.ini",
        "grafana_datasource": "/etc/grafana/provisioning/datasources/iotplat.yaml",
        "grafana_dashboard_provider": "/etc/grafana/provisioning/dashboards/iotplat.yaml",
        "grafana_dashboards": "/etc/iotplat/dashboards",
        "grafana_credentials": "/run/credentials/grafana-server.service",
        "worker_conf": "/etc/iotplat/worker.toml",
    }
)

# Where each service keeps its data on a host: what a data disk holds (mounted at DATA_MOUNT, each folder
# bind-mounted from it), what `destroy --data` removes, and what backups read.
DATA_MOUNT = "/srv/iotplat"


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
DATA_DIRS = MappingProxyType(
    {
        "broker": ("/var/lib/mosquitto",),
        "influxdb": ("/var/lib/influxdb", "/var/lib/influxdb2"),
        "grafana": ("/var/lib/grafana",),
        "worker": ("/var/lib/iotplat-worker",),
    }
)
