"""The engine of the `pulumi` double: run the program, turn its registrations into steps, preview or apply them.

A step per registered resource (create / same / update / replace, from langhost.py's diff) plus a delete step
per resource of the last state the program no longer declares (and per resource a previous failed update
left pending deletion). `preview --json` prints Pulumi's preview digest (same steps hidden unless
--show-sames, create-replacement/delete-replaced hidden unless --show-replacement-steps, default providers
never shown); `up` walks the steps in registration order against the emulated cloud's rules (cloud.check:
address in use, volume in use, ...), replacing create-before-delete (AWS) or delete-before-replace (Azure),
deletes last in reverse dependency order, saves the checkpoint with exactly the steps that succeeded, and
then materialises the result (cloud.reconcile).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import cloud
from .backend import Backend, CliError, new_salt, now, read_passphrase, salt_in, save_salt, verify

HERE = Path(__file__).resolve().parent
UNKNOWN = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"
SYMBOL = {"create": "+", "update": "~", "replace": "+-", "delete": "-", "same": " "}
VERB = {"create": ("creating", "created"), "update": ("updating", "updated"), "replace": ("replacing", "replaced"),
        "delete": ("deleting", "deleted"), "same": ("", "")}


@dataclass
class Context:
    cwd: Path
    env: dict[str, str]
    backend: Backend
    stack: str
    config_file: Path | None
    out: Callable[[str], None]
    err: Callable[[str], None]


@dataclass
class Step:
    op: str
    urn: str
    type: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None
    diffs: list[str] = field(default_factory=list)
    replaces: list[str] = field(default_factory=list)
    delete_before_replace: bool = False
    property_dependencies: dict[str, list[str]] = field(default_factory=dict)


def display_type(typ: str) -> str:
    """`aws:ec2/vpc:Vpc` is shown as `aws:ec2:Vpc`, as Pulumi's progress output does."""
    parts = typ.split(":")
    if len(parts) == 3 and "/" in parts[1]:
        parts[1] = parts[1].split("/", 1)[0]
    return ":".join(parts)


# --- config and secrets ---------------------------------------------------------------------------------


def load_config(ctx: Context) -> tuple[dict[str, str], Path]:
    """The stack config as the program receives it (objects as JSON text) and the file it came from."""
    path = ctx.config_file or (ctx.cwd / f"Pulumi.{ctx.stack}.yaml")
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CliError(f"could not parse {path}: {exc}") from None
        raw = dict(doc.get("config") or {})
    elif ctx.config_file is not None:
        raise CliError(f"could not read config file {path}: open {path}: no such file or directory")
    project = ctx.backend.project
    config: dict[str, str] = {}
    for key, value in raw.items():
        full = key if ":" in key else f"{project}:{key}"
        if isinstance(value, dict) and set(value) == {"secure"}:
            raise CliError(f"{full}: secure config values are not emulated")
        if isinstance(value, bool):
            config[full] = "true" if value else "false"
        elif isinstance(value, (dict, list)):
            config[full] = json.dumps(value)
        else:
            config[full] = str(value)
    check_project_config(ctx.cwd, config, project)
    return config, path


def check_project_config(cwd: Path, config: dict[str, str], project: str) -> None:
    """Pulumi validates typed keys the project declares (Pulumi.yaml `config:`)."""
    try:
        declared = (yaml.safe_load((cwd / "Pulumi.yaml").read_text()) or {}).get("config") or {}
    except (OSError, yaml.YAMLError):
        return
    for key, spec in declared.items():
        full = key if ":" in key else f"{project}:{key}"
        if not isinstance(spec, dict):
            continue
        if full not in config and "default" not in spec and "value" not in spec:
            raise CliError(f"Stack '{project}' is missing configuration value '{full}'")
        if full in config and spec.get("type") == "array":
            try:
                ok = isinstance(json.loads(config[full]), list)
            except ValueError:
                ok = False
            if not ok:
                raise CliError(f"Stack '{project}' with configuration key '{full}' must be of type 'array'")


def secrets_manager(ctx: Context, config_path: Path) -> None:
    """Pulumi builds the stack's secrets manager for every preview/up/destroy: with a passphrase, from the
    config file's `encryptionsalt`, or (none there) a new one that it then writes into that file."""
    passphrase = read_passphrase(ctx.env)
    salt = salt_in(config_path) if config_path.exists() or ctx.config_file is None else None
    if salt:
        verify(passphrase, salt)
        return
    state_salt = ctx.backend.state_salt(ctx.stack)
    if state_salt and ctx.env.get("PULUMI_FALLBACK_TO_STATE_SECRETS_MANAGER", "").lower() in ("1", "true"):
        verify(passphrase, state_salt)
        salt = state_salt
    else:
        salt = new_salt(passphrase)
    try:
        save_salt(config_path, salt)
    except OSError as exc:
        raise CliError(f"save stack config: {exc}") from None


# --- running the program -----------------------------------------------------------------------------------


def python_command(env: dict[str, str]) -> str:
    cmd = env.get("PULUMI_PYTHON_CMD")
    if cmd:
        return cmd
    for name in ("python3", "python"):
        found = shutil.which(name, path=env.get("PATH", ""))
        if found:
            return found
    raise CliError("Failed to locate any of [python3 python] on your PATH.  Have you installed Python 3.6 or "
                   "greater?")


def run_program(ctx: Context, config: dict[str, str], preview: bool, old: list[dict[str, Any]],
                public_net: str | None) -> dict[str, Any]:
    request = {
        "project": ctx.backend.project, "stack": ctx.stack, "preview": preview, "config": config,
        "old": {r["urn"]: r for r in old if not r.get("delete")},
        "public_net": public_net,
        "used_public": sorted(cloud.public_ips_in(old)),
        "region": config.get("aws:region") or config.get("azure-native:location") or "",
        "subscription": ctx.env.get("ARM_SUBSCRIPTION_ID", ""),
    }
    python = python_command(ctx.env)
    with tempfile.TemporaryDirectory(prefix="cloudsim-run-") as tmp:
        req_path, res_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps(request))
        try:
            proc = subprocess.run([python, str(HERE / "langhost.py"), str(req_path), str(res_path)], cwd=ctx.cwd,
                                  env=ctx.env, capture_output=True, text=True, timeout=600)
        except FileNotFoundError:
            raise CliError(f"Failed to locate {python}: no such file or directory") from None
        if not res_path.exists():
            text = (proc.stderr + proc.stdout).rstrip()
            raise ProgramFailed(f"{text}\nerror: Program exited with non-zero exit code: {proc.returncode}")
        result = json.loads(res_path.read_text())
    result["stdout"] = proc.stdout
    if not result["ok"]:
        raise ProgramFailed(result["error"], result)
    return result


class ProgramFailed(Exception):
    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.result = result


# --- steps -------------------------------------------------------------------------------------------------


def state_record(reg: dict[str, Any], created: str | None = None) -> dict[str, Any]:
    rec = {"urn": reg["urn"], "custom": reg["custom"], "type": reg["type"]}
    if reg["custom"]:
        rec["id"] = reg["id"]
    rec["inputs"] = reg.get("inputs", {})
    rec["outputs"] = reg.get("outputs", {})
    if reg.get("parent"):
        rec["parent"] = reg["parent"]
    for key in ("dependencies", "propertyDependencies"):
        if reg.get(key):
            rec[key] = reg[key]
    if reg.get("provider"):
        rec["provider"] = reg["provider"]
    if reg.get("protect"):
        rec["protect"] = True
    rec["created"] = created or now()
    rec["modified"] = now()
    return rec


def build_steps(result: dict[str, Any], old: list[dict[str, Any]]) -> tuple[list[Step], list[dict[str, Any]]]:
    """(steps in execution order, provider records for the new state)."""
    by_urn = {r["urn"]: r for r in old if not r.get("delete")}
    root = result["root_urn"]
    root_reg = {"urn": root, "type": "pulumi:pulumi:Stack", "name": root.rsplit("::", 1)[1], "custom": False,
                "inputs": {}, "outputs": result["stack_outputs"], "op": "same" if root in by_urn else "create"}
    if root in by_urn and by_urn[root].get("outputs") != result["stack_outputs"]:
        root_reg["outputs_changed"] = True
    steps = [Step(root_reg["op"], root, root_reg["type"], by_urn.get(root), root_reg)]
    for reg in result["registrations"]:
        if not reg["custom"]:
            reg["outputs"] = result["component_outputs"].get(reg["urn"], {})
        steps.append(Step(reg["op"], reg["urn"], reg["type"], by_urn.get(reg["urn"]), reg, reg["diffs"],
                          reg["replaces"], reg.get("deleteBeforeReplace", False), reg["propertyDependencies"]))
    providers = []
    for prov in result["providers"]:
        providers.append({"urn": prov["urn"], "custom": True, "id": prov["id"],
                          "type": prov["urn"].split("::")[2], "inputs": prov["inputs"], "outputs": prov["inputs"]})
    declared = {s.urn for s in steps} | {p["urn"] for p in providers}
    gone = [r for r in old if r["urn"] not in declared or r.get("delete")]
    for r in reversed(gone):  # dependents before what they depend on
        if r["type"].startswith("pulumi:providers:"):
            continue
        steps.append(Step("delete", r["urn"], r["type"], r, None))
    return steps, providers


def change_summary(steps: list[Step]) -> dict[str, int]:
    summary: dict[str, int] = {}
    for s in steps:
        summary[s.op] = summary.get(s.op, 0) + 1
    return summary


def preview_digest(steps: list[Step], config: dict[str, str], show_sames: bool, show_replacement_steps: bool,
                   duration_ns: int) -> dict[str, Any]:
    unknown_from = {s.urn for s in steps if s.op in ("create", "replace")}
    out = []
    for s in steps:
        shown: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]] = []
        if s.op == "same":
            if show_sames or s.type == "pulumi:pulumi:Stack":
                shown.append(("same", s.old, s.new))
        elif s.op == "replace" and show_replacement_steps:
            first = ("delete-replaced", s.old, None) if s.delete_before_replace else ("create-replacement", s.old, s.new)
            second = ("create-replacement", s.old, s.new) if s.delete_before_replace else ("delete-replaced", s.old, None)
            shown += [first, ("replace", s.old, s.new), second]
        else:
            shown.append((s.op, s.old, s.new))
        for op, old, new in shown:
            step: dict[str, Any] = {"op": op, "urn": s.urn}
            if s.type != "pulumi:pulumi:Stack" and (new or old or {}).get("provider"):
                step["provider"] = (new or old or {})["provider"]
            if old is not None:
                step["oldState"] = _display_state(old)
            if new is not None:
                step["newState"] = _display_state(new, s, unknown_from)
            if s.diffs:
                step["diffReasons"] = s.diffs
            if s.replaces:
                step["replaceReasons"] = s.replaces
            out.append(step)
    return {"config": config, "steps": out, "duration": duration_ns, "changeSummary": change_summary(steps)}


def _display_state(rec: dict[str, Any], step: Step | None = None, unknown_from: set[str] | None = None) -> dict:
    inputs = dict(rec.get("inputs") or {})
    if step is not None and unknown_from:
        for key, deps in step.property_dependencies.items():
            if key in inputs and any(d in unknown_from for d in deps):
                inputs[key] = UNKNOWN  # known only once the resource it comes from exists
    state = {"urn": rec["urn"], "custom": rec.get("custom", False), "type": rec["type"], "inputs": inputs}
    if step is None and rec.get("id"):
        state["id"] = rec["id"]
    if rec.get("parent"):
        state["parent"] = rec["parent"]
    return state


# --- apply -------------------------------------------------------------------------------------------------


def apply(ctx: Context, steps: list[Step], providers: list[dict[str, Any]], old: list[dict[str, Any]],
          progress: bool = True) -> tuple[list[dict[str, Any]], str | None, dict[str, int]]:
    """Walk the steps against the emulated cloud's rules. Returns (new state, error or None, counts)."""
    live: dict[str, dict[str, Any]] = {r["urn"]: r for r in old}
    order: list[str] = [r["urn"] for r in old]
    pending_delete: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    created = {r["urn"]: r.get("created") for r in old}
    for prov in providers:
        if prov["urn"] not in live:
            order.insert(0, prov["urn"])
        live[prov["urn"]] = {**prov, "created": created.get(prov["urn"]) or now(), "modified": now()}

    def show(step: Step, verb: str, error: str | None = None) -> None:
        if not progress or step.op == "same":
            return
        name = step.urn.rsplit("::", 1)[1]
        line = f" {SYMBOL[step.op]:<2} {display_type(step.type)} {name} {verb}"
        ctx.out(line + (f" error: {error}" if error else ""))

    def count(op: str) -> None:
        counts[op] = counts.get(op, 0) + 1

    error: str | None = None
    failed: Step | None = None
    for step in steps:
        if step.op == "delete":
            continue
        new = step.new or {}
        rec = state_record(new, created.get(step.urn)) if step.op != "create" else state_record(new)
        if step.type == "pulumi:pulumi:Stack":
            rec = {"urn": step.urn, "custom": False, "type": step.type, "outputs": new.get("outputs", {}),
                   "created": created.get(step.urn) or now(), "modified": now()}
        if step.op == "same":
            if step.urn not in live:
                order.append(step.urn)
            live[step.urn] = rec if step.type == "pulumi:pulumi:Stack" else {**(step.old or {}), **{
                k: rec[k] for k in ("parent", "dependencies", "propertyDependencies", "outputs") if k in rec}}
            count("same")
            continue
        show(step, VERB[step.op][0] + " (0s)")
        try:
            view = dict(live)
            if step.op == "replace" and step.delete_before_replace:
                view.pop(step.urn, None)
            cloud.check(step.op, rec, step.old, view)
        except cloud.CloudError as exc:
            error, failed = str(exc), step
            show(step, f"**{VERB[step.op][0]} failed**", error)
            break
        if step.op == "replace":
            if not step.delete_before_replace:
                pending_delete.append(dict(step.old or {}, delete=True))
        if step.urn not in live:
            order.append(step.urn)
        live[step.urn] = rec
        count(step.op)
        show(step, f"{VERB[step.op][1]} (0s)")
    if error is None:
        for step in steps:
            if step.op != "delete":
                continue
            show(step, "deleting (0s)")
            live.pop(step.urn, None)
            count("delete")
            show(step, "deleted (0s)")
        pending_delete = []
    resources = [live[u] for u in order if u in live] + pending_delete
    if error is not None and failed is not None:
        error = f"{display_type(failed.type)} ({failed.urn.rsplit('::', 1)[1]}):\n    error: {error}"
    return _topo(resources), error, counts


def _topo(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pulumi's checkpoints list providers first and every resource after its parent and dependencies."""
    by_urn = {r["urn"]: r for r in resources if not r.get("delete")}
    done: set[str] = set()
    out: list[dict[str, Any]] = []

    def visit(r: dict[str, Any], stack: tuple[str, ...] = ()) -> None:
        if r["urn"] in done or r["urn"] in stack:
            return
        deps = [r.get("parent", "")] + list(r.get("dependencies", []))
        prov = (r.get("provider") or "").rsplit("::", 1)[0]
        for d in [prov, *deps]:
            if d in by_urn:
                visit(by_urn[d], stack + (r["urn"],))
        done.add(r["urn"])
        out.append(r)

    for r in sorted(resources, key=lambda x: not x["type"].startswith("pulumi:providers:")):
        if not r.get("delete"):
            visit(r)
    return out + [r for r in resources if r.get("delete")]


def summary_lines(counts: dict[str, int], unchanged: int) -> list[str]:
    lines = ["Resources:"]
    for op, label in (("create", "created"), ("update", "updated"), ("replace", "replaced"), ("delete", "deleted")):
        if counts.get(op):
            lines.append(f"    {SYMBOL[op]} {counts[op]} {label}")
    if unchanged:
        lines.append(f"    {unchanged} unchanged")
    return lines


def outputs_lines(outputs: dict[str, Any]) -> list[str]:
    if not outputs:
        return []
    width = max(len(k) for k in outputs)
    lines = ["Outputs:"]
    for key in sorted(outputs):
        value = json.dumps(outputs[key], indent=4).replace("\n", "\n    ")
        lines.append(f"    {key:<{width}}: {value}")
    return lines + [""]


def duration(start: float) -> str:
    secs = int(time.monotonic() - start)
    return f"Duration: {secs // 60}m{secs % 60}s" if secs >= 60 else f"Duration: {secs}s"


def default_env() -> dict[str, str]:
    return dict(os.environ)


def stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
