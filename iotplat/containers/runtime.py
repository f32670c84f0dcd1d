"""Which runtime each service of a platform uses, which image it runs, and what its hosts receive.

The spec's `runtime` is `package` (the default) or `container` for the whole platform, or a map
`{default: package, broker: container}`; `images.<service>` pins an image by digest (unset: iotplat's pins,
iotplat.containers.images.DEFAULT_IMAGES); `images.archive.<service>` names a local archive (relative to the spec)
that the hosts load instead of pulling.

Supported in this phase: the broker (Mosquitto), InfluxDB 1.x and the worker in containers; the worker's image is
built by iotplat at render from the worker's wheelhouse (the one the package runtime installs) on a verified base
archive (`images.archive.worker_base`: required, since iotplat cannot pull on the controller). Grafana and InfluxDB
2.x are refused by the spec check with one line (`UNSUPPORTED`), never half-deployed.

`container_plan(p)` is the one place render and the roles' inputs come from: per container service the image
reference, and when it comes from an archive the verified image ID (the unit runs the image by that ID) and the
loadable archive iotplat wrote from the verified blobs into the controller's cache (never into the build
directory: the role copies it from there).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from iotplat.spec.units import format_size

from .images import ImageRef, default_image, parse_image_ref
from .oci import Platform as ImagePlatform
from .units import DEFAULT_LIMITS, Limits, limits_dropin

if TYPE_CHECKING:
    from iotplat.services.base import ServiceFile
    from iotplat.spec.model import PlatformSpec

    from .profiles import ServiceContainer
    from iotplat.spec.platform_model import Platform

RuntimeName = Literal["package", "container"]
# The services that can run in a container now, and why the others cannot yet (the spec check's message).
SUPPORTED = ("broker", "influxdb", "worker")
UNSUPPORTED = {
    "grafana": "Grafana in a container is not supported yet (no Grafana image can be built or tested here)",
}
# The spec's images.* key of each service (the worker's image is built on a base image).
IMAGE_KEYS = {"broker": "broker", "influxdb": "influxdb", "grafana": "grafana", "worker": "worker_base"}
# Hosts iotplat deploys to are linux/amd64 (local nspawn hosts, the clouds' Debian images; arm64 sizes are refused
# by check_vm_sizes): the platform an archive is verified for.
HOST_PLATFORM = ImagePlatform("linux", "amd64")
# Where the archives hosts load are kept on the controller (written by iotplat from verified blobs).
CACHE_ENV = "IOTPLAT_IMAGE_CACHE"


def runtime_of(spec: PlatformSpec, service: str) -> RuntimeName:
    """The runtime `service` uses under `spec` (plugin services: always the package runtime)."""
    if service not in IMAGE_KEYS:
        return "package"
    rt = spec.runtime
    return getattr(rt, service) or rt.default


MIB = 1024**2
# The least memory iotplat gives a service (spec `resources`; the broker's floor also grows with its queues):
# below these the kernel would end it under ordinary load.
MEMORY_FLOORS = {
    "worker": (128 * MIB, "a worker replica needs at least 128MiB (its interpreter, in-flight window and batches)"),
    "influxdb": (256 * MIB, "InfluxDB needs at least 256MiB (its index, cache and compactions)"),
    "grafana": (256 * MIB, "Grafana needs at least 256MiB (its server, plugins and dashboards)"),
}
BROKER_BASE_MEMORY = 32 * MIB  # Mosquitto itself, its connections and its persistence writes
NATS_MEMORY_FLOOR = 64 * MIB


def memory_floor(p: Platform, service: str) -> tuple[int, str]:
    """(bytes, why) below which `service` is refused a memory limit."""
    if service != "broker":
        return MEMORY_FLOORS[service]
    if p.spec.broker.engine == "nats":
        return NATS_MEMORY_FLOOR, "nats-server needs at least 64MiB (its connections and JetStream's state)"
    replicas = p.spec.ingestion.replicas
    floor = BROKER_BASE_MEMORY + replicas * p.queue_bytes
    floor = -(-floor // MIB) * MIB
    return floor, (f"Mosquitto keeps each worker replica's queue in memory while the worker is away: {replicas} x "
                   f"{format_size(p.queue_bytes)} (broker.limits.queue_bytes, from ingestion.outage_budget) plus "
                   f"{format_size(BROKER_BASE_MEMORY)} for itself is {floor // MIB}MiB; with less the kernel ends "
                   "it during an outage and the queued messages are lost")


def limits_of(p: Platform, service: str) -> Limits:
    """The limits `service` runs under (of each replica, for the worker): the spec's, else the defaults; the
    broker's default memory grows to its floor (memory_floor) when its worker queues need more than 512MiB."""
    default = DEFAULT_LIMITS[service]
    if service == "broker":
        default = Limits(memory_bytes=max(default.memory_bytes or 0, memory_floor(p, service)[0]), cpus=default.cpus,
                         pids=default.pids)
    written = getattr(p.spec.resources, service, None)
    if written is None:
        return default
    return Limits(memory_bytes=written.memory if written.memory is not None else default.memory_bytes,
                  cpus=written.cpus if written.cpus is not None else default.cpus,
                  pids=written.pids if written.pids is not None else default.pids)


def limited(spec: PlatformSpec, service: str) -> bool:
    """Whether `service` runs under limits: always in a container; as a package when the spec names it."""
    if service not in DEFAULT_LIMITS:
        return False
    return runtime_of(spec, service) == "container" or getattr(spec.resources, service, None) is not None


def container_services(p: Platform) -> list[str]:
    """The services this platform places and runs in a container, in registry order."""
    from iotplat.services import placed

    return [s.name for s in placed(p) if runtime_of(p.spec, s.name) == "container"]


def image_ref(spec: PlatformSpec, service: str) -> ImageRef:
    """The image `service` runs: the spec's pin, else iotplat's default (ImageRefError when neither is usable)."""
    written = getattr(spec.images, IMAGE_KEYS[service])
    if written:
        return parse_image_ref(written)
    key = "worker-base" if service == "worker" else service
    return default_image(key, spec.influxdb.version).ref()


def archive_source(p: Platform, service: str) -> Path | None:
    """The archive the spec names for `service`'s image, resolved against the spec's folder."""
    written = getattr(p.spec.images.archive, IMAGE_KEYS[service])
    if not written:
        return None
    path = Path(written).expanduser()
    return path if path.is_absolute() else p.spec_dir / path


def image_cache() -> Path:
    """The controller's folder of load archives: $IOTPLAT_IMAGE_CACHE, else $XDG_CACHE_HOME/iotplat/images."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iotplat" / "images"


@dataclass(frozen=True)
class ContainerImage:
    """What a container service's hosts need: the pinned reference, and with an archive the image ID the unit runs
    and the loadable archive (its file name in the image cache and its sha256)."""

    service: str
    ref: ImageRef
    image_id: str | None = None  # sha256:<config digest>: from a verified archive
    archive_file: str | None = None  # file name in image_cache()
    archive_sha256: str | None = None  # hex, as Ansible's stat prints it

    @property
    def run(self) -> str:
        """What the unit names: the verified image ID, or NAME@DIGEST for a host that pulls."""
        return self.image_id or self.ref.pinned

    def as_vars(self) -> dict[str, str]:
        out = {"ref": str(self.ref), "tagged": self.ref.tagged, "pinned": self.ref.pinned, "run": self.run}
        if self.image_id and self.archive_file and self.archive_sha256:
            out.update(image_id=self.image_id, archive=self.archive_file, archive_sha256=self.archive_sha256)
        return out


_PLANS: dict[tuple[str, str, str], ContainerImage] = {}


def container_image(p: Platform, service: str) -> ContainerImage:
    """The image of one container service; an archive is verified against the pin (ArchiveError: exit 2) and its
    loadable copy written into image_cache() (cached by the source's size, mtime and the pin)."""
    from .archive import prepare_archive

    ref = image_ref(p.spec, service)
    source = archive_source(p, service)
    if service == "worker":
        return _worker_image(p, ref, source)
    if source is None:
        return ContainerImage(service, ref)
    try:
        st = source.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = ""  # prepare_archive says what is wrong
    key = (service, f"{source}\0{stamp}", str(ref))
    if key not in _PLANS:
        loaded = prepare_archive(source, ref, HOST_PLATFORM, image_cache())
        _PLANS[key] = ContainerImage(service, ref, loaded.image.image_id, loaded.path.name,
                                       loaded.sha256.removeprefix("sha256:"))
    return _PLANS[key]


def wheelhouse_root() -> Path:
    """Where `iotplat up` keeps the worker's wheelhouses ($XDG_CACHE_HOME/iotplat/wheelhouse, as deploy/ops.py)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iotplat" / "wheelhouse"


def _worker_image(p: Platform, base_ref: ImageRef, base_archive: Path | None) -> ContainerImage:
    """The worker image, built from the wheelhouse the package runtime installs, on the verified base archive."""
    from iotplat.deploy.wheelhouse import build_wheelhouse

    from .archive import ArchiveError, prepare_archive
    from .worker_image import build_worker_image

    if base_archive is None:  # check_runtime refuses this before render
        raise ArchiveError("the worker image is built on a base image archive: set images.archive.worker_base")
    wheelhouse = build_wheelhouse(wheelhouse_root())
    st = base_archive.stat() if base_archive.exists() else None
    key = ("worker", f"{base_archive}\0{st.st_size if st else ''}:{st.st_mtime_ns if st else ''}\0{wheelhouse}",
           str(base_ref))
    if key not in _PLANS:
        built = build_worker_image(wheelhouse, base_archive, base_ref, HOST_PLATFORM, image_cache() / "worker")
        loaded = prepare_archive(built.archive, built.ref, HOST_PLATFORM, image_cache())
        _PLANS[key] = ContainerImage("worker", built.ref, loaded.image.image_id, loaded.path.name,
                                     loaded.sha256.removeprefix("sha256:"))
    return _PLANS[key]


def container_plan(p: Platform) -> dict[str, ContainerImage]:
    """Every container service of the platform and its image."""
    return {name: container_image(p, name) for name in container_services(p)}


# --- the registry's hooks: what a service in the container runtime adds to its files and its role's inputs ------

UNIT_DIR = "/etc/systemd/system"  # overrides a package's unit of the same name (/lib/systemd/system)


def service_container(p: Platform, service: str) -> ServiceContainer:
    """The profile (iotplat.containers.profiles) of one container service, with its image and ports."""
    from .profiles import broker_service, influxdb1_service, worker_service

    image = container_image(p, service).run
    limits = limits_of(p, service)
    if service == "broker":
        return broker_service(image, tuple(sorted({lst.port for lst in p.spec.broker.listeners})), limits)
    if service == "influxdb":
        return influxdb1_service(image, p.spec.influxdb.port, limits)
    if service == "worker":
        return worker_service(image, p.spec.ingestion.metrics_port, limits)
    raise ValueError(f"{service} cannot run in a container yet")  # refused by check_runtime before render


def container_files(p: Platform, service: str) -> list[ServiceFile]:
    """The systemd unit that runs the service's container, when it runs in one (else nothing): rendered once, the
    same bytes on each of its hosts, named like the package's unit so status, logs and destroy address it alike."""
    from iotplat.services.base import ServiceFile

    from .units import container_unit

    if runtime_of(p.spec, service) != "container":
        return []
    unit = service_container(p, service).unit
    return [ServiceFile(f"{UNIT_DIR}/{unit.unit}", container_unit(unit).encode())]


def container_vars(p: Platform, service: str, role: str) -> dict[str, object]:
    """The role's inputs for the container runtime: `<role>_runtime: container` and `<role>_container` (image,
    archive to load, unit, directories to own). Nothing for the package runtime (the roles' default), so the bundle
    of a package platform is unchanged byte for byte."""
    out: dict[str, object] = {}
    if runtime_of(p.spec, service) == "container":
        from .engine import ENGINE_PACKAGES, daemon_json

        out["iotplat_container_engine"] = {"packages": {k: list(v) for k, v in ENGINE_PACKAGES.items()},
                                           "daemon_json": daemon_json().decode()}
        out[f"{role}_runtime"] = "container"
        sc = service_container(p, service)
        out[f"{role}_container"] = {
            "image": container_image(p, service).as_vars(),
            "name": sc.unit.name,
            "unit": sc.unit.unit,
            "unit_path": f"{UNIT_DIR}/{sc.unit.unit}",
            "owned": [{"path": o.path, "uid": o.uid, "gid": o.gid, "mode": f"{o.mode:04o}"} for o in sc.owned],
            "pin": str(image_ref(p.spec, service)),  # the spec's images.<key> (or iotplat's default): a version
        }
    return out


# The package's unit of each service that can take limits (the roles' unit names), and the drop-in that holds them.
PACKAGE_UNITS = {"broker": "mosquitto.service", "worker": "iotplat-worker@.service", "influxdb": "influxdb.service",
                 "grafana": "grafana-server.service"}
NATS_UNIT = "nats-server.service"
# Named after the service, so the roles can find and remove the drop-ins a spec no longer names (roles/common/tasks/
# files.yml: `iotplat-resources-<service>.conf` in any unit's drop-in folder that the service's rendered files lack).
LIMITS_DROPIN = "iotplat-resources-{service}.conf"


def package_unit(spec: PlatformSpec, service: str) -> str:
    if service == "broker" and spec.broker.engine == "nats":
        return NATS_UNIT
    return PACKAGE_UNITS[service]


def limits_files(p: Platform, service: str) -> list[ServiceFile]:
    """The package runtime's resource limits: a drop-in of the package's unit (the same limits a container gets,
    units.limits_dropin), when the spec names the service under `resources`; else nothing (a container's limits
    are in its unit; a package without `resources` runs unlimited, as before)."""
    from iotplat.services.base import ServiceFile

    if runtime_of(p.spec, service) != "package" or not limited(p.spec, service):
        return []
    unit = package_unit(p.spec, service)
    return [ServiceFile(f"{UNIT_DIR}/{unit}.d/{LIMITS_DROPIN.format(service=service)}",
                        limits_dropin(unit, limits_of(p, service), service).encode())]


# --- versions: the pinned image is one of a container service's versions (iotplat/deploy/upgrade.py) -------------

def image_version_key(service: str) -> str:
    """The version key (Service.version_keys) of `service`'s pinned image: broker-image, influxdb-image, ..."""
    return f"{service}-image"


def image_version_keys(service: str) -> dict[str, str]:
    """For a service's `version_keys`: its image key and how to roll it back (the digest to set back)."""
    key = IMAGE_KEYS[service]
    return {image_version_key(service): f"set images.{key} back to {{old}} in {{spec}} (and images.archive.{key}, "
                                        "if you give one, to that image's archive)"}


def image_versions(gv: Mapping[str, object], service: str, role: str) -> dict[str, str]:
    """For a service's `versions`: {<service>-image: the pinned image `name:tag@sha256:<digest>`} read from the
    rendered group_vars (`<role>_container.pin`), when the service runs in a container; else nothing. A new digest
    is then an upgrade `up` rolls out host by host with the canary after each, as a new package pin is. The worker's
    pin is its base image (`images.worker_base`); its own image follows its wheelhouse, the `worker` version."""
    container = gv.get(f"{role}_container")
    if not isinstance(container, Mapping) or not container.get("pin"):
        return {}
    return {image_version_key(service): str(container["pin"])}
