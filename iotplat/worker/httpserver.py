"""/healthz and /metrics on a stdlib HTTP server in a daemon thread."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import Worker


def serve(worker: "Worker", host: str, port: int) -> ThreadingHTTPServer:
    class H(BaseHTTPRequestHandler):
        server_version = "iotplat-worker"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                ok, state = worker.health()
                self._send(200 if ok else 503, "application/json", json.dumps(state) + "\n")
            elif path == "/metrics":
                self._send(200, "text/plain; version=0.0.4", render_metrics(worker))
            else:
                self._send(404, "text/plain", "not found: try /healthz or /metrics\n")

        def _send(self, code: int, ctype: str, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: object) -> None:  # silence per-request logs
            pass

    srv = ThreadingHTTPServer((host, port), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, name="iotplat-http", daemon=True).start()
    return srv


def render_metrics(worker: "Worker") -> str:
    w = worker
    gauges = {
        "spool_bytes": (w.spool.bytes, "bytes in the on-disk spool"),
        "spool_records": (w.spool.pending_records, "batches waiting in the spool"),
        "spool_full": (1 if w.spool_full else 0, "1 while the spool is full and acks are paused"),
        "inflight_messages": (w.inflight, "messages received and not yet acknowledged"),
        "lag_seconds": (round(w.lag(), 6), "age of the oldest unacknowledged message"),
        "mqtt_connected": (1 if w.connected else 0, "1 while connected to the broker"),
        "influxdb_up": (1 if w.influx_ok else 0, "0 while InfluxDB writes fail"),
    }
    return w.metrics.render(gauges)
