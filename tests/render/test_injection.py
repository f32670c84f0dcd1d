"""No string in a spec can rewrite a rendered file: the generic test, driven by the published JSON Schema.

For every string the schema allows (a property, a list item, a map key or value, in every target kind and
optional section) a valid spec that holds it is written with the value carrying a hostile payload: a newline
and a config line, `#`, a `[section]`, quotes, a NUL, a trailing newline, a Jinja expression, Grafana's
`$__file{}`. Each one must be either

- refused by `iotplat validate`: exit 2, every line `FILE:LINE:COL: path: message`, one naming that field; or
- rendered inert: `iotplat render` succeeds and every file it writes (and the broker's password file),
  PARSED in its own format, has exactly the structure of the same spec's render without the payload:
  mosquitto.conf and the ACL as lines of space-separated words, grafana.ini and ansible.cfg with configparser,
  worker.toml and the InfluxDB configs with tomllib, YAML with yaml.safe_load, JSON with json, systemd units as
  sections and keys, the backup script as shell words (and `sh -n`). No Ansible file may gain a `{{ }}`.

The fields come from the schema, not from a list in this file: a field added later is tested as soon as one of
the BASELINES below holds its parent section (test_every_string_field_is_reached fails until one does). A file
format added later fails test_every_rendered_file_is_parsed until PARSERS can read it.
"""

from __future__ import annotations

import configparser
import copy
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from iotplat.secrets.materials import ensure_materials
from iotplat.secrets.pki import create_ca
from iotplat.secrets.state import State
from iotplat.spec.load import load_platform
from iotplat.spec.schema import json_schema
from iotplat.spec.yamlio import dotted

PAYLOADS = {
    "newline-line": "\nallow_anonymous true",
    "newline-section": "\n[auth.proxy]\nenabled = true",
    "crlf": "\r\ninjected = 1",
    "hash": " #x",
    "section": "[injected]",
    "quotes": "'\"",
    "nul": "\x00",
    "trailing-newline": "\n",
    "space-word": " extra",
    "jinja": "{{ lookup('pipe', 'id') }}",
    "grafana-file": "$__file{/etc/shadow}",
    "line-separator": "\u2028injected = 1",
}
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # what yaml.safe_load does, in C
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
ANSIBLE_JINJA = re.compile(r"\{\{|\{%|\{#")
LINE = re.compile(r'^[^:]+:\d+:\d+: ((?:[\w\[\].()-]|\["(?:[^"\\]|\\.)*"\])+): .+$')

_APP = {"topic": "site/{site}/{device}/telemetry"}
_SUB = {
    "name": "telemetry",
    "topic": "site/{site}/{device}/telemetry",
    "format": "json",
    "measurement": "telemetry",
    "tags": {"region": "eu-{site}"},
    "timestamp": {"field": "meta.ts", "unit": "ms"},
    "fields": {"temperature": {"type": "float", "path": "data.temp", "required": True}, "humidity": "float"},
    "options": {"separator": ".", "nested": {"mode": "strict"}},
}


def _common(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "iotplat/v1",
        "name": name,
        "description": "hostile-input baseline",
        "hosts": [{"name": "core", "services": ["broker", "worker", "influxdb", "grafana"]}],
        "broker": {
            "listeners": [{"protocol": "mqtt", "port": 8883, "bind": "0.0.0.0"},
                          {"protocol": "websockets", "port": 8884, "bind": "::"}],
            "server_names": ["mqtt.example.com"],
            "auth": {"method": "password", "hash_iterations": 1000},
            "limits": {"message_size": "256KiB", "queue_bytes": "512MiB"},
            "persistence": {"autosave_interval": "10s", "client_expiration": "7d"},
            "version": "2.0.11-1.2+deb12u2",
        },
        "devices": {
            "registry": "devices.csv",
            "topics": [_APP["topic"]],
            "canary": {"id": "iotplat-canary", "attributes": {"site": "canary-site"}},
        },
        "ingestion": {
            "replicas": 2,
            "outage_budget": "5m",
            "typical_message": "512B",
            "max_payload": "64KiB",
            "batch": {"max_points": 1000, "max_delay": "200ms"},
            "spool": {"max_size": "1GiB", "segment_size": "16MiB", "mode": "outage"},
            "dead_letters": {"measurement": "iotplat_dead_letters", "topic": "iotplat/dead-letters",
                             "excerpt": "1KiB"},
            "health": {"interval": "10s", "measurement": "iotplat_worker"},
            "subscriptions": [copy.deepcopy(_SUB)],
        },
        "grafana": {"domain": "grafana.example.com", "admin_user": "ops-admin", "dashboard_refresh": "30s",
                    "required": False},
        "backup": {"schedule": "*-*-* 03:30:00", "keep": 7, "dir": "/var/backups/iotplat"},
        "state": {"dir": "state-root"},
    }


def _local() -> dict[str, Any]:
    d = _common("inj-local")
    d["target"] = {"kind": "local", "network": "10.213.0.0/24", "mirror": "http://deb.debian.org/debian",
                   "proxy_port": 13142, "ca_bundle": "bundle.pem"}
    d["network"] = {"domain": "iotplat.internal"}
    d["tls"] = {"ca": "files", "ca_cert_file": "ca.crt", "ca_key_file": "ca.key", "min_version": "1.2"}
    d["influxdb"] = {"version": 1, "database": "iot", "retention_policy": "iotplat", "retention": "30d",
                     "package": {"source": "local", "version": "1.6.7~rc0-1+b13", "path": "debs"}}
    d["grafana"]["package"] = {"source": "local", "version": "11.3.1", "path": "debs"}
    d["secrets"] = {"influxdb_admin_password": {"file": "admin-password.txt"},
                    "grafana_admin_password": {"env": "INJ_GRAFANA_PASSWORD"}}
    # the container runtime: the broker and InfluxDB run pinned images (their units are rendered and parsed)
    d["runtime"] = {"default": "package", "broker": "container", "worker": "package", "influxdb": "container",
                    "grafana": "package"}
    pin = "@sha256:" + "0123456789abcdef" * 4
    d["images"] = {"broker": f"eclipse-mosquitto:2.0.22{pin}", "influxdb": f"influxdb:1.11.8{pin}",
                   "grafana": f"grafana/grafana-oss:12.0.0{pin}", "worker_base": f"python:3.13-slim{pin}",
                   "archive": {"grafana": "grafana.tar", "worker_base": "python.tar"}}
    # resource limits: the container units' flags (broker, InfluxDB) and the packages' drop-ins (worker, Grafana)
    d["resources"] = {"broker": {"memory": "2GiB", "cpus": 1.5, "pids": 512}, "worker": {"memory": "300MiB"},
                      "influxdb": {"memory": "1GiB"}, "grafana": {"memory": "512MiB", "cpus": 1}}
    # InfluxDB in a container has no scheduled backups (validate refuses them): the backup fields are reached in
    # the next baseline that holds them
    del d["backup"]
    return d


def _baremetal() -> dict[str, Any]:
    d = _common("inj-bm")
    d["target"] = {"kind": "baremetal", "ssh_user": "deploy", "admin_cidrs": ["192.168.0.0/16"],
                   "device_cidrs": ["0.0.0.0/0"],
                   "hosts": {"core": {"address": "192.0.2.10", "ssh_user": "admin", "ssh_port": 22,
                                      "ssh_private_key": "id_ed25519"}}}
    d["influxdb"] = {"version": 2, "org": "acme", "bucket": "telemetry",
                     "package": {"source": "upstream", "version": "2.7.11-1"}}
    d["secrets"] = {"influxdb_admin_password": {"env": "INJ_INFLUX_PASSWORD"},
                    "grafana_admin_password": {"file": "admin-password.txt"}}
    d["cost"] = {"prices": "prices.yaml", "hardware": {"core": {"monthly": 40.0, "vcpus": 2, "memory": "4GiB"}}}
    return d


def _cloud(kind: str) -> dict[str, Any]:
    d = _common(f"inj-{kind}")
    d["target"] = {"kind": kind, "admin_cidrs": ["203.0.113.0/24"], "device_cidrs": ["0.0.0.0/0"],
                   "network_cidr": "10.42.0.0/16", "ssh_public_key_file": "id_ed25519.pub", "disk_size": "20GiB",
                   "ssh_user": "iotplat"}
    if kind == "aws":
        d["target"].update(region="eu-west-1", instance_types={"default": "t3.small"})
    else:
        d["target"].update(location="westeurope", vm_sizes={"default": "Standard_B2s"})
    # package pins per Debian release (the other baselines pin one version for every release)
    d["broker"]["version"] = {"debian-12": "2.0.11-1.2+deb12u2", "debian-13": "2.0.21-1"}
    d["influxdb"] = {"version": 1, "package": {"source": "distro",
                                               "version": {"debian-12": "1.6.7~rc0-1+b13", "debian-13": "1.6.7~rc0-2+b12"}}}
    d["grafana"]["package"] = {"source": "upstream", "version": {"debian-12": "11.3.1", "debian-13": "11.3.1"}}
    return d


def _environments() -> dict[str, Any]:
    d = _cloud("aws")
    d["name"] = "inj-env"
    d["environments"] = {"staging": {"description": "staging overlay"}}
    return d


# First match wins: a field is tested in the first baseline that holds it (present beats absent).
BASELINES: dict[str, dict[str, Any]] = {
    "local": _local(), "baremetal": _baremetal(), "aws": _cloud("aws"), "azure": _cloud("azure"),
    "environments": _environments(),
}
ENV = {"INJ_GRAFANA_PASSWORD": "grafana-admin-password-0123456789", "INJ_INFLUX_PASSWORD": "influx-admin-pw-0123456789"}


# ------------------------------------------------------------------------------------------ the schema's strings

Step = tuple  # ("prop", name) | ("item",) | ("key",) | ("value",) | ("kind", const) | ("type", json type)


def _string_slots(schema: dict[str, Any]) -> list[tuple[Step, ...]]:
    defs = schema["$defs"]
    out: list[tuple[Step, ...]] = []

    def walk(node: Any, steps: tuple[Step, ...], depth: int = 0) -> None:
        if not isinstance(node, dict) or depth > 40:
            return
        while "$ref" in node:
            node = defs[node["$ref"].split("/")[-1]]
        variants = node.get("anyOf") or node.get("oneOf")
        if variants:
            for v in variants:
                while "$ref" in v:
                    v = defs[v["$ref"].split("/")[-1]]
                if v.get("type") == "null":
                    continue
                kind = v.get("properties", {}).get("kind", {}).get("const")
                if kind:
                    walk(v, steps + (("kind", kind),), depth + 1)
                elif "type" in v:
                    walk(v, steps + (("type", v["type"]),), depth + 1)
                else:
                    walk(v, steps, depth + 1)
            return
        t = node.get("type")
        if t == "string":
            out.append(steps)
        elif t == "array":
            walk(node.get("items", {}), steps + (("item",),), depth + 1)
        elif t == "object" or "properties" in node:
            for name, prop in node.get("properties", {}).items():
                walk(prop, steps + (("prop", name),), depth + 1)
            extra = node.get("additionalProperties")
            if extra is True or isinstance(extra, dict):
                out.append(steps + (("key",),))
                walk(extra if isinstance(extra, dict) and extra else {"type": "string"}, steps + (("value",),),
                     depth + 1)

    walk(schema, ())
    return list(dict.fromkeys(out))


def _label(steps: tuple[Step, ...]) -> str:
    text = ""
    for s in steps:
        if s[0] == "prop":
            text += ("." if text else "") + s[1]
        elif s[0] == "item":
            text += "[]"
        elif s[0] == "key":
            text += ".<key>"
        elif s[0] == "value":
            text += ".<value>"
        elif s[0] == "kind":
            text += f"({s[1]})"
    return text


_JSON_TYPE = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}


@dataclass(frozen=True)
class Slot:
    label: str
    baseline: str
    path: tuple[str | int, ...]  # the value's path; for a key slot, the path of the map entry
    is_key: bool
    present: bool


def _resolve(cur: Any, steps: tuple[Step, ...], path: tuple[str | int, ...] = ()
             ) -> tuple[tuple[str | int, ...], bool, bool] | None:
    """(path, is_key, present) of the slot in `cur`, or None if it has no place for it. An absent property
    is a place only for the last one (the test then sets it); a map value is looked for under every key."""
    if not steps:
        return (path, False, True) if isinstance(cur, str) else None
    step, rest = steps[0], steps[1:]
    if step[0] == "kind":
        return _resolve(cur, rest, path) if isinstance(cur, dict) and cur.get("kind") == step[1] else None
    if step[0] == "type":
        ok = _JSON_TYPE.get(type(cur)) == step[1] or (step[1] == "number" and type(cur) is int)
        return _resolve(cur, rest, path) if ok else None
    if not isinstance(cur, (dict, list)):
        return None
    if step[0] == "prop":
        if not isinstance(cur, dict):
            return None
        if step[1] not in cur:
            return (path + (step[1],), False, False) if all(s[0] == "type" for s in rest) else None
        return _resolve(cur[step[1]], rest, path + (step[1],))
    if step[0] == "item":
        return _resolve(cur[0], rest, path + (0,)) if isinstance(cur, list) and cur else None
    if not isinstance(cur, dict) or not cur:
        return None
    if step[0] == "key":
        return (path + (next(iter(cur)),), True, True) if not rest else None
    for key in cur:  # "value"
        found = _resolve(cur[key], rest, path + (key,))
        if found:
            return found
    return None


def _slots() -> tuple[list[Slot], list[str]]:
    slots, missing = [], []
    for steps in _string_slots(json_schema()):
        found = None
        for want_present in (True, False):
            for name, data in BASELINES.items():
                r = _resolve(data, steps)
                if r and r[2] == want_present:
                    found = Slot(_label(steps), name, *r)
                    break
            if found:
                break
        if found:
            slots.append(found)
        else:
            missing.append(_label(steps))
    return slots, missing


SLOTS, UNREACHED = _slots()


def test_every_string_field_is_reached() -> None:
    """A string field whose section no baseline holds is not tested: add the section to a baseline above."""
    assert not UNREACHED, f"no baseline spec holds these string fields: {UNREACHED}"
    assert len(SLOTS) > 60


# ------------------------------------------------------------------------------------------ parsing the output


def _tree(value: Any, keys: dict[str, str]) -> Any:
    """The structure of parsed data: mappings with their keys (payload keys mapped back), lists, leaf types."""
    if isinstance(value, dict):
        return {keys.get(str(k), str(k)): _tree(v, keys) for k, v in value.items()}
    if isinstance(value, list):
        return [_tree(v, keys) for v in value]
    return type(value).__name__


def _lines(text: str, keys: dict[str, str]) -> list[Any]:
    """mosquitto.conf, the ACL: one directive per line (split at "\\n" only, as Mosquitto reads them), words
    separated by spaces; a line starting with # is a comment."""
    out: list[Any] = []
    for line in text.split("\n"):
        if not line.strip():
            out.append("blank")
        elif line.lstrip().startswith("#"):
            out.append("comment")
        else:
            words = line.split()
            out.append((keys.get(words[0], words[0]), len(words), line != line.strip()))
    return out


def _ini(text: str, keys: dict[str, str]) -> Any:
    parser = configparser.ConfigParser(interpolation=None, strict=True, comment_prefixes=("#", ";"),
                                       inline_comment_prefixes=None)
    parser.read_string(text)
    return {s: sorted(parser[s]) for s in parser.sections()}, _lines(text, {})


def _systemd(text: str, keys: dict[str, str]) -> list[Any]:
    out: list[Any] = []
    for line in text.split("\n"):
        if not line.strip() or line.startswith(("#", ";")):
            out.append("comment-or-blank")
        elif line.startswith("["):
            out.append(("section", line))
        else:
            key, sep, value = line.partition("=")
            out.append(("key", key, bool(sep), value.endswith("\\")))
    return out


def _shell(text: str, keys: dict[str, str]) -> list[Any]:
    check = subprocess.run(["sh", "-n"], input=text, text=True, capture_output=True, timeout=10)
    assert check.returncode == 0, check.stderr
    out: list[Any] = []
    for line in text.split("\n"):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:  # an unbalanced quote
            words = [f"<{exc}>"]
        out.append((words[:1], len(words)))
    return out


def _passwd(text: str, keys: dict[str, str]) -> list[Any]:
    return [(line.count(":"), line.count("$")) for line in text.split("\n")]


def _pem(text: str, keys: dict[str, str]) -> int:
    return text.count("-----BEGIN ")


_DROPIN = re.compile(r"/systemd/system/[^/]+\.d/[^/]+\.conf\Z")  # a unit's drop-in (spec `resources`)
PARSERS: list[tuple[Callable[[str], bool], Callable[[str, dict[str, str]], Any]]] = [
    (lambda n: n.endswith(".json"), lambda t, k: _tree(json.loads(t), k)),
    (lambda n: n.endswith((".yml", ".yaml")), lambda t, k: _tree(yaml.load(t, Loader=_LOADER), k)),
    (lambda n: n.endswith(("/worker.toml", "/influxdb.conf", "/config.toml")), lambda t, k: _tree(tomllib.loads(t), k)),
    (lambda n: n.endswith(("/mosquitto.conf", "/acl")), _lines),
    (lambda n: n.endswith(("/grafana.ini", "/ansible.cfg")), _ini),
    (lambda n: n.endswith((".service", ".timer")) or bool(_DROPIN.search(n)), _systemd),
    (lambda n: n.endswith("/sbin/iotplat-backup"), _shell),
    (lambda n: n.endswith(".crt"), _pem),
    (lambda n: n == "secret:mosquitto_passwd", _passwd),
]


def _parse(name: str, data: bytes, keys: dict[str, str]) -> Any:
    for match, parse in PARSERS:
        if match(name):
            try:
                return parse(data.decode("utf-8"), keys)
            except (ValueError, AssertionError, configparser.Error, yaml.YAMLError) as exc:
                return f"unparseable: {type(exc).__name__}: {exc}"  # differs from any baseline structure
    raise AssertionError(f"no parser for {name}: add one to PARSERS")


def _jinja_strings(value: Any) -> set[str]:
    if isinstance(value, dict):
        return {s for k, v in value.items() for s in _jinja_strings(k) | _jinja_strings(v)}
    if isinstance(value, list):
        return {s for v in value for s in _jinja_strings(v)}
    return {value} if isinstance(value, str) and ANSIBLE_JINJA.search(value) else set()


# ------------------------------------------------------------------------------------------ writing and running


@dataclass
class Work:
    root: Path
    aux: Path  # files the baselines reference
    state: Path
    baseline: dict[str, tuple[dict[str, bytes], dict[str, Any]]]


def _aux_files(folder: Path) -> None:
    folder.mkdir(parents=True)
    ca = create_ca("iotplat injection-test CA")
    (folder / "ca.crt").write_text(ca.cert_pem)
    (folder / "ca.key").write_text(ca.key_pem)
    (folder / "devices.csv").write_text("id,site\nsensor-1,north\nsensor-2,south\n")
    (folder / "admin-password.txt").write_text("file-admin-password-0123456789\n")
    (folder / "bundle.pem").write_text(ca.cert_pem)
    (folder / "id_ed25519").write_text("not read by render\n")
    (folder / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostileInputTestKeyOnly0000000000000000 t\n")
    (folder / "debs").mkdir()
    for name in ("grafana.tar", "python.tar"):  # archives of images no container service uses: never read
        (folder / name).write_bytes(b"")


def _write_spec(work: Work, data: dict[str, Any], folder: Path, extra_files: dict[str, str]) -> Path:
    shutil.copytree(work.aux, folder)
    for new, old in extra_files.items():  # a path field's file, under the hostile name too
        try:
            src = folder / old
            if src.is_dir():
                shutil.copytree(src, folder / new)
            else:
                shutil.copyfile(src, folder / new)
        except (OSError, ValueError):
            pass  # e.g. a NUL in the name: the spec must then be refused
    spec = folder / "platform.yaml"
    spec.write_text(yaml.dump(data, Dumper=_DUMPER, sort_keys=False, allow_unicode=True, width=1 << 20))
    return spec


def _outputs(spec: Path, env: str | None, out: Path, state: Path, cli) -> dict[str, bytes]:
    args = ["render", str(spec), "--out", str(out), "--state-dir", str(state)] + (["--env", env] if env else [])
    result = cli(*args)
    assert result.code == 0, f"render failed (exit {result.code}): {result.err.strip()}"
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    platform = load_platform(spec, env)
    materials = ensure_materials(platform, State.open(state, platform.name, platform.environment))
    files["secret:mosquitto_passwd"] = materials.passwd_file()
    return files


def _env_of(data: dict[str, Any]) -> str | None:
    envs = data.get("environments") or {}
    return next(iter(envs), None)


def _structure(files: dict[str, bytes], keys: dict[str, str]) -> dict[str, Any]:
    out = {name: _parse(name, data, keys) for name, data in files.items()}
    for name, data in files.items():
        if name.startswith("ansible/") and name.endswith(".yml"):
            out[name + " (jinja)"] = sorted(_jinja_strings(yaml.load(data, Loader=_LOADER)))
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Work:
    root = tmp_path_factory.mktemp("injection")
    w = Work(root, root / "aux", root / "state", {})
    _aux_files(w.aux)
    return w


@pytest.fixture
def baseline(work: Work, cli, monkeypatch: pytest.MonkeyPatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)

    def get(name: str) -> tuple[dict[str, bytes], dict[str, Any]]:
        if name not in work.baseline:
            data = BASELINES[name]
            spec = _write_spec(work, data, work.root / f"baseline-{name}", {})
            files = _outputs(spec, _env_of(data), work.root / f"baseline-{name}-build", work.state, cli)
            work.baseline[name] = (files, _structure(files, {}))
        return work.baseline[name]

    return get


def test_every_rendered_file_is_parsed(baseline) -> None:
    """Every file of every baseline render has a parser (a new template format fails here first)."""
    for name in BASELINES:
        files, structure = baseline(name)
        assert {"manifest.json", "secret:mosquitto_passwd"} <= set(files) and len(files) > 15
        unparsed = {n: v for n, v in structure.items() if isinstance(v, str) and v.startswith("unparseable")}
        assert not unparsed, unparsed
        assert any(n.endswith("/acl") for n in files) and any(n.endswith("/grafana.ini") for n in files)


def _set(data: dict[str, Any], slot: Slot, suffix: str) -> tuple[dict[str, Any], str, dict[str, str]]:
    """(the spec with the payload, the dotted path validate must name, key renames {new: old})."""
    data = copy.deepcopy(data)
    parent: Any = data
    for part in slot.path[:-1]:
        parent = parent[part]
    last = slot.path[-1]
    if slot.is_key:
        new = f"{last}{suffix}"
        items = list(parent.items())
        parent.clear()
        parent.update((new if k == last else k, v) for k, v in items)
        return data, dotted(slot.path[:-1] + (new,)), {new: str(last)}
    base = parent.get(last) if isinstance(parent, dict) else parent[last]
    parent[last] = (base if isinstance(base, str) else "") + suffix
    return data, dotted(slot.path), {}


def _names_field(line: str, expected: str, parent: str | None) -> bool:
    """The line names the field (or a part of it); for a map key, the map may be named instead (a key with a
    NUL cannot be written in a path; the position points at the key)."""
    m = LINE.match(line)
    return bool(m) and (m.group(1) == expected or m.group(1).startswith((expected + ".", expected + "["))
                        or m.group(1) == parent)


@pytest.mark.parametrize("slot", SLOTS, ids=[s.label for s in SLOTS])
def test_hostile_string_is_refused_or_inert(slot: Slot, work: Work, baseline, cli, tmp_path: Path) -> None:
    base_files, base_structure = baseline(slot.baseline)
    data = BASELINES[slot.baseline]
    failures: list[str] = []
    for label, suffix in PAYLOADS.items():
        spec_data, expected, keys = _set(data, slot, suffix)
        # a field naming a file next to the spec: that file exists under the hostile name too
        old = slot.path[-1] if slot.is_key else _get(data, slot.path)
        extra = {}
        if isinstance(old, str) and (work.aux / old).exists():
            extra = {f"{old}{suffix}": old}
        spec = _write_spec(work, spec_data, tmp_path / label, extra)
        result = cli("validate", str(spec))
        if result.code == 2:
            lines = result.err.splitlines()
            bad = [line for line in lines if not LINE.match(line)]
            parent = dotted(slot.path[:-1]) if slot.is_key else None
            if bad or not any(_names_field(line, expected, parent) for line in lines):
                failures.append(f"{label}: refused, but not as one FILE:LINE:COL line naming {expected}: {result.err!r}")
            continue
        if result.code != 0:
            failures.append(f"{label}: validate exit {result.code}: {result.err.strip()}")
            continue
        try:
            files = _outputs(spec, _env_of(spec_data), tmp_path / f"{label}-build", work.state, cli)
        except AssertionError as exc:
            failures.append(f"{label}: validated, then {exc}")
            continue
        if set(files) != set(base_files):
            failures.append(f"{label}: rendered files differ: {sorted(set(files) ^ set(base_files))}")
            continue
        structure = _structure(files, keys)
        for name in sorted(structure):
            if structure[name] != base_structure.get(name):
                why = structure[name] if isinstance(structure[name], str) else "the value was not escaped for its format"
                failures.append(f"{label}: {name} changed structure: {why}"[:300])
    assert not failures, f"{slot.label} (baseline {slot.baseline}):\n" + "\n".join(failures)


def _get(data: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data
