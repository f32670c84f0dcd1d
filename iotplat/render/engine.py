"""Render a Platform into a build directory.

    <out>/manifest.json              every file: class, service, host, destination, mode, sha256
    <out>/hosts/<host>/<dest path>   service files (identical or per-host)
    <out>/ansible/                   inventory.yml, group_vars/all.yml, site.yml, ansible.cfg
    <out>/pulumi/<target>/           Pulumi stack config for stacks/<target> (aws, azure)

Service files are rendered ONCE per service from templates/ and written to every host of that
service, so "identical" is true by construction (and tested). Output is deterministic: sorted keys, no
timestamps, no absolute paths of this machine; files whose bytes did not change are not rewritten.
Secret files never reach <out>: the manifest lists them with class "secret" and the state key the
deploy step reads them from.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shlex
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from iotplat import API_VERSION, __version__
from iotplat.errors import InvalidInput
from iotplat.render import targets as render_targets
from iotplat.render.layout import CREDENTIALS_DIR, DATA_MOUNT, PATHS, mount_unit, paths
from iotplat.services import all_services, by_deploy_order, placed, template_paths
from iotplat.secrets.materials import Materials, server_names
from iotplat.spec.model import RELEASES
from iotplat.spec.platform_model import Platform

MANAGED = "Managed by iotplat from the platform spec. Do not edit: `iotplat up` overwrites it."
CLASSES = ("identical", "per-host", "secret")


@dataclass(frozen=True)
class FileEntry:
    cls: str  # identical | per-host | secret
    service: str  # a service name (iotplat.services), "backup" or "common"
    host: str
    dest: str  # absolute path on the host
    mode: str
    owner: str
    group: str
    content: bytes | None = field(default=None, repr=False)  # None for secrets
    secret: str | None = None  # state key of a secret file

    @property
    def path(self) -> str | None:
        return None if self.cls == "secret" else f"hosts/{self.host}{self.dest}"

    def manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "class": self.cls,
            "service": self.service,
            "host": self.host,
            "dest": self.dest,
            "mode": self.mode,
            "owner": self.owner,
            "group": self.group,
        }
        if self.cls == "secret":
            out["secret"] = self.secret
        else:
            out["path"] = self.path
            out["sha256"] = hashlib.sha256(self.content or b"").hexdigest()
        return out


class UnsafeValue(Exception):
    """A template was given a value its format cannot hold safely (a newline for a line-based file, ...).

    The spec's schema refuses such values first (tests/render/test_injection.py proves it for every string
    field), so this is a bug in iotplat: it surfaces as an internal error (exit 1), never as a rendered file."""


class Escaped(str):
    """A value a format filter has checked or escaped; the only strings a template may print (see _finalize)."""


def _text(value: Any, fmt: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UnsafeValue(f"{fmt}: cannot write {type(value).__name__} {value!r}")
    text = str(value)
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        raise UnsafeValue(f"{fmt}: {text!r} holds a lone surrogate")
    return text


def _breaks_line(ch: str) -> bool:
    """Control and format characters, line and paragraph separators: nothing a one-line value may hold."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def _one_line(value: Any, fmt: str, space: bool = True) -> str:
    text = _text(value, fmt)
    bad = next((ch for ch in text if _breaks_line(ch) or (not space and ch.isspace())), None)
    if bad is not None:
        raise UnsafeValue(f"{fmt}: {text!r} holds {bad!r}")
    return text


def _mosquitto(value: Any) -> Escaped:
    """A value on a mosquitto.conf or ACL line. Neither format has quoting or escapes: a line is split at
    spaces and ends at a newline (an ACL topic is the rest of its line, trimmed). So the filter escapes
    nothing; it refuses what would change the line (whitespace, control characters, an empty value)."""
    text = _one_line(value, "mosquitto", space=False)
    if not text:
        raise UnsafeValue("mosquitto: empty value")
    return Escaped(text)


def _comment(value: Any) -> Escaped:
    """Text inside a comment line of any format: one line (spaces allowed)."""
    return Escaped(_one_line(value, "comment"))


_INI_SAFE = re.compile(r"\A[A-Za-z0-9._:/@+,=~-]*\Z")


def _ini(value: Any) -> Escaped:
    """A value in grafana.ini (go-ini). INI has no escapes, and Grafana gives meaning to more than newlines:
    `;`/`#` start inline comments, quotes are stripped, `$__env{}`/`$__file{}`/`${VAR}` are expanded and
    go-ini expands `%(key)s`. Values here are closed (DNS names, ports, paths, user names), so the filter
    admits only characters none of that applies to."""
    text = _text(value, "ini")
    if not _INI_SAFE.match(text):
        raise UnsafeValue(f"ini: {text!r} holds a character grafana.ini would interpret")
    return Escaped(text)


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    """A TOML basic string. Hand-written because the project has no TOML writer (tomllib only reads) and
    json.dumps is not TOML: it writes characters outside the BMP as surrogate pairs (\\ud83d\\ude00),
    which TOML refuses. Every control character (U+0000-001F, U+007F, and C1) is escaped."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif code < 0x20 or 0x7F <= code <= 0x9F:
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml(value: Any) -> Escaped:
    if isinstance(value, bool):
        return Escaped("true" if value else "false")
    if isinstance(value, (int, float)):
        return Escaped(repr(value))
    if isinstance(value, str):
        return Escaped(_toml_string(_text(value, "toml")))
    if isinstance(value, (list, tuple)):
        return Escaped("[" + ", ".join(_toml(v) for v in value) + "]")
    if isinstance(value, dict):
        return Escaped("{" + ", ".join(f"{_toml(str(k))} = {_toml(v)}" for k, v in sorted(value.items())) + "}")
    raise UnsafeValue(f"toml: cannot write {type(value).__name__}")


_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _grafana_yaml(value: Any) -> Escaped:
    """A scalar in a Grafana provisioning file: YAML double-quoted (yaml escapes every control character) with
    `$` doubled, Grafana's escape for its $VAR / ${VAR} / $__file{} interpolation of provisioning values."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return Escaped(yaml.dump(value, Dumper=_YAML_DUMPER).removesuffix("\n...\n").strip())
    text = _text(value, "yaml").replace("$", "$$")
    dumped = yaml.dump(text, Dumper=_YAML_DUMPER, default_style='"', allow_unicode=True, width=1 << 30)
    return Escaped(dumped.rstrip("\n"))


_PATH_SAFE = re.compile(r"\A/[A-Za-z0-9._/-]*\Z")


def _path(value: Any) -> Escaped:
    """An absolute path of letters, digits and . _ / - only: it reads the same raw in every format (inside
    a Grafana $__file{} reference, an ini value, a YAML double-quoted string)."""
    text = _text(value, "path")
    if not _PATH_SAFE.match(text):
        raise UnsafeValue(f"path: {text!r} is not a plain absolute path")
    return Escaped(text)


def _sh(value: Any) -> Escaped:
    """A word in a POSIX shell script."""
    return Escaped(shlex.quote(_one_line(value, "sh")))


def _systemd(value: Any) -> Escaped:
    """A value in a systemd unit file: one line, no backslash (it would continue the line) and `%` doubled
    (systemd expands %-specifiers)."""
    text = _one_line(value, "systemd")
    if "\\" in text:
        raise UnsafeValue(f"systemd: {text!r} holds a backslash")
    return Escaped(text.replace("%", "%%"))


def _finalize(value: Any) -> Any:
    """Every `{{ }}` in a template prints a number or the output of a format filter: a template that prints
    a bare string (and so writes it unescaped) fails on its first render, in every test."""
    if isinstance(value, Escaped) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    raise UnsafeValue(f"a template prints {value!r} without a format filter (toml, ini, mosquitto, comment, "
                      "grafana_yaml, path, sh, systemd)")


FILTERS = {"toml": _toml, "ini": _ini, "mosquitto": _mosquitto, "comment": _comment, "grafana_yaml": _grafana_yaml,
           "path": _path, "sh": _sh, "systemd": _systemd}


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    """One environment per process: templates are compiled once, not on every render."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_paths()),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
        finalize=_finalize,
    )
    env.filters.update(FILTERS)
    return env


def _yaml(data: Any, header: str = "", sort_keys: bool = True) -> bytes:
    text = yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=sort_keys,
                     default_flow_style=False, width=120, allow_unicode=True)
    return ((f"# {header}\n" if header else "") + text).encode()


def host_ingress(p: Platform, host: str) -> list[dict[str, Any]]:
    """The ports `host` accepts and from whom (source devices, admin or internal): the stack config's
    `iotplat:hosts[].ingress` and the hosts' firewall, from each service on the host. Needs no materials, so
    `iotplat cost` uses it too."""
    from iotplat.services import placed

    return [rule.as_dict() for svc in placed(p) if host in p.placement[svc.name] for rule in svc.ingress(p, host)]


class Renderer:
    def __init__(self, platform: Platform, materials: Materials) -> None:
        self.p = platform
        self.m = materials
        self.env = _env()
        self.common = {"managed": MANAGED, "platform_key": platform.key, "paths": paths()}

    def template(self, name: str, **ctx: Any) -> bytes:
        """Render templates/<name> with the format filters (every printed value goes through one)."""
        return self.env.get_template(name).render(**self.common, **ctx).encode()

    # ------------------------------------------------------------------ assemble
    def host_files(self) -> list[FileEntry]:
        """Every file of every host: the CA and its server certificate, each service's files (rendered once per
        service, so the same bytes on each of its hosts), scheduled backups, and the secrets (listed, never
        written)."""
        services = placed(self.p)
        rendered = {svc.name: svc.files(self) for svc in services}
        ca = self.m.ca_cert_pem.encode()
        entries: list[FileEntry] = []
        for host in self.p.host_names:
            on_host = [svc for svc in services if host in self.p.placement[svc.name]]
            entries.append(FileEntry("identical", "common", host, PATHS["ca_cert"], "0644", "root", "root", ca))
            if host in self.m.host_certs:
                entries.append(FileEntry("per-host", "common", host, PATHS["server_cert"], "0644", "root", "root",
                                         self.m.host_certs[host].cert_pem.encode()))
            for svc in on_host:
                for f in rendered[svc.name]:
                    entries.append(FileEntry("identical", svc.name, host, f.dest, f.mode, f.owner, f.group, f.content))
            for dest, content, mode in self.backup_files(host):
                entries.append(FileEntry("per-host", "backup", host, dest, mode, "root", "root", content))
            for svc in on_host:
                for sf in svc.secrets(self.p, host):
                    entries.append(FileEntry("secret", svc.name, host, sf.dest, sf.mode, "root", sf.group,
                                             secret=sf.secret))
        return entries

    def backup_files(self, host: str) -> list[tuple[str, bytes, str]]:
        """Scheduled backups (spec `backup`): a script, a oneshot service and its timer on every host that holds
        data; the common role installs them and enables the timer (or removes them when the schedule is gone)."""
        b = self.p.spec.backup
        on_host = [svc for svc in placed(self.p) if host in self.p.placement[svc.name]]
        steps = [step for svc in on_host if (step := svc.scheduled_backup(self, host)) is not None]
        if not b.schedule or not steps:
            return []
        ctx = {"what": ", ".join(s.what for s in steps), "keep": b.keep, "dir": b.dir, "schedule": b.schedule,
               "after": " ".join(s.after for s in steps),
               # fragments the services rendered from their own templates, through the same format filters
               "steps": [Escaped(s.script.decode().rstrip("\n")) for s in steps]}
        return [("/usr/local/sbin/iotplat-backup", self.template("backup/iotplat-backup.sh.j2", **ctx), "0750"),
                ("/etc/systemd/system/iotplat-backup.service", self.template("backup/iotplat-backup.service.j2", **ctx),
                 "0644"),
                ("/etc/systemd/system/iotplat-backup.timer", self.template("backup/iotplat-backup.timer.j2", **ctx),
                 "0644")]

    def host_ingress(self, host: str) -> list[dict[str, Any]]:
        return host_ingress(self.p, host)

    def firewall_sources(self) -> dict[str, list[str]]:
        """Where each ingress `source` may come from, for the hosts' nftables firewall (common role): the
        target's to say (iotplat/render/targets.py)."""
        return render_targets.for_platform(self.p).firewall_sources(self.p)

    def data_dirs(self, host: str) -> list[dict[str, str]]:
        """The data folders of the services on `host` (on the host's data disk when it has one): each with the
        folder on the disk that holds it and its systemd mount unit."""
        return [{"path": d, "folder": f"{DATA_MOUNT}/{d.rsplit('/', 1)[1]}", "unit": mount_unit(d)}
                for svc in placed(self.p) if host in self.p.placement[svc.name] for d in svc.data_dirs(self.p)]

    def ansible_files(self, entries: list[FileEntry]) -> dict[str, bytes]:
        p = self.p
        spec = p.spec
        services = placed(p)
        target = render_targets.for_platform(p)
        hosts: dict[str, Any] = {}
        for host in p.host_names:
            hv: dict[str, Any] = {
                "iotplat_services": p.services_on(host),
                "iotplat_ingress": self.host_ingress(host),
                "iotplat_files": [
                    {"src": e.path, "dest": e.dest, "mode": e.mode, "owner": e.owner, "group": e.group, "service": e.service}
                    for e in entries if e.host == host and e.cls != "secret"
                ],
                "iotplat_secret_files": [
                    {"secret": e.secret, "dest": e.dest, "mode": e.mode, "owner": e.owner, "group": e.group, "service": e.service}
                    for e in entries if e.host == host and e.cls == "secret"
                ],
                "iotplat_data_dirs": self.data_dirs(host),
            }
            for svc in services:
                if host in p.placement[svc.name]:
                    hv.update(svc.host_vars(p, host))
            hv.update(target.host_vars(p, host))  # e.g. bare metal: the user's own addresses
            hosts[host] = hv
        groups = {svc.name: {"hosts": {h: None for h in p.placement[svc.name]}} for svc in all_services()}
        inventory = {"all": {"hosts": hosts, "children": groups}}
        group_vars: dict[str, Any] = {
            "iotplat_platform": p.name,
            "iotplat_environment": p.environment,
            "iotplat_target": p.target,
            "iotplat_domain": spec.network.domain,
            "iotplat_service_hosts": {svc.name: p.placement[svc.name] for svc in all_services()},
            "iotplat_releases": list(RELEASES),
            "iotplat_data_mount": DATA_MOUNT,
            "iotplat_data_mount_unit": mount_unit(DATA_MOUNT),
            "iotplat_paths": dict(paths()),
            "iotplat_firewall_sources": self.firewall_sources(),
            "iotplat_version": __version__,
        }
        for svc in all_services():
            group_vars.update(svc.group_vars(p))
        # One play, strategy free: each host runs the baseline and then its own services in deploy order (broker,
        # InfluxDB, worker, Grafana) without waiting for the other hosts at every task. The worker does not
        # need InfluxDB to be ready (it spools), so no cross-host ordering is needed.
        ordered = by_deploy_order(all_services())
        site = [{
            "name": "iotplat platform",
            "hosts": "all",
            "become": True,
            "strategy": "free",
            "tasks": [
                {"name": "Baseline on every host", "ansible.builtin.include_role": {"name": "common"}},
                *({"name": svc.title, "ansible.builtin.include_role": {"name": svc.role_for(p)},
                   "when": f"'{svc.name}' in group_names"} for svc in ordered),
            ],
        }]
        # Each role's own tasks/uninstall.yml stops its units and removes its configuration (its data only with
        # iotplat_destroy_data), then common's removes what every host has (iotplat's folders, the data disk).
        destroy = [{
            "name": "Stop and remove the platform's services (data only with iotplat_destroy_data)",
            "hosts": "all",
            "become": True,
            "vars": {"iotplat_destroy_data": False},
            "tasks": [
                *({"name": f"Remove {svc.title}",
                   "ansible.builtin.include_role": {"name": svc.role_for(p), "tasks_from": "uninstall"},
                   "when": f"'{svc.name}' in group_names"} for svc in reversed(ordered)),
                {"name": "Remove iotplat's files and the data disk's mounts",
                 "ansible.builtin.include_role": {"name": "common", "tasks_from": "uninstall"}},
            ],
        }]
        cfg = (
            "# " + MANAGED + "\n"
            "# roles_path is set by `iotplat up` (ANSIBLE_ROLES_PATH) to the roles shipped with iotplat.\n"
            "[defaults]\n"
            "inventory = inventory.yml\n"
            "interpreter_python = /usr/bin/python3\n"
            "host_key_checking = True\n"
            "retry_files_enabled = False\n"
            "stdout_callback = default\n"
            "forks = 10\n"
            "# facts once per host and run, and only the subsets the roles read\n"
            "gathering = smart\n"
            "gather_subset = !all,min,network,virtual\n"
            "# a task that hangs (a stuck package mirror, a dead peer) fails after 20 minutes, named\n"
            "task_timeout = 1200\n"
            "\n[ssh_connection]\n"
            "pipelining = True\n"
            "# one multiplexed connection per host; no compression (hosts are near, CPU is not free);\n"
            "# keepalives, so a connection to a host that went away fails within a minute instead of hanging\n"
            "ssh_args = -o ControlMaster=auto -o ControlPersist=120s -o ServerAliveInterval=15 -o ServerAliveCountMax=4\n"
        ).encode()
        return {
            "ansible/inventory.yml": _yaml(inventory, MANAGED + " Addresses of cloud and local hosts are added by `iotplat up`."),
            "ansible/group_vars/all.yml": _yaml(group_vars, MANAGED),
            "ansible/site.yml": _yaml(site, MANAGED, sort_keys=False),
            "ansible/destroy.yml": _yaml(destroy, MANAGED, sort_keys=False),
            "ansible/ansible.cfg": cfg,
        }

    def pulumi_files(self) -> dict[str, bytes]:
        target = render_targets.for_platform(self.p)
        stack = target.stack_config(self.p, self.host_ingress)
        if stack is None:
            return {}
        name, config = stack
        return {name: _yaml({"config": config}, MANAGED + f" Stack config for stacks/{target.kind}.")}


@dataclass
class RenderResult:
    out: Path
    files: dict[str, bytes]
    entries: list[FileEntry]
    manifest: dict[str, Any]
    written: list[str]
    removed: list[str]


def render_platform(platform: Platform, materials: Materials) -> tuple[dict[str, bytes], list[FileEntry], dict[str, Any]]:
    r = Renderer(platform, materials)
    entries = r.host_files()
    files: dict[str, bytes] = {e.path: e.content for e in entries if e.path is not None and e.content is not None}
    files.update(r.ansible_files(entries))
    files.update(r.pulumi_files())
    manifest = {
        "apiVersion": API_VERSION,
        "platform": platform.name,
        "environment": platform.environment,
        "target": platform.target,
        "iotplat": __version__,
        "hosts": {h: {"services": platform.services_on(h), "names": server_names(platform, h)} for h in platform.host_names},
        "files": sorted((e.manifest() for e in entries), key=lambda m: (m["host"], m["dest"])),
        "artifacts": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items()) if not name.startswith("hosts/")},
        "devices": len(platform.devices),
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return files, entries, manifest


# ---------------------------------------------------------------------------- the build directory
#
# The build directory is iotplat's alone. iotplat writes into a folder only when it is absent, empty, or holds a
# manifest.json (or a pending journal) of its own; it never writes into or over the state root; it never follows a
# symbolic link below the folder (every directory is opened with O_NOFOLLOW relative to its parent, after a scan
# that refuses links before anything is written); and it removes only files that its previous manifest (or an
# interrupted render's journal) lists, plus its own temp files. A refusal is an InvalidInput: one line, exit 2,
# nothing changed.

MANIFEST = "manifest.json"
PENDING = ".iotplat-pending.json"  # names a render is about to write; removed when the render completes
_TMP_SUFFIX = ".iotplat-tmp"
_TOP_FOLDERS = ("hosts", "ansible", "pulumi")
_MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _is_build_name(name: object) -> bool:
    """A name render writes: manifest.json or hosts|ansible|pulumi/<...>, no empty, `.` or `..` parts."""
    if not isinstance(name, str) or "\0" in name:
        return False
    if name == MANIFEST:
        return True
    parts = name.split("/")
    return len(parts) >= 2 and parts[0] in _TOP_FOLDERS and all(p not in ("", ".", "..") for p in parts)


def _read_own(dir_fd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(_MAX_MANIFEST_BYTES + 1)
        return data if len(data) <= _MAX_MANIFEST_BYTES else None
    finally:
        os.close(fd)


def _owned_names(dir_fd: int) -> set[str] | None:
    """The names iotplat wrote into this folder, from its manifest.json and an interrupted render's journal;
    None when the folder has neither (it is not a build directory of iotplat's)."""
    owned: set[str] | None = None
    raw = _read_own(dir_fd, MANIFEST)
    if raw is not None:
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if (isinstance(doc, dict) and doc.get("apiVersion") == API_VERSION and isinstance(doc.get("files"), list)
                and isinstance(doc.get("artifacts"), dict)):
            owned = {MANIFEST, *(n for n in doc["artifacts"] if _is_build_name(n))}
            owned.update(f["path"] for f in doc["files"] if isinstance(f, dict) and _is_build_name(f.get("path")))
    raw = _read_own(dir_fd, PENDING)
    if raw is not None:
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and doc.get("apiVersion") == API_VERSION and isinstance(doc.get("pending"), list):
            owned = (owned or set()) | {n for n in doc["pending"] if _is_build_name(n)}
    return owned


def check_build_dir(out: Path, state_root: Path | None = None) -> set[str]:
    """Refuse (InvalidInput) a build directory iotplat may not write; return the names it wrote there before.

    Changes nothing, so `prepare` calls it before the state is touched. A symbolic link given as `out` itself is
    followed (the user chose that folder); links below it are refused by write_build_dir.
    """
    real = Path(os.path.realpath(out))
    if state_root is not None:
        root = Path(os.path.realpath(state_root))
        if real == root or root in real.parents or real in root.parents:
            where = "is" if real == root else ("is inside" if root in real.parents else "contains")
            raise InvalidInput(f"{out}: the build directory {where} the state root {state_root}; render into another "
                               "folder (--out), the state holds the CA and every credential (nothing was changed)")
    try:
        dir_fd = os.open(real, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError) as exc:
        if isinstance(exc, NotADirectoryError) and real.exists():
            raise InvalidInput(f"{out}: exists and is not a folder; choose another build directory (--out)") from None
        return set()  # absent (or under a file: creating it fails with a clear error later)
    try:
        entries = os.listdir(dir_fd)
        if not entries:
            return set()
        owned = _owned_names(dir_fd)
    finally:
        os.close(dir_fd)
    if owned is None:
        raise InvalidInput(f"{out}: holds files iotplat did not write (no manifest.json of its own); render into a new "
                           "or empty folder (--out), iotplat removes what it finds in its build directory (nothing was "
                           "changed)")
    return owned


def _refuse_links(real: Path, out: Path, names: set[str]) -> None:
    """Before anything is written: no folder on the way to a name, and no name itself, may be a symbolic link
    (or a folder where a file goes, or a file where a folder goes)."""
    import stat

    seen: dict[str, int] = {}
    for name in sorted(names):
        parts = name.split("/")
        for depth in range(1, len(parts) + 1):
            rel = "/".join(parts[:depth])
            if rel not in seen:
                try:
                    seen[rel] = os.lstat(real / rel).st_mode
                except FileNotFoundError:
                    seen[rel] = 0
                except NotADirectoryError:
                    seen[rel] = 0  # a parent is a file: reported for that parent below
            mode = seen[rel]
            if mode == 0:
                break
            last = depth == len(parts)
            if stat.S_ISLNK(mode):
                raise InvalidInput(f"{out / rel}: is a symbolic link; iotplat never follows links in its build "
                                   "directory: remove it and render again (nothing was changed)")
            if last and stat.S_ISDIR(mode):
                raise InvalidInput(f"{out / rel}: is a folder where iotplat writes a file; remove it and render again "
                                   "(nothing was changed)")
            if not last and not stat.S_ISDIR(mode):
                raise InvalidInput(f"{out / rel}: is not a folder but iotplat writes files below it; remove it and "
                                   "render again (nothing was changed)")


class _Dirs:
    """Folders below the build directory, each opened relative to its parent without following links."""

    def __init__(self, root_fd: int) -> None:
        self.fds: dict[str, int] = {"": root_fd}

    def get(self, rel: str, create: bool) -> int | None:
        if rel in self.fds:
            return self.fds[rel]
        parent, _, base = rel.rpartition("/")
        pfd = self.get(parent, create)
        if pfd is None:
            return None
        try:
            fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(base, 0o755, dir_fd=pfd)
            fd = os.open(base, _DIR_FLAGS, dir_fd=pfd)
        self.fds[rel] = fd
        return fd

    def close(self) -> None:
        for rel, fd in self.fds.items():
            if rel:
                os.close(fd)
        self.fds = {"": self.fds[""]}


def _write_at(dir_fd: int, base: str, data: bytes) -> None:
    tmp = f".{base}{_TMP_SUFFIX}"
    try:
        os.unlink(tmp, dir_fd=dir_fd)  # left by an interrupted render
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
    finally:
        os.close(fd)
    os.replace(tmp, base, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _same_bytes(dir_fd: int, base: str, data: bytes) -> bool:
    try:
        fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(len(data) + 1) == data
    finally:
        os.close(fd)


def write_build_dir(out: Path, files: dict[str, bytes], *, state_root: Path | None = None) -> tuple[list[str], list[str]]:
    """Make `out` hold `files`: unchanged files are left alone, changed ones replaced atomically, files the
    previous render wrote and this one does not are removed (nothing else is); manifest.json is written last.

    A render that is interrupted leaves the previous manifest and, when it was about to write names that
    manifest does not list, a journal (.iotplat-pending.json) naming them, so the next render still knows
    every file it owns. Refusals (see check_build_dir, _refuse_links) are InvalidInput and change nothing.
    """
    owned = check_build_dir(out, state_root)
    bad = sorted(n for n in files if not _is_build_name(n))
    if bad:
        raise ValueError(f"not a build directory name: {bad[0]!r}")  # a bug in the renderer, not user input
    wanted = set(files)
    stale = owned - wanted - {PENDING}
    real = Path(os.path.realpath(out))
    if real.exists():
        _refuse_links(real, out, wanted | stale)
    real.mkdir(parents=True, exist_ok=True)
    root_fd = os.open(real, _DIR_FLAGS)
    dirs = _Dirs(root_fd)
    written: list[str] = []
    removed: list[str] = []
    try:
        journal = bool(wanted - owned)
        if journal:
            doc = {"apiVersion": API_VERSION, "pending": sorted(owned | wanted)}
            _write_at(root_fd, PENDING, (json.dumps(doc, indent=1) + "\n").encode())
        order = sorted(n for n in files if n != MANIFEST) + [MANIFEST]
        for name in order:
            data = files[name]
            parent, _, base = name.rpartition("/")
            fd = dirs.get(parent, create=True)
            assert fd is not None
            if _same_bytes(fd, base, data):
                continue
            _write_at(fd, base, data)
            written.append(name)
        for name in sorted(stale, reverse=True):
            parent, _, base = name.rpartition("/")
            fd = dirs.get(parent, create=False)
            if fd is None:
                continue
            try:
                os.unlink(base, dir_fd=fd)
            except (FileNotFoundError, IsADirectoryError):
                continue
            removed.append(name)
        for fd in list(dirs.fds.values()):  # temp files an interrupted render left behind
            with os.scandir(fd) as entries:
                leftovers = [e.name for e in entries if e.name.startswith(".") and e.name.endswith(_TMP_SUFFIX)
                             and not e.is_dir(follow_symlinks=False)]
            for leftover in leftovers:
                os.unlink(leftover, dir_fd=fd)
        dirs.close()
        # folders that held only removed files go too, deepest first (never a folder that still holds anything)
        folders: set[str] = set()
        for name in removed:
            parts = name.split("/")[:-1]
            folders.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        for rel in sorted(folders, key=lambda r: r.count("/"), reverse=True):
            parent, _, base = rel.rpartition("/")
            fd = dirs.get(parent, create=False)
            if fd is None:
                continue
            try:
                os.rmdir(base, dir_fd=fd)
            except OSError:
                pass
        with contextlib.suppress(FileNotFoundError):  # this render's journal, or one an interrupted render left
            os.unlink(PENDING, dir_fd=root_fd)
    finally:
        dirs.close()
        os.close(root_fd)
    removed.sort()
    return written, removed
