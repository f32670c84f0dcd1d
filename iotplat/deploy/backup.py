"""`iotplat backup` / `iotplat restore`: one encrypted, checksummed archive with everything to bring a platform back.

The archive is an ansible-vault encrypted tar (the operator's vault key; AES256 + HMAC, so any tampering is
refused before anything is read) holding:

    archive.json                  platform, environment, time, iotplat version, sha256 of every member below
    state.tar                     the state directory (CA and keys, credentials with their hashes, manifests)
    influxdb.tar                  InfluxDB's own portable backup: `influxd backup -portable` of the platform's
                                  database (1.x), or `influx backup` of the whole instance with the operator
                                  token (2.x, restored with `influx restore --full`: its v1 authorizations,
                                  bucket and DBRP mapping come back as they were)
    mosquitto.db                  the broker's persistence file (queued messages, sessions), saved by SIGUSR1
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
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from iotplat import __version__
from iotplat.errors import InvalidInput, IotplatError
from iotplat.hosts import Host
from iotplat.secrets.vault import Vault, key_file_path

FORMAT = 1
REMOTE_DIR = "/var/lib/iotplat-backup"
# State files bound to the hosts of one deployment, never restored: the pinned SSH host keys (fresh hosts have new
# ones), the record of the last deploy and its manifest (the hosts it names are gone).
HOST_BOUND = ("known_hosts", "deployed.json", "manifest.json")
# Bound to the cloud account and target of the archive: not restored when the platform moves (--move).
TARGET_BOUND = ("pulumi", "pulumi-passphrase")


def _ssh(host: Host, script: str, *, stdin: bytes | None = None, timeout: float = 600) -> bytes:
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


def _influx2_env(p: Any, host: str) -> str:
    """Shell prefix for the `influx` CLI on the InfluxDB 2 host: the operator token comes from its root-only
    credential file into the environment (never into argv), TLS is checked against the platform CA.
    NOTE: InfluxDB 2 cannot be installed on the development machines; this path is not exercised by tests."""
    from iotplat.render.layout import CREDENTIALS_DIR, PATHS

    url = f"https://{host}.{p.spec.network.domain}:{p.spec.influxdb.port}"
    return (f"command -v influx >/dev/null || {{ echo 'the influx CLI is missing on {host}: apt-get install "
            f"influxdb2-cli' >&2; exit 1; }}; export INFLUX_HOST={url} SSL_CERT_FILE={PATHS['ca_cert']} "
            f"INFLUX_TOKEN=\"$(cat {CREDENTIALS_DIR}/influxdb/admin-token)\"; ")


def create(ctx: Any, hosts: list[Host], dest: Path, progress=print) -> dict[str, Any]:
    p = ctx.platform
    v2 = p.spec.influxdb.version == 2
    by_name = {h.name: h for h in hosts}
    members: dict[str, bytes] = {}
    members["state.tar"] = _tar_dir(ctx.state.dir)
    influx = by_name[p.host_of("influxdb")]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    remote = f"{REMOTE_DIR}/{stamp}"
    if v2:
        progress(f"  influxdb: influx backup (whole instance) on {influx.name}")
        dump = f"{_influx2_env(p, influx.name)}influx backup {remote} >/dev/null"
    else:
        progress(f"  influxdb: portable backup of {p.influx_database} on {influx.name}")
        dump = f"influxd backup -portable -database {p.influx_database} -host 127.0.0.1:8088 {remote} >/dev/null 2>&1"
    members["influxdb.tar"] = _ssh(influx, (
        f"set -e; rm -rf {remote}; mkdir -p {remote}; {dump}; tar -C {remote} -cf - . ; rm -rf {remote}"))
    broker = by_name[p.host_of("broker")]
    progress(f"  broker: persistence file from {broker.name}")
    members["mosquitto.db"] = _ssh(broker, (
        "set -e; f=/var/lib/mosquitto/mosquitto.db; old=$(stat -c %Y $f 2>/dev/null || echo 0); "
        "systemctl kill --kill-whom=main -s USR1 mosquitto; i=0; "
        "while [ $i -lt 50 ] && [ \"$(stat -c %Y $f 2>/dev/null || echo 0)\" = \"$old\" ]; do sleep 0.1; i=$((i+1)); done; "
        "cat $f"))
    deployed = ctx.state.read_json("deployed.json") or {}
    if p.placement["grafana"] and deployed.get("grafana", {}).get("deployed"):
        grafana = by_name[p.host_of("grafana")]
        members["grafana.db"] = _ssh(grafana, "cat /var/lib/grafana/grafana.db")
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


def open_archive(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Verify and unpack an archive: checksum file (if present), vault HMAC, every member's sha256."""
    try:
        sealed = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the archive: {exc.strerror}") from None
    sums = path.with_name(path.name + ".sha256")
    if sums.exists() and sums.read_text().split()[0] != hashlib.sha256(sealed).hexdigest():
        raise InvalidInput(f"{path}: the archive does not match its checksum file {sums.name}; refusing to restore")
    try:
        raw = Vault(key_file_path().read_bytes().strip()).decrypt(sealed, str(path))
    except Exception as exc:  # noqa: BLE001 - any failure here means tampered, truncated or the wrong key
        raise InvalidInput(f"{path}: the archive failed its integrity check (tampered, truncated, or another vault "
                           f"key): {str(exc).split(';')[0]}") from None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r") as tar:
            for m in tar.getmembers():
                f = tar.extractfile(m)
                if f is not None:
                    members[m.name] = f.read()
        info = json.loads(members.pop("archive.json"))
    except (tarfile.TarError, KeyError, ValueError):
        raise InvalidInput(f"{path}: not an iotplat backup archive (no readable archive.json)") from None
    if info.get("format") != FORMAT:
        raise InvalidInput(f"{path}: archive format {info.get('format')!r} is not supported by this iotplat")
    for name, digest in info["members"].items():
        if hashlib.sha256(members.get(name, b"")).hexdigest() != digest:
            raise InvalidInput(f"{path}: member {name} does not match its checksum; refusing to restore")
    return info, members


def check_fits(info: dict[str, Any], platform: Any, move: bool = False) -> None:
    """Refuse, before anything changes, an archive of another platform or of another InfluxDB major version, and
    one of another environment unless the platform is being moved there (`move`)."""
    if info["platform"] != platform.name or (info["environment"] != platform.environment and not move):
        hint = (f"; to move {info['platform']}/{info['environment']} into environment {platform.environment} (e.g. "
                "onto another target), pass --move" if info["platform"] == platform.name else "")
        raise InvalidInput(f"the archive is of {info['platform']}/{info['environment']}, not "
                           f"{platform.name}/{platform.environment}{hint}")
    if info["influxdb"]["version"] != platform.spec.influxdb.version:
        raise InvalidInput(f"the archive holds an InfluxDB {info['influxdb']['version']} backup but the spec deploys "
                           f"InfluxDB {platform.spec.influxdb.version}; restore onto a platform of the same version")


def restore_state(info: dict[str, Any], members: dict[str, bytes], state_dir: Path, platform: str, env: str,
                  move: bool = False) -> None:
    if info["platform"] != platform or (info["environment"] != env and not move):
        raise InvalidInput(f"the archive is of {info['platform']}/{info['environment']}, not {platform}/{env}")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    skip = HOST_BOUND + (TARGET_BOUND if move else ())
    with tarfile.open(fileobj=io.BytesIO(members["state.tar"]), mode="r") as tar:
        keep = [m for m in tar.getmembers() if m.name.split("/", 1)[0] not in skip]
        tar.extractall(state_dir, members=keep, filter="data")
    for name in HOST_BOUND:  # the deploy record of what was there before the restore is stale too
        (state_dir / name).unlink(missing_ok=True)


def restore_data(ctx: Any, hosts: list[Host], info: dict[str, Any], members: dict[str, bytes], progress=print) -> None:
    from iotplat.spec.platform_model import INFLUX_ADMIN_USER
    from iotplat.verify.status import _Ctx, influx_query

    p = ctx.platform
    by_name = {h.name: h for h in hosts}
    workers = sorted({r.host for r in p.replicas})
    for w in workers:  # no writes while the database is replaced
        units = " ".join(f"iotplat-worker@{r.number}" for r in p.replicas_on(w))
        _ssh(by_name[w], f"systemctl stop {units}")
    influx = by_name[p.host_of("influxdb")]
    remote = f"{REMOTE_DIR}/restore"
    if p.spec.influxdb.version == 2:
        progress(f"  influxdb: influx restore --full on {influx.name}")
        load = f"{_influx2_env(p, influx.name)}influx restore --full {remote} >/dev/null"
    else:
        from iotplat.hosts.tunnel import forward

        ca = _Ctx(ctx.materials.ca_cert_pem)
        try:
            admin_pw = ctx.materials.secrets["influxdb_admin_password"]
            with forward(influx, p.spec.influxdb.port) as (address, port):  # InfluxDB is internal: through SSH
                influx_query(p, address, ca.context(), INFLUX_ADMIN_USER, admin_pw,
                             f'DROP DATABASE "{p.influx_database}"', method="POST", port=port)
        finally:
            ca.close()
        progress(f"  influxdb: restoring {p.influx_database} on {influx.name}")
        load = f"influxd restore -portable -db {info['influxdb']['database']} -host 127.0.0.1:8088 {remote} >/dev/null"
    _ssh(influx, f"set -e; rm -rf {remote}; mkdir -p {remote}; tar -C {remote} -xf -; {load}; rm -rf {remote}",
         stdin=members["influxdb.tar"])
    broker = by_name[p.host_of("broker")]
    progress(f"  broker: persistence file on {broker.name}")
    _ssh(broker, ("set -e; systemctl stop mosquitto; cat > /var/lib/mosquitto/mosquitto.db; "
                  "chown mosquitto:mosquitto /var/lib/mosquitto/mosquitto.db; chmod 0600 /var/lib/mosquitto/mosquitto.db; "
                  "systemctl start mosquitto"), stdin=members["mosquitto.db"])
    if "grafana.db" in members and p.placement["grafana"]:
        g = by_name[p.host_of("grafana")]
        _ssh(g, ("set -e; systemctl stop grafana-server; cat > /var/lib/grafana/grafana.db; "
                 "chown grafana:grafana /var/lib/grafana/grafana.db; systemctl start grafana-server"), stdin=members["grafana.db"])
    for w in workers:
        units = " ".join(f"iotplat-worker@{r.number}" for r in p.replicas_on(w))
        _ssh(by_name[w], f"systemctl start {units}")
