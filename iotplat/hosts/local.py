"""The `local` target's host provider: throw-away Debian "bare-metal" hosts on this machine.

Each host is a `Machine` (machine.py: a systemd-nspawn container booting systemd as PID 1 on an overlay
root, shared base image + its own upper layer), in its own network namespace on the instance's private
bridge, reachable over SSH with the instance's key; its host keys are pinned in the instance's known_hosts.
Everything that exists is recorded on disk under <state_dir>/instances/<instance>/, so `down` works even
after the process that ran `up` was killed (see docs/local-target.md).

An instance remembers who created it (`owner`: an id of the iotplat state that ran `up`): another state
that uses the same platform name cannot take its hosts over or remove them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import image, machine, network, proxy, sysutil
from ._runner import host_cgroups
from .api import Host, HostProviderError, HostState
from .machine import PROPAGATE_DIR, STOP_GRACE, Bind, Machine, MachineSpec
from .settings import ImageSpec, LocalSettings, apt_mirrors, check_hostname

NSPAWN_LOCK_DIR = Path("/run/systemd/nspawn/locks")  # nspawn leaves one lock file per boot here
BOOT_TIMEOUT = 90  # seconds from starting nspawn to "sshd accepts our key"


class LocalProvider:
    """HostProvider for `target: local`. Needs root; see iotplat.hosts.LocalSettings."""

    def __init__(self, settings: LocalSettings):
        self.settings = settings
        self.dir = settings.instance_dir
        self.state_file = self.dir / "state.json"
        self.key_file = self.dir / "id_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.proxy_dir = self.dir / "proxy"
        self.cache_dir = self.dir / "apt-cache"  # kept by `down` (not by `down --purge`): warm proxy next time

    # --- the HostProvider interface ------------------------------------------------------------------

    def up(self, names: Sequence[str], owner: str | None = None, *, images: Mapping[str, ImageSpec] | None = None,
           binds: Mapping[str, Sequence[Bind]] | None = None) -> list[Host]:
        """Create or start the named hosts. `owner` (an id of the iotplat state asking) is recorded by the first
        `up`; an instance recorded for another owner is refused, so one state cannot take over another's hosts.
        `images` gives a host another image than the settings' one, `binds` extra files or devices (e.g. a disk);
        both are fixed when a host is created."""
        names = list(dict.fromkeys(names))
        for name in names:
            check_hostname(name)
        sysutil.preflight()
        with self._lock():
            mirror, security = self._mirrors()
            bases = {spec: image.ensure_base(spec, self.settings.state_dir, mirror, security)
                     for spec in {self.settings.image, *(images or {}).values()}}
            state = self._load() or self._new_state(mirror, security)
            self._check_owner(state, owner, "use")
            if owner and not state.get("owner"):
                state["owner"] = owner
            if state["network"] != self.settings.network and state["hosts"]:
                raise HostProviderError(
                    f"instance {self.settings.instance} already runs on {state['network']}, not "
                    f"{self.settings.network}: run `python -m iotplat.hosts down --instance "
                    f"{self.settings.instance}` first"
                )
            if state["network"] != self.settings.network:  # no hosts left on the old network
                network.delete_bridge(self.settings.bridge)
                proxy.stop(self.proxy_dir)
            state.update(network=self.settings.network, mirror=mirror, security=security)
            for name in names:
                if name not in state["hosts"]:
                    rec = self._allocate(state, name, bases[(images or {}).get(name, self.settings.image)])
                    rec["binds"] = [[b.source, b.target, b.read_only] for b in (binds or {}).get(name, ())]
                    rec["container_engine"] = self.settings.container_engine
                    state["hosts"][name] = rec
            self._save(state)  # record intent before creating anything, so `down` can find it
            image.garbage_collect(self.settings.state_dir, self._bases_in_use() | {b.parent.name for b in bases.values()})
            started = []
            try:
                self._ensure_shared(state)
                for name in names:
                    if self._machine(name, state).state() != "running":
                        self._start(name, state["hosts"][name])
                        started.append(name)
                deadline = time.monotonic() + BOOT_TIMEOUT
                for name in names:  # also the ones that were running: `up` returns usable hosts
                    try:
                        self._wait_ready(name, state["hosts"][name], deadline)
                    except HostProviderError as exc:
                        if name not in started:
                            raise
                        # A fresh container that never answers ssh (seen rarely on a loaded machine): boot it
                        # once more before giving up; a second failure is reported as it is.
                        print(f"iotplat hosts: {exc}; restarting host {name} once", file=sys.stderr, flush=True)
                        self._stop(name, state["hosts"][name], grace=2)
                        self._start(name, state["hosts"][name])
                        self._wait_ready(name, state["hosts"][name], time.monotonic() + BOOT_TIMEOUT)
            except BaseException:
                for name in started:  # a half-booted host is useless; leave it stopped, not hanging
                    with contextlib.suppress(Exception):
                        self._stop(name, state["hosts"][name], grace=2)
                if not any(self._machine(n, state).state() == "running" for n in state["hosts"]):
                    with contextlib.suppress(Exception):
                        self._teardown()  # nothing runs: no bridge, proxy or netns either
                raise
            self._write_known_hosts(state)
            return [self._host(name, state) for name in names]

    def status(self) -> dict[str, HostState]:
        state = self._load()
        if not state:
            return {}
        return {name: self._machine(name, state).state() for name in state["hosts"]}

    def owner(self) -> str | None:
        """The id recorded by the `up` that created this instance (None: no instance, or created without one)."""
        state = self._load()
        return state.get("owner") if state else None

    def restart(self, name: str) -> None:
        sysutil.preflight()
        with self._lock():
            state = self._require(name)
            rec = state["hosts"][name]
            if not self._machine(name, state).reboot():  # the guest did not shut down: power-cycle it
                self._ensure_shared(state)
                self._start(name, rec)  # stops whatever is left of it first
            self._wait_ready(name, rec, time.monotonic() + BOOT_TIMEOUT)

    def down(self, purge: bool = False, owner: str | None = None) -> None:
        """Remove hosts, mounts, netns, links and the proxy; `purge` also drops the apt cache. With `owner`,
        an instance that another state created is refused (nothing is removed)."""
        if os.geteuid() != 0:
            raise HostProviderError("removing local hosts needs root: run as root")
        with self._lock():
            if owner is not None:
                state = None
                with contextlib.suppress(HostProviderError):
                    state = self._load()
                if state:
                    self._check_owner(state, owner, "remove")
            self._teardown()
            if self.dir.exists():
                for entry in self.dir.iterdir():
                    if purge or entry != self.cache_dir:
                        sysutil.remove_tree(entry) if entry.is_dir() else entry.unlink()
                if purge:
                    self.dir.rmdir()
            left = self.leftovers()
            if left:
                raise HostProviderError(f"`down` left {left[0]} behind: remove it by hand and report a bug")

    def exec(self, name: str, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """Run argv as root inside the host (via nsenter: works even when its sshd is broken)."""
        state = self._load() or {"hosts": {}}
        if name not in state["hosts"]:
            raise HostProviderError(f"host {name} is not running: run `up` (or `restart`) first")
        return self._machine(name, state).exec(argv, timeout)

    # --- extras for tests and operators --------------------------------------------------------------

    def hosts(self) -> list[Host]:
        state = self._load() or {"hosts": {}}
        return [self._host(name, state) for name in state["hosts"]]

    def leftovers(self) -> list[str]:
        """What of this instance still exists on the machine (empty after a clean `down`)."""
        s = self.settings
        found = [f"netns {n}" for n in network.netns_list(s.netns_prefix)]
        found += [f"link {p.name}" for p in Path("/sys/class/net").glob(f"ip[bv]{s.key}*")]
        found += [f"mount {m}" for m in sysutil.mounts_under(self.dir)]
        found += [f"process {p}" for p in sysutil.pids_mentioning(self.dir)]
        found += [f"dir {p}" for p in PROPAGATE_DIR.glob(f"{s.netns_prefix}*")]
        found += [f"cgroup {p}" for pattern in host_cgroups(f"{s.netns_prefix}*") for p in glob.glob(pattern)]
        if self.dir.exists():
            found += [f"file {p}" for p in self.dir.rglob("*.pid")]
        return found

    # --- hosts ---------------------------------------------------------------------------------------

    def _hdir(self, name: str) -> Path:
        return self.dir / "hosts" / name

    def _machine(self, name: str, state: dict) -> Machine:
        rec = state["hosts"].get(name) or {"netns": self.settings.netns_prefix + name, "base": ""}
        return Machine(MachineSpec(name=name, dir=self._hdir(name), base=Path(rec.get("base") or "/nonexistent"),
                                   netns=rec["netns"], container_engine=bool(rec.get("container_engine"))))

    def _allocate(self, state: dict, name: str, base: Path) -> dict:
        used = {h["index"] for h in state["hosts"].values()}
        index = next((i for i in range(self.settings.max_hosts) if i not in used), None)
        if index is None:
            raise HostProviderError(f"network {self.settings.network} is full: use a larger network")
        return {
            "index": index,
            "address": self.settings.address_of(index),
            "netns": self.settings.netns_prefix + name,
            "veth": self.settings.veth_of(index),
            "base": str(base),
        }

    def _host(self, name: str, state: dict) -> Host:
        return Host(
            name=name,
            address=state["hosts"][name]["address"],
            ssh_user=self.settings.ssh_user,
            ssh_port=22,
            ssh_private_key=str(self.key_file),
            ssh_extra_args=(f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes "
                            "-o LogLevel=ERROR -o IdentitiesOnly=yes"),
            host_keys=self._machine(name, state).host_keys(),
        )

    def _write_known_hosts(self, state: dict) -> None:
        """The hosts' own keys (read from their disks), so every ssh to them checks the key: nothing is TOFU."""
        lines = []
        for name, rec in sorted(state["hosts"].items()):
            lines += [f"{rec['address']} {key}\n" for key in self._machine(name, state).host_keys()]
        tmp = self.known_hosts.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, self.known_hosts)

    def _start(self, name: str, rec: dict) -> None:
        """(Re)create the host's network and boot it; keeps its upper layer (its "disk")."""
        binds = tuple(Bind(src, dst, bool(ro)) for src, dst, ro in rec.get("binds", []))
        m = Machine(MachineSpec(name=name, dir=self._hdir(name), base=Path(rec["base"]), netns=rec["netns"],
                                binds=binds, container_engine=bool(rec.get("container_engine"))))
        m.stop(grace=2)  # leftovers of a crash: orphans, mounts
        s = self.settings
        network.ensure_host_net(rec["netns"], rec["veth"], s.bridge, rec["address"], s.net.prefixlen, s.gateway)
        m.start(lambda root, fresh: self._write_guest_files(name, root, fresh))

    def _stop(self, name: str, rec: dict, grace: float) -> None:
        """Stop one host and remove its mount and network (its upper layer stays)."""
        Machine(MachineSpec(name=name, dir=self._hdir(name), base=Path(rec.get("base") or "/nonexistent"),
                            netns=rec["netns"], container_engine=bool(rec.get("container_engine")))).stop(grace)
        network.delete_host_net(rec["netns"], rec.get("veth", ""))

    def _wait_ready(self, name: str, rec: dict, deadline: float) -> None:
        """Wait until the guest's systemd finished booting and sshd accepts our key (checking its host key)."""
        m = Machine(MachineSpec(name=name, dir=self._hdir(name), base=Path(rec["base"]), netns=rec["netns"]))
        m.wait_booted(deadline)
        self._write_known_hosts(self._load() or {"hosts": {name: rec}})
        host = self._host(name, {"hosts": {name: rec}})
        argv = host.ssh_argv("true")
        argv[1:1] = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
        machine.wait_ssh(host.address, host.ssh_port, argv, deadline, what=f"ssh to host {name} ({host.address})",
                         fix=f"see {self._hdir(name) / 'console.log'} and `journalctl -u ssh` in the host")

    def _write_guest_files(self, name: str, root: Path, fresh: bool) -> None:
        if fresh:  # what a fresh install of a machine has; Ansible may change it later
            machine.write_identity(root, name)
            machine.create_user(root, self.settings.ssh_user)
        # per instance, so checked on every start: proxy address, login key, trusted CAs.
        url = proxy.proxy_url(self.settings.bridge_address, self.settings.proxy_port)
        machine.write_managed(root, {
            "/etc/apt/apt.conf.d/01iotplat-proxy": f'Acquire::http::Proxy "{url}/";\n',
            "/etc/pip.conf": f"[global]\nproxy = {url}\ncert = /etc/ssl/certs/ca-certificates.crt\n",
        }, fresh)
        machine.authorize_key(root, self.settings.ssh_user, Path(f"{self.key_file}.pub").read_text().strip())
        machine.trust_extra_cas(root, self.settings.ca_bundle)

    # --- instance-wide pieces ------------------------------------------------------------------------

    def _check_owner(self, state: dict, owner: str | None, verb: str) -> None:
        have = state.get("owner")
        if owner is None or have is None or have == owner:
            return
        raise HostProviderError(
            f"local instance {self.settings.instance} was created by another iotplat state directory (owner "
            f"{have[:12]}), not this one ({owner[:12]}): iotplat will not {verb} its hosts. Use that state "
            f"directory, or give this platform another name or environment; to remove them anyway run "
            f"`python -m iotplat.hosts down --instance {self.settings.instance}` as root"
        )

    def _teardown(self) -> None:
        try:
            state = self._load() or {"hosts": {}}
        except HostProviderError:  # a corrupt record: fall back to what the names on disk tell
            state = {"hosts": {}}
        s = self.settings
        recs = dict(state["hosts"])
        if (self.dir / "hosts").is_dir():  # hosts whose record was lost still have a directory
            for hdir in (self.dir / "hosts").iterdir():
                recs.setdefault(hdir.name, {"netns": s.netns_prefix + hdir.name, "veth": ""})
        # ask all guests to power off at once, then make sure
        everyone = {"hosts": recs}
        runners = [p for p in (self._machine(n, everyone).runner_pid() for n in recs) if p]
        sysutil.signal_pids(runners, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(sysutil.alive(p) for p in runners):
            time.sleep(0.05)
        for name, rec in recs.items():
            self._stop(name, rec, grace=0)
        # anything of ours that no record names: processes, netns, links, propagate dirs
        sysutil.kill_and_wait(
            [p for p in sysutil.pids_mentioning(self.dir) if not sysutil.mentions(p, self.proxy_dir)],
            grace=1, what="leftover processes",
        )
        for ns in network.netns_list(s.netns_prefix):
            sysutil.kill_and_wait(network.netns_pids(ns), grace=0, what=f"processes in netns {ns}")
            network.delete_host_net(ns, "")
        for link in Path("/sys/class/net").glob(f"ipv{s.key}*"):
            network.delete_host_net("", link.name)
        for d in PROPAGATE_DIR.glob(f"{s.netns_prefix}*"):
            sysutil.remove_tree(d)
        sysutil.unmount_all(self.dir)
        network.delete_bridge(s.bridge)
        network.release_netns_dir()
        sysutil.remove_stale_locks(NSPAWN_LOCK_DIR)
        proxy.stop(self.proxy_dir)
        if any(rec.get("container_engine") for rec in recs.values()) or self.settings.container_engine:
            machine.remove_container_cgroups()  # also when a host's record was lost

    def _ensure_shared(self, state: dict) -> None:
        s = self.settings
        network.ensure_bridge(s.bridge, s.net, s.bridge_address)
        self._ensure_key()
        proxy.start(f"instance {s.instance} (local target)", s.bridge_address, s.proxy_port, state["mirror"],
                    state["security"], self.proxy_dir, self.cache_dir)

    def _ensure_key(self) -> None:
        if self.key_file.exists() and Path(f"{self.key_file}.pub").exists():
            return
        self.key_file.unlink(missing_ok=True)
        sysutil.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"iotplat-{self.settings.instance}",
             "-f", str(self.key_file)],
            what="creating the ssh key of the local hosts",
        )
        self.key_file.chmod(0o600)

    def _mirrors(self) -> tuple[str, str]:
        mirror, security = apt_mirrors()
        if self.settings.mirror:
            mirror = self.settings.mirror.rstrip("/")
        return mirror, security

    def _bases_in_use(self) -> set[str]:
        used = set()
        for state_file in (self.settings.state_dir / "instances").glob("*/state.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                for rec in json.loads(state_file.read_text())["hosts"].values():
                    used.add(Path(rec["base"]).parent.name)
        return used

    # --- state ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self):
        lock = self.settings.state_dir / "locks" / f"{self.settings.instance}.lock"
        with image.file_lock(lock, timeout=300, what=f"instance {self.settings.instance}"):
            yield

    def _new_state(self, mirror: str, security: str) -> dict:
        s = self.settings
        return {"instance": s.instance, "network": s.network, "key": s.key, "bridge": s.bridge,
                "mirror": mirror, "security": security, "hosts": {}}

    def _load(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise HostProviderError(
                f"{self.state_file} is corrupt ({exc}): run `python -m iotplat.hosts down --instance "
                f"{self.settings.instance}` to clean up"
            ) from exc

    def _save(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.state_file)

    def _require(self, name: str) -> dict:
        state = self._load()
        if not state or name not in state["hosts"]:
            raise HostProviderError(f"no host {name!r} in instance {self.settings.instance}: run `up` first")
        return state
