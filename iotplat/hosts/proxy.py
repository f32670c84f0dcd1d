"""apt-cacher-ng for the guests: the only way out of the private network.

Bound to one address only (the local target: its bridge address). Debian's archive is remapped to the configured mirror (the
package's default backend is a host name that may not resolve), and CONNECT is allowed to PyPI
only, so `pip install` works in guests too.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

from . import sysutil
from .api import HostProviderError

PASS_THROUGH = r"^(pypi\.org|files\.pythonhosted\.org):443$"


def proxy_url(address: str, port: int) -> str:
    return f"http://{address}:{port}"


def _strip(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.netloc}{parts.path}".rstrip("/")


def config(label: str, address: str, port: int, mirror: str, security: str, conf_dir: Path,
           cache_dir: Path) -> str:
    m, s = _strip(mirror), _strip(security)
    debian_aliases = " ".join(dict.fromkeys([m, "deb.debian.org/debian", "ftp.debian.org/debian", "/debian"]))
    security_aliases = " ".join(
        dict.fromkeys([s, "deb.debian.org/debian-security", "security.debian.org/debian-security",
                       "security.debian.org", "/debian-security"])
    )
    return f"""\
# written by iotplat for {label}; regenerated on every `up`
CacheDir: {cache_dir}
LogDir: {conf_dir / "log"}
SupportDir: /usr/lib/apt-cacher-ng
Port: {port}
BindAddress: {address}
SocketPath: {conf_dir / "socket"}
ForeGround: 1
ConnectProto: v4 v6
ExThreshold: 4
ReportPage: acng-report.html
Remap-debrep: {debian_aliases} ; {mirror.rstrip("/")}/
Remap-secdeb: {security_aliases} ; {security.rstrip("/")}/
PassThroughPattern: {PASS_THROUGH}
"""


def is_running(address: str, port: int, conf_dir: Path) -> bool:
    pid = sysutil.read_pid(conf_dir / "acng.pid")
    return _ours(pid, conf_dir) and sysutil.tcp_open(address, port)


def _ours(pid: int | None, conf_dir: Path) -> bool:
    return bool(pid) and sysutil.alive(pid) and sysutil.mentions(pid, conf_dir)  # type: ignore[arg-type]


def start(label: str, address: str, port: int, mirror: str, security: str, conf_dir: Path,
          cache_dir: Path) -> None:
    """Run apt-cacher-ng on address:port (detached: it outlives this process, like the hosts it serves)."""
    if is_running(address, port, conf_dir):
        return
    stop(conf_dir)
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "log").mkdir(exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "acng.conf").write_text(config(label, address, port, mirror, security, conf_dir, cache_dir))
    binary = sysutil.which("apt-cacher-ng")
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
            if sysutil.tcp_open(address, port, timeout=0.2):
                return
            time.sleep(0.1)
        if proc.poll() is None:
            stop(conf_dir)
            raise HostProviderError(
                f"apt-cacher-ng did not listen on {address}:{port} within 15 s: "
                f"see {conf_dir / 'log'}"
            )
        if time.monotonic() >= deadline:
            tail = (conf_dir / "log" / "stdout.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise HostProviderError(
                f"apt-cacher-ng failed to start ({' '.join(tail) or 'no output'}): is port "
                f"{port} on {address} taken? choose another port (LocalSettings.proxy_port)"
            )
        time.sleep(0.3)


def stop(conf_dir: Path) -> None:
    pid = sysutil.read_pid(conf_dir / "acng.pid")
    pids = set(sysutil.pids_mentioning(conf_dir))
    if _ours(pid, conf_dir):
        pids.add(pid)  # type: ignore[arg-type]
    # apt-cacher-ng takes 1.5-2 s to exit on SIGTERM; the port is free only after that
    sysutil.kill_and_wait(pids, grace=5, what="apt-cacher-ng")
    (conf_dir / "acng.pid").unlink(missing_ok=True)
