"""The aws 3-host stack through the emulated cloud: real program, real machines, real firewall, real disks.

One emulated AWS per module (aws-3host with this test's key, the test network 10.232.0.0/16, the operator's
pool in adminCidrs, small disks, and an `internal` MQTT rule on mqtt as the Azure fixture has): up once, then
SSH, jump host, security groups, data disks, previews of changes, retire/reactivate, a replacement AWS would
refuse, destroy. What this proves: what the stack asks for works as a VPC would run it (addresses, routes,
NAT, security groups, disks, lifecycle). What it cannot: AWS's quotas, real AMIs, cloud-init beyond user and
key, API errors beyond tests/support/cloudsim's `check`, and a guest root removing the emulated SG table.
"""

from __future__ import annotations

import copy
import json
import socket
import time
from pathlib import Path

import pytest
import yaml

from tests.support.cloudsim import leftovers

from .conftest import FIXTURES, Sim, finish_sim, make_sim, outputs

pytestmark = pytest.mark.hosts
STACK = "demo-production"
UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"


def hosts_config() -> list[dict]:
    hosts = copy.deepcopy(yaml.safe_load((FIXTURES / "aws-3host.yaml").read_text())["config"]["iotplat:hosts"])
    for host, gb in zip(hosts, (2, 3, 2), strict=True):
        host["diskGb"] = gb
    hosts[0]["ingress"].append({"port": 8883, "protocol": "tcp", "source": "internal",
                                "description": "MQTT over TLS (worker)"})
    return hosts


@pytest.fixture(scope="module")
def aws(tmp_path_factory: pytest.TempPathFactory):
    sim = make_sim(tmp_path_factory.mktemp("aws") / "sim")
    try:
        cfg = sim.config("aws-3host", "aws", hosts=hosts_config())
        assert sim.pulumi("aws", "stack", "select", "--create", STACK).returncode == 0
        first = sim.pulumi("aws", "preview", "--stack", STACK, "--config-file", str(cfg), "--json")
        assert first.returncode == 0, first.stderr
        started = time.monotonic()
        up = sim.pulumi("aws", "up", "--yes", "--skip-preview", "--stack", STACK, "--config-file", str(cfg))
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr
        yield {"sim": sim, "cfg": cfg, "preview": json.loads(first.stdout), "up": up, "seconds": time.monotonic() - started,
               "out": outputs(sim, "aws", STACK)}
    finally:
        finish_sim(sim)


def tcp(address: str, port: int, timeout: float = 3) -> str:
    try:
        socket.create_connection((address, port), timeout=timeout).close()
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"error {exc.errno}"


def listen(sim: Sim, address: str, port: int, jump: str | None = None) -> None:
    """A TCP listener inside a VM (root, detached), so a refusal is the firewall and not a missing service."""
    cmd = (f"sudo -n sh -c 'nohup python3 -c \"import socket;s=socket.socket();"
           f"s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind((\\\"0.0.0.0\\\",{port}));s.listen();"
           f"[c.close() for c in iter(lambda: s.accept()[0], None)]\" >/dev/null 2>&1 &'")
    done = sim.ssh("admin", address, cmd, jump=jump)
    assert done.returncode == 0, done.stderr
    probe = f"python3 -c \"import socket;socket.create_connection(('127.0.0.1',{port}),2)\""
    deadline = time.monotonic() + 20
    while sim.ssh("admin", address, probe, jump=jump).returncode != 0:
        assert time.monotonic() < deadline, f"listener on {address}:{port} did not start"
        time.sleep(0.3)


def from_vm(sim: Sim, address: str, target: str, port: int, jump: str | None = None) -> str:
    code = (f"python3 -c \"import socket\ntry:\n socket.create_connection(('{target}',{port}),3); print('open')\n"
            f"except ConnectionRefusedError: print('refused')\nexcept OSError as e: print('blocked', e)\"")
    done = sim.ssh("admin", address, code, jump=jump)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split()[0]


def test_first_preview_creates_everything_and_up_exports_addresses(aws) -> None:
    digest = aws["preview"]
    assert {s["op"] for s in digest["steps"]} == {"create"}
    assert list(digest["changeSummary"]) == ["create"]
    out = aws["out"]
    assert set(out["hosts"]) == {"mqtt", "tsdb", "dash"} and out["sshUser"] == "admin"
    assert out["sshJumpHost"] == "mqtt" and out["mode"] == "active"
    assert out["hosts"]["tsdb"]["publicIp"] is None
    for name in ("mqtt", "dash"):
        host = out["hosts"][name]
        assert host["publicIp"].startswith("100.80.") and host["privateIp"].startswith("10.232.0.")
    assert out["hosts"]["tsdb"]["privateIp"].startswith("10.232.1.")  # behind the NAT gateway
    print(f"\nfirst up of aws-3host: {aws['seconds']:.1f} s")


def test_ssh_to_public_hosts_shows_private_address_on_eth0(aws) -> None:
    sim, out = aws["sim"], aws["out"]
    for name in ("mqtt", "dash"):
        host = out["hosts"][name]
        done = sim.ssh("admin", host["publicIp"], "hostname; ip -4 -o addr show dev eth0; sudo -n id -u")
        assert done.returncode == 0, done.stderr
        assert f" {host['privateIp']}/24 " in done.stdout
        assert done.stdout.split()[0] == "ip-" + host["privateIp"].replace(".", "-")  # EC2's hostname
        assert done.stdout.strip().endswith("0")  # passwordless sudo
        assert host["publicIp"] not in done.stdout  # the VM never sees its public address (1:1 NAT)


def test_private_host_only_through_the_jump_host(aws) -> None:
    sim, out = aws["sim"], aws["out"]
    tsdb, jump = out["hosts"]["tsdb"], out["hosts"][out["sshJumpHost"]]
    assert tcp(tsdb["privateIp"], 22) != "open"  # this machine has no route into the VPC
    done = sim.ssh("admin", tsdb["privateIp"], "true", timeout=30)
    assert done.returncode != 0
    done = sim.ssh("admin", tsdb["privateIp"], "ip -4 -o addr show dev eth0; ip route", jump=jump["publicIp"])
    assert done.returncode == 0, done.stderr
    assert f" {tsdb['privateIp']}/24 " in done.stdout and "default via 10.232.1.1" in done.stdout
    # a public host reaches tsdb's SSH only because it is the jump host: dash is not allowed
    assert from_vm(sim, out["hosts"]["dash"]["publicIp"], tsdb["privateIp"], 22) == "blocked"


def test_security_groups_open_only_what_the_stack_opens(aws) -> None:
    sim, out = aws["sim"], aws["out"]
    mqtt, dash = out["hosts"]["mqtt"], out["hosts"]["dash"]
    listen(sim, mqtt["publicIp"], 3000)  # a service on a port mqtt's security group does not open
    listen(sim, mqtt["publicIp"], 8883)
    listen(sim, dash["publicIp"], 3000)
    assert tcp(mqtt["publicIp"], 3000) == "timeout"  # dropped by the SG, though something listens
    assert tcp(mqtt["publicIp"], 8883) == "open"  # devices: 0.0.0.0/0
    assert tcp(dash["publicIp"], 3000) == "open"  # admin CIDRs include this machine
    assert tcp(mqtt["publicIp"], 22) == "open" and tcp(dash["publicIp"], 22) == "open"
    assert tcp(dash["publicIp"], 8883) == "timeout"


def test_internal_ports_only_over_private_addresses(aws) -> None:
    sim, out = aws["sim"], aws["out"]
    mqtt, dash, tsdb = out["hosts"]["mqtt"], out["hosts"]["dash"], out["hosts"]["tsdb"]
    listen(sim, mqtt["publicIp"], 8883)
    listen(sim, tsdb["privateIp"], 8086, jump=mqtt["publicIp"])
    assert from_vm(sim, dash["publicIp"], mqtt["privateIp"], 8883) == "open"
    assert from_vm(sim, dash["publicIp"], mqtt["publicIp"], 8883) == "blocked"  # wrong address: no egress rule
    assert from_vm(sim, dash["publicIp"], tsdb["privateIp"], 8086) == "open"
    assert from_vm(sim, mqtt["publicIp"], tsdb["privateIp"], 8086) == "open"
    assert tcp(tsdb["privateIp"], 8086) != "open"  # never from outside the VPC


def test_data_disks_are_block_devices_at_the_exported_path(aws) -> None:
    sim, out = aws["sim"], aws["out"]
    jump = out["hosts"]["mqtt"]["publicIp"]
    for name, host in out["hosts"].items():
        via = None if host["publicIp"] else jump
        address = host["publicIp"] or host["privateIp"]
        done = sim.ssh("admin", address, f"test -b {host['dataDevice']} && sudo -n blockdev --getsize64 "
                                         f"{host['dataDevice']}", jump=via)
        assert done.returncode == 0, (name, done.stderr)
        assert int(done.stdout) == {"mqtt": 2, "tsdb": 3, "dash": 2}[name] * 2**30


def test_packages_through_the_proxy_from_public_and_nat_hosts(aws) -> None:
    sim, out = aws["sim"], aws["out"]
    jump = out["hosts"]["mqtt"]["publicIp"]
    done = sim.ssh("admin", out["hosts"]["tsdb"]["privateIp"], "sudo -n apt-get -q update", jump=jump, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


def test_no_change_is_all_same(aws) -> None:
    sim, cfg = aws["sim"], aws["cfg"]
    done = sim.pulumi("aws", "preview", "--stack", STACK, "--config-file", str(cfg), "--json", "--show-sames")
    assert done.returncode == 0, done.stderr
    digest = json.loads(done.stdout)
    assert {s["op"] for s in digest["steps"]} == {"same"} and list(digest["changeSummary"]) == ["same"]
    quiet = json.loads(sim.pulumi("aws", "preview", "--stack", STACK, "--config-file", str(cfg), "--json").stdout)
    assert [s["newState"]["type"] for s in quiet["steps"]] == ["pulumi:pulumi:Stack"]  # sames hidden by default


def test_a_newer_image_does_not_replace_instances(aws) -> None:
    """debian-13 resolves to another AMI; the instance's ignore_changes=["ami"] keeps the running hosts."""
    sim = aws["sim"]
    newer = sim.config("aws-3host", "newer", hosts=hosts_config(), image="debian-13")
    done = sim.pulumi("aws", "preview", "--stack", STACK, "--config-file", str(newer), "--json")
    assert done.returncode == 0, done.stderr
    digest = json.loads(done.stdout)
    assert not [s for s in digest["steps"] if s["urn"].split("::")[2].endswith("aws:ec2/instance:Instance")]
    assert list(digest["changeSummary"]) == ["same"]


def test_preview_replace_and_delete(aws) -> None:
    sim = aws["sim"]
    hosts = hosts_config()
    hosts[1]["ingress"].append({"port": 8086, "protocol": "tcp", "source": "admin", "description": "InfluxDB"})
    moved = sim.config("aws-3host", "moved", hosts=hosts)
    digest = json.loads(sim.pulumi("aws", "preview", "--stack", STACK, "--config-file", str(moved), "--json").stdout)
    vm = next(s for s in digest["steps"] if s["urn"].endswith("::demo-production-tsdb-vm"))
    assert vm["op"] == "replace" and {"privateIp", "subnetId"} <= set(vm["replaceReasons"])
    attach = next(s for s in digest["steps"] if s["urn"].endswith("::demo-production-tsdb-data-attachment"))
    assert attach["op"] == "replace" and attach["replaceReasons"] == ["instanceId"]
    volume = [s for s in digest["steps"] if s["urn"].endswith("::demo-production-tsdb-data")]
    assert volume == []  # the data volume itself is unchanged
    fewer = sim.config("aws-3host", "fewer", hosts=hosts_config()[:2])
    digest = json.loads(sim.pulumi("aws", "preview", "--stack", STACK, "--config-file", str(fewer), "--json").stdout)
    deleted = {s["urn"].rsplit("::", 1)[1] for s in digest["steps"] if s["op"] == "delete"}
    assert {"demo-production-dash-vm", "demo-production-dash-data", "demo-production-dash-ip"} <= deleted
    assert not any("mqtt" in u or "tsdb" in u for u in deleted)


def test_stack_rm_refused_while_resources_exist(aws) -> None:
    done = aws["sim"].pulumi("aws", "stack", "rm", "--yes", STACK)
    assert done.returncode == 255 and "still has resources; removal rejected" in done.stderr


def test_retired_keeps_the_disk_and_active_attaches_the_same_data(aws) -> None:
    sim, cfg, out = aws["sim"], aws["cfg"], aws["out"]
    jump, tsdb = out["hosts"]["mqtt"]["publicIp"], out["hosts"]["tsdb"]
    dev = tsdb["dataDevice"]
    done = sim.ssh("admin", tsdb["privateIp"], f"sudo -n sh -c 'mkfs.ext4 -q {dev} && mount {dev} /mnt && "
                                               f"echo kept-across-retire > /mnt/proof && umount /mnt'", jump=jump)
    assert done.returncode == 0, done.stderr
    retired = sim.config("aws-3host", "retired", hosts=hosts_config(), mode="retired")
    done = sim.pulumi("aws", "up", "--yes", "--skip-preview", "--stack", STACK, "--config-file", str(retired))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    state = outputs(sim, "aws", STACK)
    assert state["mode"] == "retired" and state["hosts"]["tsdb"]["dataDevice"] == dev
    left = leftovers(sim.backend, "iotplat", STACK, sim.cloud_root)
    assert not any(x.startswith(("netns", "link", "process", "loop")) for x in left), left
    assert sum(x.endswith(".img") for x in left) == 3  # the three volumes, nothing else of the VMs
    done = sim.pulumi("aws", "up", "--yes", "--skip-preview", "--stack", STACK, "--config-file", str(cfg))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    again = outputs(sim, "aws", STACK)
    assert again["hosts"]["tsdb"]["dataDevice"] == dev
    jump = again["hosts"]["mqtt"]["publicIp"]
    done = sim.ssh("admin", tsdb["privateIp"], f"sudo -n sh -c 'mount {dev} /mnt && cat /mnt/proof'", jump=jump)
    assert done.returncode == 0 and done.stdout.strip() == "kept-across-retire", done.stderr
    aws["out"] = again


def test_replacing_an_instance_moves_its_volume(aws) -> None:
    """A changed private IP replaces the instance. Pulumi creates a replacement before it deletes the old one, so
    before the stack said `delete_before_replace` on the volume attachment, the new attachment was made while the
    old one still held the volume and AWS answered VolumeInUse (this test failed so). Now the old attachment goes
    first and the new instance gets the same volume, with its data."""
    sim = aws["sim"]
    hosts = hosts_config()
    hosts[1]["ingress"].append({"port": 8086, "protocol": "tcp", "source": "admin", "description": "InfluxDB"})
    moved = sim.config("aws-3host", "moved-up", hosts=hosts)
    done = sim.pulumi("aws", "up", "--yes", "--skip-preview", "--stack", STACK, "--config-file", str(moved))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    after = outputs(sim, "aws", STACK)
    tsdb = after["hosts"]["tsdb"]
    assert tsdb["publicIp"] and tsdb["privateIp"] != aws["out"]["hosts"]["tsdb"]["privateIp"]  # a new instance
    dev = tsdb["dataDevice"]
    done = sim.ssh("admin", tsdb["publicIp"], f"sudo -n sh -c 'mount {dev} /mnt && cat /mnt/proof'")
    assert done.returncode == 0 and done.stdout.strip() == "kept-across-retire", done.stderr
    aws["out"] = after


def test_destroy_removes_everything(aws) -> None:
    sim = aws["sim"]
    started = time.monotonic()
    done = sim.pulumi("aws", "destroy", "--yes", "--stack", STACK)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    assert leftovers(sim.backend, "iotplat", STACK, sim.cloud_root) == []
    assert outputs(sim, "aws", STACK) == {}
    assert sim.pulumi("aws", "stack", "rm", "--yes", STACK).returncode == 0
    print(f"\ndestroy of aws-3host: {seconds:.1f} s")
    assert not list(Path("/sys/class/net").glob(f"cs?{_key(sim)}*"))


def _key(sim: Sim) -> str:
    from tests.support.cloudsim import stack_key

    return stack_key(sim.backend, "iotplat", STACK)
