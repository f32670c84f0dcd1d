"""The CLI contract: commands, exit codes, --json, no tracebacks, init, schema, the checkout shim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import EXAMPLES, PLATFORM_DIR, REPO, run_subprocess


def test_help_lists_commands(cli) -> None:
    r = run_subprocess("--help")
    assert r.returncode == 0
    for command in ("init", "validate", "render", "schema", "worker"):
        assert command in r.stdout
    assert "exit codes" in r.stdout


def test_checkout_shim_runs() -> None:
    r = subprocess.run([sys.executable, "cli.py", "--version"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("iotplat ")


def test_no_command_is_invalid_input(cli) -> None:
    assert cli().code == 2


def test_unknown_flag_exit_2() -> None:
    r = run_subprocess("validate", "--frobnicate")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_validate_json_ok(cli) -> None:
    r = cli("validate", str(EXAMPLES / "environments" / "platform.yaml"), "--json")
    assert r.code == 0
    data = json.loads(r.out)
    assert data["ok"] is True
    assert [e["environment"] for e in data["environments"]] == ["production", "staging"]


def test_validate_json_problems(cli, tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("apiVersion: iotplat/v1\nname: x\ntarget: {kind: local}\ningestion: {}\ninfluxdb: {version: 9}\n")
    r = cli("validate", str(p), "--json")
    assert r.code == 2
    data = json.loads(r.out)
    assert data["ok"] is False and data["exit_code"] == 2
    paths = {pr["path"] for pr in data["problems"]}
    assert {"ingestion.subscriptions", "influxdb.version"} <= paths
    assert all(set(pr) == {"file", "line", "column", "path", "message", "hint"} for pr in data["problems"])


def test_render_json(cli, tmp_path: Path) -> None:
    r = cli("render", str(PLATFORM_DIR / "platform.yaml"), "--out", str(tmp_path / "b"), "--json")
    assert r.code == 0
    data = json.loads(r.out)
    assert data["ok"] and data["platform"] == "demo" and data["files"] > 10 and data["hashes_computed"] == 5


def test_state_errors_are_one_line(cli, tmp_path: Path, monkeypatch) -> None:
    cli("render", str(PLATFORM_DIR / "platform.yaml"), "--out", str(tmp_path / "b"))
    other = tmp_path / "other-key"
    other.write_text("a-different-vault-password-000000\n")
    other.chmod(0o600)
    monkeypatch.setenv("IOTPLAT_VAULT_PASSWORD_FILE", str(other))
    r = cli("render", str(PLATFORM_DIR / "platform.yaml"), "--out", str(tmp_path / "b"))
    assert r.code == 1 and "cannot decrypt" in r.err and len(r.err.strip().splitlines()) == 1
    other.chmod(0o644)
    r = cli("render", str(PLATFORM_DIR / "platform.yaml"), "--out", str(tmp_path / "b"))
    assert r.code == 1 and "chmod 600" in r.err


def test_schema_command_prints_the_published_schema(cli) -> None:
    r = cli("schema")
    assert r.code == 0 and r.out == (PLATFORM_DIR / "platform.schema.json").read_text()
    r = cli("schema", "--json")
    assert json.loads(r.out)["$id"].endswith("platform-v1.json")


def test_init_writes_a_valid_starter(cli, tmp_path: Path) -> None:
    r = cli("init", str(tmp_path / "mine"))
    assert r.code == 0
    spec = tmp_path / "mine" / "platform.yaml"
    first = spec.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=./platform.schema.json"
    assert (tmp_path / "mine" / "platform.schema.json").exists()
    assert cli("validate", str(spec)).code == 0
    r = cli("init", str(tmp_path / "mine"))
    assert r.code == 2 and "already exists" in r.err
    assert cli("init", str(tmp_path / "mine"), "--force").code == 0
    assert "# " in spec.read_text() and yaml.safe_load(spec.read_text())["apiVersion"] == "iotplat/v1"


def test_default_spec_used_without_argument(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = cli("render", "--out", str(tmp_path / "b"))
    assert r.code == 0 and (tmp_path / "b" / "manifest.json").exists()


def test_out_dir_not_writable(cli, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = cli("render", str(PLATFORM_DIR / "platform.yaml"), "--out", str(blocker / "sub"))
    assert r.code == 1 and "cannot write the build directory" in r.err and "Traceback" not in r.err


def test_concurrent_operations_are_locked(tmp_path: Path, isolated_state: Path) -> None:
    from iotplat.errors import StateError
    from iotplat.secrets.state import State

    a = State.open(isolated_state, "demo", "default")
    b = State.open(isolated_state, "demo", "default")
    with a.lock("up"):
        try:
            with b.lock("up"):
                raise AssertionError("second lock must fail")
        except StateError as exc:
            assert "locked by iotplat up (pid" in str(exc)
    with b.lock("up"):
        pass


def test_since_takes_a_value_that_starts_with_a_dash() -> None:
    """`logs --since -1h` (journalctl's own syntax) reaches the logs command instead of an argparse error."""
    from iotplat.cli import _join_dash_values, build_parser

    argv = _join_dash_values(["logs", "p.yaml", "--since", "-1h", "--host", "edge"])
    assert argv == ["logs", "p.yaml", "--since=-1h", "--host", "edge"]
    args = build_parser().parse_args(argv)
    assert args.since == "-1h" and args.host == "edge"
    assert _join_dash_values(["logs", "--since"]) == ["logs", "--since"]  # argparse then names the missing value


# ---------------------------------------------------------------------------- every failure is one line / one JSON


def _leaf_commands() -> list[list[str]]:
    """Every runnable command path (`render`, `device add`, `rotate certs`, ...), read from the parser itself, so
    a command added later is covered too."""
    from iotplat.cli import build_parser

    def walk(parser, path: list[str]) -> list[list[str]]:
        subs = [a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)]
        if not subs:
            return [path]
        return [leaf for a in subs for name, p in a.choices.items() for leaf in walk(p, path + [name])]

    leaves = walk(build_parser(), [])
    assert len(leaves) >= 18 and ["device", "add"] in leaves and ["rotate", "device"] in leaves
    return leaves


def _one_json_failure(r, code: int = 2) -> dict:
    data = json.loads(r.out)  # the whole of stdout is exactly one JSON document
    assert isinstance(data, dict) and data["ok"] is False and data["exit_code"] == code, r.out
    assert r.code == code and "Traceback" not in r.err
    return data


def test_argparse_errors_print_one_json_document_under_json_for_every_command(cli) -> None:
    """Unknown flags, missing arguments and bad values: argparse printed usage text and no JSON."""
    for path in _leaf_commands():
        data = _one_json_failure(cli(*path, "--json", "--no-such-flag"))
        assert "--no-such-flag" in data["error"] or "are required" in data["error"], path
    for argv in (["device", "add", "--json"], ["rotate", "device", "--json"], ["restore", "--json"],
                 ["logs", "--lines", "many", "--json"], ["logs", "--service", "nope", "--json"], ["--json"],
                 ["nosuchcommand", "--json"]):
        _one_json_failure(cli(*argv))
    r = cli("validate", "--no-such-flag")  # without --json: argparse's usage and message on stderr, no stdout
    assert r.code == 2 and r.out == "" and "usage: iotplat" in r.err and "unrecognized arguments" in r.err


def test_runtime_failures_print_one_json_document_for_every_command(cli, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-spec.yaml")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    needs = {("device", "add"): ["dev-1"], ("device", "revoke"): ["dev-1"], ("device", "kit"): ["dev-1"],
             ("rotate", "device"): ["dev-1"], ("restore",): ["--from", str(blocker), "--yes"],
             ("destroy",): ["--yes"]}
    for path in _leaf_commands():
        if path in (["schema"], ["worker"]):
            continue  # schema cannot fail; worker takes no --json (its argparse error is covered above)
        if path == ["init"]:
            argv = ["init", str(blocker), "--json"]
        else:
            argv = [*path, *needs.get(tuple(path), []), missing, "--json"]
        data = _one_json_failure(cli(*argv))
        assert data.get("error") or data.get("problems"), path


def test_an_internal_error_is_one_json_document_too(cli, monkeypatch) -> None:
    import iotplat.commands

    def boom(*a, **k):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(iotplat.commands, "validate", boom)
    data = _one_json_failure(cli("validate", "--json"), code=1)
    assert "internal error: RuntimeError: unexpected" in data["error"]


def test_init_into_an_unwritable_place_is_one_line_exit_2(cli, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target in ("/sys/iotplat-init-test", "/proc/1", str(blocker / "sub")):
        r = cli("init", target)
        assert r.code == 2 and "cannot write the starter files" in r.err and len(r.err.strip().splitlines()) == 1, r.err
        assert "internal error" not in r.err
    assert not Path("/sys/iotplat-init-test").exists() and blocker.read_text() == "x"


def test_state_folders_are_created_private(cli, tmp_path: Path, monkeypatch) -> None:
    """The state root and the platform's folder were created 0755 (only the environment's was 0700)."""
    import os

    old = os.umask(0o022)
    try:
        root = tmp_path / "new" / "state-root"
        r = cli("render", str(PLATFORM_DIR / "platform.yaml"), "--out", str(tmp_path / "b"), "--state-dir", str(root))
        assert r.code == 0, r.err
    finally:
        os.umask(old)
    for folder in (tmp_path / "new", root, root / "demo", root / "demo" / "default"):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    existing = tmp_path / "shared"  # a folder that exists is left as it is
    existing.mkdir(mode=0o755)
    existing.chmod(0o755)
    assert cli("render", str(PLATFORM_DIR / "platform.yaml"), "--out", str(tmp_path / "b2"),
               "--state-dir", str(existing)).code == 0
    assert existing.stat().st_mode & 0o777 == 0o755 and (existing / "demo").stat().st_mode & 0o777 == 0o700


def test_an_error_naming_user_input_with_a_newline_is_still_one_line(cli, tmp_path: Path) -> None:
    r = cli("init", "/proc/no\nsuch")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "\\n" in r.err, r.err
    r = cli("device", "add", "x", str(tmp_path / "a\nb.yaml"))
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
