"""The azure 1-host stack through the emulated cloud, next to an aws stack with the same VPC CIDR.

One module cloud: azure-1host (user iotops, NSG with priorities and the deny-all at 4096) and aws-1host, both
on 10.232.0.0/16 in one backend each, up at the same time on this machine. What this proves: Azure's NIC,
public IP, NSG and managed-disk wiring work as a VNet would run them, and two stacks (two clouds) coexist even
with the same private range. What it cannot: Azure's quotas, marketplace images, the VM agent beyond user and
key, API errors beyond tests/support/cloudsim's `check`, or a guest root removing the emulated NSG table.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.support.cloudsim import leftovers

from .conftest import Sim, finish_sim, make_sim, outputs
from .test_cloudsim_aws import tcp

pytestmark = pytest.mark.hosts
STACK = "demo-production"


@pytest.fixture(scope="module")
def clouds(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("azure")
    sim = make_sim(base / "sim")  # one backend per platform/environment/target, as iotplat keeps them
    other = make_sim(base / "aws", cloud_root=sim.cloud_root)
    try:
        az_cfg = sim.config("azure-1host", "azure", hosts=[{**_core(), "diskGb": 4}])
        aws_cfg = other.config("aws-1host", "aws")
        for s, cloud, cfg in ((sim, "azure", az_cfg), (other, "aws", aws_cfg)):
            assert s.pulumi(cloud, "stack", "select", "--create", STACK).returncode == 0
            done = s.pulumi(cloud, "up", "--yes", "--skip-preview", "--stack", STACK, "--config-file", str(cfg))
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr
        yield {"sim": sim, "other": other, "azure": outputs(sim, "azure", STACK),
               "aws": outputs(other, "aws", STACK), "cfg": az_cfg}
    finally:
        finish_sim(other, remove_root=False)
        finish_sim(sim)


def _core() -> dict:
    import yaml

    from .conftest import FIXTURES

    return yaml.safe_load((FIXTURES / "azure-1host.yaml").read_text())["config"]["iotplat:hosts"][0]


def listen(sim: Sim, address: str, port: int) -> None:
    cmd = (f"sudo -n sh -c 'nohup python3 -c \"import socket;s=socket.socket();"
           f"s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind((\\\"0.0.0.0\\\",{port}));s.listen();"
           f"[c.close() for c in iter(lambda: s.accept()[0], None)]\" >/dev/null 2>&1 &'")
    assert sim.ssh("iotops", address, cmd).returncode == 0
    probe = f"python3 -c \"import socket;socket.create_connection(('127.0.0.1',{port}),2)\""
    deadline = time.monotonic() + 20
    while sim.ssh("iotops", address, probe).returncode != 0:
        assert time.monotonic() < deadline
        time.sleep(0.3)


def test_both_clouds_coexist_with_the_same_private_range(clouds) -> None:
    sim = clouds["sim"]
    core = clouds["azure"]["hosts"]["core"]
    aws_host = next(iter(clouds["aws"]["hosts"].values()))
    assert core["privateIp"].startswith("10.232.0.") and aws_host["privateIp"].startswith("10.232.0.")
    assert core["publicIp"].rsplit(".", 1)[0] != aws_host["publicIp"].rsplit(".", 1)[0]  # one /24 per stack
    done = sim.ssh("iotops", core["publicIp"], "hostname; ip -4 -o addr show dev eth0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "core" and f" {core['privateIp']}/24 " in done.stdout
    done = clouds["other"].ssh("admin", aws_host["publicIp"], "ip -4 -o addr show dev eth0")
    assert done.returncode == 0 and f" {aws_host['privateIp']}/24 " in done.stdout


def test_nsg_opens_only_declared_ports(clouds) -> None:
    sim, core = clouds["sim"], clouds["azure"]["hosts"]["core"]
    for port in (8086, 8883, 3000):
        listen(sim, core["publicIp"], port)
    listen(sim, core["publicIp"], 9999)
    assert tcp(core["publicIp"], 8883) == "open"  # devices
    assert tcp(core["publicIp"], 3000) == "open"  # admin CIDRs include this machine
    assert tcp(core["publicIp"], 8086) == "timeout"  # internal only: the deny-all at 4096
    assert tcp(core["publicIp"], 9999) == "timeout"
    assert tcp(core["privateIp"], 22) != "open"


def test_managed_disk_at_lun0_and_apt_through_the_proxy(clouds) -> None:
    sim, core = clouds["sim"], clouds["azure"]["hosts"]["core"]
    assert core["dataDevice"] == "/dev/disk/azure/scsi1/lun0"
    done = sim.ssh("iotops", core["publicIp"], f"sudo -n sh -c 'mkfs.ext4 -q {core['dataDevice']} && "
                                               f"mount {core['dataDevice']} /mnt && touch /mnt/x && df -h /mnt'")
    assert done.returncode == 0, done.stderr
    done = sim.ssh("iotops", core["publicIp"], "sudo -n apt-get -q update", timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


def test_destroy_one_cloud_leaves_the_other(clouds) -> None:
    sim, other = clouds["sim"], clouds["other"]
    done = sim.pulumi("azure", "destroy", "--yes", "--stack", STACK)
    assert done.returncode == 0, done.stderr
    assert leftovers(sim.backend, "iotplat", STACK, sim.cloud_root) == []
    assert json.loads(sim.pulumi("azure", "stack", "output", "--json", "--stack", STACK).stdout) == {}
    aws_host = next(iter(clouds["aws"]["hosts"].values()))
    assert other.ssh("admin", aws_host["publicIp"], "true").returncode == 0  # the other cloud still runs
    assert leftovers(other.backend, "iotplat", STACK, other.cloud_root) != []
    done = other.pulumi("aws", "destroy", "--yes", "--stack", STACK)
    assert done.returncode == 0, done.stderr
    assert leftovers(other.backend, "iotplat", STACK, other.cloud_root) == []


def test_purge_cleans_up_after_a_killed_up(sim: Sim) -> None:
    """SIGKILL the double in the middle of `up` (machines half made): purge(backend) removes all of it."""
    import signal
    import subprocess

    from iotplat.hosts import network

    from tests.support.cloudsim import purge, stack_key

    cfg = sim.config("aws-1host", "killed")
    assert sim.pulumi("aws", "stack", "select", "--create", STACK).returncode == 0
    proc = subprocess.Popen(["pulumi", "up", "--yes", "--skip-preview", "--stack", STACK, "--config-file", str(cfg)],
                            cwd=sim.stacks / "aws", env=sim.env("aws"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    key = stack_key(sim.backend, "iotplat", STACK)
    deadline = time.monotonic() + 120
    try:
        while not [n for n in network.netns_list(f"cloudsim-{key}-") if not n.endswith("-rt")]:
            assert proc.poll() is None or time.monotonic() < deadline, "up ended before any VM existed"
            assert time.monotonic() < deadline, "no VM netns appeared"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert leftovers(sim.backend, "iotplat", STACK, sim.cloud_root) != []
    purge(sim.backend, sim.cloud_root)
    assert leftovers(sim.backend, "iotplat", STACK, sim.cloud_root) == []
