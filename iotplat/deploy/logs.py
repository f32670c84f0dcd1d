"""`iotplat logs`: the services' journals from every host, merged by time and labelled host/service.

Each host is read over SSH with `journalctl -o json` (one process per host, in parallel threads); lines are
merged by their journal timestamp, and every secret value iotplat knows is masked before anything is printed.
`--follow` keeps one `journalctl -f` per host open and prints lines as they arrive until Ctrl-C.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from iotplat.errors import InvalidInput, IotplatError
from iotplat.hosts import Host
from iotplat.spec.platform_model import Platform

@dataclass(frozen=True, order=True)
class LogLine:
    ts_us: int
    host: str
    service: str
    message: str

    def as_dict(self) -> dict:
        return {"ts_us": self.ts_us, "host": self.host, "service": self.service, "message": self.message}


def units_for(platform: Platform, host: str, service: str | None) -> dict[str, str]:
    """unit -> service label for the services of `host` (optionally one service), as each service states them."""
    from iotplat.services import placed

    out: dict[str, str] = {}
    for svc in placed(platform):
        if host in platform.placement[svc.name] and service in (None, svc.name):
            out.update({unit: svc.name for unit in svc.units(platform, host)})
    return out


def _argv(host: Host, units: dict[str, str], since: str | None, follow: bool, lines: int | None) -> list[str]:
    cmd = ["sudo", "journalctl", "--no-pager", "-o", "json", "--output-fields=MESSAGE,_SYSTEMD_UNIT,UNIT,OBJECT_SYSTEMD_UNIT,__REALTIME_TIMESTAMP"]
    for unit in units:
        cmd += ["-u", unit]
    if since:
        cmd += ["--since", since]
    if lines is not None:
        cmd += ["-n", str(lines)]
    if follow:
        cmd.append("-f")
    return host.remote_argv(cmd)


def _parse(host: str, units: dict[str, str], raw: str, mask: Callable[[str], str]) -> LogLine | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    message = entry.get("MESSAGE", "")
    if isinstance(message, list):  # journald gives bytes as a list of ints
        message = bytes(message).decode("utf-8", "replace")
    # _SYSTEMD_UNIT: the unit's own processes; UNIT / OBJECT_SYSTEMD_UNIT: lines logged about the unit (systemd's
    # "Starting mosquitto.service" comes from init.scope with UNIT=mosquitto.service): label by our unit.
    # A service names its units with or without the .service suffix (`mosquitto`, `iotplat-toy.service`).
    service = ""
    for key in ("UNIT", "OBJECT_SYSTEMD_UNIT", "_SYSTEMD_UNIT"):
        name = str(entry.get(key, ""))
        match = next((units[n] for n in (name, name.removesuffix(".service")) if n and n in units), None)
        if match:
            service = match
            break
    else:
        service = str(entry.get("_SYSTEMD_UNIT", ""))
    return LogLine(int(entry.get("__REALTIME_TIMESTAMP", 0)), host, service, mask(str(message)))


def collect(platform: Platform, hosts: list[Host], mask: Callable[[str], str], *, service: str | None = None,
            host: str | None = None, since: str | None = None, lines: int | None = 200) -> list[LogLine]:
    targets = _targets(platform, hosts, service, host)
    results: list[LogLine] = []
    errors: list[str] = []
    lock = threading.Lock()

    def read(h: Host, units: dict[str, str]) -> None:
        proc = subprocess.run(_argv(h, units, since, False, lines), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 and not proc.stdout:
            with lock:
                errors.append(f"{h.name}: {(proc.stderr.strip().splitlines() or ['ssh failed'])[-1]}")
            return
        parsed = [p for p in (_parse(h.name, units, line, mask) for line in proc.stdout.splitlines()) if p]
        with lock:
            results.extend(parsed)

    threads = [threading.Thread(target=read, args=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors and not results:
        raise IotplatError("cannot read the journals: " + "; ".join(errors))
    return sorted(results)


def follow(platform: Platform, hosts: list[Host], mask: Callable[[str], str], *, service: str | None = None,
           host: str | None = None, since: str | None = None) -> Iterator[LogLine]:
    import queue

    targets = _targets(platform, hosts, service, host)
    q: queue.Queue[LogLine | None] = queue.Queue()
    procs = []
    for h, units in targets:
        proc = subprocess.Popen(_argv(h, units, since, True, 20), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        procs.append(proc)

        def pump(p: subprocess.Popen, name: str = h.name, u: dict[str, str] = units) -> None:
            assert p.stdout is not None
            for raw in p.stdout:
                line = _parse(name, u, raw, mask)
                if line:
                    q.put(line)
            q.put(None)

        threading.Thread(target=pump, args=(proc,), daemon=True).start()
    open_streams = len(procs)
    try:
        while open_streams:
            item = q.get()
            if item is None:
                open_streams -= 1
                continue
            yield item
    finally:
        for p in procs:
            p.terminate()


def _targets(platform: Platform, hosts: list[Host], service: str | None, host: str | None) -> list[tuple[Host, dict]]:
    from iotplat.services import names

    if service and service not in names():
        raise InvalidInput(f"unknown service {service!r}: choose {', '.join(names())}")
    if host and host not in platform.host_names:
        raise InvalidInput(f"unknown host {host!r}: the spec's hosts are {', '.join(platform.host_names)}")
    out = []
    for h in hosts:
        if host and h.name != host:
            continue
        units = units_for(platform, h.name, service)
        if units:
            out.append((h, units))
    if not out:
        raise InvalidInput(f"no host runs {service or 'any service'}" + (f" on {host}" if host else ""))
    return out
