"""Secret masking of streamed Ansible output and journals, and journal line parsing (no hosts needed)."""

from __future__ import annotations

import json

from iotplat.deploy.ansible import Masker
from iotplat.deploy.logs import _parse


def test_masker_hides_every_form_it_knows() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg0123456789abcdef\n-----END PRIVATE KEY-----\n"
    mask = Masker({"s3cr3t-password-0123456789ab", "short-pw", pem})
    text = ("login s3cr3t-password-0123456789ab ok; pw=short-pw; "
            "key MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg0123456789abcdef end")
    out = mask(text)
    assert "s3cr3t" not in out and "short-pw" not in out and "MIGHAgEA" not in out
    assert out.count("********") == 3
    assert mask("nothing secret here, just words longer-than-sixteen-chars") == (
        "nothing secret here, just words longer-than-sixteen-chars")


def test_journal_lines_are_labelled_by_unit() -> None:
    units = {"mosquitto": "broker", "iotplat-worker@1": "worker"}
    mask = Masker({"hidden-value-0123456789"})
    a = _parse("edge", units, json.dumps({"MESSAGE": "x hidden-value-0123456789", "_SYSTEMD_UNIT": "mosquitto.service",
                                          "__REALTIME_TIMESTAMP": "2"}), mask)
    b = _parse("edge", units, json.dumps({"MESSAGE": [104, 105], "UNIT": "iotplat-worker@1.service",
                                          "__REALTIME_TIMESTAMP": "1"}), mask)
    assert a is not None and b is not None
    assert (a.service, a.message) == ("broker", "x ********")
    assert (b.service, b.message) == ("worker", "hi")
    assert sorted([a, b])[0] is b
    c = _parse("edge", units, json.dumps({"MESSAGE": "Starting mosquitto.service", "_SYSTEMD_UNIT": "init.scope",
                                          "UNIT": "mosquitto.service", "__REALTIME_TIMESTAMP": "3"}), mask)
    assert c is not None and c.service == "broker"
    assert _parse("edge", units, "not json", mask) is None


def test_every_secret_is_masked_whatever_its_length_or_characters() -> None:
    """Issue 9: user-supplied secrets shorter than 8 characters, or long ones with symbols, were printed as they
    were; a generated password glued to other url-safe characters (`password=...`) was too."""
    generated = "Zk3v9QpL2mX8wR4tY6uB1nC5eD7fG0hJ"  # token_urlsafe(24), as iotplat generates them
    hex_key = "0f" * 32
    symbols = 'correct horse "battery" staple!'
    short = "pw1"
    mask = Masker({generated, hex_key, symbols, short})
    cases = {
        f"password={generated}": "password=********",
        f"x{generated}_y": "x********_y",
        f"key {hex_key}.": "key ********.",
        f"login with {symbols} ok": "login with ******** ok",
        'ok: [edge] => {"msg": "correct horse \\"battery\\" staple!"}': 'ok: [edge] => {"msg": "********"}',
        "pw=pw1;": "pw=********;",
        f"{generated}{generated}": "****************",
    }
    for text, masked in cases.items():
        assert mask(text) == masked, text
        assert mask.finds(text)
    clean = "TASK [mosquitto : Install the broker] changed: [edge] sensor-000001 devices/telemetry"
    assert mask(clean) == clean and not mask.finds(clean)


def test_the_build_directory_check_finds_secrets_with_symbols() -> None:
    import pytest

    from iotplat.commands import assert_no_secrets
    from iotplat.errors import IotplatError

    secret = "s3cret with spaces & symbols!"
    assert_no_secrets({"ansible/x.yml": b"nothing here\n"}, {secret})
    with pytest.raises(IotplatError, match="ansible/x.yml"):
        assert_no_secrets({"ansible/x.yml": f"admin_password: {secret}\n".encode()}, {secret})
    with pytest.raises(IotplatError, match="hosts/a/b"):
        assert_no_secrets({"hosts/a/b": b"url=https://u:Zk3v9QpL2mX8wR4tY6uB1nC5eD7fG0hJ@h"},
                          {"Zk3v9QpL2mX8wR4tY6uB1nC5eD7fG0hJ"})
