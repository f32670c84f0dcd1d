"""The worker's [nats] config section (one-line errors, exit 2) and its offline install: the wheelhouse carries
nats-py, and a bare venv installed from it with --no-index runs the worker's NATS transport."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from iotplat.worker.config import ConfigError, load_config

BASE = """version = 1
[nats]
servers = ["127.0.0.1:4222", "nats-2.iotplat.internal:4222", "[::1]:4222"]
tls = false
username = "iotplat-worker-{replica}"
password_file = "pw"
inflight = 500
max_ack_pending = 1000
[influxdb]
url = "http://127.0.0.1:8086"
database = "iot"
[spool]
dir = "/tmp/spool-{replica}"
[[subscriptions]]
name = "t"
topic = "devices/{device}/telemetry"
measurement = "telemetry"
"""


def _write(tmp: Path, text: str) -> Path:
    (tmp / "pw").write_text("secret-0123456789\n")
    p = tmp / "worker.toml"
    p.write_text(text)
    return p


def test_nats_section_loads(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE), replica=2)
    assert cfg.nats is not None and cfg.nats.username == "iotplat-worker-2" and cfg.nats.password == "secret-0123456789"
    assert cfg.nats.servers == ("127.0.0.1:4222", "nats-2.iotplat.internal:4222", "[::1]:4222")
    assert cfg.inflight == 500 and cfg.client_id == "iotplat-worker-2" and cfg.nats.inbox_prefix == "_INBOX.iotplat-worker-2"
    assert cfg.nats.stream == "$MQTT_msgs" and cfg.nats.subject_prefix == "$MQTT.msgs." and cfg.nats.stream_discard == "new"
    assert cfg.subscription_filter(cfg.subscriptions[0]) == "devices/+/telemetry"
    assert "secret" not in repr(cfg.nats)


@pytest.mark.parametrize("old, new, key, message", [
    ('servers = ["127.0.0.1:4222", "nats-2.iotplat.internal:4222", "[::1]:4222"]', "servers = []", "nats.servers",
     "at least one"),
    ('"127.0.0.1:4222", "nats', '"127.0.0.1", "nats', "nats.servers[0]", "host:port"),
    ('"127.0.0.1:4222", "nats', '"a b:1", "nats', "nats.servers[0]", "host:port"),
    ("servers = [", "servers = [1, ", "nats.servers[0]", "must be a string"),
    ('username = "iotplat-worker-{replica}"', 'username = "a.b"', "nats.client_id", "letters, digits"),
    ("max_ack_pending = 1000", "max_ack_pending = 10", "nats.max_ack_pending", "between 500"),
    ("inflight = 500", "inflight = 0", "nats.inflight", "between 1"),
    ("tls = false", 'tls = false\nstream_discard = "drop"', "nats.stream_discard", "'new', 'old'"),
    ("tls = false", 'tls = false\nstream = "a.b"', "nats.stream", "letters"),
    ("tls = false", 'tls = false\nsubject_prefix = "x"', "nats.subject_prefix", "tokens"),
    ("tls = false", 'tls = true\nca_file = "/nonexistent/ca.crt"', "nats.ca_file", "does not exist"),
    ("[nats]", '[mqtt]\nhost = "h"\nusername = "u"\n[nats]', "nats", "two brokers"),
    ("tls = false", "tls = false\nsharde = 1", "nats.sharde", "unknown key"),
])
def test_nats_section_errors(tmp_path: Path, old: str, new: str, key: str, message: str) -> None:
    assert old in BASE
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, BASE.replace(old, new, 1)), replica=1)
    assert e.value.key == key and message in e.value.message and "\n" not in str(e.value)


def test_cli_check_exits_2_on_a_bad_nats_section(tmp_path: Path) -> None:
    p = _write(tmp_path, BASE.replace("inflight = 500", "inflight = -1"))
    r = subprocess.run([sys.executable, "-m", "iotplat.worker", "--config", str(p), "--replica", "1", "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nats.inflight" in r.stderr and "Traceback" not in r.stderr


def test_wheelhouse_installs_offline_with_nats(tmp_path: Path) -> None:
    """build_wheelhouse downloads nats-py's wheel next to paho-mqtt's; a bare venv installs the worker from it
    with --no-index, imports the NATS transport and checks a [nats] config."""
    from iotplat.deploy.wheelhouse import build_wheelhouse

    house = build_wheelhouse(tmp_path / "cache")
    reqs = (house / "requirements-worker.txt").read_text()
    assert "nats-py==" in reqs and "paho-mqtt==" in reqs
    venv.create(tmp_path / "venv", with_pip=True)
    py = tmp_path / "venv" / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(house), "-r",
                    str(house / "requirements-worker.txt"), *map(str, house.glob("iotplat-*.whl"))], check=True, timeout=300)
    cfg = _write(tmp_path, BASE)
    probe = ("import iotplat.worker.nats_transport, nats, sys; "
             "print([m for m in ('pydantic', 'yaml', 'jinja2', 'cryptography', 'bcrypt') if m in sys.modules])")
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    check = subprocess.run([py, "-m", "iotplat.worker", "--config", str(cfg), "--replica", "1", "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
