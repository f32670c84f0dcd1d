"""The emulated cloud on this machine: networks, VMs, disks and firewalls materialised from a stack's state.

After every `up`/`destroy` the double converges this machine to the stack's resources (`reconcile`):

- **VPC / VNet** -> a private bridge `csp<key>` with no address of this machine on it, and a router network
  namespace `cloudsim-<key>-rt` whose leg on that bridge holds every subnet's `.1` (the VPC router; AWS and
  Azure both put the gateway there). This machine gets an `unreachable` route for the VPC CIDR, so traffic
  from the operator to a private address fails at once instead of leaving through this machine's uplink.
- **"The internet"** -> a bridge `csi<key>` where this machine (the operator) has `<pool /24>.1` and the
  router `.2`; the stack's public IPs (EIPs, Azure public IPs) are addresses of the router there. The
  router does what the internet gateway does: 1:1 NAT (DNAT public->private inbound, SNAT outbound and on
  hairpin traffic between VMs that use each other's public address), a NAT gateway's masquerade for the
  subnets routed to it (AWS: route table -> NatGateway; Azure: subnet.natGateway, which also takes precedence
  for VMs that have their own public IP), and nothing else: a VM without a public IP and without a NAT
  gateway has no way out. The router has no default route: the only "internet" is the operator's /24.
- **Packages**: apt-cacher-ng on `<pool /24>.1:80` (iotplat.hosts.proxy), named in each guest's apt
  config; a guest reaches it only if its security group allows TCP 80 out and it has a public path.
- **VM** -> an iotplat.hosts `Machine` (systemd-nspawn, systemd as PID 1) on a fresh stock Debian image
  (`ImageSpec.stock`: bookworm for debian-12, trixie for debian-13; base images cached with the local
  target's), in its own netns on the private bridge with its private IP/24 and the subnet's `.1` as default
  route. Login user and keys as cloud-init / the Azure agent set them up at first boot (AWS: `admin` with the
  key pair's key, or the cloud-config `users:` of the user data; Azure: `adminUsername` with `publicKeys`),
  passwordless sudo, fresh SSH host keys. Hostname: AWS `ip-a-b-c-d` (what Debian's AMIs get), Azure the
  `computerName`. Keys and users are first-boot only: changing user data later does not create a user.
- **Data disk** -> a sparse file per EBS volume / managed disk (`<dir>/clouds/<key>/disks/<id>.img`, size =
  the disk's size), attached as a loop device and bound into the guest at the path the stack exports
  (AWS: `/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol<hex>`, Azure: `/dev/disk/azure/scsi1/lun<n>`).
  The file lives as long as the disk resource; attaching or detaching restarts the VM (nspawn binds exist
  from boot only; a real cloud hot-plugs).
- **Firewall** -> the VM's security group rules (AWS: SecurityGroupIngressRule/EgressRule, allow-only, no
  rule = deny, no default egress) or NSG (Azure: rules by priority, Allow/Deny, then Azure's default rules
  65000-65500) as nftables `table inet cloudsim` in the VM's netns: stateful, ingress and egress. iotplat's
  host firewall replaces only `table inet iotplat`, so both filter, as SG + host firewall do in a cloud.

What this cannot prove: the guest runs with CAP_NET_ADMIN in its netns, so root in the guest could delete
`table inet cloudsim` (in a cloud the SG is outside the VM's reach) - a test of the SG must therefore probe
before root in the guest changes anything but iotplat's own table; provider quotas, real AMIs and images,
cloud-init/agent behaviour beyond the user and key, IMDS, DNS (guests have no resolver; apt uses the proxy),
IPv6, real API errors beyond those in `check`, IAM, and timing (a VM here boots in a second or two).

Everything is recorded in `<dir>/clouds/<key>/cloud.json` before it is created, and named after the stack's
key, so `purge()` removes a backend's clouds even after a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import ipaddress
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from iotplat.hosts import image, machine, network, proxy, sysutil
from iotplat.hosts.api import HostProviderError
from iotplat.hosts.machine import PROPAGATE_DIR, Bind, Machine, MachineSpec
from iotplat.hosts.settings import DEFAULT_STATE_DIR, ImageSpec, apt_mirrors

from . import _providers as P

DEFAULT_DIR = Path("/var/lib/iotplat/cloudsim")
DEFAULT_PUBLIC = "100.80.0.0/16"
BOOT_TIMEOUT = 120
AWS_DEVICE = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{hex}"
AZURE_DEVICE = "/dev/disk/azure/scsi1/lun{lun}"


class CloudError(Exception):
    """The emulated cloud refused an operation (message as the cloud's API would word it)."""


# --- settings and names -----------------------------------------------------------------------------------


def cloud_dir(env: dict[str, str] | None = None) -> Path:
    env = env if env is not None else dict(os.environ)
    return Path(env.get("IOTPLAT_CLOUDSIM_DIR") or DEFAULT_DIR)


def public_pool(env: dict[str, str]) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(env.get("IOTPLAT_CLOUDSIM_PUBLIC") or DEFAULT_PUBLIC)


def images_dir(env: dict[str, str]) -> Path:
    return Path(env.get("IOTPLAT_CLOUDSIM_IMAGES") or DEFAULT_STATE_DIR)


def stack_key(backend: Path, project: str, stack: str) -> str:
    return hashlib.sha256(f"{Path(backend).resolve()}\0{project}\0{stack}".encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Names:
    key: str

    @property
    def private_bridge(self) -> str:
        return f"csp{self.key}"

    @property
    def internet_bridge(self) -> str:
        return f"csi{self.key}"

    @property
    def router(self) -> str:
        return f"cloudsim-{self.key}-rt"

    @property
    def router_vpc_veth(self) -> str:
        return f"csr{self.key}v"

    @property
    def router_inet_veth(self) -> str:
        return f"csr{self.key}i"

    @property
    def netns_prefix(self) -> str:
        return f"cloudsim-{self.key}-"

    def vm_netns(self, vm_id: str) -> str:
        return f"cloudsim-{self.key}-{hashlib.sha256(vm_id.encode()).hexdigest()[:10]}"

    def vm_veth(self, index: int) -> str:
        return f"csv{self.key}{index:03x}"


# --- records ------------------------------------------------------------------------------------------------


def _record_path(root: Path, key: str) -> Path:
    return root / "clouds" / key / "cloud.json"


def load_record(root: Path, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(_record_path(root, key).read_text())
    except (OSError, ValueError):
        return None


def save_record(root: Path, rec: dict[str, Any]) -> None:
    path = _record_path(root, rec["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _new_record(root: Path, key: str, backend: Path, project: str, stack: str) -> dict[str, Any]:
    return {"key": key, "backend": str(Path(backend).resolve()), "project": project, "stack": stack, "slot": None,
            "public_net": None, "infra": None, "vms": {}, "disks": {}}


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- public address slots (one /24 of the pool per stack, machine-wide) -----------------------------------------


def _slots(root: Path) -> dict[str, str]:
    try:
        return json.loads((root / "slots.json").read_text())
    except (OSError, ValueError):
        return {}


def _slot_net(env: dict[str, str], slot: int) -> str:
    return str(list(public_pool(env).subnets(new_prefix=24))[slot])


def public_net_of(backend: Path, project: str, stack: str, env: dict[str, str]) -> str | None:
    """The stack's public /24, if it has one (a preview never allocates: new public IPs show as unknown)."""
    rec = load_record(cloud_dir(env), stack_key(backend, project, stack))
    return rec.get("public_net") if rec else None


def ensure_public_net(backend: Path, project: str, stack: str, env: dict[str, str]) -> str:
    root = cloud_dir(env)
    key = stack_key(backend, project, stack)
    with _lock(root / "slots.lock"):
        rec = load_record(root, key) or _new_record(root, key, backend, project, stack)
        if rec.get("public_net"):
            return rec["public_net"]
        slots = _slots(root)
        for k, owner in list(slots.items()):  # slots of clouds whose record is gone (purged by hand)
            if load_record(root, owner) is None:
                del slots[k]
        count = len(list(public_pool(env).subnets(new_prefix=24)))
        taken = _machine_networks()  # another cloud dir's stacks (or anything else) may use a /24 of the pool
        slot = next((n for n in range(count) if str(n) not in slots
                     and not any(ipaddress.IPv4Network(_slot_net(env, n)).overlaps(t) for t in taken)), None)
        if slot is None:
            raise CloudError(f"the public address pool {public_pool(env)} is full (IOTPLAT_CLOUDSIM_PUBLIC)")
        slots[str(slot)] = key
        rec.update(slot=slot, public_net=_slot_net(env, slot))
        save_record(root, rec)
        (root / "slots.json").write_text(json.dumps(slots, indent=2) + "\n")
        return rec["public_net"]


def _machine_networks() -> list[ipaddress.IPv4Network]:
    out = _run(["ip", "-j", "-4", "addr", "show"], what="reading this machine's addresses", check=False).stdout
    nets = []
    for link in json.loads(out or "[]"):
        for a in link.get("addr_info", []):
            nets.append(ipaddress.IPv4Network(f"{a['local']}/{a['prefixlen']}", strict=False))
    return nets


def _release_slot(root: Path, rec: dict[str, Any]) -> None:
    with _lock(root / "slots.lock"):
        slots = _slots(root)
        slots = {k: v for k, v in slots.items() if v != rec["key"]}
        (root / "slots.json").write_text(json.dumps(slots, indent=2) + "\n")
    rec.update(slot=None, public_net=None)


def release_if_unused(backend: Path, project: str, stack: str, env: dict[str, str], resources: list[dict]) -> None:
    if public_ips_in(resources):
        return
    root = cloud_dir(env)
    rec = load_record(root, stack_key(backend, project, stack))
    if rec and not rec.get("infra") and not rec.get("vms"):
        _release_slot(root, rec)
        save_record(root, rec)


def public_ips_in(resources: list[dict[str, Any]]) -> set[str]:
    found = set()
    for r in resources:
        out = r.get("outputs") or {}
        if r["type"] == "aws:ec2/eip:Eip" and out.get("publicIp"):
            found.add(out["publicIp"])
        if r["type"] == "azure-native:network:PublicIPAddress" and out.get("ipAddress"):
            found.add(out["ipAddress"])
    return found - {P.UNKNOWN}


# --- the cloud's rules, checked step by step by the engine ----------------------------------------------------


def _live(live: dict[str, dict], typ: str) -> list[dict]:
    return [r for r in live.values() if r.get("type") == typ and not r.get("delete")]


def check(op: str, rec: dict[str, Any], old: dict[str, Any] | None, live: dict[str, dict]) -> None:
    """Refuse what the cloud's API refuses. `live`: what exists at this point of the update (a resource being
    replaced create-before-delete still exists while its replacement is created)."""
    typ, inp = rec["type"], rec.get("inputs") or {}
    if op not in ("create", "replace", "update"):
        return
    if typ == "aws:ec2/subnet:Subnet" and op != "update":
        vpc = next((v for v in _live(live, "aws:ec2/vpc:Vpc") if v.get("id") == inp.get("vpcId")), None)
        if vpc and not ipaddress.IPv4Network(inp["cidrBlock"]).subnet_of(ipaddress.IPv4Network(
                vpc["inputs"]["cidrBlock"])):
            raise CloudError(f"creating EC2 Subnet: InvalidSubnet.Range: The CIDR '{inp['cidrBlock']}' is invalid.")
    if typ == "aws:ec2/instance:Instance" and op != "update":
        subnet = next((s for s in _live(live, "aws:ec2/subnet:Subnet") if s.get("id") == inp.get("subnetId")), None)
        if subnet is None:
            raise CloudError(f"creating EC2 Instance: InvalidSubnetID.NotFound: The subnet ID "
                             f"'{inp.get('subnetId')}' does not exist")
        ip = inp.get("privateIp")
        net = ipaddress.IPv4Network(subnet["inputs"]["cidrBlock"])
        if ip:
            addr = ipaddress.IPv4Address(ip)
            offset = int(addr) - int(net.network_address)
            if addr not in net or offset < 4 or addr == net.broadcast_address:
                raise CloudError(f"creating EC2 Instance: InvalidParameterValue: Address {ip} is not in subnet "
                                 f"{net} or is reserved")
            for other in _live(live, "aws:ec2/instance:Instance"):
                if other["inputs"].get("privateIp") == ip and other.get("inputs", {}).get("subnetId") == inp.get(
                        "subnetId"):
                    raise CloudError(f"creating EC2 Instance: InvalidIPAddress.InUse: Address {ip} is in use.")
        if inp.get("keyName") and not any(k.get("id") == inp["keyName"] for k in _live(live, "aws:ec2/keyPair:KeyPair")):
            raise CloudError(f"creating EC2 Instance: InvalidKeyPair.NotFound: The key pair '{inp['keyName']}' "
                             "does not exist")
        if P.suite_of_ami(str(inp.get("ami"))) is None:
            raise CloudError(f"creating EC2 Instance: InvalidAMIID.NotFound: The image id '[{inp.get('ami')}]' "
                             "does not exist")
    if typ == "aws:ec2/volumeAttachment:VolumeAttachment":
        vol, inst = inp.get("volumeId"), inp.get("instanceId")
        for other in _live(live, "aws:ec2/volumeAttachment:VolumeAttachment"):
            if other["inputs"].get("volumeId") == vol:
                raise CloudError(f"attaching EBS Volume ({vol}) to EC2 Instance ({inst}): VolumeInUse: {vol} is "
                                 f"already attached to an instance")
        volume = next((v for v in _live(live, "aws:ebs/volume:Volume") if v.get("id") == vol), None)
        instance = next((i for i in _live(live, "aws:ec2/instance:Instance") if i.get("id") == inst), None)
        if volume is None or instance is None:
            raise CloudError(f"attaching EBS Volume ({vol}) to EC2 Instance ({inst}): InvalidVolume.NotFound")
        subnet = next((s for s in _live(live, "aws:ec2/subnet:Subnet")
                       if s.get("id") == instance["inputs"].get("subnetId")), None)
        if subnet and subnet["inputs"].get("availabilityZone") != volume["inputs"].get("availabilityZone"):
            raise CloudError(f"attaching EBS Volume ({vol}) to EC2 Instance ({inst}): InvalidVolume.ZoneMismatch: "
                             "The volume is not in the same availability zone as instance")
    if typ == "azure-native:network:NetworkInterface":
        ips = {c.get("privateIPAddress") for c in inp.get("ipConfigurations", [])} - {None}
        for other in _live(live, typ):
            if other["urn"] == rec["urn"]:
                continue
            theirs = {c.get("privateIPAddress") for c in other["inputs"].get("ipConfigurations", [])}
            if ips & theirs:
                raise CloudError(f"PrivateIPAddressInUse: IP configuration of {inp.get('networkInterfaceName')} "
                                 f"uses private IP address {sorted(ips & theirs)[0]}, which is already in use")


# --- what the resources describe -------------------------------------------------------------------------------


@dataclass
class VmSpec:
    id: str
    hostname: str
    suite: str
    user: str
    keys: list[str]
    private_ip: str
    subnet: ipaddress.IPv4Network
    public_ip: str | None  # reachable from the internet at this address
    outbound: str | None  # source address of its outbound traffic (its own public IP or a NAT gateway's)
    ingress: list[str]  # nft rule bodies, in order
    egress: list[str]
    disks: dict[str, str]  # disk id -> device path in the guest
    token: str  # changes of these inputs restart the VM (instance type / size, user data)


@dataclass
class Desired:
    vpc: ipaddress.IPv4Network | None = None
    gateways: list[str] = field(default_factory=list)  # "<.1>/<prefix>" per subnet
    nat_subnets: dict[str, str] = field(default_factory=dict)  # subnet CIDR -> NAT public IP
    public_ips: set[str] = field(default_factory=set)
    vms: dict[str, VmSpec] = field(default_factory=dict)
    disks: dict[str, int] = field(default_factory=dict)  # id -> GiB
    nat_precedence: bool = False  # Azure: a subnet's NAT gateway wins over a VM's own public IP for outbound


def _ports(lo: Any, hi: Any) -> str:
    lo, hi = int(lo), int(hi)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _aws_rule(direction: str, inp: dict[str, Any]) -> str:
    cidr = inp.get("cidrIpv4") or "0.0.0.0/0"
    side = "saddr" if direction == "ingress" else "daddr"
    proto = str(inp.get("ipProtocol", "-1")).lower()
    match = f"ip {side} {cidr}"
    if proto in ("-1", "all"):
        return f"{match} accept"
    if proto in ("icmp", "1"):
        return f"{match} ip protocol icmp accept"
    proto = {"6": "tcp", "17": "udp"}.get(proto, proto)
    return f"{match} {proto} dport {_ports(inp.get('fromPort', 0), inp.get('toPort', 65535))} accept"


def _azure_prefix(value: str, vnet: list[str]) -> str | None:
    """nft match operand for an NSG address prefix (None: any)."""
    if value in ("*", "0.0.0.0/0", "Any"):
        return None
    if value == "VirtualNetwork":
        return "{ " + ", ".join(vnet) + " }"
    if value == "Internet":
        return "!= { " + ", ".join(vnet) + " }"
    return value


def _azure_rules(rules: list[dict[str, Any]], direction: str, vnet: list[str]) -> list[str]:
    wanted = "Inbound" if direction == "ingress" else "Outbound"
    defaults = {
        "Inbound": [
            {"priority": 65000, "access": "Allow", "protocol": "*", "sourceAddressPrefix": "VirtualNetwork",
             "destinationAddressPrefix": "VirtualNetwork", "destinationPortRange": "*"},
            {"priority": 65500, "access": "Deny", "protocol": "*", "sourceAddressPrefix": "*",
             "destinationAddressPrefix": "*", "destinationPortRange": "*"}],
        "Outbound": [
            {"priority": 65000, "access": "Allow", "protocol": "*", "sourceAddressPrefix": "VirtualNetwork",
             "destinationAddressPrefix": "VirtualNetwork", "destinationPortRange": "*"},
            {"priority": 65001, "access": "Allow", "protocol": "*", "sourceAddressPrefix": "*",
             "destinationAddressPrefix": "Internet", "destinationPortRange": "*"},
            {"priority": 65500, "access": "Deny", "protocol": "*", "sourceAddressPrefix": "*",
             "destinationAddressPrefix": "*", "destinationPortRange": "*"}],
    }
    chosen = sorted([r for r in rules if r.get("direction") == wanted] + defaults[wanted],
                    key=lambda r: int(r["priority"]))
    out = []
    for r in chosen:
        verdict = "accept" if r.get("access") == "Allow" else "drop"
        parts = []
        for side, key in (("saddr", "sourceAddressPrefix"), ("daddr", "destinationAddressPrefix")):
            prefixes = r.get(key + "es") or [r.get(key, "*")]
            ops = [_azure_prefix(p, vnet) for p in prefixes]
            if None in ops:
                continue
            if len(ops) == 1:
                parts.append(f"ip {side} {ops[0]}")
            else:
                parts.append(f"ip {side} {{ {', '.join(ops)} }}")
        proto = str(r.get("protocol", "*")).lower()
        ports = r.get("destinationPortRanges") or [r.get("destinationPortRange", "*")]
        if proto in ("tcp", "udp"):
            if "*" not in ports:
                parts.append(f"{proto} dport {{ {', '.join(str(p) for p in ports)} }}")
            else:
                parts.append(f"meta l4proto {proto}")
        elif proto == "icmp":
            parts.append("ip protocol icmp")
        elif "*" not in ports:  # any protocol with ports: tcp and udp
            parts.append(f"meta l4proto {{ tcp, udp }} th dport {{ {', '.join(str(p) for p in ports)} }}")
        out.append(" ".join(parts + [verdict]) if parts else verdict)
    return out


def describe(resources: list[dict[str, Any]]) -> Desired:
    live = [r for r in resources if not r.get("delete")]
    by_type: dict[str, list[dict]] = {}
    by_id: dict[str, dict] = {}
    for r in live:
        by_type.setdefault(r["type"], []).append(r)
        if r.get("id"):
            by_id[r["id"]] = r
    d = Desired()
    d.public_ips = public_ips_in(live)
    for vol in by_type.get("aws:ebs/volume:Volume", []):
        d.disks[vol["id"]] = int(vol["inputs"].get("size", 1))
    for disk in by_type.get("azure-native:compute:Disk", []):
        d.disks[disk["id"]] = int(disk["inputs"].get("diskSizeGB", 4))
    vpcs = by_type.get("aws:ec2/vpc:Vpc", []) + by_type.get("azure-native:network:VirtualNetwork", [])
    if len(vpcs) > 1:
        raise CloudError("the emulated cloud runs one VPC/VNet per stack")
    if not vpcs:
        return d
    if by_type.get("aws:ec2/vpc:Vpc"):
        _describe_aws(d, by_type, by_id)
    else:
        _describe_azure(d, by_type, by_id)
    return d


def _describe_aws(d: Desired, by_type: dict[str, list[dict]], by_id: dict[str, dict]) -> None:
    vpc = by_type["aws:ec2/vpc:Vpc"][0]
    d.vpc = ipaddress.IPv4Network(vpc["inputs"]["cidrBlock"])
    igws = {g["id"] for g in by_type.get("aws:ec2/internetGateway:InternetGateway", [])
            if g["inputs"].get("vpcId") == vpc["id"]}
    nat_ip = {n["id"]: by_id.get(n["inputs"].get("allocationId"), {}).get("outputs", {}).get("publicIp")
              for n in by_type.get("aws:ec2/natGateway:NatGateway", [])}
    route_of: dict[str, str | None] = {}
    assoc = {a["inputs"].get("subnetId"): a["inputs"].get("routeTableId")
             for a in by_type.get("aws:ec2/routeTableAssociation:RouteTableAssociation", [])}
    subnets = {s["id"]: s for s in by_type.get("aws:ec2/subnet:Subnet", []) if s["inputs"].get("vpcId") == vpc["id"]}
    for sid, s in subnets.items():
        net = ipaddress.IPv4Network(s["inputs"]["cidrBlock"])
        d.gateways.append(f"{net.network_address + 1}/{net.prefixlen}")
        table = by_id.get(str(assoc.get(sid)), {})
        route_of[sid] = None
        for route in (table.get("inputs") or {}).get("routes", []):
            if route.get("cidrBlock") != "0.0.0.0/0":
                continue
            if route.get("gatewayId") in igws:
                route_of[sid] = "igw"
            elif route.get("natGatewayId") in nat_ip and nat_ip[route["natGatewayId"]]:
                route_of[sid] = "nat"
                d.nat_subnets[str(net)] = nat_ip[route["natGatewayId"]]
    eip_of = {e["inputs"].get("instance"): e["outputs"].get("publicIp")
              for e in by_type.get("aws:ec2/eip:Eip", []) if e["inputs"].get("instance")}
    keys = {k["id"]: k["inputs"].get("publicKey") for k in by_type.get("aws:ec2/keyPair:KeyPair", [])}
    rules: dict[str, dict[str, list[str]]] = {}
    for direction, typ in (("ingress", "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"),
                           ("egress", "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")):
        for rule in by_type.get(typ, []):
            rules.setdefault(rule["inputs"]["securityGroupId"], {"ingress": [], "egress": []})[direction].append(
                _aws_rule(direction, rule["inputs"]))
    for sg in by_type.get("aws:ec2/securityGroup:SecurityGroup", []):
        if sg["inputs"].get("ingress") or sg["inputs"].get("egress"):
            raise CloudError("inline security group rules are not emulated (use SecurityGroupIngressRule/EgressRule)")
    attached: dict[str, dict[str, str]] = {}
    for a in by_type.get("aws:ec2/volumeAttachment:VolumeAttachment", []):
        vol = a["inputs"]["volumeId"]
        attached.setdefault(a["inputs"]["instanceId"], {})[vol] = AWS_DEVICE.format(hex=vol.replace("-", ""))
    for inst in by_type.get("aws:ec2/instance:Instance", []):
        inp = inst["inputs"]
        sid = inp.get("subnetId")
        net = ipaddress.IPv4Network(subnets[sid]["inputs"]["cidrBlock"])
        ip = inp["privateIp"]
        user, vm_keys = _cloud_init_user(inp.get("userData"), keys.get(inp.get("keyName")))
        public = eip_of.get(inst["id"]) if route_of.get(sid) == "igw" else None
        outbound = public or (d.nat_subnets.get(str(net)) if route_of.get(sid) == "nat" else None)
        ingress, egress = [], []
        for sg in inp.get("vpcSecurityGroupIds", []):
            ingress += rules.get(sg, {}).get("ingress", [])
            egress += rules.get(sg, {}).get("egress", [])
        token = hashlib.sha256(json.dumps([inp.get("instanceType"), inp.get("userData")]).encode()).hexdigest()[:12]
        d.vms[inst["id"]] = VmSpec(
            id=inst["id"], hostname="ip-" + ip.replace(".", "-"), suite=P.suite_of_ami(str(inp.get("ami"))) or "",
            user=user, keys=vm_keys, private_ip=ip, subnet=net, public_ip=public, outbound=outbound,
            ingress=ingress, egress=egress, disks=attached.get(inst["id"], {}), token=token)


def _cloud_init_user(user_data: str | None, key_pair_key: str | None) -> tuple[str, list[str]]:
    """Who can log in after cloud-init's first boot: `users:` of a cloud-config (without `default` the AMI's
    user is not created), else the AMI's default user `admin` with the key pair's key."""
    if user_data and user_data.startswith("#cloud-config"):
        doc = yaml.safe_load(user_data) or {}
        for entry in doc.get("users") or []:
            if isinstance(entry, dict) and entry.get("name"):
                return str(entry["name"]), [str(k) for k in entry.get("ssh_authorized_keys") or []]
    return "admin", [key_pair_key] if key_pair_key else []


def _describe_azure(d: Desired, by_type: dict[str, list[dict]], by_id: dict[str, dict]) -> None:
    vnet = by_type["azure-native:network:VirtualNetwork"][0]
    prefixes = vnet["inputs"]["addressSpace"]["addressPrefixes"]
    d.vpc = ipaddress.IPv4Network(prefixes[0])
    d.nat_precedence = True
    pip = {p["id"]: p["outputs"].get("ipAddress") for p in by_type.get("azure-native:network:PublicIPAddress", [])}
    nat_ip = {n["id"]: pip.get((n["inputs"].get("publicIpAddresses") or [{}])[0].get("id"))
              for n in by_type.get("azure-native:network:NatGateway", [])}
    subnets: dict[str, dict] = {}
    for s in by_type.get("azure-native:network:Subnet", []):
        net = ipaddress.IPv4Network(s["inputs"]["addressPrefix"])
        d.gateways.append(f"{net.network_address + 1}/{net.prefixlen}")
        nat = nat_ip.get(((s["inputs"].get("natGateway") or {}).get("id")))
        subnets[s["id"]] = {"net": net, "nat": nat}
        if nat:
            d.nat_subnets[str(net)] = nat
    nsg_rules = {n["id"]: n["inputs"].get("securityRules", [])
                 for n in by_type.get("azure-native:network:NetworkSecurityGroup", [])}
    for vm in by_type.get("azure-native:compute:VirtualMachine", []):
        inp = vm["inputs"]
        nic = by_id.get(inp["networkProfile"]["networkInterfaces"][0]["id"])
        if nic is None:
            raise CloudError(f"virtual machine {inp.get('vmName')}: its network interface does not exist")
        conf = nic["inputs"]["ipConfigurations"][0]
        sub = subnets.get(conf["subnet"]["id"])
        if sub is None:
            raise CloudError(f"network interface {nic['inputs'].get('networkInterfaceName')}: subnet not found")
        public = pip.get((conf.get("publicIPAddress") or {}).get("id"))
        outbound = sub["nat"] or public
        rules = nsg_rules.get((nic["inputs"].get("networkSecurityGroup") or {}).get("id"), [])
        osp = inp["osProfile"]
        user = osp["adminUsername"]
        keys = [k["keyData"] for k in osp.get("linuxConfiguration", {}).get("ssh", {}).get("publicKeys", [])
                if k.get("path") == f"/home/{user}/.ssh/authorized_keys"]
        ref = inp["storageProfile"]["imageReference"]
        disks = {}
        for dd in inp["storageProfile"].get("dataDisks", []):
            disks[dd["managedDisk"]["id"]] = AZURE_DEVICE.format(lun=int(dd["lun"]))
        token = hashlib.sha256(json.dumps([inp.get("hardwareProfile")]).encode()).hexdigest()[:12]
        d.vms[vm["id"]] = VmSpec(
            id=vm["id"], hostname=osp["computerName"],
            suite=P.AZURE_IMAGES.get((ref.get("publisher"), ref.get("offer"), ref.get("sku")), ""),
            user=user, keys=keys, private_ip=conf["privateIPAddress"], subnet=sub["net"], public_ip=public,
            outbound=outbound, ingress=_azure_rules(rules, "ingress", prefixes),
            egress=_azure_rules(rules, "egress", prefixes), disks=disks, token=token)


# --- system helpers -----------------------------------------------------------------------------------------


def _run(argv: list[str], what: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    try:
        return sysutil.run(argv, what=what, input=input, check=check, timeout=60)
    except HostProviderError as exc:
        raise CloudError(str(exc)) from None


def _nft(netns: str, text: str, what: str) -> None:
    _run(["ip", "netns", "exec", netns, sysutil.which("nft"), "-f", "-"], what=what, input=text)


def _sysctl(netns: str, *pairs: str) -> None:
    for pair in pairs:
        key, value = pair.split("=")
        path = "/proc/sys/" + key.replace(".", "/")
        _run(["ip", "netns", "exec", netns, "sh", "-c", f"echo {value} > {path}"], what=f"setting {key}")


def loops_of(path: Path) -> list[str]:
    out = _run(["losetup", "-j", str(path)], what="listing loop devices", check=False).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def attach_loop(path: Path) -> str:
    have = loops_of(path)
    if have:
        return have[0]
    return _run(["losetup", "--find", "--show", str(path)], what=f"attaching {path.name}").stdout.strip()


def detach_loops(path: Path) -> None:
    for dev in loops_of(path):
        _run(["losetup", "-d", dev], what=f"detaching {dev}", check=False)


def loops_under(folder: Path) -> list[str]:
    out = _run(["losetup", "-J", "-l"], what="listing loop devices", check=False).stdout
    try:
        devices = json.loads(out or "{}").get("loopdevices", [])
    except ValueError:
        return []
    prefix = str(folder).rstrip("/") + "/"
    return [d["name"] for d in devices if str(d.get("back-file") or "").split(" (")[0].startswith(prefix)]


# --- reconcile ----------------------------------------------------------------------------------------------


def reconcile(backend: Path, project: str, stack: str, env: dict[str, str], resources: list[dict[str, Any]],
              log: Callable[[str], None] = lambda s: None) -> None:
    """Make this machine look like the stack's resources (see the module docstring)."""
    root = cloud_dir(env)
    key = stack_key(backend, project, stack)
    desired = describe(resources)
    if desired.vms or desired.vpc or desired.disks:
        sysutil.preflight()
    rec = load_record(root, key) or _new_record(root, key, backend, project, stack)
    names = Names(key)
    base = root / "clouds" / key
    for vm_id in [v for v in rec["vms"] if v not in desired.vms]:
        log(f"emulated cloud: deleting VM {rec['vms'][vm_id]['name']}")
        _delete_vm(rec, vm_id, names)
        save_record(root, rec)
    if desired.vpc is None:
        if rec.get("infra"):
            log("emulated cloud: deleting network")
            _teardown_infra(rec, names)
            save_record(root, rec)
    for disk_id in [d for d in rec["disks"] if d not in desired.disks]:
        path = Path(rec["disks"][disk_id]["file"])
        detach_loops(path)
        path.unlink(missing_ok=True)
        del rec["disks"][disk_id]
        save_record(root, rec)
    for disk_id, size in desired.disks.items():
        path = base / "disks" / (re.sub(r"[^A-Za-z0-9_.-]", "_", disk_id.rsplit("/", 1)[-1]) + ".img")
        entry = rec["disks"].setdefault(disk_id, {"file": str(path), "size_gb": size})
        save_record(root, rec)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(size * 2**30)  # sparse: takes no space until written
        elif size > entry["size_gb"]:
            os.truncate(path, size * 2**30)
            for dev in loops_of(path):
                _run(["losetup", "-c", dev], what=f"resizing {dev}")
        entry["size_gb"] = max(size, entry["size_gb"])
        save_record(root, rec)
    if desired.vpc is None:
        if not desired.public_ips and rec.get("slot") is not None:
            _release_slot(root, rec)
        _finish(root, rec)
        return
    if not rec.get("public_net"):
        save_record(root, rec)
        ensure_public_net(backend, project, stack, env)
        rec = load_record(root, key) or rec
    _ensure_infra(rec, names, desired, env, root)
    save_record(root, rec)
    started = []
    for vm_id, spec in desired.vms.items():
        have = rec["vms"].get(vm_id)
        if have and (have["disks"] != {k: v for k, v in spec.disks.items()} or have["token"] != spec.token):
            log(f"emulated cloud: restarting VM {have['name']} (disks or instance settings changed)")
            _stop_vm(rec, vm_id, names)
            have["disks"], have["token"] = dict(spec.disks), spec.token
            save_record(root, rec)
        if have is None:
            log(f"emulated cloud: creating VM {spec.hostname} ({spec.private_ip}"
                + (f", public {spec.public_ip}" if spec.public_ip else "") + ")")
            have = _new_vm(rec, spec, names, env)
            save_record(root, rec)
        if (network.NETNS_DIR / have["netns"]).exists():
            _apply_firewall(have["netns"], spec)  # SG rule changes apply at once, as in the cloud
        m = _machine(have)
        if m.state() != "running":
            _start_vm(rec, have, spec, names, root)
            started.append(have)
    deadline = time.monotonic() + BOOT_TIMEOUT
    for have in started:
        try:
            _machine(have).wait_booted(deadline)
        except HostProviderError as exc:
            raise CloudError(f"VM {have['name']} did not boot: {exc}") from None
    _finish(root, rec)


def _finish(root: Path, rec: dict[str, Any]) -> None:
    if not rec["vms"] and not rec["disks"] and not rec.get("infra") and rec.get("slot") is None:
        sysutil.remove_tree(root / "clouds" / rec["key"])
    else:
        save_record(root, rec)


def _machine(vm: dict[str, Any]) -> Machine:
    binds = tuple(Bind(loop, dev) for dev, loop in vm.get("loops", {}).items())
    return Machine(MachineSpec(name=vm["name"], dir=Path(vm["dir"]), base=Path(vm["base"] or "/nonexistent"),
                               netns=vm["netns"], binds=binds))


def _new_vm(rec: dict[str, Any], spec: VmSpec, names: Names, env: dict[str, str]) -> dict[str, Any]:
    if not spec.suite:
        raise CloudError(f"VM {spec.hostname}: its image is not one the emulated cloud has (Debian 12 or 13)")
    mirror, security = apt_mirrors()
    try:
        base = image.ensure_base(ImageSpec.stock(spec.suite), images_dir(env), mirror, security)
    except HostProviderError as exc:
        raise CloudError(str(exc)) from None
    used = {v["index"] for v in rec["vms"].values()}
    index = next(i for i in range(4096) if i not in used)
    vm = {"name": spec.hostname, "index": index, "netns": names.vm_netns(spec.id), "veth": names.vm_veth(index),
          "dir": str(cloud_dir(env) / "clouds" / names.key / "vms" / hashlib.sha256(spec.id.encode()).hexdigest()[:12]),
          "base": str(base), "private_ip": spec.private_ip, "user": spec.user, "keys": spec.keys,
          "disks": dict(spec.disks), "token": spec.token, "loops": {}}
    rec["vms"][spec.id] = vm
    return vm


def _start_vm(rec: dict[str, Any], vm: dict[str, Any], spec: VmSpec, names: Names, root: Path) -> None:
    _stop_vm(rec, [k for k, v in rec["vms"].items() if v is vm][0], names)
    gateway = str(spec.subnet.network_address + 1)
    try:
        network.ensure_host_net(vm["netns"], vm["veth"], names.private_bridge, spec.private_ip, spec.subnet.prefixlen,
                                gateway)
    except HostProviderError as exc:
        raise CloudError(str(exc)) from None
    _apply_firewall(vm["netns"], spec)
    loops = {}
    for disk_id, device in spec.disks.items():
        loops[device] = attach_loop(Path(rec["disks"][disk_id]["file"]))
    vm["loops"] = loops
    save_record(root, rec)
    proxy_url = f"http://{rec['infra']['operator_ip']}:80/"

    def prepare(merged: Path, fresh: bool) -> None:
        if fresh:  # cloud-init / the Azure agent, once per instance
            machine.write_identity(merged, vm["name"])
            machine.create_user(merged, vm["user"])
            for key in vm["keys"]:
                machine.authorize_key(merged, vm["user"], key)
        conf = merged / "etc/apt/apt.conf.d/01cloudsim-proxy"
        conf.write_text("# emulated cloud (tests only): the way to Debian's mirror from this VPC\n"
                        f'Acquire::http::Proxy "{proxy_url}";\n')

    try:
        _machine(vm).start(prepare)
    except HostProviderError as exc:
        raise CloudError(str(exc)) from None


def _stop_vm(rec: dict[str, Any], vm_id: str, names: Names) -> None:
    vm = rec["vms"][vm_id]
    _machine(vm).stop(grace=5)
    for disk_id in vm.get("disks", {}):
        if disk_id in rec["disks"]:
            detach_loops(Path(rec["disks"][disk_id]["file"]))
    vm["loops"] = {}
    network.delete_host_net(vm["netns"], vm["veth"])


def _delete_vm(rec: dict[str, Any], vm_id: str, names: Names) -> None:
    vm = rec["vms"][vm_id]
    _stop_vm(rec, vm_id, names)
    sysutil.remove_tree(Path(vm["dir"]))
    del rec["vms"][vm_id]


def _apply_firewall(netns: str, spec: VmSpec) -> None:
    body_in = "\n    ".join(spec.ingress)
    body_out = "\n    ".join(spec.egress)
    text = f"""table inet cloudsim {{}}
delete table inet cloudsim
table inet cloudsim {{
  chain ingress {{
    type filter hook input priority filter - 10; policy drop;
    iif "lo" accept
    ct state established,related accept
    ct state invalid drop
    {body_in}
  }}
  chain egress {{
    type filter hook output priority filter - 10; policy drop;
    oif "lo" accept
    ct state established,related accept
    ct state invalid drop
    {body_out}
  }}
}}
"""
    _nft(netns, text, f"loading the security rules of {spec.hostname}")


def _ensure_infra(rec: dict[str, Any], names: Names, d: Desired, env: dict[str, str], root: Path) -> None:
    assert d.vpc is not None
    pub = ipaddress.IPv4Network(rec["public_net"])
    infra = rec.get("infra") or {}
    if infra.get("vpc") and infra["vpc"] != str(d.vpc):
        raise CloudError(f"the VPC's CIDR changed from {infra['vpc']} to {d.vpc} without replacing it")
    infra.update(vpc=str(d.vpc), operator_ip=str(pub.network_address + 1), router_ip=str(pub.network_address + 2),
                 route_metric=1000 + int(rec["slot"]))
    rec["infra"] = infra
    save_record(root, rec)  # intent first
    routes = _run(["ip", "-j", "route", "show", "type", "unreachable"], what="reading routes").stdout
    if not any(r.get("dst") == str(d.vpc) and r.get("metric") == infra["route_metric"]
               for r in json.loads(routes or "[]")):
        _run(["ip", "route", "add", "unreachable", str(d.vpc), "metric", str(infra["route_metric"])],
             what=f"routing {d.vpc} nowhere on this machine")
    try:
        network.ensure_bridge(names.private_bridge, d.vpc, None)
        network.ensure_bridge(names.internet_bridge, pub, infra["operator_ip"])
    except HostProviderError as exc:
        raise CloudError(str(exc)) from None
    r = names.router
    if not (network.NETNS_DIR / r).exists():
        _run(["ip", "netns", "add", r], what="creating the VPC router")
        # A VPC router sends no ICMP redirects (AWS and Azure route between subnets themselves); Linux would tell a
        # VM to reach another subnet's VM directly on the shared bridge (the effective value is all OR the
        # interface's, so `default` must be 0 before the interfaces exist), an asymmetric path no cloud has.
        _sysctl(r, "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.default.send_redirects=0")
        for veth, inner, bridge in ((names.router_vpc_veth, "vpc0", names.private_bridge),
                                    (names.router_inet_veth, "inet0", names.internet_bridge)):
            if network.link_exists(veth):
                _run(["ip", "link", "del", veth], what=f"deleting {veth}")
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", inner, "netns", r],
                 what="wiring the VPC router")
            _run(["ip", "link", "set", veth, "master", bridge, "up"], what="wiring the VPC router")
            _run(["ip", "-n", r, "link", "set", inner, "up"], what="wiring the VPC router")
        _run(["ip", "-n", r, "link", "set", "lo", "up"], what="wiring the VPC router")
        _sysctl(r, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0")
    want = {"vpc0": set(d.gateways),
            "inet0": {f"{infra['router_ip']}/24"} | {f"{ip}/32" for ip in d.public_ips}}
    for dev, addrs in want.items():
        have_json = json.loads(_run(["ip", "-j", "-n", r, "-4", "addr", "show", "dev", dev],
                                    what="reading router addresses").stdout or "[]")
        have = {f"{a['local']}/{a['prefixlen']}" for link in have_json for a in link.get("addr_info", [])}
        for a in sorted(addrs - have):
            _run(["ip", "-n", r, "addr", "add", a, "dev", dev], what=f"adding {a} to the router")
        for a in sorted(have - addrs):
            _run(["ip", "-n", r, "addr", "del", a, "dev", dev], what=f"removing {a} from the router")
    _nft(r, _router_rules(d), "loading the VPC router's NAT")
    mirror, security = apt_mirrors()
    try:
        proxy.start(f"emulated cloud {rec['project']}/{rec['stack']}", infra["operator_ip"], 80, mirror, security,
                    root / "clouds" / rec["key"] / "proxy", root / "apt-cache" / f"slot-{rec['slot']}")
    except HostProviderError as exc:
        raise CloudError(str(exc)) from None


def _router_rules(d: Desired) -> str:
    dnat, snat, hairpin, sources = [], [], [], []
    nat_first = []
    for cidr, ip in sorted(d.nat_subnets.items()):
        nat_first.append(f'oifname "inet0" ip saddr {cidr} snat to {ip}')
        hairpin.append(f'oifname "vpc0" ct status dnat ip saddr {cidr} snat to {ip}')
        sources.append(cidr)
    for vm in sorted(d.vms.values(), key=lambda v: v.private_ip):
        if vm.public_ip:
            dnat.append(f"ip daddr {vm.public_ip} dnat to {vm.private_ip}")
        if vm.outbound and vm.outbound == vm.public_ip:
            snat.append(f'oifname "inet0" ip saddr {vm.private_ip} snat to {vm.public_ip}')
            hairpin.append(f'oifname "vpc0" ct status dnat ip saddr {vm.private_ip} snat to {vm.public_ip}')
            sources.append(vm.private_ip)
    post = (nat_first + snat) if d.nat_precedence else (snat + nat_first)
    hairpin_rules = ([h for h in hairpin if "/" in h.split("saddr ")[1].split()[0]] + [h for h in hairpin if "/" not in
                     h.split("saddr ")[1].split()[0]]) if d.nat_precedence else hairpin
    src_set = "{ " + ", ".join(sources) + " }" if sources else None
    nl = "\n    "
    forward = ['ct state established,related accept',
               'iifname "inet0" oifname "vpc0" ct status dnat accept']
    if src_set:
        forward.append(f'iifname "vpc0" oifname "vpc0" ct status dnat ip saddr {src_set} accept')
    forward.append('iifname "vpc0" oifname "vpc0" ct status dnat drop')
    forward.append('iifname "vpc0" oifname "vpc0" accept')
    if src_set:
        forward.append(f'iifname "vpc0" oifname "inet0" ip saddr {src_set} accept')
    return f"""table ip cloudsim {{}}
delete table ip cloudsim
table ip cloudsim {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    {nl.join(dnat)}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    {nl.join(post + hairpin_rules)}
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    {nl.join(forward)}
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    ip protocol icmp accept
  }}
}}
"""


def _teardown_infra(rec: dict[str, Any], names: Names) -> None:
    infra = rec.get("infra") or {}
    root = cloud_dir()
    proxy.stop(root / "clouds" / rec["key"] / "proxy")
    if (network.NETNS_DIR / names.router).exists():
        sysutil.kill_and_wait(network.netns_pids(names.router), grace=1, what="router processes")
        _run(["ip", "netns", "del", names.router], what="deleting the VPC router")
    for link in (names.router_vpc_veth, names.router_inet_veth, names.private_bridge, names.internet_bridge):
        if network.link_exists(link):
            _run(["ip", "link", "del", link], what=f"deleting {link}", check=False)
    if infra.get("vpc") and infra.get("route_metric"):
        _run(["ip", "route", "del", "unreachable", infra["vpc"], "metric", str(infra["route_metric"])],
             what="removing the VPC's route", check=False)
    network.release_netns_dir()
    rec["infra"] = None


# --- clean-up -----------------------------------------------------------------------------------------------


def teardown(root: Path, key: str) -> None:
    """Remove everything of one stack's cloud, from its record and from the names (works after a crash)."""
    names = Names(key)
    rec = load_record(root, key) or {"key": key, "vms": {}, "disks": {}, "infra": None, "slot": None,
                                     "project": "?", "stack": "?"}
    folder = root / "clouds" / key
    for vm_id in list(rec.get("vms", {})):
        with contextlib.suppress(Exception):
            _delete_vm(rec, vm_id, names)
    sysutil.kill_and_wait([p for p in sysutil.pids_mentioning(folder)], grace=2, what="emulated cloud processes")
    for ns in network.netns_list(names.netns_prefix):
        sysutil.kill_and_wait(network.netns_pids(ns), grace=0, what=f"processes in {ns}")
        network.delete_host_net(ns, "")
    for link in Path("/sys/class/net").glob(f"cs?{key}*"):
        _run(["ip", "link", "del", link.name], what=f"deleting {link.name}", check=False)
    _teardown_infra(rec, names) if rec.get("infra") else proxy.stop(folder / "proxy")
    if not rec.get("infra"):
        routes = json.loads(_run(["ip", "-j", "route", "show", "type", "unreachable"], what="reading routes",
                                 check=False).stdout or "[]")
        for r in routes:  # a route whose record was lost: metric 1000+slot of a slot this stack held
            if r.get("metric") == 1000 + int(rec.get("slot") or -1000):
                _run(["ip", "route", "del", "unreachable", r["dst"], "metric", str(r["metric"])], what="route",
                     check=False)
    for d in PROPAGATE_DIR.glob(f"{names.netns_prefix}*"):
        sysutil.remove_tree(d)
    sysutil.unmount_all(folder)
    for dev in loops_under(folder):
        _run(["losetup", "-d", dev], what=f"detaching {dev}", check=False)
    if rec.get("slot") is not None:
        _release_slot(root, rec)
    else:
        with _lock(root / "slots.lock"):
            slots = {k: v for k, v in _slots(root).items() if v != key}
            if root.exists():
                (root / "slots.json").write_text(json.dumps(slots, indent=2) + "\n")
    network.release_netns_dir()
    sysutil.remove_tree(folder)


def purge(backend_dir: Path | str, cloud_root: Path | str | None = None) -> None:
    """Remove every emulated-cloud resource of a backend (all its stacks), even after a crash of the double."""
    backend = Path(backend_dir).resolve()
    root = Path(cloud_root) if cloud_root else cloud_dir()
    keys = set()
    for path in (root / "clouds").glob("*/cloud.json") if (root / "clouds").is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("backend") == str(backend):
                keys.add(path.parent.name)
    stacks = backend / ".pulumi" / "stacks"
    for path in stacks.glob("*/*.json") if stacks.is_dir() else []:
        keys.add(stack_key(backend, path.parent.name, path.name[:-5]))
    for key in sorted(keys):
        teardown(root, key)


def leftovers(backend: Path, project: str, stack: str, cloud_root: Path | None = None) -> list[str]:
    """What of a stack's cloud still exists on this machine, asked of the system (empty after destroy)."""
    key = stack_key(backend, project, stack)
    root = Path(cloud_root) if cloud_root else cloud_dir()
    folder = root / "clouds" / key
    found = [f"netns {n}" for n in network.netns_list(f"cloudsim-{key}-")]
    found += [f"link {p.name}" for p in Path("/sys/class/net").glob(f"cs?{key}*")]
    found += [f"mount {m}" for m in sysutil.mounts_under(folder)]
    found += [f"process {p}" for p in sysutil.pids_mentioning(folder)]
    found += [f"loop {d}" for d in loops_under(folder)]
    found += [f"cgroup {p}" for pattern in machine.host_cgroups(f"cloudsim-{key}-*") for p in glob.glob(pattern)]
    if folder.exists():
        found += [f"file {p}" for p in folder.rglob("*") if p.is_file()]
    return found
