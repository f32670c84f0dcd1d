"""Generated secrets, certificates and password hashes: correct, stable across renders, cached."""

from __future__ import annotations

import base64
import datetime as dt
import re
from pathlib import Path

import pytest
from cryptography import x509

from iotplat.secrets import pki
from iotplat.secrets.materials import ensure_materials
from iotplat.secrets.passwords import GENERATED_PBKDF2_ITERATIONS, hash_many, mosquitto_hash, verify_mosquitto_hash
from iotplat.secrets.state import State
from iotplat.spec.load import load_platform
from tests.helpers import EXAMPLES, PLATFORM_DIR

HASH_LINE = re.compile(r"^([A-Za-z0-9_-]+):\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")


def _materials(spec: Path, root: Path):
    platform = load_platform(spec)
    state = State.open(root, platform.name, platform.environment)
    m = ensure_materials(platform, state)
    state.save()
    return platform, m


def test_password_file_format(isolated_state: Path) -> None:
    platform, m = _materials(EXAMPLES / "aws" / "platform.yaml", isolated_state)
    lines = m.passwd_file().decode().splitlines()
    users = [HASH_LINE.match(line).group(1) for line in lines]
    assert users == sorted(users)
    assert set(users) == {"truck-001", "truck-002", "truck-003", "iotplat-canary", "iotplat-worker-1", "iotplat-worker-2"}
    salts = set()
    for line in lines:
        _, n, salt, digest = HASH_LINE.match(line).groups()
        assert int(n) == GENERATED_PBKDF2_ITERATIONS  # generated secrets: minimal cost (passwords.py)
        assert len(base64.b64decode(salt)) == 12 and len(base64.b64decode(digest)) == 64
        salts.add(salt)
    assert len(salts) == len(lines)
    for user, (password, h) in m.mqtt_users.items():
        assert verify_mosquitto_hash(password, h) and not verify_mosquitto_hash(password + "x", h)
        assert len(password) >= 32


def test_rerender_is_stable_and_warm(isolated_state: Path) -> None:
    _, first = _materials(EXAMPLES / "aws" / "platform.yaml", isolated_state)
    _, second = _materials(EXAMPLES / "aws" / "platform.yaml", isolated_state)
    assert first.hashes_computed == 6 and second.hashes_computed == 0
    assert first.passwd_file() == second.passwd_file()
    assert first.secrets == second.secrets and first.ca_cert_pem == second.ca_cert_pem
    assert {h: c.cert_pem for h, c in first.host_certs.items()} == {h: c.cert_pem for h, c in second.host_certs.items()}


def test_changed_iterations_rehash(isolated_state: Path, tmp_path: Path) -> None:
    spec = tmp_path / "platform.yaml"
    text = (PLATFORM_DIR / "platform.yaml").read_text()
    spec.write_text(text.replace("devices:\n  registry: devices.csv\n", "devices:\n"))
    _, a = _materials(spec, isolated_state)
    spec.write_text(spec.read_text().replace("broker:\n", "broker:\n  auth: {hash_iterations: 20000}\n"))
    _, b = _materials(spec, isolated_state)
    assert b.hashes_computed == len(b.mqtt_users)
    assert all(h.startswith("$7$20000$") for _, h in b.mqtt_users.values())
    assert {u: p for u, (p, _) in a.mqtt_users.items()} == {u: p for u, (p, _) in b.mqtt_users.items()}


def test_certificates(isolated_state: Path) -> None:
    platform, m = _materials(EXAMPLES / "baremetal" / "platform.yaml", isolated_state)
    ca = x509.load_pem_x509_certificate(m.ca_cert_pem.encode())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    gw = m.host_certs["gateway"].cert
    assert gw.issuer == ca.subject
    names = pki.cert_names(m.host_certs["gateway"].cert_pem)
    assert names == sorted(["gateway.iotplat.internal", "broker.iotplat.internal", "mqtt.factory.example.com"])
    st = pki.cert_names(m.host_certs["storage"].cert_pem)
    assert "influxdb.iotplat.internal" in st and "grafana.factory.example.com" in st
    assert not any(re.match(r"^\d+\.\d+\.\d+\.\d+$", n) for n in names + st)
    days = (gw.not_valid_after_utc - gw.not_valid_before_utc).days
    assert 396 <= days <= 398


def test_renewal_when_names_change_or_expiry_near() -> None:
    ca = pki.create_ca("t")
    cert = pki.issue_server_cert(ca, "a", ["a.x", "b.x"], days=397)
    assert not pki.needs_renewal(cert.cert_pem, ["b.x", "a.x"], ca.cert_pem)
    assert pki.needs_renewal(cert.cert_pem, ["a.x"], ca.cert_pem)
    short = pki.issue_server_cert(ca, "a", ["a.x"], days=10)
    assert pki.needs_renewal(short.cert_pem, ["a.x"], ca.cert_pem)
    other = pki.create_ca("other")
    assert pki.needs_renewal(cert.cert_pem, ["a.x", "b.x"], other.cert_pem)
    assert pki.expires_at(cert.cert_pem) > dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=390)


def test_hash_many_matches_serial() -> None:
    pairs = [(f"u{i}", f"password-{i}") for i in range(20)]
    hashes = hash_many(pairs, 1000)
    assert all(verify_mosquitto_hash(pw, hashes[u]) for u, pw in pairs)
    assert mosquitto_hash("pw", 1000, salt=b"0" * 12) == mosquitto_hash("pw", 1000, salt=b"0" * 12)


def test_secret_refs_resolved(isolated_state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iotplat.errors import InvalidInput

    spec = tmp_path / "platform.yaml"
    (tmp_path / "influx.pw").write_text("from-a-file-0123456789abcdef\n")
    base = (PLATFORM_DIR / "platform.yaml").read_text().replace("devices:\n  registry: devices.csv\n", "devices:\n")
    spec.write_text(base + "secrets:\n  influxdb_admin_password: {file: influx.pw}\n  grafana_admin_password: {env: GF_PW}\n")
    with pytest.raises(InvalidInput, match="GF_PW is not set"):
        _materials(spec, isolated_state)
    monkeypatch.setenv("GF_PW", "from-the-environment-0123456789")
    _, m = _materials(spec, isolated_state)
    assert m.secrets["influxdb_admin_password"] == "from-a-file-0123456789abcdef"
    assert m.secrets["grafana_admin_password"] == "from-the-environment-0123456789"
    assert len(m.secrets["grafana_secret_key"]) == 64
