"""Where each target's hosts come from, as `Host` records for the inventory.

- local: throw-away systemd-nspawn hosts (iotplat.hosts), keyed by platform-environment;
- baremetal: the addresses in the spec;
- aws / azure: `pulumi up` of stacks/<target> with the rendered stack config, then its outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from iotplat.errors import IotplatError
from iotplat.hosts import Host, HostProvider, LocalSettings, local_provider
from iotplat.resources import data_dir
from iotplat.spec.platform_model import Platform


def local_settings(platform: Platform) -> LocalSettings:
    t = platform.spec.target
    kwargs: dict = {"instance": f"{platform.name}-{platform.environment}", "network": t.network,
                    "proxy_port": t.proxy_port}
    if t.mirror:
        kwargs["mirror"] = t.mirror
    if t.ca_bundle:
        kwargs["ca_bundle"] = Path(t.ca_bundle)
    if os.environ.get("IOTPLAT_LOCAL_STATE_DIR"):
        kwargs["state_dir"] = Path(os.environ["IOTPLAT_LOCAL_STATE_DIR"])
    return LocalSettings(**kwargs)


def provider_for(platform: Platform) -> HostProvider | None:
    if platform.target == "local":
        return local_provider(local_settings(platform))
    return None


def acquire_hosts(platform: Platform, build: Path, state_dir: Path, *, create: bool = True) -> list[Host]:
    kind = platform.target
    if kind == "local":
        provider = local_provider(local_settings(platform))
        if create:
            return provider.up(platform.host_names)
        status = provider.status()
        missing = [n for n in platform.host_names if status.get(n) != "running"]
        if missing:
            raise IotplatError(f"local host(s) {', '.join(missing)} are not running; run `iotplat up` first")
        return provider.up(platform.host_names)
    if kind == "baremetal":
        t = platform.spec.target
        out = []
        for name in platform.host_names:
            h = t.hosts[name]
            key = h.ssh_private_key or ""  # "": the operator's ssh agent and ~/.ssh/config
            if key and not Path(key).is_absolute():
                key = str(platform.spec_dir / key)
            out.append(Host(name=name, address=h.address, ssh_user=h.ssh_user or t.ssh_user, ssh_port=h.ssh_port,
                            ssh_private_key=key, ssh_extra_args=""))
        return out
    return _pulumi_hosts(platform, build, state_dir, create=create)


def _pulumi_hosts(platform: Platform, build: Path, state_dir: Path, *, create: bool) -> list[Host]:
    """Run the cloud stack with the Pulumi CLI (not testable on the development machines: no CLI, no cloud)."""
    pulumi = shutil.which("pulumi")
    if not pulumi:
        raise IotplatError(f"deploying to {platform.target} needs the Pulumi CLI: install it from pulumi.com/docs/install, "
                           "then rerun (render works without it)")
    stack = f"{platform.name}-{platform.environment}"
    stack_dir = data_dir("stacks") / platform.target
    config = build / "pulumi" / platform.target / f"Pulumi.{stack}.yaml"
    backend = state_dir / "pulumi"
    backend.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "PULUMI_BACKEND_URL": backend.resolve().as_uri(), "PULUMI_SKIP_UPDATE_CHECK": "true"}
    env.setdefault("PULUMI_CONFIG_PASSPHRASE_FILE", str(Path(os.environ.get("IOTPLAT_VAULT_PASSWORD_FILE", ""))))

    def run(*args: str) -> str:
        proc = subprocess.run([pulumi, *args], cwd=stack_dir, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["failed"])[-1]
            raise IotplatError(f"pulumi {args[0]} failed for stack {stack}: {tail}")
        return proc.stdout

    run("stack", "select", "--create", stack)
    if create:
        run("up", "--yes", "--skip-preview", "--stack", stack, "--config-file", str(config))
    outputs = json.loads(run("stack", "output", "--json", "--stack", stack))
    user = outputs.get("sshUser", "admin")
    jump = outputs.get("sshJumpHost")
    hosts = []
    for name in platform.host_names:
        o = outputs["hosts"][name]
        address = o.get("publicIp") or o["privateIp"]
        extra = f"-o ProxyJump={user}@{jump}" if not o.get("publicIp") and jump else ""
        hosts.append(Host(name=name, address=address, ssh_user=user, ssh_port=22, ssh_private_key="",
                          ssh_extra_args=extra))
    return hosts


def release_hosts(platform: Platform, state_dir: Path) -> str:
    """Remove the hosts themselves where iotplat created them (local: nspawn hosts; clouds: pulumi destroy)."""
    if platform.target == "local":
        local_provider(local_settings(platform)).down()
        return "local hosts removed"
    if platform.target == "baremetal":
        return "bare-metal hosts kept (iotplat does not own them)"
    pulumi = shutil.which("pulumi")
    if not pulumi:
        raise IotplatError("destroying cloud hosts needs the Pulumi CLI: install it from pulumi.com/docs/install")
    stack = f"{platform.name}-{platform.environment}"
    env = {**os.environ, "PULUMI_BACKEND_URL": (state_dir / "pulumi").resolve().as_uri()}
    proc = subprocess.run([pulumi, "destroy", "--yes", "--stack", stack], cwd=data_dir("stacks") / platform.target,
                          env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise IotplatError(f"pulumi destroy failed for stack {stack}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return f"cloud stack {stack} destroyed"
