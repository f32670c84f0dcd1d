"""Every secret and certificate a platform needs, derived from the spec and kept in the state directory.

`ensure_materials` creates what is missing and reuses what exists, so re-renders are stable and a
second `up` rotates nothing. Secret *files* (password file, private keys, credentials) are produced by
`secret_files` at deploy time from these materials and never written to the build directory.
"""

from __future__ import annotations

import os
import secrets as pysecrets
from dataclasses import dataclass
from pathlib import Path

from iotplat.errors import InvalidInput
from iotplat.secrets import pki
from iotplat.secrets.passwords import (SecretSource, bcrypt_cost, bcrypt_hash_cost, bcrypt_many, generate_password,
                                      hash_iterations, hash_many, pbkdf2_iterations)
from iotplat.secrets.state import State
from iotplat.spec.model import SecretRef
from iotplat.spec.platform_model import Platform

# Service secrets generated per platform (names are stable: they key the state file).
SERVICE_SECRETS = (
    "influxdb_admin_password",
    "influxdb_worker_password",
    "influxdb_grafana_password",
    "influxdb_admin_token",  # InfluxDB 2 operator token (given to setup); used only by the deploy step
    "grafana_admin_password",
    "grafana_secret_key",
)


@dataclass(frozen=True)
class Materials:
    ca_cert_pem: str  # what clients trust: the platform CA (during a CA rotation: the current and the next CA)
    host_certs: dict[str, pki.CertKey]  # host -> server certificate + key
    mqtt_users: dict[str, tuple[str, str]]  # username -> (password, $7$ hash)
    secrets: dict[str, str]
    hashes_computed: int  # how many hashes this call had to compute (0 when warm)
    ca_rotation_started: str = ""  # set while a CA rotation overlaps (ca_cert_pem is then old + new CA)

    def secret_values(self) -> set[str]:
        """Every secret value: what render must never write and what output must mask."""
        values = {pw for pw, _ in self.mqtt_users.values()} | set(self.secrets.values())
        return values | {c.key_pem for c in self.host_certs.values()}

    def passwd_file(self) -> bytes:
        lines = [f"{user}:{h}" for user, (_, h) in sorted(self.mqtt_users.items())]
        return ("\n".join(lines) + "\n").encode()


MIN_SECRET_LENGTH = 16
MIN_DISTINCT_CHARACTERS = 6


def check_strength(value: str, where: str) -> None:
    """Refuse a weak user-supplied secret: one line naming the field and its source, never the value."""
    if len(value) < MIN_SECRET_LENGTH:
        rule = f"use at least {MIN_SECRET_LENGTH} characters"
    elif not value.isprintable():
        rule = "use printable characters on one line (no newline, tab or other control character)"
    elif len(set(value)) < MIN_DISTINCT_CHARACTERS:
        rule = f"use at least {MIN_DISTINCT_CHARACTERS} different characters"
    else:
        return
    raise InvalidInput(f"{where} is too weak: {rule}, e.g. a random value from `openssl rand -base64 24`")


def _read_small(path: Path, limit: int = 64 * 1024) -> bytes:
    """A secret file: a regular file of at most `limit` bytes (never a FIFO, a device or /dev/zero)."""
    import errno
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit // 1024} KiB")
    return data


def resolve_ref(ref: SecretRef, platform: Platform, what: str) -> str:
    """A secret the spec references (environment variable or file), checked for strength."""
    if ref.env:
        value = os.environ.get(ref.env)
        if not value:
            raise InvalidInput(f"{platform.spec_file}: secrets.{what}: environment variable {ref.env} is not set or empty")
        check_strength(value, f"{platform.spec_file}: secrets.{what}: the value of environment variable {ref.env}")
        return value
    path = Path(ref.file or "")
    path = path if path.is_absolute() else platform.spec_dir / path
    try:
        value = _read_small(path).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidInput(f"{platform.spec_file}: secrets.{what}: cannot read {path}: {reason}") from None
    if not value:
        raise InvalidInput(f"{platform.spec_file}: secrets.{what}: {path} is empty")
    check_strength(value, f"{platform.spec_file}: secrets.{what}: the value in {path}")
    return value


def server_names(platform: Platform, host: str) -> list[str]:
    names = [platform.host_fqdn(host), *_service_cert_names(platform, host)]
    return sorted(dict.fromkeys(names))


def _service_cert_names(platform: Platform, host: str) -> list[str]:
    """The names the TLS servers on `host` answer to (each service's `cert_names`, iotplat/services)."""
    from iotplat.services import all_services

    on = set(platform.services_on(host))
    return [n for svc in all_services() if svc.name in on for n in svc.cert_names(platform)]


def mqtt_usernames(platform: Platform) -> list[str]:
    return [d.id for d in platform.all_devices] + [r.username for r in platform.replicas]


def ensure_materials(platform: Platform, state: State) -> Materials:
    sec = state.doc("secrets")
    # CA
    if platform.spec.tls.ca == "files":
        ca = _given_ca(platform)
    else:
        if "ca" not in sec:
            ca_new = pki.create_ca(f"iotplat {platform.key} CA")
            sec["ca"] = {"cert": ca_new.cert_pem, "key": ca_new.key_pem}
            state.mark("secrets")
        ca = pki.CertKey(sec["ca"]["cert"], sec["ca"]["key"])
    # During a CA rotation (`iotplat rotate certs --ca`) the next CA is trusted next to the current one;
    # server certificates stay issued by the current CA until `--finish` (see iotplat/deploy/rotate.py).
    ca_next = sec.get("ca_next") if platform.spec.tls.ca != "files" else None
    trust_pem = ca.cert_pem if not ca_next else ca.cert_pem.rstrip("\n") + "\n" + ca_next["cert"]
    # server certificates
    certs = sec.setdefault("hosts", {})
    host_certs: dict[str, pki.CertKey] = {}
    for host in platform.host_names:
        if not _service_cert_names(platform, host):  # no TLS server on it (e.g. a worker-only host)
            continue
        names = server_names(platform, host)
        cur = certs.get(host)
        routes = platform.spec.broker.engine == "nats" and "broker" in platform.services_on(host)
        if cur is None or pki.needs_renewal(cur["cert"], names, ca.cert_pem) or (
                routes and not pki.has_client_auth(cur["cert"])):
            issued = pki.issue_server_cert(ca, platform.host_fqdn(host), names, platform.spec.tls.server_cert_days)
            certs[host] = {"cert": issued.cert_pem, "key": issued.key_pem}
            state.mark("secrets")
        host_certs[host] = pki.CertKey(certs[host]["cert"], certs[host]["key"])
    # service secrets
    values = sec.setdefault("generated", {})
    resolved: dict[str, str] = {}
    for name in SERVICE_SECRETS:
        ref = getattr(platform.spec.secrets, name, None)
        if ref is not None:
            resolved[name] = resolve_ref(ref, platform, name)
            continue
        if name not in values:
            values[name] = pysecrets.token_hex(32) if name == "grafana_secret_key" else generate_password()
            state.mark("secrets")
        resolved[name] = values[name]
    # MQTT users (devices, canary, worker replicas) with cached hashes, their cost by the secret's source
    users_doc = state.doc("users")
    users = users_doc.setdefault("users", {})
    wanted = mqtt_usernames(platform)
    todo: dict[int, list[tuple[str, str]]] = {}
    for name in wanted:
        entry = users.get(name)
        if entry is None:
            entry = users[name] = {"password": generate_password()}
            state.mark("users")
        iterations = mqtt_hash_iterations(platform, _source(entry))
        if hash_iterations(entry.get("hash", "")) != iterations:
            todo.setdefault(iterations, []).append((name, entry["password"]))
    for iterations, pairs in todo.items():
        for name, h in hash_many(pairs, iterations).items():
            users[name]["hash"] = h
        state.mark("users")
    mqtt_users = {n: (users[n]["password"], users[n]["hash"]) for n in wanted}
    computed = sum(len(p) for p in todo.values())
    if platform.spec.broker.engine == "nats":  # each broker host's nats-server.conf holds bcrypt hashes: a secret
        from iotplat.services import nats

        hashes, more = bcrypt_hashes(state, nats.usernames(platform))
        computed += more
        for host, conf in nats.node_configs(platform, hashes).items():
            resolved[nats.secret_key(host)] = conf
    return Materials(trust_pem, host_certs, mqtt_users, resolved, computed,
                     ca_rotation_started=ca_next["started"] if ca_next else "")


def _source(entry: dict[str, str]) -> SecretSource:
    """Where an MQTT user's secret came from: every one iotplat keeps today is generated; an entry may say
    ``"source": "supplied"`` (a credential a person chose) to get the stretched cost."""
    return SecretSource(entry.get("source", SecretSource.GENERATED.value))


def mqtt_hash_iterations(platform: Platform, source: SecretSource) -> int:
    """PBKDF2 iterations of one MQTT user's hash. A spec that sets ``broker.auth.hash_iterations`` gets it for
    every user, as before; otherwise the cost follows the secret's source (passwords.py says why): generated
    secrets the minimal cost, supplied ones the stretched default."""
    auth = platform.spec.broker.auth
    if "hash_iterations" in auth.model_fields_set:
        return auth.hash_iterations
    return pbkdf2_iterations(source, auth.hash_iterations)


def bcrypt_hashes(state: State, names: list[str]) -> tuple[dict[str, str], int]:
    """({user: bcrypt hash}, how many were computed) for MQTT users already in the state (ensure_materials
    first): what nats-server.conf needs. Cached beside the PBKDF2 hash; recomputed only when missing or of
    another cost than the secret's source asks for (rotation replaces the whole entry, hash included)."""
    users = state.doc("users").setdefault("users", {})
    todo: dict[int, list[tuple[str, str]]] = {}
    for name in names:
        entry = users[name]
        cost = bcrypt_cost(_source(entry))
        if bcrypt_hash_cost(entry.get("bcrypt", "")) != cost:
            todo.setdefault(cost, []).append((name, entry["password"]))
    for cost, pairs in todo.items():
        for name, h in bcrypt_many(pairs, cost).items():
            users[name]["bcrypt"] = h
        state.mark("users")
    return {n: users[n]["bcrypt"] for n in names}, sum(len(p) for p in todo.values())


def _given_ca(platform: Platform) -> pki.CertKey:
    tls = platform.spec.tls
    out = []
    for field in ("ca_cert_file", "ca_key_file"):
        p = Path(getattr(tls, field))
        p = p if p.is_absolute() else platform.spec_dir / p
        try:
            out.append(p.read_text())
        except OSError as exc:
            raise InvalidInput(f"{platform.spec_file}: tls.{field}: cannot read {p}: {exc.strerror}") from None
    return pki.CertKey(out[0], out[1])


def secret_content(key: str, materials: Materials) -> bytes:
    """The bytes of a secret file named in the manifest (`secret` field), for the deploy step."""
    if key == "mosquitto_passwd":
        return materials.passwd_file()
    kind, _, arg = key.partition(":")
    if kind == "host_key":
        return materials.host_certs[arg].key_pem.encode()
    if kind == "mqtt_password":
        return materials.mqtt_users[arg][0].encode()
    if key in materials.secrets:
        return materials.secrets[key].encode()
    raise KeyError(f"unknown secret {key!r}")
