"""The InfluxDB writers: v1 against a real InfluxDB 1.6.7 (auth on), 400 bisection, Retry-After, and the
v2 request checked against what influxdb-client itself sends."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from iotplat.worker.config import InfluxConfig
from iotplat.worker.core import Backoff
from iotplat.worker.writer import InfluxWriter, Transient, parse_retry_after


def v1(influx, password=None) -> InfluxConfig:
    return InfluxConfig(1, influx.url, "", 5.0, influx.database, influx.rp, influx.worker[0],
                        password if password is not None else influx.worker[1], "", "", None)


@pytest.mark.integration
def test_v1_write_and_bisect_isolates_bad_lines(influx):
    w = InfluxWriter(v1(influx))
    out = w.write_lines([b"m,d=a v=1i 1", b"m,d=a v=2i 2"])
    assert out.written == 2 and not out.rejected
    # v is an integer field now: a float for it is a field type conflict (HTTP 400, partial write)
    lines = [b"m,d=b v=%di %d" % (i, i) for i in range(3, 40)]
    lines[17] = b"m,d=b v=1.5 20"
    lines[30] = b"m,d=b v=2.5 33"
    out = w.write_lines(lines)
    assert [l for l, _ in out.rejected] == [lines[17], lines[30]]
    assert all("HTTP 400" in msg and "conflict" in msg for _, msg in out.rejected)
    assert out.written == len(lines) - 2
    assert out.requests <= 1 + 2 * 2 * 6  # bisection: <= 1 + 2k*ceil(log2 n) for k bad lines, not n
    assert influx.count("m", "v") == 2 + 35


@pytest.mark.integration
def test_v1_bad_password_is_transient_auth_error(influx):
    w = InfluxWriter(v1(influx, password="wrong"))
    with pytest.raises(Transient) as ei:
        w.write_lines([b"m v=1i 1"])
    assert ei.value.auth and ei.value.status == 401


def test_connection_refused_is_transient():
    from support.servers import free_port

    cfg = InfluxConfig(1, f"http://127.0.0.1:{free_port()}", "", 2.0, "db", "", "", None, "", "", None)
    with pytest.raises(Transient):
        InfluxWriter(cfg).write_lines([b"m v=1 1"])


class _Fault(BaseHTTPRequestHandler):
    script: list = []
    seen: list = []

    def do_POST(self):  # noqa: N802
        n = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(n)
        type(self).seen.append((time.monotonic(), self.path, dict(self.headers), body))
        status, headers = type(self).script.pop(0) if type(self).script else (204, {})
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def fault_server():
    _Fault.script, _Fault.seen = [], []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Fault)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_reported_and_honoured_by_backoff(fault_server, status):
    _Fault.script = [(status, {"Retry-After": "2"})]
    cfg = InfluxConfig(1, f"http://127.0.0.1:{fault_server.server_port}", "", 2.0, "db", "", "", None, "", "",
                       None)
    with pytest.raises(Transient) as ei:
        InfluxWriter(cfg).write_lines([b"m v=1 1"])
    assert ei.value.status == status and ei.value.retry_after == 2.0
    b = Backoff(0.5, 5.0)
    assert all(b.next(ei.value.retry_after) >= 2.0 for _ in range(20))
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def test_v2_request_matches_influxdb_client(fault_server):
    """Our plain-HTTP v2 write sends what influxdb-client's own write API sends (path, query, auth, type)."""
    from influxdb_client import InfluxDBClient
    from influxdb_client.client.write_api import SYNCHRONOUS

    url = f"http://127.0.0.1:{fault_server.server_port}"
    with InfluxDBClient(url=url, token="tok-123", org="acme") as client:
        client.write_api(write_options=SYNCHRONOUS).write(bucket="iot", record=b"m v=1 1", write_precision="ns")
    cfg = InfluxConfig(2, url, "", 2.0, "", "", "", None, "acme", "iot", "tok-123")
    InfluxWriter(cfg).write_lines([b"m v=1 1"])
    (_, p1, h1, b1), (_, p2, h2, b2) = _Fault.seen
    from urllib.parse import parse_qs, urlsplit
    u1, u2 = urlsplit(p1), urlsplit(p2)
    assert u1.path == u2.path == "/api/v2/write"
    assert parse_qs(u1.query) == parse_qs(u2.query) == {"org": ["acme"], "bucket": ["iot"], "precision": ["ns"]}
    assert h1["Authorization"] == h2["Authorization"] == "Token tok-123"
    assert h1["Content-Type"].split(";")[0] == h2["Content-Type"].split(";")[0] == "text/plain"
    assert b1 == b2 == b"m v=1 1"
