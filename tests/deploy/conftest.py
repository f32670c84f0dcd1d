"""Shared by this folder's host tests: a spec of their own deployed to throw-away local hosts from its own
state directory and vault key, the CLI run in-process, and the state's materials."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from iotplat.cli import main


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


def platform_materials(ctx: dict) -> tuple:
    """(platform, materials, state) of the module's platform, as the CLI sees them."""
    from iotplat.secrets.materials import ensure_materials
    from iotplat.secrets.state import State
    from iotplat.spec.load import load_platform

    p = load_platform(Path(ctx["spec"]))
    st = State.open(Path(ctx["env"]["IOTPLAT_STATE_DIR"]), p.name, p.environment)
    return p, ensure_materials(p, st), st
