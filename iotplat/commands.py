"""Use cases behind the CLI. Each returns a plain dict (the --json result) or raises an IotplatError."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iotplat.errors import InvalidInput, IotplatError
from iotplat.resources import data_dir, default_spec_path

if TYPE_CHECKING:
    from iotplat.render.engine import FileEntry
    from iotplat.secrets.materials import Materials
    from iotplat.secrets.state import State
    from iotplat.spec.platform_model import Platform

Notify = Callable[[str], None]


def spec_path(spec: str | None) -> tuple[Path, str]:
    """The spec a command works on, and how to name it in messages: the given path, else ./platform.yaml, else
    the shipped default spec."""
    if spec:
        return Path(spec), spec
    local = Path("platform.yaml")
    if local.exists():
        return local, "platform.yaml"
    path = default_spec_path()
    return path, str(path)


def init(directory: str, force: bool = False) -> dict[str, Any]:
    """Write a starter spec, registry and schema into `directory`. All files or none: each is written to a temp
    file first and renamed into place only when every one was written; a folder that cannot be written is
    invalid input (exit 2), nothing changed."""
    import os

    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise InvalidInput(f"{directory}: exists and is not a folder")
    src = data_dir("platform")
    files = {
        "platform.yaml": (src / "platform.yaml").read_text(),
        "devices.csv": (src / "devices.csv").read_text(),
        "platform.schema.json": (src / "platform.schema.json").read_text(),
    }
    existing = [name for name in ("platform.yaml", "devices.csv") if (target / name).exists()]
    if existing and not force:
        raise InvalidInput(f"{target / existing[0]}: already exists; use --force to overwrite, or choose another folder")
    temps: list[Path] = []
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            tmp = target / f".{name}.iotplat-tmp"
            temps.append(tmp)
            tmp.write_text(text)
        for name, tmp in zip(files, temps):
            os.replace(tmp, target / name)
    except OSError as exc:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise InvalidInput(f"{directory}: cannot write the starter files there: {exc.strerror}; choose a folder "
                           "you can write (no file was written)") from None
    written = [str(target / name) for name in files]
    return {"written": written, "spec": str(target / "platform.yaml")}


def validate(spec: str, env: str | None) -> dict[str, Any]:
    from iotplat.spec.load import validate_spec

    path, display = spec_path(spec)
    platforms = validate_spec(path, env, display)
    return {
        "spec": display,
        "environments": [
            {"environment": p.environment, "target": p.target, "hosts": len(p.host_names), "devices": len(p.devices)}
            for p in platforms
        ],
    }


def assert_no_secrets(files: dict[str, bytes], secrets: set[str]) -> None:
    """Refuse to write a build directory that contains any secret value (defence in depth).

    The same matcher that masks output (iotplat.deploy.ansible.Masker): every secret in every form it masks,
    whatever its length or characters, in time linear in the files for 100,000 device passwords.
    """
    from iotplat.deploy.ansible import Masker

    finder = Masker(secrets)
    for name, data in files.items():
        if finder.finds(data.decode("utf-8", "surrogateescape")):
            raise IotplatError(f"refusing to write {name}: it would contain a secret value; this is a bug in iotplat")


@dataclass
class Prepared:
    """A spec loaded, its state brought up to date (under the lock) and its build directory written."""

    platform: Platform
    state: State
    materials: Materials
    out: Path
    files: dict[str, bytes]
    entries: list[FileEntry]
    written: list[str]
    removed: list[str]


def prepare(spec: str | None, env: str | None, out_dir: str | None = None, state_dir: str | None = None,
            notify: Notify | None = None) -> Prepared:
    """The shared first step of render, up, plan, status, ...: load, secrets (locked), render, write."""
    return prepare_platform(load(spec, env), out_dir, state_dir, notify)


def load(spec: str | None, env: str | None) -> Platform:
    """The spec (one environment) loaded and validated: a Platform."""
    from iotplat.spec.load import load_platform

    path, display = spec_path(spec)
    return load_platform(path, env, display)


def prepare_platform(platform: Platform, out_dir: str | None = None, state_dir: str | None = None,
                     notify: Notify | None = None) -> Prepared:
    """`prepare` for a Platform already loaded: the state brought up to date (locked), the build dir written."""
    from iotplat.render.engine import check_build_dir, render_platform, write_build_dir
    from iotplat.secrets.materials import ensure_materials
    from iotplat.secrets.state import State, resolve_state_root

    root = resolve_state_root(state_dir, platform.spec.state.dir, platform.spec_dir)
    out = Path(out_dir) if out_dir else Path("build") / platform.name / platform.environment
    check_build_dir(out, root)  # refused before the state is touched: nothing changes
    state = State.open(root, platform.name, platform.environment)
    if state.key_created_at and notify:
        notify(f"created a new vault password at {state.key_created_at}; keep it safe, the state directory "
               "cannot be decrypted without it")
    with state.lock("render"):
        materials = ensure_materials(platform, state)
        state.save()
    files, entries, _ = render_platform(platform, materials)
    assert_no_secrets(files, materials.secret_values())
    try:
        written, removed = write_build_dir(out, files, state_root=root)
    except OSError as exc:
        raise IotplatError(f"{out}: cannot write the build directory: {exc.strerror}") from None
    return Prepared(platform, state, materials, out, files, entries, written, removed)


def render(spec: str | None, env: str | None, out_dir: str | None = None, state_dir: str | None = None,
           notify: Notify | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    p = prepare(spec, env, out_dir, state_dir, notify)
    return {
        "platform": p.platform.name,
        "environment": p.platform.environment,
        "target": p.platform.target,
        "out": str(p.out),
        "state": str(p.state.dir),
        "files": len(p.files),
        "written": p.written,
        "removed": p.removed,
        "secret_files": sum(1 for e in p.entries if e.cls == "secret"),
        "hashes_computed": p.materials.hashes_computed,
        "seconds": round(time.perf_counter() - started, 3),
    }
