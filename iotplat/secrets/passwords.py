"""Generated passwords and Mosquitto's PBKDF2-SHA512 (`$7$`) password hashes.

Mosquitto 2.0 reads `user:$7$<iterations>$<base64 12-byte salt>$<base64 64-byte hash>` lines. Its own
mosquitto_passwd uses only 101 iterations; we default to 10,000 (~10 ms of broker CPU per connect,
measured). Hashes cost ~5 ms each in Python, so they are cached in the state directory and computed
in parallel threads (hashlib releases the GIL) when missing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

PASSWORD_BYTES = 24  # 192 bits, 32 url-safe characters


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
