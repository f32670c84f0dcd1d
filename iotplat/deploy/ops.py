"""Use cases that touch hosts: up, plan, status, destroy. Each returns a dict (the --json result)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iotplat.deploy import upgrade
from iotplat.errors import ExitCode, IotplatError
from iotplat.secrets.materials import Materials
from iotplat.secrets.state import State, resolve_state_root
from iotplat.spec.platform_model import Platform

Progress = Callable[[str], None]
DEPLOYED = "deployed.json"


@dataclass
class Context:
    platform: Platform
    state: State
    materials: Materials
    build: Path


def _cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iotplat"


def open_context(spec: str | None, env: str | None, state_dir: str | None, out_dir: str | None,
                 progress: Progress) -> Context:
    from iotplat.commands import prepare

    p = prepare(spec, env, out_dir, state_dir, progress)
    return Context(p.platform, p.state, p.materials, p.out)


_GRAFANA_SKIPPED = re.compile(r"Grafana skipped(?: on [^:]+)?: (.+?)\"?\s*$")


def _grafana_outcome(output: str) -> tuple[bool, str]:
    """The grafana role prints `Grafana skipped on HOST: REASON` when it skips (grafana.required false)."""
    for line in output.splitlines():
        m = _GRAFANA_SKIPPED.search(line)
        if m:
            return False, m.group(1).strip().rstrip(".").replace("\\n", " ")
    return True, ""


def up(spec: str | None, env: str | None, *, state_dir: str | None = None, out_dir: str | None = None,
       progress: Progress = print, verify: bool = True) -> dict[str, Any]:
    from iotplat.deploy.ansible import run_playbook
    from iotplat.deploy.targets import acquire_hosts
    from iotplat.deploy.wheelhouse import build_wheelhouse

    started = time.monotonic()
    ctx = open_context(spec, env, state_dir, out_dir, progress)
    p = ctx.platform
    with ctx.state.lock("up"):
        progress(f"[1/4] rendered {p.key} into {ctx.build}")
        hosts = acquire_hosts(p, ctx.build, ctx.state.dir, create=True)
        progress("[2/4] hosts ready: " + ", ".join(f"{h.name} ({h.address})" for h in hosts))
        wheelhouse = build_wheelhouse(_cache_dir() / "wheelhouse")
        current = upgrade.versions(ctx.build, wheelhouse)
        changed = upgrade.changes(ctx.state.read_json(DEPLOYED), current, p)
        if changed:
            progress(f"[3/4] upgrading {', '.join(map(str, changed))}: one host at a time, canary after each")
            result = _rolling(ctx, hosts, wheelhouse, changed, progress)
        else:
            progress(f"[3/4] configuring {len(hosts)} host(s) with Ansible")
            result = run_playbook(ctx.build, hosts, ctx.materials, ctx.state.dir, wheelhouse, progress=progress)
        grafana_deployed, grafana_reason = _grafana_outcome(result.output)
        summary = {h: vars(r) for h, r in sorted(result.recap.items())}
        if result.returncode != 0 or result.failed:
            detail = "; ".join(result.failures[:3]) or result.output.strip().splitlines()[-1:] or ["see output"]
            raise DeployFailed(f"deploy failed on {result.failed} host(s): {detail}", summary)
        manifest = json.loads((ctx.build / "manifest.json").read_text())
        ctx.state.write_json("manifest.json", manifest)
        ctx.state.write_json(DEPLOYED, {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "grafana": {"deployed": grafana_deployed and bool(p.placement["grafana"]), "reason": grafana_reason},
            "hosts": {h.name: h.address for h in hosts},
            "versions": current,
        })
    out: dict[str, Any] = {
        "platform": p.name, "environment": p.environment, "target": p.target, "build": str(ctx.build),
        "hosts": {h.name: h.address for h in hosts}, "recap": summary, "changed": result.changed,
        "grafana": {"deployed": grafana_deployed, "reason": grafana_reason},
        "upgraded": [vars(c) for c in changed],
        "seconds": round(time.monotonic() - started, 1),
    }
    if grafana_reason:
        progress(f"      grafana skipped: {grafana_reason}")
    if verify:
        progress("[4/4] verifying")
        report = status_of(ctx, hosts, grafana_deployed, grafana_reason=grafana_reason)
        out["status"] = [c.as_dict() for c in report.checks]
        out["ok"] = report.ok
        for c in report.checks:
            progress(f"      {c.mark} {c.host:<10} {c.name}: {c.detail}")
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


class DeployFailed(IotplatError):
    def __init__(self, message: str, recap: dict[str, Any]) -> None:
        super().__init__(message)
        self.recap = recap


def _rolling(ctx: Context, hosts: list, wheelhouse: Path, changed: list, progress: Progress):
    """A rolling upgrade (iotplat/deploy/upgrade.py): the playbook on one host at a time, then the canary;
    stop at the first failure with the roll-back hint."""
    from iotplat.deploy.ansible import PlaybookResult, run_playbook

    order = upgrade.rolling_order(ctx.platform, [h.name for h in hosts], changed)
    hint = upgrade.rollback_hint(changed, ctx.platform.spec_file)
    total = PlaybookResult(returncode=0)
    outputs: list[str] = []

    def stop(why: str) -> DeployFailed:
        return DeployFailed(f"{why}; {hint}", {h: vars(x) for h, x in sorted(total.recap.items())})

    for i, name in enumerate(order, 1):
        progress(f"      [{i}/{len(order)}] {name}")
        r = run_playbook(ctx.build, hosts, ctx.materials, ctx.state.dir, wheelhouse, limit=name, progress=progress)
        total.recap.update(r.recap)
        total.changed_tasks += r.changed_tasks
        total.failures += r.failures
        total.returncode = max(total.returncode, r.returncode)
        outputs.append(r.output)
        left = ", ".join(order[i:]) or "none"
        if r.returncode != 0 or r.failed:
            detail = "; ".join(r.failures[:2]) or "see output"
            raise stop(f"upgrade stopped on {name} (hosts not yet upgraded: {left}): {detail}")
        if set(order[:i]) & set(ctx.platform.placement["grafana"]):
            grafana_deployed, grafana_reason = _grafana_outcome("\n".join(outputs))
            report = status_of(ctx, hosts, grafana_deployed, grafana_reason=grafana_reason)
        else:  # Grafana's host not reached yet: as the last deploy left it
            report = status_of(ctx, hosts)
        if not report.ok:
            bad = "; ".join([f"{c.host} {c.name}: {c.detail}" for c in report.checks if not (c.ok or c.skipped)][:3])
            raise stop(f"upgrade stopped after {name}: the canary/status failed ({bad}); hosts not yet upgraded: {left}")
        progress(f"      canary ok after {name}")
    total.output = "\n".join(outputs)
    return total


def status_of(ctx: Context, hosts: list, grafana_deployed: bool | None = None, canary: bool = True,
              grafana_reason: str = ""):
    from iotplat.verify.status import status

    if grafana_deployed is None:
        deployed = ctx.state.read_json(DEPLOYED) or {}
        grafana_deployed = bool(deployed.get("grafana", {}).get("deployed", False))
        grafana_reason = deployed.get("grafana", {}).get("reason", "")
    return status(ctx.platform, ctx.materials, hosts, grafana_deployed, canary=canary, grafana_reason=grafana_reason)


def status_cmd(spec: str | None, env: str | None, *, state_dir: str | None = None, out_dir: str | None = None,
               progress: Progress = print, canary: bool = True) -> tuple[dict[str, Any], int]:
    from iotplat.deploy.targets import acquire_hosts

    ctx = open_context(spec, env, state_dir, out_dir, lambda s: None)
    if ctx.state.read_json(DEPLOYED) is None:
        raise IotplatError(f"{ctx.platform.key} has not been deployed from this state directory; run `iotplat up`")
    hosts = acquire_hosts(ctx.platform, ctx.build, ctx.state.dir, create=False)
    report = status_of(ctx, hosts, canary=canary)
    return ({"platform": ctx.platform.name, "environment": ctx.platform.environment, "ok": report.ok,
             "checks": [c.as_dict() for c in report.checks]}, ExitCode.OK if report.ok else ExitCode.FAILURE)


def plan(spec: str | None, env: str | None, *, state_dir: str | None = None, out_dir: str | None = None,
         progress: Progress = print) -> tuple[dict[str, Any], int]:
    from iotplat.deploy.ansible import run_playbook
    from iotplat.deploy.targets import acquire_hosts
    from iotplat.deploy.wheelhouse import build_wheelhouse

    ctx = open_context(spec, env, state_dir, out_dir, lambda s: None)
    with ctx.state.lock("plan"):
        hosts = acquire_hosts(ctx.platform, ctx.build, ctx.state.dir, create=False)
        wheelhouse = build_wheelhouse(_cache_dir() / "wheelhouse")
        upgrades = upgrade.changes(ctx.state.read_json(DEPLOYED), upgrade.versions(ctx.build, wheelhouse), ctx.platform)
        for c in upgrades:
            progress(f"  upgrade  {c} (up rolls it out one host at a time)")
        result = run_playbook(ctx.build, hosts, ctx.materials, ctx.state.dir, wheelhouse, check=True, progress=progress)
    if result.returncode != 0 and not result.recap:
        raise IotplatError("plan could not run: " + "; ".join(result.failures[:3] or result.output.splitlines()[-1:]))
    changes = [{"host": h, "task": t} for h, t in result.changed_tasks]
    diffs = _diff_blocks(result.output)
    code = ExitCode.DRIFT if result.changed else ExitCode.OK
    if result.failed:
        code = ExitCode.FAILURE
    return ({"platform": ctx.platform.name, "environment": ctx.platform.environment, "changes": changes,
             "changed": result.changed, "drift": result.changed > 0, "diff": diffs,
             "upgrades": [vars(c) for c in upgrades]}, code)


def _diff_blocks(output: str) -> list[str]:
    blocks, cur = [], []
    for line in output.splitlines():
        if line.startswith("--- before"):
            cur = [line]
        elif cur:
            cur.append(line)
            if not line.strip():
                blocks.append("\n".join(cur))
                cur = []
    return blocks


def destroy(spec: str | None, env: str | None, *, data: bool = False, state_dir: str | None = None,
            out_dir: str | None = None, progress: Progress = print) -> dict[str, Any]:
    from iotplat.deploy.ansible import run_playbook
    from iotplat.deploy.targets import acquire_hosts, release_hosts

    ctx = open_context(spec, env, state_dir, out_dir, lambda s: None)
    p = ctx.platform
    with ctx.state.lock("destroy"):
        removed = []
        if p.target != "local":
            hosts = acquire_hosts(p, ctx.build, ctx.state.dir, create=False)
            result = run_playbook(ctx.build, hosts, ctx.materials, ctx.state.dir, None, progress=progress,
                                  playbook="destroy.yml", extra_vars={"iotplat_destroy_data": data})
            if result.returncode != 0:
                raise IotplatError("destroy failed: " + "; ".join(result.failures[:3]))
            removed.append("services stopped and removed" + (" with their data" if data else " (data kept)"))
        removed.append(release_hosts(p, ctx.state.dir))
        for name in ("manifest.json", DEPLOYED):
            (ctx.state.dir / name).unlink(missing_ok=True)
    return {"platform": p.name, "environment": p.environment, "removed": removed}


def logs(spec: str | None, env: str | None, *, service: str | None, host: str | None, since: str | None,
         follow: bool, lines: int | None, state_dir: str | None = None, out_dir: str | None = None,
         emit: Callable[[Any], None] = print) -> dict[str, Any]:
    from iotplat.deploy import logs as journal
    from iotplat.deploy.ansible import masker_for
    from iotplat.deploy.targets import acquire_hosts

    ctx = open_context(spec, env, state_dir, out_dir, lambda s: None)
    hosts = acquire_hosts(ctx.platform, ctx.build, ctx.state.dir, create=False)
    mask = masker_for(ctx.materials)
    if follow:
        count = 0
        for line in journal.follow(ctx.platform, hosts, mask, service=service, host=host, since=since):
            emit(line)
            count += 1
        return {"lines": count}
    collected = journal.collect(ctx.platform, hosts, mask, service=service, host=host, since=since, lines=lines)
    for line in collected:
        emit(line)
    return {"lines": len(collected)}


def backup(spec: str | None, env: str | None, *, to: str | None, state_dir: str | None = None,
           out_dir: str | None = None, progress: Progress = print) -> dict[str, Any]:
    from iotplat.deploy import backup as bk
    from iotplat.deploy.targets import acquire_hosts

    ctx = open_context(spec, env, state_dir, out_dir, lambda s: None)
    if ctx.state.read_json(DEPLOYED) is None:
        raise IotplatError(f"{ctx.platform.key} has not been deployed from this state directory; nothing to back up")
    hosts = acquire_hosts(ctx.platform, ctx.build, ctx.state.dir, create=False)
    with ctx.state.lock("backup"):
        result = bk.create(ctx, hosts, Path(to) if to else Path("backups"), progress=progress)
    return {"platform": ctx.platform.name, "environment": ctx.platform.environment, **result}


def restore(spec: str | None, env: str | None, *, archive: str, state_dir: str | None = None,
            out_dir: str | None = None, progress: Progress = print) -> dict[str, Any]:
    from iotplat.commands import _spec_path
    from iotplat.deploy import backup as bk
    from iotplat.deploy.targets import acquire_hosts
    from iotplat.spec.load import load_platform

    path, display = _spec_path(spec)
    platform = load_platform(path, env, display)
    info, members = bk.open_archive(Path(archive))  # verified before anything changes
    bk.check_fits(info, platform)
    root = resolve_state_root(state_dir, platform.spec.state.dir, platform.spec_dir)
    target = root / platform.name / platform.environment
    state = State.open(root, platform.name, platform.environment)
    with state.lock("restore"):
        bk.restore_state(info, members, target, platform.name, platform.environment)
    progress(f"restored the state of {platform.key} from {archive}; deploying with its credentials")
    first = up(spec, env, state_dir=state_dir, out_dir=out_dir, progress=progress, verify=False)
    ctx = open_context(spec, env, state_dir, out_dir, lambda s: None)
    hosts = acquire_hosts(ctx.platform, ctx.build, ctx.state.dir, create=False)
    with ctx.state.lock("restore"):
        bk.restore_data(ctx, hosts, info, members, progress=progress)
    progress("re-applying users, grants and retention after the data restore")
    final = up(spec, env, state_dir=state_dir, out_dir=out_dir, progress=progress, verify=True)
    return {"platform": platform.name, "environment": platform.environment, "archive": archive,
            "created": info["created"], "ok": final.get("ok", False), "status": final.get("status", []),
            "changed_first": first["changed"]}
