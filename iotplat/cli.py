"""The `iotplat` command: a thin argparse layer over the use-case functions in iotplat.commands.

This module is the only place that maps errors to exit codes (see iotplat.errors.ExitCode) and the
only place that prints. Heavy modules are imported inside each command, so `iotplat worker` runs on
hosts that have only the worker's light dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn

from iotplat import __version__
from iotplat.errors import ExitCode, InvalidInput, IotplatError, SpecInvalid
from iotplat.services.registry import names as service_names
from iotplat.errors import _one_line as one_line  # escapes control characters: a message is always one line

EPILOG = """exit codes: 0 ok, 1 failure, 2 invalid input (nothing changed), 3 drift found (plan), 130 interrupted.
Every command accepts --json for machine-readable output on stdout."""


class UsageError(InvalidInput):
    """A command line argparse cannot parse (unknown flag, missing argument, bad value)."""

    def __init__(self, prog: str, message: str, usage: str) -> None:
        super().__init__(f"{prog}: {message}")
        self.prog, self.message, self.usage = prog, message, usage


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting, so main() reports it like every other
    failure (one JSON document under --json); subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message, self.format_usage())


class Output:
    """Collects a command's result; prints human text or one JSON document."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.data: dict[str, Any] = {}

    def line(self, text: str = "") -> None:
        if not self.as_json:
            print(text, flush=True)

    def warn(self, text: str) -> None:
        print(f"warning: {text}", file=sys.stderr, flush=True)


Part = Callable[[argparse.ArgumentParser], object]  # adds one or more arguments to a command's parser
Command = Callable[[argparse.Namespace, Output], int]  # cmd_*: runs a parsed command, returns its exit code


def _arg(*names: str, **kwargs: Any) -> Part:
    """One argument of a command, added where the command lists it (the order is the order of --help)."""
    return lambda p: p.add_argument(*names, **kwargs)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON result on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")


def _add_spec(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="the platform spec (default: ./platform.yaml, else the shipped default)")
    p.add_argument("--env", "-e", default=os.environ.get("IOTPLAT_ENV"),
                   help="environment overlay to use (default: $IOTPLAT_ENV)")


def _add_deploy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "-o", help="build directory (default: build/<platform>/<environment>)")
    p.add_argument("--state-dir", help="state root (default: $IOTPLAT_STATE_DIR, the spec's state.dir, "
                   "else ~/.local/state/iotplat)")


_YES = _arg("--yes", "-y", action="store_true", help="do not ask for confirmation")
_DEVICE_ID = _arg("id", help="device id")


def _command(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, func: Command,
             *parts: Part) -> argparse.ArgumentParser:
    """A command: its `parts` in order, then --json and --debug (every command has them); `func` runs it."""
    p = sub.add_parser(name, help=help, epilog=EPILOG)
    for part in parts:
        part(p)
    _add_common(p)
    p.set_defaults(func=func)
    return p


def _group(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, help: str, func: Command, dest: str,
           metavar: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """A command with subcommands (`device add`, `rotate certs`): `func` also runs when none is given (to say so)."""
    p = sub.add_parser(name, help=help, epilog=EPILOG)
    group = p.add_subparsers(dest=dest, metavar=metavar)
    p.set_defaults(func=func, **{dest: None}, json=False, debug=False)
    return group


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="iotplat",
        description="Describe an IoT platform once; deploy Mosquitto, the ingestion worker, InfluxDB and Grafana "
        "identically to AWS, Azure or bare metal; prove it works.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"iotplat {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    spec, deploy = _add_spec, _add_deploy_flags

    _command(sub, "init", "write a commented starter platform.yaml", cmd_init,
             _arg("dir", nargs="?", default=".", help="folder to write into (default: .)"),
             _arg("--force", action="store_true", help="overwrite existing files"))
    _command(sub, "validate", "check a spec; report every problem as FILE:LINE:COL: path: message", cmd_validate, spec)
    _command(sub, "render", "write the build directory (service files, Ansible bundle, Pulumi config, manifest)",
             cmd_render, spec, deploy)
    _command(sub, "up", "render, create/configure the hosts, then verify (progress per host and step)", cmd_up,
             spec, deploy,
             _arg("--no-verify", action="store_true", help="skip the health checks and the canary at the end"),
             _arg("--allow-replace", action="store_true",
                  help="clouds: allow replacing VMs (new root disk and host keys; the data disks stay)"),
             _arg("--allow-data-loss", action="store_true",
                  help="clouds: allow deleting or replacing data disks, and the data on them"))
    _command(sub, "plan", "show what would change on each host (check mode, secrets masked); exit 3 on drift",
             cmd_plan, spec, deploy)
    _command(sub, "status", "health of every service, certificate expiry and an end-to-end canary", cmd_status,
             spec, deploy, _arg("--no-canary", action="store_true", help="skip the end-to-end canary message"))
    _command(sub, "destroy", "stop and remove the services (data only with --data); local hosts are removed",
             cmd_destroy, spec, deploy,
             _arg("--data", action="store_true", help="also delete stored data (InfluxDB, broker queue, dashboards)"),
             _arg("--keep-images", action="store_true",
                  help="runtime container: leave the services' images loaded on kept hosts (bare metal, clouds)"),
             _YES)
    _command(sub, "backup", "one encrypted, checksummed archive: state, InfluxDB, broker queue, Grafana", cmd_backup,
             spec, _arg("--to", help="folder (or .iotplat-backup file) to write (default: ./backups)"), deploy)
    _command(sub, "restore", "bring a platform back from a backup archive onto fresh hosts", cmd_restore, spec,
             _arg("--from", dest="archive", required=True, help="the .iotplat-backup archive"),
             _arg("--move", action="store_true",
                  help="restore an archive of another environment of this platform (moving it, e.g. to another target)"),
             _YES, deploy)
    _command(sub, "logs", "the services' journals from every host, merged and labelled, secrets masked", cmd_logs,
             spec,
             _arg("--service", choices=service_names(), help="only this service"),
             _arg("--host", help="only this host"),
             _arg("--since", help="journalctl --since value, e.g. -1h, '10 min ago' or 2026-11-25T10:00"),
             _arg("--lines", "-n", type=int, default=200, help="last N lines per host (default 200)"),
             _arg("--follow", "-f", action="store_true", help="keep printing new lines until Ctrl-C"),
             deploy)

    device = _group(sub, "device", "manage the device registry: add, list, revoke, kit", cmd_device,
                    "device_command", "ACTION")
    state_root = _arg("--state-dir", help="state root")
    _command(device, "add", "add a device to the registry and create its credential", cmd_device,
             _DEVICE_ID, spec, state_root,
             _arg("--attr", action="append", default=[], metavar="NAME=VALUE",
                  help="registry column value (repeat), e.g. --attr site=north"))
    _command(device, "list", "list the registry's devices", cmd_device, spec, state_root)
    _command(device, "revoke", "remove a device and invalidate its credential", cmd_device, _DEVICE_ID, spec, state_root)
    _command(device, "kit", "print a device's onboarding kit (shows its secret)", cmd_device, _DEVICE_ID, spec,
             state_root)

    rotate = _group(sub, "rotate", "new certificates, service secrets or a device credential, without losing messages",
                    cmd_rotate, "rotate_command", "WHAT")
    _command(rotate, "certs", "renew the server certificates; with --ca start (then --finish) a CA rotation",
             cmd_rotate, spec,
             _arg("--ca", action="store_true",
                  help="start a CA rotation: hosts and device kits trust the old and a new CA until --finish"),
             _arg("--finish", action="store_true",
                  help="with --ca: switch the servers to the new CA and stop trusting the old one"),
             deploy)
    _command(rotate, "secrets",
             "new InfluxDB passwords (worker, Grafana reader, admin); worker replicas restart one at a time",
             cmd_rotate, spec, deploy)
    _command(rotate, "device", "reissue a device's credential (the old one is refused from its next connect)",
             cmd_rotate, _DEVICE_ID, spec, deploy)

    _command(sub, "cost", "monthly infrastructure cost on the spec's target, side by side with the other cloud and "
             "bare metal", cmd_cost, spec,
             _arg("--prices", metavar="FILE", help="a price file merged over iotplat's price table (after the "
                  "spec's cost.prices); same layout as iotplat/cost/prices.yaml"),
             _arg("--hardware-cost", action="append", default=[], type=_hardware_cost, metavar="[HOST=]AMOUNT",
                  help="your own cost per host and month, for the bare-metal column (repeat; AMOUNT alone: every "
                  "host without its own); overrides the spec's cost.hardware"))
    _command(sub, "schema", "print the spec's JSON Schema", cmd_schema)

    p = sub.add_parser("worker", help="run the ingestion worker (on worker hosts)", epilog=EPILOG)
    p.set_defaults(func=cmd_worker, json=False, debug=False, _worker_parser=p)
    _add_worker_arguments(p)
    return parser


def _hardware_cost(text: str) -> tuple[str, Decimal]:
    """`--hardware-cost 45` (every host) or `--hardware-cost tsdb=80`."""
    host, _, amount = text.rpartition("=")
    try:
        value = Decimal(amount.strip())
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or not 0 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text!r}: write AMOUNT or HOST=AMOUNT, AMOUNT a number from 0 to 1000000 "
                                         "(your cost per host and month)")
    return (host.strip() or "default", value)


def _add_worker_arguments(p: argparse.ArgumentParser) -> None:
    try:
        from iotplat.worker.cli import add_arguments
    except ImportError:  # the worker package is optional in trimmed installs
        p.add_argument("--config", required=True)
        return
    add_arguments(p)


# ---------------------------------------------------------------------------- commands


def cmd_init(args: argparse.Namespace, out: Output) -> int:
    from iotplat.commands import init

    result = init(args.dir, force=args.force)
    out.data.update(result)
    for path in result["written"]:
        out.line(f"wrote {path}")
    out.line(f"next: edit {result['spec']}, then `iotplat validate {result['spec']}`")
    return ExitCode.OK


def cmd_validate(args: argparse.Namespace, out: Output) -> int:
    from iotplat.commands import validate

    result = validate(args.spec, args.env)
    out.data.update(result)
    for env in result["environments"]:
        out.line(f"{result['spec']}: valid ({env['environment']}: {env['target']} target, {env['hosts']} host(s), "
                 f"{env['devices']} device(s))")
    return ExitCode.OK


def cmd_render(args: argparse.Namespace, out: Output) -> int:
    from iotplat.commands import render

    result = render(args.spec, args.env, out_dir=args.out, state_dir=args.state_dir, notify=out.warn)
    out.data.update(result)
    out.line(f"rendered {result['platform']}/{result['environment']} ({result['target']}) into {result['out']}: "
             f"{result['files']} files, {len(result['written'])} changed, {len(result['removed'])} removed, "
             f"{result['secret_files']} secret files kept in the state directory")
    if result["hashes_computed"]:
        out.line(f"computed {result['hashes_computed']} password hashes (cached for next time)")
    return ExitCode.OK


def _progress(out: Output) -> Callable[[str], None]:
    if out.as_json:
        return lambda line: print(line, file=sys.stderr, flush=True)
    return lambda line: print(line, flush=True)


def cmd_up(args: argparse.Namespace, out: Output) -> int:
    from iotplat.deploy.ops import up

    result = up(args.spec, args.env, state_dir=args.state_dir, out_dir=args.out, progress=_progress(out),
                verify=not args.no_verify, allow_replace=args.allow_replace, allow_data_loss=args.allow_data_loss)
    out.data.update(result)
    recap = ", ".join(f"{h}: {r['changed']} changed" for h, r in result["recap"].items())
    ok = result.get("ok", True)
    upgraded = "; upgraded " + ", ".join(f"{c['service']} {c['old']} -> {c['new']}" for c in result["upgraded"]) \
        if result.get("upgraded") else ""
    out.line(f"{'up' if ok else 'up, but verification FAILED'}: {result['platform']}/{result['environment']} on "
             f"{len(result['hosts'])} host(s) in {result['seconds']}s ({recap}){upgraded}")
    return ExitCode.OK if ok else ExitCode.FAILURE


def cmd_plan(args: argparse.Namespace, out: Output) -> int:
    from iotplat.deploy.ops import plan

    result, code = plan(args.spec, args.env, state_dir=args.state_dir, out_dir=args.out, progress=_progress(out))
    out.data.update(result)
    for block in result["diff"]:
        out.line(block)
    for c in result["upgrades"]:
        out.line(f"upgrade: {c['service']} {c['old']} -> {c['new']} (`iotplat up` rolls it out one host at a time)")
    if result.get("note"):
        out.line(f"drift: {result['note']}")
    elif result["drift"]:
        infra = f"{len(result['infrastructure'])} infrastructure change(s) and " if result["infrastructure"] else ""
        out.line(f"drift: {infra}{result['changed']} host change(s) would be made; `iotplat up` applies them")
    else:
        out.line("no changes: the hosts match the spec")
    return code


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    from iotplat.deploy.ops import status_cmd

    result, code = status_cmd(args.spec, args.env, state_dir=args.state_dir, out_dir=args.out,
                              canary=not args.no_canary)
    out.data.update(result)
    for c in result["checks"]:
        mark = "skip" if c["skipped"] else ("FAIL" if not c["ok"] else ("warn" if c.get("warning") else "ok  "))
        out.line(f"{mark} {c['host']:<10} {c['name']}: {c['detail']}")
    out.line("healthy" if result["ok"] else "UNHEALTHY")
    return code


def cmd_destroy(args: argparse.Namespace, out: Output) -> int:
    from iotplat.deploy.ops import destroy

    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidInput("destroy needs confirmation: pass --yes (nothing was changed)")
        what = "services AND DATA" if args.data else "services (data kept)"
        answer = input(f"destroy the {what} of {args.spec or 'the default spec'}? type 'yes': ")
        if answer.strip() != "yes":
            out.line("nothing changed")
            return ExitCode.FAILURE
    result = destroy(args.spec, args.env, data=args.data, keep_images=args.keep_images, state_dir=args.state_dir,
                     out_dir=args.out, progress=_progress(out))
    out.data.update(result)
    for line in result["deleted"]:
        out.line(f"deleted: {line}")
    for line in result["kept"]:
        out.line(f"kept:    {line}")
    return ExitCode.OK


def cmd_backup(args: argparse.Namespace, out: Output) -> int:
    from iotplat.deploy.ops import backup

    result = backup(args.spec, args.env, to=args.to, state_dir=args.state_dir, out_dir=args.out, progress=_progress(out))
    out.data.update(result)
    out.line(f"backup written: {result['archive']} ({result['bytes']:,} bytes, sha256 {result['sha256'][:16]}...)")
    return ExitCode.OK


def cmd_restore(args: argparse.Namespace, out: Output) -> int:
    from iotplat.deploy.ops import restore

    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidInput("restore replaces the platform's state and data: pass --yes (nothing was changed)")
        if input(f"restore {args.archive} over {args.spec or 'the default spec'}? type 'yes': ").strip() != "yes":
            out.line("nothing changed")
            return ExitCode.FAILURE
    result = restore(args.spec, args.env, archive=args.archive, state_dir=args.state_dir, out_dir=args.out,
                     progress=_progress(out), move=args.move)
    out.data.update(result)
    out.line(f"restored {result['platform']}/{result['environment']} from the backup of {result['created']}: "
             f"{'healthy' if result['ok'] else 'UNHEALTHY (see the checks above)'}")
    return ExitCode.OK if result["ok"] else ExitCode.FAILURE


def cmd_logs(args: argparse.Namespace, out: Output) -> int:
    import datetime as dt

    from iotplat.deploy.ops import logs

    def emit(line) -> None:  # noqa: ANN001
        if out.as_json:
            print(json.dumps(line.as_dict(), sort_keys=True), flush=True)
        else:
            ts = dt.datetime.fromtimestamp(line.ts_us / 1e6, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            print(f"{ts[:-4]}Z {line.host}/{line.service}: {line.message}", flush=True)

    logs(args.spec, args.env, service=args.service, host=args.host, since=args.since, follow=args.follow,
         lines=args.lines, state_dir=args.state_dir, out_dir=args.out, emit=emit)
    out.as_json = False  # lines were streamed (JSON lines with --json)
    return ExitCode.OK


def _attributes(items: Sequence[str]) -> dict[str, str]:
    """--attr NAME=VALUE (repeatable) -> {NAME: VALUE}; names and values are checked by the use case."""
    attrs: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise InvalidInput(f"--attr {item!r}: write NAME=VALUE, e.g. --attr site=north")
        if name in attrs:
            raise InvalidInput(f"--attr {name}: given twice")
        attrs[name] = value
    return attrs


def cmd_device(args: argparse.Namespace, out: Output) -> int:
    from iotplat.deploy import devices

    if not args.device_command:
        raise InvalidInput("choose an action: iotplat device add|list|revoke|kit (see --help)")
    ref = devices.SpecRef(spec=args.spec, env=args.env, state_dir=args.state_dir)
    if args.device_command == "add":
        result = devices.add(ref, args.id, _attributes(args.attr))
    elif args.device_command == "revoke":
        result = devices.revoke(ref, args.id)
    elif args.device_command == "kit":
        result = devices.kit(ref, args.id)
    else:
        result = devices.list_devices(ref)
    out.data.update(result)
    for line in result.get("lines", []):
        out.line(line)
    return ExitCode.OK


def cmd_rotate(args: argparse.Namespace, out: Output) -> int:
    from iotplat.deploy import rotate

    if not args.rotate_command:
        raise InvalidInput("choose what to rotate: iotplat rotate certs|secrets|device ID (see --help)")
    common = {"state_dir": args.state_dir, "out_dir": args.out, "progress": _progress(out)}
    if args.rotate_command == "certs":
        result = rotate.certs(args.spec, args.env, ca=args.ca, finish=args.finish, **common)
    elif args.rotate_command == "secrets":
        result = rotate.secrets(args.spec, args.env, **common)
    elif args.rotate_command == "device":
        result = rotate.device(args.spec, args.env, args.id, **common)
    out.data.update(result)
    for line in result.get("lines", []):
        out.line(line)
    return ExitCode.OK if result.get("ok", True) else ExitCode.FAILURE


def cmd_cost(args: argparse.Namespace, out: Output) -> int:
    from iotplat.cost.estimate import run
    from iotplat.cost.text import render_text

    report = run(args.spec, args.env, prices=args.prices, hardware=dict(args.hardware_cost))
    out.data.update(report.as_dict())
    for line in render_text(report):
        out.line(line)
    return ExitCode.OK


def cmd_schema(args: argparse.Namespace, out: Output) -> int:
    from iotplat.spec.schema import json_schema, json_schema_text

    if args.json:
        out.data.update(json_schema())
    else:
        sys.stdout.write(json_schema_text())
    return ExitCode.OK


def cmd_worker(args: argparse.Namespace, out: Output) -> int:
    try:
        from iotplat.worker.cli import run
    except ImportError as exc:
        raise IotplatError(f"the worker is not installed in this environment ({exc}); pip install 'iotplat[worker]'") from None
    return int(run(args))


# ---------------------------------------------------------------------------- entry point


# Options whose value may start with "-" (journalctl accepts "--since -1h"); argparse would take such a value for
# an option, so "--since -1h" is passed on as "--since=-1h".
_DASH_VALUES = ("--since",)


def _join_dash_values(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in _DASH_VALUES:
            nxt = next(it, None)
            out.append(a if nxt is None else f"{a}={nxt}")
        else:
            out.append(a)
    return out


def _wants_json(argv: Sequence[str]) -> bool:
    """--json anywhere before a `--` (for failures found before the arguments are parsed)."""
    for a in argv:
        if a == "--":
            return False
        if a == "--json":
            return True
    return False


def _fail_json(code: int, error: str) -> None:
    print(json.dumps({"ok": False, "exit_code": int(code), "error": error}, indent=2, sort_keys=True), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = _join_dash_values(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(arguments)
    except UsageError as exc:
        if _wants_json(arguments):
            _fail_json(ExitCode.INVALID, str(exc))
        sys.stderr.write(exc.usage)
        print(one_line(f"{exc.prog}: error: {exc.message}"), file=sys.stderr)
        return ExitCode.INVALID
    if not getattr(args, "func", None):
        parser.print_help()
        return ExitCode.INVALID
    out = Output(getattr(args, "json", False))
    func: Callable[[argparse.Namespace, Output], int] = args.func
    code: int
    try:
        code = func(args, out)
        if out.as_json and args.command != "worker":
            out.data.setdefault("ok", code == ExitCode.OK)
            print(json.dumps(out.data, indent=2, sort_keys=True, default=str))
        return code
    except SpecInvalid as exc:
        lines = exc.lines(limit=None if out.as_json else 50)
        if out.as_json:
            print(json.dumps({"ok": False, "exit_code": int(exc.exit_code),
                              "problems": [p.as_dict() for p in exc.problems]}, indent=2, sort_keys=True))
        for text in lines:
            print(text, file=sys.stderr)
        return exc.exit_code
    except IotplatError as exc:
        if out.as_json:
            _fail_json(exc.exit_code, str(exc))
        print(one_line(f"iotplat: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if out.as_json:
            _fail_json(ExitCode.INTERRUPTED, "interrupted")
        print("iotplat: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.FAILURE
    except Exception as exc:  # noqa: BLE001 - the one place unexpected errors become exit 1
        if getattr(args, "debug", False) or os.environ.get("IOTPLAT_DEBUG"):
            traceback.print_exc()
        text = f"internal error: {type(exc).__name__}: {exc}"
        if out.as_json:
            _fail_json(ExitCode.FAILURE, text)
        print(one_line(f"iotplat: {text} (rerun with --debug for details, and please report it)"), file=sys.stderr)
        return ExitCode.FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
