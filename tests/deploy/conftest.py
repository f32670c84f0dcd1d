"""Shared by this folder's host tests: a spec of their own deployed to throw-away local hosts from its own
state directory and vault key, the CLI run in-process, the state's materials, and a device's MQTT connect."""

from __future__ import annotations

import os
import shutil
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import yaml

from iotplat.cli import main
from tests.helpers import clear_leftover_instance


def local_platform(work: Path, source: Path, edit: Callable[[dict], None], *, devices: list[str] | None = None,
                   env: dict[str, str] | None = None, destroy_data: bool = True) -> Iterator[dict]:
    """For a module fixture (`yield from`): `source` (a platform.yaml) copied to `work`, changed by `edit`
    (name and network at least: every module has its own /24), with a devices.csv of `devices` when given.
    The context holds spec, build, work and the env (state dir, vault key, `env`) that the module's tests
    run with (see `module_env`). At the end the platform is destroyed (`--data` unless told otherwise)."""
    if os.geteuid() != 0 or not shutil.which("systemd-nspawn"):
        pytest.skip("needs root and systemd-nspawn (apt-get install systemd-container)")
    spec_dir = work / "spec"
    spec_dir.mkdir()
    spec = yaml.safe_load(source.read_text())
    edit(spec)
    if devices is not None:
        (spec_dir / "devices.csv").write_text("id\n" + "".join(f"{d}\n" for d in devices))
        spec.setdefault("devices", {})["registry"] = "devices.csv"
    (spec_dir / "platform.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    clear_leftover_instance(f"{spec['name']}-default")  # the tests deploy the default environment
    key = work / "vault-key"
    key.write_text(f"{work.name}-vault-password-0123456789abcdef")
    key.chmod(0o600)
    ctx = {"work": work, "dir": spec_dir, "spec": str(spec_dir / "platform.yaml"), "build": str(work / "build"),
           "env": {"IOTPLAT_STATE_DIR": str(work / "state"), "IOTPLAT_VAULT_PASSWORD_FILE": str(key), **(env or {})}}
    saved = {k: os.environ.get(k) for k in ctx["env"]}
    try:
        yield ctx
    finally:
        os.environ.update(ctx["env"])
        main(["destroy", ctx["spec"], "--out", ctx["build"], "--yes", *(["--data"] if destroy_data else [])])
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def module_env(ctx: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """For a module's autouse fixture: every test works on the module's platform (its state dir and key)."""
    for k, v in ctx["env"].items():
        monkeypatch.setenv(k, v)


def run_cli(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capfd.readouterr()
    return int(code), out, err


def platform_materials(ctx: dict, env: str | None = None) -> tuple:
    """(platform, materials, state) of the module's platform (environment `env`), as the CLI sees them."""
    from iotplat.secrets.materials import ensure_materials
    from iotplat.secrets.state import State
    from iotplat.spec.load import load_platform

    p = load_platform(Path(ctx["spec"]), env)
    st = State.open(Path(ctx["env"]["IOTPLAT_STATE_DIR"]), p.name, p.environment)
    return p, ensure_materials(p, st), st


def mqtt_connect(addr: str, ca_file: str, user: str | None, password: str | None, *, port: int = 8883,
                 protocol: int = mqtt.MQTTv5, clean: bool = True) -> tuple[mqtt.Client, dict]:
    """Connect over TLS trusting only `ca_file` and wait up to 8 s for the CONNACK. seen["rc"] is the reason code
    (or the exception), seen["disconnects"] counts drops. The certificate's name is not checked: the tests
    dial addresses (names are checked where that is the point). `clean` applies to MQTT 3.1.1 only."""
    seen: dict = {"rc": None, "disconnects": 0}
    session = {"clean_session": clean} if protocol != mqtt.MQTTv5 else {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user or "anon", protocol=protocol, **session)
    tls = ssl.create_default_context(cafile=ca_file)
    tls.check_hostname = False
    c.tls_set_context(tls)
    if user:
        c.username_pw_set(user, password)
    c.on_connect = lambda cl, ud, fl, rc, pr=None: seen.__setitem__("rc", rc)
    c.on_disconnect = lambda cl, ud, fl, rc, pr=None: seen.__setitem__("disconnects", seen["disconnects"] + 1)
    try:
        c.connect(addr, port, keepalive=20)
    except OSError as exc:  # ssl.SSLError included
        seen["rc"] = exc
        return c, seen
    c.loop_start()
    deadline = time.monotonic() + 8
    while seen["rc"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return c, seen
