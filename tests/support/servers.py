"""Real servers for tests and benchmarks: Mosquitto, InfluxDB 1.x, VictoriaMetrics.

Each server runs as its own process group on a random free loopback port with its own temp dir,
and is stopped (process group killed) by ``stop()``/``close()``. Nothing here touches the system
services. Reusable by any test: ``Mosquitto.start(tmp)``, ``Influx1.start(tmp)``, ``Victoria.start(tmp)``.

The Mosquitto config is rendered with the settings tests need for "0 lost" to be possible
(/work/shared/research/reliability.md): persistence in a mosquitto-writable dir, an explicit large
``max_queued_messages`` (the default 1000 silently drops), ``allow_anonymous false``, a password file
with PBKDF2-SHA512 ``$7$`` hashes made here, an ACL, ``use_username_as_clientid``, and a TLS listener
with a throw-away CA made with the openssl CLI.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
INFLUXD = shutil.which("influxd") or "/usr/bin/influxd"
VICTORIA = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free loopback ports, for servers that listen on base + n (the worker's
    replica N serves HTTP on port + N - 1). Chosen below the kernel's ephemeral range (ip_local_port_range starts
    at 32768), so an outgoing connection elsewhere on the machine cannot take base + 1 between this check and
    the server's bind, which a port from bind(0) plus one could not promise."""
    import random
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32768 - count)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no run of {count} free ports below 32768")


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def kill_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def mosquitto_hash(password: str, iterations: int = 1000, salt: bytes | None = None) -> str:
    """A Mosquitto 2.x PBKDF2-SHA512 password hash: ``$7$<iterations>$<b64 salt>$<b64 hash>``."""
    salt = salt if salt is not None else os.urandom(12)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def make_ca(directory: Path, names: tuple[str, ...] = ("localhost", "broker.iotplat.internal"),
            usages: str = "serverAuth") -> dict[str, Path]:
    """A throw-away CA (kept when `directory` already holds one) and a server certificate for 127.0.0.1/::1 and
    ``names`` with the extended key `usages` (openssl CLI)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = d / "ca.key", d / "ca.crt"
    key, csr, crt, ext = d / "server.key", d / "server.csr", d / "server.crt", d / "server.ext"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    if not ca_crt.exists():
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(ca_key),
            "-out", str(ca_crt), "-days", "2", "-subj", "/CN=iotplat test CA")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out",
        str(csr), "-subj", "/CN=localhost")
    sans = ",".join(["IP:127.0.0.1", "IP:::1"] + [f"DNS:{n}" for n in names])
    ext.write_text(f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   f"extendedKeyUsage={usages}\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial", "-out",
        str(crt), "-days", "2", "-extfile", str(ext))
    return {"ca": ca_crt, "cert": crt, "key": key}


def _chown_tree(path: Path, user: str) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for f in files:
            os.chown(os.path.join(root, f), pw.pw_uid, pw.pw_gid)


@dataclass
class Mosquitto:
    """A Mosquitto broker with a plain and a TLS listener on 127.0.0.1, users from ``users``."""

    dir: Path
    port: int
    tls_port: int
    users: dict[str, str]
    ca: dict[str, Path]
    conf: Path
    proc: subprocess.Popen | None = None
    extra: str = ""
    restarts: int = 0

    WORKER_ACL = ("topic read devices/#\ntopic read plugins/#\ntopic read $share/#\n"
                  "topic write iotplat/dead-letters\ntopic readwrite probe/#\n")

    @classmethod
    def start(cls, users: dict[str, str] | None = None, extra: str = "", acl: str | None = None,
              iterations: int = 1000, max_queued: int = 2_000_000, max_inflight: int = 1000) -> "Mosquitto":
        """``max_inflight`` is Mosquitto's per-client window of unacknowledged QoS 1 messages: render it equal
        to the worker's ``mqtt.inflight`` (0 = unlimited lets 2.0.11 fill the socket buffers with thousands
        of unacknowledged messages, all redelivered after a crash)."""
        d = Path(tempfile.mkdtemp(prefix="iotplat-mosq-"))
        users = dict(users or {})
        users.setdefault("device", "device-secret-pw")
        users.setdefault("observer", "observer-secret-pw")
        for i in (1, 2, 3):
            users.setdefault(f"worker-{i}", f"worker-{i}-secret-pw")
        (d / "data").mkdir()
        ca = make_ca(d / "tls")
        (d / "passwd").write_text("".join(f"{u}:{mosquitto_hash(p, iterations)}\n" for u, p in users.items()))
        os.chmod(d / "passwd", 0o600)
        if acl is None:
            acl = "pattern write devices/#\npattern write plugins/#\npattern readwrite probe/#\n\n"
            for u in users:
                if u.startswith("worker-"):
                    acl += f"user {u}\n{cls.WORKER_ACL}\n"
            acl += "user observer\ntopic read #\n"
        (d / "acl").write_text(acl)
        port, tls_port = free_port(), free_port()
        conf = d / "mosquitto.conf"
        conf.write_text(f"""# rendered by tests/support/servers.py
per_listener_settings false
allow_anonymous false
password_file {d}/passwd
acl_file {d}/acl
persistence true
persistence_location {d}/data/
autosave_interval 1
max_queued_messages {max_queued}
max_queued_bytes 0
max_inflight_messages {max_inflight}
max_packet_size 1048576
persistent_client_expiration 1d
log_dest file {d}/mosquitto.log
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
listener {port} 127.0.0.1
use_username_as_clientid true
listener {tls_port} 127.0.0.1
use_username_as_clientid true
cafile {ca['ca']}
certfile {ca['cert']}
keyfile {ca['key']}
tls_version tlsv1.2
{extra}
""")
        _chown_tree(d, "mosquitto")
        m = cls(d, port, tls_port, users, ca, conf, extra=extra)
        m.launch()
        return m

    def launch(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port, proc=self.proc, what="mosquitto")
        wait_port(self.tls_port, proc=self.proc, what="mosquitto")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        kill_group(self.proc, sig)

    def restart(self, downtime: float = 0.0) -> None:
        self.stop(signal.SIGTERM)
        time.sleep(downtime)
        self.launch()
        self.restarts += 1

    def log_text(self) -> str:
        try:
            return (self.dir / "mosquitto.log").read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Influx1:
    """InfluxDB 1.x (Debian's 1.6.7) with auth on: an admin, a write-only worker user, database ``iot``."""

    dir: Path
    port: int
    rpc_port: int
    proc: subprocess.Popen | None = None
    admin: tuple[str, str] = ("admin", "admin-secret-pw")
    worker: tuple[str, str] = ("iotplat-worker", "influx-worker-pw")
    database: str = "iot"
    rp: str = "iotplat"

    @classmethod
    def start(cls, auth: bool = True) -> "Influx1":
        d = Path(tempfile.mkdtemp(prefix="iotplat-influx-"))
        i = cls(d, free_port(), free_port())
        (d / "influxdb.conf").write_text(f"""reporting-disabled = true
bind-address = "127.0.0.1:{i.rpc_port}"
[meta]
  dir = "{d}/meta"
[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
  cache-max-memory-size = "256m"
[coordinator]
  write-timeout = "10s"
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{i.port}"
  auth-enabled = {str(auth).lower()}
  log-enabled = false
  max-body-size = 50000000
[logging]
  level = "warn"
[continuous_queries]
  enabled = false
""")
        i.launch()
        i.query(f"CREATE USER {i.admin[0]} WITH PASSWORD '{i.admin[1]}' WITH ALL PRIVILEGES", auth=False)
        i.query(f"CREATE DATABASE {i.database}")
        i.query(f"CREATE RETENTION POLICY {i.rp} ON {i.database} DURATION INF REPLICATION 1 DEFAULT")
        i.query(f"CREATE USER \"{i.worker[0]}\" WITH PASSWORD '{i.worker[1]}'")
        i.query(f"GRANT WRITE ON {i.database} TO \"{i.worker[0]}\"")
        return i

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        log = open(self.dir / "influxd.log", "ab")
        self.proc = subprocess.Popen([INFLUXD, "run", "-config", str(self.dir / "influxdb.conf")],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        wait_port(self.port, 30, proc=self.proc, what="influxd")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # /ping answers once the HTTP service is up
            try:
                urllib.request.urlopen(f"{self.url}/ping", timeout=2).read()
                return
            except OSError:
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        kill_group(self.proc, sig)

    def query(self, q: str, auth: bool = True, db: str | None = None) -> dict:
        params = {"q": q}
        if db:
            params["db"] = db
        data = urllib.parse.urlencode(params).encode()
        req = urllib.request.Request(f"{self.url}/query", data=data)
        if auth:
            cred = base64.b64encode(f"{self.admin[0]}:{self.admin[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {cred}")
        with urllib.request.urlopen(req, timeout=30) as r:
            out = json.loads(r.read())
        for res in out.get("results", []):
            if "error" in res:
                raise RuntimeError(f"influx query {q!r}: {res['error']}")
        return out

    def rows(self, q: str) -> list[list]:
        """All values of the first series of a query (InfluxQL against db ``iot``)."""
        out = self.query(q, db=self.database)
        series = out["results"][0].get("series", [])
        return [row for s in series for row in s["values"]]

    def series(self, q: str) -> list[dict]:
        out = self.query(q, db=self.database)
        return out["results"][0].get("series", [])

    def count(self, measurement: str, fld: str, where: str = "") -> int:
        rows = self.rows(f'SELECT count("{fld}") FROM "{self.rp}"."{measurement}" {where}')
        return int(rows[0][1]) if rows else 0

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Victoria:
    """VictoriaMetrics: accepts InfluxDB 2.x's ``/api/v2/write`` (bucket/org ignored). A stand-in for the
    2.x write path (no InfluxDB 2.x exists for this machine); data is read back with its export API."""

    dir: Path
    port: int
    proc: subprocess.Popen | None = None
    extra_args: list[str] = field(default_factory=list)

    @classmethod
    def start(cls) -> "Victoria":
        d = Path(tempfile.mkdtemp(prefix="iotplat-vm-"))
        v = cls(d, free_port())
        v.launch()
        return v

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        log = open(self.dir / "vm.log", "ab")
        self.proc = subprocess.Popen([VICTORIA, f"-storageDataPath={self.dir}/data",
                                      f"-httpListenAddr=127.0.0.1:{self.port}", "-retentionPeriod=100y",
                                      "-search.latencyOffset=0s", "-search.disableCache",
                                      "-influxTrimTimestamp=1ns", *self.extra_args],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()
        wait_port(self.port, 30, proc=self.proc, what="victoria-metrics")

    def export(self, match: str) -> list[dict]:
        q = urllib.parse.urlencode({"match[]": match})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{q}", timeout=30) as r:
            return [json.loads(line) for line in r.read().splitlines() if line.strip()]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        kill_group(self.proc, sig)

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)
