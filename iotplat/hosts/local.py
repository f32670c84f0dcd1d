"""The `local` target's host provider: throw-away Debian 12 "bare-metal" hosts on this machine.

Each host is a systemd-nspawn container booting systemd as PID 1 on an overlay root (shared base image
+ its own upper layer), in its own network namespace on a private bridge, reachable over SSH with a key.
Everything that exists is recorded on disk under <state_dir>/instances/<instance>/, so `down` works even
after the process that ran `up` was killed (see docs/local-target.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from . import _sys, image, network, proxy
from .api import Host, HostProviderError, HostState
from .settings import SSH_USER, LocalSettings, apt_mirrors, check_hostname

RUNNER = Path(__file__).with_name("_runner.py")
PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")
NSPAWN_LOCK_DIR = Path("/run/systemd/nspawn/locks")  # nspawn leaves one lock file per boot here
SSH_EXTRA_ARGS = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o IdentitiesOnly=yes"
BOOT_TIMEOUT = 90  # seconds from starting nspawn to "sshd accepts our key"
STOP_GRACE = 10  # seconds a guest gets to power off cleanly before it is killed
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PEM_RE = re.compile(r"-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----")


class LocalProvider:
    """HostProvider for `target: local`. Needs root; see iotplat.hosts.LocalSettings."""

    def __init__(self, settings: LocalSettings):
        self.settings = settings
        self.dir = settings.instance_dir
        self.state_file = self.dir / "state.json"
        self.key_file = self.dir / "id_ed25519"
        self.proxy_dir = self.dir / "proxy"
        self.cache_dir = self.dir / "apt-cache"  # kept by `down` (not by `down --purge`): warm proxy next time

    # --- the HostProvider interface ------------------------------------------------------------------

    def up(self, names: Sequence[str]) -> list[Host]:
        names = list(dict.fromkeys(names))
        for name in names:
            check_hostname(name)
        _sys.preflight()
        with self._lock():
            mirror, security = self._mirrors()
            base = image.ensure_base(self.settings, mirror, security)
            state = self._load() or self._new_state(mirror, security)
            if state["network"] != self.settings.network and state["hosts"]:
                raise HostProviderError(
                    f"instance {self.settings.instance} already runs on {state['network']}, not "
                    f"{self.settings.network}: run `python -m iotplat.hosts down --instance "
                    f"{self.settings.instance}` first"
                )
            if state["network"] != self.settings.network:  # no hosts left on the old network
                network.delete_bridge(self.settings)
                proxy.stop(self.proxy_dir)
            state.update(network=self.settings.network, mirror=mirror, security=security)
            for name in names:
                if name not in state["hosts"]:
                    state["hosts"][name] = self._allocate(state, name, base)
            self._save(state)  # record intent before creating anything, so `down` can find it
            image.garbage_collect(self.settings, self._bases_in_use() | {base.parent.name})
            started = []
            try:
                network.ensure_bridge(self.settings)
                self._ensure_key()
                proxy.start(self.settings, mirror, security, self.proxy_dir, self.cache_dir)
                for name in names:
                    if self._state_of(name, state) != "running":
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
                if not any(self._state_of(n, state) == "running" for n in state["hosts"]):
                    with contextlib.suppress(Exception):
                        self._teardown()  # nothing runs: no bridge, proxy or netns either
                raise
            return [self._host(name, state) for name in names]

    def status(self) -> dict[str, HostState]:
        state = self._load()
        if not state:
            return {}
        return {name: self._state_of(name, state) for name in state["hosts"]}

    def restart(self, name: str) -> None:
        _sys.preflight()
        with self._lock():
            state = self._require(name)
            rec = state["hosts"][name]
            runner = self._runner_pid(name)
            rebooted = False
            if runner and self._state_of(name, state) == "running":
                old = _sys.read_pid(self._hdir(name) / "nspawn.pid")
                os.kill(runner, signal.SIGHUP)  # the runner shuts the guest down and boots it again
                try:
                    _sys.wait_for(
                        lambda: (p := _sys.read_pid(self._hdir(name) / "nspawn.pid")) not in (None, old)
                        and _sys.alive(p),
                        timeout=STOP_GRACE + 5,
                        what=f"restarting host {name}",
                    )
                    rebooted = True
                except HostProviderError:
                    pass  # the guest did not shut down: power-cycle it below
            if not rebooted:
                self._ensure_shared(state)
                self._start(name, rec)  # stops whatever is left of it first
            self._wait_ready(name, rec, time.monotonic() + BOOT_TIMEOUT)

    def down(self, purge: bool = False) -> None:
        """Remove hosts, mounts, netns, links and the proxy; `purge` also drops the apt cache."""
        if os.geteuid() != 0:
            raise HostProviderError("removing local hosts needs root: run as root")
        with self._lock():
            self._teardown()
            if self.dir.exists():
                for entry in self.dir.iterdir():
                    if purge or entry != self.cache_dir:
                        _sys.remove_tree(entry) if entry.is_dir() else entry.unlink()
                if purge:
                    self.dir.rmdir()
            left = self.leftovers()
            if left:
                raise HostProviderError(f"`down` left {left[0]} behind: remove it by hand and report a bug")

    def exec(self, name: str, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """Run argv as root inside the host (via nsenter: works even when its sshd is broken)."""
        guest = self._guest_pid(name)
        if guest is None:
            raise HostProviderError(f"host {name} is not running: run `up` (or `restart`) first")
        cmd = [_sys.which("nsenter"), "-t", str(guest), "-a", "--", "/usr/bin/env", "-i",
               f"PATH={GUEST_PATH}", "LANG=C.UTF-8", "HOME=/root", "TERM=dumb", *argv]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise HostProviderError(f"`{' '.join(argv)}` in host {name} timed out after {timeout:.0f} s") from exc

    # --- extras for tests and operators --------------------------------------------------------------

    def hosts(self) -> list[Host]:
        state = self._load() or {"hosts": {}}
        return [self._host(name, state) for name in state["hosts"]]

    def leftovers(self) -> list[str]:
        """What of this instance still exists on the machine (empty after a clean `down`)."""
        s = self.settings
        found = [f"netns {n}" for n in network.netns_list(s.netns_prefix)]
        found += [f"link {p.name}" for p in Path("/sys/class/net").glob(f"ip[bv]{s.key}*")]
        found += [f"mount {m}" for m in _sys.mounts_under(self.dir)]
        found += [f"process {p}" for p in _sys.pids_mentioning(self.dir)]
        found += [f"dir {p}" for p in PROPAGATE_DIR.glob(f"{s.netns_prefix}*")]
        if self.dir.exists():
            found += [f"file {p}" for p in self.dir.rglob("*.pid")]
        return found

    # --- hosts ---------------------------------------------------------------------------------------

    def _hdir(self, name: str) -> Path:
        return self.dir / "hosts" / name

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
            ssh_user=SSH_USER,
            ssh_port=22,
            ssh_private_key=str(self.key_file),
            ssh_extra_args=SSH_EXTRA_ARGS,
        )

    def _runner_pid(self, name: str) -> int | None:
        pid = _sys.read_pid(self._hdir(name) / "runner.pid")
        return pid if pid and _sys.alive(pid) and _sys.mentions(pid, self._hdir(name)) else None

    def _guest_pid(self, name: str) -> int | None:
        """PID (in our namespace) of the guest's systemd, if the host is running."""
        if self._runner_pid(name) is None:
            return None
        nspawn = _sys.read_pid(self._hdir(name) / "nspawn.pid")
        if not nspawn or not _sys.alive(nspawn) or not _sys.mentions(nspawn, self._hdir(name)):
            return None
        kids = _sys.children_of(nspawn)
        return kids[0] if kids else None

    def _state_of(self, name: str, state: dict) -> HostState:
        if name not in state["hosts"]:
            return "absent"
        return "running" if self._guest_pid(name) else "stopped"

    def _start(self, name: str, rec: dict) -> None:
        """(Re)create the host's mount, network and runner; keeps its upper layer (its "disk")."""
        hdir = self._hdir(name)
        self._stop(name, rec, grace=2)  # leftovers of a crash: orphans, mounts, netns
        base = Path(rec["base"])
        if not (base / "etc" / "os-release").exists():
            raise HostProviderError(
                f"host {name} was created on base image {base}, which is gone: run `down` and `up` again"
            )
        fresh = not (hdir / "upper").exists()
        for sub in ("upper", "work", "merged"):
            (hdir / sub).mkdir(parents=True, exist_ok=True)
        merged = hdir / "merged"
        _sys.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={base},upperdir={hdir / 'upper'},workdir={hdir / 'work'}", str(merged)],
            what=f"mounting the overlay root of host {name}",
            fix="the state dir must be on a file system that overlayfs accepts as upper (ext4, xfs; not overlay)",
        )
        self._write_guest_files(name, merged, fresh)
        network.ensure_host_net(self.settings, rec["netns"], rec["veth"], rec["address"])
        nspawn = [
            # nspawn itself starts inside the host's netns: then the guest's /sys shows the guest's
            # interfaces, not this machine's (with --network-namespace-path alone it shows ours)
            _sys.which("nsenter"),
            f"--net={network.NETNS_DIR / rec['netns']}",
            "--",
            _sys.which("systemd-nspawn"),
            "--boot",
            "--register=no",  # no machined here (PID 1 is not systemd) ...
            "--keep-unit",  # ... and no scope unit either: both flags together
            f"--directory={merged}",
            f"--machine={rec['netns']}",
            f"--hostname={name}",
            f"--network-namespace-path={network.NETNS_DIR / rec['netns']}",
            "--console=read-only",
            "--link-journal=no",
            "--resolv-conf=off",
        ]
        console = open(hdir / "console.log", "ab")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(RUNNER), "--pid-file", str(hdir / "nspawn.pid"),
                 "--netns", rec["netns"], "--", *nspawn],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the host outlives this process, like a real machine
                close_fds=True,
                env={"PATH": _sys.SBIN_PATH, "LANG": "C.UTF-8"},
            )
        finally:
            console.close()
        (hdir / "runner.pid").write_text(f"{proc.pid}\n")

    def _stop(self, name: str, rec: dict, grace: float) -> None:
        """Stop one host and remove its mount and network (its upper layer stays)."""
        hdir = self._hdir(name)
        runner = self._runner_pid(name)
        nspawn = _sys.read_pid(hdir / "nspawn.pid")
        if runner:
            _sys.signal_pids([runner], signal.SIGTERM)  # the runner powers the guest off
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _sys.alive(runner):
                time.sleep(0.05)
        pids = set(_sys.pids_mentioning(hdir))
        if (network.NETNS_DIR / rec["netns"]).exists():
            pids.update(network.netns_pids(rec["netns"]))
        if runner:
            pids.add(runner)
        if nspawn and _sys.mentions(nspawn, hdir):
            pids.add(nspawn)
        _sys.kill_and_wait(pids, grace=0.5, what=f"processes of host {name}")
        if (network.NETNS_DIR / rec["netns"]).exists():
            orphans = network.netns_pids(rec["netns"])  # guest processes re-parented after nspawn died
            _sys.kill_and_wait(orphans, grace=0, what=f"orphaned processes of host {name}")
        _sys.unmount_all(hdir)
        network.delete_host_net(rec["netns"], rec["veth"])
        _sys.remove_tree(PROPAGATE_DIR / rec["netns"])
        for pid_file in ("runner.pid", "nspawn.pid", "nspawn.pid.tmp"):
            (hdir / pid_file).unlink(missing_ok=True)

    def _wait_ready(self, name: str, rec: dict, deadline: float) -> None:
        """Wait until the guest's systemd finished booting and sshd accepts our key."""
        log = self._hdir(name) / "console.log"

        def booted() -> bool:
            if self._runner_pid(name) is None:
                raise HostProviderError(f"host {name} stopped while booting: see {log}")
            if self._guest_pid(name) is None:
                return False
            try:
                out = self.exec(name, ["systemctl", "is-system-running"], timeout=10).stdout.strip()
            except HostProviderError:  # the guest went away or hung for a moment: ask again
                return False
            return out in ("running", "degraded")

        left = max(1.0, deadline - time.monotonic())
        _sys.wait_for(booted, timeout=left, interval=0.2, what=f"booting host {name}", fix=f"see {log}")
        host = self._host(name, {"hosts": {name: rec}})

        def ssh_ok() -> bool:
            if not _sys.tcp_open(host.address, host.ssh_port):
                return False
            argv = host.ssh_argv("true")
            argv[1:1] = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
            try:
                return subprocess.run(argv, capture_output=True, timeout=20, check=False).returncode == 0
            except subprocess.TimeoutExpired:
                return False

        left = max(5.0, deadline - time.monotonic())
        _sys.wait_for(ssh_ok, timeout=left, interval=0.2, what=f"ssh to host {name} ({host.address})",
                      fix=f"see {log} and `journalctl -u ssh` in the host")

    def _write_guest_files(self, name: str, root: Path, fresh: bool) -> None:
        etc = root / "etc"
        if fresh:  # what a fresh install of a machine has; Ansible may change it later
            (etc / "hostname").write_text(f"{name}\n")
            (etc / "hosts").write_text(
                f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n\n"
                "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
            )
            (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
            for kind in ("ed25519", "ecdsa"):
                _sys.run(
                    ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"root@{name}",
                     "-f", str(etc / "ssh" / f"ssh_host_{kind}_key")],
                    what=f"creating ssh host keys for {name}",
                )
        # per instance, so checked on every start: proxy address, login key, trusted CAs.
        # Files a deployment took over (the marker line is gone) are left alone.
        url = proxy.proxy_url(self.settings)
        marker = "# written by iotplat (local target); remove this line to manage the file yourself\n"
        managed = {
            etc / "apt" / "apt.conf.d" / "01iotplat-proxy": f'Acquire::http::Proxy "{url}/";\n',
            etc / "pip.conf": f"[global]\nproxy = {url}\ncert = /etc/ssl/certs/ca-certificates.crt\n",
        }
        for path, text in managed.items():
            if fresh or not path.exists() or path.read_text().startswith(marker):
                path.write_text(marker + text)
        uid, gid, home = self._user(root)
        ssh_dir = root / home.lstrip("/") / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        keys = ssh_dir / "authorized_keys"
        ours = Path(f"{self.key_file}.pub").read_text().strip()
        have = keys.read_text() if keys.exists() else ""
        if ours not in have.splitlines():
            keys.write_text(have + ("" if not have or have.endswith("\n") else "\n") + ours + "\n")
        keys.chmod(0o600)
        for path in (ssh_dir, keys):
            os.chown(path, uid, gid)
        self._trust_extra_cas(root)

    def _trust_extra_cas(self, root: Path) -> None:
        """Make the guest trust the CAs of this machine's bundle that Debian's bundle lacks.

        PyPI (and maybe the mirror) can sit behind an intercepting TLS endpoint here; its CA is in this
        machine's bundle. The certificates go where update-ca-certificates keeps them, and are appended
        to the current bundle so they work without running it.
        """
        bundle = self.settings.ca_bundle
        if bundle is None or not bundle.is_file():
            return
        guest_bundle = root / "etc" / "ssl" / "certs" / "ca-certificates.crt"
        have = set(_PEM_RE.findall(guest_bundle.read_text())) if guest_bundle.exists() else set()
        extras = [pem for pem in dict.fromkeys(_PEM_RE.findall(bundle.read_text())) if pem not in have]
        if not extras:
            return
        local = root / "usr" / "local" / "share" / "ca-certificates"
        local.mkdir(parents=True, exist_ok=True)
        for n, pem in enumerate(extras):
            (local / f"iotplat-host-{n:02d}.crt").write_text(pem + "\n")
        with open(guest_bundle, "a") as f:
            f.write("".join(pem + "\n" for pem in extras))

    @staticmethod
    def _user(root: Path) -> tuple[int, int, str]:
        for line in (root / "etc" / "passwd").read_text().splitlines():
            parts = line.split(":")
            if parts[0] == SSH_USER:
                return int(parts[2]), int(parts[3]), parts[5]
        raise HostProviderError(f"user {SSH_USER} is missing from the base image: delete {root} to rebuild it")

    # --- instance-wide pieces ------------------------------------------------------------------------

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
        runners = [p for p in (self._runner_pid(n) for n in recs) if p]
        _sys.signal_pids(runners, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(_sys.alive(p) for p in runners):
            time.sleep(0.05)
        for name, rec in recs.items():
            self._stop(name, rec, grace=0)
        # anything of ours that no record names: processes, netns, links, propagate dirs
        _sys.kill_and_wait(
            [p for p in _sys.pids_mentioning(self.dir) if not _sys.mentions(p, self.proxy_dir)],
            grace=1, what="leftover processes",
        )
        for ns in network.netns_list(s.netns_prefix):
            _sys.kill_and_wait(network.netns_pids(ns), grace=0, what=f"processes in netns {ns}")
            network.delete_host_net(ns, "")
        for link in Path("/sys/class/net").glob(f"ipv{s.key}*"):
            network.delete_host_net("", link.name)
        for d in PROPAGATE_DIR.glob(f"{s.netns_prefix}*"):
            _sys.remove_tree(d)
        _sys.unmount_all(self.dir)
        network.delete_bridge(s)
        network.release_netns_dir()
        _sys.remove_stale_locks(NSPAWN_LOCK_DIR)
        proxy.stop(self.proxy_dir)

    def _ensure_shared(self, state: dict) -> None:
        network.ensure_bridge(self.settings)
        self._ensure_key()
        proxy.start(self.settings, state["mirror"], state["security"], self.proxy_dir, self.cache_dir)

    def _ensure_key(self) -> None:
        if self.key_file.exists() and Path(f"{self.key_file}.pub").exists():
            return
        self.key_file.unlink(missing_ok=True)
        _sys.run(
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
