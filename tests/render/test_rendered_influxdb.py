"""The rendered InfluxDB 1.x configuration run by a real influxd 1.6.7, and every generated Grafana query.

Grafana itself cannot be installed on this machine, so its dashboards are checked the way Grafana would
use them: each panel's InfluxQL query, with Grafana's macros expanded ($timeFilter -> time > now() - 1h,
$__interval -> 1m), runs against the real InfluxDB as the read-only Grafana user and must return the test
data. The server uses the rendered config: HTTPS with the platform's server certificate, auth enabled.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from iotplat.commands import render
from iotplat.render.dashboards import panel_queries
from iotplat.secrets.materials import ensure_materials
from iotplat.secrets.state import State
from iotplat.spec.load import load_platform
from iotplat.verify.status import NamedHTTPS
from tests.helpers import EXAMPLES, free_port, use_private_state

pytestmark = pytest.mark.integration
INFLUXD = shutil.which("influxd") or "/usr/bin/influxd"


@pytest.fixture(scope="module")
def influx():
    if not Path(INFLUXD).exists():
        pytest.fail("influxd is not installed (apt-get install influxdb); .ci/run installs it")
    work = Path(tempfile.mkdtemp(prefix="iotplat-influx-"))
    restore_env = use_private_state(work)
    spec = EXAMPLES / "local" / "platform.yaml"
    render(str(spec), None, out_dir=str(work / "build"))
    platform = load_platform(spec)
    materials = ensure_materials(platform, State.open(work / "state", platform.name, platform.environment))
    conf = (work / "build/hosts/tsdb/etc/influxdb/influxdb.conf").read_text()
    port, rpc = free_port(), free_port()
    (work / "server.crt").write_text(materials.host_certs["tsdb"].cert_pem)
    (work / "server.key").write_text(materials.host_certs["tsdb"].key_pem)
    (work / "ca.crt").write_text(materials.ca_cert_pem)
    conf = (conf.replace("/var/lib/influxdb", str(work / "data"))
            .replace('bind-address = ":8086"', f'bind-address = "127.0.0.1:{port}"')
            .replace('bind-address = "127.0.0.1:8088"', f'bind-address = "127.0.0.1:{rpc}"')
            .replace("/etc/iotplat/tls/server.crt", str(work / "server.crt"))
            .replace("/run/credentials/influxdb.service/server.key", str(work / "server.key")))
    assert "auth-enabled = true" in conf and "https-enabled = true" in conf
    (work / "influxdb.conf").write_text(conf)
    log = open(work / "influxd.log", "wb")
    proc = subprocess.Popen([INFLUXD, "-config", str(work / "influxdb.conf")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ctx = ssl.create_default_context(cafile=str(work / "ca.crt"))
    env = {"port": port, "ctx": ctx, "platform": platform, "materials": materials, "work": work}
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if _req(env, "GET", "/ping")[0] == 204:
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("influxd did not start: " + (work / "influxd.log").read_text()[-2000:])
    yield env
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=15)
    log.close()
    shutil.rmtree(work, ignore_errors=True)
    restore_env()


def _req(env: dict, method: str, path: str, body: bytes | None = None, user: str | None = None,
         password: str | None = None) -> tuple[int, bytes]:
    conn = NamedHTTPS("127.0.0.1", env["port"], env["ctx"], env["platform"].service_name("influxdb"))
    headers = {}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _q(env: dict, q: str, user: str, password: str, db: str = "") -> tuple[int, dict]:
    params = urllib.parse.urlencode({"q": q, "db": db} if db else {"q": q})
    status, body = _req(env, "POST", "/query?" + params, user=user, password=password)
    return status, json.loads(body or b"{}")


def test_least_privilege_users_and_dashboard_queries(influx: dict) -> None:
    p, m = influx["platform"], influx["materials"]
    admin, apw = "iotplat-admin", m.secrets["influxdb_admin_password"]
    db, rp = p.influx_database, p.influx_retention_policy
    # what the influxdb role does at deploy time (first user may be created without auth)
    for q in (f"CREATE USER \"{admin}\" WITH PASSWORD '{apw}' WITH ALL PRIVILEGES",):
        assert _q(influx, q, admin, apw)[0] == 200
    stmts = [
        f'CREATE DATABASE "{db}" WITH DURATION 30d NAME "{rp}"',
        f"CREATE USER \"iotplat-worker\" WITH PASSWORD '{m.secrets['influxdb_worker_password']}'",
        f'GRANT WRITE ON "{db}" TO "iotplat-worker"',
        f"CREATE USER \"iotplat-grafana\" WITH PASSWORD '{m.secrets['influxdb_grafana_password']}'",
        f'GRANT READ ON "{db}" TO "iotplat-grafana"',
    ]
    for q in stmts:
        status, body = _q(influx, q, admin, apw)
        assert status == 200 and "error" not in json.dumps(body), (q, body)
    now = time.time_ns()
    lines = []
    for i in range(60):
        ts = now - i * 10_000_000_000
        lines.append(f"telemetry,device=sensor-{i % 3} temperature={20 + i % 5}.5,humidity=40.0 {ts}")
        if i % 10 == 0:
            lines.append(f'iotplat_dead_letters,reason=invalid_json,device=sensor-1,subscription=telemetry '
                         f'topic="devices/sensor-1/telemetry",excerpt="{{bad",detail="x",bytes=4i {ts}')
        for r in (1, 2):  # the worker replicas' own counters (cumulative; the real worker's: tests/worker)
            n = (60 - i) * 100 * r
            lines.append(f"iotplat_worker,host=edge,replica={r} received={n}i,written={n}i,dead_letters={60 - i}i,"
                         f"spool_bytes={i * 4096}i,lag_seconds=0.{i + 1:02d},uptime_seconds={600 - i * 10}.0 {ts}")
    body = "\n".join(lines).encode()
    wpw, gpw = m.secrets["influxdb_worker_password"], m.secrets["influxdb_grafana_password"]
    write = f"/write?db={db}&rp={rp}&precision=ns"
    assert _req(influx, "POST", write, body, "iotplat-worker", wpw)[0] == 204
    assert _req(influx, "POST", write, body, "iotplat-grafana", gpw)[0] == 403  # reader cannot write
    assert _req(influx, "POST", write, body)[0] == 401  # anonymous refused
    status, res = _q(influx, "SELECT * FROM telemetry", "iotplat-worker", wpw, db)
    assert status == 403 or "error" in json.dumps(res)  # writer cannot read
    queries = panel_queries(p)
    assert len(queries) >= 5
    for item in queries:
        q = item["query"].replace("$timeFilter", "time > now() - 1h").replace("$__interval", "1m")
        status, res = _q(influx, q, "iotplat-grafana", gpw, db)
        assert status == 200, (item, res)
        result = res["results"][0]
        assert "error" not in result, (item, result)
        assert result.get("series"), f"no data for {item['dashboard']} / {item['panel']}: {q}"
        values = [v for s in result["series"] for row in s["values"] for v in row[1:] if v not in (None, 0)]
        assert values, (item, result)


def _handshake(env: dict, version: ssl.TLSVersion, ciphers: str = "DEFAULT:@SECLEVEL=0") -> str | None:
    """The negotiated TLS version, or None when the server refused the handshake. The client offers exactly
    `version` (and, at security level 0, old versions and suites), so only the server can refuse."""
    import socket

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(env["work"] / "ca.crt"))
    ctx.set_ciphers(ciphers)
    ctx.minimum_version = ctx.maximum_version = version
    try:
        with socket.create_connection(("127.0.0.1", env["port"]), timeout=5) as s:
            with ctx.wrap_socket(s, server_hostname=env["platform"].service_name("influxdb")) as tls:
                return tls.version()
    except (ssl.SSLError, ConnectionResetError):
        return None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_min_version_reaches_influxdb(influx: dict) -> None:
    """tls.min_version (1.2 here) is [tls] min-version in the rendered config: influxd 1.6.7 refuses a TLS 1.1
    handshake (its default accepts TLS 1.0 and 1.1) and still negotiates TLS 1.2 and 1.3. A TLS 1.2 client that
    offers only CBC suites is refused too (the rendered cipher list is ECDHE with AEAD only). tls.min_version 1.3
    with InfluxDB 1 is refused by `validate` (golden case tls13_with_influxdb1): 1.6.7 knows no TLS1.3 there."""
    assert influx["platform"].spec.tls.min_version == "1.2"
    assert _handshake(influx, ssl.TLSVersion.TLSv1_1) is None
    assert _handshake(influx, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert _handshake(influx, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    assert _handshake(influx, ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA") is None


def test_debug_endpoints(influx: dict) -> None:
    """What InfluxDB 1.6.7 exposes without credentials, with the rendered config.

    - /debug/pprof (Go's profiler: heap, goroutines, the command line) is off: 404.
    - /debug/vars cannot be switched off or put behind authentication in 1.6.7 (no setting exists; 1.8 added
      some). It answers 200 without credentials with runtime statistics: database and shard names, request
      counters, the command line. This test pins that truth: no secret of the platform is in it, and the port
      is open only to the platform's internal network (the rendered ingress rules, which the hosts' firewall
      applies: tests/roles)."""
    assert _req(influx, "GET", "/debug/pprof/")[0] == 404
    assert _req(influx, "GET", "/debug/pprof/cmdline")[0] == 404
    status, body = _req(influx, "GET", "/debug/vars")
    assert status == 200, "InfluxDB 1.6.7 serves /debug/vars without authentication; if this changed, say so"
    stats = json.loads(body)
    assert "memstats" in stats and "cmdline" in stats
    for name, value in influx["materials"].secrets.items():
        assert value not in body.decode(), name
    assert _req(influx, "GET", "/query?q=SHOW+DATABASES")[0] == 401  # data needs credentials
    from iotplat.render.engine import Renderer

    p = influx["platform"]
    port = p.spec.influxdb.port
    rules = [r for r in Renderer(p, influx["materials"]).host_ingress(p.host_of("influxdb")) if r["port"] == port]
    assert rules and {r["source"] for r in rules} == {"internal"}
