"""The shared base image: a Debian 12 root file system built once with mmdebstrap.

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

from . import _sys
from .api import HostProviderError
from .settings import SSH_USER, SUITE, LocalSettings

FORMAT = 3  # bump when the customisation below changes: every machine then rebuilds its base
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


def sources_list(mirror: str, security: str) -> str:
    """Debian's usual three sources. Guests reach them through the apt proxy, which speaks http."""
    m, s = _http(mirror), _http(security)
    return (
        f"deb {m} {SUITE} main\n"
        f"deb {m} {SUITE}-updates main\n"
        f"deb {s} {SUITE}-security main\n"
    )


def _http(url: str) -> str:
    return "http://" + url.split("://", 1)[1] if url.startswith("https://") else url


def base_key(settings: LocalSettings, mirror: str, security: str) -> str:
    inputs = {
        "format": FORMAT,
        "suite": SUITE,
        "packages": sorted(set(settings.packages)),
        "mirror": mirror,
        "security": security,
        "user": SSH_USER,
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


def ensure_base(settings: LocalSettings, mirror: str, security: str) -> Path:
    """Return the rootfs of the base image for these settings, building it if needed (~25 s)."""
    key = base_key(settings, mirror, security)
    bases = settings.state_dir / "base"
    final = bases / key
    if (final / OK_FILE).is_file():
        return final / "rootfs"
    with file_lock(settings.state_dir / "base.lock", timeout=900, what="building the base image"):
        if (final / OK_FILE).is_file():  # another process built it while we waited
            return final / "rootfs"
        tmp = bases / f"{key}.tmp"
        _sys.remove_tree(tmp)
        if final.exists():
            _sys.remove_tree(final)  # an unfinished build
        tmp.mkdir(parents=True)
        rootfs = tmp / "rootfs"
        build = _sys.run(
            [
                _sys.which("mmdebstrap"),
                "--variant=minbase",
                "--include=" + ",".join(settings.packages),
                "--components=main",
                SUITE,
                str(rootfs),
                f"deb {mirror} {SUITE} main",
                f"deb {mirror} {SUITE}-updates main",
                f"deb {security} {SUITE}-security main",
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
                "that this machine reaches the mirror and that LocalSettings.packages exist in Debian 12)"
            )
        _customize(rootfs, mirror, security)
        info = {"key": key, "mirror": mirror, "security": security, "packages": list(settings.packages)}
        (tmp / OK_FILE).write_text(json.dumps(info, indent=2) + "\n")
        os.rename(tmp, final)
    return final / "rootfs"


def _customize(root: Path, mirror: str, security: str) -> None:
    etc = root / "etc"
    (etc / "apt" / "sources.list").write_text(sources_list(mirror, security))
    _sys.run(
        ["chroot", str(root), "useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo,adm", SSH_USER],
        what=f"creating user {SSH_USER} in the base image",
    )
    sudoers = etc / "sudoers.d" / SSH_USER
    sudoers.write_text(f"{SSH_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    (etc / "ssh" / "sshd_config.d" / "iotplat.conf").write_text(SSHD_CONFIG)
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()  # every host gets its own keys
    journald = etc / "systemd" / "journald.conf.d"
    journald.mkdir(parents=True, exist_ok=True)
    (journald / "iotplat.conf").write_text(JOURNALD_CONFIG)
    (etc / "machine-id").write_text("")  # every host gets its own id
    for name in ("hostname", "resolv.conf"):
        with contextlib.suppress(FileNotFoundError):
            (etc / name).unlink()
    for unit in MASKED_UNITS:
        link = etc / "systemd" / "system" / unit
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to("/dev/null")


def garbage_collect(settings: LocalSettings, in_use: set[str]) -> None:
    """Remove base images that no instance uses (a changed package list leaves the old one behind)."""
    bases = settings.state_dir / "base"
    if not bases.is_dir():
        return
    with file_lock(settings.state_dir / "base.lock", timeout=60, what="cleaning old base images"):
        for entry in bases.iterdir():
            if not entry.is_dir() or entry.name in in_use or _sys.mounts_under(entry):
                continue
            # a base built in the last minutes may belong to an `up` that has not recorded it yet
            with contextlib.suppress(OSError):
                if time.time() - entry.stat().st_mtime > 600:
                    _sys.remove_tree(entry)
