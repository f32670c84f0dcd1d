"""Reach a host's internal port from the operator's machine through SSH, never by opening it.

Internal ports (InfluxDB's API) are closed to everything but the platform's own hosts (the host firewall, and a
cloud's security group or NSG): `status`, `restore` and `rotate` reach them with an SSH local forward to the
host's loopback, through the same SSH options (pinned host keys, jump host) as everything else.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator

from .api import Host, HostProviderError

OPEN_TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def forward(host: Host, remote_port: int, remote_address: str = "127.0.0.1") -> Iterator[tuple[str, int]]:
    """(address, port) on this machine that reaches remote_address:remote_port as seen from `host`, while the
    context lasts. Fails with one line when the forward cannot be set up within OPEN_TIMEOUT seconds."""
    for _attempt in range(3):  # another process may take the free port between probing and ssh binding it
        port = _free_port()
        argv = host.ssh_argv()
        argv[1:1] = ["-N", "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{port}:{remote_address}:{remote_port}"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        try:
            deadline = time.monotonic() + OPEN_TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
                time.sleep(0.05)
            else:
                if proc.poll() is None:
                    raise HostProviderError(f"ssh tunnel to {host.name}:{remote_port} did not open within "
                                            f"{OPEN_TIMEOUT:.0f}s")
            if proc.poll() is not None:
                err = (proc.stderr.read() if proc.stderr else "").strip().splitlines()
                if any("Address already in use" in line for line in err):
                    continue
                raise HostProviderError(f"ssh tunnel to {host.name}:{remote_port} failed: "
                                        f"{err[-1] if err else f'exit {proc.returncode}'}")
            yield "127.0.0.1", port
            return
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if proc.stderr:
                proc.stderr.close()
    raise HostProviderError(f"ssh tunnel to {host.name}:{remote_port}: no free local port after 3 attempts")
