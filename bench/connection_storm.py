#!/usr/bin/env python3
"""Benchmark: a connection storm. N devices (default 10,000), each with its own credential, connected over MQTT
3.1.1/TLS; the broker is restarted and every device reconnects at once. The figure is the seconds from the broker
accepting connections again until every device is connected AND has had one QoS 1 PUBLISH acknowledged
(PUBACK), with p50/p90/p99 per device, failed attempts by kind, the broker's peak RSS and CPU seconds. Goal:
10,000 devices in <= 10 s.

Not a test: it prints figures, the goal met or not, and the ratio between the engines measured in this run.

    .venv/bin/python bench/connection_storm.py                       # 10,000 devices, mosquitto and nats-3
    .venv/bin/python bench/connection_storm.py --devices 1000 --quick    # a short look (mosquitto, nats-3)
    .venv/bin/python bench/connection_storm.py --only mosquitto --broker-nofile 1024 --devices 1100
                                                                     # what a deployed Mosquitto can hold

Set-ups (every server on 127.0.0.1, its own temp dir, killed at the end):

- mosquitto: Debian's 2.0.11 with the mosquitto.conf and ACL **iotplat renders** for the default spec
  (platform/platform.yaml with a registry of N devices; iotplat.services.broker.Broker.files): TLS 1.2 only
  with the rendered cipher list, password file, ACL (`pattern write devices/%u/telemetry`), persistence on,
  the derived max_inflight/max_queued, max_connections -1, connection_messages on. Only deployment locations
  are rewritten (file paths, the listener's port and 127.0.0.1); every other line is the rendered one. The
  password file holds one PBKDF2-SHA512 hash per device at the cost iotplat gives generated secrets
  (iotplat.secrets.materials.mqtt_hash_iterations(.., GENERATED)), each a generated 32-character secret.
  Restart = SIGTERM (Mosquitto saves its persistence file and closes every connection), then start again.
- nats-3: the 3-node JetStream cluster as tests/support/natscluster.py renders it with iotplat.nats.config
  (TLS on every listener and route, one bcrypt user per device at the generated cost 4, each device's
  subject permissions, the mqtt_max_ack_pending and max_payload iotplat.services.nats.node_configs sets).
  Devices are spread over the nodes (device i on node i mod 3) and move to the next node when a connect
  fails (the device kit lists every node). Restart = all three nodes (SIGTERM, then started again): the
  same event as Mosquitto's restart (every device reconnects, JetStream must elect its leaders again), so
  the two figures compare. `--nats-one-node` adds nats-3-one: only n1 restarts, its third of the devices
  reconnect to n2/n3 (the figure starts when n1 stops: the others accept connections throughout).

The client side: `--clients` processes (default 2), each one epoll loop driving non-blocking TLS sockets with a
minimal MQTT 3.1.1 client (CONNECT with clean session, one QoS 1 PUBLISH, wait for PUBACK: written here because
only these two packets are needed, paho's thread per client does not scale to 5,000 per process, and asyncio's
TLS layer cost 1.2 ms of client CPU per connection, more than twice Mosquitto's share). Devices publish only,
so they use clean sessions (Mosquitto restores no session for them). After the broker drops them, each
device retries with jittered exponential backoff (0.05 s doubling to 1 s), every attempt bounded (30 s, Paho
C's default connect timeout; a timeout is counted by the phase it hit: tcp, tls, connack, puback) and the
device bounded (`--timeout`). RLIMIT_NOFILE is raised to its hard limit for clients and brokers
(`--broker-nofile` sets the brokers' soft limit, e.g. 1024 = systemd's default soft limit, what
Debian's mosquitto.service plus iotplat's drop-in give Mosquitto). Client CPU seconds are printed beside
the broker's: on 2 cores shared by broker and clients, a client side near a full core would be part of
the figure.

The baseline from the same run: the first connect of all devices before the restart (at most 200
handshakes in flight per client process, so it is paced rather than a storm), and the ratio between the
engines. The load average is printed before and after each run.

Measured here (2026-12-06, Debian 12, 2 cores shared by brokers, clients and other helpers' test runs; the
load average is each run's own line; read the CPU seconds more than the times). Run 4, the quietest:

    10,000 devices   load      time    p50     p90     p99    broker CPU  peak RSS  clients CPU  failed attempts
    mosquitto        3.4       29.5 s  6.0 s   8.3 s   16.2 s  4.3 s      244 MB    8.2 s        9,527 refused (while down)
    nats-3 (all 3)   7.6-9.5   74.7 s  49.6 s  73.1 s  74.6 s 44.8 s      705 MB    32.0 s       30,808 tls, 6,990 refused
    paced first connect of all: mosquitto 8.5 s, nats-3 26.2 s; nats-3 / mosquitto: time x2.53, CPU x10.4
    mosquitto: 42,324 accept-queue overflows (kernel); nats logged 24,670 TLS handshake timeouts

    other runs (load 8-11): mosquitto 33.2 s and 37.0 s (p50 15.9 s, 15.8 s); nats-3 187.6 s and 92.3 s (in a
    third its JetStream had no meta leader 120 s after the restart: routes' TLS handshakes timed out too);
    nats-3-one (`--nats-one-node`: n1 restarted, its 3,334 devices moved to n2/n3) 48.3 s.
    1,000 devices (load 1.3): mosquitto 1.41 s (p50 0.57 s), nats-3 16.86 s (JetStream leaders back after 11.7 s).

Neither engine meets 10,000 in <= 10 s here. Mosquitto spends ~0.45 ms of CPU per reconnecting device (4.3 s for
10,000 on its one thread, so its CPU is not what limits it); its listen backlog is 100 (fixed in 2.0.11, not a
mosquitto.conf option: `ss -ltn` shows it), so the storm overflows the accept queue, the kernel drops SYNs and
devices retransmit them after 1, 3, 7 and 15 s: 90 % are back within 8.3 s, the last after 29.5 s. The cluster
restarted whole needs ~10-12 s before JetStream has leaders and MQTT connects are answered; meanwhile handshakes
pile up past nats-server's 5 s TLS timeout (iotplat.nats.config renders `timeout: 5` on every listener), the
server drops them and the retries pay for the handshake again (4.5 ms of broker CPU per device). A deployed
Mosquitto is limited first by descriptors: Debian's unit and iotplat's drop-in set no LimitNOFILE, so it runs
with systemd's soft limit 1,024 and holds 1,017 devices (`--only mosquitto --broker-nofile 1024 --devices 1100`:
"only 1,017 of 1,100 devices could connect"); the benchmark prints these deployed limits first.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import random
import re
import resource
import select
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "tests"))  # appended: tests/secrets must not shadow the stdlib
sys.path.insert(0, str(ROOT))

from support.procstat import cpu_seconds, load  # noqa: E402

PY = sys.executable
GOAL_DEVICES, GOAL_SECONDS = 10_000, 10.0
KEEPALIVE = 300  # the rendered max_keepalive: a longer one is refused
ATTEMPT_TIMEOUT = 30.0  # Paho C's default connectTimeout: a device gives an attempt this long
INITIAL_INFLIGHT = 200  # handshakes in flight per client process before the restart (the paced baseline)


# ------------------------------------------------------------------------------------------ MQTT 3.1.1 wire
def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(user: str, password: str) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session, username + password, client id = username."""
    body = _utf8("MQTT") + bytes([4, 0x80 | 0x40 | 0x02]) + struct.pack(">H", KEEPALIVE)
    body += _utf8(user) + _utf8(user) + _utf8(password)
    return b"\x10" + _remaining(len(body)) + body


def publish_packet(topic: str, payload: bytes, pid: int = 1) -> bytes:
    body = _utf8(topic) + struct.pack(">H", pid) + payload
    return b"\x32" + _remaining(len(body)) + body


# ------------------------------------------------------------------------------------------ the client side
# One epoll loop per client process, non-blocking ssl.SSLSocket per device: OpenSSL does the handshake in C and
# the loop touches each device a few times, so a device costs the client side well under the broker's share
# (an asyncio version of this client spent 1.2 ms of CPU per connection, 2.5x Mosquitto's own cost).
IDLE, TCP, HANDSHAKE, CONNACK, PUBACK, UP, GAVE_UP = range(7)
PHASES = ("idle", "tcp", "tls", "connack", "puback", "up", "gave-up")  # a timeout names the phase it hit


@dataclass
class Device:
    index: int
    user: str
    password: str
    ports: list[int]
    phase: int = IDLE
    sock: socket.socket | None = None
    buf: bytes = b""
    attempts: int = 0
    failures: Counter = field(default_factory=Counter)
    done_at: float = 0.0
    initial_ok: bool = False
    lost: bool = False  # dropped by the broker after the first connect: reconnecting (the storm)
    delay: float = 0.05
    deadline: float = 0.0  # of this device (monotonic)
    attempt_deadline: float = 0.0


def _kind(e: BaseException | int | str) -> str:
    if isinstance(e, str):
        return e
    if isinstance(e, int):
        return {errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset", errno.ETIMEDOUT: "timeout"}.get(
            e, errno.errorcode.get(e, str(e)))
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, PermissionError):
        return "connack-refused"
    if isinstance(e, ssl.SSLError):
        return "tls"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, EOFError)):
        return "reset"
    if isinstance(e, OSError) and e.errno is not None:
        return _kind(e.errno)
    return type(e).__name__


class Fleet:
    """A client process's devices on one selector, each through connect -> TLS -> CONNECT/CONNACK ->
    PUBLISH/PUBACK -> up, retrying with jittered exponential backoff (0.05 s doubling to 1 s) after a failure or
    after the broker drops it; every attempt bounded by ATTEMPT_TIMEOUT, every device by `timeout`."""

    def __init__(self, devs: list[Device], ctx: ssl.SSLContext, timeout: float) -> None:
        self.devs, self.ctx, self.timeout = devs, ctx, timeout
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, int]] = []  # (when, seq, device index) to start an attempt
        self.seq = 0
        self.inflight = 0
        self.limit = INITIAL_INFLIGHT  # the paced first connect; None during the storm
        self.waiting: list[Device] = []  # first attempts held back by the limit
        self.next_sweep = 0.0

    def schedule(self, dev: Device, after: float) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (time.monotonic() + after, self.seq, dev.index))

    def start(self, dev: Device) -> None:
        if self.limit is not None and self.inflight >= self.limit:
            self.waiting.append(dev)
            return
        if time.monotonic() > dev.deadline or dev.attempts >= 1000:
            dev.phase = GAVE_UP
            return
        dev.attempts += 1
        self.inflight += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        dev.sock, dev.buf, dev.phase = s, b"", TCP
        dev.attempt_deadline = time.monotonic() + ATTEMPT_TIMEOUT
        err = s.connect_ex(("127.0.0.1", dev.ports[0]))
        if err not in (0, errno.EINPROGRESS):
            self.fail(dev, err)
            return
        self.sel.register(s, selectors.EVENT_WRITE, dev)

    def _close(self, dev: Device) -> None:
        if dev.sock is not None:
            try:
                self.sel.unregister(dev.sock)
            except (KeyError, ValueError):
                pass
            dev.sock.close()
            dev.sock = None

    def _settle(self) -> None:
        self.inflight -= 1
        while self.waiting and (self.limit is None or self.inflight < self.limit):
            self.start(self.waiting.pop(0))

    def fail(self, dev: Device, e: BaseException | int | str) -> None:
        dev.failures[_kind(e)] += 1
        self._close(dev)
        dev.ports.append(dev.ports.pop(0))  # the next node next time (one port on Mosquitto)
        dev.phase = IDLE
        self.schedule(dev, dev.delay * random.uniform(0.5, 1.0))
        dev.delay = min(1.0, dev.delay * 2)
        self._settle()

    def _want(self, dev: Device, events: int) -> None:
        assert dev.sock is not None
        self.sel.modify(dev.sock, events, dev)

    def _handshake(self, dev: Device) -> None:
        s = dev.sock
        assert isinstance(s, ssl.SSLSocket)
        try:
            s.do_handshake()
        except ssl.SSLWantReadError:
            return self._want(dev, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            return self._want(dev, selectors.EVENT_WRITE)
        dev.phase = CONNACK
        s.send(connect_packet(dev.user, dev.password))  # ~100 bytes on a fresh connection: never blocks
        self._want(dev, selectors.EVENT_READ)

    def _readable(self, dev: Device) -> None:
        s = dev.sock
        assert isinstance(s, ssl.SSLSocket)
        while True:
            try:
                chunk = s.recv(4096)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                raise EOFError("closed by the broker")
            dev.buf += chunk
            if not s.pending():
                break
        if dev.phase == CONNACK and len(dev.buf) >= 4:
            connack, dev.buf = dev.buf[:4], dev.buf[4:]
            if connack[0] != 0x20 or connack[3] != 0:
                raise PermissionError(f"CONNACK {connack.hex()}")
            dev.phase = PUBACK
            payload = b'{"ts":%d,"seq":1,"temperature":20.5}' % int(time.time() * 1000)
            s.send(publish_packet(f"devices/{dev.user}/telemetry", payload))
        if dev.phase == PUBACK and len(dev.buf) >= 4:
            if dev.buf[:4] != b"\x40\x02\x00\x01":
                raise ConnectionError(f"no PUBACK: {dev.buf[:4].hex()}")
            dev.buf, dev.phase, dev.done_at = dev.buf[4:], UP, time.time()
            dev.initial_ok = True
            self._settle()

    def event(self, dev: Device) -> None:
        try:
            if dev.phase == TCP:
                assert dev.sock is not None
                err = dev.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    return self.fail(dev, err)
                self.sel.unregister(dev.sock)
                dev.sock = self.ctx.wrap_socket(dev.sock, server_hostname="localhost", do_handshake_on_connect=False)
                self.sel.register(dev.sock, selectors.EVENT_WRITE, dev)
                dev.phase = HANDSHAKE
            if dev.phase == HANDSHAKE:
                return self._handshake(dev)
            if dev.phase in (CONNACK, PUBACK):
                return self._readable(dev)
            if dev.phase == UP:
                try:
                    self._readable(dev)  # nothing is expected: EOF or an error = the broker went away
                except (OSError, EOFError, ssl.SSLError, ConnectionError):
                    self._close(dev)
                    dev.lost, dev.phase, dev.done_at, dev.delay = True, IDLE, 0.0, 0.05
                    dev.attempts, dev.failures = 0, Counter()
                    dev.deadline = time.monotonic() + self.timeout
                    self.schedule(dev, random.uniform(0.0, 0.05))
        except (OSError, EOFError, ssl.SSLError, ConnectionError) as e:
            self.fail(dev, e)

    def step(self, wait: float) -> None:
        now = time.monotonic()
        if self.timers:
            wait = max(0.0, min(wait, self.timers[0][0] - now))
        for key, _ in self.sel.select(wait):
            if key.data is not None:
                self.event(key.data)
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            self.start(self.devs[heapq.heappop(self.timers)[2]])
        if now >= self.next_sweep:  # attempt bounds (a connect the broker accepted but never answered)
            self.next_sweep = now + 0.25
            for dev in self.devs:
                if dev.phase in (TCP, HANDSHAKE, CONNACK, PUBACK) and now > dev.attempt_deadline:
                    self.fail(dev, f"timeout-{PHASES[dev.phase]}")


def raise_nofile(soft: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to `soft` (default: the hard limit); returns it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if soft is None else min(soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def child(args: argparse.Namespace) -> int:
    """One client process: its share of devices connected (paced), then the reconnect after the broker drops
    them. Talks to the parent in JSON lines: `ready` after the first connect; the parent answers `storm <ports>`
    (the ports it restarted: the devices there must reconnect); `done` with every device's time; `finish`."""
    raise_nofile()
    creds = json.loads(Path(args.creds).read_text())
    ports = [int(p) for p in args.ports.split(",")]
    devs = []
    for k, (i, (user, pw)) in enumerate(sorted(creds.items(), key=lambda kv: int(kv[0]))):
        j = int(i) % len(ports)
        devs.append(Device(k, user, pw, ports[j:] + ports[:j]))
    fleet = Fleet(devs, ssl.create_default_context(cafile=args.ca), args.timeout)
    t0 = time.time()
    end = time.monotonic() + args.timeout
    for d in devs:
        d.deadline = end
        fleet.start(d)
    while time.monotonic() < end and not all(d.initial_ok or d.phase == GAVE_UP for d in devs):
        fleet.step(0.05)
    up = sum(1 for d in devs if d.initial_ok)
    print(json.dumps({"ready": up, "of": len(devs), "initial_s": time.time() - t0}), flush=True)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)  # the storm's client CPU: from here (retries while it is down)
    fleet.limit = None  # from now on every device retries at once: the storm
    fleet.sel.register(sys.stdin, selectors.EVENT_READ, None)
    line = ""
    while not line:
        fleet.step(0.05)
        if select.select([sys.stdin], [], [], 0)[0]:
            line = sys.stdin.readline()
    if not line.startswith("storm"):
        return 0
    restarted = {int(p) for p in line.split()[1].split(",")}
    expected = [d for d in devs if d.initial_ok and (d.lost or d.ports[0] in restarted)]
    end = time.monotonic() + args.timeout + 30
    while time.monotonic() < end and not all(d.phase == GAVE_UP or (d.lost and d.phase == UP) for d in expected):
        fleet.step(0.05)
        expected = [d for d in devs if d.initial_ok and (d.lost or d.ports[0] in restarted)]
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    fails: Counter = Counter()
    for d in expected:
        fails.update(d.failures)
    print(json.dumps({"done": [d.done_at if d.lost and d.phase == UP else 0.0 for d in expected],
                      "kept": len(devs) - len(expected), "attempts": sum(d.attempts for d in expected),
                      "failures": dict(fails),
                      "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)}), flush=True)
    sys.stdin.readline()  # finish
    for d in devs:
        fleet._close(d)
    return 0


# ------------------------------------------------------------------------------------------ the brokers
def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def nofile_soft(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return line.split()[3]
    except OSError:
        pass
    return "?"


def listen_overflows() -> int:
    """The kernel's TcpExt ListenOverflows (connections dropped because an accept queue was full), machine-wide."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:]))
            return int(row.get("ListenOverflows", 0))
    return 0


def wait_accepting(ports: list[int], timeout: float, any_: bool = True) -> float:
    """Wall-clock time at which (any / every) port first accepted a TCP connection; polled every 5 ms."""
    deadline = time.monotonic() + timeout
    pending = set(ports)
    while time.monotonic() < deadline:
        for p in list(pending):
            try:
                with socket.create_connection(("127.0.0.1", p), timeout=0.2):
                    pending.discard(p)
                    if any_ or not pending:
                        return time.time()
            except OSError:
                pass
        time.sleep(0.005)
    raise TimeoutError(f"ports {sorted(pending)} not accepting within {timeout}s")


def _limit(soft: int | None):  # noqa: ANN202 - a preexec_fn
    def apply() -> None:
        raise_nofile(soft)
    return apply


def device_names(n: int) -> list[str]:
    return [f"dev{i:05d}" for i in range(n)]


class RenderedMosquitto:
    """Mosquitto 2.0.11 with the mosquitto.conf, ACL and password file iotplat renders for the default spec with
    `n` devices; only file paths and the listener's address are rewritten."""

    def __init__(self, n: int, nofile: int | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="iotplat-storm-mosq-"))
        self.nofile = nofile
        self.proc: subprocess.Popen | None = None
        try:
            self._prepare(n)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _prepare(self, n: int) -> None:
        from iotplat.render.engine import Renderer
        from iotplat.secrets.materials import mqtt_hash_iterations
        from iotplat.secrets.passwords import SecretSource, generate_password, hash_many
        from iotplat.services.broker import Broker
        from iotplat.spec.load import load_platform
        from support.servers import free_port, make_ca

        spec_dir = self.dir / "spec"
        spec_dir.mkdir()
        shutil.copyfile(ROOT / "platform" / "platform.yaml", spec_dir / "platform.yaml")
        (spec_dir / "devices.csv").write_text("id\n" + "".join(f"{d}\n" for d in device_names(n)))
        platform = load_platform(spec_dir / "platform.yaml")
        files = {f.dest: f.content.decode() for f in Broker().files(Renderer(platform, None))}  # type: ignore[arg-type]
        conf, acl = files["/etc/mosquitto/mosquitto.conf"], files["/etc/mosquitto/iotplat/acl"]
        self.iterations = mqtt_hash_iterations(platform, SecretSource.GENERATED)
        self.passwords = {d: generate_password() for d in device_names(n)}
        hashes = hash_many(self.passwords.items(), self.iterations)
        (self.dir / "passwd").write_text("".join(f"{u}:{h}\n" for u, h in hashes.items()))
        os.chmod(self.dir / "passwd", 0o600)
        (self.dir / "acl").write_text(acl)
        (self.dir / "data").mkdir()
        self.ca = make_ca(self.dir / "tls")
        self.port = free_port()
        m = re.search(r"(?m)^max_connections (\S+)$", conf)
        self.max_connections = m.group(1) if m else "(not set)"
        for key, value in (("password_file", self.dir / "passwd"), ("acl_file", self.dir / "acl"),
                           ("persistence_location", f"{self.dir}/data/"), ("certfile", self.ca["cert"]),
                           ("keyfile", self.ca["key"]), ("listener", f"{self.port} 127.0.0.1")):
            conf, count = re.subn(rf"(?m)^{key} .*$", f"{key} {value}", conf)
            if count != 1:
                raise RuntimeError(f"the rendered mosquitto.conf has {count} '{key}' lines (expected 1): update "
                                   "bench/connection_storm.py for the template's change")
        (self.dir / "mosquitto.conf").write_text(conf)
        if os.geteuid() == 0:  # Mosquitto drops to its own user: it must read its files and write persistence
            import pwd

            pw = pwd.getpwnam("mosquitto")
            for root, dirs, fs in os.walk(self.dir):
                os.chown(root, pw.pw_uid, pw.pw_gid)
                for f in fs:
                    os.chown(os.path.join(root, f), pw.pw_uid, pw.pw_gid)

    @property
    def ports(self) -> list[int]:
        return [self.port]

    @property
    def ca_file(self) -> str:
        return str(self.ca["ca"])

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def launch(self) -> None:
        from support.servers import MOSQUITTO

        log = open(self.dir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, start_new_session=True, preexec_fn=_limit(self.nofile))
        log.close()

    def stop(self) -> None:
        from support.servers import kill_group

        kill_group(self.proc, signal.SIGTERM, timeout=60)

    def restart(self) -> tuple[float, list[int]]:
        """SIGTERM, wait for the exit, start again; (wall time of the new start, ports to wait for)."""
        self.stop()
        t = time.time()
        self.launch()
        return t, self.ports

    def close(self) -> None:
        from support.servers import kill_group

        kill_group(self.proc, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class ClusterBroker:
    """The 3-node NATS cluster (tests/support/natscluster.py, iotplat.nats.config) with one user per device."""

    def __init__(self, n: int, nofile: int | None, one_node: bool = False) -> None:
        from support.natscluster import NatsCluster

        self.one_node = one_node
        self.nofile = nofile
        self.cluster = NatsCluster.start(3, devices=n, workers=1, launch=False, mqtt_max_ack_pending=2000,
                                         max_payload=262144)
        self.passwords = {u: pw for u, pw in self.cluster.passwords.items() if u.startswith("dev")}
        if len(self.passwords) != n:
            self.cluster.close()
            raise RuntimeError("tests/support/natscluster.py no longer names its devices dev000..")

    @property
    def ports(self) -> list[int]:
        return [node.mqtt_port for node in self.cluster.nodes]

    @property
    def ca_file(self) -> str:
        return self.cluster.ca_file

    def pids(self) -> list[int]:
        return [node.proc.pid for node in self.cluster.nodes if node.proc is not None]

    def _launch(self, nodes: list) -> None:  # noqa: ANN001 - NatsNode
        from support.natscluster import NATS_SERVER

        for node in nodes:
            node.proc = subprocess.Popen([NATS_SERVER, "-c", str(node.conf), "-l", str(node.log)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_limit(self.nofile))

    def launch(self) -> None:
        from support.servers import wait_port

        self._launch(self.cluster.nodes)
        for node in self.cluster.nodes:
            wait_port(node.mqtt_port, 60, proc=node.proc, what=f"nats-server {node.name}")
        self.cluster.wait_ready()
        self.cluster.warm_mqtt()

    def restart(self) -> tuple[float, list[int]]:
        nodes = self.cluster.nodes[:1] if self.one_node else self.cluster.nodes
        for node in nodes:  # all at once: stopped one after the other, devices would hop to the nodes still up
            if node.proc is not None and node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGTERM)
        for node in nodes:
            node.stop(signal.SIGTERM, timeout=60)  # waits for the exit (SIGKILL after 60 s)
        t = time.time()
        self._launch(nodes)
        return t, [node.mqtt_port for node in nodes]

    def close(self) -> None:
        self.cluster.close()


# ------------------------------------------------------------------------------------------ deployed limits
SYSTEMD_DEFAULT_SOFT_NOFILE = 1024  # systemd 252 (Debian 12): DefaultLimitNOFILE=1024:524288


def _unit_nofile(*files: Path) -> tuple[int, str] | None:
    """The last LimitNOFILE= (its soft value) in systemd unit files read in order, and where it was set."""
    found = None
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(r"(?m)^LimitNOFILE=(\d+)(?::\d+)?\s*$", text):
            found = (int(m.group(1)), str(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f))
    return found


def deployed_limits(n: int, max_connections: str) -> list[str]:
    """What the brokers iotplat deploys may hold: the file descriptor limit their systemd units get (a broker
    needs one per device plus a few), Mosquitto's rendered max_connections. Read from the repository's role
    templates and Debian's unit, so the lines stay true when they change."""
    out = []
    mosq = _unit_nofile(Path("/lib/systemd/system/mosquitto.service"),
                        ROOT / "roles/mosquitto/templates/mosquitto-iotplat.conf.j2")
    soft, where = mosq or (SYSTEMD_DEFAULT_SOFT_NOFILE,
                           "no LimitNOFILE in Debian's mosquitto.service nor in "
                           "roles/mosquitto/templates/mosquitto-iotplat.conf.j2: systemd's default soft limit")
    verdict = "enough" if soft > n + 50 else f"NOT enough for {n:,} devices (Mosquitto 2.0.11 does not raise it)"
    out.append(f"mosquitto: RLIMIT_NOFILE {soft} ({where}): {verdict}; rendered max_connections {max_connections}")
    nats = _unit_nofile(ROOT / "roles/nats/templates/nats-server-iotplat.conf.j2")
    if nats:
        per_node = -(-n // 3)
        verdict = "enough" if nats[0] > per_node + 50 else f"NOT enough for {per_node:,} devices per node"
        out.append(f"nats-server: LimitNOFILE={nats[0]} ({nats[1]}): {verdict} (max_connections: the spec's "
                   "broker.limits.max_connections if > 0, else nats-server's default 65,536)")
    else:
        out.append("nats-server: no LimitNOFILE in roles/nats/templates/nats-server-iotplat.conf.j2")
    return out


# ------------------------------------------------------------------------------------------ one storm
def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s))) - 1))]


def storm(kind: str, n: int, clients: int, timeout: float, nofile: int | None) -> dict:
    """Start the broker, connect n devices, restart it, measure the reconnect. Everything is killed at the end."""
    broker: RenderedMosquitto | ClusterBroker | None = None
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="iotplat-storm-"))
    try:
        t_setup = time.monotonic()
        if kind == "mosquitto":
            broker = RenderedMosquitto(n, nofile)
        else:
            broker = ClusterBroker(n, nofile, one_node=kind == "nats-3-one")
        broker.launch()
        if kind == "mosquitto":
            from support.servers import wait_port

            wait_port(broker.port, 30, proc=broker.proc, what="mosquitto")
        setup_s = time.monotonic() - t_setup
        names = sorted(broker.passwords)
        for c in range(clients):
            share = {str(i): (names[i], broker.passwords[names[i]]) for i in range(c, n, clients)}
            (tmp / f"creds-{c}.json").write_text(json.dumps(share))
            os.chmod(tmp / f"creds-{c}.json", 0o600)
            procs.append(subprocess.Popen(
                [PY, __file__, "--child", "--creds", str(tmp / f"creds-{c}.json"), "--ca", broker.ca_file,
                 "--ports", ",".join(map(str, broker.ports)), "--timeout", str(timeout)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
                preexec_fn=_limit(None)))
        ready = [json.loads(p.stdout.readline() or "{}") for p in procs]  # type: ignore[union-attr]
        connected = sum(r.get("ready", 0) for r in ready)
        initial_s = max((r.get("initial_s", 0.0) for r in ready), default=0.0)
        rss_before = sum(peak_rss_mb(pid) for pid in broker.pids())
        limit = nofile_soft(broker.pids()[0])
        if connected < n:
            return {"kind": kind, "n": n, "connected_before": connected, "initial_s": initial_s, "nofile": limit,
                    "error": f"only {connected:,} of {n:,} devices could connect before the restart",
                    "log": _log_tail(broker)}
        load0 = load()
        cpu0 = {pid: cpu_seconds(pid) for pid in broker.pids()}  # nodes that keep running count from here
        overflows0 = listen_overflows()
        t_stop = time.time()
        t_start, ports = broker.restart()
        t_listen = wait_accepting(ports, 60)
        for p in procs:
            p.stdin.write(f"storm {','.join(map(str, ports))}\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        ready_after = float("nan")
        if isinstance(broker, ClusterBroker):  # while the devices reconnect: when JetStream has its leaders again
            try:
                broker.cluster.wait_ready(120)
                ready_after = time.time() - t_start
            except TimeoutError:  # measured, not required: the devices' figures say what it cost
                ready_after = float("inf")
        results = [json.loads(p.stdout.readline() or "{}") for p in procs]  # type: ignore[union-attr]
        pids = broker.pids()
        cpu = sum(cpu_seconds(pid) - cpu0.get(pid, 0.0) for pid in pids)  # a restarted one: since its start
        rss = sum(peak_rss_mb(pid) for pid in pids)
        done = [t for r in results for t in r.get("done", [])]
        ok = [t for t in done if t > 0]
        t_zero = t_stop if kind == "nats-3-one" else t_listen  # one node: the others accepted throughout
        per = [t - t_zero for t in ok]
        fails: Counter = Counter()
        for r in results:
            fails.update(r.get("failures", {}))
        return {"kind": kind, "n": n, "connected_before": connected, "initial_s": initial_s, "setup_s": setup_s,
                "reconnected": len(ok), "expected": len(done), "kept": sum(r.get("kept", 0) for r in results),
                "secs": max(per) if per else float("nan"),
                "p50": _pct(per, 0.5) if per else float("nan"), "p90": _pct(per, 0.9) if per else float("nan"),
                "p99": _pct(per, 0.99) if per else float("nan"), "listen_after_start": t_listen - t_start,
                "ready_after_start": ready_after,
                "attempts": sum(r.get("attempts", 0) for r in results), "failures": dict(fails),
                "broker_cpu_s": cpu, "broker_rss_mb": rss, "rss_before_mb": rss_before, "nofile": limit,
                "client_cpu_s": sum(r.get("cpu_s", 0.0) for r in results), "load": f"{load0} -> {load()}",
                "server_log": server_events(_log_text(broker)), "overflows": listen_overflows() - overflows0}
    finally:
        for p in procs:
            try:
                if p.poll() is None:
                    p.stdin.write("finish\n")  # type: ignore[union-attr]
                    p.stdin.flush()  # type: ignore[union-attr]
            except OSError:
                pass
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        if broker is not None:
            broker.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _log_text(broker: RenderedMosquitto | ClusterBroker) -> str:
    if isinstance(broker, RenderedMosquitto):
        try:
            return (broker.dir / "mosquitto.log").read_text(errors="replace")
        except OSError:
            return ""
    return "\n".join(node.log_text() for node in broker.cluster.nodes)


SERVER_EVENTS = {"TLS handshake timeout": "TLS handshake timeout", "TLS handshake error": "TLS handshake error",
                 "Too many open files": "too many open files", "maximum connections exceeded": "max connections"}


def server_events(text: str) -> dict[str, int]:
    """What the broker logged about refused or dropped connections during the run (log lines counted)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        for needle, name in SERVER_EVENTS.items():
            if needle.lower() in line.lower():
                out[name] = out.get(name, 0) + 1
    return out


def _log_tail(broker: RenderedMosquitto | ClusterBroker) -> str:
    if isinstance(broker, RenderedMosquitto):
        text = (broker.dir / "mosquitto.log").read_text(errors="replace")
    else:
        text = broker.cluster.nodes[0].log_text()
    lines = [x for x in text.splitlines() if "rror" in x or "limit" in x.lower()]
    return "\n".join(lines[-3:])


def report(r: dict) -> str:
    if "error" in r:
        return (f"   {r['kind']:11s} FAILED: {r['error']} (initial connect {r['initial_s']:.1f} s; broker soft "
                f"RLIMIT_NOFILE {r['nofile']})" + (f"\n      log: {r['log']}" if r.get("log") else ""))
    fails = ", ".join(f"{k} {v:,}" for k, v in sorted(r["failures"].items())) or "none"
    kept = f" ({r['kept']:,} kept their connection)" if r["kept"] else ""
    return (f"   {r['kind']:11s} {r['reconnected']:,}/{r['expected']:,}{kept} reconnected+acked in {r['secs']:.2f} s "
            f"(p50 {r['p50']:.2f}  p90 {r['p90']:.2f}  p99 {r['p99']:.2f} s per device); listening "
            f"{r['listen_after_start']:.2f} s after start"
            + ("" if r["ready_after_start"] != r["ready_after_start"] else
               ", JetStream NOT ready (every node healthy with a meta leader) 120 s after start"
               if r["ready_after_start"] == float("inf") else
               f", JetStream ready (meta leader) {r['ready_after_start']:.2f} s after start")
            + f"; attempts {r['attempts']:,} (failed: {fails}); broker "
            f"CPU {r['broker_cpu_s']:.1f} s, peak RSS {r['broker_rss_mb']:.0f} MB (before restart "
            f"{r['rss_before_mb']:.0f} MB), soft RLIMIT_NOFILE {r['nofile']}; clients CPU {r['client_cpu_s']:.1f} s; "
            f"baseline: first connect of all (paced) {r['initial_s']:.1f} s; load {r['load']}; "
            f"accept-queue overflows (kernel, machine-wide) {r['overflows']:,}"
            + (f"\n      broker log over the run: " + ", ".join(f"{k} {v:,}" for k, v in sorted(r["server_log"].items()))
               if r.get("server_log") else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=GOAL_DEVICES)
    ap.add_argument("--clients", type=int, default=2, help="client processes (default 2, one per core)")
    ap.add_argument("--only", choices=("mosquitto", "nats-3", "nats-3-one"), action="append")
    ap.add_argument("--nats-one-node", action="store_true", help="also restart one node of three (nats-3-one)")
    ap.add_argument("--quick", action="store_true", help="shorter per-device timeout (60 s)")
    ap.add_argument("--timeout", type=float, default=None, help="per-device bound in seconds (default 300)")
    ap.add_argument("--broker-nofile", type=int, default=None,
                    help="the brokers' soft RLIMIT_NOFILE (default: the hard limit)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--creds", help=argparse.SUPPRESS)
    ap.add_argument("--ca", help=argparse.SUPPRESS)
    ap.add_argument("--ports", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.timeout is None:
        args.timeout = 60.0 if args.quick else 300.0
    if args.child:
        return child(args)
    if args.devices < 1 or args.clients < 1:
        ap.error("--devices and --clients must be at least 1")
    kinds = args.only or (["mosquitto", "nats-3"] + (["nats-3-one"] if args.nats_one_node else []))
    print(f"connection storm: {args.devices:,} devices (MQTT 3.1.1, TLS, one credential each) reconnecting after "
          f"a broker restart; {args.clients} client processes; {os.cpu_count()} cores; load average {load()}",
          flush=True)
    from iotplat.spec.model import BrokerLimits

    default_max = BrokerLimits().max_connections  # what the rendered mosquitto.conf says without a spec value
    print("   deployed limits: " + "\n   deployed limits: ".join(deployed_limits(args.devices, str(default_max))),
          flush=True)
    results = {}
    for kind in kinds:
        r = storm(kind, args.devices, args.clients, args.timeout, args.broker_nofile)
        results[kind] = r
        print(report(r), flush=True)
    goal_n = args.devices >= GOAL_DEVICES
    for kind, r in results.items():
        if "error" in r:
            continue
        met = r["reconnected"] == r["expected"] and r["secs"] <= GOAL_SECONDS
        scope = "" if goal_n else f" (at {args.devices:,} devices; the goal is {GOAL_DEVICES:,})"
        print(f"   goal {GOAL_DEVICES:,} in <= {GOAL_SECONDS:.0f} s: {kind} {'met' if met else 'NOT met'}{scope}",
              flush=True)
    m, c = results.get("mosquitto", {}), results.get("nats-3", {})
    if "secs" in m and "secs" in c:
        print(f"   nats-3 / mosquitto: time x{c['secs'] / m['secs']:.2f}, broker CPU "
              f"x{c['broker_cpu_s'] / max(m['broker_cpu_s'], 0.01):.2f}, peak RSS "
              f"x{c['broker_rss_mb'] / max(m['broker_rss_mb'], 0.01):.2f}", flush=True)
    print(f"load average at the end {load()}", flush=True)
    return 0 if all("error" not in r and r["reconnected"] == r["expected"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
