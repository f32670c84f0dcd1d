"""Pulumi's DIY ("file://") backend, loosely: stack checkpoints, the selected stack, locks, the passphrase.

Layout as Pulumi 3.x writes it for project-scoped stacks: `<dir>/.pulumi/meta.yaml`,
`.pulumi/stacks/<project>/<stack>.json` (`{"version": 3, "checkpoint": {"stack", "latest": {"manifest",
"secrets_providers", "resources"}}}`), `.pulumi/history/<project>/<stack>/*.history.json`,
`.pulumi/locks/<project>/<stack>/*.json`. The selected stack is kept here too (real Pulumi keeps it under
~/.pulumi/workspaces; the tests must not touch HOME).

The passphrase secrets manager is emulated, not reimplemented: a stack's `encryptionsalt` is
`v1:<salt>:v1:<nonce>:<check>`, where check is an HMAC of "pulumi" under a PBKDF2 key of the passphrase, so a
wrong passphrase is detected as Pulumi detects it; the values are not Pulumi's AES-GCM ciphertexts.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PASSPHRASE_MISSING = ("passphrase must be set with PULUMI_CONFIG_PASSPHRASE or PULUMI_CONFIG_PASSPHRASE_FILE "
                      "environment variables")
INCORRECT = ("incorrect passphrase, please set PULUMI_CONFIG_PASSPHRASE to the correct passphrase or set "
             "PULUMI_CONFIG_PASSPHRASE_FILE to a file containing the passphrase")
CLI_VERSION = "3.190.0"


class CliError(Exception):
    """An error the CLI reports as `error: <message>` with exit code 255."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def backend_dir(env: dict[str, str]) -> Path:
    url = env.get("PULUMI_BACKEND_URL", "")
    if not url:
        raise CliError("PULUMI_ACCESS_TOKEN must be set for login during non-interactive CLI sessions")
    if not url.startswith("file://"):
        raise CliError(f"problem logging in: the emulated cloud only has the DIY file backend, not {url}")
    path = Path(url[len("file://"):] or "/")
    if str(path).startswith("~"):
        path = path.expanduser()
    if not path.is_dir():
        raise CliError(f"problem logging in: unable to open bucket {url}: open {path}: no such file or directory")
    return path.resolve()


# --- passphrase --------------------------------------------------------------------------------------------


def read_passphrase(env: dict[str, str]) -> str:
    if "PULUMI_CONFIG_PASSPHRASE" in env:
        return env["PULUMI_CONFIG_PASSPHRASE"]
    path = env.get("PULUMI_CONFIG_PASSPHRASE_FILE", "")
    if path:
        full = os.path.abspath(path)
        try:
            return Path(full).read_text().strip()
        except OSError as exc:
            reason = "no such file or directory" if isinstance(exc, FileNotFoundError) else (
                "is a directory" if isinstance(exc, IsADirectoryError) else exc.strerror or str(exc))
            raise CliError(f"unable to read PULUMI_CONFIG_PASSPHRASE_FILE: open {full}: {reason}") from None
    raise CliError(PASSPHRASE_MISSING)


def _check(passphrase: str, salt: bytes, nonce: bytes) -> str:
    key = hashlib.pbkdf2_hmac("sha256", passphrase.encode(), salt, 20_000)
    return base64.b64encode(hmac.new(key, nonce + b"pulumi", hashlib.sha256).digest()[:16]).decode()


def new_salt(passphrase: str) -> str:
    salt, nonce = os.urandom(8), os.urandom(12)
    return (f"v1:{base64.b64encode(salt).decode()}:v1:{base64.b64encode(nonce).decode()}:"
            f"{_check(passphrase, salt, nonce)}")


def verify(passphrase: str, encryption_salt: str) -> None:
    try:
        _, salt, _, nonce, check = encryption_salt.split(":")
        ok = hmac.compare_digest(_check(passphrase, base64.b64decode(salt), base64.b64decode(nonce)), check)
    except ValueError:
        raise CliError(f"constructing secrets manager of type \"passphrase\": bad encryption salt "
                       f"{encryption_salt!r}") from None
    if not ok:
        raise CliError(f"constructing secrets manager of type \"passphrase\": {INCORRECT}")


_SALT_RE = re.compile(r"^encryptionsalt:\s*(\S+)\s*$", re.M)


def salt_in(path: Path) -> str | None:
    try:
        m = _SALT_RE.search(path.read_text())
    except OSError:
        return None
    return m.group(1) if m else None


def save_salt(path: Path, salt: str) -> None:
    """What Pulumi does when a stack config file has no secrets manager yet: it writes `encryptionsalt:` into it
    (for `--config-file F`, into F; otherwise into Pulumi.<stack>.yaml in the project dir). Pulumi re-serialises
    the whole YAML; the double only puts the line on top, so the rest of the file stays readable."""
    text = path.read_text() if path.exists() else ""
    if _SALT_RE.search(text):
        text = _SALT_RE.sub(f"encryptionsalt: {salt}", text)
    else:
        text = f"encryptionsalt: {salt}\n" + text
    path.write_text(text)


# --- stacks ------------------------------------------------------------------------------------------------


class Backend:
    def __init__(self, root: Path, project: str) -> None:
        self.root = root
        self.project = project
        self.meta = root / ".pulumi"

    def stack_file(self, stack: str) -> Path:
        return self.meta / "stacks" / self.project / f"{stack}.json"

    def exists(self, stack: str) -> bool:
        return self.stack_file(stack).is_file()

    def stacks(self) -> list[str]:
        folder = self.meta / "stacks" / self.project
        return sorted(p.name[:-5] for p in folder.glob("*.json")) if folder.is_dir() else []

    def load(self, stack: str) -> dict[str, Any]:
        path = self.stack_file(stack)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise CliError(f"no stack named '{stack}' found") from None
        except ValueError as exc:
            raise CliError(f"could not deserialize deployment: {path}: {exc}") from None

    def resources(self, stack: str) -> list[dict[str, Any]]:
        latest = self.load(stack)["checkpoint"].get("latest") or {}
        return list(latest.get("resources") or [])

    def save(self, stack: str, resources: list[dict[str, Any]], salt: str | None = None) -> None:
        doc = self.load(stack) if self.exists(stack) else None
        latest = (doc or {}).get("checkpoint", {}).get("latest") or {}
        providers = latest.get("secrets_providers") or {}
        if salt:
            providers = {"type": "passphrase", "state": {"salt": salt}}
        new = {
            "version": 3,
            "checkpoint": {
                "stack": f"organization/{self.project}/{stack}",
                "latest": {
                    "manifest": {"time": now(), "magic": uuid.uuid4().hex, "version": f"v{CLI_VERSION}"},
                    "secrets_providers": providers,
                    "resources": resources,
                },
            },
        }
        path = self.stack_file(stack)
        path.parent.mkdir(parents=True, exist_ok=True)
        (self.meta / "meta.yaml").write_text("version: 1\n")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(new, indent=4) + "\n")
        if path.exists():  # Pulumi keeps the previous checkpoint as <stack>.json.bak
            path.replace(path.with_name(path.name + ".bak"))
        tmp.replace(path)

    def state_salt(self, stack: str) -> str | None:
        latest = self.load(stack)["checkpoint"].get("latest") or {}
        return ((latest.get("secrets_providers") or {}).get("state") or {}).get("salt")

    def remove(self, stack: str) -> None:
        for path in (self.stack_file(stack), self.stack_file(stack).with_name(f"{stack}.json.bak")):
            path.unlink(missing_ok=True)
        if self.current() == stack:
            self.select(None)

    def history(self, stack: str, kind: str, result: str, changes: dict[str, int], start: str) -> None:
        folder = self.meta / "history" / self.project / stack
        folder.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d%H%M%S%f")
        (folder / f"{stack}-{stamp}.history.json").write_text(json.dumps(
            {"kind": kind, "result": result, "startTime": start, "endTime": now(), "resourceChanges": changes},
            indent=4) + "\n")

    def last_update(self, stack: str) -> str | None:
        latest = self.load(stack)["checkpoint"].get("latest") or {}
        stamp = (latest.get("manifest") or {}).get("time")
        if not stamp:
            return None
        t = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"

    # the selected stack (per backend + project)
    def _current_file(self) -> Path:
        return self.meta / "cloudsim-workspace.json"

    def current(self) -> str | None:
        try:
            return json.loads(self._current_file().read_text()).get(self.project)
        except (OSError, ValueError):
            return None

    def select(self, stack: str | None) -> None:
        try:
            data = json.loads(self._current_file().read_text())
        except (OSError, ValueError):
            data = {}
        data[self.project] = stack
        self.meta.mkdir(parents=True, exist_ok=True)
        self._current_file().write_text(json.dumps(data) + "\n")

    @contextlib.contextmanager
    def lock(self, stack: str) -> Iterator[None]:
        """Pulumi refuses a second update of a stack while one runs (a lock file per update)."""
        folder = self.meta / "locks" / self.project / stack
        folder.mkdir(parents=True, exist_ok=True)
        guard = os.open(folder.parent / f".{stack}.flock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = [p.name for p in folder.glob("*.json")]
                raise CliError(
                    f"the stack is currently locked by {len(held) or 1} lock(s). Either wait for the other "
                    f"process(es) to end or delete the lock file with `pulumi cancel`.\n"
                    + "".join(f"  {folder / h}\n" for h in held)) from None
            lock_file = folder / f"{uuid.uuid4()}.json"
            lock_file.write_text(json.dumps({"pid": os.getpid(), "timestamp": now()}) + "\n")
            try:
                yield
            finally:
                lock_file.unlink(missing_ok=True)
        finally:
            os.close(guard)
