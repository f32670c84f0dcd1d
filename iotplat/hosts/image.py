"""Shared base images: Debian root file systems built once with mmdebstrap, one per ImageSpec.

Hosts mount it read-only as the lower layer of an overlay, so it must never change while in use;
a different package list or mirror gives a different image (its key is a hash of the inputs).
Per-host and per-instance files (hostname, keys, proxy, CA certificates) go into each host's upper layer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from . import sysutil
from .api import HostProviderError
from .settings import ImageSpec

FORMAT = 4  # bump when the customisation below changes: every machine then rebuilds its base
MASKED_UNITS = (  # timers that would grab the apt lock in the middle of a deployment
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "apt-daily.service",
    "apt-daily-upgrade.service",
)
SSHD_CONFIG = """\
# iotplat local target: key authentication only, no root login (like a hardened bare-metal host)
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
"""
JOURNALD_CONFIG = """\
# iotplat local target: journald preallocates 8 MB per journal file; keep each host's upper layer small
[Journal]
SplitMode=none
SystemMaxFileSize=2M
SystemMaxUse=32M
"""
OK_FILE = "iotplat-base.json"


def sources_list(suite: str, mirror: str, security: str) -> str:
    """Debian's usual three sources. Guests reach them through the apt proxy, which speaks http."""
    m, s = _http(mirror), _http(security)
    return (
        f"deb {m} {suite} main\n"
        f"deb {m} {suite}-updates main\n"
        f"deb {s} {suite}-security main\n"
    )


def _http(url: str) -> str:
    return "http://" + url.split("://", 1)[1] if url.startswith("https://") else url


def base_key(image: ImageSpec, mirror: str, security: str) -> str:
    inputs = {
        "format": FORMAT,
        "suite": image.suite,
        "profile": image.profile,
        "packages": sorted(set(image.packages)),
        "mirror": mirror,
        "security": security,
        "user": image.user,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path: Path, *, timeout: float, what: str) -> Iterator[None]:
    """An exclusive flock, waited for at most `timeout` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise HostProviderError(
                        f"{what}: {path} is locked by another iotplat process; wait for it or stop it"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def ensure_base(image: ImageSpec, state_dir: Path, mirror: str, security: str) -> Path:
    """Return the rootfs of the base image `image` (under state_dir/base/), building it if needed (~25 s)."""
    key = base_key(image, mirror, security)
    bases = state_dir / "base"
    final = bases / key
    if (final / OK_FILE).is_file():
        with contextlib.suppress(OSError):
            os.utime(final / OK_FILE)  # last used: keeps it from garbage_collect
        return final / "rootfs"
    with file_lock(state_dir / "base.lock", timeout=900, what="building the base image"):
        if (final / OK_FILE).is_file():  # another process built it while we waited
            return final / "rootfs"
        tmp = bases / f"{key}.tmp"
        sysutil.remove_tree(tmp)
        if final.exists():
            sysutil.remove_tree(final)  # an unfinished build
        tmp.mkdir(parents=True)
        rootfs = tmp / "rootfs"
        build = sysutil.run(
            [
                sysutil.which("mmdebstrap"),
                "--variant=minbase",
                "--include=" + ",".join(image.packages),
                "--components=main",
                image.suite,
                str(rootfs),
                f"deb {mirror} {image.suite} main",
                f"deb {mirror} {image.suite}-updates main",
                f"deb {security} {image.suite}-security main",
            ],
            what=f"building the base image from {mirror} with mmdebstrap",
            timeout=900,
            check=False,
        )
        log = bases / "build.log"
        log.write_text(build.stdout + build.stderr)
        if build.returncode != 0:
            errors = [line for line in build.stderr.splitlines() if line.startswith("E:")] or ["failed"]
            raise HostProviderError(
                f"building the base image with mmdebstrap from {mirror}: {errors[0]} (see {log}; check "
                f"that this machine reaches the mirror and that the packages exist in Debian {image.suite})"
            )
        _customize(rootfs, image, mirror, security)
        info = {"key": key, "suite": image.suite, "profile": image.profile, "mirror": mirror, "security": security,
                "packages": list(image.packages), "user": image.user}
        (tmp / OK_FILE).write_text(json.dumps(info, indent=2) + "\n")
        os.rename(tmp, final)
    return final / "rootfs"


def _customize(root: Path, image: ImageSpec, mirror: str, security: str) -> None:
    """What every image needs (sources, the login user a provisioned server has, per-host identity removed),
    plus, for the "iotplat" profile only, the local target's tuning."""
    etc = root / "etc"
    sources = etc / "apt" / "sources.list.d" / "debian.sources"
    sources.unlink(missing_ok=True)  # trixie's mmdebstrap writes deb822 sources; one list, as a server has
    (etc / "apt" / "sources.list").write_text(sources_list(image.suite, mirror, security))
    if image.user:
        from .machine import create_user

        create_user(root, image.user)
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()  # every host gets its own keys
    (etc / "machine-id").write_text("")  # every host gets its own id
    for name in ("hostname", "resolv.conf"):
        with contextlib.suppress(FileNotFoundError):
            (etc / name).unlink()
    if image.profile != "iotplat":
        return
    (etc / "ssh" / "sshd_config.d" / "iotplat.conf").write_text(SSHD_CONFIG)
    journald = etc / "systemd" / "journald.conf.d"
    journald.mkdir(parents=True, exist_ok=True)
    (journald / "iotplat.conf").write_text(JOURNALD_CONFIG)
    for unit in MASKED_UNITS:
        link = etc / "systemd" / "system" / unit
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to("/dev/null")


def garbage_collect(state_dir: Path, in_use: set[str], keep_days: float = 7) -> None:
    """Remove base images that no instance uses and no `up` used for `keep_days` (a changed package list or
    mirror leaves the old one behind; images of other suites and profiles stay cached while in use)."""
    bases = state_dir / "base"
    if not bases.is_dir():
        return
    with file_lock(state_dir / "base.lock", timeout=60, what="cleaning old base images"):
        for entry in bases.iterdir():
            if not entry.is_dir() or entry.name in in_use or sysutil.mounts_under(entry):
                continue
            marker = entry / OK_FILE
            # an unfinished build (no marker) may belong to an `up` that is building it right now
            with contextlib.suppress(OSError):
                used = marker.stat().st_mtime if marker.exists() else entry.stat().st_mtime
                if time.time() - used > keep_days * 86400:
                    sysutil.remove_tree(entry)
