"""Pure parts of the local provider: settings, names, apt sources, proxy config (no root needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotplat.hosts import HostProviderError, ImageSpec, LocalSettings
from iotplat.hosts.image import base_key, sources_list
from iotplat.hosts.proxy import config
from iotplat.hosts.settings import apt_mirrors, check_hostname


def test_names_fit_linux_interface_limits_and_differ_per_instance():
    a, b = LocalSettings("shop-prod"), LocalSettings("shop-staging", network="10.213.1.0/24")
    for s in (a, b):
        assert len(s.bridge) <= 15 and len(s.veth_of(s.max_hosts - 1)) <= 15
    assert a.bridge != b.bridge and a.netns_prefix != b.netns_prefix
    assert a.instance_dir != b.instance_dir


def test_addresses_of_a_24_and_a_25():
    s = LocalSettings("x")
    assert (s.bridge_address, s.gateway, s.address_of(0), s.address_of(1)) == (
        "10.213.0.1", "10.213.0.254", "10.213.0.11", "10.213.0.12")
    half = LocalSettings("x", network="10.213.0.128/25")
    assert (half.bridge_address, half.gateway, half.address_of(0)) == ("10.213.0.129", "10.213.0.254", "10.213.0.139")
    assert half.max_hosts == 128 - 11 - 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"instance": "bad name"}, "invalid instance name"),
        ({"instance": "x", "network": "8.8.8.0/24"}, "not a private range"),
        ({"instance": "x", "network": "10.213.0.0/29"}, "too small"),
        ({"instance": "x", "network": "10.213.0.1/24"}, "invalid network"),
        ({"instance": "x", "proxy_port": 0}, "not a TCP port"),
    ],
)
def test_invalid_settings_fail_with_a_fix(kwargs, message):
    with pytest.raises(HostProviderError, match=message):
        LocalSettings(**kwargs)


@pytest.mark.parametrize("name", ["h1", "broker", "worker-2", "a" * 63])
def test_dns_labels_are_host_names(name):
    check_hostname(name)


@pytest.mark.parametrize("name", ["", "H1", "-x", "x-", "a_b", "a.b", "a" * 64])
def test_other_host_names_are_refused(name):
    with pytest.raises(HostProviderError, match="DNS label"):
        check_hostname(name)


def test_apt_mirrors_from_deb822_and_one_line_sources(tmp_path: Path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security/\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert apt_mirrors(tmp_path) == ("http://mirror.example/debian", "http://mirror.example/debian-security")
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text("deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n")
    assert apt_mirrors(tmp_path) == ("http://m.example/debian", "http://m.example/debian-security")
    (tmp_path / "sources.list").unlink()
    assert apt_mirrors(tmp_path) == ("http://deb.debian.org/debian", "http://deb.debian.org/debian-security")


def test_base_key_changes_with_its_inputs_only():
    s = LocalSettings("x")
    m, sec = "http://m/debian", "http://m/debian-security"
    key = base_key(s.image, m, sec)
    assert key == base_key(LocalSettings("other", network="10.1.0.0/24").image, m, sec)
    assert key != base_key(LocalSettings("x", packages=(*s.packages, "curl")).image, m, sec)
    assert key != base_key(s.image, "http://other/debian", sec)
    assert key != base_key(LocalSettings("x", suite="trixie").image, m, sec)
    assert key != base_key(LocalSettings("x", profile="stock").image, m, sec)
    assert key != base_key(LocalSettings("x", ssh_user="ops").image, m, sec)  # the local target's user is baked in
    assert base_key(ImageSpec.stock("trixie"), m, sec) != base_key(ImageSpec.stock("bookworm"), m, sec)
    # a stock image has no user (created on a machine's first boot): one image serves every login name
    assert LocalSettings("x", profile="stock", ssh_user="ops").image == LocalSettings("y", profile="stock").image


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"suite": "buster"}, "unknown Debian suite"),
    ({"profile": "fancy"}, "unknown image profile"),
    ({"ssh_user": "root"}, "invalid login user"),
    ({"ssh_user": "ops\nroot"}, "invalid login user"),
])
def test_invalid_image_settings_fail_with_a_fix(kwargs, message):
    with pytest.raises(HostProviderError, match=message):
        LocalSettings("x", **kwargs)


def test_stock_images_add_nothing_iotplat_relies_on():
    """A bare-metal stand-in must not carry what the local target's image adds (python3-apt, tuning)."""
    stock = ImageSpec.stock("trixie")
    assert "python3-apt" not in stock.packages and stock.profile == "stock" and stock.suite == "trixie"
    assert "python3-apt" in LocalSettings("x").image.packages


def test_guests_use_http_sources_and_the_proxy_remaps_them():
    assert "deb http://m.example/debian bookworm main" in sources_list("bookworm", "https://m.example/debian", "http://s/x")
    assert "deb http://s/x trixie-security main" in sources_list("trixie", "https://m.example/debian", "http://s/x")
    s = LocalSettings("x")
    text = config("test", s.bridge_address, s.proxy_port, "http://m.example/debian",
                  "http://m.example/debian-security", Path("/c"), Path("/cache"))
    assert "BindAddress: 10.213.0.1\n" in text and "Port: 13142\n" in text
    assert "Remap-debrep: m.example/debian deb.debian.org/debian" in text
    assert text.count("; http://m.example/debian/") == 1
    assert "PassThroughPattern: ^(pypi\\.org|files\\.pythonhosted\\.org):443$" in text


def test_a_host_that_stops_while_booting_names_its_console_tail(tmp_path: Path):
    """The error of a host whose runner died while booting carries the console's last lines (CI keeps no files)."""
    from iotplat.hosts.machine import Machine, MachineSpec

    log = tmp_path / "console.log"
    log.write_text("noise\n" * 5000 + "[iotplat-runner 10:00:00] starting: systemd-nspawn\n\n"
                   "Failed to mount overlay\n[iotplat-runner 10:00:01] systemd-nspawn exited with 1\n")
    machine = Machine(MachineSpec(name="core", dir=tmp_path, base=tmp_path / "base", netns="nope"))
    with pytest.raises(HostProviderError) as err:
        machine.wait_booted(deadline=0)
    message = str(err.value)
    assert "host core stopped while booting (its runner is gone; its console ends: [iotplat-runner 10:00:00] " \
           "starting: systemd-nspawn | Failed to mount overlay | [iotplat-runner 10:00:01] systemd-nspawn exited " \
           "with 1)" in message
    assert "\n" not in message and str(log) in message


def test_a_runner_killed_before_its_first_line_is_named_with_its_signal(tmp_path: Path):
    """A runner that dies before it wrote anything (CI saw one, twice, on the emulated cloud's first VM) leaves an
    empty console: the error says how the process this one started ended instead."""
    import signal
    import subprocess

    from iotplat.hosts import machine as machine_mod
    from iotplat.hosts.machine import Machine, MachineSpec

    proc = subprocess.Popen(["sleep", "30"])
    machine_mod.RUNNERS[str(tmp_path)] = proc
    (tmp_path / "runner.pid").write_text(f"{proc.pid}\n")
    try:
        proc.send_signal(signal.SIGKILL)
        machine = Machine(MachineSpec(name="core", dir=tmp_path, base=tmp_path / "base", netns="nope"))
        with pytest.raises(HostProviderError) as err:
            machine.wait_booted(deadline=0)
    finally:
        proc.kill()
        proc.wait()
        machine_mod.RUNNERS.pop(str(tmp_path), None)
    assert f"host core stopped while booting (its runner (pid {proc.pid}) was killed by SIGKILL; its console is " \
           "empty): see " in str(err.value)


def test_a_started_runner_is_named_before_start_returns(tmp_path: Path):
    """Popen returns before the kernel has set up the new program's arguments (vfork): /proc/PID/cmdline can read
    empty for a moment, and runner_pid() called a live runner gone ("stopped while booting" in CI, the runner
    alive). wait_named bridges that moment: after it, the process is found by what it names, every time."""
    import subprocess
    import sys

    from iotplat.hosts import sysutil

    argv = [sys.executable, "-I", "-c", "import time; time.sleep(5)", "--pid-file", str(tmp_path / "nspawn.pid")]
    missed = 0
    for _ in range(150):
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        try:
            assert sysutil.wait_named(proc, tmp_path)
            missed += not (sysutil.alive(proc.pid) and sysutil.mentions(proc.pid, tmp_path))
        finally:
            proc.kill()
            proc.wait()
    assert missed == 0
    ended = subprocess.Popen(["true"])
    assert sysutil.wait_named(ended, tmp_path) is False  # it ended without naming the path
    other = subprocess.Popen(["sleep", "5"])
    try:
        assert sysutil.wait_named(other, tmp_path, timeout=0.2) is False  # never names it
    finally:
        other.kill()
        other.wait()
