"""`check_reachable`: a connect that timed out is retried for a grace period; other failures are not.

The hosts are stand-ins at the process boundary: `ssh_argv` returns a small shell script instead of `ssh`, which
prints what ssh prints on stderr (through a jump host, a slow sshd gives "Connection to UNKNOWN port 65535 timed
out") and exits 255 like ssh; the real check_reachable runs on them. Seen in CI: right after the emulated Azure
VMs were torn down, one `destroy` probe of an AWS host through its bastion timed out once and failed the command.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from iotplat.deploy import ops
from iotplat.errors import IotplatError
from iotplat.hosts import Host


@dataclasses.dataclass(frozen=True)
class ScriptedHost(Host):
    script: str = ""

    def ssh_argv(self, *command: str) -> list[str]:
        return ["sh", "-c", self.script]


def _host(tmp_path: Path, failures: int, message: str) -> ScriptedHost:
    """A host whose first `failures` probes fail with `message` on stderr (exit 255), then succeed."""
    counter = tmp_path / "count"
    counter.write_text("0")
    script = (f'n=$(cat {counter}); echo $((n+1)) > {counter}; '
              f'if [ "$n" -lt {failures} ]; then echo "{message}" >&2; exit 255; fi; exit 0')
    return ScriptedHost(name="tsdb", address="10.0.0.5", ssh_user="admin", ssh_port=22, ssh_private_key="",
                        ssh_extra_args="", script=script)


def _probes(tmp_path: Path) -> int:
    return int((tmp_path / "count").read_text())


@pytest.fixture(autouse=True)
def _no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops.time, "sleep", lambda s: None)  # the 2 s pause between rounds; the grace is real time


def test_a_timed_out_connect_is_retried(tmp_path: Path) -> None:
    host = _host(tmp_path, 2, "Connection to UNKNOWN port 65535 timed out")
    ops.check_reachable([host], tmp_path)  # wait=0, as destroy and plan call it
    assert _probes(tmp_path) == 3


def test_a_refused_connect_fails_at_once_without_wait(tmp_path: Path) -> None:
    host = _host(tmp_path, 5, "ssh: connect to host 10.0.0.5 port 22: Connection refused")
    with pytest.raises(IotplatError, match=r"^tsdb \(10\.0\.0\.5\): SSH as admin failed: .*Connection refused$"):
        ops.check_reachable([host], tmp_path)
    assert _probes(tmp_path) == 1


def test_a_host_that_keeps_timing_out_fails_after_the_grace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "TIMEOUT_GRACE", 0.5)
    host = _host(tmp_path, 10**6, "ssh: connect to host 10.0.0.5 port 22: Connection timed out")
    started = time.monotonic()
    with pytest.raises(IotplatError, match=r"Connection timed out$"):
        ops.check_reachable([host], tmp_path)
    assert _probes(tmp_path) >= 2
    assert time.monotonic() - started < 30
