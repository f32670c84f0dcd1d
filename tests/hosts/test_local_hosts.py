"""Two local hosts, used the way the deploy code uses bare metal: SSH with a key, sudo, Ansible, apt."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from iotplat.hosts import Host, LocalSettings, local_provider, network

from .conftest import LOW, STATE_DIR, _created, system_leftovers, why_not_runnable

pytestmark = pytest.mark.hosts

ANSIBLE = Path(sys.executable).with_name("ansible")  # ansible-core from the venv that runs the tests
if not ANSIBLE.exists():
    ANSIBLE = Path(shutil.which("ansible") or "ansible")


@pytest.fixture(scope="module")
def lab(request):
    """Instance `pytest-hosts` with hosts h1 and h2 on the lower half of the test network."""
    reason = why_not_runnable()
    if reason:
        pytest.skip(reason)
    settings = LocalSettings(instance="pytest-hosts", network=LOW, state_dir=STATE_DIR)
    provider = local_provider(settings)
    provider.down()  # leftovers of an earlier, killed run
    _created[settings.instance] = settings
    request.addfinalizer(provider.down)
    started = time.monotonic()
    hosts = provider.up(["h1", "h2"])
    print(f"up h1,h2: {time.monotonic() - started:.1f} s")
    return provider, settings, {h.name: h for h in hosts}


def ssh(host: Host, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
    argv = host.ssh_argv(command)
    argv[1:1] = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def test_hosts_are_what_the_inventory_needs(lab):
    provider, settings, hosts = lab
    assert list(hosts) == ["h1", "h2"]
    assert hosts["h1"].address != hosts["h2"].address
    for host in hosts.values():
        assert host.ssh_user == "deploy" and host.ssh_port == 22
        assert oct(os.stat(host.ssh_private_key).st_mode & 0o777) == "0o600"
    assert provider.status() == {"h1": "running", "h2": "running"}


def test_ssh_with_key_sudo_and_systemd(lab):
    _, settings, hosts = lab
    for name, host in hosts.items():
        out = ssh(host, "hostname; sudo -n id -u; systemctl is-system-running; ip -4 route show default")
        assert out.returncode == 0, out.stderr
        hostname, uid, system_state, route = out.stdout.splitlines()
        assert hostname == name
        assert uid == "0"
        assert system_state in ("running", "degraded")
        assert f"default via {settings.gateway} dev eth0" in route


def test_root_cannot_log_in(lab):
    _, _, hosts = lab
    host = hosts["h1"]
    argv = host.ssh_argv("true")
    argv[-2] = f"root@{host.address}"
    argv[1:1] = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    assert subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode != 0


def test_host_reaches_tcp_port_on_other_host(lab):
    provider, _, hosts = lab
    server = (
        "import socket; s = socket.create_server(('0.0.0.0', 9009)); c, _ = s.accept(); "
        "c.sendall(socket.gethostname().encode()); c.close()"
    )
    out = provider.exec("h2", ["systemd-run", "--unit=iotplat-test-listener", "python3", "-c", server])
    assert out.returncode == 0, out.stderr
    client = (
        "import socket, sys, time\n"
        "deadline = time.monotonic() + 15\n"
        "while True:\n"
        "    try:\n"
        f"        c = socket.create_connection(('{hosts['h2'].address}', 9009), timeout=2); break\n"
        "    except OSError:\n"
        "        if time.monotonic() > deadline: raise\n"
        "        time.sleep(0.2)\n"
        "print(c.recv(100).decode())\n"
    )
    out = ssh(hosts["h1"], f"python3 -c \"{client}\"")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "h2"


def test_ansible_ping_and_facts(lab, tmp_path):
    _, settings, hosts = lab
    inventory = tmp_path / "inventory.ini"
    lines = ["[local]"]
    for h in hosts.values():
        lines.append(
            f"{h.name} ansible_host={h.address} ansible_port={h.ssh_port} ansible_user={h.ssh_user} "
            f"ansible_ssh_private_key_file={h.ssh_private_key} ansible_ssh_common_args='{h.ssh_extra_args}'"
        )
    inventory.write_text("\n".join(lines) + "\n[local:vars]\nansible_python_interpreter=/usr/bin/python3\n")
    env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1"}
    env.pop("ANSIBLE_CONFIG", None)
    ping = subprocess.run(
        [str(ANSIBLE), "local", "-i", str(inventory), "-m", "ansible.builtin.ping"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, check=False,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert ping.stdout.count("SUCCESS") == 2
    facts = subprocess.run(
        [str(ANSIBLE), "local", "-i", str(inventory), "--become", "-m", "ansible.builtin.setup",
         "-a", "filter=ansible_default_ipv4"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, check=False,
    )
    assert facts.returncode == 0, facts.stdout + facts.stderr
    assert facts.stdout.count(f'"gateway": "{settings.gateway}"') == 2
    for h in hosts.values():
        assert f'"address": "{h.address}"' in facts.stdout


def test_apt_install_through_the_proxy(lab):
    _, _, hosts = lab
    out = ssh(
        hosts["h1"],
        "sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q mosquitto-clients"
        " && mosquitto_pub --help | head -1",
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "mosquitto_pub" in out.stdout


def test_up_again_keeps_running_hosts(lab):
    provider, _, hosts = lab
    assert provider.exec("h1", ["touch", "/run/still-up"]).returncode == 0  # /run does not survive a boot
    started = time.monotonic()
    again = provider.up(["h1", "h2"])
    assert time.monotonic() - started < 10
    assert {h.name: h for h in again} == hosts
    assert provider.exec("h1", ["test", "-e", "/run/still-up"]).returncode == 0


def test_restart_brings_host_back_with_sshd(lab):
    provider, _, hosts = lab
    for cmd in (["touch", "/run/before-restart"], ["touch", "/var/tmp/disk-kept"]):
        assert provider.exec("h1", cmd).returncode == 0
    assert provider.exec("h2", ["touch", "/run/h2-untouched"]).returncode == 0
    provider.restart("h1")
    assert provider.status()["h1"] == "running"
    assert provider.exec("h1", ["test", "-e", "/run/before-restart"]).returncode == 1  # it did boot again
    assert provider.exec("h1", ["test", "-e", "/var/tmp/disk-kept"]).returncode == 0  # its "disk" survived
    assert provider.exec("h2", ["test", "-e", "/run/h2-untouched"]).returncode == 0
    out = ssh(hosts["h1"], "systemctl is-active ssh")
    assert out.returncode == 0 and out.stdout.strip() == "active", out.stderr


def test_guest_reboot_comes_back(lab):
    """`systemctl reboot` in a guest (Ansible's reboot module) makes nspawn exit 133; the runner restarts it."""
    provider, _, hosts = lab
    assert provider.exec("h2", ["touch", "/run/before-reboot"]).returncode == 0
    ssh(hosts["h2"], "sudo systemctl reboot")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if provider.status()["h2"] == "running":
            done = provider.exec("h2", ["systemctl", "is-system-running"], timeout=10).stdout.strip()
            gone = provider.exec("h2", ["test", "-e", "/run/before-reboot"], timeout=10).returncode == 1
            if gone and done in ("running", "degraded") and ssh(hosts["h2"], "true", timeout=20).returncode == 0:
                break
        time.sleep(0.3)
    else:
        pytest.fail("h2 did not come back within 60 s after `systemctl reboot`")


def test_host_keys_are_pinned_not_trusted_on_first_use(lab, tmp_path):
    """ssh to a local host checks its key against the instance's known_hosts (written from the host's own disk):
    a host answering with another key is refused, as a reinstalled or impersonated server must be."""
    provider, settings, hosts = lab
    h1, h2 = hosts["h1"], hosts["h2"]
    assert h1.host_keys and all(k.startswith(("ssh-ed25519 ", "ecdsa-sha2-")) for k in h1.host_keys)
    assert "StrictHostKeyChecking=yes" in h1.ssh_extra_args and "/dev/null" not in h1.ssh_extra_args
    assert ssh(h1, "true").returncode == 0
    # the same login against a known_hosts that pins h2's keys for h1's address: refused
    forged = tmp_path / "known_hosts"
    forged.write_text("".join(f"{h1.address} {k}\n" for k in h2.host_keys))
    argv = h1.ssh_argv("true")
    argv[1:1] = ["-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={forged}"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode != 0 and "host key" in r.stderr.lower(), r.stderr


def test_guests_can_load_their_own_firewall(lab):
    """Hosts get CAP_NET_ADMIN in their own netns (nspawn --private-network): nftables rules load and filter,
    so the common role's host firewall is applied here as on a real server."""
    provider, _, hosts = lab
    rules = ("table inet pytest_fw {\n chain input {\n  type filter hook input priority 0; policy accept;\n"
             "  tcp dport 2222 drop\n }\n}\n")
    assert provider.exec("h2", ["sh", "-c", "command -v nft || (apt-get -q update && "
                                "apt-get install -y -q nftables)"], timeout=300).returncode == 0
    loaded = provider.exec("h2", ["sh", "-c", 'printf %s "$1" | nft -f -', "sh", rules])
    assert loaded.returncode == 0, loaded.stderr
    try:
        listener = ("import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                    "s.bind(('0.0.0.0',2222));s.listen();s.accept()")
        provider.exec("h2", ["systemd-run", "--unit=pytest-fw-listener", "python3", "-c", listener])
        probe = (f"import socket;socket.create_connection(('{hosts['h2'].address}',2222),timeout=3)")
        r = ssh(hosts["h1"], f"python3 -c \"{probe}\"")
        assert r.returncode != 0 and "timed out" in r.stderr, r.stderr  # dropped by h2's own ruleset
    finally:
        provider.exec("h2", ["nft", "delete", "table", "inet", "pytest_fw"])
        provider.exec("h2", ["systemctl", "stop", "pytest-fw-listener"])


def test_hosts_have_cgroups_of_their_own_and_restart_one_unit_at_once(lab):
    """With --keep-unit and no systemd here, nspawn puts a guest below its own cgroup: guests started from one cgroup
    shared every unit's cgroup (.../payload/system.slice/ssh.service), and one guest's systemd removing a unit's
    emptied cgroup raced another's attaching to it: restarts failed with status 219/CGROUP (measured: 5 of 200
    concurrent restarts in two hosts; CI's unexplained failed restarts of Mosquitto and InfluxDB carried the same
    message). Each host now has its own."""
    provider, settings, _ = lab
    unit = ("[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStartPre=/bin/true\nExecStart=/bin/sleep 600\n")
    for name in ("h1", "h2"):  # seen from this machine (a guest sees its own cgroup namespace)
        sshd = [p for p in network.netns_pids(settings.netns_prefix + name)
                if Path(f"/proc/{p}/comm").read_text().strip() == "sshd"]
        cgroups = {line for p in sshd for line in Path(f"/proc/{p}/cgroup").read_text().splitlines()
                   if line.startswith("0::") or ":name=systemd:" in line}
        own = f"/iotplat-hosts/{settings.netns_prefix}{name}/payload/system.slice/ssh.service"
        assert sshd and {line.split(":", 2)[2] for line in cgroups} == {own}, cgroups
        put = provider.exec(name, ["sh", "-c", 'printf "$1" > /etc/systemd/system/pytest-race.service && '
                                   "systemctl daemon-reload", "sh", unit])
        assert put.returncode == 0, put.stderr
    loop = "f=0; for i in $(seq 60); do systemctl restart pytest-race || f=$((f+1)); done; echo $f"
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda n: provider.exec(n, ["sh", "-c", loop], timeout=240), ("h1", "h2")))
    for name in ("h1", "h2"):
        provider.exec(name, ["systemctl", "stop", "pytest-race"])
    failed = [r.stdout.strip() for r in runs]
    assert failed == ["0", "0"], (failed, [r.stderr[-500:] for r in runs])


def test_down_leaves_nothing(lab):
    provider, settings, _ = lab
    provider.down()
    assert provider.status() == {}
    assert provider.leftovers() == []
    assert system_leftovers(settings) == []
