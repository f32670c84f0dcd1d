"""Generated passwords, Mosquitto's PBKDF2-SHA512 (`$7$`) hashes, nats-server's bcrypt hashes, and what
each hash costs depending on where its secret comes from.

Mosquitto 2.0 reads `user:$7$<iterations>$<base64 12-byte salt>$<base64 64-byte hash>` lines; nats-server
checks a password that starts with `$2a$`/`$2b$` with bcrypt. Both brokers verify the hash on every connect,
on the broker's CPU: at 10,000 PBKDF2 iterations that is ~10 ms per connect on Mosquitto's single thread, so
1,000 devices reconnecting at once took 6.1 s on a deployed host and 10,000 would take about a minute.

Why the cost depends on the secret's source (`SecretSource`): key stretching makes guessing a *low-entropy*
secret from a stolen hash slower, so it matters for a secret a person chose. iotplat's generated secrets
are 192 random bits (`generate_password`): no amount of stretching makes them harder to guess (2^192 tries
at any cost), so they get the minimal cost (`GENERATED_PBKDF2_ITERATIONS`, `GENERATED_BCRYPT_COST`): the hash
no longer dominates a reconnect storm (bench/connection_storm.py: Mosquitto spent 0.43 ms of CPU per device
for 10,000 devices, TLS included; what remains is the TLS handshake and the kernel's accept queue, and the
whole storm took 29.5 s on a loaded 2-core machine, not the goal of 10 s). A secret a person supplies keeps the
stretched cost (the spec's `broker.auth.hash_iterations`, `SUPPLIED_BCRYPT_COST`).

Old hashes stay valid: every hash carries its own cost (Mosquitto reads the iteration count of each line,
nats-server the cost of each bcrypt hash), so a password file or config mixing old stretched hashes with
new cheap ones works, passwords never change with the cost, and a cached hash is only recomputed (same
password, new salt) when its cost is not the one its source asks for. Hashes are cached in the state
directory and computed in parallel threads (hashlib and bcrypt release the GIL) when missing.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

PASSWORD_BYTES = 24  # 192 bits, 32 url-safe characters

# The minimal costs for generated secrets: Mosquitto accepts any iteration count >= 1 (2.0.11, tested in
# tests/secrets/test_hash_cost.py); bcrypt's smallest cost is 4 (16 rounds).
GENERATED_PBKDF2_ITERATIONS = 1
GENERATED_BCRYPT_COST = 4
# A secret a person supplies: nats-server's own `nats server passwd` default.
SUPPLIED_BCRYPT_COST = 11
_BCRYPT_RE = re.compile(r"\A\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}\Z")


class SecretSource(enum.Enum):
    GENERATED = "generated"  # iotplat made it (generate_password): 192 random bits
    SUPPLIED = "supplied"  # a person chose it (a spec reference, a file, an environment variable)


def pbkdf2_iterations(source: SecretSource, stretched: int) -> int:
    """PBKDF2 iterations for a secret from ``source``; ``stretched`` is what the spec asks for people's secrets."""
    return GENERATED_PBKDF2_ITERATIONS if source is SecretSource.GENERATED else stretched


def bcrypt_cost(source: SecretSource) -> int:
    return GENERATED_BCRYPT_COST if source is SecretSource.GENERATED else SUPPLIED_BCRYPT_COST


def bcrypt_hash(password: str, cost: int) -> str:
    """A bcrypt hash nats-server accepts as a user's password (`$2b$`; bcrypt uses only the first 72 bytes)."""
    import bcrypt

    data = password.encode()
    if len(data) > 72:
        raise ValueError("bcrypt takes at most 72 bytes of a password")
    return bcrypt.hashpw(data, bcrypt.gensalt(rounds=cost)).decode()


def verify_bcrypt(password: str, encoded: str) -> bool:
    import bcrypt

    try:
        return bcrypt.checkpw(password.encode()[:72], encoded.encode())
    except ValueError:
        return False


def bcrypt_hash_cost(encoded: str) -> int | None:
    m = _BCRYPT_RE.match(encoded)
    return int(m.group(1)) if m else None


def bcrypt_many(passwords: Iterable[tuple[str, str]], cost: int, workers: int | None = None) -> dict[str, str]:
    """{name: bcrypt hash} for (name, password) pairs, computed on all cores."""
    items = list(passwords)
    if len(items) < 8:
        return {name: bcrypt_hash(pw, cost) for name, pw in items}
    with ThreadPoolExecutor(max_workers=workers or max(1, os.cpu_count() or 1)) as pool:
        return {name: h for (name, _), h in zip(items, pool.map(lambda it: bcrypt_hash(it[1], cost), items,
                                                                   chunksize=64))}


def generate_password(nbytes: int = PASSWORD_BYTES) -> str:
    return secrets.token_urlsafe(nbytes)


def mosquitto_hash(password: str, iterations: int, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_mosquitto_hash(password: str, encoded: str) -> bool:
    try:
        _, kind, iterations, salt, digest = encoded.split("$")
        if kind != "7":
            return False
        calc = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations))
        return hmac.compare_digest(calc, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


def hash_iterations(encoded: str) -> int | None:
    parts = encoded.split("$")
    if len(parts) == 5 and parts[1] == "7" and parts[2].isdigit():
        return int(parts[2])
    return None


def hash_many(passwords: Iterable[tuple[str, str]], iterations: int, workers: int | None = None) -> dict[str, str]:
    """{name: hash} for (name, password) pairs, computed on all cores."""
    items = list(passwords)
    if not items:
        return {}
    if len(items) < 8:
        return {name: mosquitto_hash(pw, iterations) for name, pw in items}
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        hashes = pool.map(lambda item: mosquitto_hash(item[1], iterations), items, chunksize=64)
        return {name: h for (name, _), h in zip(items, hashes)}
