"""Load a spec: YAML -> apiVersion -> environment overlay -> schema -> device registry -> cross-checks.

Every phase collects all the problems it can before stopping, so `iotplat validate` reports everything
at once. The result is a frozen Platform.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from iotplat import API_VERSION
from iotplat.errors import InvalidInput, Problem, SpecInvalid
from iotplat.spec.checks import run_checks
from iotplat.spec.devices import REGISTRY_SUFFIXES, load_registry
from iotplat.spec.errors_map import problems_from
from iotplat.spec.model import DNS_LABEL, PlatformSpec, fullmatch_re
from iotplat.spec.platform_model import Platform
from iotplat.spec.yamlio import Document, PathT, dotted, load_yaml_file

MAX_SPEC_BYTES = 1024 * 1024
DEFAULT_ENVIRONMENT = "default"
# Older apiVersions and the function that lifts a document to the next version. Empty while only
# iotplat/v1 exists; `iotplat migrate` will apply these in order.
MIGRATIONS: dict[str, tuple[str, Any]] = {}
_OVERLAY_FORBIDDEN = ("apiVersion", "name", "environments")
# An environment names state and build folders and cloud stacks: a DNS label, the whole name (never `$`,
# which would let "prod\n" through).
_ENV_NAME = fullmatch_re(DNS_LABEL)


def read_document(path: Path, display: str | None = None) -> Document:
    return load_yaml_file(path, display or str(path), max_bytes=MAX_SPEC_BYTES, max_nodes=200_000)


def check_api_version(doc: Document) -> None:
    version = doc.data.get("apiVersion")
    if version == API_VERSION:
        return
    if version is None:
        raise SpecInvalid([doc.problem((), "missing required key 'apiVersion'", f"add `apiVersion: {API_VERSION}` as the first key")])
    if not isinstance(version, str):
        raise SpecInvalid([doc.problem(("apiVersion",), f"expected a string like {API_VERSION!r}")])
    if version in MIGRATIONS:
        raise SpecInvalid([doc.problem(("apiVersion",), f"{version} is an older spec format",
                                       f"run `iotplat migrate {doc.file}` to rewrite it as {API_VERSION}")])
    m = re.fullmatch(r"iotplat/v(\d+)(.*)", version)
    if m and (int(m.group(1)) > 1 or m.group(2)):
        raise SpecInvalid([doc.problem(("apiVersion",), f"{version} is not supported by this iotplat (it reads {API_VERSION})",
                                       "upgrade iotplat, or write the spec for iotplat/v1")])
    raise SpecInvalid([doc.problem(("apiVersion",), f"unknown apiVersion {version!r}", f"use {API_VERSION}")])


def environment_names(doc: Document) -> list[str]:
    envs = doc.data.get("environments")
    return sorted(envs) if isinstance(envs, dict) else []


def merge_environment(doc: Document, env: str) -> Document:
    """Apply environments.<env> to the base document (JSON merge patch, RFC 7396), keeping positions."""
    envs = doc.data.get("environments") or {}
    overlay = envs.get(env)
    base_path: PathT = ("environments", env)
    if overlay is None:
        overlay = {}
    if not isinstance(overlay, dict):
        raise SpecInvalid([doc.problem(base_path, "an environment is a mapping of overrides")])
    problems = [doc.problem(base_path + (k,), f"{k} cannot be changed per environment", key=True)
                for k in _OVERLAY_FORBIDDEN if k in overlay]
    if problems:
        raise SpecInvalid(problems)
    data = copy.deepcopy({k: v for k, v in doc.data.items() if k != "environments"})
    positions = {p: v for p, v in doc.positions.items() if not (p[:1] == ("environments",))}
    key_positions = {p: v for p, v in doc.key_positions.items() if not (p[:1] == ("environments",))}
    n = len(base_path)
    ov_pos = {p[n:]: v for p, v in doc.positions.items() if p[:n] == base_path}
    ov_key = {p[n:]: v for p, v in doc.key_positions.items() if p[:n] == base_path}
    _merge(data, overlay, (), positions, key_positions, ov_pos, ov_key)
    return Document(doc.file, data, positions, key_positions, base_path,
                    frozenset(ov_pos.values()) | frozenset(ov_key.values()))


def _in_overlay(problems: list[Problem], doc: Document) -> list[Problem]:
    """Problems located in an environment's overlay name the path where they are written."""
    if not doc.overlay:
        return problems
    prefix = dotted(doc.overlay)
    out = []
    for p in problems:
        if (p.line, p.column) in doc.overlay_positions and p.file == doc.file:
            path = (prefix + p.path if p.path.startswith("[") else f"{prefix}.{p.path}") if p.path else prefix
            p = Problem(p.file, p.line, p.column, path, p.message, p.hint)
        out.append(p)
    return out


def _drop(table: dict[PathT, tuple[int, int]], prefix: PathT) -> None:
    n = len(prefix)
    for p in [p for p in table if p[:n] == prefix]:
        del table[p]


def _merge(target: dict[str, Any], patch: dict[str, Any], path: PathT, pos: dict, kpos: dict, ov_pos: dict,
           ov_key: dict) -> None:
    for key, value in patch.items():
        here = path + (key,)
        if value is None:
            target.pop(key, None)
            _drop(pos, here)
            _drop(kpos, here)
            continue
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            if here in ov_key:
                kpos[here] = ov_key[here]
            _merge(target[key], value, here, pos, kpos, ov_pos, ov_key)
            continue
        target[key] = copy.deepcopy(value)
        _drop(pos, here)
        _drop(kpos, here)
        n = len(here)
        for p, v in ov_pos.items():
            if p[:n] == here:
                pos[p] = v
        for p, v in ov_key.items():
            if p[:n] == here:
                kpos[p] = v


def select_environment(doc: Document, env: str | None) -> list[tuple[str, Document]]:
    """The (environment, merged document) pairs to validate: one if env is given, else all."""
    names = environment_names(doc)
    envs = doc.data.get("environments")
    if envs is not None and not isinstance(envs, dict):
        raise SpecInvalid([doc.problem(("environments",), "environments is a mapping of name -> overrides")])
    bad = [doc.problem(("environments", n), f"environment name {n!r} must be a DNS label", key=True)
           for n in names if not _ENV_NAME.fullmatch(n)]
    if bad:
        raise SpecInvalid(bad)
    if env is None:
        if not names:
            return [(DEFAULT_ENVIRONMENT, doc)]
        return [(n, merge_environment(doc, n)) for n in names]
    if not names:
        if env == DEFAULT_ENVIRONMENT:
            return [(env, doc)]
        raise InvalidInput(f"{doc.file}: environment {env!r} is not declared; this spec has no `environments` section "
                           f"(omit --env, or add environments.{env})")
    if env not in names:
        raise InvalidInput(f"{doc.file}: environment {env!r} is not declared; declared: {', '.join(names)}")
    return [(env, merge_environment(doc, env))]


def build_platform(doc: Document, env: str, spec_path: Path, registry_override: tuple[Path, Path] | None = None) -> Platform:
    """Schema-validate one merged document, load its registry, run cross-checks.

    registry_override (registry, candidate): read that registry's content from the candidate file instead
    (`iotplat device add|revoke` validates a registry change before it replaces the file)."""
    try:
        spec = PlatformSpec.model_validate(doc.data)
    except ValidationError as exc:
        raise SpecInvalid(_in_overlay(problems_from(exc, doc), doc)) from None
    spec_dir = spec_path.parent
    devices = []
    problems: list[Problem] = []
    if spec.devices.registry:
        reg = Path(spec.devices.registry)
        reg_path = reg if reg.is_absolute() else spec_dir / reg
        display = str(Path(doc.file).parent / reg) if not reg.is_absolute() else str(reg)
        if reg.suffix.lower() not in REGISTRY_SUFFIXES:
            line, col = doc.where(("devices", "registry"))
            raise SpecInvalid([Problem(doc.file, line, col, "devices.registry",
                                       f"unknown registry format {reg.suffix or '(no extension)'!r}",
                                       "use a .csv or .yaml file")])
        if registry_override and Path(os.path.realpath(reg_path)) == Path(os.path.realpath(registry_override[0])):
            reg_path = registry_override[1]
        try:
            devices, problems = load_registry(reg_path, display)
        except InvalidInput as exc:
            line, col = doc.where(("devices", "registry"))
            problems = [Problem(doc.file, line, col, "devices.registry", str(exc).split(": ", 1)[-1],
                                "the path is relative to the spec file")]
    platform = Platform(spec=spec, environment=env, spec_file=doc.file, spec_dir=spec_dir, devices=tuple(devices))
    if problems:
        raise SpecInvalid(problems)
    problems = run_checks(platform, doc)
    if problems:
        raise SpecInvalid(_in_overlay(problems, doc))
    return platform


def load_platform(spec_path: Path, env: str | None = None, display: str | None = None) -> Platform:
    """Load exactly one environment of a spec (render, deploy, ...)."""
    doc = read_document(spec_path, display)
    check_api_version(doc)
    names = environment_names(doc)
    if env is None and names:
        raise InvalidInput(f"{doc.file}: this spec declares environments ({', '.join(names)}); choose one with --env")
    (name, merged), = select_environment(doc, env)
    return build_platform(merged, name, spec_path)


def validate_spec(spec_path: Path, env: str | None = None, display: str | None = None,
                  registry_override: tuple[Path, Path] | None = None) -> list[Platform]:
    """Validate one environment, or every declared environment; all problems are raised together."""
    doc = read_document(spec_path, display)
    check_api_version(doc)
    platforms: list[Platform] = []
    problems: list[Problem] = []
    for name, merged in select_environment(doc, env):
        try:
            platforms.append(build_platform(merged, name, spec_path, registry_override))
        except SpecInvalid as exc:
            problems.extend(exc.problems)
    if problems:
        raise SpecInvalid(problems)
    return platforms
