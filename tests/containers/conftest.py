"""A module-scoped lab for the container runtime: two local hosts (Debian 12 and 13) with Docker from Debian.

Network: IOTPLAT_CONTAINER_TEST_NETWORK (default 10.236.0.0/24). The hosts get the opt-in container engine
(LocalSettings.container_engine), docker.io installed from Debian's archive through the instance's apt proxy, and
iotplat's daemon.json (no iptables, no bridge). Images reach them as verified load archives in a read-only bind
(/srv/iotplat-images), as they would reach an air-gapped host.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from iotplat.containers.archive import LoadArchive, check_loaded, inspect_argv, load_argv, prepare_archive
from iotplat.containers.engine import DAEMON_JSON_PATH, ENGINE_PACKAGES, daemon_json
from iotplat.containers.oci import Platform
from iotplat.hosts import LocalSettings, local_provider
from iotplat.hosts.machine import Bind
from iotplat.hosts.settings import ImageSpec

NETWORK = os.environ.get("IOTPLAT_CONTAINER_TEST_NETWORK", "10.236.0.0/24")
STATE_DIR = Path(os.environ.get("IOTPLAT_TEST_STATE_DIR", "/var/lib/iotplat/local"))
INSTANCE = "pytest-containers"
IMAGES_IN_HOST = "/srv/iotplat-images"
HOSTS = {"c12": "bookworm", "c13": "trixie"}
RELEASE = {"bookworm": "debian-12", "trixie": "debian-13"}
_settings: list[LocalSettings] = []


def _down_all() -> None:
    for s in _settings:
        try:
            local_provider(s).down()
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"teardown of {s.instance} failed: {exc}", file=sys.stderr)


atexit.register(_down_all)


def why_not_runnable() -> str | None:
    if os.geteuid() != 0:
        return "container hosts need root (network namespaces, overlay mounts, systemd-nspawn)"
    for tool in ("systemd-nspawn", "mmdebstrap"):
        if not shutil.which(tool):
            return f"{tool} not found (.ci/run installs it)"
    return None


@dataclass
class Lab:
    provider: object
    settings: LocalSettings
    addresses: dict[str, str]
    images_dir: Path
    loaded: dict[tuple[str, str], LoadArchive] = field(default_factory=dict)

    def sh(self, host: str, script: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = self.provider.exec(host, ["sh", "-c", script], timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{host}: `{script}` exited {proc.returncode}: {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        return proc

    def root(self, host: str) -> Path:
        """The host's root file system as this machine sees it (its overlay's merged dir)."""
        return self.settings.instance_dir / "hosts" / host / "merged"

    def put(self, host: str, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        target = self.root(host) / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, target)

    def mkdir(self, host: str, path: str, mode: int, uid: int = 0, gid: int = 0) -> None:
        target = self.root(host) / path.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        os.chown(target, uid, gid)
        os.chmod(target, mode)

    def load(self, host: str, archive: LoadArchive) -> float:
        """What a deployment does on the host: docker load the verified archive, then check the image it shows."""
        started = time.monotonic()
        in_host = f"{IMAGES_IN_HOST}/{archive.path.name}"
        proc = self.provider.exec(host, load_argv(in_host), timeout=300)
        assert proc.returncode == 0, proc.stderr
        inspect = self.provider.exec(host, inspect_argv(archive.image.ref), timeout=60)
        check_loaded(inspect.stdout, archive.image)
        self.loaded[(host, archive.image.ref.tagged)] = archive
        return time.monotonic() - started


def prepare(images_dir: Path, archive: Path, ref, platform: Platform = Platform()) -> LoadArchive:  # noqa: ANN001
    return prepare_archive(archive, ref, platform, images_dir)


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Lab:
    reason = why_not_runnable()
    if reason:
        pytest.skip(reason)
    images_dir = STATE_DIR.parent / "test-images" / "load"
    images_dir.mkdir(parents=True, exist_ok=True)
    settings = LocalSettings(instance=INSTANCE, network=NETWORK, state_dir=STATE_DIR, container_engine=True)
    provider = local_provider(settings)
    provider.down()  # leftovers of a killed run
    _settings.append(settings)
    request.addfinalizer(provider.down)  # keeps only the instance's apt cache (warm next time)
    started = time.monotonic()
    hosts = provider.up(
        list(HOSTS),
        images={name: ImageSpec(suite=suite) for name, suite in HOSTS.items()},
        binds={name: [Bind(str(images_dir), IMAGES_IN_HOST, read_only=True)] for name in HOSTS},
    )
    lab = Lab(provider, settings, {h.name: h.address for h in hosts}, images_dir)
    print(f"\nhosts up: {time.monotonic() - started:.1f} s")

    def install(host: str) -> float:
        t = time.monotonic()
        lab.put(host, DAEMON_JSON_PATH, daemon_json())
        packages = " ".join(ENGINE_PACKAGES[RELEASE[HOSTS[host]]])
        lab.sh(host, "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                     f"--no-install-recommends {packages} >/dev/null", timeout=600)
        lab.sh(host, "systemctl restart docker && for i in $(seq 100); do docker info >/dev/null 2>&1 && exit 0; "
                     "sleep 0.1; done; exit 1", timeout=60)
        return time.monotonic() - t

    with concurrent.futures.ThreadPoolExecutor(len(HOSTS)) as pool:
        times = dict(zip(HOSTS, pool.map(install, HOSTS), strict=True))
    print("docker.io installed: " + ", ".join(f"{h} {t:.1f} s" for h, t in times.items()))
    return lab


def docker_json(lab: Lab, host: str, *argv: str) -> object:
    proc = lab.provider.exec(host, ["docker", *argv], timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
