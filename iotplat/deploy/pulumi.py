"""The cloud targets (aws, azure): the Pulumi stack in stacks/<target>, driven through the Pulumi CLI.

The invocation (docs/stacks.md): from a copy of the stack's program in the state directory (Pulumi writes
Pulumi.<stack>.yaml with its secrets salt into the project folder, which may be a read-only installed wheel), with
    PULUMI_BACKEND_URL=file://<state>/pulumi/<target>     one backend per target: a target switch is another stack
    PULUMI_CONFIG_PASSPHRASE_FILE=<state>/pulumi-passphrase   created once (0600); the file backend needs one
    PULUMI_PYTHON_CMD=<this interpreter>                  it has pulumi and the providers (iotplat[pulumi])
`up` previews first (`preview --json`) and refuses to replace a VM (`--allow-replace`) or delete a data disk
(`--allow-data-loss`) unless told; `--yes` is not enough. `destroy` without --data retires the stack (its data
disks stay, everything else goes: `iotplat:mode retired`); with --data it destroys the stack and removes it.
Nothing here runs before the operator asked for a change: plan/status/logs never create a stack.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from iotplat.deploy.targets import NotDeployed, Released, key_args, known_hosts_args
from iotplat.errors import InvalidInput, IotplatError
from iotplat.hosts import Host
from iotplat.resources import data_dir

if TYPE_CHECKING:
    from iotplat.secrets.state import State
    from iotplat.spec.platform_model import Platform

Progress = Callable[[str], None]
MIN_PULUMI = (3, 100, 0)
VM_TYPES = frozenset({"aws:ec2/instance:Instance", "azure-native:compute:VirtualMachine"})
DISK_TYPES = frozenset({"aws:ebs/volume:Volume", "azure-native:compute:Disk"})
REPLACING = frozenset({"replace", "create-replacement", "delete-replaced"})
PROVIDER_MODULE = {"aws": "pulumi_aws", "azure": "pulumi_azure_native"}
CREDENTIALS = {
    "aws": ("AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a profile of "
            "~/.aws/credentials), for an account with docs/policies/aws-iam-policy.json"),
    "azure": ("Azure credentials: set ARM_CLIENT_ID, ARM_CLIENT_SECRET, ARM_TENANT_ID and ARM_SUBSCRIPTION_ID "
              "(a service principal with the role in docs/policies/azure-role.json), or log in with `az login`"),
}


class PulumiFailed(IotplatError):
    """A Pulumi command failed; the message holds its whole error output."""


@dataclass(frozen=True)
class Step:
    op: str  # create | same | update | replace | delete | create-replacement | delete-replaced | ...
    type: str  # e.g. aws:ec2/instance:Instance
    name: str  # the resource's logical name
    reasons: tuple[str, ...] = ()  # the properties that force a replacement

    @classmethod
    def from_json(cls, step: dict[str, Any]) -> Step:
        urn = str(step.get("urn", ""))
        parts = urn.split("::")
        kind = parts[-2].split("$")[-1] if len(parts) >= 2 else ""
        state = step.get("newState") or step.get("oldState") or {}
        kind = state.get("type") or kind
        reasons = tuple(step.get("replaceReasons") or step.get("diffReasons") or ())
        return cls(op=str(step.get("op", "")), type=kind, name=parts[-1] if parts else urn, reasons=reasons)

    def __str__(self) -> str:
        why = f" (because of {', '.join(self.reasons)})" if self.reasons else ""
        return f"{self.op:<8} {self.type} {self.name}{why}"


@dataclass
class Preview:
    steps: list[Step] = field(default_factory=list)

    @property
    def changes(self) -> list[Step]:
        return [s for s in self.steps if s.op not in ("same", "read") and not s.type.startswith("pulumi:")]

    @property
    def replaced_vms(self) -> list[Step]:
        return [s for s in self.steps if s.op in ("replace", "create-replacement") and s.type in VM_TYPES]

    @property
    def lost_disks(self) -> list[Step]:
        return [s for s in self.steps if s.type in DISK_TYPES and s.op in ("delete", "replace", "delete-replaced")]

    def summary(self) -> dict[str, int]:
        return dict(Counter(s.op for s in self.steps if not s.type.startswith("pulumi:")))

    def lines(self) -> list[str]:
        """Replacements and deletions first: they are what an operator must not miss."""
        order = {"replace": 0, "create-replacement": 0, "delete-replaced": 0, "delete": 1, "update": 2, "create": 3}
        return [str(s) for s in sorted(self.changes, key=lambda s: (order.get(s.op, 4), s.type, s.name))]


class CloudTarget:
    """TargetProvider for aws and azure (see iotplat.deploy.targets)."""

    uninstall_first = True

    def __init__(self, platform: Platform, state: State, build: Path) -> None:
        self.platform = platform
        self.state = state
        self.kind = platform.target
        self.stack = f"{platform.name}-{platform.environment}"
        self.backend = state.dir / "pulumi" / self.kind
        self.rendered = build / "pulumi" / self.kind / f"Pulumi.{self.stack}.yaml"
        self.program = self.backend / "program"
        self.stack_dir = self.program / self.kind
        self.config = self.stack_dir / f"Pulumi.{self.stack}.yaml"

    # --- the TargetProvider interface ---------------------------------------------------------------

    def acquire(self, *, create: bool, progress: Progress, allow_replace: bool = False,
                allow_data_loss: bool = False) -> list[Host]:
        if create:
            self.preflight()
            self._sync_program()
            self._run("stack", "select", "--create", self.stack, what="stack select")
            self._sync_config(self.rendered, self.config)
            preview = self._preview(self.config)
            self.guard(preview, allow_replace=allow_replace, allow_data_loss=allow_data_loss)
            if preview.changes:
                progress(f"      pulumi up {self.stack} ({self.kind}): " + _counts(preview))
                before = self.outputs() or {}
                self._run("up", "--yes", "--skip-preview", "--stack", self.stack, "--config-file", str(self.config),
                          what="up")
                # new VMs have new host keys: forget what was pinned for the hosts this update (re)created
                fresh = {s.name for s in preview.steps if s.type in VM_TYPES and s.op in ("create", *REPLACING)}
                self._forget(before, {h for h in self.platform.host_names if f"{self.stack}-{h}-vm" in fresh})
        outputs = self.outputs()
        if not outputs or not outputs.get("hosts"):
            raise NotDeployed(f"{self.platform.key} has no {self.kind} stack with hosts; run `iotplat up` first")
        if outputs.get("mode") == "retired":
            raise NotDeployed(f"{self.platform.key} is destroyed on {self.kind} with its data disks kept; "
                              "`iotplat up` brings it back with its data")
        return self._hosts(outputs)

    def exists(self) -> bool:
        for entry in self._stacks():
            if entry.get("name") == self.stack and int(entry.get("resourceCount") or 0) > 0:
                return True
        return False

    def preview(self) -> Preview | None:
        """What `up` would change, or None when the stack does not exist yet (nothing is created to find out)."""
        if not any(e.get("name") == self.stack for e in self._stacks()):
            return None
        self.preflight()
        self._sync_program()
        self._sync_config(self.rendered, self.config)
        return self._preview(self.config)

    def release(self, *, data: bool, progress: Progress) -> Released:
        if not any(e.get("name") == self.stack for e in self._stacks()):
            return Released(deleted=[f"nothing: no {self.kind} stack {self.stack}"])
        self.preflight()
        self._sync_program()
        self._sync_config(self.rendered, self.config)
        disks = self._disk_names()
        if data:
            progress(f"      pulumi destroy {self.stack} ({self.kind})")
            self._run("destroy", "--yes", "--stack", self.stack, what="destroy")
            self._run("stack", "rm", "--yes", self.stack, what="stack rm")
            return Released(deleted=[f"every resource of the {self.kind} stack {self.stack}: VMs, data disks "
                                     f"({', '.join(disks) or 'none'}) with their data, addresses, network, firewall"])
        self._forget(self.outputs() or {}, set(self.platform.host_names))  # the VMs go: their keys with them
        retired = self._retired_config()
        try:
            preview = self._preview(retired)
            gone = sorted({f"{s.type.split(':')[-1]} {s.name}" for s in preview.changes if s.op == "delete"})
            progress(f"      pulumi up {self.stack} ({self.kind}, retired: data disks kept): " + _counts(preview))
            self._run("up", "--yes", "--skip-preview", "--stack", self.stack, "--config-file", str(retired),
                      what="up (retire)")
        finally:
            retired.unlink(missing_ok=True)
        return Released(
            deleted=[f"{len(gone)} {self.kind} resources: " + (", ".join(gone) or "none")],
            kept=[f"data disks {', '.join(disks) or '(none)'} ({self.kind}, billed while they exist): `iotplat up` "
                  "brings the platform back with its data, `iotplat destroy --data` deletes them"])

    # --- policies ------------------------------------------------------------------------------------

    def guard(self, preview: Preview, *, allow_replace: bool, allow_data_loss: bool) -> None:
        """Refuse what an operator must confirm by name: a VM replaced (its root disk and host keys are new), a data
        disk deleted or replaced (its data is gone)."""
        problems = []
        if preview.replaced_vms and not allow_replace:
            problems.append("replace VM(s) " + ", ".join(sorted({str(s) for s in preview.replaced_vms}))
                            + ": pass --allow-replace")
        if preview.lost_disks and not allow_data_loss:
            problems.append("delete data disk(s) " + ", ".join(sorted({str(s) for s in preview.lost_disks}))
                            + " and the data on them: pass --allow-data-loss (take a `iotplat backup` first)")
        if problems:
            raise InvalidInput(f"up would {'; and '.join(problems)}. Nothing was changed; `iotplat plan` shows "
                               "every change")

    def preflight(self) -> None:
        """Before any change: the Pulumi CLI, its Python with the provider, the passphrase, credentials, SSH keys.
        Each missing piece is one line saying how to fix it."""
        exe = shutil.which("pulumi")
        if not exe:
            raise IotplatError(f"deploying to {self.kind} needs the Pulumi CLI (v{'.'.join(map(str, MIN_PULUMI))} or "
                               "newer): install it from https://www.pulumi.com/docs/install/ (render works without it)")
        version = self._run("version", what="version").stdout.strip()
        parsed = _version(version)
        if parsed is None or parsed < MIN_PULUMI:
            raise IotplatError(f"the Pulumi CLI at {exe} is {version or 'of unknown version'}; iotplat needs "
                               f"v{'.'.join(map(str, MIN_PULUMI))} or newer")
        for module in ("pulumi", PROVIDER_MODULE[self.kind]):
            if importlib_util.find_spec(module) is None:
                raise IotplatError(f"{module} is not installed for {sys.executable}: pip install 'iotplat[pulumi]'")
        if not _has_credentials(self.kind):
            raise IotplatError(f"no {CREDENTIALS[self.kind]}")
        key = self.private_key()
        if key and not Path(key).is_file():
            raise IotplatError(f"{self.platform.spec_file}: target.ssh_private_key_file: {key} does not exist")

    # --- hosts ---------------------------------------------------------------------------------------

    def private_key(self) -> str:
        t = self.platform.spec.target
        assert t.kind in ("aws", "azure")
        if t.ssh_private_key_file:
            path = Path(t.ssh_private_key_file)
            return str(path if path.is_absolute() else self.platform.spec_dir / path)
        pub = Path(t.ssh_public_key_file)
        pub = pub if pub.is_absolute() else self.platform.spec_dir / pub
        derived = pub.with_suffix("") if pub.suffix == ".pub" else None
        return str(derived) if derived and derived.is_file() else ""  # "": the operator's ssh agent

    def _hosts(self, outputs: dict[str, Any]) -> list[Host]:
        user = str(outputs.get("sshUser") or "")
        entries: dict[str, dict[str, Any]] = outputs["hosts"]
        key = self.private_key()
        pin = known_hosts_args(self.state)
        jump_name = outputs.get("sshJumpHost")
        jump_ip = (entries.get(jump_name) or {}).get("publicIp") if jump_name else None
        hosts = []
        for name in self.platform.host_names:
            o = entries.get(name)
            if not o or not (o.get("publicIp") or o.get("privateIp")):
                raise IotplatError(f"the {self.kind} stack {self.stack} has no address for host {name}: run "
                                   "`iotplat up` to bring the stack in line with the spec")
            extra = f"{pin} {key_args(key)}".strip()
            address = o.get("publicIp")
            if not address:
                if not jump_ip:
                    raise IotplatError(f"host {name} has no public address and the stack names no jump host")
                jump = ["ssh", "-W", "%h:%p", "-o", "BatchMode=yes", *shlex.split(pin), *shlex.split(key_args(key)),
                        *(["-i", key] if key else []), f"{user}@{jump_ip}"]
                extra += " -o " + shlex.quote("ProxyCommand=" + " ".join(jump))
                address = o["privateIp"]
            hosts.append(Host(name=name, address=address, ssh_user=user, ssh_port=22, ssh_private_key=key,
                              ssh_extra_args=extra, private_address=o.get("privateIp") or "",
                              data_device=o.get("dataDevice") or ""))
        return hosts

    def outputs(self) -> dict[str, Any] | None:
        if not any(e.get("name") == self.stack for e in self._stacks()):
            return None
        text = self._run("stack", "output", "--json", "--stack", self.stack, what="stack output").stdout
        try:
            data = json.loads(text or "{}")
        except ValueError:
            raise PulumiFailed(f"pulumi stack output printed no JSON for stack {self.stack}: {text[:200]!r}") from None
        return data if isinstance(data, dict) else None

    # --- pulumi --------------------------------------------------------------------------------------

    def _preview(self, config: Path) -> Preview:
        proc = self._run("preview", "--json", "--diff", "--stack", self.stack, "--config-file", str(config),
                         what="preview")
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            raise PulumiFailed(f"pulumi preview printed no JSON for stack {self.stack}:\n{_tail(proc)}") from None
        return Preview([Step.from_json(s) for s in doc.get("steps") or []])

    def _stacks(self) -> list[dict[str, Any]]:
        if not (self.backend / ".pulumi").is_dir() or not shutil.which("pulumi"):
            return []
        proc = self._run("stack", "ls", "--json", what="stack ls")
        try:
            data = json.loads(proc.stdout or "[]")
        except ValueError:
            return []
        return data if isinstance(data, list) else []

    def _disk_names(self) -> list[str]:
        outputs = self.outputs() or {}
        return [f"{name} ({(o or {}).get('dataDevice', '?')})" for name, o in sorted((outputs.get("hosts") or {}).items())]

    def _forget(self, outputs: dict[str, Any], hosts: set[str]) -> None:
        """Remove the pinned SSH host keys of `hosts` (their VMs were deleted or replaced by iotplat itself)."""
        known = self.state.dir / "known_hosts"
        if not known.exists():
            return
        for name, o in (outputs.get("hosts") or {}).items():
            if name in hosts:
                for address in {(o or {}).get("publicIp"), (o or {}).get("privateIp")} - {None, ""}:
                    subprocess.run(["ssh-keygen", "-R", str(address), "-f", str(known)], capture_output=True,
                                   check=False)
        known.with_name("known_hosts.old").unlink(missing_ok=True)

    def _retired_config(self) -> Path:
        doc = yaml.safe_load(self.rendered.read_text())
        doc["config"]["iotplat:mode"] = "retired"
        source = self.backend / f"Pulumi.{self.stack}.retired.rendered.yaml"
        source.write_text(yaml.safe_dump(doc, sort_keys=True))
        path = self.stack_dir / f"Pulumi.{self.stack}.retired.yaml"
        self._sync_config(source, path, salt_from=self.config)
        source.unlink()
        return path

    def _sync_program(self) -> None:
        """A fresh copy of stacks/<kind> and stacks/common (the program's own imports) in the state directory; the
        stack's config file there (with the salt Pulumi wrote) is kept."""
        import shutil as sh

        self.program.mkdir(parents=True, exist_ok=True)
        for name in (self.kind, "common"):
            src, dst = data_dir("stacks") / name, self.program / name
            keep = {p.name: p.read_bytes() for p in dst.glob("Pulumi.*.yaml")} if name == self.kind else {}
            if dst.exists():
                sh.rmtree(dst)
            sh.copytree(src, dst, ignore=sh.ignore_patterns("__pycache__", "Pulumi.*.*.yaml"))
            for file, data in keep.items():
                (dst / file).write_bytes(data)

    def _sync_config(self, rendered: Path, target: Path, salt_from: Path | None = None) -> None:
        """`target` = the rendered stack config plus the `encryptionsalt:` Pulumi keeps in it (Pulumi adds one when it
        is missing, so the rendered file in the build directory is never handed to it)."""
        salt = ""
        source = salt_from or target
        if source.exists():
            salt = next((line for line in source.read_text().splitlines() if line.startswith("encryptionsalt:")), "")
        text = rendered.read_text()
        target.write_text((salt + "\n" if salt else "") + text)

    def _passphrase_file(self) -> Path:
        path = self.state.dir / "pulumi-passphrase"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
        return path

    def _env(self) -> dict[str, str]:
        self.backend.mkdir(parents=True, exist_ok=True, mode=0o700)
        return {
            **os.environ,
            "PULUMI_BACKEND_URL": self.backend.resolve().as_uri(),
            "PULUMI_CONFIG_PASSPHRASE_FILE": str(self._passphrase_file()),
            "PULUMI_PYTHON_CMD": sys.executable,
            "PULUMI_SKIP_UPDATE_CHECK": "true",
        }

    def _run(self, *args: str, what: str) -> subprocess.CompletedProcess:
        exe = shutil.which("pulumi")
        if not exe:
            raise IotplatError(f"the Pulumi CLI is needed for {self.kind}: install it from https://www.pulumi.com/docs/install/")
        if not self.stack_dir.is_dir():
            self._sync_program()
        try:
            proc = subprocess.run([exe, *args], cwd=self.stack_dir, env=self._env(), capture_output=True, text=True,
                                  timeout=3600, check=False)
        except subprocess.TimeoutExpired:
            raise PulumiFailed(f"pulumi {what} for stack {self.stack} did not finish within an hour") from None
        if proc.returncode != 0:
            raise PulumiFailed(f"pulumi {what} failed for stack {self.stack} (exit {proc.returncode}):\n{_tail(proc)}")
        return proc


def _tail(proc: subprocess.CompletedProcess, lines: int = 60) -> str:
    text = "\n".join(x for x in ((proc.stderr or "").strip(), (proc.stdout or "").strip()) if x)
    return "\n".join(text.splitlines()[-lines:]) or "(no output)"


def _counts(preview: Preview) -> str:
    return ", ".join(f"{n} to {op}" for op, n in sorted(preview.summary().items()) if op != "same") or "no changes"


def _version(text: str) -> tuple[int, ...] | None:
    core = text.strip().lstrip("v").split("-")[0].split("+")[0]
    try:
        return tuple(int(x) for x in core.split(".")[:3])
    except ValueError:
        return None


def _has_credentials(kind: str) -> bool:
    env = os.environ
    if kind == "aws":
        return bool((env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")) or env.get("AWS_PROFILE")
                    or (Path.home() / ".aws" / "credentials").is_file() or env.get("AWS_WEB_IDENTITY_TOKEN_FILE"))
    return bool(all(env.get(k) for k in ("ARM_CLIENT_ID", "ARM_CLIENT_SECRET", "ARM_TENANT_ID", "ARM_SUBSCRIPTION_ID"))
                or (Path.home() / ".azure" / "azureProfile.json").is_file())
