"""Encryption at rest for the state directory, in ansible-vault's format.

ansible-vault (AES256-CTR + HMAC-SHA256, PBKDF2 key derivation) comes with ansible-core, which iotplat
needs anyway, and it lets operators inspect state with `ansible-vault view --vault-password-file ...`.

The key (a vault password) is the operator's: $IOTPLAT_VAULT_PASSWORD_FILE, else
~/.config/iotplat/vault-password, created (0600, 256 random bits) on first use. Share it with your team
out of band, never in the repository.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from iotplat.errors import StateError

ENV_KEY_FILE = "IOTPLAT_VAULT_PASSWORD_FILE"


def default_key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "iotplat" / "vault-password"


def key_file_path() -> Path:
    env = os.environ.get(ENV_KEY_FILE)
    return Path(env) if env else default_key_file()


def load_or_create_key(create: bool = True) -> tuple[bytes, Path, bool]:
    """Return (key, path, created)."""
    path = key_file_path()
    if path.exists():
        try:
            mode = path.stat().st_mode & 0o077
            if mode:
                raise StateError(f"{path}: the vault password file is readable by others; run chmod 600 {path}")
            key = path.read_bytes().strip()
        except OSError as exc:
            raise StateError(f"{path}: cannot read the vault password file: {exc.strerror}") from None
        if len(key) < 16:
            raise StateError(f"{path}: the vault password is shorter than 16 bytes; use a long random value")
        return key, path, False
    if os.environ.get(ENV_KEY_FILE) or not create:
        raise StateError(f"{path}: vault password file not found; point {ENV_KEY_FILE} at the team's key file")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_urlsafe(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
    return key, path, True


class Vault:
    def __init__(self, key: bytes) -> None:
        from ansible.constants import DEFAULT_VAULT_ID_MATCH
        from ansible.parsing.vault import VaultLib, VaultSecret

        self._lib = VaultLib([(DEFAULT_VAULT_ID_MATCH, VaultSecret(key))])

    def encrypt(self, data: bytes) -> bytes:
        return self._lib.encrypt(data)

    def decrypt(self, data: bytes, where: str) -> bytes:
        from ansible.errors import AnsibleError

        try:
            return self._lib.decrypt(data)
        except AnsibleError:
            raise StateError(f"{where}: cannot decrypt with the vault password in {key_file_path()}; "
                             f"is {ENV_KEY_FILE} pointing at this team's key?") from None
