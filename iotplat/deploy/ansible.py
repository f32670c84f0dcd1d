"""Run the rendered Ansible bundle against provisioned hosts.

The invocation (docs/roles.md): the build dir's inventory plus an addresses inventory, the secrets as an
ansible-vault encrypted extra-vars file, both written to a private run folder inside the state
directory (never the build dir) and removed afterwards. Output is streamed as one progress line per task
and host, with every known secret value masked, and the PLAY RECAP is parsed into per-host counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from iotplat.errors import IotplatError
from iotplat.hosts import Host
from iotplat.secrets.materials import Materials, secret_content
from iotplat.secrets.vault import Vault, key_file_path
from iotplat.services import roles_path

_RECAP = re.compile(r"^(?P<host>\S+)\s*:\s*(?P<counts>(?:[a-z]+=\d+\s*)+)$")  # edge : ok=10 changed=1 ... ignored=0
_TASK = re.compile(r"^(TASK|RUNNING HANDLER) \[(.+?)\]")
_RESULT = re.compile(r"^(ok|changed|fatal|failed|skipping|unreachable): \[([^\]]+)\]")
FAILURE_REASON_CHARS = 1200
_URLSAFE = re.compile(r"[A-Za-z0-9_-]+")  # the alphabet of generated secrets (token_urlsafe, hex)
_RUN_MIN = 16
MASK = "********"

Progress = Callable[[str], None]


def failure_reason(line: str) -> str:
    """What a `fatal: [host]: FAILED! => {...}` line says went wrong: the result's `msg` (with the command's
    stderr when it has one), not the JSON around it, so that the reason itself survives the cut to
    FAILURE_REASON_CHARS (a role's own failure message, like the broker's log lines, comes last in its msg)."""
    raw = line.split("=>", 1)[-1].strip()
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:FAILURE_REASON_CHARS]
    if not isinstance(data, dict) or not data.get("msg"):
        return raw[:FAILURE_REASON_CHARS]
    reason = str(data["msg"]).strip()
    stderr = str(data.get("stderr") or "").strip()
    if stderr and stderr not in reason:
        reason += f" (stderr: {stderr})"
    return reason[:FAILURE_REASON_CHARS]


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP of an ansible-playbook output: each host's counts as Ansible prints them (ok, changed,
    unreachable, failed, skipped, rescued, ignored)."""
    recap: dict[str, dict[str, int]] = {}
    in_recap = False
    for line in output.splitlines():
        if line.startswith("PLAY RECAP"):
            in_recap = True
            continue
        m = _RECAP.match(line.strip()) if in_recap else None
        if m:
            recap[m["host"]] = {k: int(v) for k, v in (kv.split("=") for kv in m["counts"].split())}
    return recap


@dataclass
class HostRecap:
    ok: int = 0
    changed: int = 0
    unreachable: int = 0
    failed: int = 0
    skipped: int = 0

    @classmethod
    def of(cls, counts: dict[str, int]) -> HostRecap:
        """From parse_recap's counts of one host (the counts this summary does not keep are left out)."""
        return cls(**{f.name: counts.get(f.name, 0) for f in fields(cls)})


@dataclass
class PlaybookResult:
    returncode: int
    recap: dict[str, HostRecap] = field(default_factory=dict)
    changed_tasks: list[tuple[str, str]] = field(default_factory=list)  # (host, task)
    failures: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def changed(self) -> int:
        return sum(r.changed for r in self.recap.values())

    @property
    def failed(self) -> int:
        return sum(r.failed + r.unreachable for r in self.recap.values())


class Masker:
    """Replaces every known secret value in text with ********, whatever its length or characters.

    Also masked: each line (16+ characters, not the `-----BEGIN` lines) of a multi-line secret such as a PEM key,
    since output arrives line by line, and the JSON-escaped form of a secret with quotes, backslashes or non-ASCII
    characters (Ansible prints task results as JSON).

    Hand-written because no library does this in linear time for 100,000 values: generated secrets (url-safe,
    16+ characters: every device password) are found by set lookups over the text's runs of url-safe characters
    (also inside a longer run, e.g. `password=...`); every other value (a user's secret, key lines, escaped forms)
    by one regular expression of the escaped values, longest first.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        values: set[str] = set()
        for s in secrets:
            if not s:
                continue
            values.add(s)
            if _URLSAFE.fullmatch(s):
                continue  # no other form: the common case (every generated secret)
            if "\n" in s:
                values.update(line.strip() for line in s.splitlines()
                              if len(line.strip()) >= 16 and "-----" not in line)
            escaped = json.dumps(s)[1:-1]
            if escaped != s:
                values.add(escaped)
        self._by_length: dict[int, set[str]] = {}
        others: list[str] = []
        for v in values:
            if len(v) >= _RUN_MIN and _URLSAFE.fullmatch(v):
                self._by_length.setdefault(len(v), set()).add(v)
            else:
                others.append(v)
        self._lengths = sorted(self._by_length, reverse=True)
        self._runs = re.compile(f"[A-Za-z0-9_-]{{{min(self._lengths)},}}") if self._lengths else None
        self._others = (re.compile("|".join(re.escape(v) for v in sorted(others, key=lambda v: (-len(v), v))))
                        if others else None)

    def _run(self, m: re.Match[str]) -> str:
        run = m.group(0)
        n = len(run)
        if run in self._by_length.get(n, ()):
            return MASK
        hits: list[tuple[int, int]] = []
        for length in self._lengths:
            bucket = self._by_length[length]
            hits.extend((i, i + length) for i in range(n - length + 1) if run[i:i + length] in bucket)
        if not hits:
            return run
        out, pos = [], 0
        for start, end in sorted(hits):
            if start >= pos:
                out.append(run[pos:start] + MASK)
            pos = max(pos, end)  # an overlapping hit widens the span the last mask stands for
        out.append(run[pos:])
        return "".join(out)

    def __call__(self, text: str) -> str:
        if self._others is not None:
            text = self._others.sub(MASK, text)
        if self._runs is not None:
            text = self._runs.sub(self._run, text)
        return text

    def finds(self, text: str) -> bool:
        """Does `text` contain a secret value (in any form this masker masks)?"""
        return self(text) != text


def masker_for(materials: Materials) -> Masker:
    return Masker(materials.secret_values())


def addresses_inventory(hosts: list[Host]) -> dict:
    """Where each host is (real addresses exist only here and only at deploy time): how Ansible reaches it, the
    private address the other hosts use for it, and its data disk (if it has one)."""
    out: dict = {}
    for h in hosts:
        entry = {
            "ansible_host": h.address,
            "ansible_user": h.ssh_user,
            "ansible_port": h.ssh_port,
            "ansible_ssh_common_args": h.ssh_extra_args,
            "ansible_become": True,
            "iotplat_private_address": h.internal_address,
        }
        if h.ssh_private_key:
            entry["ansible_ssh_private_key_file"] = h.ssh_private_key
        if h.data_device:
            entry["iotplat_data_device"] = h.data_device
        out[h.name] = entry
    return {"all": {"hosts": out}}


@contextlib.contextmanager
def run_folder(state_dir: Path) -> Iterator[Path]:
    base = state_dir / "run"
    base.mkdir(mode=0o700, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ansible_playbook() -> str:
    exe = Path(sys.executable).with_name("ansible-playbook")
    if exe.exists():
        return str(exe)
    found = shutil.which("ansible-playbook")
    if not found:
        raise IotplatError("ansible-playbook not found; reinstall iotplat (ansible-core is one of its dependencies)")
    return found


def run_playbook(build: Path, hosts: list[Host], materials: Materials, state_dir: Path, wheelhouse: Path | None,
                 *, check: bool = False, limit: str | None = None, skip_tags: str | None = None,
                 extra_vars: dict | None = None, progress: Progress | None = None, playbook: str = "site.yml",
                 timeout: float = 3600) -> PlaybookResult:
    manifest_secrets = _manifest_secrets(build)
    mask = masker_for(materials)
    with run_folder(state_dir) as run:
        addresses = run / "addresses.yml"
        addresses.write_text(yaml.safe_dump(addresses_inventory(hosts), sort_keys=True))
        secrets = {name: secret_content(name, materials).decode() for name in sorted(manifest_secrets)}
        key = key_file_path()
        vault = Vault(key.read_bytes().strip())
        secrets_file = run / "secrets.yml"
        fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(vault.encrypt(yaml.safe_dump({"iotplat_secrets": secrets}).encode()))
        vars_file = run / "vars.yml"
        vars_file.write_text(yaml.safe_dump({
            "iotplat_build_dir": str(build.resolve()),
            "iotplat_worker_wheelhouse": str(wheelhouse.resolve()) if wheelhouse else "",
            **(extra_vars or {}),
        }))
        argv = [ansible_playbook(), "-i", str(build / "ansible" / "inventory.yml"), "-i", str(addresses),
                "-e", f"@{secrets_file}", "-e", f"@{vars_file}", "--vault-password-file", str(key)]
        if check:
            argv += ["--check", "--diff"]
        if limit:
            argv += ["--limit", limit]
        if skip_tags:
            argv += ["--skip-tags", skip_tags]
        argv.append(str(build / "ansible" / playbook))
        env = {
            **os.environ,
            "ANSIBLE_ROLES_PATH": roles_path(),
            "ANSIBLE_CONFIG": str(build / "ansible" / "ansible.cfg"),
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            # host keys are checked by ssh against the pinned known_hosts each Host names (ssh_extra_args)
            "ANSIBLE_HOST_KEY_CHECKING": "True",
            "ANSIBLE_LOCAL_TEMP": str(run / "tmp"),
            "PYTHONUNBUFFERED": "1",
        }
        return _stream(argv, env, mask, progress, timeout)


def _manifest_secrets(build: Path) -> set[str]:
    manifest = json.loads((build / "manifest.json").read_text())
    return {f["secret"] for f in manifest["files"] if f["class"] == "secret"}


def _stream(argv: list[str], env: dict[str, str], mask: Masker, progress: Progress | None,
            timeout: float) -> PlaybookResult:
    result = PlaybookResult(returncode=1)
    lines: list[str] = []
    task = ""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    # The deadline holds while output is still being read: a task that hangs (a dead SSH peer, a stuck
    # package mirror) prints nothing, so a timeout on wait() alone would never fire.
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _kill_session(proc)

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = mask(raw.rstrip("\n"))
            lines.append(line)
            m = _TASK.match(line)
            if m:
                task = m.group(2)
                continue
            m = _RESULT.match(line)
            if m:
                status, host = m.group(1), m.group(2).split(" ")[0]
                if status == "changed":
                    result.changed_tasks.append((host, task))
                if status in ("fatal", "failed", "unreachable"):
                    result.failures.append(f"{host}: {task}: {failure_reason(line)}")
                if progress and status in ("changed", "fatal", "failed", "unreachable"):
                    progress(f"  {host:<12} {status:<9} {task}")
        proc.wait()
    except KeyboardInterrupt:
        _kill_session(proc)
        raise
    finally:
        watchdog.cancel()
    if expired.is_set():
        running = f" during task {task!r}" if task else ""
        raise IotplatError(f"ansible-playbook did not finish within {timeout:.0f}s and was stopped{running}; "
                           "check that every host is reachable over SSH and reaches its package source, then "
                           "run the command again")
    result.returncode = proc.returncode
    result.output = "\n".join(lines)
    result.recap = {host: HostRecap.of(counts) for host, counts in parse_recap(result.output).items()}
    return result


def _kill_session(proc: subprocess.Popen, grace: float = 5) -> None:
    """Stop ansible-playbook and its workers (its own session): TERM, then KILL after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
