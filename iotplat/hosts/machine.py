"""One throw-away machine: a systemd-nspawn container that boots systemd as PID 1 on an overlay root.

A `Machine` is a directory (upper/work/merged layers, pid files, console log) plus a base image (the
overlay's lower layer) plus a network namespace its caller created and wired. It is started by a small
detached runner (`_runner.py`), so it outlives the process that started it, as a real machine would.
The local target's provider (`local.py`) and the tests' emulated cloud both build their hosts from it.

The nspawn line (facts measured on this kind of machine: docs/local-target.md and shared/research):
- `--register=no --keep-unit`: no machined and no systemd on this machine;
- started inside the host's netns (`nsenter --net=`), so the guest's /sys shows its own interfaces;
- the runner starts nspawn in a cgroup of the host's own (`_runner.host_cgroups`): guests started from one
  cgroup would share their units' cgroups, and concurrent restarts of one unit in two hosts fail (219/CGROUP);
- `--network-namespace-path` plus `--private-network`: the guest keeps that netns and gains CAP_NET_ADMIN
  in it, so its own firewall (nftables) loads, as on a real host;
- `binds`: extra files or devices (an emulated data disk is a loop device bound at its stable by-id path);
- `container_engine` (opt-in, for hosts that run Docker or podman; shared/research/docker-nspawn.md): nspawn's
  seccomp filter lets keyctl/add_key through (`--system-call-filter=@keyring`: runc joins a session keyring),
  `<dir>/docker` (on the state dir's ext4, not the overlay root) is bound at /var/lib/docker so dockerd uses
  overlay2 instead of copying every layer (vfs), and a oneshot unit in the guest remounts the cgroup v1 controller
  hierarchies read-write (nspawn mounts them read-only; runc creates a cgroup per container). The empty cgroups
  containers leave at this machine's top level are removed when the host stops (remove_container_cgroups).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import network, sysutil
from ._runner import host_cgroups, remove_cgroups
from .api import HostProviderError, HostState

RUNNER = Path(__file__).with_name("_runner.py")
PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")
NETNS_DIR = network.NETNS_DIR
STOP_GRACE = 10  # seconds a guest gets to power off cleanly before it is killed
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_KEY_TYPES = ("ed25519", "ecdsa")
_PEM_RE = re.compile(r"-----BEGIN CERTIFICATE-----[^-]+-----END CERTIFICATE-----")
# The runners this process started, by machine dir: held so that a runner that ends while its guest boots can be
# asked how it ended (an exit status, or the signal that killed it). Without the Popen object, subprocess reaps an
# ended child at the next Popen and its status is lost.
RUNNERS: dict[str, subprocess.Popen] = {}


@dataclass(frozen=True)
class Bind:
    """A file, directory or device node of this machine that appears at `target` inside the guest."""

    source: str
    target: str
    read_only: bool = False

    def argument(self) -> str:
        return f"--bind{'-ro' if self.read_only else ''}={self.source}:{self.target}"


@dataclass(frozen=True)
class MachineSpec:
    name: str  # the guest's hostname (a DNS label)
    dir: Path  # upper/, work/, merged/, runner.pid, nspawn.pid, console.log
    base: Path  # the base image's rootfs (the overlay's read-only lower layer)
    netns: str  # a network namespace under /run/netns that the caller created and wired
    binds: tuple[Bind, ...] = ()
    container_engine: bool = False  # the guest may run a container engine (see the module docstring)


# Called with (merged root, fresh) after the overlay is mounted and before the guest boots: `fresh` is true
# the first time (an empty upper layer), when first-boot identity files are written.
Prepare = Callable[[Path, bool], None]


class Machine:
    def __init__(self, spec: MachineSpec) -> None:
        self.spec = spec
        self.dir = spec.dir

    # --- processes -----------------------------------------------------------------------------------

    def runner_pid(self) -> int | None:
        pid = sysutil.read_pid(self.dir / "runner.pid")
        return pid if pid and sysutil.alive(pid) and sysutil.mentions(pid, self.dir) else None

    def guest_pid(self) -> int | None:
        """PID (in our namespace) of the guest's systemd, if the machine is running."""
        if self.runner_pid() is None:
            return None
        nspawn = sysutil.read_pid(self.dir / "nspawn.pid")
        if not nspawn or not sysutil.alive(nspawn) or not sysutil.mentions(nspawn, self.dir):
            return None
        kids = sysutil.children_of(nspawn)
        return kids[0] if kids else None

    def state(self) -> HostState:
        return "running" if self.guest_pid() else "stopped"

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self, prepare: Prepare) -> None:
        """Mount the overlay root, let `prepare` write guest files, and boot (keeps the upper layer: its disk)."""
        spec = self.spec
        self.stop(grace=2)  # leftovers of a crash: orphans, mounts
        if not (spec.base / "etc" / "os-release").exists():
            raise HostProviderError(
                f"host {spec.name} was created on base image {spec.base}, which is gone: run `down` and `up` again"
            )
        fresh = not (self.dir / "upper").exists()
        for sub in ("upper", "work", "merged"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        merged = self.dir / "merged"
        sysutil.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={spec.base},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}", str(merged)],
            what=f"mounting the overlay root of host {spec.name}",
            fix="the state dir must be on a file system that overlayfs accepts as upper (ext4, xfs; not overlay)",
        )
        prepare(merged, fresh)
        engine_args: list[str] = []
        if spec.container_engine:
            write_container_engine_files(merged)
            docker_dir = self.dir / "docker"
            docker_dir.mkdir(mode=0o710, exist_ok=True)
            engine_args = ["--system-call-filter=@keyring", Bind(str(docker_dir), "/var/lib/docker").argument()]
        nspawn = [
            sysutil.which("nsenter"),
            f"--net={NETNS_DIR / spec.netns}",
            "--",
            sysutil.which("systemd-nspawn"),
            "--boot",
            "--register=no",  # no machined here (PID 1 is not systemd) ...
            "--keep-unit",  # ... and no scope unit either: both flags together
            f"--directory={merged}",
            f"--machine={spec.netns}",
            f"--hostname={spec.name}",
            f"--network-namespace-path={NETNS_DIR / spec.netns}",
            "--private-network",  # with the line above: same netns, plus CAP_NET_ADMIN in it (nftables)
            "--console=read-only",
            "--link-journal=no",
            "--resolv-conf=off",
            *(b.argument() for b in spec.binds),
            *engine_args,
        ]
        console = open(self.dir / "console.log", "ab")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", str(RUNNER), "--pid-file", str(self.dir / "nspawn.pid"),
                 "--netns", spec.netns, "--cgroup", spec.netns, "--", *nspawn],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the host outlives this process, like a real machine
                close_fds=True,
                env={"PATH": sysutil.SBIN_PATH, "LANG": "C.UTF-8"},
            )
        finally:
            console.close()
        RUNNERS[str(self.dir)] = proc
        (self.dir / "runner.pid").write_text(f"{proc.pid}\n")
        sysutil.wait_named(proc, self.dir)  # until runner_pid() can tell it is ours (else wait_booted reports it)

    def stop(self, grace: float) -> None:
        """Power the guest off (killed after `grace` s) and unmount its root; the netns and upper layer stay."""
        runner = self.runner_pid()
        nspawn = sysutil.read_pid(self.dir / "nspawn.pid")
        if runner:
            sysutil.signal_pids([runner], signal.SIGTERM)  # the runner powers the guest off
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and sysutil.alive(runner):
                time.sleep(0.05)
        pids = set(sysutil.pids_mentioning(self.dir))
        if (NETNS_DIR / self.spec.netns).exists():
            pids.update(network.netns_pids(self.spec.netns))
        if runner:
            pids.add(runner)
        if nspawn and sysutil.mentions(nspawn, self.dir):
            pids.add(nspawn)
        sysutil.kill_and_wait(pids, grace=0.5, what=f"processes of host {self.spec.name}")
        if (NETNS_DIR / self.spec.netns).exists():
            orphans = network.netns_pids(self.spec.netns)  # guest processes re-parented after nspawn died
            sysutil.kill_and_wait(orphans, grace=0, what=f"orphaned processes of host {self.spec.name}")
        sysutil.unmount_all(self.dir)
        sysutil.remove_tree(PROPAGATE_DIR / self.spec.netns)
        for pid_file in ("runner.pid", "nspawn.pid", "nspawn.pid.tmp"):
            (self.dir / pid_file).unlink(missing_ok=True)
        remove_cgroups(host_cgroups(self.spec.netns))  # the runner's job, unless it was killed
        if self.spec.container_engine:
            remove_container_cgroups()

    def reboot(self) -> bool:
        """Ask the runner to shut the guest down and boot it again; False if it did not come back in time."""
        runner = self.runner_pid()
        if not runner or self.state() != "running":
            return False
        old = sysutil.read_pid(self.dir / "nspawn.pid")
        os.kill(runner, signal.SIGHUP)
        try:
            sysutil.wait_for(
                lambda: (p := sysutil.read_pid(self.dir / "nspawn.pid")) not in (None, old) and sysutil.alive(p),
                timeout=STOP_GRACE + 5,
                what=f"restarting host {self.spec.name}",
            )
        except HostProviderError:
            return False
        return True

    def exec(self, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """Run argv as root inside the guest (via nsenter: works even when its sshd is broken)."""
        guest = self.guest_pid()
        if guest is None:
            raise HostProviderError(f"host {self.spec.name} is not running: run `up` (or `restart`) first")
        cmd = [sysutil.which("nsenter"), "-t", str(guest), "-a", "--", "/usr/bin/env", "-i",
               f"PATH={GUEST_PATH}", "LANG=C.UTF-8", "HOME=/root", "TERM=dumb", *argv]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise HostProviderError(f"`{' '.join(argv)}` in host {self.spec.name} timed out after {timeout:.0f} s") from exc

    def wait_booted(self, deadline: float) -> None:
        """Wait until the guest's systemd finished booting (running or degraded)."""
        log = self.dir / "console.log"

        def booted() -> bool:
            if self.runner_pid() is None:
                last = console_tail(log)
                raise HostProviderError(f"host {self.spec.name} stopped while booting ({self.runner_exit()}"
                                        + (f"; its console ends: {last}" if last else "; its console is empty")
                                        + f"): see {log}")
            if self.guest_pid() is None:
                return False
            try:
                out = self.exec(["systemctl", "is-system-running"], timeout=10).stdout.strip()
            except HostProviderError:  # the guest went away or hung for a moment: ask again
                return False
            return out in ("running", "degraded")

        left = max(1.0, deadline - time.monotonic())
        sysutil.wait_for(booted, timeout=left, interval=0.2, what=f"booting host {self.spec.name}", fix=f"see {log}")

    def runner_exit(self) -> str:
        """How this machine's runner ended, if this process started it: "its runner exited with 1", "... was killed
        by SIGKILL" (for an error message; the console says why a guest stopped, this says who stopped the runner)."""
        proc = RUNNERS.get(str(self.dir))
        if proc is None:
            return "its runner is gone"
        try:
            rc = proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            return f"its runner (pid {proc.pid}) runs but no longer names this host's files"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return f"its runner (pid {proc.pid}) was killed by {name}"
        return f"its runner (pid {proc.pid}) exited with {rc}"

    def host_keys(self) -> tuple[str, ...]:
        """The guest's SSH host public keys ("ssh-ed25519 AAAA..."), read from its disk (pin them, never TOFU)."""
        keys = []
        for kind in HOST_KEY_TYPES:
            path = self.dir / "upper" / "etc" / "ssh" / f"ssh_host_{kind}_key.pub"
            try:
                words = path.read_text().split()
            except OSError:
                continue
            if len(words) >= 2:
                keys.append(f"{words[0]} {words[1]}")
        return tuple(keys)


def console_tail(log: Path, lines: int = 3, width: int = 400) -> str:
    """The last non-empty lines of a host's console, joined on one line (for a one-line error)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail)[-width:]


# --- container engines in a guest (opt-in: MachineSpec.container_engine) -----------------------------

CGROUP_RW_UNIT = "iotplat-cgroup-rw.service"
CGROUP_RW_SERVICE = """\
# Written by iotplat (local target): nspawn mounts the cgroup v1 controller hierarchies read-only; a container
# engine creates a cgroup per container in them. Plain `remount,rw` fails for busy ones: remount the bind.
[Unit]
Description=Make the cgroup v1 controller mounts writable (container engines in an nspawn host)
DefaultDependencies=no
Before=containerd.service docker.service docker.socket podman.service
ConditionVirtualization=container

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'for d in /sys/fs/cgroup/*/; do mountpoint -q "$d" && mount -o remount,bind,rw "$d"; done; true'

[Install]
WantedBy=multi-user.target
"""
CGROUP_ROOT = Path("/sys/fs/cgroup")
ENGINE_CGROUP_PARENTS = ("docker", "libpod_parent")  # where docker and podman (cgroupfs) put containers


def write_container_engine_files(root: Path) -> None:
    """The cgroup-rw oneshot unit, enabled, in the guest (rewritten on every start: the provider owns it)."""
    units = root / "etc" / "systemd" / "system"
    (units / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    (units / CGROUP_RW_UNIT).write_text(CGROUP_RW_SERVICE)
    link = units / "multi-user.target.wants" / CGROUP_RW_UNIT
    if not link.is_symlink():
        link.unlink(missing_ok=True)
        link.symlink_to(f"/etc/systemd/system/{CGROUP_RW_UNIT}")


def remove_container_cgroups(cgroup_root: Path = CGROUP_ROOT) -> list[str]:
    """Remove the empty cgroups container engines in stopped guests left at this machine's top level.

    A guest started with --register=no --keep-unit shares this machine's cgroup v1 roots, so its dockerd creates
    /sys/fs/cgroup/<controller>/docker/<container>; they stay after the guest is gone. Only empty cgroups are
    removed (rmdir fails on one with processes), deepest first, so a container still running anywhere -- another
    instance's guest, a dockerd on this machine -- keeps its cgroup. Returns what is left (busy)."""
    left: list[str] = []
    if not cgroup_root.is_dir():
        return left
    for hierarchy in sorted(cgroup_root.iterdir()):
        for name in ENGINE_CGROUP_PARENTS:
            top = hierarchy / name
            if top.is_dir() and not top.is_symlink():
                left += remove_cgroups([str(top)])
    return left


# --- guest files: what a provisioned server has ------------------------------------------------------


def write_identity(root: Path, name: str) -> None:
    """First boot only: hostname, /etc/hosts, machine-id and fresh SSH host keys (a new machine's identity)."""
    etc = root / "etc"
    (etc / "hostname").write_text(f"{name}\n")
    (etc / "hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )
    (etc / "machine-id").write_text(uuid.uuid4().hex + "\n")
    for kind in HOST_KEY_TYPES:
        sysutil.run(
            ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"root@{name}",
             "-f", str(etc / "ssh" / f"ssh_host_{kind}_key")],
            what=f"creating ssh host keys for {name}",
        )


def create_user(root: Path, user: str) -> None:
    """The login user a provisioned server has (cloud-init's default user, an installer's first user): a home, the
    sudo and adm groups, passwordless sudo, no password. Nothing is done when the user exists."""
    if any(line.split(":", 1)[0] == user for line in (root / "etc" / "passwd").read_text().splitlines()):
        return
    sysutil.run(["useradd", "--root", str(root), "--create-home", "--shell", "/bin/bash", "--groups", "sudo,adm", user],
                what=f"creating user {user}")
    sudoers = root / "etc" / "sudoers.d" / user
    sudoers.write_text(f"{user} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)


def authorize_key(root: Path, user: str, public_key: str) -> None:
    """Add `public_key` to `user`'s authorized_keys in the guest (kept once)."""
    uid, gid, home = guest_user(root, user)
    ssh_dir = root / home.lstrip("/") / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    have = keys.read_text() if keys.exists() else ""
    if public_key not in have.splitlines():
        keys.write_text(have + ("" if not have or have.endswith("\n") else "\n") + public_key + "\n")
    keys.chmod(0o600)
    for path in (ssh_dir, keys):
        os.chown(path, uid, gid)


def guest_user(root: Path, user: str) -> tuple[int, int, str]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        parts = line.split(":")
        if parts[0] == user:
            return int(parts[2]), int(parts[3]), parts[5]
    raise HostProviderError(f"user {user} is missing from the base image: delete {root} to rebuild it")


MARKER = "# written by iotplat (local target); remove this line to manage the file yourself\n"


def write_managed(root: Path, files: dict[str, str], fresh: bool) -> None:
    """Per-instance guest files (proxy settings): rewritten on every start unless a deployment took the file
    over (the marker line is gone)."""
    for rel, text in files.items():
        path = root / rel.lstrip("/")
        if fresh or not path.exists() or path.read_text().startswith(MARKER):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(MARKER + text)


def trust_extra_cas(root: Path, bundle: Path | None) -> None:
    """Make the guest trust the CAs of this machine's bundle that Debian's bundle lacks.

    PyPI (and maybe the mirror) can sit behind an intercepting TLS endpoint here; its CA is in this
    machine's bundle. The certificates go where update-ca-certificates keeps them, and are appended
    to the current bundle so they work without running it.
    """
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


def wait_ssh(address: str, port: int, argv_true: list[str], deadline: float, what: str, fix: str) -> None:
    """Wait until `argv_true` (an ssh ... true) succeeds against address:port."""

    def ssh_ok() -> bool:
        if not sysutil.tcp_open(address, port):
            return False
        try:
            return subprocess.run(argv_true, capture_output=True, timeout=20, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    left = max(5.0, deadline - time.monotonic())
    sysutil.wait_for(ssh_ok, timeout=left, interval=0.2, what=what, fix=fix)
