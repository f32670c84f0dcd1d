"""What `status`'s SSH script (iotplat/verify/nats_cluster.py ``_SCRIPT``) collects from one node's monitoring
port, read here on loopback from real nats-server nodes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def monitor_answers(http_port: int, paths: tuple[str, ...]) -> dict | str:
    """{path: JSON}; a /healthz that answers 503 is kept as its JSON body (an answer, as in ``_SCRIPT``); a
    string saying why when the node cannot be read."""
    out: dict = {}
    for path in paths:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=5) as r:
                out[path] = json.loads(r.read())
        except urllib.error.HTTPError as e:
            if not path.startswith("/healthz"):
                return f"HTTP {e.code} on {path}"
            out[path] = json.loads(e.read() or b"{}")
        except OSError as e:
            return f"{type(e).__name__}: {e}"
    return out
