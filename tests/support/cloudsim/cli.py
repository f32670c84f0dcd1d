"""`pulumi` command line of the double: the commands and flags iotplat uses, with Pulumi 3.x's output shapes.

Exit codes as the real CLI: 0 ok, 255 on any error (`error: ...` on stderr). See docs/cloudsim.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import yaml

from . import cloud, engine
from .backend import CLI_VERSION, Backend, CliError, backend_dir, new_salt, read_passphrase, save_salt
from .engine import Context, ProgramFailed

GLOBAL_BOOL = {"--non-interactive", "--emoji", "--disable-integrity-checking", "--suppress-progress",
               "--suppress-outputs", "--debug"}
GLOBAL_VALUE = {"--color", "-v", "--verbose", "--logflow", "--tracing", "--profiling", "--memprofilerate"}
BOOL_FLAGS = {"--json", "-j", "--yes", "-y", "--skip-preview", "-f", "--diff", "--show-sames",
              "--show-replacement-steps", "--create", "-c", "--force", "--show-secrets", "--preserve-config",
              "--refresh", "--expect-no-changes", "--shell", "--remove", "--show-reads"}
VALUE_FLAGS = {"--stack", "-s", "--config-file", "--cwd", "-C", "--secrets-provider", "--message", "-m",
               "--parallel", "-p", "--target", "-t", "--exclude"}
ALIASES = {"-j": "--json", "-y": "--yes", "-f": "--skip-preview", "-c": "--create", "-s": "--stack",
           "-C": "--cwd", "-m": "--message", "-p": "--parallel", "-t": "--target", "-v": "--verbose"}


def parse(argv: list[str]) -> tuple[list[str], dict[str, str | bool]]:
    words: list[str] = []
    flags: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and arg != "-":
            name, eq, value = arg.partition("=")
            canon = ALIASES.get(name, name)
            if name in BOOL_FLAGS or name in GLOBAL_BOOL:
                flags[canon] = value.lower() != "false" if eq else True
            elif name in VALUE_FLAGS or name in GLOBAL_VALUE:
                if not eq:
                    i += 1
                    if i >= len(argv):
                        raise CliError(f"flag needs an argument: {name}")
                    value = argv[i]
                flags[canon] = value
            else:
                raise CliError(f"unknown flag: {name}")
        else:
            words.append(arg)
        i += 1
    return words, flags


def project_of(cwd: Path) -> str:
    for folder in (cwd, *cwd.parents):
        path = folder / "Pulumi.yaml"
        if path.is_file():
            try:
                return str((yaml.safe_load(path.read_text()) or {})["name"])
            except (yaml.YAMLError, KeyError, TypeError):
                raise CliError(f"could not load current project: {path} has no valid `name`") from None
    raise CliError(f"no Pulumi.yaml project file found (searching upwards from {cwd}). If you have not created a "
                   "project yet, use `pulumi new` to do so: no project file found")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return dispatch(argv)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 255
    except cloud.CloudError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 255
    except BrokenPipeError:  # `pulumi stack output --json | head`: the reader went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def dispatch(argv: list[str]) -> int:
    words, flags = parse(argv)
    if not words:
        print("Usage: pulumi [command]  (emulated cloud test double; see docs/cloudsim.md)")
        return 0
    if words == ["version"]:
        print(f"v{CLI_VERSION}")
        return 0
    env = dict(os.environ)
    cwd = Path(str(flags.get("--cwd") or os.getcwd())).resolve()
    command = words[0]
    known = {"stack", "preview", "up", "update", "destroy", "version"}
    if command not in known:
        raise CliError(f'unknown command "{command}" for "pulumi"')
    project = project_of(cwd)
    backend = Backend(backend_dir(env), project)
    if command == "stack":
        return stack_command(words[1:], flags, cwd, env, backend)
    stack = str(flags.get("--stack") or backend.current() or "")
    if not stack:
        raise CliError("no stack selected; please use `pulumi stack select` to choose one")
    if not backend.exists(stack):
        raise CliError(f"no stack named '{stack}' found")
    config_file = Path(str(flags["--config-file"])).resolve() if flags.get("--config-file") else None
    ctx = Context(cwd=cwd, env=env, backend=backend, stack=stack, config_file=config_file,
                  out=lambda s: print(s, flush=True), err=engine.stderr)
    if command == "preview":
        return preview(ctx, flags)
    if command in ("up", "update"):
        if not (flags.get("--yes") or flags.get("--skip-preview")):
            raise CliError("--yes or --skip-preview must be passed in to proceed when running in non-interactive "
                           "mode")
        return up(ctx, flags)
    if command == "destroy":
        if not (flags.get("--yes") or flags.get("--skip-preview")):
            raise CliError("--yes or --skip-preview must be passed in to proceed when running in non-interactive "
                           "mode")
        return destroy(ctx)
    raise CliError(f'unknown command "{command}" for "pulumi"')


# --- stack ... ---------------------------------------------------------------------------------------------


def stack_command(words: list[str], flags: dict, cwd: Path, env: dict[str, str], backend: Backend) -> int:
    sub = words[0] if words else ""
    arg = words[1] if len(words) > 1 else ""
    if arg and flags.get("--stack"):
        raise CliError("only one of --stack or argument stack name may be specified, not both")
    name = arg or str(flags.get("--stack") or "")
    if sub in ("ls", "list"):
        rows = []
        current = backend.current()
        for s in backend.stacks():
            row: dict = {"name": s, "current": s == current}
            last = backend.last_update(s)
            if last:
                row["lastUpdate"] = last
            row["resourceCount"] = len(backend.resources(s))
            rows.append(row)
        if flags.get("--json"):
            print(json.dumps(rows, indent=4))
        else:
            print("NAME" + " " * 20 + "LAST UPDATE" + " " * 14 + "RESOURCE COUNT")
            for r in rows:
                print(f"{r['name'] + ('*' if r['current'] else ''):<24}{r.get('lastUpdate', 'n/a'):<25}"
                      f"{r['resourceCount']}")
        return 0
    if sub in ("select", "init"):
        if not name:
            raise CliError("no stack selected; please use `pulumi stack select` to choose one")
        if backend.exists(name):
            if sub == "init":
                raise CliError(f"stack '{name}' already exists")
            backend.select(name)
            return 0
        if sub == "select" and not flags.get("--create"):
            raise CliError(f"no stack named '{name}' found")
        passphrase = read_passphrase(env)
        salt = new_salt(passphrase)
        backend.save(name, [], salt=salt)
        try:  # as Pulumi: the new stack's secrets manager goes into Pulumi.<stack>.yaml of the project dir
            save_salt(cwd / f"Pulumi.{name}.yaml", salt)
        except OSError as exc:
            backend.remove(name)
            raise CliError(f"could not create stack: saving stack config: {exc}") from None
        backend.select(name)
        print(f"Created stack '{name}'")
        return 0
    if sub == "output":
        stack = name if name and not flags.get("--stack") else str(flags.get("--stack") or backend.current() or "")
        if flags.get("--stack") and arg:
            stack, key = str(flags["--stack"]), arg
        else:
            key = ""
        if not stack:
            raise CliError("no stack selected; please use `pulumi stack select` to choose one")
        resources = backend.resources(stack)
        root = next((r for r in resources if r["type"] == "pulumi:pulumi:Stack"), None)
        outputs = (root or {}).get("outputs", {})
        if key:
            if key not in outputs:
                raise CliError(f"current stack does not have output property '{key}'")
            value = outputs[key]
            print(json.dumps(value, indent=2) if flags.get("--json") else
                  (value if isinstance(value, str) else json.dumps(value)))
            return 0
        if flags.get("--json"):
            print(json.dumps(outputs, indent=2))
        else:
            print(f"Current stack outputs ({len(outputs)}):")
            for k in sorted(outputs):
                print(f"    {k}  {outputs[k] if isinstance(outputs[k], str) else json.dumps(outputs[k])}")
        return 0
    if sub in ("rm", "remove"):
        stack = name or str(backend.current() or "")
        if not stack:
            raise CliError("no stack selected; please use `pulumi stack select` to choose one")
        if not backend.exists(stack):
            raise CliError(f"no stack named '{stack}' found")
        if not flags.get("--yes"):
            raise CliError("--yes must be passed in to proceed when running in non-interactive mode")
        if backend.resources(stack) and not flags.get("--force"):
            raise CliError(
                f"'{stack}' still has resources; removal rejected. Possible actions:\n"
                f"- Make sure that '{stack}' is the stack that you want to destroy\n"
                "- Run `pulumi destroy` to delete the resources, then run `pulumi stack rm`\n"
                "- Run `pulumi stack rm --force` to override this error")
        backend.remove(stack)
        if not flags.get("--preserve-config"):
            (cwd / f"Pulumi.{stack}.yaml").unlink(missing_ok=True)
        print(f"Stack '{stack}' has been removed!")
        return 0
    raise CliError(f'unknown command "{sub}" for "pulumi stack"')


# --- preview / up / destroy ---------------------------------------------------------------------------------


def _fail(ctx: Context, exc: ProgramFailed, json_out: bool, config: dict[str, str] | None = None) -> int:
    root = f"pulumi:pulumi:Stack ({ctx.backend.project}-{ctx.stack})"
    if json_out:
        print(json.dumps({"config": config or {}, "steps": [], "diagnostics": [
            {"message": f"{exc.message}\n", "severity": "error"}], "changeSummary": {}}, indent=4))
    ctx.err("Diagnostics:\n  " + root + ":\n    error: " + exc.message.replace("\n", "\n    "))
    return 255


def preview(ctx: Context, flags: dict) -> int:
    start = time.monotonic()
    json_out = bool(flags.get("--json"))
    config, config_path = engine.load_config(ctx)
    engine.secrets_manager(ctx, config_path)
    old = ctx.backend.resources(ctx.stack)
    public_net = cloud.public_net_of(ctx.backend.root, ctx.backend.project, ctx.stack, ctx.env)
    try:
        result = engine.run_program(ctx, config, True, old, public_net)
    except ProgramFailed as exc:
        return _fail(ctx, exc, json_out, config)
    steps, _providers = engine.build_steps(result, old)
    if json_out:
        digest = engine.preview_digest(steps, config, bool(flags.get("--show-sames")),
                                       bool(flags.get("--show-replacement-steps")),
                                       int((time.monotonic() - start) * 1e9))
        print(json.dumps(digest, indent=4))
        return 0
    ctx.out(f"Previewing update ({ctx.stack}):\n")
    for s in steps:
        if s.op != "same":
            extra = f" [diff: {', '.join(s.diffs)}]" if s.diffs and flags.get("--diff") else ""
            ctx.out(f" {engine.SYMBOL[s.op]:<2} {engine.display_type(s.type)} {s.urn.rsplit('::', 1)[1]} {s.op}"
                    + extra)
    counts = engine.change_summary(steps)
    ctx.out("")
    ctx.out("\n".join(engine.summary_lines({k: v for k, v in counts.items() if k != "same"}, counts.get("same", 0))))
    return 0


def up(ctx: Context, flags: dict) -> int:
    start, started = time.monotonic(), engine.now()
    config, config_path = engine.load_config(ctx)
    engine.secrets_manager(ctx, config_path)
    with ctx.backend.lock(ctx.stack):
        old = ctx.backend.resources(ctx.stack)
        public_net = cloud.ensure_public_net(ctx.backend.root, ctx.backend.project, ctx.stack, ctx.env)
        ctx.out(f"Updating ({ctx.stack}):\n")
        try:
            result = engine.run_program(ctx, config, False, old, public_net)
        except ProgramFailed as exc:
            if exc.result is None or not exc.result.get("registrations"):
                cloud.release_if_unused(ctx.backend.root, ctx.backend.project, ctx.stack, ctx.env, old)
                ctx.backend.history(ctx.stack, "update", "failed", {}, started)
                return _fail(ctx, exc, False)
            # resources registered before the failure are created, as Pulumi does; then the error
            result = exc.result
            failure: str | None = exc.message
        else:
            failure = None
        steps, providers = engine.build_steps(result, old)
        if failure is not None:
            steps = [s for s in steps if s.op != "delete"]  # a failed program never deletes anything
        resources, error, counts = engine.apply(ctx, steps, providers, old)
        ctx.backend.save(ctx.stack, resources)
        error = error or (f"pulumi:pulumi:Stack ({ctx.backend.project}-{ctx.stack}):\n    error: {failure}"
                          if failure else None)
        try:
            cloud.reconcile(ctx.backend.root, ctx.backend.project, ctx.stack, ctx.env, resources,
                            log=lambda s: ctx.out(f"    {s}"))
        except cloud.CloudError as exc:
            error = (error + "\n\n  " if error else "") + f"emulated cloud:\n    error: {exc}"
        unchanged = counts.get("same", 0)
        root = next((r for r in resources if r["type"] == "pulumi:pulumi:Stack"), {})
        ctx.out("")
        if error:
            ctx.err("Diagnostics:\n  " + error)
            ctx.out("\n".join(engine.summary_lines(counts, unchanged)) + "\n\n" + engine.duration(start))
            ctx.backend.history(ctx.stack, "update", "failed", counts, started)
            return 255
        ctx.out("\n".join(engine.outputs_lines(root.get("outputs", {}))))
        ctx.out("\n".join(engine.summary_lines(counts, unchanged)) + "\n\n" + engine.duration(start))
        ctx.backend.history(ctx.stack, "update", "succeeded", counts, started)
        return 0


def destroy(ctx: Context) -> int:
    start, started = time.monotonic(), engine.now()
    config_path = ctx.config_file or (ctx.cwd / f"Pulumi.{ctx.stack}.yaml")
    engine.secrets_manager(ctx, config_path)
    with ctx.backend.lock(ctx.stack):
        old = ctx.backend.resources(ctx.stack)
        ctx.out(f"Destroying ({ctx.stack}):\n")
        steps = [engine.Step("delete", r["urn"], r["type"], r, None) for r in reversed(old)
                 if not r["type"].startswith("pulumi:providers:")]
        counts = {"delete": len(steps)} if steps else {}
        for s in steps:
            ctx.out(f" -  {engine.display_type(s.type)} {s.urn.rsplit('::', 1)[1]} deleting (0s)")
            ctx.out(f" -  {engine.display_type(s.type)} {s.urn.rsplit('::', 1)[1]} deleted (0s)")
        ctx.backend.save(ctx.stack, [])
        cloud.reconcile(ctx.backend.root, ctx.backend.project, ctx.stack, ctx.env, [], log=lambda s: ctx.out(f"    {s}"))
        ctx.out("")
        ctx.out("\n".join(engine.summary_lines(counts, 0)) + "\n\n" + engine.duration(start) + "\n")
        ctx.out("The resources in the stack have been deleted, but the history and configuration associated with "
                "the stack are still maintained. \nIf you want to remove the stack completely, run "
                f"`pulumi stack rm {ctx.stack}`.")
        ctx.backend.history(ctx.stack, "destroy", "succeeded", counts, started)
        return 0
