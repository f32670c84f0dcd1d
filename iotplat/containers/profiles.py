"""How each service runs in its container: user, capabilities, mounts, command (image knowledge, as data).

    broker_service(image, ports, limits)            mosquitto.service
    influxdb1_service(image, port, limits)          influxdb.service
    worker_service(image, metrics_port, limits)     iotplat-worker@.service (a template: one container per replica)

`limits` come from the spec's `resources` (iotplat.containers.runtime.limits_of: the spec's values over
DEFAULT_LIMITS), the same values a package's unit gets as a drop-in.

The rendered files are mounted read-only at the paths of the package runtime (iotplat.render.layout.PATHS), so the
bytes the renderer writes once serve both runtimes. Directories are mounted rather than single files wherever a
file is replaced while the service runs (password file, certificates): a deployment replaces a file by renaming a
new one into place, and a bind mount of the old file would keep showing the old inode.

Secrets: each service's secret files live in one directory under the root-only credentials root
(/etc/iotplat/credentials, 0700 root: no other host user can reach anything below it), the directory and files
owned by root with the container's group (0750 / 0640), and that directory alone is mounted read-only where the
service reads it. Never environment variables: nothing secret is in `docker inspect`.
Mosquitto keeps its password file and key in /etc/mosquitto/iotplat, as with the package (root:mosquitto 0640,
gid 1883 here), because it re-reads them there on SIGHUP.
"""

from __future__ import annotations

from dataclasses import dataclass

from iotplat.render.layout import CREDENTIALS_DIR, PATHS

from .units import DEFAULT_LIMITS, INSTANCE, ContainerService, Limits, Mount

TLS_DIR = PATHS["ca_cert"].rsplit("/", 1)[0]  # /etc/iotplat/tls: ca.crt and the host's server.crt


@dataclass(frozen=True)
class Ownership:
    """Who must own a host directory the container writes or reads secrets from (the deployment chowns it)."""

    path: str
    uid: int
    gid: int
    mode: int


@dataclass(frozen=True)
class ServiceContainer:
    unit: ContainerService
    owned: tuple[Ownership, ...]  # data and secret directories, with their owner and mode on the host


MOSQUITTO_UID = 1883  # eclipse-mosquitto: adduser -u 1883; Mosquitto starts as root and drops to it
INFLUXDB1_UID = 1500  # influxdb:1.x: USER influxdb (uid 1500)
WORKER_UID = 10001  # iotplat's worker image (worker_image.WORKER_UID)


def broker_service(image: str, ports: tuple[int, ...], limits: Limits = DEFAULT_LIMITS["broker"]) -> ServiceContainer:
    conf_dir = PATHS["mosquitto_conf"].rsplit("/", 1)[0]  # /etc/mosquitto
    secret_dir = PATHS["mosquitto_passwd"].rsplit("/", 1)[0]  # /etc/mosquitto/iotplat
    unit = ContainerService(
        unit="mosquitto.service", name="mosquitto", description="Mosquitto MQTT broker (iotplat)",
        image=image, command=("/usr/sbin/mosquitto", "-c", PATHS["mosquitto_conf"]),
        # root drops to uid 1883 itself (setuid/setgid); tini (--init, root) needs CAP_KILL to forward SIGHUP and
        # SIGTERM to a process of another user (measured: "Unexpected error when forwarding signal")
        capabilities=("SETGID", "SETUID", "KILL"),
        mounts=(Mount(conf_dir, conf_dir), Mount(TLS_DIR, TLS_DIR),
                Mount("/var/lib/mosquitto", "/var/lib/mosquitto", read_only=False)),
        ports=ports, limits=limits, reload_signal="HUP",
    )
    return ServiceContainer(unit, (
        Ownership(secret_dir, 0, MOSQUITTO_UID, 0o750),
        Ownership("/var/lib/mosquitto", MOSQUITTO_UID, MOSQUITTO_UID, 0o750),
    ))


def influxdb1_service(image: str, port: int, limits: Limits = DEFAULT_LIMITS["influxdb"]) -> ServiceContainer:
    conf_dir = PATHS["influxdb1_conf"].rsplit("/", 1)[0]  # /etc/influxdb
    cred_in = PATHS["influxdb_key"].rsplit("/", 1)[0]  # /run/credentials/influxdb.service (as with LoadCredential)
    cred_host = f"{CREDENTIALS_DIR}/influxdb"
    unit = ContainerService(
        unit="influxdb.service", name="influxdb", description="InfluxDB 1.x (iotplat)", image=image,
        command=("influxd", "-config", PATHS["influxdb1_conf"]), user=f"{INFLUXDB1_UID}:{INFLUXDB1_UID}",
        tmpfs=("/tmp",),
        mounts=(Mount(conf_dir, conf_dir), Mount(TLS_DIR, TLS_DIR), Mount(cred_host, cred_in),
                Mount("/var/lib/influxdb", "/var/lib/influxdb", read_only=False)),
        ports=(port,), limits=limits,
    )
    return ServiceContainer(unit, (
        Ownership(cred_host, 0, INFLUXDB1_UID, 0o750),
        Ownership("/var/lib/influxdb", INFLUXDB1_UID, INFLUXDB1_UID, 0o750),
    ))


WORKER_CREDENTIALS_IN = "/run/credentials/iotplat-worker"


def worker_service(image: str, metrics_port: int, limits: Limits = DEFAULT_LIMITS["worker"]) -> ServiceContainer:
    """The worker replicas' template unit; `{instance}` is the replica number (the unit's %i)."""
    cred_host = f"{CREDENTIALS_DIR}/worker-{INSTANCE}"
    data = f"/var/lib/iotplat-worker/{INSTANCE}"
    unit = ContainerService(
        unit="iotplat-worker@.service", name=f"iotplat-worker-{INSTANCE}",
        description="iotplat ingestion worker (replica in a container)", image=image,
        command=("--config", PATHS["worker_conf"]), user=f"{WORKER_UID}:{WORKER_UID}", tmpfs=("/tmp",),
        mounts=(Mount(PATHS["worker_conf"], PATHS["worker_conf"]), Mount(TLS_DIR, TLS_DIR),
                Mount(cred_host, WORKER_CREDENTIALS_IN), Mount(data, data, read_only=False)),
        env=(("IOTPLAT_WORKER_REPLICA", INSTANCE), ("CREDENTIALS_DIRECTORY", WORKER_CREDENTIALS_IN)),
        ports=(metrics_port,), limits=limits,
    )
    return ServiceContainer(unit, (
        Ownership(cred_host, 0, WORKER_UID, 0o750),
        Ownership(data, WORKER_UID, WORKER_UID, 0o700),
    ))
