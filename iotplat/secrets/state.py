"""The state directory: everything iotplat keeps about one platform + environment.

    <root>/<platform>/<environment>/
        secrets.vault     CA + keys, server certificates, generated service secrets   (ansible-vault)
        mqtt-users.vault  every MQTT user's password and cached $7$ hash             (ansible-vault)
        manifest.json     the manifest of the last successful deploy
        lock              flock()ed by operations that change hosts (up, destroy, rotate)
        pulumi/           Pulumi's local state backend for the cloud targets

Files are 0600, directories 0700. <root> is --state-dir, else $IOTPLAT_STATE_DIR, else the spec's
state.dir (relative to the spec), else ~/.local/state/iotplat. Point a team at one shared <root>
(and one vault key) to work on the same platforms.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from iotplat.errors import StateError
from iotplat.secrets.vault import Vault, load_or_create_key

STATE_FORMAT = 1
ENV_STATE_DIR = "IOTPLAT_STATE_DIR"


def default_state_root() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "iotplat"


def resolve_state_root(cli_value: str | None, spec_value: str | None, spec_dir: Path) -> Path:
    if cli_value:
        return Path(cli_value)
    if os.environ.get(ENV_STATE_DIR):
        return Path(os.environ[ENV_STATE_DIR])
    if spec_value:
        p = Path(spec_value)
        return p if p.is_absolute() else spec_dir / p
    return default_state_root()


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _make_private_dirs(directory: Path) -> None:
    """Create `directory` and every missing parent 0700 (whatever the umask); folders that exist are left as
    they are (the environment's own folder is then set 0700 by the caller)."""
    missing: list[Path] = []
    p = directory
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # created meanwhile by another run: not ours to change
        os.chmod(d, 0o700)


class State:
    """Load with State.open(); mutate through the accessors; persist with save()."""

    FILES = {"secrets": "secrets.vault", "users": "mqtt-users.vault"}

    def __init__(self, directory: Path, vault: Vault) -> None:
        self.dir = directory
        self._vault = vault
        self._docs: dict[str, dict[str, Any]] = {}
        self._dirty: set[str] = set()
        self.key_created_at: Path | None = None

    @classmethod
    def open(cls, root: Path, platform: str, environment: str) -> State:
        key, key_path, created = load_or_create_key()
        directory = root / platform / environment
        try:
            _make_private_dirs(directory)
            os.chmod(directory, 0o700)
        except OSError as exc:
            raise StateError(f"{directory}: cannot create the state directory: {exc.strerror}") from None
        state = cls(directory, Vault(key))
        if created:
            state.key_created_at = key_path
        return state

    # ---- documents
    def doc(self, name: str) -> dict[str, Any]:
        if name not in self._docs:
            path = self.dir / self.FILES[name]
            if path.exists():
                raw = self._vault.decrypt(path.read_bytes(), str(path))
                try:
                    data = json.loads(raw)
                except ValueError:
                    raise StateError(f"{path}: corrupt state file (not JSON after decryption)") from None
                if data.get("format") != STATE_FORMAT:
                    raise StateError(f"{path}: state format {data.get('format')!r} is not supported by this iotplat")
            else:
                data = {"format": STATE_FORMAT}
            self._docs[name] = data
        return self._docs[name]

    def mark(self, name: str) -> None:
        self._dirty.add(name)

    def save(self) -> None:
        for name in sorted(self._dirty):
            data = json.dumps(self._docs[name], sort_keys=True, separators=(",", ":")).encode()
            _write_private(self.dir / self.FILES[name], self._vault.encrypt(data))
        self._dirty.clear()

    # ---- plain (non-secret) files
    def write_json(self, name: str, data: Any) -> None:
        _write_private(self.dir / name, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")

    def read_json(self, name: str) -> Any | None:
        path = self.dir / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise StateError(f"{path}: corrupt JSON; restore it from a backup or delete it") from None

    # ---- identity
    def identity(self) -> str:
        """A random id of this state directory (created once): what iotplat records as the owner of hosts it
        creates, so another state that uses the same platform name cannot take them over or remove them."""
        path = self.dir / "id"
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            value = ""
        if len(value) != 32:
            value = os.urandom(16).hex()
            _write_private(path, (value + "\n").encode())
        return value

    # ---- lock
    @contextlib.contextmanager
    def lock(self, operation: str) -> Iterator[None]:
        path = self.dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise StateError(f"{self.dir}: locked by {holder}; wait for it to finish "
                                 "(the lock is released when that process exits)") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"iotplat {operation} (pid {os.getpid()}, since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})".encode(), 0)
            yield
        finally:
            os.close(fd)
