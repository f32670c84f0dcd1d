"""The systemd unit that runs a service's container: `container_unit(ContainerService) -> str`.

One unit per service, named like the package runtime's unit (mosquitto.service, influxdb.service,
grafana-server.service, iotplat-worker@N.service), so `status`, `logs`, `rotate` and the roles' handlers address a
service the same way whatever runs it. The unit creates the container (`docker create`, the same options
`docker run` takes), starts it and waits for it (`docker wait` is the unit's main process), and removes it when it
stopped (ExecStopPost, before the stop job ends: `--rm` removes asynchronously after `docker stop` returns, and a
restart's `docker create` then found the name still taken, moby/moby#37698); systemd restarts it:

- `--pull never`: a unit never contacts a registry; images are loaded (verified archive) or pulled (by digest) by
  the deployment before the unit starts, and the unit names the image by its ID (`sha256:<config digest>`) or its
  pinned reference, never by tag.
- `--init` (docker's tini as PID 1: signals forwarded, zombies reaped) and `--log-driver journald` with the
  container's name as its tag and the label OBJECT_SYSTEMD_UNIT=<unit> passed into every entry: `journalctl -u
  <unit>` (and so `iotplat logs`) shows the service's output, because journalctl -u includes entries a root daemon
  writes with OBJECT_SYSTEMD_UNIT=<unit>; `docker logs` reads the same entries. Measured: a foreground
  `docker run` would put every line into the journal twice (the attached client's copy and the driver's), and
  `docker run --attach stdin` does not wait for the container.
- `--network host`: the service listens exactly where its rendered config says, and the host's nftables firewall
  stays the only gatekeeper, as for a package; no port is published, no NAT or docker-proxy sits in front, and
  dockerd runs without touching the firewall (engine.daemon_json(): iptables off, no bridge). `ports` lists what
  the service listens on, for the reader and for checks.
- no `--privileged`; `--cap-drop ALL` plus only the listed capabilities (a closed set);
  `--security-opt no-new-privileges`; `--read-only` root with tmpfs where the service must write.
- files as read-only bind mounts (`--mount`, which fails when the source is missing, unlike `-v`): the rendered
  service files at their usual paths -- the same bytes as the package runtime -- and the secrets, root-only files
  on the host, at their paths. No secret is ever an environment variable, so none shows in `docker inspect`.
- data in named host directories, read-write, owned by the container's user id (the deployment chowns them).
- resource limits from typed inputs (spec `resources`): --memory with --memory-swap equal to it (no swap), --cpus,
  --pids-limit. `limits_dropin` gives a package's unit the same limits as a systemd drop-in.

Every value that reaches the unit is a closed value (checked against the whole string) or escaped for systemd:
ExecStart is a word list systemd splits itself (no shell): words outside a plain character set are double-quoted
with `\\`, `"` escaped and `%`, `$` doubled (systemd's specifier and variable expansion); control characters are
refused. A template unit (worker replicas) writes `{instance}` where systemd's `%i` belongs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from iotplat.errors import IotplatError

DOCKER = "/usr/bin/docker"
INSTANCE = "{instance}"  # becomes %i in a template unit

# Linux capability names docker accepts (capabilities(7)), without the CAP_ prefix: the closed set a unit may add.
CAPABILITIES = frozenset({
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE",
    "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT", "IPC_LOCK", "SYS_RESOURCE",
})
SIGNALS = frozenset({"HUP", "USR1", "USR2", "TERM", "INT", "QUIT"})

_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\-]+@?\.service")
_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")  # docker's container name rule, bounded
_PATH_RE = re.compile(r"/(?:[A-Za-z0-9._-]+/)*[A-Za-z0-9._-]*")
_USER_RE = re.compile(r"[0-9]{1,10}(?::[0-9]{1,10})?")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_IMAGE_RE = re.compile(r"sha256:[a-f0-9]{64}|[a-z0-9][a-z0-9._:/-]{0,254}@sha256:[a-f0-9]{64}")
_SAFE_WORD = re.compile(r"[A-Za-z0-9_./:=@,+-]+")
_SECRET_HINTS = ("password", "secret", "token", "key")


class UnitValueError(IotplatError):
    """A value a unit cannot hold safely. Callers pass closed values (the spec schema refuses the rest), so this
    is an iotplat bug: it surfaces as an internal error (exit 1), never as a unit file."""


@dataclass(frozen=True)
class Mount:
    source: str  # absolute path on the host
    target: str  # absolute path in the container
    read_only: bool = True


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = None  # --memory (hard limit)
    cpus: float | None = None  # --cpus, e.g. 0.5
    pids: int = 512  # --pids-limit


# Each service's limits when the spec names none (spec `resources`; runtime.limits_of): the container runtime always
# applies them; the package runtime applies a service's limits (these filling what the spec leaves out) only when
# the spec names the service under `resources`, so a package platform without `resources` renders as before.
DEFAULT_LIMITS = {
    "broker": Limits(memory_bytes=512 << 20),
    "worker": Limits(memory_bytes=256 << 20),  # per replica
    "influxdb": Limits(memory_bytes=1 << 30),
    "grafana": Limits(memory_bytes=512 << 20),
}


@dataclass(frozen=True)
class ContainerService:
    unit: str  # systemd unit name: mosquitto.service, or iotplat-worker@.service for a template
    name: str  # container name (docker --name, journald tag); `{instance}` allowed in a template
    description: str
    image: str  # sha256:<image id> (loaded from an archive) or name@sha256:<digest> (pulled)
    command: tuple[str, ...] = ()  # arguments after the image (the image's CMD is replaced)
    entrypoint: str | None = None  # replaces the image's ENTRYPOINT (docker takes one word)
    user: str | None = None  # numeric uid[:gid]; None: the image's
    capabilities: tuple[str, ...] = ()  # added to an empty set
    read_only_root: bool = True
    tmpfs: tuple[str, ...] = ()  # writable scratch paths on a read-only root
    mounts: tuple[Mount, ...] = ()
    env: tuple[tuple[str, str], ...] = ()  # never secrets: they are files
    ports: tuple[int, ...] = ()  # what the service listens on (host network; the firewall decides who reaches it)
    limits: Limits = field(default_factory=Limits)
    reload_signal: str | None = None  # `systemctl reload` sends it to the service (e.g. HUP: Mosquitto re-reads)
    stop_timeout: int = 30  # seconds `docker stop` waits before SIGKILL
    documentation: str = "https://github.com/iotplat/iotplat/blob/main/docs/containers.md"

    @property
    def template(self) -> bool:
        return self.unit.endswith("@.service")


def container_unit(svc: ContainerService) -> str:
    """The unit file text for `svc` (one byte string per input: the renderer writes it once per service)."""
    _check(svc)
    name = _expand(_word(svc.name), svc)
    unit_of = svc.unit.replace("@.service", f"@{INSTANCE}.service")  # the instance's unit name in a template
    run = [DOCKER, "create", "--init", "--name", svc.name, "--pull", "never", "--network", "host",
           "--log-driver", "journald", "--log-opt", f"tag={svc.name}", "--label", f"OBJECT_SYSTEMD_UNIT={unit_of}",
           "--log-opt", "labels=OBJECT_SYSTEMD_UNIT", "--cap-drop", "ALL"]
    for cap in sorted(set(svc.capabilities)):
        run += ["--cap-add", cap]
    run += ["--security-opt", "no-new-privileges"]
    if svc.read_only_root:
        run.append("--read-only")
    for path in svc.tmpfs:
        run += ["--tmpfs", f"{path}:rw,nosuid,nodev,noexec,size=64m,mode=1777"]
    if svc.user:
        run += ["--user", svc.user]
    lim = svc.limits
    run += ["--pids-limit", str(lim.pids)]
    if lim.memory_bytes:
        run += ["--memory", str(lim.memory_bytes), "--memory-swap", str(lim.memory_bytes)]
    if lim.cpus:
        run += ["--cpus", f"{lim.cpus:g}"]
    for m in svc.mounts:
        run += ["--mount", f"type=bind,source={m.source},target={m.target}" + (",readonly" if m.read_only else "")]
    for key, value in svc.env:
        run += ["--env", f"{key}={value}"]
    if svc.entrypoint is not None:
        run += ["--entrypoint", svc.entrypoint]
    run.append(svc.image)
    run += list(svc.command)
    create = " ".join(_expand(_word(w), svc) for w in run)
    lines = [
        "# Managed by iotplat from the platform spec. Do not edit: `iotplat up` overwrites it.",
        f"# {_comment(svc.description)}: container runtime (docs/containers.md).",
        f"# Listens on (host network): {', '.join(str(p) for p in svc.ports) or 'nothing'}",
        "[Unit]",
        f"Description={_value(svc.description)}",
        f"Documentation={_value(svc.documentation)}",
        "After=docker.service network-online.target",
        "Requires=docker.service",
        "Wants=network-online.target",
        "StartLimitIntervalSec=120",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=simple",
        # the name must be free before `docker create`: a container left by a crash is removed, and one still being
        # removed by dockerd (an older unit's `--rm`, which removes after the stop returns: moby/moby#37698) is
        # waited for, up to 30 s
        f"ExecStartPre=/bin/sh -c '{DOCKER} rm --force \"$$1\" >/dev/null 2>&1; for i in $$(seq 150); do "
        f"{DOCKER} container inspect \"$$1\" >/dev/null 2>&1 || exit 0; sleep 0.2; done; "
        f"echo \"container $$1 is still there after 30 s\" >&2; exit 1' sh {name}",
        f"ExecStartPre={create}",
        f"ExecStartPre={DOCKER} start {name}",
        f"ExecStart={DOCKER} wait {name}",
        f"ExecStop={DOCKER} stop --time {svc.stop_timeout} {name}",
        # removed when stopped, before the stop job ends (not `--rm`, which removes later, asynchronously)
        f"ExecStopPost=-{DOCKER} rm --force {name}",
    ]
    if svc.reload_signal:
        lines.append(f"ExecReload={DOCKER} kill --signal {svc.reload_signal} {name}")
    lines += [
        "Restart=always",
        "RestartSec=2",
        "TimeoutStartSec=120",
        f"TimeoutStopSec={svc.stop_timeout + 15}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def limits_dropin(unit: str, limits: Limits, service: str) -> str:
    """A systemd drop-in giving a package's unit the limits a container of the service gets, setting for flag:
    --memory M --memory-swap M (no swap) -> MemoryMax=M, MemorySwapMax=0; --cpus C (CFS quota of C periods) ->
    CPUQuota=C*100%; --pids-limit N -> TasksMax=N. Both are the same cgroup v2 files (memory.max, memory.swap.max,
    cpu.max, pids.max), so a service is held to the same numbers whatever runs it."""
    _check_limits(limits)
    if not _UNIT_RE.fullmatch(unit) or service not in DEFAULT_LIMITS:
        raise UnitValueError(f"{unit!r} / {service!r} cannot take a resources drop-in")
    lines = [
        "# Managed by iotplat from the platform spec. Do not edit: `iotplat up` overwrites it.",
        f"# resources.{service} (docs/containers.md): what docker's --memory, --memory-swap, --cpus and "
        "--pids-limit set.",
        "[Service]",
    ]
    if limits.memory_bytes:
        lines += [f"MemoryMax={limits.memory_bytes}", "MemorySwapMax=0"]
    if limits.cpus:
        lines.append(f"CPUQuota={round(limits.cpus * 100)}%")
    lines += [f"TasksMax={limits.pids}", ""]
    return "\n".join(lines)


def _check_limits(lim: Limits) -> None:
    if not (1 <= lim.pids <= 1_000_000) or (lim.memory_bytes is not None and lim.memory_bytes < 6 * 1024 * 1024) \
            or (lim.cpus is not None and not 0.01 <= lim.cpus <= 1024):
        raise UnitValueError(f"resource limits {lim} are out of range")


def _check(svc: ContainerService) -> None:
    if not _UNIT_RE.fullmatch(svc.unit):
        raise UnitValueError(f"unit name {svc.unit!r} is not a service unit name")
    bare_name = svc.name.replace(INSTANCE, "x")
    if not _NAME_RE.fullmatch(bare_name) or (INSTANCE in svc.name and not svc.template):
        raise UnitValueError(f"container name {svc.name!r} is not a docker name")
    if not _IMAGE_RE.fullmatch(svc.image):
        raise UnitValueError(f"image {svc.image!r} is neither an image ID nor a pinned reference")
    if svc.user is not None and not _USER_RE.fullmatch(svc.user):
        raise UnitValueError(f"user {svc.user!r} is not a numeric uid[:gid]")
    for cap in svc.capabilities:
        if cap not in CAPABILITIES:
            raise UnitValueError(f"capability {cap!r} is not one a service may add")
    if svc.reload_signal is not None and svc.reload_signal not in SIGNALS:
        raise UnitValueError(f"reload signal {svc.reload_signal!r} is not one of {sorted(SIGNALS)}")
    for path in (*svc.tmpfs, *(m.source for m in svc.mounts), *(m.target for m in svc.mounts)):
        bare = path.replace(INSTANCE, "x") if svc.template else path
        if not _PATH_RE.fullmatch(bare) or "/../" in bare + "/" or "/./" in bare + "/":
            raise UnitValueError(f"path {path!r} is not a plain absolute path")
    for key, value in svc.env:
        if not _ENV_KEY_RE.fullmatch(key):
            raise UnitValueError(f"environment variable name {key!r} is invalid")
        if any(h in key.lower() for h in _SECRET_HINTS):
            raise UnitValueError(f"environment variable {key} looks like a secret: secrets are read-only files")
        _word(value)
    _check_limits(svc.limits)
    if not 1 <= svc.stop_timeout <= 3600 or any(not 1 <= p <= 65535 for p in svc.ports):
        raise UnitValueError("stop timeout or ports out of range")


def _word(text: str) -> str:
    """One ExecStart word: as is when plain, else double-quoted with systemd's escapes."""
    if not isinstance(text, str) or any(ord(ch) < 0x20 or ord(ch) == 0x7F or 0x80 <= ord(ch) <= 0x9F
                                        or ch in "\u2028\u2029" for ch in text):
        raise UnitValueError(f"{text!r} holds a control character: it cannot be one word of a unit's command line")
    if _SAFE_WORD.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _expand(word: str, svc: ContainerService) -> str:
    """`{instance}` -> `%i` in a template unit (after escaping, so no input can produce a specifier)."""
    return word.replace(INSTANCE, "%i") if svc.template else word


def _value(text: str) -> str:
    """A plain unit setting's value (Description=...): one line, no backslash (line continuation), `%` doubled."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text) or "\\" in text or "\u2028" in text or "\u2029" in text:
        raise UnitValueError(f"{text!r} cannot be a unit setting's value")
    return text.replace("%", "%%")


def _comment(text: str) -> str:
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text) or "\u2028" in text or "\u2029" in text:
        raise UnitValueError(f"{text!r} cannot be a comment line")
    return text


def image_for_run(image_id: str | None, pinned: str) -> str:
    """What a unit names: the image ID when the image came from an archive (its tag is not trusted), else the
    pinned reference a pull left in RepoDigests."""
    return image_id if image_id else pinned
