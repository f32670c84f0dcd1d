"""State changes behind `iotplat rotate`: new certificates, a CA overlap, new service and MQTT passwords.

Each function only edits the state (the caller holds the state lock and saves); deploying the result to the
hosts is iotplat/deploy/rotate.py. Everything here is convergent: if a deploy fails half way, the state
already holds the new values and the next `iotplat up` (or the same rotate command) finishes the job.

CA rotation keeps two CAs in the state for an overlap period:

    secrets.ca        the current CA: it issues the server certificates
    secrets.ca_next   the next CA (while a rotation runs): trusted next to the current one, issues nothing yet

`start_ca_rotation` creates `ca_next`, so ca.crt on every host and in every device kit becomes the bundle
current + next while the servers keep their certificates. `finish_ca_rotation` makes `ca_next` the current
CA and drops the old one; server certificates are then reissued by the new CA and ca.crt holds only it.
Devices that fetched a kit during the overlap trust both, so they never see a certificate they cannot verify.
"""

from __future__ import annotations

import time
from typing import Any

from iotplat.errors import InvalidInput
from iotplat.secrets import pki
from iotplat.secrets.passwords import generate_password
from iotplat.secrets.state import State
from iotplat.spec.platform_model import Platform

# Service secrets `rotate secrets` replaces. Not here: grafana_admin_password (Grafana reads it only when
# it creates its database), grafana_secret_key (encrypts Grafana's stored data source secrets) and the
# InfluxDB 2 tokens (created once at setup).
ROTATED_SECRETS = ("influxdb_worker_password", "influxdb_grafana_password")
ADMIN_SECRET = "influxdb_admin_password"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _secrets(state: State) -> dict[str, Any]:
    return state.doc("secrets")


def renew_server_certs(state: State) -> list[str]:
    """Forget every server certificate, so ensure_materials issues new ones (new keys) from the current CA."""
    sec = _secrets(state)
    hosts = sorted(sec.get("hosts", {}))
    sec["hosts"] = {}
    state.mark("secrets")
    return hosts


def _check_own_ca(platform: Platform) -> None:
    if platform.spec.tls.ca == "files":
        raise InvalidInput(f"{platform.spec_file}: tls.ca is files: iotplat does not own this CA; replace "
                           "tls.ca_cert_file/ca_key_file yourself (or switch to tls.ca: generate)")


def start_ca_rotation(platform: Platform, state: State) -> dict[str, Any]:
    _check_own_ca(platform)
    sec = _secrets(state)
    if "ca" not in sec:
        raise InvalidInput(f"{platform.key} has no CA yet: run `iotplat up` first")
    if sec.get("ca_next"):
        raise InvalidInput(f"a CA rotation of {platform.key} is already running (since {sec['ca_next']['started']}); "
                           "finish it with `iotplat rotate certs --ca --finish`")
    started = _now()
    new = pki.create_ca(f"iotplat {platform.key} CA {started}")
    sec["ca_next"] = {"cert": new.cert_pem, "key": new.key_pem, "started": started}
    state.mark("secrets")
    return {"started": started, "subject": new.cert.subject.rfc4514_string()}


def finish_ca_rotation(platform: Platform, state: State) -> dict[str, Any]:
    _check_own_ca(platform)
    sec = _secrets(state)
    nxt = sec.get("ca_next")
    if not nxt:
        raise InvalidInput(f"no CA rotation of {platform.key} is running; start one with `iotplat rotate certs --ca`")
    old_subject = pki.CertKey(sec["ca"]["cert"], "").cert.subject.rfc4514_string()
    sec["ca"] = {"cert": nxt["cert"], "key": nxt["key"]}
    del sec["ca_next"]
    sec["hosts"] = {}  # reissued by the new CA
    state.mark("secrets")
    return {"started": nxt["started"], "finished": _now(), "dropped": old_subject}


def rotate_service_secrets(platform: Platform, state: State, names: tuple[str, ...] = ROTATED_SECRETS
                           ) -> tuple[list[str], list[str]]:
    """New values for the generated service secrets in `names`. Returns (rotated, skipped): a secret the spec
    takes from a file or environment variable is the spec owner's to change."""
    values = _secrets(state).setdefault("generated", {})
    rotated, skipped = [], []
    for name in names:
        if getattr(platform.spec.secrets, name, None) is not None:
            skipped.append(name)
            continue
        values[name] = generate_password()
        rotated.append(name)
    if rotated:
        state.mark("secrets")
    return rotated, skipped


def set_service_secret(state: State, name: str, value: str) -> None:
    _secrets(state).setdefault("generated", {})[name] = value
    state.mark("secrets")


def rotate_mqtt_passwords(state: State, usernames: list[str]) -> None:
    """New passwords for these MQTT users (their $7$ hashes are recomputed by ensure_materials)."""
    users = state.doc("users").setdefault("users", {})
    for name in usernames:
        users[name] = {"password": generate_password()}
    if usernames:
        state.mark("users")
