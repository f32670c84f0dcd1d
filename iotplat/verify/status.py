"""Prove a deployed platform works: service health, certificates, and an end-to-end canary.

Every probe runs from the controller, the way devices and operators reach the platform; internal ports (InfluxDB's
API) are reached through an SSH tunnel to the host (iotplat.hosts.tunnel), never by opening them. The checks come
from the services (iotplat.services: each states its TLS ports, units, health endpoints and own checks):
- TLS on every service port: the chain verifies against the platform CA for the service's logical name,
  and the certificate's expiry is reported (a warning 30 days ahead);
- systemd units and health endpoints (each worker replica's /healthz), read on the host over SSH;
- InfluxDB answers a read-only query;
- each worker replica's own counters (``ingestion.health``), read from InfluxDB with the read-only user:
  the latest point summarised (received, written, dead letters, spool, lag), failing when it is older than
  3 health intervals (see ``worker_counters_checks``);
- the canary: device `iotplat-canary` publishes one message over MQTT/TLS with its own credential to its
  own topic; the point must be readable from InfluxDB (with Grafana's read-only user) within the timeout.
"""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.client
import json
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from iotplat.hosts import Host
from iotplat.secrets.materials import Materials
from iotplat.spec.platform_model import GRAFANA_INFLUX_USER, Platform, template_names

WARN_DAYS = 30
STALE_INTERVALS = 3  # a replica's counters older than this many health intervals fail its check
WORKER_SETTLE = 20.0  # seconds a worker replica that is not ok (e.g. reconnecting) gets before it counts as failing
DEAD_LETTER_WINDOW = 300.0  # seconds (at least 6 health intervals): dead letters growing in it fail the check


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""
    host: str = ""
    skipped: bool = False
    warning: bool = False  # ok, but worth a look (shown as "warn"; the exit code stays 0)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "ok": self.ok, "skipped": self.skipped, "warning": self.warning,
                "detail": self.detail}

    @property
    def mark(self) -> str:
        return "skip" if self.skipped else ("FAIL" if not self.ok else ("warn" if self.warning else "ok  "))


@dataclass
class StatusReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok or c.skipped for c in self.checks)

    def add(self, *args: Any, **kwargs: Any) -> Check:
        c = Check(*args, **kwargs)
        self.checks.append(c)
        return c


class NamedTLSContext(ssl.SSLContext):
    """A client context that verifies the server's certificate for one logical name (broker.<domain>) whatever
    address is dialled: clients such as paho pass the address they connect to as ``server_hostname``, which is
    not a name in the certificate; this context always sends and checks ``verify_name`` instead (SNI and
    hostname check), so a certificate for any other name is refused."""

    verify_name: str

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side=server_side, do_handshake_on_connect=do_handshake_on_connect,
                                   suppress_ragged_eofs=suppress_ragged_eofs, server_hostname=self.verify_name,
                                   session=session)


def named_tls_context(ca_file: str, name: str) -> NamedTLSContext:
    """Trust only the platform CA (ca_file) and verify the peer as `name`."""
    ctx = NamedTLSContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname, TLS 1.2 or newer
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=ca_file)
    ctx.verify_name = name
    return ctx


class TrustStore:
    """The platform CA as a file for TLS contexts while a command runs (removed by close())."""

    def __init__(self, ca_pem: str) -> None:
        self.tmp = tempfile.NamedTemporaryFile("w", suffix=".crt", delete=False)
        self.tmp.write(ca_pem)
        self.tmp.close()
        self.ca_file = self.tmp.name

    def context(self) -> ssl.SSLContext:
        """Trust the platform CA; the caller passes the logical name as server_hostname (see NamedHTTPS)."""
        return ssl.create_default_context(cafile=self.ca_file)

    def for_name(self, name: str) -> NamedTLSContext:
        """A context that verifies the certificate for the logical `name` while the client dials an address."""
        return named_tls_context(self.ca_file, name)

    def close(self) -> None:
        Path(self.ca_file).unlink(missing_ok=True)


class NamedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address, verifying the certificate for a logical name (SNI + hostname check)."""

    def __init__(self, address: str, port: int, ctx: ssl.SSLContext, name: str, timeout: float = 10) -> None:
        super().__init__(address, port, context=ctx, timeout=timeout)
        self._name = name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._name)


def tls_probe(address: str, port: int, name: str, ctx: ssl.SSLContext) -> tuple[bool, str, float | None]:
    try:
        with socket.create_connection((address, port), timeout=10) as s, ctx.wrap_socket(s, server_hostname=name) as t:
            cert = t.getpeercert()
            version = t.version()
    except (OSError, ssl.SSLError) as exc:
        return False, f"TLS to {address}:{port} as {name} failed: {exc}", None
    expires = dt.datetime.strptime(cert["notAfter"], "%b %d %H:%M:%S %Y %Z").replace(tzinfo=dt.timezone.utc)
    days = (expires - dt.datetime.now(dt.timezone.utc)).total_seconds() / 86400
    note = f"{version}, certificate for {name} valid {days:.0f} more days"
    if days < WARN_DAYS:
        note += (f" (WARNING: expires within {WARN_DAYS} days: renew it with `iotplat rotate certs`; "
                 "`iotplat up` also reissues such certificates)")
    return True, note, days


def _ssh_json(host: Host, script: str, timeout: float = 30) -> dict[str, Any]:
    proc = subprocess.run(host.remote_argv(["sudo", "python3", "-c", script]), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["ssh failed"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


_HOST_SCRIPT = r"""
import json, subprocess, urllib.error, urllib.request
units = %s
ports = %s
out = {"units": {}, "health": {}}
for u in units:
    r = subprocess.run(["systemctl", "is-active", u], capture_output=True, text=True)
    out["units"][u] = r.stdout.strip() or r.stderr.strip()
for label, port in ports.items():
    try:
        out["health"][label] = json.loads(urllib.request.urlopen("http://127.0.0.1:%%d/healthz" %% port, timeout=5).read())
    except urllib.error.HTTPError as e:
        out["health"][label] = json.loads(e.read() or b"{}")
    except Exception as e:
        out["health"][label] = {"status": "unreachable", "error": str(e)}
print(json.dumps(out))
"""


def canary_payload(platform: Platform, ts_ms: int) -> tuple[str, bytes] | None:
    """(topic, payload) for the canary on the first subscription, or None for plugin formats."""
    canary = platform.canary
    attrs = {"device": canary.id, **dict(canary.attributes)}
    for sub in platform.spec.ingestion.subscriptions:
        for tmpl in platform.spec.devices.topics:
            names = template_names(tmpl)
            topic = tmpl.format(**{n: attrs.get(n, "canary") for n in names})
            from iotplat.spec.platform_model import filter_covers, template_filter

            if not filter_covers(template_filter(sub.topic), topic):
                continue
            if sub.format == "json":
                body: dict[str, Any] = {}
                for fname, f in sub.fields.items():
                    value: Any = {"float": 1.5, "int": 1, "bool": True, "string": "canary"}[f.type]
                    _set_path(body, (f.path or fname).split("."), value)
                if sub.timestamp:
                    _set_path(body, sub.timestamp.field.split("."), _ts(ts_ms, sub.timestamp.unit))
                return topic, json.dumps(body).encode()
            if sub.format == "line":
                return topic, f"{sub.measurement} canary=1.5 {ts_ms * 1_000_000}".encode()
            if sub.format == "raw":
                return topic, b"1.5"
            return None
    return None


def _ts(ts_ms: int, unit: str) -> Any:
    if unit == "rfc3339":
        return dt.datetime.fromtimestamp(ts_ms / 1000, dt.timezone.utc).isoformat(timespec="milliseconds")
    return {"s": ts_ms // 1000, "ms": ts_ms, "us": ts_ms * 1000, "ns": ts_ms * 1_000_000}[unit]


def _set_path(body: dict[str, Any], parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        body = body.setdefault(p, {})
    body[parts[-1]] = value


def influx_query(platform: Platform, address: str, ctx: ssl.SSLContext, user: str, password: str, q: str,
                 method: str = "GET", port: int | None = None) -> dict:
    """One InfluxQL statement over HTTPS to address:port (default: the spec's port; a tunnel's local port when
    reached through SSH), the certificate verified for influxdb.<domain>."""
    ix = platform.spec.influxdb
    conn = NamedHTTPS(address, port or ix.port, ctx, platform.service_name("influxdb"))
    try:
        params = {"db": platform.influx_database if ix.version == 1 else platform.influx_bucket, "q": q, "epoch": "ms"}
        headers = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        conn.request(method, "/query?" + urllib.parse.urlencode(params), headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"InfluxDB answered {resp.status}: {body[:200]!r}")
        return json.loads(body)
    finally:
        conn.close()


def run_canary(platform: Platform, materials: Materials, addr: dict[str, str], ctx_factory: TrustStore,
               timeout: float = 20, influx_at: tuple[str, int] | None = None) -> Check:
    """Publish as the canary device to the broker (its public address), then read the point back from InfluxDB
    (`influx_at`: where its API is reachable from here, e.g. a tunnel; default its host's address and port)."""
    import paho.mqtt.client as mqtt

    ts_ms = int(time.time() * 1000)
    made = canary_payload(platform, ts_ms)
    if made is None:
        return Check("canary", True, "skipped: the first subscription's format is a plugin", skipped=True)
    topic, payload = made
    broker = platform.host_of("broker")
    listener = next((lst for lst in platform.spec.broker.listeners if lst.protocol == "mqtt"), None)
    if listener is None:
        return Check("canary", True, "skipped: no MQTT (non-WebSocket) listener", skipped=True)
    if platform.spec.broker.engine == "nats":  # every node takes devices: the first that accepts, as a device would
        from iotplat.hosts.sysutil import tcp_open

        broker = next((h for h in platform.placement["broker"] if h in addr and tcp_open(addr[h], listener.port)),
                      broker)
    password = materials.mqtt_users[platform.canary.id][0]
    # nats-server's MQTT layer speaks 3.1.1 only (broker.engine: nats)
    protocol = mqtt.MQTTv311 if platform.spec.broker.engine == "nats" else mqtt.MQTTv5
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=platform.canary.id, protocol=protocol)
    # the address is dialled, the certificate is verified for the broker's logical name
    client.tls_set_context(ctx_factory.for_name(platform.service_name("broker")))
    client.username_pw_set(platform.canary.id, password)
    started = time.monotonic()
    try:
        client.connect(addr[broker], listener.port, keepalive=30)
        client.loop_start()
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=10)
        if not info.is_published():
            return Check("canary", False, f"publish to {topic} was not acknowledged within 10s", host=broker)
    except (OSError, ValueError, RuntimeError) as exc:
        return Check("canary", False, f"cannot publish as {platform.canary.id}: {exc}", host=broker)
    finally:
        client.loop_stop()
        client.disconnect()
    sub = platform.spec.ingestion.subscriptions[0]
    influx, influx_port = influx_at or (addr[platform.host_of("influxdb")], platform.spec.influxdb.port)
    reader_pw = materials.secrets["influxdb_grafana_password"]
    where = f"time = {ts_ms}ms" if sub.timestamp else f"time > {ts_ms - 5000}ms"
    q = f'SELECT * FROM "{sub.measurement}" WHERE "device" = \'{platform.canary.id}\' AND {where}'
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            res = influx_query(platform, influx, ctx_factory.context(), GRAFANA_INFLUX_USER, reader_pw, q,
                               port=influx_port)
            series = res.get("results", [{}])[0].get("series")
            if series:
                return Check("canary", True, f"published to {topic}; stored and readable after "
                                             f"{time.monotonic() - started:.1f}s", host=broker)
        except (OSError, RuntimeError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.5)
    return Check("canary", False, f"published to {topic} but the point was not in InfluxDB after {timeout:.0f}s"
                                  + (f" ({last})" if last else ""), host=broker)


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    unit = "KiB"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            break
    return f"{n:.1f} {unit}"


def worker_counters_checks(query: Callable[[str], dict], measurement: str, interval: float,
                           replicas: dict[int, str], now_ms: int | None = None, settle: float = 0.0) -> list[Check]:
    """One check per worker replica from its health points (docs/worker.md#platform-health).

    ``query`` runs one read-only InfluxQL statement on the data's database (epoch=ms) and returns InfluxDB's
    JSON; ``replicas`` maps each replica number to the host it is placed on. A replica fails when its latest
    point is older than ``STALE_INTERVALS`` x ``interval`` (not running, or cannot write to InfluxDB), or when
    its dead-letter counter grew within the last ``max(DEAD_LETTER_WINDOW, 6 x interval)`` seconds it is ok
    with a warning (a drop
    of the counter is a restart: counting starts again from 0). Clocks of the worker hosts and of the
    controller are assumed to agree to within a few seconds.

    ``settle`` > 0: when a replica has no recent point (e.g. just after a deploy or a restore), look once
    more after that many seconds before reporting it."""
    checks, late = _counters_once(query, measurement, interval, replicas, now_ms)
    if late and settle > 0:
        time.sleep(settle)
        checks, _ = _counters_once(query, measurement, interval, replicas, None)
    return checks


def _counters_once(query: Callable[[str], dict], measurement: str, interval: float, replicas: dict[int, str],
                   now_ms: int | None) -> tuple[list[Check], bool]:
    """(the checks, whether a replica had no recent point)."""
    window = max(DEAD_LETTER_WINDOW, 6 * interval)
    stale_ms = STALE_INTERVALS * interval * 1000
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cols = ("received", "written", "dead_letters", "spool_bytes", "lag_seconds")
    fields = ", ".join('"' + c + '"' for c in cols)
    # the spec's MEASUREMENT_RE admits no quote or backslash: the name needs no escaping
    q = f'SELECT {fields} FROM "{measurement}" WHERE time > now() - {int(window)}s GROUP BY "replica", "host"'
    try:
        res = query(q)
        result = (res.get("results") or [{}])[0]
        if "error" in result:
            raise RuntimeError(result["error"])
    except (OSError, RuntimeError, ValueError) as exc:
        return [Check("worker counters", False, f"cannot read {measurement} from InfluxDB: {exc}"[:300])], False
    points: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
    for series in result.get("series") or []:
        tags = series.get("tags") or {}
        idx = {c: series["columns"].index(c) for c in ("time", *cols) if c in series["columns"]}
        for row in series["values"]:
            values = {c: row[i] for c, i in idx.items()}
            points.setdefault(tags.get("replica", ""), []).append((int(row[idx["time"]]), tags.get("host", ""), values))
    checks, late = [], False
    for number, placed_on in sorted(replicas.items()):
        rows = sorted(points.get(str(number), []), key=lambda p: p[0])
        name_ = f"worker {number} counters"
        if not rows:
            checks.append(Check(name_, False, f"no {measurement} point in the last {window:.0f}s: the replica is not "
                                              "running or cannot write to InfluxDB", host=placed_on))
            late = True
            continue
        grew, prev = 0, None
        for _t, _h, v in rows:
            cur = int(v.get("dead_letters") or 0)
            if prev is not None:
                grew += cur - prev if cur >= prev else cur  # a drop is a restart: counting starts from 0
            prev = cur
        t_last, host, last = rows[-1]
        age = max(0.0, (now_ms - t_last) / 1000)
        detail = (f"received {int(last.get('received') or 0)}, written {int(last.get('written') or 0)}, "
                  f"dead letters {int(last.get('dead_letters') or 0)} (+{grew} in {window:.0f}s), "
                  f"spool {_size(float(last.get('spool_bytes') or 0))}, lag {float(last.get('lag_seconds') or 0):.1f}s; "
                  f"last point {age:.0f}s ago from {host or '?'}")
        problems = []
        if now_ms - t_last > stale_ms:
            problems.append(f"stale: older than {STALE_INTERVALS} x {interval:g}s")
            late = True
        # Dead letters are device data the worker had to refuse (kept for inspection): worth a warning, not a
        # failure of the platform (a misbehaving device must not fail `up`'s verification or stop an upgrade).
        note = ["dead letters grew (see the platform-health dashboard)"] if grew > 0 else []
        checks.append(Check(name_, not problems, "; ".join(problems + note + [detail]), host=placed_on,
                            warning=bool(note)))
    return checks, late


@dataclass
class Probe:
    """What the checks of one `status` run share: the platform, its hosts, the CA, what the last deploy recorded,
    and local endpoints (SSH tunnels) for the services' internal ports."""

    platform: Platform
    materials: Materials
    hosts: dict[str, Host]
    trust: TrustStore
    grafana_deployed: bool = False
    grafana_reason: str = ""
    endpoints: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)  # (service, port) -> here

    def influx_at(self) -> tuple[str, int] | None:
        return self.endpoints.get(("influxdb", self.platform.spec.influxdb.port))

    def query(self, q: str) -> dict:
        """One read-only InfluxQL statement as Grafana's user, through the tunnel to InfluxDB."""
        at = self.influx_at()
        if at is None:
            raise RuntimeError("InfluxDB is not reachable through SSH")
        return influx_query(self.platform, at[0], self.trust.context(), GRAFANA_INFLUX_USER,
                            self.materials.secrets["influxdb_grafana_password"], q, port=at[1])


def status(platform: Platform, materials: Materials, hosts: list[Host], grafana_deployed: bool,
           canary: bool = True, grafana_reason: str = "") -> StatusReport:
    """Every placed service's checks (iotplat.services): TLS on its ports (internal ones through an SSH tunnel),
    its units and health endpoints on each host, the checks only it knows; then the platform's canary."""
    from iotplat.hosts import HostProviderError
    from iotplat.hosts.tunnel import forward
    from iotplat.services import placed

    report = StatusReport()
    probe = Probe(platform, materials, {h.name: h for h in hosts}, TrustStore(materials.ca_cert_pem),
                  grafana_deployed, grafana_reason)
    try:
        with contextlib.ExitStack() as tunnels:
            for svc in placed(platform):
                if svc.skipped(probe):
                    continue
                for port in svc.tls_ports(platform):
                    if not port.internal:
                        continue
                    host = platform.host_of(svc.name)
                    try:
                        probe.endpoints[(svc.name, port.port)] = tunnels.enter_context(forward(probe.hosts[host],
                                                                                                port.port))
                    except HostProviderError as exc:
                        report.add("ssh tunnel", False, f"cannot reach {svc.name} :{port.port} on {host} through "
                                   f"SSH: {exc}", host=host)
            _checks(probe, report, canary)
    finally:
        probe.trust.close()
    return report


def _checks(probe: Probe, report: StatusReport, canary: bool) -> None:
    from iotplat.services import placed

    p = probe.platform
    addr = {name: h.address for name, h in probe.hosts.items()}
    services = placed(p)
    skipped = {svc.name: svc.skipped(probe) for svc in services}
    for svc in services:  # TLS on every service port: the chain for its logical name, the expiry
        host = p.host_of(svc.name)
        if skipped[svc.name]:
            report.add(svc.name, True, skipped[svc.name], host=host, skipped=True)
            continue
        for port in svc.tls_ports(p):
            at = probe.endpoints.get((svc.name, port.port)) if port.internal else (addr[host], port.port)
            if at is None:
                continue  # its tunnel failed: reported already
            ok, note, _ = tls_probe(*at, port.name, probe.trust.context())
            report.add(port.label, ok, note + " (via SSH)" if ok and port.internal else note, host=host)
    if probe.materials.ca_rotation_started:
        report.add("CA rotation", True, f"overlap since {probe.materials.ca_rotation_started}: hosts and device kits "
                   "trust the current and the next CA; after every device has its new kit, run "
                   "`iotplat rotate certs --ca --finish`", host=p.host_of("broker"))
    for host in p.host_names:  # units and health endpoints on each host
        live = [svc for svc in services if not skipped[svc.name] and host in p.placement[svc.name]]
        units = [u for svc in live for u in svc.units(p, host)]
        ports = {label: port for svc in live for label, port in svc.health(p, host).items()}
        script = _HOST_SCRIPT % (json.dumps(units), json.dumps(ports))
        try:
            data = _ssh_json(probe.hosts[host], script)
            # an endpoint that is not ok yet (a worker reconnecting after a broker restart) gets a few seconds
            deadline = time.monotonic() + WORKER_SETTLE
            while (time.monotonic() < deadline
                   and any(h.get("status") != "ok" for h in data["health"].values())):
                time.sleep(2)
                data = _ssh_json(probe.hosts[host], script)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
            report.add("ssh", False, f"cannot read service state: {exc}", host=host)
            continue
        for unit, state in data["units"].items():
            report.add(f"unit {unit}", state == "active", state, host=host)
        for label, health in data["health"].items():
            ok = health.get("status") == "ok"
            detail = ", ".join(f"{k}={v}" for k, v in sorted(health.items()) if k != "status" and not isinstance(v, dict))
            report.add(f"{label} /healthz", ok, f"{health.get('status')}: {detail}"[:300], host=host)
    for svc in services:  # what only each service knows how to check
        if not skipped[svc.name]:
            report.checks += svc.checks(probe)
    if canary:
        report.checks.append(run_canary(p, probe.materials, addr, probe.trust, influx_at=probe.influx_at()))
