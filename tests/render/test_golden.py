"""Golden render trees: every case under tests/render/golden/ renders to exactly its expected/ build tree.

Each case is a spec (+ the registry and key files it names), a committed state it renders from (vault-encrypted
with the case's TEST-ONLY-vault-password, so certificates, secrets and password hashes are fixed) and expected/,
the whole build directory: manifest.json, hosts/<host>/..., ansible/..., pulumi/<target>/.... The test renders
each case with `iotplat render --out <tmp> --state-dir <tmp copy of the state>` and compares the file list
exactly and every file byte for byte; a failure prints a unified diff per changed file. So a change to a
template or to the renderer shows up as a reviewed diff of these trees, and a refactor that must not change
behaviour (the service registry, issue 10) proves it by leaving them byte-identical.

The cases together exercise every template under templates/ (test_cases_use_every_template) and every kind
of rendered file: see tests/render/golden/README.md.

After an intended change, regenerate and review:

    .venv/bin/python -m tests.render.golden --regenerate [CASE ...]
    git diff tests/render/golden

(`--regenerate` also creates the state and key of a new case; `--check` compares like this test.)
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
from cryptography import x509

from iotplat.resources import data_dir
from tests.render import golden


@pytest.mark.parametrize("case", golden.cases())
def test_golden_tree(case: str, tmp_path: Path) -> None:
    problems = golden.check(case, tmp_path)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    assert (golden.GOLDEN / case / golden.EXPECTED / "manifest.json").is_file()


def test_cases_use_every_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rendering all cases loads every template in templates/: a new template needs a case that renders it."""
    loaded: set[str] = set()
    get_template = jinja2.Environment.get_template

    def recording(self: jinja2.Environment, name: str | jinja2.Template, *args: object, **kwargs: object) -> jinja2.Template:
        loaded.add(name if isinstance(name, str) else str(name.name))
        return get_template(self, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jinja2.Environment, "get_template", recording)
    for case in golden.cases():
        golden.render_case(case, tmp_path / case)
    root = data_dir("templates")
    templates = {p.relative_to(root).as_posix() for p in root.rglob("*.j2")}
    assert templates, root
    assert templates - loaded == set(), "templates no golden case renders: add a case (tests/render/golden/README.md)"


def test_cases_cover_every_target_and_file_kind() -> None:
    """What the README promises the cases hold, checked on the expected trees themselves."""
    names = {case: set(golden.tree(golden.GOLDEN / case / golden.EXPECTED)) for case in golden.cases()}
    every = set().union(*names.values())
    for suffix in ("/etc/iotplat/tls/ca.crt", "/etc/iotplat/tls/server.crt", "/etc/iotplat/worker.toml",
                   "/etc/mosquitto/mosquitto.conf", "/etc/mosquitto/iotplat/acl", "/etc/influxdb/influxdb.conf",
                   "/etc/influxdb/config.toml", "/etc/grafana/grafana.ini", "/etc/iotplat/dashboards/platform-health.json",
                   "/usr/local/sbin/iotplat-backup", "/etc/systemd/system/iotplat-backup.timer"):
        assert any(n.endswith(suffix) for n in every), suffix
    for name in ("pulumi/aws/Pulumi.fleet-default.yaml", "pulumi/azure/Pulumi.greenhouse-default.yaml",
                 "ansible/inventory.yml", "ansible/group_vars/all.yml", "ansible/site.yml", "ansible/ansible.cfg"):
        assert name in every, name
    assert all("manifest.json" in n for n in names.values())


def test_committed_states_outlive_the_tests() -> None:
    """The cases' certificates are valid for decades, so render never renews one and changes a golden tree."""
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=20 * 365)
    checked = 0
    for case in golden.cases():
        for name, data in golden.tree(golden.GOLDEN / case / golden.EXPECTED).items():
            if name.endswith((".crt",)):
                cert = x509.load_pem_x509_certificate(data)
                assert cert.not_valid_after_utc > soon, f"{case}: {name} expires {cert.not_valid_after_utc}"
                checked += 1
    assert checked >= 2 * len(golden.cases())


@pytest.mark.parametrize("seed", ["0", "1"])
def test_check_command_gives_the_same_bytes_for_any_hash_seed(seed: str) -> None:
    """`python -m tests.render.golden --check` in a fresh interpreter with a fixed string-hash seed (pytest's own
    process has a random one): output that iterated a set unsorted would differ between these runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTPLAT_")}
    env["PYTHONHASHSEED"] = seed
    run = subprocess.run([sys.executable, "-m", "tests.render.golden", "--check"], cwd=golden.REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines() == [f"{case}: identical" for case in golden.cases()]


def test_regenerate_creates_checks_and_updates_a_case(tmp_path: Path) -> None:
    """The regeneration command on a new case: it creates the TEST-ONLY key, the state and expected/; the case
    then checks clean; a registry change is reported as a readable diff plus the state it had to add to, and a
    second regeneration records both."""
    root = tmp_path / "golden"
    shutil.copytree(golden.GOLDEN / "default", root / "new", ignore=shutil.ignore_patterns("state", "expected",
                                                                                         golden.KEY_FILE))
    notes = golden.regenerate("new", tmp_path / "w1", root)
    assert notes[0] == f"created {golden.KEY_FILE}"
    assert {"created state/demo/default/secrets.vault", "created state/demo/default/mqtt-users.vault"} <= set(notes)
    assert notes[-1].startswith("rewrote expected/")
    assert (root / "new" / golden.KEY_FILE).read_text().startswith("TEST-ONLY-")
    crt = (root / "new" / "expected" / "hosts" / "core" / "etc" / "iotplat" / "tls" / "server.crt").read_bytes()
    assert x509.load_pem_x509_certificate(crt).not_valid_after_utc.year >= dt.date.today().year + 99
    assert golden.check("new", tmp_path / "w2", root) == []
    assert golden.regenerate("new", tmp_path / "w3", root) == []  # nothing to change: nothing rewritten

    with (root / "new" / "devices.csv").open("a") as fh:
        fh.write("sensor-0004\n")
    problems = golden.check("new", tmp_path / "w4", root)
    assert problems[0] == f"golden render tree 'new' differs from {root / 'new' / 'expected'}/:"
    assert "changed: manifest.json" in problems
    assert '-  "devices": 3,' in problems and '+  "devices": 4,' in problems
    assert any(p.startswith("render had to add to the case's state (demo/default/mqtt-users.vault)") for p in problems)
    assert problems[-1].startswith("if the change is intended: .venv/bin/python -m tests.render.golden --regenerate new")
    notes = golden.regenerate("new", tmp_path / "w5", root)
    assert notes[0] == "updated state/demo/default/mqtt-users.vault" and notes[1].startswith("rewrote expected/")
    assert golden.check("new", tmp_path / "w6", root) == []


def test_differences_name_missing_unexpected_and_binary_files() -> None:
    report = golden.differences({"a": b"x\n", "b": b"same", "c": b"\xff\x00"}, {"b": b"same", "c": b"\xfe", "d": b""})
    assert report == ["missing (in expected/, not rendered): a", "unexpected (rendered, not in expected/): d",
                      report[2]]
    assert report[2].startswith("changed: c (binary: 2 -> 1 bytes, sha256 ")
