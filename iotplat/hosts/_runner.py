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


def log(message: str) -> None:
    print(f"[iotplat-runner {time.strftime('%H:%M:%S')}] {message}", flush=True)


def netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False).stdout
    return [int(w) for w in out.split() if w.isdigit() and int(w) != os.getpid()]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pid-file", required=True)  # where the current nspawn pid is written
    parser.add_argument("--netns", required=True)
    parser.add_argument("nspawn", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = [a for a in args.nspawn if a != "--"]

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
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
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
