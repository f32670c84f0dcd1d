"""State side of `iotplat rotate`: server certificate renewal, the CA overlap, new service and MQTT passwords,
and the 30-day certificate expiry warning of `iotplat status` (probed over real TLS on loopback)."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from iotplat.errors import InvalidInput
from iotplat.secrets import pki, rotation
from iotplat.secrets.materials import ensure_materials
from iotplat.secrets.passwords import verify_mosquitto_hash
from iotplat.secrets.state import State
from iotplat.spec.load import load_platform
from tests.helpers import EXAMPLES


def _open(spec: Path, root: Path):
    platform = load_platform(spec)
    state = State.open(root, platform.name, platform.environment)
    return platform, state


def _materials(spec: Path, root: Path):
    platform, state = _open(spec, root)
    m = ensure_materials(platform, state)
    state.save()
    return m


def _certs(bundle: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle.encode())


SPEC = EXAMPLES / "aws" / "platform.yaml"


def test_renew_issues_new_server_certificates_from_the_same_ca(isolated_state: Path) -> None:
    before = _materials(SPEC, isolated_state)
    platform, state = _open(SPEC, isolated_state)
    renewed = rotation.renew_server_certs(state)
    state.save()
    assert renewed == sorted(before.host_certs)
    after = _materials(SPEC, isolated_state)
    assert after.ca_cert_pem == before.ca_cert_pem
    for host, old in before.host_certs.items():
        new = after.host_certs[host]
        assert new.key_pem != old.key_pem and new.cert.serial_number != old.cert.serial_number
        assert pki.issued_by(new.cert_pem, after.ca_cert_pem)
        assert pki.cert_names(new.cert_pem) == pki.cert_names(old.cert_pem)
    assert after.mqtt_users == before.mqtt_users and after.secrets == before.secrets
    assert _materials(SPEC, isolated_state).host_certs == after.host_certs  # stable afterwards


def test_ca_rotation_overlap_then_finish(isolated_state: Path) -> None:
    before = _materials(SPEC, isolated_state)
    old_ca = before.ca_cert_pem
    platform, state = _open(SPEC, isolated_state)
    started = rotation.start_ca_rotation(platform, state)
    state.save()
    during = _materials(SPEC, isolated_state)
    bundle = _certs(during.ca_cert_pem)
    assert len(bundle) == 2 and during.ca_cert_pem.startswith(old_ca)
    assert during.ca_rotation_started == started["started"]
    # the servers keep their certificates (devices with only the old CA still connect) during the overlap
    assert during.host_certs == before.host_certs
    with pytest.raises(InvalidInput, match="already running"):
        rotation.start_ca_rotation(*_open(SPEC, isolated_state))
    platform, state = _open(SPEC, isolated_state)
    done = rotation.finish_ca_rotation(platform, state)
    state.save()
    after = _materials(SPEC, isolated_state)
    new_ca = bundle[1]
    assert _certs(after.ca_cert_pem) == [new_ca] and after.ca_rotation_started == ""
    assert done["dropped"] == bundle[0].subject.rfc4514_string()
    for host, cert in after.host_certs.items():
        assert pki.issued_by(cert.cert_pem, after.ca_cert_pem)
        assert not pki.issued_by(cert.cert_pem, old_ca)
        assert cert.cert_pem != before.host_certs[host].cert_pem
    with pytest.raises(InvalidInput, match="no CA rotation"):
        rotation.finish_ca_rotation(*_open(SPEC, isolated_state))


def test_issued_by_checks_the_signature_not_only_the_name() -> None:
    a = pki.create_ca("same name")
    b = pki.create_ca("same name")
    cert = pki.issue_server_cert(a, "h", ["h.example"], 30)
    assert pki.issued_by(cert.cert_pem, a.cert_pem) and not pki.issued_by(cert.cert_pem, b.cert_pem)
    assert pki.needs_renewal(cert.cert_pem, ["h.example"], b.cert_pem)
    assert not pki.needs_renewal(cert.cert_pem, ["h.example"], a.cert_pem)


def test_ca_rotation_refused_for_a_given_ca(isolated_state: Path, tmp_path: Path) -> None:
    ca = pki.create_ca("given")
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    (tmp_path / "ca.key").write_text(ca.key_pem)
    data = yaml.safe_load(SPEC.read_text())
    data["tls"] = {**data.get("tls", {}), "ca": "files", "ca_cert_file": "ca.crt", "ca_key_file": "ca.key"}
    (tmp_path / "platform.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    for f in SPEC.parent.iterdir():
        if f.suffix == ".csv":
            (tmp_path / f.name).write_text(f.read_text())
    spec = tmp_path / "platform.yaml"
    _materials(spec, isolated_state)
    with pytest.raises(InvalidInput, match="tls.ca is files"):
        rotation.start_ca_rotation(*_open(spec, isolated_state))


def test_service_secrets_and_mqtt_passwords(isolated_state: Path) -> None:
    before = _materials(SPEC, isolated_state)
    platform, state = _open(SPEC, isolated_state)
    rotated, skipped = rotation.rotate_service_secrets(platform, state)
    workers = [r.username for r in platform.replicas]
    rotation.rotate_mqtt_passwords(state, workers)
    state.save()
    after = _materials(SPEC, isolated_state)
    assert rotated == list(rotation.ROTATED_SECRETS) and skipped == []
    for name in after.secrets:
        assert (after.secrets[name] != before.secrets[name]) == (name in rotated), name
    for user, (pw, h) in after.mqtt_users.items():
        if user in workers:
            assert pw != before.mqtt_users[user][0] and verify_mosquitto_hash(pw, h)
            assert not verify_mosquitto_hash(before.mqtt_users[user][0], h)
        else:
            assert (pw, h) == before.mqtt_users[user], user


def test_secrets_from_the_spec_are_not_rotated(isolated_state: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = yaml.safe_load(SPEC.read_text())
    data["secrets"] = {"influxdb_admin_password": {"env": "ROT_TEST_PW"}}
    (tmp_path / "platform.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    for f in SPEC.parent.iterdir():
        if f.suffix == ".csv":
            (tmp_path / f.name).write_text(f.read_text())
    monkeypatch.setenv("ROT_TEST_PW", "given-by-the-operator-0123456789")
    spec = tmp_path / "platform.yaml"
    _materials(spec, isolated_state)
    platform, state = _open(spec, isolated_state)
    rotated, skipped = rotation.rotate_service_secrets(platform, state, ("influxdb_admin_password",
                                                                        "influxdb_grafana_password"))
    assert skipped == ["influxdb_admin_password"] and rotated == ["influxdb_grafana_password"]


def _serve_tls_once(cert: pki.CertKey, tmp_path: Path) -> tuple[int, threading.Thread]:
    (tmp_path / "s.crt").write_text(cert.cert_pem)
    (tmp_path / "s.key").write_text(cert.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = srv.accept()
            with ctx.wrap_socket(conn, server_side=True) as t:
                t.recv(1)
        except OSError:
            pass
        finally:
            srv.close()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    return srv.getsockname()[1], th


@pytest.mark.parametrize("days,warned", [(10, True), (29, True), (90, False)])
def test_status_warns_30_days_before_expiry(tmp_path: Path, days: int, warned: bool) -> None:
    from iotplat.verify.status import TrustStore, tls_probe

    ca = pki.create_ca("probe CA")
    port, th = _serve_tls_once(pki.issue_server_cert(ca, "broker", ["broker.test"], days), tmp_path)
    trust = TrustStore(ca.cert_pem)
    try:
        ok, note, left = tls_probe("127.0.0.1", port, "broker.test", trust.context())
    finally:
        trust.close()
        th.join(10)
    assert ok, note
    assert left is not None and days - 1 < left <= days
    assert ("WARNING: expires within 30 days" in note) is warned
    assert ("iotplat rotate certs" in note) is warned
