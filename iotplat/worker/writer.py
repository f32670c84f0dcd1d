"""Write line protocol to InfluxDB 1.x (``/write``) or 2.x (``/api/v2/write``) over plain HTTP.

Both versions use the same small stdlib HTTP client (``http.client``, one kept-alive connection per
writer thread). Why not influxdb-client's write API for 2.x: its batching mode buffers in memory and
gives up after ``max_retry_time`` (180 s by default), and its synchronous mode adds a urllib3 + model
layer per request while we need exactly three things from the response — the status, ``Retry-After``
and the error text — to drive our own spool, backoff and bisection. The request we send is the one
influxdb-client sends (``POST /api/v2/write?org=&bucket=&precision=ns``, ``Authorization: Token``,
``text/plain; charset=utf-8``); tests/worker checks that against the client itself.

Errors: ``Transient`` (retry later: connection errors, timeouts, 5xx, 429, auth/404 deploy drift)
carries ``retry_after`` when the server sent one. ``write_lines`` isolates bad lines itself (400/422:
bisect) and returns them with the server's message; 413 splits the batch without blaming any line.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from .config import InfluxConfig


class Transient(Exception):
    def __init__(self, message: str, status: int = 0, retry_after: float | None = None,
                 auth: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.auth = auth


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class WriteOutcome:
    written: int
    rejected: list[tuple[bytes, str]]
    requests: int


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        dt = parsedate_to_datetime(value)
        return max(0.0, dt.timestamp() - (now if now is not None else time.time()))
    except (TypeError, ValueError, IndexError):
        return None


class InfluxWriter:
    """Not thread-safe: each writing thread makes its own (``clone()``)."""

    def __init__(self, cfg: InfluxConfig) -> None:
        self.cfg = cfg
        u = urllib.parse.urlsplit(cfg.url)
        self.https = u.scheme == "https"
        self.host = u.hostname or "localhost"
        self.port = u.port or (443 if self.https else 80)
        base = u.path.rstrip("/")
        if cfg.version == 1:
            q = {"db": cfg.database, "precision": "ns"}
            if cfg.retention_policy:
                q["rp"] = cfg.retention_policy
            self.path = f"{base}/write?{urllib.parse.urlencode(q)}"
            self.headers = {"Content-Type": "text/plain; charset=utf-8"}
            if cfg.username:
                cred = f"{cfg.username}:{cfg.password or ''}".encode()
                self.headers["Authorization"] = "Basic " + base64.b64encode(cred).decode()
        else:
            q = {"org": cfg.org, "bucket": cfg.bucket, "precision": "ns"}
            self.path = f"{base}/api/v2/write?{urllib.parse.urlencode(q)}"
            self.headers = {"Content-Type": "text/plain; charset=utf-8", "Accept": "application/json",
                            "Authorization": f"Token {cfg.token or ''}"}
        self._ctx: ssl.SSLContext | None = None
        if self.https:
            self._ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
        self._conn: http.client.HTTPConnection | None = None

    def clone(self) -> "InfluxWriter":
        return InfluxWriter(self.cfg)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.https:
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.cfg.timeout,
                                                         context=self._ctx)
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.cfg.timeout)
        return self._conn

    def post(self, body: bytes) -> None:
        """One request. Returns on 2xx; raises Transient or _BadRequest."""
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request("POST", self.path, body=body, headers=self.headers)
                resp = conn.getresponse()
                status = resp.status
                text = resp.read()[:4096]
                retry_after = parse_retry_after(resp.getheader("Retry-After"))
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.close()
                if attempt == 0:
                    continue  # a kept-alive connection the server closed: retry once on a new one
                raise Transient(f"connection lost: {type(e).__name__}") from None
            except (OSError, http.client.HTTPException, ssl.SSLError) as e:
                self.close()
                kind = "timeout" if isinstance(e, (socket.timeout, TimeoutError)) else type(e).__name__
                raise Transient(f"{kind}: {e}"[:200]) from None
            if resp.will_close:
                self.close()
            if 200 <= status < 300:
                return
            msg = text.decode("utf-8", "replace").strip().replace("\n", " ")[:300]
            if status in (400, 422):
                raise _BadRequest(status, msg)
            if status == 413:
                raise _BadRequest(413, msg or "request entity too large")
            auth = status in (401, 403, 404)
            raise Transient(f"HTTP {status}: {msg}", status=status, retry_after=retry_after, auth=auth)
        raise Transient("connection lost")  # pragma: no cover

    def write_lines(self, lines: list[bytes], body: bytes | None = None) -> WriteOutcome:
        """Write a batch; on 400/422 bisect it so only the bad lines are returned as rejected.

        Raises Transient (nothing about the batch is known to be rejected; retry it all later)."""
        if not lines:
            return WriteOutcome(0, [], 0)
        out = WriteOutcome(0, [], 0)
        self._write(lines, body, out)
        return out

    def _write(self, lines: list[bytes], body: bytes | None, out: WriteOutcome) -> None:
        out.requests += 1
        try:
            self.post(body if body is not None else b"\n".join(lines))
            out.written += len(lines)
            return
        except _BadRequest as e:
            if len(lines) == 1:
                if e.status == 413:
                    out.rejected.append((lines[0], "line too large for InfluxDB (413)"))
                else:
                    out.rejected.append((lines[0], f"HTTP {e.status}: {e}"))
                return
        mid = len(lines) // 2
        self._write(lines[:mid], None, out)
        self._write(lines[mid:], None, out)
