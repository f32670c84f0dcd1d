"""Teardown: nothing may be left behind, also after the controlling process was SIGKILLed,
and two instances on different networks live side by side."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from iotplat.hosts import local_provider

from .conftest import HIGH, LOW, REPO, STATE_DIR, system_leftovers

pytestmark = pytest.mark.hosts


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iotplat.hosts", *args, "--state-dir", str(STATE_DIR)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
    )


def test_down_removes_everything(make_settings):
    settings = make_settings("pytest-down", HIGH)
    provider = local_provider(settings)
    provider.up(["d1"])
    assert system_leftovers(settings)  # the check does see a running host
    provider.down()
    assert provider.status() == {}
    assert system_leftovers(settings) == []
    provider.down()  # and again: nothing to do, no error


def test_teardown_after_controller_and_hosts_were_sigkilled(make_settings):
    settings = make_settings("pytest-killed", HIGH)
    instance_dir = settings.instance_dir
    up = subprocess.Popen(
        [sys.executable, "-m", "iotplat.hosts", "up", "--instance", settings.instance, "--hosts", "k1,k2",
         "--network", settings.network, "--state-dir", str(STATE_DIR)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        # kill the controller while k2 is booting
        deadline = time.monotonic() + 120
        pid_file = instance_dir / "hosts" / "k2" / "nspawn.pid"
        while not pid_file.exists():
            assert up.poll() is None, up.stdout.read().decode() if up.stdout else ""
            assert time.monotonic() < deadline, "k2 never started"
            time.sleep(0.05)
    finally:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait(timeout=10)
    # a killed session takes the runners and nspawns with it; the guests' processes are orphaned
    for name in ("k1", "k2"):
        for pid_file in ("runner.pid", "nspawn.pid"):
            try:
                os.kill(int((instance_dir / "hosts" / name / pid_file).read_text()), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
    time.sleep(0.5)
    assert any(item.startswith("netns") for item in system_leftovers(settings))
    down = cli("down", "--instance", settings.instance)  # a fresh process, knowing only the instance name
    assert down.returncode == 0, down.stderr
    assert system_leftovers(settings) == []


def test_two_instances_coexist(make_settings):
    a = local_provider(make_settings("pytest-coexist-a", LOW))
    b = local_provider(make_settings("pytest-coexist-b", HIGH))
    (ha,) = a.up(["web"])
    (hb,) = b.up(["web"])  # same logical name, other instance
    assert ha.address != hb.address and ha.ssh_private_key != hb.ssh_private_key
    assert a.exec("web", ["hostname"]).stdout.strip() == "web"
    b.down()
    assert a.status() == {"web": "running"}
    assert b.status() == {}
    out = a.exec("web", ["systemctl", "is-system-running"])
    assert out.stdout.strip() in ("running", "degraded")


def test_cli_up_status_down(make_settings):
    settings = make_settings("pytest-cli", HIGH)
    up = cli("up", "--instance", settings.instance, "--hosts", "c1", "--network", settings.network, "--json")
    assert up.returncode == 0, up.stderr
    assert '"name": "c1"' in up.stdout
    status = cli("status", "--instance", settings.instance)
    assert status.stdout.split() == ["c1", "running"]
    down = cli("down", "--instance", settings.instance)
    assert down.returncode == 0, down.stderr
    assert system_leftovers(settings) == []


def test_errors_are_one_line_with_a_fix():
    bad = cli("up", "--instance", "pytest-bad", "--hosts", "Not_A_Label")
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "DNS label" in bad.stderr
    net = cli("up", "--instance", "pytest-bad", "--hosts", "x", "--network", "8.8.8.0/24")
    assert net.returncode == 1 and "not a private range" in net.stderr


def test_failed_up_leaves_nothing_running(make_settings, monkeypatch):
    from iotplat.hosts import HostProviderError, proxy

    settings = make_settings("pytest-failed-up", HIGH)

    def broken_proxy(*args, **kwargs):
        raise HostProviderError("apt-cacher-ng failed to start (simulated)")

    monkeypatch.setattr(proxy, "start", broken_proxy)
    with pytest.raises(HostProviderError, match="simulated"):
        local_provider(settings).up(["f1"])
    assert system_leftovers(settings) == []


def test_an_instance_belongs_to_the_state_that_created_it(make_settings):
    """Local instances are keyed by platform-environment; the owner recorded by the first `up` keeps another
    state directory of the same platform name from taking over or removing its hosts (issue 9)."""
    from iotplat.hosts import HostProviderError

    settings = make_settings("pytest-owned", HIGH)
    provider = local_provider(settings)
    provider.up(["o1"], owner="state-a")
    assert provider.owner() == "state-a"
    with pytest.raises(HostProviderError, match="another iotplat state directory"):
        provider.up(["o1"], owner="state-b")
    with pytest.raises(HostProviderError, match="another iotplat state directory"):
        provider.down(owner="state-b")
    assert provider.status() == {"o1": "running"}  # nothing was touched
    provider.down(owner="state-a")
    assert provider.status() == {} and system_leftovers(settings) == []
