"""System helpers of the host providers: commands, processes, mounts, bounded waits. Linux only."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .api import HostProviderError

# binary -> the Debian package that provides it
REQUIRED_TOOLS = {
    "systemd-nspawn": "systemd-container",
    "mmdebstrap": "mmdebstrap",
    "apt-cacher-ng": "apt-cacher-ng",
    "ip": "iproute2",
    "nsenter": "util-linux",
    "mount": "mount",
    "umount": "mount",
    "ssh-keygen": "openssh-client",
    "chroot": "coreutils",
}
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def which(tool: str) -> str:
    found = shutil.which(tool, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)
    if not found:
        package = REQUIRED_TOOLS.get(tool, tool)
        raise HostProviderError(f"{tool} not found: apt-get install {package}")
    return found


def preflight() -> None:
    """Fail early, with the fix, when this machine cannot run local hosts."""
    if os.geteuid() != 0:
        raise HostProviderError(
            "local hosts need root (network namespaces, overlay mounts, systemd-nspawn): run as root"
        )
    for tool in REQUIRED_TOOLS:
        which(tool)
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError:
        filesystems = ""
    if "overlay" not in filesystems:
        subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
        if "overlay" not in Path("/proc/filesystems").read_text():
            raise HostProviderError("the kernel has no overlayfs: modprobe overlay (or use a kernel with it)")


def run(
    argv: Sequence[str],
    *,
    what: str,
    fix: str = "",
    timeout: float = 60,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess:
    """Run a command; on failure raise HostProviderError naming `what` failed, its stderr and the fix."""
    argv = list(argv)
    if "/" not in argv[0]:
        argv[0] = which(argv[0])  # also finds /usr/sbin tools when PATH lacks it
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise HostProviderError(f"{what}: timed out after {timeout:.0f} s ({' '.join(argv)})") from exc
    except FileNotFoundError as exc:
        raise HostProviderError(f"{what}: {argv[0]} not found") from exc
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit code {proc.returncode}"
        raise HostProviderError(f"{what}: {last}" + (f" ({fix})" if fix else ""))
    return proc


def wait_for(
    condition: Callable[[], bool], *, timeout: float, interval: float = 0.1, what: str, fix: str = ""
) -> None:
    """Poll `condition` until it is true; raise HostProviderError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() >= deadline:
            raise HostProviderError(f"{what}: not done after {timeout:.0f} s" + (f" ({fix})" if fix else ""))
        time.sleep(interval)


# --- processes ---------------------------------------------------------------------------------------


def proc_state(pid: int) -> str | None:
    """The state letter of a process (R, S, Z, ...), or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int | None) -> bool:
    """True for a live process; zombies count as dead (kill -0 is true for them)."""
    if not pid or pid <= 0:
        return False
    state = proc_state(pid)
    return state is not None and state not in ("Z", "X")


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and parent_of(int(entry.name)) == pid and alive(int(entry.name)):
            kids.append(int(entry.name))
    return sorted(kids)


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def mentions(pid: int, path: Path) -> bool:
    """True if the process's command line names `path` or a file under it."""
    p = str(path).rstrip("/")
    return any(arg == p or arg.endswith("=" + p) or (p + "/") in arg for arg in cmdline(pid))


def wait_named(proc: subprocess.Popen, path: Path, timeout: float = 5) -> bool:
    """Wait until a process just started names `path` in /proc/PID/cmdline; False if it ended or `timeout` passed.

    Popen returns as soon as the child's exec has replaced its memory (vfork), which is before the kernel has set up
    the new program's arguments: for a moment /proc/PID/cmdline reads empty (measured: 1 start in 200 here), and a
    check that finds a process by what it names (`mentions`) calls it gone. CI failed so: "host core stopped while
    booting" with the runner alive."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if mentions(proc.pid, path):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return False


def pids_mentioning(path: Path) -> list[int]:
    """Live processes whose command line names `path` or a file under it (our runners, nspawns, proxy)."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            pid = int(entry.name)
            if mentions(pid, path) and alive(pid):
                found.append(pid)
    return found


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_and_wait(pids: Iterable[int], *, grace: float, what: str) -> None:
    """SIGTERM, wait up to `grace` s, then SIGKILL and wait (bounded) until every pid is gone or a zombie."""
    pids = [p for p in set(pids) if alive(p)]
    if not pids:
        return
    signal_pids(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    rest = [p for p in pids if alive(p)]
    if rest:
        signal_pids(rest, signal.SIGKILL)
        wait_for(lambda: not any(alive(p) for p in rest), timeout=10, what=f"killing {what} ({rest})")


# --- network -----------------------------------------------------------------------------------------


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- mounts ------------------------------------------------------------------------------------------


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` in this mount namespace, deepest first."""
    base = str(path).rstrip("/")
    points = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        point = line.split()[4].replace("\\040", " ")
        if point == base or point.startswith(base + "/"):
            points.append(point)
    return sorted(set(points), key=len, reverse=True)


def unmount_all(path: Path) -> None:
    for point in mounts_under(path):
        proc = run(["umount", point], what=f"unmounting {point}", check=False, timeout=30)
        if proc.returncode != 0 and point in mounts_under(Path(point)):
            # something still holds it (a process we could not see): detach it so the rm below is safe
            run(["umount", "--lazy", point], what=f"unmounting {point}", timeout=30)
    left = mounts_under(path)
    if left:
        raise HostProviderError(f"could not unmount {left[0]}: check `fuser -vm {left[0]}` and unmount it")


def remove_tree(path: Path) -> None:
    """rm -rf, but never through a mount (an overlay's merged dir would take the host's view with it)."""
    if not path.exists() and not path.is_symlink():
        return
    if mounts_under(path):
        unmount_all(path)
    shutil.rmtree(path, ignore_errors=False)


def remove_stale_locks(lock_dir: Path) -> None:
    """Delete lock files that nobody holds (systemd-nspawn's image locks outlive it when /run is on disk)."""
    if not lock_dir.is_dir():
        return
    for path in lock_dir.iterdir():
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:  # systemd takes POSIX/OFD record locks; flock() would not see them
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held by a running container: keep it
            continue
        try:
            path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)
