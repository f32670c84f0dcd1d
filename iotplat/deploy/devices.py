"""`iotplat device add|list|revoke|kit`: the registry file is the source of truth, the state holds credentials.

Edits keep the registry reviewable: a CSV row is appended (or removed) without rewriting the other lines; a
YAML registry gets one flow-style entry per line. Every edit is validated with the whole spec before the file is
replaced (write to a temp file, validate, rename), so a bad `add` leaves the registry untouched.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from pathlib import Path
from typing import Any

from iotplat.errors import InvalidInput, IotplatError
from iotplat.spec.devices import ATTRIBUTE_VALUE_RE, DEVICE_ID_RE


def _platform(args: argparse.Namespace):
    from iotplat.commands import _spec_path
    from iotplat.spec.load import load_platform

    path, display = _spec_path(args.spec)
    return load_platform(path, args.env, display), path, display


def _registry(platform) -> Path:
    reg = platform.spec.devices.registry
    if not reg:
        raise InvalidInput(f"{platform.spec_file}: devices.registry is not set; add `registry: devices.csv` under devices")
    p = Path(reg)
    return p if p.is_absolute() else platform.spec_dir / p


def _state(platform, args: argparse.Namespace):
    from iotplat.secrets.state import State, resolve_state_root

    root = resolve_state_root(getattr(args, "state_dir", None), platform.spec.state.dir, platform.spec_dir)
    return State.open(root, platform.name, platform.environment)


def _replace_validated(registry: Path, new_text: str, spec_path: Path, env: str | None, display: str) -> None:
    from iotplat.spec.load import load_platform

    tmp = registry.with_name(f".{registry.name}.new")
    backup = registry.read_text()
    tmp.write_text(new_text)
    os.replace(tmp, registry)
    try:
        load_platform(spec_path, env, display)
    except Exception:
        registry.write_text(backup)
        raise


def add(args: argparse.Namespace) -> dict[str, Any]:
    platform, spec_path, display = _platform(args)
    registry = _registry(platform)
    dev_id = args.id
    if not DEVICE_ID_RE.match(dev_id):
        raise InvalidInput(f"device id {dev_id!r} is not valid: use 1-64 letters, digits, _ or -")
    if any(d.id == dev_id for d in platform.devices):
        raise InvalidInput(f"{registry.name}: device {dev_id!r} is already registered")
    attrs: dict[str, str] = {}
    for item in args.attr:
        name, sep, value = item.partition("=")
        if not sep or not ATTRIBUTE_VALUE_RE.match(value):
            raise InvalidInput(f"--attr {item!r}: write NAME=VALUE with 1-64 letters, digits, _ . : or - in VALUE")
        attrs[name] = value
    text = registry.read_text()
    if registry.suffix.lower() == ".csv":
        header = next(r for r in csv.reader(io.StringIO(text)) if r and not r[0].lstrip().startswith("#"))
        unknown = sorted(set(attrs) - set(header))
        if unknown:
            raise InvalidInput(f"{registry.name}: no column {unknown[0]!r}; columns: {', '.join(header)}")
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([dev_id if c == "id" else attrs.get(c, "") for c in header])
        new = text + ("" if text.endswith("\n") else "\n") + buf.getvalue()
    else:
        entry = ", ".join([f"id: {dev_id}"] + [f"{k}: {v}" for k, v in sorted(attrs.items())])
        new = text + ("" if text.endswith("\n") else "\n") + f"  - {{{entry}}}\n"
    _replace_validated(registry, new, spec_path, args.env, display)
    platform, _, _ = _platform(args)
    from iotplat.secrets.materials import ensure_materials

    state = _state(platform, args)
    with state.lock("device add"):
        ensure_materials(platform, state)
        state.save()
    return {"added": dev_id, "registry": str(registry),
            "lines": [f"added {dev_id} to {registry}", "run `iotplat up` to install its credential on the broker; "
                      f"`iotplat device kit {dev_id}` prints its onboarding kit"]}


def list_devices(args: argparse.Namespace) -> dict[str, Any]:
    platform, _, _ = _platform(args)
    devices = [{"id": d.id, **dict(d.attributes)} for d in platform.devices]
    lines = [d["id"] + ("  " + " ".join(f"{k}={v}" for k, v in d.items() if k != "id") if len(d) > 1 else "")
             for d in devices]
    lines.append(f"{len(devices)} device(s)")
    return {"devices": devices, "lines": lines}


def revoke(args: argparse.Namespace) -> dict[str, Any]:
    platform, spec_path, display = _platform(args)
    registry = _registry(platform)
    if not any(d.id == args.id for d in platform.devices):
        raise InvalidInput(f"{registry.name}: no device {args.id!r}")
    text = registry.read_text()
    if registry.suffix.lower() == ".csv":
        kept = []
        for line in text.splitlines(keepends=True):
            cells = next(csv.reader(io.StringIO(line)), [])
            header_like = cells and cells[0].strip() == "id"
            if cells and not header_like and cells[0].strip() == args.id:
                continue
            kept.append(line)
        new = "".join(kept)
    else:
        import yaml

        data = yaml.safe_load(text)
        data["devices"] = [d for d in data["devices"] if d.get("id") != args.id]
        new = "devices:\n" + "".join(
            "  - {" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}\n" for d in data["devices"])
    _replace_validated(registry, new, spec_path, args.env, display)
    state = _state(platform, args)
    with state.lock("device revoke"):
        users = state.doc("users").setdefault("users", {})
        users.pop(args.id, None)  # a re-added device gets a new credential
        state.mark("users")
        state.save()
    return {"revoked": args.id, "lines": [f"revoked {args.id}: removed from {registry} and its credential deleted",
                                          "run `iotplat up` to remove it from the broker (it is refused from then on)"]}


def kit(args: argparse.Namespace) -> dict[str, Any]:
    from iotplat.secrets.materials import ensure_materials
    from iotplat.spec.platform_model import template_names

    platform, _, _ = _platform(args)
    device = next((d for d in platform.all_devices if d.id == args.id), None)
    if device is None:
        raise InvalidInput(f"no device {args.id!r} in the registry (`iotplat device list`)")
    state = _state(platform, args)
    with state.lock("device kit"):
        materials = ensure_materials(platform, state)
        state.save()
    password = materials.mqtt_users[device.id][0]
    deployed = state.read_json("deployed.json") or {}
    broker_host = platform.host_of("broker")
    names = list(platform.spec.broker.server_names)
    address = names[0] if names else deployed.get("hosts", {}).get(broker_host, "")
    if not address:
        raise IotplatError("the broker's address is not known yet: deploy first (`iotplat up`) or set broker.server_names")
    listener = next((lst for lst in platform.spec.broker.listeners if lst.protocol == "mqtt"), platform.spec.broker.listeners[0])
    attrs = {"device": device.id, **dict(device.attributes)}
    topics = [t.format(**{n: attrs.get(n, "") for n in template_names(t)}) for t in platform.spec.devices.topics]
    tls_name = names[0] if names else platform.service_name("broker")
    sample = (f"mosquitto_pub -h {tls_name} -p {listener.port} --cafile ca.crt -u {device.id} -P '{password}' "
              f"-i {device.id} -V mqttv5 -q 1 -t '{topics[0]}' -m '{{\"ts\": $(date +%s%3N)}}'")
    lines = [
        f"# onboarding kit for {device.id} ({platform.key}); it contains the device's secret: handle it like a password",
        f"broker:    {address}:{listener.port} (MQTT {'3.1.1/5' if listener.protocol == 'mqtt' else 'over WebSockets'}, TLS only)",
        f"tls name:  {tls_name}" + ("" if names else f"  (map it to {address} in /etc/hosts, or set broker.server_names)"),
        f"username:  {device.id}   (also the client id)",
        f"password:  {password}",
        "topics:    " + ", ".join(topics),
        "ca.crt:" + (f"  (two CAs: a CA rotation runs since {materials.ca_rotation_started}; install both)"
                     if materials.ca_rotation_started else ""),
        materials.ca_cert_pem.rstrip(),
        "example:",
        f"  {sample}",
    ]
    return {"device": device.id, "broker": {"address": address, "port": listener.port, "tls_name": tls_name},
            "username": device.id, "password": password, "topics": topics, "ca_cert": materials.ca_cert_pem,
            "example": sample, "lines": lines}


ACTIONS = {"add": add, "list": list_devices, "revoke": revoke, "kit": kit}


def run(action: str, args: argparse.Namespace) -> dict[str, Any]:
    return ACTIONS[action](args)
