"""Run the real worker as a subprocess (``python -m iotplat.worker``) against test servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from .servers import Influx1, Mosquitto, Victoria, free_port_run, kill_group

TELEMETRY_SUB = {
    "name": "telemetry",
    "topic": "devices/{device}/telemetry",
    "format": "json",
    "measurement": "telemetry",
    "timestamp": {"field": "ts", "unit": "ms"},
    "fields": {"seq": {"type": "int", "required": True}, "temp": {"type": "float"}},
}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    raise TypeError(v)


def _toml_table(prefix: str, d: dict[str, Any], out: list[str], array: bool = False) -> None:
    out.append(f"[[{prefix}]]" if array else f"[{prefix}]")
    nested = []
    for k, v in d.items():
        if isinstance(v, dict):
            nested.append((k, v))
        else:
            out.append(f"{k} = {_toml_value(v)}")
    for k, v in nested:
        _toml_table(f"{prefix}.{k}", v, out)


def render_config(path: Path, sections: dict[str, dict[str, Any]], subscriptions: list[dict[str, Any]]) -> Path:
    out = ["version = 1"]
    for name, sect in sections.items():
        _toml_table(name, sect, out)
    for sub in subscriptions:
        _toml_table("subscriptions", sub, out, array=True)
    path.write_text("\n".join(out) + "\n")
    return path


def worker_config(tmp: Path, broker: Mosquitto, influx: Influx1 | Victoria | None, *, tls: bool = False,
                  protocol: int = 5, inflight: int = 1000, shared_group: str = "", spool_mode: str = "outage",
                  spool_max: int = 256 << 20, segment: int = 4 << 20, max_points: int = 5000,
                  max_delay: float = 0.1, subscriptions: list[dict[str, Any]] | None = None,
                  dead_letter_rate: float = 100000.0, http_port: int | None = None, username: str = "worker-{replica}",
                  name: str = "worker.toml", extra: dict[str, dict[str, Any]] | None = None) -> Path:
    """A worker.toml in the documented format (docs/worker-config.md); secrets in files next to it."""
    tmp.mkdir(parents=True, exist_ok=True)
    for i in (1, 2, 3):
        (tmp / f"mqtt-password-{i}").write_text(broker.users.get(f"worker-{i}", "x") + "\n")
    sections: dict[str, dict[str, Any]] = {
        "mqtt": {"host": "127.0.0.1", "port": broker.tls_port if tls else broker.port, "protocol": protocol,
                 "tls": tls, "ca_file": str(broker.ca["ca"]) if tls else "", "username": username,
                 "password_file": "mqtt-password-{replica}", "keepalive": 30, "session_expiry": 3600,
                 "shared_group": shared_group, "inflight": inflight, "reconnect_min": 0.2, "reconnect_max": 2.0},
    }
    if isinstance(influx, Victoria):
        (tmp / "influx-token").write_text("vm-does-not-check-tokens\n")
        sections["influxdb"] = {"version": 2, "url": influx.url, "timeout": 10.0, "org": "iotplat",
                                "bucket": "iot", "token_file": "influx-token"}
    else:
        assert influx is not None
        (tmp / "influxdb-password").write_text(influx.worker[1] + "\n")
        sections["influxdb"] = {"version": 1, "url": influx.url, "timeout": 5.0, "database": influx.database,
                                "retention_policy": influx.rp, "username": influx.worker[0],
                                "password_file": "influxdb-password"}
    sections["batch"] = {"max_points": max_points, "max_delay": max_delay}
    sections["spool"] = {"dir": str(tmp / "spool-{replica}"), "max_bytes": spool_max, "segment_bytes": segment,
                         "mode": spool_mode}
    sections["dead_letters"] = {"measurement": "iotplat_dead_letters", "topic": "iotplat/dead-letters",
                                "rate_per_device": dead_letter_rate, "excerpt_bytes": 256}
    sections["limits"] = {"max_payload": 65536, "max_json_depth": 16, "max_fields": 200}
    sections["http"] = {"listen": "127.0.0.1", "port": http_port if http_port is not None else free_port_run(8)}
    for k, v in (extra or {}).items():
        sections.setdefault(k, {}).update(v)
    return render_config(tmp / name, sections, subscriptions or [TELEMETRY_SUB])


class WorkerProc:
    """The worker under test as a real process; stdout's ready line and /metrics are read from it."""

    def __init__(self, config: Path, replica: int = 1, transport: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.replica = replica
        self.transport = transport or os.environ.get("IOTPLAT_TEST_TRANSPORT", "native")
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.ready_line: str | None = None
        self.stdout_lines: list[str] = []
        self.log_path = config.parent / f"worker-{replica}.log"
        import tomllib
        cfg = tomllib.loads(config.read_text())
        self.http_port = cfg["http"]["port"] + replica - 1

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> "WorkerProc":
        env = dict(os.environ)
        env.pop("IOTPLAT_WORKER_REPLICA", None)
        env.update(self.env or {})
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iotplat.worker", "--config", str(self.config), "--replica", str(self.replica),
             "--transport", self.transport], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            start_new_session=True, env=env, text=True)
        log.close()
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line.rstrip("\n"))
            if self.ready_line is None:
                self.ready_line = line.rstrip("\n")
                self._ready.set()

    def wait_ready(self, timeout: float = 30.0) -> str:
        if not self._ready.wait(timeout):
            raise TimeoutError(f"worker not ready in {timeout}s; log:\n{self.log_tail()}")
        assert self.ready_line is not None
        return self.ready_line

    def metrics(self) -> dict[str, float]:
        from iotplat.worker.metrics import parse_prometheus

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            return parse_prometheus(r.read().decode())

    def health(self) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_metric(self, name: str, target: float, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        v = -1.0
        while time.monotonic() < deadline:
            try:
                v = self.metrics().get(name, 0.0)
                if v >= target:
                    return v
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{name} = {v} < {target} after {timeout}s")

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            kill_group(self.proc, signal.SIGKILL)
            return self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_records(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"unparsed": line})
        return out

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc, signal.SIGKILL)


def telemetry(devices: int, per_device: int, start_ms: int | None = None, seq0: int = 0):
    """Messages with a unique (device, seq) and a unique device timestamp each; round-robin over devices."""
    base = start_ms if start_ms is not None else int(time.time() * 1000) - devices * per_device - 60_000
    n = 0
    for i in range(per_device):
        for d in range(devices):
            seq = seq0 + n
            yield (f"devices/dev{d:03d}/telemetry",
                   b'{"ts":%d,"seq":%d,"temp":%.2f}' % (base + seq, seq, 20 + (seq % 100) / 10))
            n += 1
