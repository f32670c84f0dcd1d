"""Secrets the spec takes from an environment variable or a file are checked for strength at render: a weak one
is refused in one line that names the spec field, its source (variable name or file path, never the value) and
the rule; exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import PLATFORM_DIR


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    d = tmp_path / "spec"
    shutil.copytree(PLATFORM_DIR, d, ignore=shutil.ignore_patterns("examples"))
    text = (d / "platform.yaml").read_text()
    (d / "platform.yaml").write_text(text + "secrets:\n  grafana_admin_password: {env: GF_TEST_PW}\n"
                                            "  influxdb_admin_password: {file: influx.pw}\n")
    (d / "influx.pw").write_text("from-a-file-0123456789abcdef\n")
    return d / "platform.yaml"


@pytest.mark.parametrize("value, rule", [
    ("hunter2", "at least 16 characters"),
    ("Q7", "at least 16 characters"),
    ("aaaaaaaaaaaaaaaaaaaa", "at least 6 different characters"),
    ("abababababababababab", "at least 6 different characters"),
    ("line-one-0123456789\nline-two", "printable characters on one line"),
])
def test_weak_secret_from_the_environment_is_refused(cli, spec: Path, monkeypatch, value: str, rule: str) -> None:
    monkeypatch.setenv("GF_TEST_PW", value)
    r = cli("render", str(spec), "--out", str(spec.parent / "b"))
    assert r.code == 2, r.err
    assert len(r.err.strip().splitlines()) == 1
    for word in ("secrets.grafana_admin_password", "GF_TEST_PW", rule):
        assert word in r.err, r.err
    assert value not in r.err and value not in r.out
    assert not (spec.parent / "b").exists()
    r = cli("render", str(spec), "--out", str(spec.parent / "b"), "--json")
    assert r.code == 2 and rule in json.loads(r.out)["error"] and value not in r.out


def test_weak_secret_from_a_file_names_the_file(cli, spec: Path, monkeypatch) -> None:
    monkeypatch.setenv("GF_TEST_PW", "a-strong-enough-value-0123456789")
    (spec.parent / "influx.pw").write_text("short\n")
    r = cli("render", str(spec), "--out", str(spec.parent / "b"))
    assert r.code == 2 and "secrets.influxdb_admin_password" in r.err and "influx.pw" in r.err
    assert "at least 16 characters" in r.err and "short" not in r.err.replace("shorter", "")
    (spec.parent / "influx.pw").write_text("from-a-file-0123456789abcdef\n")
    assert cli("render", str(spec), "--out", str(spec.parent / "b")).code == 0


def test_a_secret_file_that_is_not_a_regular_file_is_refused(cli, spec: Path, monkeypatch) -> None:
    """`file: /dev/zero` would be read forever; a FIFO would block render."""
    import os

    monkeypatch.setenv("GF_TEST_PW", "a-strong-enough-value-0123456789")
    fifo = spec.parent / "pw.fifo"
    os.mkfifo(fifo)
    for source in ("/dev/zero", str(fifo)):
        spec.write_text(spec.read_text().replace("{file: influx.pw}", f"{{file: {source}}}")
                        .replace("{file: /dev/zero}", f"{{file: {source}}}"))
        r = cli("render", str(spec), "--out", str(spec.parent / "b"))
        assert r.code == 2 and "not a regular file" in r.err and source in r.err, r.err
