"""The config loader: the documented example loads; every bad input is one line `FILE: key: message`,
exit code 2 from the CLI, never a traceback; secrets never appear in errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from iotplat.worker.config import ConfigError, load_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "worker-config.md"
SECRET = "s3cr3t-canary-value-xyz"


def doc_example() -> str:
    text = DOC.read_text()
    m = re.search(r"```toml\n(.*?)```", text, re.S)
    assert m, "docs/worker-config.md has no toml example"
    return m.group(1)


@pytest.fixture
def good(tmp_path, monkeypatch):
    """The documented example, made loadable here: files it references exist in tmp_path."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("IOTPLAT_WORKER_REPLICA", raising=False)
    (tmp_path / "ca.crt").write_text("not parsed by the loader\n")
    (tmp_path / "mqtt-password").write_text(SECRET + "\n")
    (tmp_path / "influxdb-password").write_text(SECRET + "\n")
    text = doc_example().replace("/etc/iotplat/tls/ca.crt", str(tmp_path / "ca.crt"))
    p = tmp_path / "worker.toml"
    p.write_text(text)
    return p


def test_documented_example_loads(good):
    cfg = load_config(good, replica=2)
    assert cfg.replica == 2
    assert cfg.mqtt.username == "iotplat-worker-2"
    assert cfg.mqtt.client_id == "iotplat-worker-2"
    assert cfg.mqtt.password == SECRET
    assert cfg.influxdb.password == SECRET
    assert cfg.spool.dir == "/var/lib/iotplat-worker/2/spool"
    assert cfg.http.port == 9465  # port + N - 1
    sub = cfg.subscriptions[0]
    assert sub.filter == "devices/+/telemetry"
    assert cfg.subscription_filter(sub) == "$share/iotplat/devices/+/telemetry"
    assert sub.fields["temperature"].path == "temp"
    assert sub.timestamp.unit == "ms"
    assert SECRET not in repr(cfg)


def test_replica_from_environment_and_credentials_directory(good, tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-creds-dir\n")
    (creds / "influxdb-password").write_text("x\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("IOTPLAT_WORKER_REPLICA", "3")
    cfg = load_config(good, None)
    assert cfg.replica == 3 and cfg.mqtt.password == "from-creds-dir"


def _err(path, replica=1) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(path, replica)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ")
    assert SECRET not in msg
    return msg


BAD = [
    # (substitution old -> new, expected key, expected words)
    ("version = 1 ", "version = 2 ", "version", "format version 2 is not supported"),
    ("port = 8883", 'port = "8883"', "mqtt.port", "must be an integer"),
    ("port = 8883", "port = 70000", "mqtt.port", "between 1 and 65535"),
    ("protocol = 5 ", "protocol = 4 ", "mqtt.protocol", "must be one of 5, 311"),
    ("keepalive = 30", "keepaliv = 30", "mqtt.keepaliv", "did you mean 'keepalive'"),
    ("inflight = 1000", "inflight = 0", "mqtt.inflight", "between 1 and 65535"),
    ("tls = true", "tls = 1", "mqtt.tls", "must be true or false"),
    ("version = 1                                # 1: /write", "version = 3  # 1: /write", "influxdb.version",
     "must be one of 1, 2"),
    ('url = "https://influxdb.iotplat.internal:8086"', 'url = "influxdb:8086"', "influxdb.url", "http(s)://"),
    ('mode = "outage"', 'mode = "sometimes"', "spool.mode", "'outage', 'always'"),
    ("max_bytes = 1073741824", "max_bytes = 100", "spool.max_bytes", "at least"),
    ('topic = "devices/{device}/telemetry"', 'topic = "devices/+/telemetry"', "subscriptions[0].topic", "{name}"),
    ('topic = "devices/{device}/telemetry"', 'topic = "devices/{device}/{device}"', "subscriptions[0].topic",
     "appears twice"),
    ('type = "float"', 'type = "double"', "subscriptions[0].fields.temperature.type", "one of"),
    ('unit = "ms"', 'unit = "minutes"', "subscriptions[0].timestamp.unit", "one of"),
    ('password_file = "mqtt-password"', 'password_file = "nope"', "mqtt.password_file", "does not exist"),
    ("max_delay = 0.2", "max_delay = nan", "batch.max_delay", "finite"),
    ('url = "https://influxdb.iotplat.internal:8086"', f'url = "https://u:{SECRET}@influxdb:8086"', "influxdb.url",
     "must not contain credentials"),
    ("[limits]", "[limit]", "limit", "did you mean 'limits'"),
]


@pytest.mark.parametrize("old,new,key,words", BAD, ids=[b[2] + ":" + b[1][:20] for b in BAD])
def test_bad_values_give_one_line_errors(good, old, new, key, words):
    text = good.read_text()
    assert old in text, old
    good.write_text(text.replace(old, new, 1))
    msg = _err(good)
    assert f": {key}: " in msg, msg
    assert words in msg, msg


def test_syntax_error_and_missing_file(tmp_path, good):
    good.write_text(good.read_text().replace("[mqtt]", "[mqtt", 1))
    assert ": toml: " in _err(good)
    missing = tmp_path / "none.toml"
    assert "does not exist" in _err(missing)


def test_replica_placeholder_without_replica(good, monkeypatch):
    monkeypatch.delenv("IOTPLAT_WORKER_REPLICA", raising=False)
    msg = _err(good, replica=None)
    assert "--replica" in msg and "IOTPLAT_WORKER_REPLICA" in msg


def test_version2_needs_token(good):
    text = good.read_text().replace("version = 1                                # 1: /write",
                                    "version = 2  #", 1)
    good.write_text(text)
    msg = _err(good)
    assert "influxdb.database" in msg or "influxdb.org" in msg


def test_multiline_secret_file_rejected_without_leaking(good, tmp_path):
    (tmp_path / "mqtt-password").write_text(SECRET + "\nsecond line\n")
    msg = _err(good)
    assert "mqtt.password_file" in msg and "exactly one" in msg


@pytest.mark.parametrize("body,key", [
    ("version = 1\n[mqtt]\nhost='h'\nusername='u'\ntls=false\n[influxdb]\nurl='http://x'\ndatabase='d'\n[spool]\ndir='/tmp/s'\n",
     "subscriptions"),
    ("[mqtt]\nhost='h'\n", "version"),
    ("version = 1\n[mqtt]\nhost='h'\nusername='u'\n[spool]\ndir='/tmp/s'\n", "influxdb"),
])
def test_missing_parts(tmp_path, body, key):
    p = tmp_path / "w.toml"
    p.write_text(body)
    msg = _err(p)
    assert f": {key}: " in msg or f": {key}." in msg, msg


def test_cli_exit_code_2_one_line_no_traceback(good):
    good.write_text(good.read_text().replace("port = 8883", "port = -1", 1))
    r = subprocess.run([sys.executable, "-m", "iotplat.worker", "--config", str(good), "--replica", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{good}: mqtt.port: " in lines[0], r.stderr
    assert r.stdout == ""


def test_cli_unknown_decoder_is_config_error(good):
    good.write_text(good.read_text().replace('format = "json"', 'format = "protobuf"', 1))
    r = subprocess.run([sys.executable, "-m", "iotplat.worker", "--config", str(good), "--replica", "1", "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "subscriptions[0].format" in r.stderr and "no decoder 'protobuf'" in r.stderr
    assert "Traceback" not in r.stderr


def test_worker_imports_stay_light():
    """Worker hosts install only the worker's light dependencies."""
    code = ("import sys, iotplat.worker.cli, iotplat.worker.core, iotplat.worker.decoders, "
            "iotplat.worker.mqtt_native, iotplat.worker.writer, iotplat.worker.spool;"
            "bad=[m for m in ('pydantic','yaml','jinja2','ansible','cryptography','influxdb_client') "
            "if m in sys.modules]; print(bad)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_check_fails_exactly_where_the_start_fails(good):
    """`--check` builds every decoder as the worker's start does (iotplat.worker.decoders.build_decoders): a decoder
    that refuses its subscription (here an option the json decoder does not know) is the same one line, exit 2."""
    good.write_text(good.read_text().replace("[subscriptions.options]", '[subscriptions.options]\nprecison = "ms"', 1))
    argv = [sys.executable, "-m", "iotplat.worker", "--config", str(good), "--replica", "1"]
    check, start = (subprocess.run(a, capture_output=True, text=True, timeout=60) for a in (argv + ["--check"], argv))
    for r in (check, start):
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert check.stderr == start.stderr
    assert check.stderr == (f"error: {good}: subscriptions[0].options: json: unknown option 'precison' for format "
                            "'json'; allowed: max_future_seconds\n")
