"""`iotplat device add|list|revoke|kit`: the registry file is the source of truth, the state holds credentials.

A registry change and the state's credentials change together or not at all (iotplat/spec/registry.py keeps the
file's format): under the state's lock and a lock on the registry's folder, the new registry is written to a temp
file, the whole spec (every environment) is validated with it and the state's change is prepared; only then is
the file renamed into place and the state saved — if saving fails, the old registry is put back. `add` drops any
credential the state still holds for the id (left by a revoke), so a re-added device always gets a new one.

The use cases take typed values (a SpecRef and plain parameters); argparse stays in iotplat/cli.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iotplat.errors import InvalidInput, IotplatError
from iotplat.spec import registry as reg

if TYPE_CHECKING:
    from iotplat.secrets.state import State
    from iotplat.spec.platform_model import Platform


@dataclass(frozen=True)
class SpecRef:
    """Which platform: the spec file (None: ./platform.yaml, else the shipped default), environment, state root."""

    spec: str | None = None
    env: str | None = None
    state_dir: str | None = None


def _platform(ref: SpecRef) -> tuple[Platform, Path, str]:
    from iotplat.commands import spec_path
    from iotplat.spec.load import load_platform

    path, display = spec_path(ref.spec)
    return load_platform(path, ref.env, display), path, display


def _registry(platform: Platform) -> Path:
    path = platform.spec.devices.registry
    if not path:
        raise InvalidInput(f"{platform.spec_file}: devices.registry is not set; add `registry: devices.csv` under devices")
    p = Path(path)
    return p if p.is_absolute() else platform.spec_dir / p


def _state(platform: Platform, ref: SpecRef) -> State:
    from iotplat.secrets.state import State, resolve_state_root

    root = resolve_state_root(ref.state_dir, platform.spec.state.dir, platform.spec_dir)
    return State.open(root, platform.name, platform.environment)


def _change(ref: SpecRef, operation: str, edit: Callable[[Path, str], str],
            prepare_state: Callable[[State, Platform], None]) -> tuple[Platform, Path]:
    """Change the registry with `edit` and the state with `prepare_state`, together or not at all."""
    from iotplat.spec.load import validate_spec

    platform, spec_path, display = _platform(ref)
    registry = _registry(platform)
    state = _state(platform, ref)  # a missing or wrong vault key fails here: nothing changed
    with state.lock(f"device {operation}"), reg.editing(registry):
        try:
            text = registry.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{registry}: cannot read the device registry: {exc}") from None
        new_text = edit(registry, text)
        changed: dict[str, Platform] = {}

        def check(candidate: Path) -> None:
            platforms = validate_spec(spec_path, None, display, registry_override=(registry, candidate))
            changed["platform"] = next(p for p in platforms if p.environment == platform.environment)
            prepare_state(state, changed["platform"])

        reg.replace_validated(registry, new_text.encode("utf-8"), check, state.save)
    return changed["platform"], registry


def add(ref: SpecRef, device_id: str, attributes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Register a device and create its credential."""
    attrs = dict(attributes or {})
    reg.check_device_id(device_id)
    reg.check_attributes(attrs)

    def prepare_state(state: State, platform: Platform) -> None:
        from iotplat.secrets.materials import ensure_materials

        users = state.doc("users").setdefault("users", {})
        if users.pop(device_id, None) is not None:  # left by a revoke: a re-added device gets a new credential
            state.mark("users")
        ensure_materials(platform, state)

    _, registry = _change(ref, "add", lambda path, text: reg.add_device(path, text, device_id, attrs), prepare_state)
    return {"added": device_id, "registry": str(registry),
            "lines": [f"added {device_id} to {registry}", ("run `iotplat up` to install its credential on the broker; "
                                                           f"`iotplat device kit {device_id}` prints its onboarding kit")]}


def list_devices(ref: SpecRef) -> dict[str, Any]:
    platform, _, _ = _platform(ref)
    devices = [{"id": d.id, **dict(d.attributes)} for d in platform.devices]
    lines = [d["id"] + ("  " + " ".join(f"{k}={v}" for k, v in d.items() if k != "id") if len(d) > 1 else "")
             for d in devices]
    lines.append(f"{len(devices)} device(s)")
    return {"devices": devices, "lines": lines}


def revoke(ref: SpecRef, device_id: str) -> dict[str, Any]:
    """Remove a device (found by its `id`) from the registry and delete its credential."""

    def prepare_state(state: State, platform: Platform) -> None:
        if any(d.id == device_id for d in platform.all_devices):
            raise IotplatError(f"device {device_id!r} is still in the registry after its removal; this is a bug in iotplat")
        state.doc("users").setdefault("users", {}).pop(device_id, None)
        state.mark("users")

    _, registry = _change(ref, "revoke", lambda path, text: reg.remove_device(path, text, device_id), prepare_state)
    return {"revoked": device_id, "lines": [f"revoked {device_id}: removed from {registry} and its credential deleted",
                                            "run `iotplat up` to remove it from the broker (it is refused from then on)"]}


def _broker_endpoints(platform: Platform, addresses: Mapping[str, str], port: int,
                      tls_name: str) -> list[dict[str, Any]]:
    """Where a device reaches the broker: Mosquitto one entry (broker.server_names[0], else its host's address);
    a NATS cluster every broker host's address (any node serves every device), else broker.server_names[0]
    alone when the hosts' addresses are not known yet (a DNS round-robin name or a load balancer in front).
    Every node's certificate carries the same names, so one tls_name verifies them all."""
    names = list(platform.spec.broker.server_names)
    hosts = platform.placement["broker"] if platform.spec.broker.engine == "nats" else [platform.host_of("broker")]
    known = [addresses[h] for h in hosts if addresses.get(h)]
    if platform.spec.broker.engine == "nats" and len(known) == len(hosts):
        found = known
    else:
        found = names[:1] or known[:1]
    if not found:
        raise IotplatError("the broker's address is not known yet: deploy first (`iotplat up`) or set broker.server_names")
    return [{"address": a, "port": port, "tls_name": tls_name} for a in found]


def kit(ref: SpecRef, device_id: str) -> dict[str, Any]:
    """A registry device's onboarding kit (the one place its secret is shown); never one of iotplat's own clients."""
    from iotplat.secrets.materials import ensure_materials
    from iotplat.spec.platform_model import template_names

    platform, _, _ = _platform(ref)
    if device_id == platform.canary.id:
        raise InvalidInput(f"{device_id!r} is iotplat's canary, an internal client: it has no onboarding kit")
    device = next((d for d in platform.devices if d.id == device_id), None)
    if device is None:
        raise InvalidInput(f"no device {device_id!r} in the registry (`iotplat device list`)")
    state = _state(platform, ref)
    with state.lock("device kit"):
        materials = ensure_materials(platform, state)
        state.save()
    password = materials.mqtt_users[device.id][0]
    deployed = state.read_json("deployed.json") or {}
    names = list(platform.spec.broker.server_names)
    listener = next((lst for lst in platform.spec.broker.listeners if lst.protocol == "mqtt"), platform.spec.broker.listeners[0])
    tls_name = names[0] if names else platform.service_name("broker")
    brokers = _broker_endpoints(platform, deployed.get("hosts", {}), listener.port, tls_name)
    address = brokers[0]["address"]
    nats = platform.spec.broker.engine == "nats"
    attrs = {"device": device.id, **dict(device.attributes)}
    topics = [t.format(**{n: attrs.get(n, "") for n in template_names(t)}) for t in platform.spec.devices.topics]
    # nats-server's MQTT is 3.1.1 only (README: Broker engines)
    sample = (f"mosquitto_pub -h {tls_name} -p {listener.port} --cafile ca.crt -u {device.id} -P '{password}' "
              f"-i {device.id} -V {'mqttv311' if nats else 'mqttv5'} -q 1 -t '{topics[0]}' "
              f"-m '{{\"ts\": $(date +%s%3N)}}'")
    protocol = "MQTT over WebSockets" if listener.protocol != "mqtt" else "MQTT 3.1.1" if nats else "MQTT 3.1.1/5"
    lines = [
        f"# onboarding kit for {device.id} ({platform.key}); it contains the device's secret: handle it like a password",
        f"broker:    {address}:{listener.port} ({protocol}, TLS only)",
    ]
    if len(brokers) > 1:
        lines.append("brokers:   " + ", ".join(f"{b['address']}:{b['port']}" for b in brokers)
                     + "  (a cluster: any of them; give your MQTT client library the whole list, it moves to the "
                       "next one when a node is down)")
    lines += [
        f"tls name:  {tls_name}" + ("" if names else f"  (map it to {address if len(brokers) == 1 else 'one of the addresses'} in /etc/hosts, "
                                          "or set broker.server_names)"),
        f"username:  {device.id}   (also the client id)",
        f"password:  {password}",
        "topics:    " + ", ".join(topics),
        "ca.crt:" + (f"  (two CAs: a CA rotation runs since {materials.ca_rotation_started}; install both)"
                     if materials.ca_rotation_started else ""),
        materials.ca_cert_pem.rstrip(),
        "example:" + ("  (mosquitto_pub takes one -h: when that node is down, use the next address of `brokers`)"
                      if len(brokers) > 1 else ""),
        f"  {sample}",
    ]
    return {"device": device.id, "broker": brokers[0], "brokers": brokers,
            "username": device.id, "password": password, "topics": topics, "ca_cert": materials.ca_cert_pem,
            "example": sample, "lines": lines}
