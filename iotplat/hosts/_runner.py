"""Keeps one local host running: runs systemd-nspawn and starts it again when the guest reboots.

Started detached (own session) by the local provider, so hosts outlive the `iotplat` process, as real
machines do. Run as a plain script (python3 _runner.py ...): it imports nothing from iotplat.

Without a systemd on the host nothing restarts a container whose guest ran `reboot` (nspawn exits
with 133). SIGHUP asks for a restart (the guest is shut down and booted again), SIGTERM for a stop.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

REBOOT_EXIT = 133
MAX_QUICK_RESTARTS = 5  # more restarts than this within QUICK_WINDOW s: the guest is crash-looping
CGROUP_PARENT = "iotplat-hosts"  # a host's own cgroup: <this process's cgroup>/iotplat-hosts/<name>


def log(message: str) -> None:
    print(f"[iotplat-runner {time.strftime('%H:%M:%S')}] {message}", flush=True)


def netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False).stdout
    return [int(w) for w in out.split() if w.isdigit() and int(w) != os.getpid()]


def host_cgroups(name: str) -> list[str]:
    """The host's own cgroup in each hierarchy systemd tracks units in (cgroup2; on a hybrid or legacy machine also the
    named v1 hierarchy name=systemd), below this process's cgroup there.

    Why: with --keep-unit and no systemd on this machine, nspawn puts a guest into payload/ below its own cgroup, so
    guests started from one cgroup share it, and their units share cgroups (every guest's ssh.service is
    .../payload/system.slice/ssh.service). Then one guest's systemd removing a unit's emptied cgroup races another's
    attaching a process to it: "Failed to attach ... to compat systemd cgroup ... No such file or directory", the
    control process exits 219/CGROUP, and a restart fails (measured: 5 of 200 concurrent restarts of one unit in
    two hosts). A cgroup of its own per host makes the guests' trees disjoint."""
    found = []
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if controllers == "name=systemd":
            mounts = ["/sys/fs/cgroup/systemd"]
        elif hid == "0" and controllers == "":
            mounts = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]  # hybrid, then unified-only
        else:
            continue
        mount = next((m for m in mounts if os.path.exists(os.path.join(m, "cgroup.procs"))), None)
        if mount:
            found.append(os.path.join(mount, path.strip("/"), CGROUP_PARENT, name).replace("//", "/"))
    return found


def enter_cgroups(paths: list[str]) -> None:
    """In the child before it runs nspawn: move into the host's own cgroups (made here; best effort: a machine
    whose cgroups cannot be written starts the guest as before)."""
    for path in paths:
        try:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write("0\n")  # 0: the writing process itself
        except OSError:
            pass


def remove_cgroups(paths: list[str]) -> list[str]:
    """Remove cgroup trees, deepest first; a cgroup that still has processes stays (rmdir fails). Returns those."""
    left = []
    for top in paths:
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError:
                left.append(dirpath)
    return left


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pid-file", required=True)  # where the current nspawn pid is written
    parser.add_argument("--netns", required=True)
    parser.add_argument("--cgroup", default="")  # the name of the host's own cgroup (host_cgroups)
    parser.add_argument("nspawn", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = [a for a in args.nspawn if a != "--"]
    cgroups = host_cgroups(args.cgroup) if args.cgroup else []

    state = {"stop": False, "restart": False, "child": None}

    def on_term(signum, frame):
        state["stop"] = True
        if state["child"] is not None:
            state["child"].send_signal(signal.SIGTERM)  # nspawn shuts the guest down cleanly

    def on_hup(signum, frame):
        state["restart"] = True
        if state["child"] is not None:
            state["child"].send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)

    starts: list[float] = []
    while not state["stop"]:
        now = time.monotonic()
        starts = [t for t in starts if now - t < 30] + [now]
        if len(starts) > MAX_QUICK_RESTARTS:
            log("the guest restarted too often within 30 s; giving up")
            return 1
        log("starting: " + " ".join(argv))
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=lambda: enter_cgroups(cgroups))
        state["child"] = child
        with open(args.pid_file + ".tmp", "w") as f:
            f.write(f"{child.pid}\n")
        os.replace(args.pid_file + ".tmp", args.pid_file)
        rc = child.wait()
        state["child"] = None
        log(f"systemd-nspawn exited with {rc}")
        # after a crash of nspawn the guest's processes may be left behind in its netns
        leftovers = netns_pids(args.netns)
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if leftovers:
            deadline = time.monotonic() + 10
            while netns_pids(args.netns) and time.monotonic() < deadline:
                time.sleep(0.1)
        remove_cgroups(cgroups)
        if state["stop"]:
            break
        if rc == REBOOT_EXIT or state["restart"]:
            state["restart"] = False
            continue
        log("the guest powered off; not restarting")
        break
    try:
        os.unlink(args.pid_file)
    except FileNotFoundError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
