"""apt-cacher-ng for the guests: the only way out of the private network.

Bound to the bridge address only. Debian's archive is remapped to the configured mirror (the
package's default backend is a host name that may not resolve), and CONNECT is allowed to PyPI
only, so `pip install` works in guests too.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

from . import _sys
from .api import HostProviderError
from .settings import LocalSettings

PASS_THROUGH = r"^(pypi\.org|files\.pythonhosted\.org):443$"


def proxy_url(settings: LocalSettings) -> str:
    return f"http://{settings.bridge_address}:{settings.proxy_port}"


def _strip(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.netloc}{parts.path}".rstrip("/")


def config(settings: LocalSettings, mirror: str, security: str, conf_dir: Path, cache_dir: Path) -> str:
    m, s = _strip(mirror), _strip(security)
    debian_aliases = " ".join(dict.fromkeys([m, "deb.debian.org/debian", "ftp.debian.org/debian", "/debian"]))
    security_aliases = " ".join(
        dict.fromkeys([s, "deb.debian.org/debian-security", "security.debian.org/debian-security",
                       "security.debian.org", "/debian-security"])
    )
    return f"""\
# written by iotplat (local target) for instance {settings.instance}; regenerated on every `up`
CacheDir: {cache_dir}
LogDir: {conf_dir / "log"}
SupportDir: /usr/lib/apt-cacher-ng
Port: {settings.proxy_port}
BindAddress: {settings.bridge_address}
SocketPath: {conf_dir / "socket"}
ForeGround: 1
ConnectProto: v4 v6
ExThreshold: 4
ReportPage: acng-report.html
Remap-debrep: {debian_aliases} ; {mirror.rstrip("/")}/
Remap-secdeb: {security_aliases} ; {security.rstrip("/")}/
PassThroughPattern: {PASS_THROUGH}
"""


def is_running(settings: LocalSettings, conf_dir: Path) -> bool:
    pid = _sys.read_pid(conf_dir / "acng.pid")
    return _ours(pid, conf_dir) and _sys.tcp_open(settings.bridge_address, settings.proxy_port)


def _ours(pid: int | None, conf_dir: Path) -> bool:
    return bool(pid) and _sys.alive(pid) and _sys.mentions(pid, conf_dir)  # type: ignore[arg-type]


def start(settings: LocalSettings, mirror: str, security: str, conf_dir: Path, cache_dir: Path) -> None:
    if is_running(settings, conf_dir):
        return
    stop(conf_dir)
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "log").mkdir(exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "acng.conf").write_text(config(settings, mirror, security, conf_dir, cache_dir))
    binary = _sys.which("apt-cacher-ng")
    deadline = time.monotonic() + 15
    while True:  # a proxy that was just stopped needs a moment to release the port
        log = open(conf_dir / "log" / "stdout.log", "ab")
        try:
            proc = subprocess.Popen(
                [binary, "-c", str(conf_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives this process, like the hosts it serves
                close_fds=True,
            )
        finally:
            log.close()
        (conf_dir / "acng.pid").write_text(f"{proc.pid}\n")
        while time.monotonic() < deadline and proc.poll() is None:
            if _sys.tcp_open(settings.bridge_address, settings.proxy_port, timeout=0.2):
                return
            time.sleep(0.1)
        if proc.poll() is None:
            stop(conf_dir)
            raise HostProviderError(
                f"apt-cacher-ng did not listen on {settings.bridge_address}:{settings.proxy_port} within 15 s: "
                f"see {conf_dir / 'log'}"
            )
        if time.monotonic() >= deadline:
            tail = (conf_dir / "log" / "stdout.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise HostProviderError(
                f"apt-cacher-ng failed to start ({' '.join(tail) or 'no output'}): is port "
                f"{settings.proxy_port} on {settings.bridge_address} taken? set LocalSettings.proxy_port"
            )
        time.sleep(0.3)


def stop(conf_dir: Path) -> None:
    pid = _sys.read_pid(conf_dir / "acng.pid")
    pids = set(_sys.pids_mentioning(conf_dir))
    if _ours(pid, conf_dir):
        pids.add(pid)  # type: ignore[arg-type]
    # apt-cacher-ng takes 1.5-2 s to exit on SIGTERM; the port is free only after that
    _sys.kill_and_wait(pids, grace=5, what="apt-cacher-ng")
    (conf_dir / "acng.pid").unlink(missing_ok=True)
