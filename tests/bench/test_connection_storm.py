"""bench/connection_storm.py's core with a tiny fleet, so the benchmark cannot rot.

Runs the real thing at 50 devices on Mosquitto only: Debian's Mosquitto 2.0.11 with the mosquitto.conf and ACL
iotplat renders (paths rewritten), one generated credential per device, two client processes, a SIGTERM restart
and the reconnect. It proves the benchmark still renders, starts, connects, restarts, measures and cleans up;
it says nothing about speed (that is the benchmark's output, never a test's assertion).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "connection_storm.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("connection_storm", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (no init reaps here) holds no port and counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_storm_core_on_rendered_mosquitto(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    started: list[int] = []
    launch = bench.RenderedMosquitto.launch

    def recording(self) -> None:  # noqa: ANN001 - records the broker pids to check the cleanup
        launch(self)
        started.append(self.proc.pid)

    monkeypatch.setattr(bench.RenderedMosquitto, "launch", recording)
    r = bench.storm("mosquitto", 50, 2, 30.0, None)
    assert "error" not in r, r
    assert r["connected_before"] == 50 and r["expected"] == r["reconnected"] == 50 and r["kept"] == 0, r
    # every device made at least one attempt after the restart, and the figure is the slowest device's
    assert r["attempts"] >= 50
    assert 0 < r["p50"] <= r["p99"] <= r["secs"] < 30
    assert r["broker_rss_mb"] > 0 and r["broker_cpu_s"] >= 0
    assert "reconnected+acked in" in bench.report(r)
    assert len(started) == 2, "one launch, one restart"
    assert not any(_alive(pid) for pid in started), "the broker must be killed at the end"


def test_rendered_mosquitto_conf_is_iotplats(tmp_path: Path) -> None:
    """Only deployment locations differ from what iotplat renders: TLS, auth, ACL, persistence stay."""
    bench = _bench()
    m = bench.RenderedMosquitto(3, None)
    try:
        conf = (m.dir / "mosquitto.conf").read_text()
        for line in ("allow_anonymous false", "persistence true", "per_listener_settings false",
                     "tls_version tlsv1.2", "use_username_as_clientid true", f"listener {m.port} 127.0.0.1"):
            assert line in conf.splitlines(), line
        assert m.iterations == 1, "generated secrets get the minimal PBKDF2 cost"
        passwd = (m.dir / "passwd").read_text().splitlines()
        assert len(passwd) == 3 and all(line.split(":", 1)[1].startswith("$7$1$") for line in passwd)
        assert len(set(m.passwords.values())) == 3, "each device its own credential"
        assert "pattern write devices/%u/telemetry" in (m.dir / "acl").read_text()
    finally:
        m.close()
    assert not m.dir.exists()
