"""An HTTP fault proxy in front of a real InfluxDB: answers the first requests with a scripted failure
(e.g. 503 + Retry-After), forwards the rest, and records when each request arrived and what it got."""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultProxy:
    def __init__(self, upstream_port: int, failures: list[tuple[int, dict[str, str]]]) -> None:
        self.upstream_port = upstream_port
        self.failures = list(failures)
        self.log: list[tuple[float, int]] = []  # (arrival time, status returned)
        self.lock = threading.Lock()
        proxy = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                now = time.monotonic()
                with proxy.lock:
                    fail = proxy.failures.pop(0) if proxy.failures else None
                if fail is not None:
                    status, headers = fail
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                    conn.request("POST", self.path, body=body, headers={k: v for k, v in self.headers.items()
                                                                        if k.lower() != "host"})
                    resp = conn.getresponse()
                    data = resp.read()
                    status = resp.status
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    conn.close()
                with proxy.lock:
                    proxy.log.append((now, status))

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
