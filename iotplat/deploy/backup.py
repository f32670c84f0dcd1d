"""`iotplat backup` / `iotplat restore`: one encrypted, checksummed archive with everything to bring a platform back.

The archive is an ansible-vault encrypted tar (the operator's vault key; AES256 + HMAC, so any tampering is
refused before anything is read) holding the state directory and what each service's backup hook contributes
(iotplat.services: `Service.backup` / `restore`; the built-in services' members are):

    archive.json                  platform, environment, time, iotplat version, sha256 of every member below
    state.tar                     the state directory (CA and keys, credentials with their hashes, manifests)
    influxdb.tar                  InfluxDB's own portable backup: `influxd backup -portable` of the platform's
                                  database (1.x), or `influx backup` of the whole instance with the operator
                                  token (2.x, restored with `influx restore --full`: its v1 authorizations,
                                  bucket and DBRP mapping come back as they were)
    mosquitto.db                  the broker's persistence file (queued messages, sessions), saved by SIGUSR1;
                                  none on broker.engine nats: the backup first waits until the worker acknowledged
                                  every message the stream held when it started (so InfluxDB's backup has them)
    grafana.db                    Grafana's database, when Grafana runs

Restore goes onto freshly deployed hosts: the state comes back first (so `up` installs the old credentials
and certificates and devices reconnect unchanged), then the database is replaced with the backup, then the
broker's persistence file, then `up` re-applies users and grants and `status` proves the result.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from iotplat import __version__
from iotplat.errors import InvalidInput, IotplatError
from iotplat.hosts import Host
from iotplat.secrets.vault import Vault, key_file_path

if TYPE_CHECKING:
    from iotplat.deploy.ops import Context
    from iotplat.spec.platform_model import Platform

Progress = Callable[[str], None]

FORMAT = 1
REMOTE_DIR = "/var/lib/iotplat-backup"
# State files bound to the hosts of one deployment, never restored: the pinned SSH host keys (fresh hosts have new
# ones), the record of the last deploy and its manifest (the hosts it names are gone).
HOST_BOUND = ("known_hosts", "deployed.json", "manifest.json")
# Bound to the cloud account and target of the archive: not restored when the platform moves (--move).
TARGET_BOUND = ("pulumi", "pulumi-passphrase")


def run_on(host: Host, script: str, *, stdin: bytes | None = None, timeout: float = 600) -> bytes:
    """Run a shell script as root on `host` (over SSH, with sudo); its stdout. A failure names the host."""
    proc = subprocess.run(host.remote_argv(["sudo", "sh", "-c", script]), input=stdin, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.decode(errors="replace").strip().splitlines() or ["ssh failed"])[-1]
        raise IotplatError(f"{host.name}: {tail}")
    return proc.stdout


def _tar_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if rel == "lock" or rel.startswith("run/") or rel == "run":
                continue
            tar.add(p, arcname=rel, recursive=False)
    return buf.getvalue()


def create(ctx: Context, hosts: list[Host], dest: Path, progress: Progress = print) -> dict[str, Any]:
    """The archive: the state directory, then each placed service's members (its own backup hook), sealed."""
    from iotplat.services import placed

    p = ctx.platform
    by_name = {h.name: h for h in hosts}
    members: dict[str, bytes] = {"state.tar": _tar_dir(ctx.state.dir)}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for svc in placed(p):
        host = by_name[p.host_of(svc.name)]
        got = svc.backup(ctx, host)
        if got:
            progress(f"  {svc.name}: {', '.join(sorted(got))} from {host.name}")
        members.update(got)
    info = {
        "format": FORMAT, "platform": p.name, "environment": p.environment, "created": stamp, "iotplat": __version__,
        "influxdb": {"version": p.spec.influxdb.version, "database": p.influx_database, "bucket": p.influx_bucket},
        "members": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(members.items())},
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("archive.json", json.dumps(info, indent=2, sort_keys=True).encode()), *sorted(members.items())]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o600
            tar.addfile(ti, io.BytesIO(data))
    vault = Vault(key_file_path().read_bytes().strip())
    sealed = vault.encrypt(buf.getvalue())
    dest = dest if dest.suffix == ".iotplat-backup" else dest / f"{p.name}-{p.environment}-{stamp}.iotplat-backup"
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(sealed)
    digest = hashlib.sha256(sealed).hexdigest()
    dest.with_name(dest.name + ".sha256").write_text(f"{digest}  {dest.name}\n")
    return {"archive": str(dest), "sha256": digest, "bytes": len(sealed), "members": info["members"]}


MAX_ARCHIVE_BYTES = 8 * 1024**3  # read whole into memory (ansible-vault is not a stream): refuse larger files
MAX_SUMS_BYTES = 4096
_SHA256_HEX = frozenset("0123456789abcdef")
# what `restore` needs from every archive; the services add theirs for the platform (Service.restore_members, checked
# by check_fits: Mosquitto's mosquitto.db; nothing on nats). grafana.db is optional.
RESTORE_MEMBERS = ("state.tar", "influxdb.tar")


def _read_regular(path: Path, limit: int, what: str) -> bytes:
    """Read a regular file of at most `limit` bytes: never a device (/dev/zero), FIFO or folder, never unbounded."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the {what}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"{path}: the {what} is not a regular file; give the .iotplat-backup file `iotplat "
                               "backup` wrote")
        if st.st_size > limit:
            raise InvalidInput(f"{path}: the {what} is larger than {limit:,} bytes; this is not an iotplat backup")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the {what}: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise InvalidInput(f"{path}: the {what} is larger than {limit:,} bytes; this is not an iotplat backup")
    return data


def _expected_digest(sums: Path) -> str:
    """The sha256 in a `<sha256>  <name>` checksum file (sha256sum's format)."""
    raw = _read_regular(sums, MAX_SUMS_BYTES, "checksum file")
    try:
        fields = raw.decode("ascii").split()
    except UnicodeDecodeError:
        fields = []
    digest = fields[0].lower() if fields else ""
    if len(digest) != 64 or not set(digest) <= _SHA256_HEX:
        raise InvalidInput(f"{sums}: not a checksum file (expected `<64 hex digits>  <archive name>`, as `iotplat "
                           "backup` writes it); restore it or remove it, then run the command again")
    return digest


def _check_info(path: Path, info: object) -> dict[str, Any]:
    """archive.json: the keys restore reads, with their types (an archive is untrusted input until checked)."""
    def bad(what: str) -> InvalidInput:
        return InvalidInput(f"{path}: not an iotplat backup archive (archive.json: {what})")

    if not isinstance(info, dict):
        raise bad("not a JSON object")
    if info.get("format") != FORMAT:
        raise InvalidInput(f"{path}: archive format {info.get('format')!r} is not supported by this iotplat")
    for key in ("platform", "environment", "created"):
        if not isinstance(info.get(key), str):
            raise bad(f"no `{key}` string")
    members = info.get("members")
    if not isinstance(members, dict) or not members:
        raise bad("no `members` with their sha256")
    for name, digest in members.items():
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
            raise bad(f"member {name!r} has no sha256")
    missing = [m for m in RESTORE_MEMBERS if m not in members]
    if missing:
        raise bad(f"no {missing[0]} member")
    return info


def check_state_tar(path: Path, data: bytes) -> list[tarfile.TarInfo]:
    """Every member of the state's tar, checked before any is extracted: regular files and folders only, each
    inside the state directory (tarfile's `data` filter rules), no duplicates."""
    dest = "/iotplat-state-check"
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
    except tarfile.TarError as exc:
        raise InvalidInput(f"{path}: the archive's state.tar is not readable ({exc}); refusing to restore") from None
    seen: set[str] = set()
    for m in members:
        if not (m.isfile() or m.isdir()):
            raise InvalidInput(f"{path}: state.tar member {m.name!r} is not a file or folder; refusing to restore")
        parts = m.name.split("/")
        if m.name.startswith("/") or ".." in parts or "\0" in m.name:
            raise InvalidInput(f"{path}: state.tar member {m.name!r} points outside the state directory; refusing to "
                               "restore")
        try:
            tarfile.data_filter(m, dest)
        except tarfile.FilterError as exc:
            raise InvalidInput(f"{path}: state.tar member {m.name!r} is refused ({exc}); refusing to restore") from None
        name = os.path.normpath(m.name)
        if name in seen:
            raise InvalidInput(f"{path}: state.tar holds {m.name!r} twice; refusing to restore")
        seen.add(name)
    return members


def open_archive(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Verify and unpack an archive: checksum file (if present), vault HMAC, archive.json, every member's sha256,
    every member of the state's tar. Any problem is InvalidInput (exit 2), found before anything changes."""
    sealed = _read_regular(path, MAX_ARCHIVE_BYTES, "archive")
    sums = path.with_name(path.name + ".sha256")
    if os.path.lexists(sums) and _expected_digest(sums) != hashlib.sha256(sealed).hexdigest():
        raise InvalidInput(f"{path}: the archive does not match its checksum file {sums.name}; refusing to restore")
    try:
        raw = Vault(key_file_path().read_bytes().strip()).decrypt(sealed, str(path))
    except Exception as exc:  # noqa: BLE001 - any failure here means tampered, truncated or the wrong key
        raise InvalidInput(f"{path}: the archive failed its integrity check (tampered, truncated, or another vault "
                           f"key): {str(exc).split(';')[0]}") from None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for m in tar.getmembers():
                if not m.isfile():
                    raise InvalidInput(f"{path}: archive member {m.name!r} is not a file; refusing to restore")
                if m.name in members:
                    raise InvalidInput(f"{path}: archive member {m.name!r} appears twice; refusing to restore")
                f = tar.extractfile(m)
                members[m.name] = f.read() if f is not None else b""
        info = json.loads(members.pop("archive.json"))
    except (tarfile.TarError, KeyError, ValueError):
        raise InvalidInput(f"{path}: not an iotplat backup archive (no readable archive.json)") from None
    info = _check_info(path, info)
    extra = sorted(set(members) - set(info["members"]))
    if extra:
        raise InvalidInput(f"{path}: member {extra[0]} is not listed in archive.json; refusing to restore")
    for name, digest in info["members"].items():
        if hashlib.sha256(members.get(name, b"")).hexdigest() != digest:
            raise InvalidInput(f"{path}: member {name} does not match its checksum; refusing to restore")
    check_state_tar(path, members["state.tar"])
    return info, members


def check_fits(info: dict[str, Any], platform: Platform, move: bool = False) -> None:
    """Refuse, before anything changes, an archive of another platform or of another InfluxDB major version, and
    one of another environment unless the platform is being moved there (`move`)."""
    if info["platform"] != platform.name or (info["environment"] != platform.environment and not move):
        hint = (f"; to move {info['platform']}/{info['environment']} into environment {platform.environment} (e.g. "
                "onto another target), pass --move" if info["platform"] == platform.name else "")
        raise InvalidInput(f"the archive is of {info['platform']}/{info['environment']}, not "
                           f"{platform.name}/{platform.environment}{hint}")
    influx = info.get("influxdb")
    if not (isinstance(influx, dict) and isinstance(influx.get("version"), int)
            and isinstance(influx.get("database"), (str, type(None)))):
        raise InvalidInput("not an iotplat backup archive (archive.json: no `influxdb` version and database)")
    if influx["version"] != platform.spec.influxdb.version:
        raise InvalidInput(f"the archive holds an InfluxDB {influx['version']} backup but the spec deploys "
                           f"InfluxDB {platform.spec.influxdb.version}; restore onto a platform of the same version")
    from iotplat.services import placed

    for svc in placed(platform):
        missing = [m for m in svc.restore_members(platform) if m not in info["members"]]
        if missing:
            raise InvalidInput(f"the archive has no {missing[0]} member, which the {svc.name} service of "
                               f"{platform.name}/{platform.environment} needs to restore (an archive of a platform "
                               "with another broker engine?)")


def restore_state(info: dict[str, Any], members: dict[str, bytes], state_dir: Path, platform: str, env: str,
                  move: bool = False) -> None:
    if info["platform"] != platform or (info["environment"] != env and not move):
        raise InvalidInput(f"the archive is of {info['platform']}/{info['environment']}, not {platform}/{env}")
    check_state_tar(state_dir, members["state.tar"])  # every member checked before the first is extracted
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    skip = HOST_BOUND + (TARGET_BOUND if move else ())
    with tarfile.open(fileobj=io.BytesIO(members["state.tar"]), mode="r:") as tar:
        keep = [m for m in tar.getmembers() if m.name.split("/", 1)[0] not in skip]
        tar.extractall(state_dir, members=keep, filter="data")
    for name in HOST_BOUND:  # the deploy record of what was there before the restore is stale too
        (state_dir / name).unlink(missing_ok=True)


def restore_data(ctx: Context, hosts: list[Host], info: dict[str, Any], members: dict[str, bytes],
                 progress: Progress = print) -> None:
    """Services that write stop first (quiesce), every service restores its members, then the writers resume."""
    from iotplat.services import placed

    p = ctx.platform
    by_name = {h.name: h for h in hosts}
    services = placed(p)
    on = {svc.name: [by_name[h] for h in p.placement[svc.name]] for svc in services}
    for svc in services:  # no writes while data is replaced
        for host in on[svc.name]:
            svc.quiesce(ctx, host)
    for svc in services:
        host = on[svc.name][0]
        progress(f"  {svc.name}: restoring on {host.name}")
        svc.restore(ctx, host, members, info)
    for svc in services:
        for host in on[svc.name]:
            svc.resume(ctx, host)
