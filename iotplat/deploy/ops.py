"""Use cases that touch hosts: up, plan, status, destroy. Each returns a dict (the --json result)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from iotplat.deploy import upgrade
from iotplat.errors import ExitCode, InvalidInput, IotplatError
from iotplat.hosts import Host
from iotplat.secrets.materials import Materials
from iotplat.services import all_services
from iotplat.secrets.state import State, resolve_state_root
from iotplat.spec.platform_model import Platform

if TYPE_CHECKING:
    from iotplat.deploy.targets import TargetProvider
    from iotplat.spec.model import Target

Progress = Callable[[str], None]
DEPLOYED = "deployed.json"
BOOT_WAIT = 300.0  # seconds `up` waits for new hosts to answer SSH (a cloud's VMs boot after the stack is up)


@dataclass
class Context:
    platform: Platform
    state: State
    materials: Materials
    build: Path

    def target(self) -> TargetProvider:
        from iotplat.deploy.targets import provider_for

        return provider_for(self.platform, self.state, self.build)

    def hosts(self) -> list[Host]:
        """The deployed platform's hosts (nothing is created); NotDeployed when there are none."""
        return self.target().acquire(create=False, progress=lambda s: None)


def _cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "iotplat"


def open_context(spec: str | None, env: str | None, state_dir: str | None, out_dir: str | None,
                 progress: Progress) -> Context:
    """Load the spec, bring its state up to date and render its build directory."""
    from iotplat.commands import load

    return context_for(load(spec, env), state_dir, out_dir, progress)


def context_for(platform: Platform, state_dir: str | None, out_dir: str | None, progress: Progress) -> Context:
    """`open_context` for a Platform already loaded (the state is read again: a restore changed it)."""
    from iotplat.commands import prepare_platform

    p = prepare_platform(platform, out_dir, state_dir, progress)
    return Context(p.platform, p.state, p.materials, p.out)


_GRAFANA_SKIPPED = re.compile(r"Grafana skipped(?: on [^:]+)?: (.+?)\"?\s*$")


def _grafana_outcome(output: str) -> tuple[bool, str]:
    """The grafana role prints `Grafana skipped on HOST: REASON` when it skips (grafana.required false)."""
    for line in output.splitlines():
        m = _GRAFANA_SKIPPED.search(line)
        if m:
            return False, m.group(1).strip().rstrip(".").replace("\\n", " ")
    return True, ""


def check_target_switch(ctx: Context) -> None:
    """A platform lives on one target at a time: refuse `up` on a new target while the old one still holds its
    hosts or disks, and say how a platform moves."""
    from iotplat.deploy.targets import provider_for

    deployed = ctx.state.read_json(DEPLOYED) or {}
    old = deployed.get("target")
    p = ctx.platform
    if not old or old == p.target:
        return
    spec = p.spec.model_copy(update={"target": _target_of(deployed)}) if deployed.get("target_spec") else None
    if spec is None:
        return
    previous = Platform(spec, p.environment, p.spec_file, p.spec_dir, p.devices)
    if not provider_for(previous, ctx.state, ctx.build).exists():
        return
    raise InvalidInput(
        f"{p.key} is deployed on {old}, and the spec now says {p.target}: iotplat does not move a running platform by "
        f"switching target.kind (the {old} hosts and their data would be orphaned). To move it: `iotplat backup`; "
        f"deploy the new target as another environment (`iotplat up --env <new>`); `iotplat restore --env <new> "
        f"--move --from ARCHIVE` (data, CA and device credentials come along); point devices at it; then destroy "
        f"the old one with the old spec (`iotplat destroy --data`). Or, to start over on {p.target}, run "
        f"`iotplat destroy --data` with the old spec first. Nothing was changed")


def _target_of(deployed: dict[str, Any]) -> Target:
    from pydantic import TypeAdapter

    return TypeAdapter(Target).validate_python(deployed["target_spec"], strict=False)


TIMEOUT_GRACE = 45.0  # seconds of retries for SSH connects that timed out (check_reachable)


def _timed_out(problem: str) -> bool:
    return problem.endswith("timed out") or "no SSH answer within" in problem


def check_reachable(hosts: list[Host], state_dir: Path, wait: float = 0) -> None:
    """Every host answers SSH with the key pinned for it (before anything runs there): a changed host key or an
    unreachable host stops the command with one line naming the host and the fix. `wait`: seconds to keep trying
    hosts that do not answer yet (new cloud VMs boot after their stack is up); a wrong host key fails at once."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def probe(h: Host) -> str:
        argv = h.ssh_argv("true")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        except subprocess.TimeoutExpired:
            return f"{h.name} ({h.address}): no SSH answer within 60s"
        if proc.returncode == 0:
            return ""
        err = proc.stderr
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in err or "Host key verification failed" in err:
            pinned = state_dir / "known_hosts"
            return (f"{h.name} ({h.address}): its SSH host key is not the one pinned in {pinned}. If the host was "
                    f"reinstalled, remove the old key (`ssh-keygen -R {h.internal_address} -f {pinned}`, and "
                    f"{h.address} likewise) and run the command again; otherwise someone may be impersonating it")
        last = [line for line in err.strip().splitlines() if line.strip()][-1:] or [f"exit {proc.returncode}"]
        return f"{h.name} ({h.address}): SSH as {h.ssh_user} failed: {last[0]}"

    started = time.monotonic()
    deadline = started + wait
    pending = list(hosts)
    while True:
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(pending)))) as pool:
            results = list(pool.map(probe, pending))
        problems = [m for m in results if m]
        keys = [m for m in problems if "host key" in m]
        # a connect that timed out (a busy host, a jump host's hop) gets TIMEOUT_GRACE seconds of retries even when
        # the caller does not wait for booting hosts: one slow answer must not fail a whole command
        transient = bool(problems) and all(_timed_out(m) for m in problems)
        limit = max(deadline, started + TIMEOUT_GRACE) if transient else deadline
        if not problems or keys or time.monotonic() >= limit:
            break
        pending = [h for h, m in zip(pending, results, strict=True) if m]
        time.sleep(2)
    if problems:
        raise IotplatError("; ".join(keys or problems))


def up(spec: str | None, env: str | None, *, state_dir: str | None = None, out_dir: str | None = None,
       progress: Progress = print, verify: bool = True, allow_replace: bool = False,
       allow_data_loss: bool = False) -> dict[str, Any]:
    """`iotplat up`: render, create or find the hosts, configure them (rolling when a version changed), verify."""
    ctx = open_context(spec, env, state_dir, out_dir, progress)
    return deploy(ctx, progress=progress, verify=verify, allow_replace=allow_replace, allow_data_loss=allow_data_loss)


def deploy(ctx: Context, *, progress: Progress = print, verify: bool = True, allow_replace: bool = False,
           allow_data_loss: bool = False) -> dict[str, Any]:
    """`up` of a rendered context: hosts, the playbook (or a rolling upgrade), the deploy record, verification."""
    from iotplat.deploy.ansible import run_playbook
    from iotplat.deploy.wheelhouse import build_wheelhouse

    started = time.monotonic()
    p = ctx.platform
    with ctx.state.lock("up"):
        progress(f"[1/4] rendered {p.key} into {ctx.build}")
        check_target_switch(ctx)
        hosts = ctx.target().acquire(create=True, progress=progress, allow_replace=allow_replace,
                                     allow_data_loss=allow_data_loss)
        progress("[2/4] hosts ready: " + ", ".join(f"{h.name} ({h.address})" for h in hosts))
        check_reachable(hosts, ctx.state.dir, wait=BOOT_WAIT)
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
            "target": p.target,
            "target_spec": p.spec.target.model_dump(mode="json"),
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
    ctx = open_context(spec, env, state_dir, out_dir, lambda s: None)
    if ctx.state.read_json(DEPLOYED) is None:
        raise IotplatError(f"{ctx.platform.key} has not been deployed from this state directory; run `iotplat up`")
    hosts = ctx.hosts()
    report = status_of(ctx, hosts, canary=canary)
    return ({"platform": ctx.platform.name, "environment": ctx.platform.environment, "ok": report.ok,
             "checks": [c.as_dict() for c in report.checks]}, ExitCode.OK if report.ok else ExitCode.FAILURE)


def plan(spec: str | None, env: str | None, *, state_dir: str | None = None, out_dir: str | None = None,
         progress: Progress = print) -> tuple[dict[str, Any], int]:
    """What `up` would change: the infrastructure first (clouds: Pulumi's preview, replacements and deletions
    first), the pinned versions per Debian release and upgrades, then each host in Ansible's check mode."""
    from iotplat.deploy.ansible import run_playbook
    from iotplat.deploy.targets import NotDeployed
    from iotplat.deploy.wheelhouse import build_wheelhouse

    ctx = open_context(spec, env, state_dir, out_dir, lambda s: None)
    p = ctx.platform
    out: dict[str, Any] = {"platform": p.name, "environment": p.environment, "changes": [], "changed": 0,
                           "diff": [], "upgrades": [], "infrastructure": [], "pins": _pins(ctx.build)}
    for release, pins in out["pins"].items():
        progress(f"  pinned   {release}: " + ", ".join(f"{k} {v}" for k, v in sorted(pins.items())))
    with ctx.state.lock("plan"):
        target = ctx.target()
        preview = target.preview()
        if preview is not None:
            out["infrastructure"] = preview.lines()
            for line in out["infrastructure"]:
                progress(f"  {p.target:<8} {line}")
        try:
            hosts = target.acquire(create=False, progress=progress)
        except NotDeployed as exc:
            out.update(drift=True, hosts=False, note=f"{exc}: up would create the hosts and deploy everything")
            progress(f"  {out['note']}")
            return out, ExitCode.DRIFT
        check_reachable(hosts, ctx.state.dir)
        wheelhouse = build_wheelhouse(_cache_dir() / "wheelhouse")
        upgrades = upgrade.changes(ctx.state.read_json(DEPLOYED), upgrade.versions(ctx.build, wheelhouse), p)
        for c in upgrades:
            progress(f"  upgrade  {c} (up rolls it out one host at a time)")
        result = run_playbook(ctx.build, hosts, ctx.materials, ctx.state.dir, wheelhouse, check=True, progress=progress)
    if result.returncode != 0 and not result.recap:
        raise IotplatError("plan could not run: " + "; ".join(result.failures[:3] or result.output.splitlines()[-1:]))
    out.update(changes=[{"host": h, "task": t} for h, t in result.changed_tasks], changed=result.changed,
               diff=_diff_blocks(result.output), upgrades=[vars(c) for c in upgrades], hosts=True)
    out["drift"] = result.changed > 0 or bool(out["infrastructure"])
    code = ExitCode.DRIFT if out["drift"] else ExitCode.OK
    if result.failed:
        code = ExitCode.FAILURE
    return out, code


def _pins(build: Path) -> dict[str, dict[str, str]]:
    """The package versions each Debian release gets from this render: {release: {package: version}}."""
    import yaml

    gv = yaml.safe_load((build / "ansible" / "group_vars" / "all.yml").read_text())
    out: dict[str, dict[str, str]] = {}
    for svc in all_services():
        for package, versions in svc.package_pins(gv).items():
            for release, version in versions.items():
                out.setdefault(release, {})[package] = str(version)
    return out


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


def destroy(spec: str | None, env: str | None, *, data: bool = False, keep_images: bool = False,
            state_dir: str | None = None, out_dir: str | None = None, progress: Progress = print) -> dict[str, Any]:
    """Stop and remove the services (their data only with `data`; container images unless `keep_images`), then
    release what iotplat created for the hosts: local hosts are deleted; bare-metal hosts kept; a cloud stack is
    retired (data disks kept) or, with `data`, destroyed. Returns what was deleted and what was kept."""
    from iotplat.deploy.ansible import run_playbook
    from iotplat.deploy.targets import NotDeployed, Released

    ctx = open_context(spec, env, state_dir, out_dir, lambda s: None)
    p = ctx.platform
    with ctx.state.lock("destroy"):
        target = ctx.target()
        done = Released()
        if target.uninstall_first:
            try:
                hosts = target.acquire(create=False, progress=progress)
            except NotDeployed:
                hosts = []
            if hosts:
                check_reachable(hosts, ctx.state.dir)
                result = run_playbook(ctx.build, hosts, ctx.materials, ctx.state.dir, None, progress=progress,
                                      playbook="destroy.yml",
                                      extra_vars={"iotplat_destroy_data": data, "iotplat_keep_images": keep_images})
                if result.returncode != 0:
                    raise IotplatError("destroy failed: " + "; ".join(result.failures[:3]))
                where = ", ".join(h.name for h in hosts)
                done.deleted.append(f"the services on {where} and their configuration"
                                    + (" and data" if data else ""))
                if not data:
                    done.kept.append(f"the services' data on {where}")
        released = target.release(data=data, progress=progress)
        done.deleted += released.deleted
        done.kept += released.kept
        for name in ("manifest.json", DEPLOYED):
            (ctx.state.dir / name).unlink(missing_ok=True)
    return {"platform": p.name, "environment": p.environment, "deleted": done.deleted, "kept": done.kept,
            "removed": done.deleted}


def logs(spec: str | None, env: str | None, *, service: str | None, host: str | None, since: str | None,
         follow: bool, lines: int | None, state_dir: str | None = None, out_dir: str | None = None,
         emit: Callable[[Any], None] = print) -> dict[str, Any]:
    from iotplat.deploy import logs as journal
    from iotplat.deploy.ansible import masker_for

    ctx = open_context(spec, env, state_dir, out_dir, lambda s: None)
    hosts = ctx.hosts()
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

    ctx = open_context(spec, env, state_dir, out_dir, lambda s: None)
    if ctx.state.read_json(DEPLOYED) is None:
        raise IotplatError(f"{ctx.platform.key} has not been deployed from this state directory; nothing to back up")
    hosts = ctx.hosts()
    with ctx.state.lock("backup"):
        result = bk.create(ctx, hosts, Path(to) if to else Path("backups"), progress=progress)
    return {"platform": ctx.platform.name, "environment": ctx.platform.environment, **result}


def restore(spec: str | None, env: str | None, *, archive: str, state_dir: str | None = None,
            out_dir: str | None = None, progress: Progress = print, move: bool = False) -> dict[str, Any]:
    """Bring a platform back from an archive: its state (checked first), a deploy with the old credentials, the
    services' data (each service's restore hook), a second deploy that re-applies users and grants, verified."""
    from iotplat.commands import load
    from iotplat.deploy import backup as bk
    from iotplat.render.engine import check_build_dir

    platform = load(spec, env)
    info, members = bk.open_archive(Path(archive))  # verified before anything changes
    bk.check_fits(info, platform, move=move)
    root = resolve_state_root(state_dir, platform.spec.state.dir, platform.spec_dir)
    check_build_dir(Path(out_dir) if out_dir else Path("build") / platform.name / platform.environment, root)
    state = State.open(root, platform.name, platform.environment)
    with state.lock("restore"):
        bk.restore_state(info, members, state.dir, platform.name, platform.environment, move=move)
    progress(f"restored the state of {platform.key} from {archive}; deploying with its credentials")
    ctx = context_for(platform, state_dir, out_dir, progress)
    first = deploy(ctx, progress=progress, verify=False)
    hosts = ctx.hosts()
    with ctx.state.lock("restore"):
        bk.restore_data(ctx, hosts, info, members, progress=progress)
    progress("re-applying users, grants and retention after the data restore")
    final = deploy(ctx, progress=progress, verify=True)
    return {"platform": platform.name, "environment": platform.environment, "archive": archive,
            "created": info["created"], "ok": final.get("ok", False), "status": final.get("status", []),
            "changed_first": first["changed"]}
