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
